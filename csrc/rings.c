/* AF_XDP plumbing: one UMEM shared by the sockets of every port, a frame
 * pool that makes ownership of each frame explicit, and batch RX/TX.
 *
 * Frame ownership.  Every UMEM frame is in exactly one place:
 *   pool -> fill ring (kernel) -> RX ring -> caller -> TX ring (kernel)
 *        -> completion ring -> pool
 * or the caller hands it straight back with mcnp_pool_free.  The pool is a
 * LIFO stack of frame base addresses (recently used frames stay warm in the
 * cache).
 *
 * Packets longer than a frame (multi-buffer, XDP_USE_SG).  The kernel hands such
 * a packet over as several RX descriptors, all but the last marked XDP_PKT_CONTD.
 * Userspace parses and judges contiguous bytes, so mcnp_port_rx copies the pieces
 * into a free *slot* (MCNP_SLOT_BYTES of contiguous frames after the pool's, never
 * on a fill ring), frees the pieces and hands over the slot as one frame.  A slot
 * is transmitted as one descriptor per frame it spans, and is free again once the
 * caller freed it or every one of those descriptors completed (slot_refs counts
 * its owners: the caller, or the descriptors in flight).
 *
 * Sockets of different interfaces each get their own fill and completion ring,
 * but all take from and return to this one pool, which is what lets a frame
 * received on one port be transmitted on another without a userspace copy.
 *
 * Kernel facts this code relies on (docs/dataplane.md, "Kernel facts"):
 * copy mode only on veth; libxdp must not load its dispatcher (sockets are
 * made with XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD; csrc/kernel.c loads and
 * attaches the hooks); bind fails with EBUSY for a while after a socket on
 * the same queue closed; copy-mode TX sends at most 32 frames per sendto()
 * kick.  A socket belongs to the network namespace it was made in: the
 * caller enters a pod's namespace before opening its port there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <net/if.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>
#include <xdp/xsk.h>

#include "mcnp_proto.h"
#include "mcnp_rings.h"

#ifndef XDP_USE_SG
#define XDP_USE_SG (1 << 4)     /* Linux >= 6.6; older kernels refuse it */
#endif
#ifndef XDP_PKT_CONTD
#define XDP_PKT_CONTD (1 << 0)
#endif
/* The hook hands userspace whole packets of up to MCNP_USER_PACKET_MAX bytes. */
_Static_assert(MCNP_USER_PACKET_MAX <= MCNP_SLOT_BYTES, "a slot holds the longest packet");
/* Descriptors of one packet looked at in one go: a slot's worth of the smallest frames. */
#define CHAIN_MAX (MCNP_SLOT_BYTES / (2048 - 256) + 1)

#define BIND_RETRIES 100        /* x BIND_RETRY_NS: up to 2 s of EBUSY */
#define BIND_RETRY_NS 20000000L
#define COPY_TX_PER_KICK 32     /* the kernel's default copy-mode TX budget */
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9 /* Linux >= 6.17; older kernels refuse it */
#endif

struct mcnp_umem {
    struct xsk_umem *umem;
    struct xsk_ring_prod fill0; /* rings made with the UMEM; libxdp hands */
    struct xsk_ring_cons comp0; /* them to the first socket: the anchor */
    struct xsk_socket *anchor;  /* the UMEM's own socket, parked on lo */
    struct xsk_ring_prod anchor_tx;
    uint8_t *area;
    uint64_t size;
    uint32_t frame_size;
    uint32_t frames;
    uint32_t ring_size;
    uint64_t *pool;
    uint32_t pool_n;
    uint8_t *in_pool;          /* per frame: 1 while the pool holds it */
    uint64_t bad_frees;
    int nports;
    int sg;                    /* bound with XDP_USE_SG: packets over a frame come in pieces */
    uint64_t slots_base;       /* UMEM address of slot 0: frames * frame_size */
    uint32_t slots;
    uint32_t *slot_free;       /* stack of free slot indexes */
    uint32_t slot_free_n;
    uint16_t *slot_refs;       /* per slot: 0 free, else its owners (see the top) */
};

struct mcnp_port {
    struct mcnp_umem *u;
    int fd;                     /* the AF_XDP socket, -1 once closed */
    void *maps[4];              /* fill, completion, rx, tx rings */
    size_t map_lens[4];
    struct xsk_ring_cons rx;
    struct xsk_ring_prod tx;
    struct xsk_ring_prod fill;
    struct xsk_ring_cons comp;
    int ifindex;
    uint32_t queue_id;
    uint32_t fill_target;
    uint32_t tx_per_kick;       /* frames one sendto() may send in copy mode */
    int skip_pieces;            /* dropping the rest of a chain too long for a slot */
    struct mcnp_port_stats st;
};

/* ---- UMEM and frame pool ----------------------------------------------- */

/* libxdp makes the first socket of a UMEM share the UMEM's own fd, which is
 * never unbound until the UMEM goes: that port could never be re-opened, and
 * once it closed, no new port could be opened at all.  So the UMEM's socket
 * is an anchor bound to a loopback device (copy mode, TX ring only, never
 * used) and every real port gets a socket of its own, released by closing it.
 *
 * Only one socket may bind loopback queue 0 per namespace, so the anchor is
 * made in a private network namespace of its own when we may create one
 * (it lives as long as the socket); otherwise on this namespace's loopback,
 * which allows one UMEM per namespace. */
static int create_anchor(struct mcnp_umem *u)
{
    struct xsk_socket_config cfg = {
        .rx_size = 0,
        .tx_size = 64,
        .libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
        .xdp_flags = 0,
        .bind_flags = XDP_COPY | (u->sg ? XDP_USE_SG : 0),
    };
    struct timespec pause = { 0, BIND_RETRY_NS };
    int err = 0, tries;

    for (tries = 0; tries < BIND_RETRIES; tries++) {
        err = xsk_socket__create_shared(&u->anchor, "lo", 0, u->umem, NULL, &u->anchor_tx,
                                        &u->fill0, &u->comp0, &cfg);
        if (err != -EBUSY)
            break;
        nanosleep(&pause, NULL);
    }
    if (err)
        u->anchor = NULL;
    return err;
}

/* The anchor's bind sets multi-buffer for every socket sharing the UMEM (sharing
 * sockets may not ask for it themselves).  A kernel older than 6.6 refuses the
 * flag: bind without it, and packets longer than a frame stay the hook's to cut. */
static int create_anchor_sg(struct mcnp_umem *u)
{
    int err = create_anchor(u);

    if (err == -EINVAL && u->sg) {
        u->sg = 0;
        err = create_anchor(u);
    }
    return err;
}

/* Register the UMEM and its anchor, inside a private namespace if possible. */
static int create_umem_and_anchor(struct mcnp_umem *u, const struct xsk_umem_config *cfg)
{
    int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    int private = own >= 0 && unshare(CLONE_NEWNET) == 0;
    int err;

    err = xsk_umem__create(&u->umem, u->area, u->size, &u->fill0, &u->comp0, cfg);
    if (!err) {
        err = create_anchor_sg(u);
        if (err) {
            xsk_umem__delete(u->umem);
            u->umem = NULL;
        }
    }
    if (private && setns(own, CLONE_NEWNET) != 0)
        abort(); /* cannot return to the caller's namespace: nothing safe to do */
    if (own >= 0)
        close(own);
    return err;
}

static void umem_free(struct mcnp_umem *u)
{
    free(u->pool);
    free(u->in_pool);
    free(u->slot_free);
    free(u->slot_refs);
    free(u);
}

int mcnp_umem_create(struct mcnp_umem **out, void *area, uint32_t frames,
                     uint32_t frame_size, uint32_t ring_size, uint32_t slots)
{
    struct xsk_umem_config cfg = {
        .fill_size = ring_size,
        .comp_size = ring_size,
        .frame_size = frame_size,
        .frame_headroom = 0,
        .flags = 0,
    };
    struct mcnp_umem *u;
    uint32_t i;
    int err;

    *out = NULL;
    if (!area || frames == 0 || frame_size < 2048 || (frame_size & (frame_size - 1)) ||
        ring_size == 0 || (ring_size & (ring_size - 1)) || slots > 65536)
        return -EINVAL;
    u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->pool = malloc(sizeof(uint64_t) * frames);
    u->in_pool = calloc(frames, 1);
    u->slot_free = malloc(sizeof(uint32_t) * (slots ? slots : 1));
    u->slot_refs = calloc(slots ? slots : 1, sizeof(uint16_t));
    if (!u->pool || !u->in_pool || !u->slot_free || !u->slot_refs) {
        umem_free(u);
        return -ENOMEM;
    }
    u->area = area;
    u->frames = frames;
    u->frame_size = frame_size;
    u->ring_size = ring_size;
    u->slots_base = (uint64_t)frames * frame_size;
    u->slots = slots;
    u->sg = slots > 0;
    u->size = u->slots_base + (uint64_t)slots * MCNP_SLOT_BYTES;
    err = create_umem_and_anchor(u, &cfg);
    if (err) {
        umem_free(u);
        return err < 0 ? err : -err;
    }
    /* Push in reverse so the first allocations hand out the lowest frames. */
    for (i = 0; i < frames; i++) {
        u->pool[i] = (uint64_t)(frames - 1 - i) * frame_size;
        u->in_pool[i] = 1;
    }
    u->pool_n = frames;
    for (i = 0; i < slots; i++)
        u->slot_free[i] = slots - 1 - i;
    u->slot_free_n = u->sg ? slots : 0;
    *out = u;
    return 0;
}

int mcnp_umem_destroy(struct mcnp_umem *u)
{
    int err;
    if (!u)
        return 0;
    if (u->nports > 0)
        return -EBUSY;
    xsk_socket__delete(u->anchor);
    u->anchor = NULL;
    err = xsk_umem__delete(u->umem);
    if (err)
        return err;
    umem_free(u);
    return 0;
}

uint32_t mcnp_umem_free_frames(struct mcnp_umem *u) { return u->pool_n; }
uint64_t mcnp_umem_bad_frees(struct mcnp_umem *u) { return u->bad_frees; }
int mcnp_umem_multi_buffer(struct mcnp_umem *u) { return u->sg; }
uint32_t mcnp_umem_free_slots(struct mcnp_umem *u) { return u->slot_free_n; }

static inline uint64_t pool_take(struct mcnp_umem *u)
{
    uint64_t addr = u->pool[--u->pool_n];
    u->in_pool[addr / u->frame_size] = 0;
    return addr;
}

uint32_t mcnp_pool_alloc(struct mcnp_umem *u, uint64_t *addrs, uint32_t n)
{
    uint32_t i;
    if (n > u->pool_n)
        n = u->pool_n;
    for (i = 0; i < n; i++)
        addrs[i] = pool_take(u);
    return n;
}

/* One owner of the slot holding addr lets go: the caller, or one of its descriptors
 * completing.  The last one frees it. */
static void slot_put(struct mcnp_umem *u, uint64_t addr)
{
    uint32_t s = (uint32_t)((addr - u->slots_base) / MCNP_SLOT_BYTES);

    if (u->slot_refs[s] == 0) {
        u->bad_frees++;
        return;
    }
    if (--u->slot_refs[s] == 0)
        u->slot_free[u->slot_free_n++] = s;
}

static inline int in_slots(const struct mcnp_umem *u, uint64_t addr)
{
    return addr >= u->slots_base && addr < u->size;
}

static inline void pool_put(struct mcnp_umem *u, uint64_t addr)
{
    uint64_t frame = addr / u->frame_size;
    if (in_slots(u, addr)) {
        slot_put(u, addr);
        return;
    }
    /* A frame outside the UMEM or already free: refuse, do not corrupt. */
    if (addr >= u->size || u->in_pool[frame]) {
        u->bad_frees++;
        return;
    }
    u->in_pool[frame] = 1;
    u->pool[u->pool_n++] = frame * u->frame_size;
}

void mcnp_pool_free(struct mcnp_umem *u, const uint64_t *addrs, uint32_t n)
{
    uint32_t i;
    for (i = 0; i < n; i++)
        pool_put(u, addrs[i]);
}

/* ---- ports --------------------------------------------------------------- */

static int kick(struct mcnp_port *p);

/* Copy-mode TX sends at most 32 frames per sendto() by default, so a batch of
 * 256 frames for one port took 8 kicks, each a system call with its own
 * socket lock and mutex.  Where the kernel lets us (XDP_MAX_TX_SKB_BUDGET),
 * one kick may send the whole TX ring; elsewhere we keep kicking per 32. */
static void raise_tx_budget(struct mcnp_port *p)
{
    int budget = (int)p->u->ring_size;

    p->tx_per_kick = COPY_TX_PER_KICK;
    if (setsockopt(p->fd, SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget,
                   sizeof(budget)) == 0)
        p->tx_per_kick = (uint32_t)budget;
}

/* One ring of a socket, mapped and described as <xdp/xsk.h>'s inline ring
 * operations expect it.  A producer ring starts with every slot free. */
static int map_ring(int fd, uint32_t entries, size_t entry_size, off_t pgoff,
                    const struct xdp_ring_offset *o, void *ring, int producer, void **map,
                    size_t *map_len)
{
    struct xsk_ring_prod *r = ring; /* same layout as xsk_ring_cons */
    uint8_t *m;

    *map_len = o->desc + entries * entry_size;
    m = mmap(NULL, *map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, pgoff);
    if (m == MAP_FAILED)
        return -errno;
    *map = m;
    r->mask = entries - 1;
    r->size = entries;
    r->producer = (uint32_t *)(m + o->producer);
    r->consumer = (uint32_t *)(m + o->consumer);
    r->ring = m + o->desc;
    r->flags = (uint32_t *)(m + o->flags);
    r->cached_prod = *r->producer;
    r->cached_cons = *r->consumer + (producer ? entries : 0);
    return 0;
}

static void unmap_rings(struct mcnp_port *p)
{
    int i;
    for (i = 0; i < 4; i++)
        if (p->maps[i])
            munmap(p->maps[i], p->map_lens[i]);
    memset(p->maps, 0, sizeof(p->maps));
}

/* The socket, its four rings, and a bind sharing the UMEM.  Made with system
 * calls rather than libxdp's xsk_socket__create_shared, which shares the fill
 * and completion rings of sockets whose interface *index* and queue match —
 * indexes are per network namespace, so two pods' eth0 (or a pod's eth0 and a
 * node-side veth) often share one, and the second bind failed with EINVAL.
 * The sharing socket inherits copy mode from the UMEM's own socket. */
static int open_socket(struct mcnp_port *p)
{
    uint32_t n = p->u->ring_size;
    struct xdp_mmap_offsets off;
    socklen_t len = sizeof(off);
    struct sockaddr_xdp sxdp = {
        .sxdp_family = AF_XDP,
        .sxdp_ifindex = (uint32_t)p->ifindex,
        .sxdp_queue_id = p->queue_id,
        .sxdp_flags = XDP_SHARED_UMEM,
        .sxdp_shared_umem_fd = (uint32_t)xsk_umem__fd(p->u->umem),
    };
    int fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0), err;

    if (fd < 0)
        return -errno;
    if (setsockopt(fd, SOL_XDP, XDP_RX_RING, &n, sizeof(n)) ||
        setsockopt(fd, SOL_XDP, XDP_TX_RING, &n, sizeof(n)) ||
        setsockopt(fd, SOL_XDP, XDP_UMEM_FILL_RING, &n, sizeof(n)) ||
        setsockopt(fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &n, sizeof(n)) ||
        getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &len)) {
        err = -errno;
        goto fail;
    }
    err = map_ring(fd, n, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING, &off.fr, &p->fill, 1,
                   &p->maps[0], &p->map_lens[0]);
    if (!err)
        err = map_ring(fd, n, sizeof(uint64_t), XDP_UMEM_PGOFF_COMPLETION_RING, &off.cr, &p->comp, 0,
                       &p->maps[1], &p->map_lens[1]);
    if (!err)
        err = map_ring(fd, n, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING, &off.rx, &p->rx, 0,
                       &p->maps[2], &p->map_lens[2]);
    if (!err)
        err = map_ring(fd, n, sizeof(struct xdp_desc), XDP_PGOFF_TX_RING, &off.tx, &p->tx, 1,
                       &p->maps[3], &p->map_lens[3]);
    if (err)
        goto fail;
    if (bind(fd, (struct sockaddr *)&sxdp, sizeof(sxdp)) != 0) {
        err = -errno;
        goto fail;
    }
    p->fd = fd;
    return 0;
fail:
    unmap_rings(p);
    close(fd);
    return err;
}

static int create_socket(struct mcnp_port *p)
{
    struct timespec pause = { 0, BIND_RETRY_NS };
    int err = 0, tries;

    for (tries = 0; tries < BIND_RETRIES; tries++) {
        err = open_socket(p);
        if (err != -EBUSY)
            break;
        nanosleep(&pause, NULL);
    }
    if (err)
        return err;
    raise_tx_budget(p);
    return 0;
}

static void refill(struct mcnp_port *p)
{
    struct mcnp_umem *u = p->u;
    uint32_t want, got, idx, i;

    if (p->st.fill_outstanding >= p->fill_target)
        return;
    want = p->fill_target - p->st.fill_outstanding;
    if (want > u->pool_n) {
        want = u->pool_n;
        p->st.fill_short++;
    }
    if (want == 0)
        return;
    if (xsk_prod_nb_free(&p->fill, want) < want)
        want = xsk_prod_nb_free(&p->fill, want);
    got = xsk_ring_prod__reserve(&p->fill, want, &idx);
    for (i = 0; i < got; i++)
        *xsk_ring_prod__fill_addr(&p->fill, idx + i) = pool_take(u);
    xsk_ring_prod__submit(&p->fill, got);
    p->st.fill_outstanding += got;
    if (got && xsk_ring_prod__needs_wakeup(&p->fill))
        recvfrom(p->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
}

uint32_t mcnp_port_reap(struct mcnp_port *p)
{
    uint32_t idx, got, i;
    got = xsk_ring_cons__peek(&p->comp, p->u->ring_size, &idx);
    for (i = 0; i < got; i++)
        pool_put(p->u, *xsk_ring_cons__comp_addr(&p->comp, idx + i));
    xsk_ring_cons__release(&p->comp, got);
    p->st.tx_outstanding -= got < p->st.tx_outstanding ? got : p->st.tx_outstanding;
    p->st.tx_frames += got;
    return got;
}

/* Give every frame the kernel still holds for this port back to the pool:
 * RX descriptors not yet taken, fill entries not yet consumed, completions. */
static void drain_rings(struct mcnp_port *p)
{
    uint32_t idx, got, i, cons, prod;

    got = xsk_ring_cons__peek(&p->rx, p->u->ring_size, &idx);
    for (i = 0; i < got; i++)
        pool_put(p->u, xsk_ring_cons__rx_desc(&p->rx, idx + i)->addr);
    xsk_ring_cons__release(&p->rx, got);
    cons = __atomic_load_n(p->fill.consumer, __ATOMIC_ACQUIRE);
    prod = *p->fill.producer;
    for (i = cons; i != prod; i++)
        pool_put(p->u, *xsk_ring_prod__fill_addr(&p->fill, i));
    p->st.fill_outstanding = 0;
    mcnp_port_reap(p);
    /* Frames queued for transmission that never completed (the interface went down,
     * the socket closed first): the last tx_outstanding descriptors before the
     * producer.  Copy mode copied whatever the kernel took, so after the socket is
     * closed every one of them is the pool's again (pool_put refuses one it has). */
    prod = p->tx.cached_prod;
    for (i = prod - p->st.tx_outstanding; i != prod; i++)
        pool_put(p->u, xsk_ring_prod__tx_desc(&p->tx, i)->addr);
    p->st.tx_outstanding = 0;
}

int mcnp_port_open(struct mcnp_port **out, struct mcnp_umem *u, const char *ifname,
                   uint32_t queue_id, uint32_t fill_target)
{
    struct mcnp_port *p;
    int err;

    *out = NULL;
    p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->u = u;
    p->queue_id = queue_id;
    p->fill_target = fill_target < u->ring_size ? fill_target : u->ring_size;
    p->fd = -1;
    p->ifindex = (int)if_nametoindex(ifname);
    if (!p->ifindex) {
        free(p);
        return -ENODEV;
    }
    err = create_socket(p);
    if (err) {
        free(p);
        return err < 0 ? err : -err;
    }
    u->nports++;
    refill(p);
    *out = p;
    return 0;
}

void mcnp_port_close(struct mcnp_port *p)
{
    if (!p)
        return;
    if (p->fd >= 0 && p->st.tx_outstanding)
        kick(p); /* let queued frames go out and come back to the pool */
    if (p->fd >= 0) {
        close(p->fd); /* the kernel lets go of the rings' frames; the maps stay readable */
        p->fd = -1;
        drain_rings(p);
        unmap_rings(p);
        p->u->nports--;
    }
    free(p);
}

int mcnp_port_fd(struct mcnp_port *p) { return p->fd; }

void mcnp_port_get_stats(struct mcnp_port *p, struct mcnp_port_stats *out)
{
    *out = p->st;
}

/* ---- batch RX / TX ---------------------------------------------------- */

/* Descriptors first..last of the RX ring (one packet; complete: the last one ends
 * it) copied into a free slot, in order; their frames go back to the pool.  Returns
 * 1 with the slot in *addr and the packet's length in *len, or 0 when it was dropped
 * (no free slot, too long for one, not ended, a piece outside the frames). */
static int gather_pieces(struct mcnp_port *p, uint32_t first, uint32_t last, int complete,
                         uint64_t *addr, uint32_t *len)
{
    struct mcnp_umem *u = p->u;
    uint64_t total = 0, slot = 0;
    uint32_t i, s;
    int ok = complete;

    for (i = first; i != last + 1; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&p->rx, i);
        total += d->len;
        ok &= d->addr < u->slots_base && d->len <= u->frame_size - (d->addr % u->frame_size);
    }
    ok &= u->slot_free_n > 0 && total <= MCNP_SLOT_BYTES;
    if (ok) {
        s = u->slot_free[--u->slot_free_n];
        u->slot_refs[s] = 1;
        slot = u->slots_base + (uint64_t)s * MCNP_SLOT_BYTES;
        total = 0;
    }
    for (i = first; i != last + 1; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&p->rx, i);
        if (ok) {
            memcpy(u->area + slot + total, u->area + d->addr, d->len);
            total += d->len;
        }
        pool_put(u, d->addr);
    }
    if (!ok) {
        p->st.rx_multi_dropped++;
        return 0;
    }
    p->st.rx_multi++;
    *addr = slot;
    *len = (uint32_t)total;
    return 1;
}

int mcnp_port_rx(struct mcnp_port *p, uint64_t *addrs, uint32_t *lens, uint32_t max)
{
    uint32_t idx, got, i = 0, n = 0, end;

    /* Up to max packets; a packet in pieces takes several descriptors. */
    got = xsk_ring_cons__peek(&p->rx, max + (p->u->sg ? CHAIN_MAX : 0), &idx);
    while (i < got && n < max) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&p->rx, idx + i);
        int complete;

        if (p->skip_pieces) { /* the rest of a chain too long for a slot */
            p->skip_pieces = (d->options & XDP_PKT_CONTD) != 0;
            pool_put(p->u, d->addr);
            i++;
            continue;
        }
        if (!(d->options & XDP_PKT_CONTD)) {
            addrs[n] = d->addr;
            lens[n++] = d->len;
            i++;
            continue;
        }
        for (end = i; end < got && end - i < CHAIN_MAX &&
             (xsk_ring_cons__rx_desc(&p->rx, idx + end)->options & XDP_PKT_CONTD); end++)
            ;
        if (end == got)
            break; /* its last piece is not in view yet: next time */
        /* pieces i..end; if the last still says "continued", the chain is longer
         * than any slot holds: dropped, with its pieces still to come */
        complete = !(xsk_ring_cons__rx_desc(&p->rx, idx + end)->options & XDP_PKT_CONTD);
        n += (uint32_t)gather_pieces(p, idx + i, idx + end, complete, &addrs[n], &lens[n]);
        p->skip_pieces = !complete;
        i = end + 1;
    }
    p->rx.cached_cons -= got - i; /* leave what was looked at but not taken */
    xsk_ring_cons__release(&p->rx, i);
    p->st.fill_outstanding -= i < p->st.fill_outstanding ? i : p->st.fill_outstanding;
    p->st.rx_frames += i;
    mcnp_port_reap(p);
    refill(p);
    return (int)n;
}

static int kick(struct mcnp_port *p)
{
    int fd = p->fd;
    uint32_t tries, max_tries = p->st.tx_outstanding / p->tx_per_kick + 8;

    for (tries = 0; p->st.tx_outstanding > 0 && tries < max_tries; tries++) {
        p->st.kicks++;
        if (sendto(fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN &&
            errno != EBUSY && errno != ENOBUFS && errno != EINTR) {
            p->st.kick_errors++;
            return -errno;
        }
        mcnp_port_reap(p);
    }
    return 0;
}

/* Descriptors frame i of a TX batch needs: 1, or one per frame a slot's packet spans;
 * 0 for one that lies outside the UMEM. */
static uint32_t tx_pieces(const struct mcnp_umem *u, uint64_t a, uint32_t len)
{
    uint64_t off;

    if (in_slots(u, a)) {
        off = (a - u->slots_base) % MCNP_SLOT_BYTES;
        if (!u->sg || len == 0 || len > MCNP_SLOT_BYTES - off)
            return 0;
        return (uint32_t)((a % u->frame_size + len + u->frame_size - 1) / u->frame_size);
    }
    if (a >= u->size || len > u->frame_size - (a & (u->frame_size - 1)))
        return 0;
    return 1;
}

int mcnp_port_tx(struct mcnp_port *p, const uint64_t *addrs, const uint32_t *lens,
                  uint32_t n)
{
    struct mcnp_umem *u = p->u;
    uint32_t idx = 0, got, i, q = 0, need = 0, sent = 0;

    mcnp_port_reap(p);
    for (i = 0; i < n; i++)
        need += tx_pieces(u, addrs[i], lens[i]);
    /* reserve() is all-or-nothing: ask for what fits. */
    got = xsk_ring_prod__reserve(&p->tx, xsk_prod_nb_free(&p->tx, need) < need ?
                                 xsk_prod_nb_free(&p->tx, need) : need, &idx);
    for (i = 0; i < n; i++) {
        uint64_t a = addrs[i];
        uint32_t left = lens[i], k = tx_pieces(u, a, left), j;
        if (k == 0) {
            p->st.tx_invalid++;
            pool_put(u, a);
            continue;
        }
        if (got - q < k) { /* a packet goes whole or not at all */
            p->st.tx_ring_full++;
            pool_put(u, a);
            continue;
        }
        if (k > 1) /* one owner per descriptor from now on, in place of the caller */
            u->slot_refs[(a - u->slots_base) / MCNP_SLOT_BYTES] += (uint16_t)(k - 1);
        for (j = 0; j < k; j++) {
            struct xdp_desc *d = xsk_ring_prod__tx_desc(&p->tx, idx + q++);
            uint32_t piece = u->frame_size - (uint32_t)(a % u->frame_size);
            d->addr = a;
            d->len = left < piece ? left : piece;
            d->options = j + 1 < k ? XDP_PKT_CONTD : 0;
            a += d->len;
            left -= d->len;
        }
        sent++;
    }
    /* Give back reserved slots left unused (reserve only advanced cached_prod). */
    p->tx.cached_prod -= got - q;
    xsk_ring_prod__submit(&p->tx, q);
    p->st.tx_queued += q;      /* descriptors, as tx_frames counts their completions */
    p->st.tx_outstanding += q;
    /* A kick that fails is this port's fault, counted in kick_errors; the
     * frames stay queued for the next kick, and the other ports go on. */
    kick(p);
    return (int)sent;
}
