/* AF_XDP rings: one UMEM shared by the sockets of every hook, a frame pool
 * with explicit ownership, and batch RX/TX (rings.c).
 *
 * Functions that can fail return 0 or a count on success and a negative errno
 * on failure; fastpath/rings.py turns those into exceptions in one place.  The
 * block between the CDEF markers is what cffi sees (csrc/build.py).
 */
#ifndef MCNP_RINGS_H
#define MCNP_RINGS_H
#include <stdint.h>

/* CDEF BEGIN */

struct mcnp_umem;
struct mcnp_port;

enum {
    /* A packet longer than a frame arrives as several descriptors (multi-buffer);
     * it is handed on whole, copied into one slot of this many bytes. */
    MCNP_SLOT_BYTES = 16384
};

struct mcnp_port_stats {
    uint64_t rx_frames;
    uint64_t tx_frames;      /* frames whose completion came back */
    uint64_t tx_queued;
    uint64_t tx_ring_full;   /* frames dropped because the TX ring was full */
    uint64_t tx_invalid;     /* descriptors outside the UMEM, dropped */
    uint64_t fill_short;     /* refills that found the pool empty */
    uint64_t kicks;
    uint64_t kick_errors;    /* sendto() failures; the frames stay queued */
    uint64_t rx_multi;       /* packets that came in several descriptors, handed on whole */
    uint64_t rx_multi_dropped; /* such packets dropped: no free slot, or too long for one */
    uint32_t fill_outstanding;
    uint32_t tx_outstanding;
};

/* Register area (page aligned, frames * frame_size + slots * MCNP_SLOT_BYTES
 * bytes, owned by the caller and kept alive until after destroy) as a UMEM.
 * frame_size is a power of two in [2048, page size]; ring_size (power of two)
 * sizes the fill and completion ring of every port and the RX and TX rings.
 * With slots > 0 the sockets take packets longer than a frame (XDP_USE_SG),
 * each copied whole into a free slot; where the kernel refuses that, the UMEM
 * is made without it (mcnp_umem_multi_buffer says which). */
int mcnp_umem_create(struct mcnp_umem **out, void *area, uint32_t frames,
                     uint32_t frame_size, uint32_t ring_size, uint32_t slots);
/* Returns -EBUSY while ports still use the UMEM. */
int mcnp_umem_destroy(struct mcnp_umem *u);
uint32_t mcnp_umem_free_frames(struct mcnp_umem *u);
/* Frames freed twice or outside the area (ownership bugs), refused. */
uint64_t mcnp_umem_bad_frees(struct mcnp_umem *u);
/* 1 when the sockets take packets longer than a frame (slots and XDP_USE_SG). */
int mcnp_umem_multi_buffer(struct mcnp_umem *u);
uint32_t mcnp_umem_free_slots(struct mcnp_umem *u);

/* Frame pool: ownership moves between the pool, the caller, and the kernel. */
uint32_t mcnp_pool_alloc(struct mcnp_umem *u, uint64_t *addrs, uint32_t n);
void mcnp_pool_free(struct mcnp_umem *u, const uint64_t *addrs, uint32_t n);

/* A socket on queue queue_id of ifname in the caller's network namespace,
 * sharing the UMEM (copy mode, need-wakeup).  Its fill ring is kept at
 * fill_target frames.  Register its fd in the hooks' XSKMAP to receive. */
int mcnp_port_open(struct mcnp_port **out, struct mcnp_umem *u, const char *ifname,
                   uint32_t queue_id, uint32_t fill_target);
/* Close the socket; every frame the kernel still held for it returns to the pool. */
void mcnp_port_close(struct mcnp_port *p);
int mcnp_port_fd(struct mcnp_port *p);
void mcnp_port_get_stats(struct mcnp_port *p, struct mcnp_port_stats *out);

/* Take up to max received packets; the caller owns them afterwards and must
 * transmit or free each.  A packet that came in several descriptors is handed
 * over as one slot (its address and whole length); the caller transmits or frees
 * it by that address like any frame.  Reaps completions and refills the fill ring. */
int mcnp_port_rx(struct mcnp_port *p, uint64_t *addrs, uint32_t *lens, uint32_t max);
/* Queue n frames for transmission and kick until the copy-mode TX has
 * drained (bounded).  Takes ownership of all n frames: those that find the
 * TX ring full (or lie outside the UMEM) go back to the pool and are counted.
 * A slot goes as several descriptors (XDP_PKT_CONTD), all or none of them.
 * Returns the frames queued; a failing kick is counted, never returned. */
int mcnp_port_tx(struct mcnp_port *p, const uint64_t *addrs, const uint32_t *lens,
                 uint32_t n);
/* Return completed TX frames to the pool; returns how many. */
uint32_t mcnp_port_reap(struct mcnp_port *p);

/* CDEF END */

#endif /* MCNP_RINGS_H */
