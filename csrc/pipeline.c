/* The packet loop's per-batch decisions (see mcnp_pipeline.h and
 * docs/dataplane.md).
 *
 * Userspace sees only what the hooks could not decide: first packets, flows of
 * an older tables revision, a pod's frames before its addresses are known, and
 * frames the kernel does not parse (IPv6 extension headers).  One pass per
 * call does the per-frame work; Python keeps only the matcher (numpy, once per
 * batch) and Services.  Every frame ends in exactly one TX list or the drop
 * list and is counted exactly once.
 */
#include <string.h>

#include "mcnp_parse.h"
#include "mcnp_rings.h"
#include "mcnp_kernel.h"
#include "mcnp_pipeline.h"

#define P_TCP MCNP_P_TCP
#define P_UDP MCNP_P_UDP
#define P_ICMP MCNP_P_ICMP
#define P_ICMPV6 MCNP_P_ICMPV6
#define P_SCTP MCNP_P_SCTP
#define TCP_SYN 0x02
#define TCP_ACK 0x10

static int owns(const struct mcnp_hook_info *h, const uint8_t *addr)
{
    uint32_t j;
    for (j = 0; j < h->n_ips && j < 4; j++)
        if (memcmp(h->ips[j], addr, 16) == 0)
            return 1;
    return 0;
}

static int is_v4(const uint8_t *a)
{
    static const uint8_t prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    return memcmp(a, prefix, 12) == 0;
}

/* The pod address an ingress row is judged for: the destination when it is
 * the pod's, else (broadcast, multicast, any other form: rule S12) the pod's
 * first address of the same family. */
static const uint8_t *pod_address(const struct mcnp_hook_info *h, const uint8_t *dst)
{
    uint32_t j;
    if (owns(h, dst))
        return dst;
    for (j = 0; j < h->n_ips && j < 4; j++)
        if (is_v4(h->ips[j]) == is_v4(dst))
            return h->ips[j];
    return dst;
}

static int is_echo(uint8_t proto, uint8_t type) { return MCNP_IS_ECHO(proto, type); }

static int is_echo_request(uint8_t type) { return MCNP_IS_ECHO_REQUEST(type); }

static uint8_t sctp_chunk(const struct mcnp_parsed *q, uint32_t i, const uint8_t *buf,
                          uint64_t buf_len, uint64_t addr)
{
    if (q->proto[i] == P_SCTP && q->frag[i] == 0 && q->l4_len[i] >= 13) {
        uint64_t at = addr + q->l4_off[i] + 12;
        if (at < buf_len)
            return buf[at];
    }
    return 0;
}

/* The cache key of frame i as its hook's pod sees it (csrc/xdp_filter.bpf.c
 * computes the same bytes). */
static void flow_key(const struct mcnp_parsed *q, uint32_t i, const struct mcnp_hook_info *h,
                     struct mcnp_flow_key *k)
{
    const uint8_t *src = q->src + 16 * (size_t)i, *dst = q->dst + 16 * (size_t)i;
    int egress = h->role == MCNP_ROLE_EGRESS;
    uint16_t sport = q->sport[i], dport = q->dport[i];
    uint8_t proto = q->proto[i];

    memset(k, 0, sizeof(*k));
    if (q->frag[i] == 2) {
        sport = dport = 0;
    } else if (proto == P_ICMP || proto == P_ICMPV6) {
        if (!is_echo(proto, q->icmp_type[i]))
            sport = dport = (uint16_t)(q->icmp_type[i] << 8 | q->icmp_code[i]);
        /* who asked: the sender of a request, the receiver of a reply */
        int asked_by_pod = is_echo_request(q->icmp_type[i]) ? egress : !egress;
        if (is_echo(proto, q->icmp_type[i]))
            k->initiator = asked_by_pod ? 0 : 1;
    }
    k->zone = h->zone;
    k->proto = proto;
    memcpy(k->pod_addr, egress ? src : dst, 16);
    memcpy(k->peer_addr, egress ? dst : src, 16);
    k->pod_port = egress ? sport : dport;
    k->peer_port = egress ? dport : sport;
}

/* A cached flow this frame may use as it is (the hook let it through to us
 * only because it raced the flow's installation). */
/* An entry (flow or class) idle past its state's timeout at now_ns, or of no known state.
 * The hooks may have touched it after now_ns was read: then it is not idle. */
static int stale(const struct mcnp_pipe *p, const struct mcnp_flow *f, uint64_t now_ns)
{
    if (f->state >= MCNP_CTS_COUNT)
        return 1;
    return f->last_ns < now_ns && now_ns - f->last_ns > p->timeout_ns[f->state];
}

static int usable(const struct mcnp_pipe *p, const struct mcnp_flow *f, const struct mcnp_parsed *q,
                  uint32_t i, uint8_t chunk, int from_opener, uint64_t now_ns, int *reopen)
{
    uint8_t fl = q->tcp_flags[i];

    *reopen = 0;
    if (stale(p, f, now_ns))
        return 0;
    if (q->proto[i] == P_TCP && (fl & TCP_SYN) && !(fl & TCP_ACK) && from_opener &&
        (f->state == MCNP_CTS_TCP_CLOSED || f->state == MCNP_CTS_TCP_CLOSING))
        *reopen = 1;
    if (q->proto[i] == P_SCTP && chunk == 1 && from_opener &&
        (f->state == MCNP_CTS_SCTP_CLOSED || f->state == MCNP_CTS_SCTP_CLOSING))
        *reopen = 1;
    return !*reopen;
}

static int is_vip(const struct mcnp_pipe *p, const uint8_t *dst, uint8_t proto, uint16_t port)
{
    uint8_t key[20];
    uint32_t lo = 0, hi = p->n_vips;

    memcpy(key, dst, 16);
    key[16] = proto;
    key[17] = 0;
    key[18] = (uint8_t)(port >> 8);
    key[19] = (uint8_t)port;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        int c = memcmp(p->vips + 20 * (size_t)mid, key, 20);
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Gather row n_judge for frame i: the flow's opening direction as the matcher
 * sees it.  opener_is_pod: the pod opened the flow (judged on its egress). */
static void gather(struct mcnp_pipe *p, uint32_t i, const struct mcnp_flow_key *k,
                   const struct mcnp_hook_info *h, int opener_is_pod, int recheck)
{
    uint32_t r = p->n_judge++;
    const uint8_t *pod = pod_address(h, k->pod_addr);

    p->judge_idx[r] = i;
    p->judge_proto[r] = k->proto;
    p->judge_recheck[r] = (uint8_t)recheck;
    if (opener_is_pod) {
        memcpy(p->judge_src + 16 * (size_t)r, pod, 16);
        memcpy(p->judge_dst + 16 * (size_t)r, k->peer_addr, 16);
        p->judge_dport[r] = k->peer_port;
        p->judge_kind[r] = is_vip(p, k->peer_addr, k->proto, k->peer_port) ? MCNP_J_SERVICE
                                                                         : MCNP_J_EGRESS;
    } else {
        memcpy(p->judge_src + 16 * (size_t)r, k->peer_addr, 16);
        memcpy(p->judge_dst + 16 * (size_t)r, pod, 16);
        p->judge_dport[r] = k->pod_port;
        p->judge_kind[r] = MCNP_J_BOTH;
    }
}

static void classify_one(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len, uint64_t addr,
                         uint32_t i, int16_t port, uint64_t now_ns)
{
    const struct mcnp_parsed *q = p->parsed;
    const struct mcnp_hook_info *h;
    uint8_t st = q->status[i], chunk;
    int reopen, from_opener;

    p->alive[i] = 0;
    if (port < 0 || (uint32_t)port >= p->n_ports) {
        p->reason[i] = MCNP_R_UNKNOWN_PORT;
        return;
    }
    h = &p->hooks[port];
    if (st >= MCNP_MALFORMED_MIN) {
        p->reason[i] = p->start_reason[st];
        return;
    }
    if (st == MCNP_NON_IP || st == MCNP_ND) {
        p->reason[i] = MCNP_R_NON_IP; /* the hooks decide these; here only if malformed */
        return;
    }
    if (p->revision == 0) {
        p->reason[i] = MCNP_R_NO_TABLES;
        return;
    }
    if (!h->ready) {
        p->reason[i] = MCNP_R_POD_NOT_READY;
        return;
    }
    if (h->role == MCNP_ROLE_EGRESS && !owns(h, q->src + 16 * (size_t)i)) {
        p->reason[i] = MCNP_R_SPOOFED;
        return;
    }
    flow_key(q, i, h, &p->keys[i]);
    chunk = sctp_chunk(q, i, buf, buf_len, addr);
    if (mcnp_flows_lookup(p->kernel, MCNP_MAP_FLOWS, &p->keys[i], 1, &p->cached[i], &p->found[i]) < 0)
        p->found[i] = 0;
    if (p->found[i]) {
        const struct mcnp_flow *f = &p->cached[i];
        from_opener = f->opener == h->role;
        if (usable(p, f, q, i, chunk, from_opener, now_ns, &reopen)) {
            if (f->revision == p->revision) {
                p->alive[i] = 1;
                p->reason[i] = from_opener ? MCNP_R_ESTABLISHED : MCNP_R_REPLY;
                return;
            }
            /* admitted under older tables: judge its opening direction again */
            p->reason[i] = MCNP_R_RECHECKED;
            gather(p, i, &p->keys[i], h, f->opener == MCNP_ROLE_EGRESS, 1);
            return;
        }
    }
    p->found[i] = 0;
    p->reason[i] = MCNP_R_ALLOWED; /* provisional: the verdict decides */
    gather(p, i, &p->keys[i], h, h->role == MCNP_ROLE_EGRESS, 0);
}

uint32_t mcnp_pipe_classify(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                            const uint64_t *addrs, const uint32_t *lens,
                            const int16_t *in_port, uint32_t n, uint64_t now_ns)
{
    uint32_t i;

    if (n > p->capacity)
        n = p->capacity;
    mcnp_parse_batch(buf, buf_len, addrs, lens, n, p->parsed);
    p->n_judge = 0;
    for (i = 0; i < n; i++)
        classify_one(p, buf, buf_len, addrs[i], i, in_port[i], now_ns);
    return p->n_judge;
}

static void log_verdict(struct mcnp_pipe *p, uint32_t r, const struct mcnp_hook_info *h,
                        int allowed, uint8_t reason, int32_t eg, int32_t in, uint64_t now_ns)
{
    struct mcnp_verdict *v;
    uint64_t seq;

    if (!p->log || !p->log_size)
        return;
    seq = (*p->log_seq)++;
    v = &p->log[seq & (p->log_size - 1)];
    v->seq = seq;
    v->time_ns = now_ns;
    v->zone = h->zone;
    memcpy(v->src, p->judge_src + 16 * (size_t)r, 16);
    memcpy(v->dst, p->judge_dst + 16 * (size_t)r, 16);
    v->sport = p->parsed->sport[p->judge_idx[r]];
    v->dport = p->judge_dport[r];
    v->proto = p->judge_proto[r];
    v->role = h->role;
    v->allowed = (uint8_t)allowed;
    v->reason = reason;
    v->rule_egress = eg;
    v->rule_ingress = in;
    v->revision = p->revision;
}

/* The class of a new flow the verdict admitted (see mcnp_proto.h), if it has one
 * the hook may admit others by: TCP, UDP or SCTP, not a later fragment, from or to the
 * pod's own address.  A class to a Service address holds the verdict on its endpoints
 * of the hand-over in force: the re-check of the next one removes it unless every
 * endpoint is a pod of the cluster (judged at the backend: fastpath/flows.py). */
static void queue_class(struct mcnp_pipe *p, uint32_t r, const struct mcnp_flow *f,
                        const struct mcnp_hook_info *h, uint32_t *n_class)
{
    uint32_t i = p->judge_idx[r];
    const struct mcnp_flow_key *k = &p->keys[i];
    struct mcnp_flow_key *ck;
    struct mcnp_flow *cv;
    uint64_t admitted;
    uint32_t j;
    uint8_t found;

    if (!p->classes || p->parsed->frag[i] == 2 ||
        (k->proto != P_TCP && k->proto != P_UDP && k->proto != P_SCTP) || !owns(h, k->pod_addr))
        return;
    ck = &p->class_keys[*n_class];
    cv = &p->class_vals[*n_class];
    *ck = *k;
    mcnp_class_key(ck, h->role);
    for (j = 0; j < *n_class; j++)
        if (memcmp(&p->class_keys[j], ck, sizeof(*ck)) == 0)
            return; /* already queued in this batch */
    /* Flows of a class queued before the class was recorded reach us after it:
     * a class in force is left alone, and one written again keeps its count
     * (what the rule hits are folded from). */
    if (mcnp_flows_lookup(p->kernel, MCNP_MAP_CLASSES, ck, 1, cv, &found) < 0)
        found = 0;
    if (found && cv->revision == p->revision && cv->opener == h->role && !stale(p, cv, f->last_ns))
        return;
    admitted = found ? cv->packets[0] : 0;
    (*n_class)++;
    memset(cv, 0, sizeof(*cv));
    cv->packets[0] = admitted;
    cv->created_ns = cv->last_ns = f->last_ns;
    cv->revision = f->revision;
    cv->rule_egress = f->rule_egress;
    cv->rule_ingress = f->rule_ingress;
    cv->state = f->state;
    cv->opener = h->role;
}

static void count_rule(struct mcnp_pipe *p, int32_t rule)
{
    if (rule >= 0 && (uint32_t)rule < p->max_rules)
        p->rule_hits[rule]++;
}

/* Apply row r's verdict to its frame; admitted flows are queued for the cache.
 * audit: the audit tables' (egress, ingress) rule ids of the row, or NULL. */
static void apply(struct mcnp_pipe *p, uint32_t r, const uint32_t *lens, const int16_t *in_port,
                  uint64_t now_ns, int ok, int32_t eg, int32_t in, const int32_t *audit,
                  uint32_t *n_new, uint32_t *n_old, uint32_t *n_class)
{
    const struct mcnp_parsed *q = p->parsed;
    uint32_t i = p->judge_idx[r];
    const struct mcnp_hook_info *h = &p->hooks[in_port[i]];
    int recheck = p->judge_recheck[r];

    if (!ok) {
        p->reason[i] = eg == -1 ? MCNP_R_DENIED_EGRESS : MCNP_R_DENIED_INGRESS;
        if (recheck)
            p->old_keys[(*n_old)++] = p->keys[i];
        log_verdict(p, r, h, 0, (uint8_t)p->reason[i], eg, in, now_ns);
        return;
    }
    p->alive[i] = 1;
    struct mcnp_flow *f = &p->new_vals[*n_new];
    p->new_keys[*n_new] = p->keys[i];
    if (recheck) {
        *f = p->cached[i];   /* keeps its state, counters and opener */
    } else {
        memset(f, 0, sizeof(*f));
        f->created_ns = now_ns;
        f->state = mcnp_opening_state(q->proto[i], q->frag[i] == 2);
        f->opener = h->role;
        /* no packet counted here: the frame is counted by the hook when it comes
         * back through it, sent on into the other end of the veth */
        count_rule(p, eg);
        count_rule(p, in);
    }
    f->last_ns = now_ns;
    f->revision = p->revision;
    f->rule_egress = eg;
    f->rule_ingress = in;
    (*n_new)++;
    if (audit && !recheck && (audit[0] == -1 || audit[1] == -1)) {
        /* audit mode: enforcement admits it, full enforcement would not */
        p->reason[i] = MCNP_R_WOULD_DENY;
        eg = audit[0];
        in = audit[1];
    } else if (!recheck) {
        queue_class(p, r, f, h, n_class);
    }
    log_verdict(p, r, h, 1, (uint8_t)p->reason[i], eg, in, now_ns);
}

void mcnp_pipe_finish(struct mcnp_pipe *p, uint8_t *buf, uint64_t buf_len,
                      const uint64_t *addrs, const uint32_t *lens,
                      const int16_t *in_port, uint32_t n, uint64_t now_ns,
                      const uint8_t *ok, const int32_t *egress, const int32_t *ingress,
                      const int32_t *audit)
{
    uint32_t i, r, n_new = 0, n_old = 0, n_class = 0;
    int any_fix = 0;

    if (n > p->capacity)
        n = p->capacity;
    for (r = 0; r < p->n_judge; r++) {
        if (!ok) {
            uint32_t fi = p->judge_idx[r];
            p->reason[fi] = MCNP_R_NO_TABLES;
            continue;
        }
        apply(p, r, lens, in_port, now_ns, ok[r], egress[r], ingress[r],
              audit ? audit + 2 * (size_t)r : NULL, &n_new, &n_old, &n_class);
    }
    *p->gauge_judged += p->n_judge;
    /* The cache first: a frame sent on must find its flow when it comes back. */
    if (n_new && mcnp_flows_update(p->kernel, MCNP_MAP_FLOWS, p->new_keys, p->new_vals, n_new) < 0) {
        (*p->gauge_cache_errors)++;
        for (r = 0; r < p->n_judge; r++) /* not recorded: not sent (it would loop) */
            if (p->alive[p->judge_idx[r]]) {
                p->alive[p->judge_idx[r]] = 0;
                p->reason[p->judge_idx[r]] = MCNP_R_CACHE_ERROR;
            }
    }
    if (n_old)
        mcnp_flows_delete(p->kernel, MCNP_MAP_FLOWS, p->old_keys, n_old);
    /* Classes after their flows; one that fails to be written only means its next
     * flows are judged here as this one was. */
    if (n_class && mcnp_flows_update(p->kernel, MCNP_MAP_CLASSES, p->class_keys, p->class_vals,
                                     n_class) < 0)
        (*p->gauge_cache_errors)++;

    memset(p->tx_count, 0, sizeof(uint32_t) * p->n_ports);
    p->n_drop = 0;
    for (i = 0; i < n; i++) {
        int16_t port = in_port[i];
        int32_t peer = p->alive[i] ? p->hooks[port].peer : -1;
        int pass = p->alive[i] && peer >= 0 && (uint32_t)peer < p->n_ports;
        if (p->alive[i] && !pass)
            p->reason[i] = MCNP_R_NO_PEER;
        if (pass && p->parsed->eth_dst[i] == MCNP_JUDGE_ONLY_MAC) {
            pass = 0; /* its flow is recorded; the packet itself was cut by the hook */
            p->reason[i] = MCNP_R_OVERSIZE;
        }
        p->fix_mask[i] = (uint8_t)(pass && p->fix_checksums);
        any_fix |= p->fix_mask[i];
        p->verdicts[(pass ? 0 : p->n_reasons) + (uint32_t)p->reason[i]]++;
        if (!pass) {
            p->drop_addrs[p->n_drop++] = addrs[i];
            continue;
        }
        uint32_t c = p->tx_count[peer]++;
        p->tx_addrs[(size_t)peer * p->capacity + c] = addrs[i];
        p->tx_lens[(size_t)peer * p->capacity + c] = lens[i];
    }
    if (any_fix)
        mcnp_fix_l4_checksums(buf, buf_len, addrs, lens, n, p->parsed, p->fix_mask, 1);
    *p->gauge_batches += 1;
    *p->gauge_frames += n;
}

/* ---- the whole batch over the rings ------------------------------------------ */

uint32_t mcnp_pipe_receive(struct mcnp_pipe *p, struct mcnp_port **ports, uint64_t *addrs,
                           uint32_t *lens, int16_t *in_port, uint32_t max, uint32_t start)
{
    uint32_t got = 0, k;

    if (max > p->capacity)
        max = p->capacity;
    for (k = 0; k < p->n_ports && got < max; k++) {
        uint32_t port = (start + k) % p->n_ports, j;
        int r;
        if (!ports[port])
            continue;
        r = mcnp_port_rx(ports[port], addrs + got, lens + got, max - got);
        if (r <= 0)
            continue;
        for (j = 0; j < (uint32_t)r; j++)
            in_port[got + j] = (int16_t)port;
        got += (uint32_t)r;
    }
    return got;
}

void mcnp_pipe_send(struct mcnp_pipe *p, struct mcnp_port **ports, struct mcnp_umem *umem)
{
    uint32_t port;

    for (port = 0; port < p->n_ports; port++) {
        uint32_t c = p->tx_count[port];
        if (!c)
            continue;
        if (ports[port])
            mcnp_port_tx(ports[port], p->tx_addrs + (size_t)port * p->capacity,
                         p->tx_lens + (size_t)port * p->capacity, c);
        else
            mcnp_pool_free(umem, p->tx_addrs + (size_t)port * p->capacity, c);
    }
    if (p->n_drop)
        mcnp_pool_free(umem, p->drop_addrs, p->n_drop);
    p->n_drop = 0;
}

int32_t mcnp_pipe_step(struct mcnp_pipe *p, struct mcnp_port **ports, struct mcnp_umem *umem,
                       uint8_t *buf, uint64_t buf_len, uint64_t *addrs, uint32_t *lens,
                       int16_t *in_port, uint32_t start, uint64_t now_ns, uint32_t *received)
{
    uint32_t n = mcnp_pipe_receive(p, ports, addrs, lens, in_port, p->capacity, start);

    *received = n;
    if (n == 0)
        return 0;
    if (mcnp_pipe_classify(p, buf, buf_len, addrs, lens, in_port, n, now_ns) > 0)
        return 1; /* rows to judge: the caller completes the batch */
    mcnp_pipe_finish(p, buf, buf_len, addrs, lens, in_port, n, now_ns, NULL, NULL, NULL, NULL);
    mcnp_pipe_send(p, ports, umem);
    return 0;
}
