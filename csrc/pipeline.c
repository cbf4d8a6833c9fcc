/* The packet loop's per-batch decisions in two C calls (see fastpath/loop.py).
 *
 * Python used to walk a batch through ~40 numpy and cffi calls; at a few
 * microseconds each under load, a one-frame batch cost ~150 us, which was most
 * of the round trip mcnp added, and a full batch cost more than the frames'
 * own forwarding.  Here one pass per call does the per-frame work, and Python
 * keeps only what must stay in Python: the matcher (numpy, once per batch and
 * only when a frame needs a verdict) and the rare slow paths (inserting new
 * MACs, flooding copies).
 *
 *   classify: parse -> L2 sanity -> fail closed -> anti-spoofing -> MAC learn
 *             -> conntrack; gathers the frames that need a verdict
 *   (Python:  judge the gathered frames; insert new MACs)
 *   finish:   verdicts -> commit new flows, rule hits -> output port, hairpin
 *             -> L4 checksums -> per-port TX lists, floods, drops; counts
 *
 * Semantics are those of docs/dataplane.md, stage by stage; every frame ends
 * in exactly one of a TX list, the flood list or the drop list, and is
 * counted exactly once.
 */
#include <string.h>

#include "mcnp_xsk.h"
#include "mcnp_ct.h"

#define P_SCTP 132
#define MCAST_BIT (1ull << 40)

static int bound_to(const struct mcnp_pipe *p, int port, const uint8_t *src)
{
    static const uint8_t empty[16] = {
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    const uint8_t *cell = p->bound + (size_t)port * p->max_ips * 16;
    uint32_t j;

    for (j = 0; j < p->max_ips; j++, cell += 16)
        if (memcmp(cell, empty, 16) != 0 && memcmp(cell, src, 16) == 0)
            return 1;
    return 0;
}

/* Index of mac in the sorted MAC table, or -1. */
static int mac_find(const struct mcnp_pipe *p, uint64_t mac)
{
    uint32_t lo = 0, hi = p->mac_n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (p->mac_keys[mid] < mac)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < p->mac_n && p->mac_keys[lo] == mac ? (int)lo : -1;
}

/* The conntrack state input: TCP flags, ICMP type, or the first SCTP chunk type. */
static uint8_t aux_of(const struct mcnp_parsed *q, uint32_t i, const uint8_t *buf,
                      uint64_t buf_len, uint64_t addr)
{
    uint8_t a = q->tcp_flags[i] | q->icmp_type[i];

    if (q->proto[i] == P_SCTP && q->status[i] == MCNP_OK_IP && q->frag[i] == 0 &&
        q->l4_len[i] >= 16) {
        uint64_t at = addr + q->l4_off[i] + 12;
        if (at < buf_len)
            a = buf[at];
    }
    return a;
}

uint32_t mcnp_pipe_classify(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                            const uint64_t *addrs, const uint32_t *lens,
                            const int16_t *in_port, uint32_t n, uint64_t now_ns)
{
    const struct mcnp_parsed *q = p->parsed;
    uint32_t i;

    if (n > p->capacity)
        n = p->capacity;
    mcnp_parse_batch(buf, buf_len, addrs, lens, n, q);
    p->n_judge = 0;
    p->n_learn = 0;
    for (i = 0; i < n; i++) {
        uint8_t st = q->status[i];
        int16_t r = p->start_reason[st];
        int alive = p->reason_pass[r];
        int ip = st == MCNP_OK_IP || st == MCNP_FRAGMENT;
        int port = in_port[i], m, judge = 0;

        p->ct_result[i] = MCNP_CT_SKIPPED;
        if (port < 0 || (uint32_t)port >= p->n_ports) {
            /* a caller bug, not traffic: never index with it */
            r = p->start_reason[MCNP_BAD_DESCRIPTOR];
            alive = 0;
        }
        /* 2. a multicast source MAC is never legitimate */
        if (alive && (q->eth_src[i] & MCAST_BIT)) {
            r = MCNP_R_BAD_SRC_MAC;
            alive = 0;
        }
        /* 3. fail closed before the first tables; anti-spoofing on pod ports */
        if (alive && ip) {
            if (!p->have_tables) {
                r = MCNP_R_NO_TABLES;
                alive = 0;
            } else if (p->is_pod[port] && !bound_to(p, port, q->src + (size_t)i * 16)) {
                r = MCNP_R_SPOOFED;
                alive = 0;
            }
        }
        /* 4. MAC learning: refresh known MACs; a pod's MAC does not move */
        if (alive) {
            m = mac_find(p, q->eth_src[i]);
            if (m >= 0 && p->mac_ports[m] == port) {
                p->mac_seen[m] = (int64_t)now_ns;
            } else if (m >= 0 && p->is_pod[p->mac_ports[m]]) {
                r = MCNP_R_MAC_CONFLICT;
                alive = 0;
            } else {
                p->learn_idx[p->n_learn++] = i;
            }
        }
        /* 5a. conntrack; what it does not know needs a verdict */
        if (alive && ip) {
            if (st == MCNP_OK_IP) {
                uint8_t a = aux_of(q, i, buf, buf_len, addrs[i]);
                uint8_t res = mcnp_ct_lookup_one(p->ct, q->src + (size_t)i * 16,
                                                 q->dst + (size_t)i * 16, q->proto[i],
                                                 q->sport[i], q->dport[i], a, lens[i], now_ns);
                p->aux[i] = a;
                p->ct_result[i] = res;
                if (res == MCNP_CT_ORIG)
                    r = MCNP_R_ESTABLISHED;
                else if (res == MCNP_CT_REPLY)
                    r = MCNP_R_REPLY;
                else
                    judge = 1;
            } else {
                judge = 1;  /* non-first fragment: judged with port 0 */
            }
        }
        if (judge) {
            uint32_t k = p->n_judge++;
            p->judge_idx[k] = i;
            memcpy(p->judge_src + (size_t)k * 16, q->src + (size_t)i * 16, 16);
            memcpy(p->judge_dst + (size_t)k * 16, q->dst + (size_t)i * 16, 16);
            p->judge_proto[k] = q->proto[i];
            p->judge_dport[k] = q->dport[i];
        }
        p->reason[i] = r;
        p->alive[i] = (uint8_t)alive;
    }
    return p->n_judge;
}

static inline void rule_hit(struct mcnp_pipe *p, int32_t rule)
{
    if (rule >= 0)
        p->rule_hits[(uint32_t)rule < p->max_rules ? (uint32_t)rule : p->max_rules]++;
}

void mcnp_pipe_finish(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                      const uint64_t *addrs, const uint32_t *lens,
                      const int16_t *in_port, uint32_t n, uint64_t now_ns,
                      const uint8_t *allowed, const int32_t *egress,
                      const int32_t *ingress, uint32_t revision)
{
    const struct mcnp_parsed *q = p->parsed;
    uint32_t i, k, fix = 0;

    if (n > p->capacity)
        n = p->capacity;
    /* 5b. verdicts of the judged frames; admitted new flows are recorded.
     * Without verdicts (a caller that did not judge) they are dropped: the
     * loop fails closed. */
    for (k = 0; k < p->n_judge; k++) {
        i = p->judge_idx[k];
        if (!allowed || !egress || !ingress) {
            p->reason[i] = MCNP_R_NO_TABLES;
            p->alive[i] = 0;
            continue;
        }
        if (!allowed[k]) {
            p->reason[i] = egress[k] == -1 ? MCNP_R_DENIED_EGRESS : MCNP_R_DENIED_INGRESS;
            p->alive[i] = 0;
            continue;
        }
        rule_hit(p, egress[k]);
        rule_hit(p, ingress[k]);
        if (p->ct_result[i] == MCNP_CT_NEW)
            mcnp_ct_commit_one(p->ct, q->src + (size_t)i * 16, q->dst + (size_t)i * 16,
                               q->proto[i], q->sport[i], q->dport[i], p->aux[i], lens[i],
                               egress[k], ingress[k], revision, now_ns);
    }
    *p->gauge_judged += p->n_judge;
    memset(p->tx_count, 0, sizeof(uint32_t) * p->n_ports);
    p->n_flood = 0;
    p->n_drop = 0;
    for (i = 0; i < n; i++) {
        int16_t r = p->reason[i];
        int out = MCNP_FLOOD;

        p->fix_mask[i] = 0;
        if (p->alive[i]) {
            /* 6. forwarding: group addresses and unknown MACs flood */
            if (!(q->eth_dst[i] & MCAST_BIT)) {
                int m = mac_find(p, q->eth_dst[i]);
                if (m >= 0)
                    out = p->mac_ports[m];
            }
            if (out == in_port[i]) {
                r = MCNP_R_HAIRPIN;
                p->alive[i] = 0;
            } else if (out == MCNP_FLOOD && p->n_ports < 2) {
                r = MCNP_R_NO_DESTINATION;
                p->alive[i] = 0;
            }
        }
        if (p->alive[i]) {
            /* 7. checksums of what leaves (CHECKSUM_PARTIAL only, below) */
            if (p->fix_checksums && q->status[i] == MCNP_OK_IP) {
                p->fix_mask[i] = 1;
                fix++;
            }
            /* 8. unicast per port; floods are copied by the caller */
            if (out >= 0 && (uint32_t)out < p->n_ports) {
                uint32_t c = p->tx_count[out]++;
                p->tx_addrs[(size_t)out * p->capacity + c] = addrs[i];
                p->tx_lens[(size_t)out * p->capacity + c] = lens[i];
            } else {
                p->flood_idx[p->n_flood++] = i;
            }
        } else {
            /* 9. drops go back to the pool */
            p->drop_addrs[p->n_drop++] = addrs[i];
        }
        p->reason[i] = r;
        p->verdicts[p->reason_pass[r] ? (uint32_t)r : p->n_reasons + (uint32_t)r]++;
    }
    if (fix)
        mcnp_fix_l4_checksums(buf, buf_len, addrs, lens, n, q, p->fix_mask, 1);
    *p->gauge_batches += 1;
    *p->gauge_frames += n;
}

/* ---- the whole batch in one call ------------------------------------------ */

static void ring_error(struct mcnp_rings *r, int rc, uint32_t port)
{
    r->error = rc;
    r->error_port = (int32_t)port;
}

uint32_t mcnp_pipe_receive(struct mcnp_pipe *p, struct mcnp_rings *r)
{
    uint32_t n = 0, i, nfull = 0, share = r->batch / (r->n_ports ? r->n_ports : 1);
    uint32_t full[64];
    int got;

    if (share == 0)
        share = 1;
    for (i = 0; i < r->n_ports; i++) {
        uint32_t want = share < r->batch - n ? share : r->batch - n, j;
        got = r->rx(r->ports[i], r->addrs + n, r->lens + n, want);
        if (got < 0) {
            ring_error(r, got, i);
            continue;
        }
        for (j = 0; j < (uint32_t)got; j++)
            r->in_port[n + j] = (int16_t)i;
        n += (uint32_t)got;
        if ((uint32_t)got == want && want > 0 && nfull < 64)
            full[nfull++] = i;
    }
    for (i = 0; i < nfull && n < r->batch; i++) {
        uint32_t j;
        got = r->rx(r->ports[full[i]], r->addrs + n, r->lens + n, r->batch - n);
        if (got < 0) {
            ring_error(r, got, full[i]);
            continue;
        }
        for (j = 0; j < (uint32_t)got; j++)
            r->in_port[n + j] = (int16_t)full[i];
        n += (uint32_t)got;
    }
    return n;
}

void mcnp_pipe_send(struct mcnp_pipe *p, struct mcnp_rings *r)
{
    uint32_t q;

    for (q = 0; q < p->n_ports && q < r->n_ports; q++) {
        int rc;
        if (!p->tx_count[q])
            continue;
        rc = r->tx(r->ports[q], p->tx_addrs + (size_t)q * p->capacity,
                   p->tx_lens + (size_t)q * p->capacity, p->tx_count[q]);
        if (rc < 0)
            ring_error(r, rc, q);
    }
}

int32_t mcnp_pipe_step(struct mcnp_pipe *p, struct mcnp_rings *r, uint8_t *buf,
                       uint64_t buf_len, uint64_t now_ns)
{
    uint32_t n = mcnp_pipe_receive(p, r);

    if (n == 0)
        return 0;
    mcnp_pipe_classify(p, buf, buf_len, r->addrs, r->lens, r->in_port, n, now_ns);
    if (p->n_judge || p->n_learn)
        return -(int32_t)n;
    mcnp_pipe_finish(p, buf, buf_len, r->addrs, r->lens, r->in_port, n, now_ns,
                     NULL, NULL, NULL, 0);
    mcnp_pipe_send(p, r);
    if (p->n_drop) {
        r->free(r->umem, p->drop_addrs, p->n_drop);
        p->n_drop = 0;
    }
    return (int32_t)n;
}
