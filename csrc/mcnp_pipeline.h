/* The packet loop's per-batch decisions (pipeline.c): what userspace does
 * with the frames the hooks handed it, in two C calls around the matcher.
 *
 *   classify: parse -> which hook -> fail closed -> anti-spoofing -> the flow
 *             cache's word on the frame; gathers the rows the matcher judges
 *   (Python:  judge the rows, once per batch; Services)
 *   finish:   verdicts -> flows written to the cache in one batch -> L4
 *             checksums -> each allowed frame onto the other end of its
 *             pod's veth; drops; counters; the verdict log
 *
 * The block between the CDEF markers is what cffi sees (csrc/build.py).
 */
#ifndef MCNP_PIPELINE_H
#define MCNP_PIPELINE_H
#include <stdint.h>
#include "mcnp_proto.h"

/* CDEF BEGIN */

/* Reason codes: the order of fastpath.counters.REASONS (checked at import). */
enum {
    MCNP_R_ESTABLISHED = 0, MCNP_R_REPLY = 1, MCNP_R_ALLOWED = 2, MCNP_R_RECHECKED = 3,
    MCNP_R_NO_TABLES = 4, MCNP_R_POD_NOT_READY = 5, MCNP_R_SPOOFED = 6,
    MCNP_R_DENIED_EGRESS = 7, MCNP_R_DENIED_INGRESS = 8, MCNP_R_NON_IP = 9,
    MCNP_R_NO_PEER = 10, MCNP_R_UNKNOWN_PORT = 11, MCNP_R_CACHE_ERROR = 12,
    MCNP_R_WOULD_DENY = 13, /* passed: admitted, but the audit tables deny it */
    MCNP_R_OVERSIZE = 14    /* judged and recorded, not delivered: the headers of a first
                               packet too long for a UMEM frame (MCNP_JUDGE_ONLY_MAC) */
};

/* What a gathered row asks of the matcher. */
enum {
    MCNP_J_EGRESS = 0,     /* the source pod's egress only (a frame leaving a pod) */
    MCNP_J_BOTH = 1,       /* the source's egress and the destination pod's ingress */
    MCNP_J_SERVICE = 2     /* leaving a pod for a Service address: Python decides */
};

/* One hook's socket, by port index: set by Python (fastpath/loop.py). */
struct mcnp_hook_info {
    uint64_t zone;
    int32_t peer;          /* port index of the other end of the pod's veth, -1 none */
    uint8_t role;          /* MCNP_ROLE_* */
    uint8_t ready;         /* the pod's addresses are in the tables in force */
    uint8_t n_ips;
    uint8_t pad;
    uint8_t ips[4][16];
};

/* One judged row, for observers (the verdict log, a ring). */
struct mcnp_verdict {
    uint64_t seq;
    uint64_t time_ns;      /* CLOCK_MONOTONIC */
    uint64_t zone;
    uint8_t src[16];
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    uint8_t proto;
    uint8_t role;
    uint8_t allowed;
    uint8_t reason;        /* MCNP_R_* */
    int32_t rule_egress;
    int32_t rule_ingress;
    uint32_t revision;
    uint32_t pad;
};

struct mcnp_kernel;
struct mcnp_parsed;

struct mcnp_pipe {
    uint32_t capacity;            /* frames per batch */
    uint32_t n_ports;
    uint32_t max_ports;           /* rows of the tx arrays */
    uint32_t revision;            /* tables in force; 0: none yet, drop every IP frame */
    const struct mcnp_hook_info *hooks;
    struct mcnp_kernel *kernel;
    struct mcnp_parsed *parsed;
    int32_t fix_checksums;
    /* Service addresses (sorted): addr[16], proto, 0, port (big endian) */
    const uint8_t *vips;
    uint32_t n_vips;
    uint64_t timeout_ns[11];      /* MCNP_CTS_COUNT, as in the kernel's config */
    /* counters: verdicts flat [pass reasons..., drop reasons...] */
    int64_t *verdicts;
    uint32_t n_reasons;
    const int16_t *start_reason;  /* [256] by parser status */
    int64_t *rule_hits;           /* [max_rules + 1] */
    uint32_t max_rules;
    int64_t *gauge_batches, *gauge_frames, *gauge_judged, *gauge_cache_errors;
    struct mcnp_verdict *log;     /* [log_size], a power of two */
    uint32_t log_size;
    uint64_t *log_seq;            /* next sequence number */
    /* per-frame scratch [capacity] */
    int16_t *reason;
    uint8_t *alive;
    uint8_t *fix_mask;
    struct mcnp_flow_key *keys;
    struct mcnp_flow *cached;
    uint8_t *found;
    /* classify's outputs: rows to judge */
    uint32_t n_judge;
    uint32_t *judge_idx;
    uint8_t *judge_src, *judge_dst, *judge_proto;   /* src/dst [capacity][16] */
    uint16_t *judge_dport;
    uint8_t *judge_kind;          /* MCNP_J_* */
    uint8_t *judge_recheck;       /* 1: a cached flow of an older revision */
    /* finish's outputs */
    uint64_t *tx_addrs;           /* [max_ports][capacity] */
    uint32_t *tx_lens;
    uint32_t *tx_count;           /* [max_ports] */
    uint32_t n_drop;
    uint64_t *drop_addrs;
    struct mcnp_flow_key *new_keys;   /* [capacity] flows to write */
    struct mcnp_flow *new_vals;
    struct mcnp_flow_key *old_keys;   /* [capacity] flows to remove */
    int32_t classes;                  /* 1: record the class of each new flow admitted */
    struct mcnp_flow_key *class_keys; /* [capacity] classes to write */
    struct mcnp_flow *class_vals;
};

/* Parse the batch and sort its frames: dropped at once, passed as a flow the
 * cache already admitted, or gathered into the judge_* rows.  Returns n_judge. */
uint32_t mcnp_pipe_classify(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                            const uint64_t *addrs, const uint32_t *lens,
                            const int16_t *in_port, uint32_t n, uint64_t now_ns);

/* Apply the verdicts of the gathered rows (ok, egress and ingress rule ids:
 * n_judge each; ok NULL drops them all as no_tables), write admitted flows to
 * the cache and remove re-checked ones that are now denied (before anything is
 * sent, so a frame sent on finds its flow), fix L4 checksums, and sort every
 * frame into the TX list of the other end of its pod's veth or the drop list.
 * With classes set, the class of each new TCP, UDP or SCTP flow admitted
 * from or to the pod's own address is written too (mcnp_proto.h; flows the
 * audit tables would deny are left out, so every one of them is logged).
 * Counts every frame once.  audit (NULL: no policy is in audit mode) holds the
 * audit tables' egress and ingress rule ids, two per row: a new flow that ok
 * admits and the audit tables deny (a DENIED side) passes with reason
 * MCNP_R_WOULD_DENY, its record carrying the audit rule ids. */
void mcnp_pipe_finish(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                      const uint64_t *addrs, const uint32_t *lens,
                      const int16_t *in_port, uint32_t n, uint64_t now_ns,
                      const uint8_t *ok, const int32_t *egress, const int32_t *ingress,
                      const int32_t *audit);

struct mcnp_port;
struct mcnp_umem;

/* Take up to max frames from the ports (NULL entries skipped), starting at
 * port `start` so no port is always last.  Returns the frames received. */
uint32_t mcnp_pipe_receive(struct mcnp_pipe *p, struct mcnp_port **ports, uint64_t *addrs,
                           uint32_t *lens, int16_t *in_port, uint32_t max, uint32_t start);
/* Transmit finish's TX lists (one ring call per port) and free the drops. */
void mcnp_pipe_send(struct mcnp_pipe *p, struct mcnp_port **ports, struct mcnp_umem *umem);
/* receive + classify and, when no row needs the matcher, finish + send.
 * *received is the batch size; returns 1 when the caller must complete the
 * batch (judge, mcnp_pipe_finish, mcnp_pipe_send), else 0. */
int32_t mcnp_pipe_step(struct mcnp_pipe *p, struct mcnp_port **ports, struct mcnp_umem *umem,
                       uint8_t *buf, uint64_t buf_len, uint64_t *addrs, uint32_t *lens,
                       int16_t *in_port, uint32_t start, uint64_t now_ns, uint32_t *received);

/* CDEF END */

#endif /* MCNP_PIPELINE_H */
