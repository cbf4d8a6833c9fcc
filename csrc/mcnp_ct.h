/* Connection tracking: the declarations shared by csrc/conntrack.c, the fused
 * pipeline (csrc/pipeline.c) and the cffi binding.  The block between the CDEF
 * markers is plain C without preprocessor lines: csrc/build_ct.py hands it to
 * cffi's cdef() verbatim, so the binding cannot drift from the C code.
 */
#ifndef MCNP_CT_H
#define MCNP_CT_H
#include <stdint.h>

/* CDEF BEGIN */

/* Per-frame result of mcnp_ct_lookup. */
enum {
    MCNP_CT_NEW = 0,        /* trackable, no live flow: judge, then commit if allowed */
    MCNP_CT_ORIG = 1,       /* live flow, original (admitted) direction */
    MCNP_CT_REPLY = 2,      /* live flow, reply direction */
    MCNP_CT_UNTRACKED = 3,  /* cannot be tracked (other protocols, ICMP errors): judge each */
    MCNP_CT_SKIPPED = 4     /* masked out by the caller */
};

/* Flow states; each has its own timeout. */
enum {
    MCNP_CTS_TCP_OPENING = 0,  /* SYN (or a mid-stream packet) seen, no reply yet */
    MCNP_CTS_TCP_ESTABLISHED = 1,
    MCNP_CTS_TCP_CLOSING = 2,  /* FIN seen in one direction */
    MCNP_CTS_TCP_CLOSED = 3,   /* RST, or FIN both ways */
    MCNP_CTS_UDP = 4,
    MCNP_CTS_ICMP = 5,
    MCNP_CTS_SCTP_OPENING = 6, /* INIT seen */
    MCNP_CTS_SCTP_ESTABLISHED = 7,
    MCNP_CTS_SCTP_CLOSING = 8, /* SHUTDOWN seen */
    MCNP_CTS_SCTP_CLOSED = 9,  /* ABORT or SHUTDOWN COMPLETE */
    MCNP_CTS_COUNT = 10
};

struct mcnp_ct_stats {
    uint64_t lookups;
    uint64_t hits;
    uint64_t created;
    uint64_t refreshed;    /* commit found the flow already present */
    uint64_t expired;      /* entries found or swept past their timeout */
    uint64_t evicted;      /* live entries pushed out by a full probe window */
    uint64_t killed;       /* removed by mcnp_ct_kill (policy re-check) */
    uint64_t reopened;     /* closed flows restarted by a new SYN/INIT: judged again */
    uint32_t capacity;
};

/* Column arrays that mcnp_ct_dump fills, each with room for `capacity` flows.
 * Addresses and ports are in the flow's original direction. */
struct mcnp_ct_flows {
    uint32_t capacity;
    uint32_t *slot;
    uint8_t  *src;          /* [capacity][16] */
    uint8_t  *dst;          /* [capacity][16] */
    uint16_t *sport;
    uint16_t *dport;
    uint8_t  *proto;
    uint8_t  *state;
    uint32_t *revision;
    int32_t  *rule_egress;
    int32_t  *rule_ingress;
    uint64_t *created_ns;
    uint64_t *last_ns;
    uint64_t *packets_orig;
    uint64_t *packets_reply;
    uint64_t *bytes_orig;
    uint64_t *bytes_reply;
};

struct mcnp_ct;

/* capacity is rounded up to a power of two (minimum 64). NULL on ENOMEM. */
struct mcnp_ct *mcnp_ct_new(uint32_t capacity);
void mcnp_ct_free(struct mcnp_ct *ct);
void mcnp_ct_set_timeout(struct mcnp_ct *ct, uint32_t state, uint64_t ns);
void mcnp_ct_get_stats(const struct mcnp_ct *ct, struct mcnp_ct_stats *out);

/* Classify frames i < n with mask[i] != 0 (mask NULL: all) and advance the
 * state of the flows they belong to.  aux[i] is the TCP flags for TCP, the
 * first chunk type for SCTP, the ICMP type for ICMP/ICMPv6.  lens may be NULL.
 * Writes result[i] (MCNP_CT_*) and returns the number of MCNP_CT_NEW frames. */
uint32_t mcnp_ct_lookup(struct mcnp_ct *ct, uint32_t n, const uint8_t *mask,
                        const uint8_t *src, const uint8_t *dst, const uint8_t *proto,
                        const uint16_t *sport, const uint16_t *dport, const uint8_t *aux,
                        const uint32_t *lens, uint64_t now_ns, uint8_t *result);

/* Record a flow for every frame with commit[i] != 0 whose packet may open one
 * (not a lone TCP RST, not an ICMP echo reply), admitted at `revision` by the
 * given rule ids.  A flow already present is refreshed.  Returns flows created. */
uint32_t mcnp_ct_commit(struct mcnp_ct *ct, uint32_t n, const uint8_t *commit,
                        const uint8_t *src, const uint8_t *dst, const uint8_t *proto,
                        const uint16_t *sport, const uint16_t *dport, const uint8_t *aux,
                        const uint32_t *lens, const int32_t *rule_egress,
                        const int32_t *rule_ingress, uint32_t revision, uint64_t now_ns);

/* One frame of mcnp_ct_lookup / mcnp_ct_commit (src, dst: 16 bytes each).
 * lookup_one returns MCNP_CT_NEW, _ORIG, _REPLY or _UNTRACKED; commit_one
 * returns 1 when it created a flow. */
uint8_t mcnp_ct_lookup_one(struct mcnp_ct *ct, const uint8_t *src, const uint8_t *dst,
                           uint8_t proto, uint16_t sport, uint16_t dport, uint8_t aux,
                           uint32_t len, uint64_t now_ns);
int mcnp_ct_commit_one(struct mcnp_ct *ct, const uint8_t *src, const uint8_t *dst,
                       uint8_t proto, uint16_t sport, uint16_t dport, uint8_t aux,
                       uint32_t len, int32_t rule_egress, int32_t rule_ingress,
                       uint32_t revision, uint64_t now_ns);

/* Copy up to out->capacity live flows into out; returns how many. */
uint32_t mcnp_ct_dump(const struct mcnp_ct *ct, uint64_t now_ns, struct mcnp_ct_flows *out);
/* Remove the flows in the given slots (as reported by mcnp_ct_dump). */
uint32_t mcnp_ct_kill(struct mcnp_ct *ct, const uint32_t *slots, uint32_t n);
/* Stamp every live flow with `revision` (after a re-check let it stand). */
void mcnp_ct_set_revision(struct mcnp_ct *ct, uint32_t revision);
/* Free expired entries in slots [start, start + count); returns entries freed. */
uint32_t mcnp_ct_sweep(struct mcnp_ct *ct, uint32_t start, uint32_t count, uint64_t now_ns);
/* Live (unexpired) flows; a full scan, for stats, not the hot path. */
uint32_t mcnp_ct_count(const struct mcnp_ct *ct, uint64_t now_ns);
void mcnp_ct_clear(struct mcnp_ct *ct);

/* ---- the fused per-batch pipeline (pipeline.c) -------------------------- */

/* Reason codes: the order of fastpath.counters.REASONS (checked at import). */
enum {
    MCNP_R_L2 = 0, MCNP_R_ND = 1, MCNP_R_ESTABLISHED = 2, MCNP_R_REPLY = 3,
    MCNP_R_ALLOWED = 4, MCNP_R_NO_TABLES = 5, MCNP_R_SPOOFED = 6, MCNP_R_BAD_SRC_MAC = 7,
    MCNP_R_MAC_CONFLICT = 8, MCNP_R_DENIED_EGRESS = 9, MCNP_R_DENIED_INGRESS = 10,
    MCNP_R_HAIRPIN = 11, MCNP_R_NO_DESTINATION = 12
};

enum { MCNP_FLOOD = -1 };

struct mcnp_parsed;   /* parse.c's column batch (mcnp_xsk.h) */

/* Everything one batch needs besides its frames.  Python (fastpath/loop.py)
 * points these at numpy arrays it keeps alive; the pipeline never allocates.
 * Arrays sized by `capacity` hold one row per frame of the batch. */
struct mcnp_pipe {
    uint32_t capacity;
    uint32_t n_ports;
    /* switch: pod ports, their bound addresses, the learned MAC table */
    const uint8_t *is_pod;        /* [n_ports] */
    const uint8_t *bound;         /* [n_ports][max_ips][16]; all-ones bytes: empty */
    uint32_t max_ips;
    const uint64_t *mac_keys;     /* sorted ascending */
    const int16_t *mac_ports;
    int64_t *mac_seen;
    uint32_t mac_n;
    /* policy state */
    struct mcnp_ct *ct;
    int32_t have_tables;
    int32_t fix_checksums;
    struct mcnp_parsed *parsed;
    /* counters: verdicts flat [pass reasons..., drop reasons...] */
    int64_t *verdicts;
    uint32_t n_reasons;
    const int16_t *start_reason;  /* [256] by parser status */
    const uint8_t *reason_pass;   /* [n_reasons] */
    int64_t *rule_hits;           /* [max_rules + 1] */
    uint32_t max_rules;
    int64_t *gauge_batches, *gauge_frames, *gauge_judged;
    /* per-frame scratch */
    int16_t *reason;
    uint8_t *alive;
    uint8_t *ct_result;
    uint8_t *aux;
    uint8_t *fix_mask;
    /* classify's outputs: frames to judge (gathered), MACs to learn */
    uint32_t n_judge;
    uint32_t *judge_idx;
    uint8_t *judge_src, *judge_dst, *judge_proto;   /* src/dst [capacity][16] */
    uint16_t *judge_dport;
    uint32_t n_learn;
    uint32_t *learn_idx;
    /* finish's outputs: unicast per port, floods, drops */
    uint64_t *tx_addrs;           /* [n_ports][capacity] */
    uint32_t *tx_lens;            /* [n_ports][capacity] */
    uint32_t *tx_count;           /* [n_ports] */
    uint32_t n_flood;
    uint32_t *flood_idx;
    uint32_t n_drop;
    uint64_t *drop_addrs;
};

/* Stages 1-5a of a batch: parse, L2 sanity, fail closed, anti-spoofing, MAC
 * learning (known MACs refreshed; new or moved ones listed in learn_idx for
 * the caller to insert), conntrack.  Frames still needing a verdict (new
 * flows, untracked protocols, non-first fragments) are gathered into the
 * judge_* columns.  Returns n_judge. */
uint32_t mcnp_pipe_classify(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                            const uint64_t *addrs, const uint32_t *lens,
                            const int16_t *in_port, uint32_t n, uint64_t now_ns);

/* Stages 5b-9: apply the judgement of the gathered frames (allowed,
 * egress, ingress: n_judge rows each; NULL drops the gathered frames as
 * no_tables, failing closed), record the
 * admitted new flows, count rule hits, look up output ports (after the
 * caller's MAC learning), drop hairpins, fix L4 checksums, and sort every
 * frame into tx lists, flood_idx or drop_addrs.  Counts every frame once. */
void mcnp_pipe_finish(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                      const uint64_t *addrs, const uint32_t *lens,
                      const int16_t *in_port, uint32_t n, uint64_t now_ns,
                      const uint8_t *allowed, const int32_t *egress,
                      const int32_t *ingress, uint32_t revision);


/* ---- the whole batch in one call (pipeline.c) ---------------------------- */

/* The ring functions of fastpath._xsk (csrc/xsk_helpers.c), reached through
 * pointers because they live in another extension module. */
struct mcnp_port;
struct mcnp_umem;
typedef int (*mcnp_rx_fn)(struct mcnp_port *port, uint64_t *addrs, uint32_t *lens, uint32_t max);
typedef int (*mcnp_tx_fn)(struct mcnp_port *port, const uint64_t *addrs, const uint32_t *lens,
                          uint32_t n);
typedef void (*mcnp_free_fn)(struct mcnp_umem *umem, const uint64_t *addrs, uint32_t n);

struct mcnp_rings {
    uint32_t n_ports;         /* == the pipeline's n_ports */
    struct mcnp_port **ports;
    struct mcnp_umem *umem;
    mcnp_rx_fn rx;
    mcnp_tx_fn tx;
    mcnp_free_fn free;
    uint64_t *addrs;          /* [batch] */
    uint32_t *lens;           /* [batch] */
    int16_t *in_port;         /* [batch] */
    uint32_t batch;
    int32_t error;            /* last negative errno of a ring call, 0 if none */
    int32_t error_port;
};

/* Gather a batch from every port: a fair share each, then the room left to
 * the ports that filled theirs.  Returns the frames received. */
uint32_t mcnp_pipe_receive(struct mcnp_pipe *p, struct mcnp_rings *r);
/* Transmit the TX lists left by mcnp_pipe_finish, one ring call per port. */
void mcnp_pipe_send(struct mcnp_pipe *p, struct mcnp_rings *r);
/* receive + classify and, when no frame needs the caller (nothing to judge,
 * no MAC to insert), finish + send + free the drops.  Returns the frames
 * received, negated when the caller must complete the batch itself (judge,
 * learn, mcnp_pipe_finish, mcnp_pipe_send, free drop_addrs).  Floods are
 * always left to the caller (n_flood). */
int32_t mcnp_pipe_step(struct mcnp_pipe *p, struct mcnp_rings *r, uint8_t *buf,
                       uint64_t buf_len, uint64_t now_ns);

/* CDEF END */

#endif /* MCNP_CT_H */
