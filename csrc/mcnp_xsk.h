/* mcnp AF_XDP plumbing and batch frame parser: the one header shared by the XDP
 * program (map and program names), the C helpers and the cffi binding.
 *
 * The block between the CDEF markers is plain C declarations without
 * preprocessor lines: csrc/build_xsk.py hands exactly that block to cffi's
 * cdef(), so the binding can never drift from what the C code implements.
 *
 * Every helper works on a whole batch (arrays of UMEM addresses and lengths):
 * one FFI crossing per batch, never one per packet.  Functions that can fail
 * return 0 or a count on success and a negative errno on failure; the Python
 * layer (fastpath/xsk.py) turns those into exceptions in one place.
 */
#ifndef MCNP_XSK_H
#define MCNP_XSK_H

/* Names the user side looks up in the BPF object. */
#define MCNP_XDP_PROG_NAME  "xdp_redirect_xsk"
#define MCNP_XSKS_MAP_NAME  "xsks_map"
#define MCNP_STATS_MAP_NAME "xdp_stats"
#define MCNP_XSKS_MAX       64   /* rx queues per port the XSKMAP can hold */
#define MCNP_STATS_MAX      5    /* one counter per XDP action (XDP_ABORTED..XDP_REDIRECT) */

#ifndef __bpf__
#include <stdint.h>

/* CDEF BEGIN */

/* ---- frame parser (parse.c) ------------------------------------------- */

/* Per-frame verdict classes written to mcnp_parsed.status.
 * Values below MCNP_MALFORMED_MIN are well-formed frames; the others name
 * the first defect found, and every field after it is left zero. */
enum {
    MCNP_OK_IP = 0,          /* IPv4/IPv6 with the L4 fields filled in */
    MCNP_NON_IP = 1,         /* ARP and every other non-IP ethertype: L2 only */
    MCNP_ND = 2,             /* ICMPv6 NDP (133-137) and MLD (130-132, 143) */
    MCNP_FRAGMENT = 3,       /* non-first IP fragment: L3 fields only, no ports */
    MCNP_MALFORMED_MIN = 16,
    MCNP_TRUNCATED = 16,     /* frame ends before a header it declares */
    MCNP_BAD_LENGTH = 17,    /* IPv4 total length shorter than its header */
    MCNP_BAD_IHL = 18,       /* IPv4 IHL < 5 */
    MCNP_BAD_VERSION = 19,   /* IP version field disagrees with the ethertype */
    MCNP_BAD_EXT_HEADER = 20,/* IPv6 chain too long, misplaced hop-by-hop, two fragment headers */
    MCNP_TOO_MANY_TAGS = 21, /* more than two VLAN tags */
    MCNP_TINY_FRAGMENT = 22, /* first fragment too short to hold its L4 header */
    MCNP_BAD_DESCRIPTOR = 23,/* addr/len outside the buffer */
    MCNP_BAD_L4_HEADER = 24  /* TCP data offset < 5 or UDP length inconsistent */
};

/* Where parse writes, one array per field, each with room for `capacity`
 * frames (numpy arrays owned by fastpath.parse.ParsedBatch). */
struct mcnp_parsed {
    uint32_t capacity;
    uint8_t  *status;
    uint8_t  *family;      /* 4, 6, or 0 for non-IP */
    uint8_t  *proto;       /* IP protocol (after IPv6 extension headers) */
    uint8_t  *frag;        /* 0 none, 1 first fragment, 2 non-first */
    uint8_t  *tcp_flags;
    uint8_t  *icmp_type;
    uint8_t  *icmp_code;
    uint8_t  *src;         /* [capacity][16], IPv4 as ::ffff:a.b.c.d */
    uint8_t  *dst;         /* [capacity][16] */
    uint16_t *sport;       /* host order; ICMP echo id for echo messages */
    uint16_t *dport;
    uint16_t *ethertype;   /* innermost ethertype */
    uint16_t *vlan;        /* outer VLAN id, 0 if untagged */
    uint16_t *vlan_inner;  /* inner VLAN id (QinQ), 0 if single/untagged */
    uint16_t *l3_off;
    uint16_t *l4_off;
    uint16_t *l4_len;      /* bytes from l4_off to the end of the IP packet */
    uint64_t *eth_src;     /* MAC as a 48-bit big-endian integer */
    uint64_t *eth_dst;
};

/* Parse n frames buf[addrs[i] : addrs[i] + lens[i]] into out[0..n).
 * n must be <= out->capacity.  Never reads outside buf[0:buf_len]. */
void mcnp_parse_batch(const uint8_t *buf, uint64_t buf_len,
                      const uint64_t *addrs, const uint32_t *lens,
                      uint32_t n, const struct mcnp_parsed *out);

/* Recompute TCP/UDP checksums and the SCTP CRC32c of the frames selected by
 * mask (NULL selects all) that parsed as unfragmented OK_IP.  With
 * only_partial, only frames whose checksum field carries the
 * CHECKSUM_PARTIAL signature (pseudo-header sum for TCP/UDP, zero for SCTP)
 * are rewritten.  Returns the number of frames rewritten. */
uint32_t mcnp_fix_l4_checksums(uint8_t *buf, uint64_t buf_len,
                               const uint64_t *addrs, const uint32_t *lens,
                               uint32_t n, const struct mcnp_parsed *parsed,
                               const uint8_t *mask, int only_partial);

/* ---- UMEM, frame pool and ports (xsk_helpers.c) ------------------------ */

struct mcnp_umem;
struct mcnp_port;

enum {
    MCNP_XDP_AUTO = 0,       /* native (driver) mode, else generic */
    MCNP_XDP_NATIVE = 1,
    MCNP_XDP_GENERIC = 2
};

struct mcnp_port_stats {
    uint64_t rx_frames;
    uint64_t tx_frames;      /* frames whose completion came back */
    uint64_t tx_queued;
    uint64_t tx_ring_full;   /* frames dropped because the TX ring was full */
    uint64_t tx_invalid;     /* descriptors outside the UMEM, dropped */
    uint64_t fill_short;     /* refills that found the pool empty */
    uint64_t kicks;
    uint64_t kick_errors;
    uint32_t fill_outstanding;
    uint32_t tx_outstanding;
};

/* Register area (page aligned, frames * frame_size bytes, owned by the
 * caller and kept alive until after destroy) as a UMEM.  frame_size is a
 * power of two in [2048, page size]; ring_size (power of two) sizes the fill
 * and completion ring of every port and the RX and TX rings. */
int mcnp_umem_create(struct mcnp_umem **out, void *area, uint32_t frames,
                     uint32_t frame_size, uint32_t ring_size);
/* Returns -EBUSY while ports still use the UMEM. */
int mcnp_umem_destroy(struct mcnp_umem *u);
uint32_t mcnp_umem_free_frames(struct mcnp_umem *u);
/* Frames freed twice or outside the area (ownership bugs), refused. */
uint64_t mcnp_umem_bad_frees(struct mcnp_umem *u);

/* Frame pool: ownership moves between the pool, the caller, and the kernel. */
uint32_t mcnp_pool_alloc(struct mcnp_umem *u, uint64_t *addrs, uint32_t n);
void mcnp_pool_free(struct mcnp_umem *u, const uint64_t *addrs, uint32_t n);
/* Duplicate frames into fresh pool frames (for flooding).  Returns how many
 * were copied (fewer than n when the pool runs dry). */
uint32_t mcnp_frames_copy(struct mcnp_umem *u, const uint64_t *src,
                          const uint32_t *lens, uint64_t *dst, uint32_t n);

int mcnp_port_open(struct mcnp_port **out, struct mcnp_umem *u, const char *ifname,
                   const char *bpf_obj_path, uint32_t queue_id, int xdp_mode,
                   uint32_t fill_target);
void mcnp_port_close(struct mcnp_port *p);
int mcnp_port_fd(struct mcnp_port *p);
int mcnp_port_xdp_mode(struct mcnp_port *p);
void mcnp_port_get_stats(struct mcnp_port *p, struct mcnp_port_stats *out);
/* Sum the XDP program's per-CPU action counters into out[MCNP_STATS_MAX]. */
int mcnp_port_xdp_counters(struct mcnp_port *p, uint64_t *out, uint32_t n);

/* Take up to max received frames; the caller owns them afterwards and must
 * transmit or free each.  Reaps completions and refills the fill ring. */
int mcnp_rx_batch(struct mcnp_port *p, uint64_t *addrs, uint32_t *lens, uint32_t max);
/* Queue n frames for transmission and kick until the copy-mode TX has
 * drained (bounded).  Takes ownership of all n frames: those that find the
 * TX ring full go back to the pool and are counted.  Returns frames queued. */
int mcnp_tx_batch(struct mcnp_port *p, const uint64_t *addrs, const uint32_t *lens,
                  uint32_t n);
/* Return completed TX frames to the pool; returns how many. */
uint32_t mcnp_port_reap(struct mcnp_port *p);

/* CDEF END */

#endif /* !__bpf__ */
#endif /* MCNP_XSK_H */
