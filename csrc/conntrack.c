/* Connection tracking for the mcnp packet loop (rule S6: connections, not packets).
 *
 * A bounded, open-addressed hash table keyed by the normalised 5-tuple.  The
 * packet loop crosses the FFI twice per batch: mcnp_ct_lookup classifies every
 * frame (new flow, known flow in its original direction, reply, untracked) and
 * advances the state of known flows; after the matcher has judged the new
 * ones, mcnp_ct_commit records the allowed ones.
 *
 * Key normalisation: for TCP, UDP and SCTP the two endpoints are ordered
 * (lower address/port first) and the entry remembers which of them opened the
 * flow, so a reply finds the same slot.  ICMP and ICMPv6 echo are keyed
 * requester-first: a request looks up (src, dst), a reply (dst, src), so an
 * echo *request* from the responder is never taken for a reply.
 *
 * The table never grows.  A key may live in one of PROBE consecutive slots
 * after its hash; an insert takes a free or expired slot there, else evicts
 * the least recently seen entry of that window (counted).  Lookups scan the
 * whole window, so no tombstones are needed.  Timeouts are lazy: an expired
 * entry is treated as absent when met, and mcnp_ct_sweep frees them in slices.
 *
 * The declarations live in csrc/mcnp_ct.h (also the cffi cdef).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mcnp_ct.h"

#define PROBE 16
#define P_TCP 6
#define P_UDP 17
#define P_SCTP 132
#define P_ICMP 1
#define P_ICMPV6 58

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define SCTP_INIT 1
#define SCTP_INIT_ACK 2
#define SCTP_ABORT 6
#define SCTP_SHUTDOWN 7
#define SCTP_SHUTDOWN_ACK 8
#define SCTP_SHUTDOWN_COMPLETE 14

#define SEC 1000000000ull

struct entry {
    uint8_t a[16], b[16];   /* normalised endpoints: a is the lower (or the ICMP requester) */
    uint16_t pa, pb;
    uint8_t proto;
    uint8_t state;
    uint8_t orig_is_b;      /* 1 when b opened the flow */
    uint8_t fin;            /* bit 0: FIN from the opener, bit 1: FIN from the peer */
    uint32_t revision;
    int32_t rule_egress, rule_ingress;
    uint64_t created, last;
    uint64_t packets[2], bytes[2]; /* [0] original direction, [1] reply */
};

struct mcnp_ct {
    uint32_t mask;          /* capacity - 1 */
    uint32_t *tag;          /* 0: free; else hash | 1 */
    struct entry *e;
    uint64_t timeout[MCNP_CTS_COUNT];
    struct mcnp_ct_stats st;
};

/* A normalised key plus which side of it this packet came from. */
struct key {
    const uint8_t *a, *b;
    uint16_t pa, pb;
    uint8_t proto;
    uint8_t from_b;         /* the packet's source is endpoint b */
};

static const uint64_t default_timeouts[MCNP_CTS_COUNT] = {
    [MCNP_CTS_TCP_OPENING] = 30 * SEC,
    [MCNP_CTS_TCP_ESTABLISHED] = 3600 * SEC,
    [MCNP_CTS_TCP_CLOSING] = 120 * SEC,
    [MCNP_CTS_TCP_CLOSED] = 10 * SEC,
    [MCNP_CTS_UDP] = 60 * SEC,
    [MCNP_CTS_ICMP] = 30 * SEC,
    [MCNP_CTS_SCTP_OPENING] = 30 * SEC,
    [MCNP_CTS_SCTP_ESTABLISHED] = 3600 * SEC,
    [MCNP_CTS_SCTP_CLOSING] = 30 * SEC,
    [MCNP_CTS_SCTP_CLOSED] = 10 * SEC,
};

static inline int is_echo(uint8_t proto, uint8_t type, int *request)
{
    if (proto == P_ICMP && (type == 8 || type == 0 || type == 13 || type == 14)) {
        *request = type == 8 || type == 13;
        return 1;
    }
    if (proto == P_ICMPV6 && (type == 128 || type == 129)) {
        *request = type == 128;
        return 1;
    }
    return 0;
}

/* Build the key of one packet; 0 when it cannot be tracked. */
static int make_key(struct key *k, const uint8_t *s, const uint8_t *d, uint8_t p,
                    uint16_t sport, uint16_t dport, uint8_t aux)
{
    int c, request;

    k->proto = p;
    if (p == P_TCP || p == P_UDP || p == P_SCTP) {
        c = memcmp(s, d, 16);
        if (c == 0)
            c = (int)sport - (int)dport;
        if (c <= 0) {
            k->a = s; k->pa = sport; k->b = d; k->pb = dport; k->from_b = 0;
        } else {
            k->a = d; k->pa = dport; k->b = s; k->pb = sport; k->from_b = 1;
        }
        return 1;
    }
    if (is_echo(p, aux, &request)) {
        if (request) {
            k->a = s; k->b = d; k->from_b = 0;
        } else {
            k->a = d; k->b = s; k->from_b = 1;
        }
        k->pa = k->pb = sport;
        return 1;
    }
    return 0;
}

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v * 0x9E3779B97F4A7C15ull;
    h = (h << 27 | h >> 37) * 0xC2B2AE3D27D4EB4Full;
    return h;
}

static uint32_t hash_key(const struct key *k)
{
    uint64_t h = 0x27D4EB2F165667C5ull;
    h = mix(h, rd64(k->a));
    h = mix(h, rd64(k->a + 8));
    h = mix(h, rd64(k->b));
    h = mix(h, rd64(k->b + 8));
    h = mix(h, (uint64_t)k->pa << 32 | (uint64_t)k->pb << 16 | k->proto);
    h ^= h >> 29;
    return (uint32_t)(h ^ (h >> 32)) | 1u;
}

static inline int key_eq(const struct entry *e, const struct key *k)
{
    return e->proto == k->proto && e->pa == k->pa && e->pb == k->pb &&
           memcmp(e->a, k->a, 16) == 0 && memcmp(e->b, k->b, 16) == 0;
}

static inline int expired(const struct mcnp_ct *ct, const struct entry *e, uint64_t now)
{
    return now > e->last && now - e->last > ct->timeout[e->state];
}

static int find(struct mcnp_ct *ct, const struct key *k, uint32_t h)
{
    uint32_t j, s;
    for (j = 0; j < PROBE; j++) {
        s = (h + j) & ct->mask;
        if (ct->tag[s] == h && key_eq(&ct->e[s], k))
            return (int)s;
    }
    return -1;
}

/* Advance a flow's state for a packet in direction dir (0 original, 1 reply).
 * Returns 1 when the packet restarts a closed flow, which must be judged again. */
static int advance(struct entry *e, uint8_t aux, int dir)
{
    switch (e->proto) {
    case P_TCP:
        if (e->state == MCNP_CTS_TCP_CLOSED && (aux & (TCP_SYN | TCP_ACK)) == TCP_SYN)
            return 1;
        if (aux & TCP_RST) {
            e->state = MCNP_CTS_TCP_CLOSED;
        } else if (aux & TCP_FIN) {
            e->fin |= (uint8_t)(1u << dir);
            e->state = e->fin == 3 ? MCNP_CTS_TCP_CLOSED : MCNP_CTS_TCP_CLOSING;
        } else if (dir == 1 && e->state == MCNP_CTS_TCP_OPENING) {
            e->state = MCNP_CTS_TCP_ESTABLISHED;
        }
        return 0;
    case P_SCTP:
        if (e->state == MCNP_CTS_SCTP_CLOSED && aux == SCTP_INIT)
            return 1;
        if (aux == SCTP_ABORT || aux == SCTP_SHUTDOWN_COMPLETE)
            e->state = MCNP_CTS_SCTP_CLOSED;
        else if (aux == SCTP_SHUTDOWN || aux == SCTP_SHUTDOWN_ACK)
            e->state = MCNP_CTS_SCTP_CLOSING;
        else if (dir == 1 && e->state == MCNP_CTS_SCTP_OPENING)
            e->state = MCNP_CTS_SCTP_ESTABLISHED;
        return 0;
    default:
        return 0;
    }
}

static void clear_slot(struct mcnp_ct *ct, uint32_t s)
{
    ct->tag[s] = 0;
}

struct mcnp_ct *mcnp_ct_new(uint32_t capacity)
{
    struct mcnp_ct *ct;
    uint32_t cap = 64;

    while (cap < capacity && cap < (1u << 30))
        cap <<= 1;
    ct = calloc(1, sizeof(*ct));
    if (!ct)
        return NULL;
    ct->tag = calloc(cap, sizeof(*ct->tag));
    ct->e = calloc(cap, sizeof(*ct->e));
    if (!ct->tag || !ct->e) {
        mcnp_ct_free(ct);
        return NULL;
    }
    ct->mask = cap - 1;
    ct->st.capacity = cap;
    memcpy(ct->timeout, default_timeouts, sizeof(ct->timeout));
    return ct;
}

void mcnp_ct_free(struct mcnp_ct *ct)
{
    if (!ct)
        return;
    free(ct->tag);
    free(ct->e);
    free(ct);
}

void mcnp_ct_set_timeout(struct mcnp_ct *ct, uint32_t state, uint64_t ns)
{
    if (state < MCNP_CTS_COUNT)
        ct->timeout[state] = ns;
}

void mcnp_ct_get_stats(const struct mcnp_ct *ct, struct mcnp_ct_stats *out)
{
    *out = ct->st;
}

uint8_t mcnp_ct_lookup_one(struct mcnp_ct *ct, const uint8_t *src, const uint8_t *dst,
                           uint8_t proto, uint16_t sport, uint16_t dport, uint8_t aux,
                           uint32_t len, uint64_t now_ns)
{
    struct key k;
    struct entry *e;
    int s, dir;

    if (!make_key(&k, src, dst, proto, sport, dport, aux))
        return MCNP_CT_UNTRACKED;
    ct->st.lookups++;
    s = find(ct, &k, hash_key(&k));
    if (s >= 0 && expired(ct, &ct->e[s], now_ns)) {
        clear_slot(ct, (uint32_t)s);
        ct->st.expired++;
        s = -1;
    }
    if (s < 0)
        return MCNP_CT_NEW;
    e = &ct->e[s];
    dir = k.from_b != e->orig_is_b;
    if (advance(e, aux, dir)) {
        /* A new connection on the tuple of a closed one: forget the old
         * flow so the new one is judged under the current policy. */
        clear_slot(ct, (uint32_t)s);
        ct->st.reopened++;
        return MCNP_CT_NEW;
    }
    ct->st.hits++;
    e->last = now_ns;
    e->packets[dir]++;
    e->bytes[dir] += len;
    return dir ? MCNP_CT_REPLY : MCNP_CT_ORIG;
}

uint32_t mcnp_ct_lookup(struct mcnp_ct *ct, uint32_t n, const uint8_t *mask,
                        const uint8_t *src, const uint8_t *dst, const uint8_t *proto,
                        const uint16_t *sport, const uint16_t *dport, const uint8_t *aux,
                        const uint32_t *lens, uint64_t now_ns, uint8_t *result)
{
    uint32_t i, fresh = 0;

    for (i = 0; i < n; i++) {
        if (mask && !mask[i]) {
            result[i] = MCNP_CT_SKIPPED;
            continue;
        }
        result[i] = mcnp_ct_lookup_one(ct, src + (size_t)i * 16, dst + (size_t)i * 16,
                                       proto[i], sport[i], dport[i], aux ? aux[i] : 0,
                                       lens ? lens[i] : 0, now_ns);
        fresh += result[i] == MCNP_CT_NEW;
    }
    return fresh;
}

static uint8_t initial_state(uint8_t proto, uint8_t aux)
{
    switch (proto) {
    case P_TCP:
        if (aux & TCP_FIN)
            return MCNP_CTS_TCP_CLOSING;
        return MCNP_CTS_TCP_OPENING;
    case P_UDP:
        return MCNP_CTS_UDP;
    case P_SCTP:
        if (aux == SCTP_ABORT || aux == SCTP_SHUTDOWN_COMPLETE)
            return MCNP_CTS_SCTP_CLOSED;
        if (aux == SCTP_SHUTDOWN || aux == SCTP_SHUTDOWN_ACK)
            return MCNP_CTS_SCTP_CLOSING;
        return MCNP_CTS_SCTP_OPENING;
    default:
        return MCNP_CTS_ICMP;
    }
}

/* Pick a slot for a new key: a free or expired one, else evict the stalest. */
static uint32_t take_slot(struct mcnp_ct *ct, uint32_t h, uint64_t now)
{
    uint32_t j, s, victim = h & ct->mask;
    uint64_t oldest = UINT64_MAX;

    for (j = 0; j < PROBE; j++) {
        s = (h + j) & ct->mask;
        if (ct->tag[s] == 0)
            return s;
        if (expired(ct, &ct->e[s], now)) {
            ct->st.expired++;
            return s;
        }
        if (ct->e[s].last < oldest) {
            oldest = ct->e[s].last;
            victim = s;
        }
    }
    ct->st.evicted++;
    return victim;
}

int mcnp_ct_commit_one(struct mcnp_ct *ct, const uint8_t *src, const uint8_t *dst,
                       uint8_t proto, uint16_t sport, uint16_t dport, uint8_t a,
                       uint32_t len, int32_t rule_egress, int32_t rule_ingress,
                       uint32_t revision, uint64_t now_ns)
{
    struct key k;
    struct entry *e;
    uint32_t h;
    int s, request;

    if (!make_key(&k, src, dst, proto, sport, dport, a))
        return 0;
    if (k.proto == P_TCP && (a & TCP_RST))
        return 0;
    if ((k.proto == P_ICMP || k.proto == P_ICMPV6) && (!is_echo(k.proto, a, &request) || !request))
        return 0;
    h = hash_key(&k);
    s = find(ct, &k, h);
    if (s >= 0 && !expired(ct, &ct->e[s], now_ns)) {
        /* Two frames of one new flow in the same batch. */
        e = &ct->e[s];
        e->last = now_ns;
        e->packets[k.from_b != e->orig_is_b]++;
        ct->st.refreshed++;
        return 0;
    }
    if (s < 0)
        s = (int)take_slot(ct, h, now_ns);
    e = &ct->e[s];
    memset(e, 0, sizeof(*e));
    memcpy(e->a, k.a, 16);
    memcpy(e->b, k.b, 16);
    e->pa = k.pa;
    e->pb = k.pb;
    e->proto = k.proto;
    e->orig_is_b = k.from_b;
    e->state = initial_state(k.proto, a);
    e->fin = (k.proto == P_TCP && (a & TCP_FIN)) ? 1 : 0;
    e->revision = revision;
    e->rule_egress = rule_egress;
    e->rule_ingress = rule_ingress;
    e->created = e->last = now_ns;
    e->packets[0] = 1;
    e->bytes[0] = len;
    ct->tag[s] = h;
    ct->st.created++;
    return 1;
}

uint32_t mcnp_ct_commit(struct mcnp_ct *ct, uint32_t n, const uint8_t *commit,
                        const uint8_t *src, const uint8_t *dst, const uint8_t *proto,
                        const uint16_t *sport, const uint16_t *dport, const uint8_t *aux,
                        const uint32_t *lens, const int32_t *rule_egress,
                        const int32_t *rule_ingress, uint32_t revision, uint64_t now_ns)
{
    uint32_t i, made = 0;

    for (i = 0; i < n; i++) {
        if (!commit[i])
            continue;
        made += (uint32_t)mcnp_ct_commit_one(
            ct, src + (size_t)i * 16, dst + (size_t)i * 16, proto[i], sport[i], dport[i],
            aux ? aux[i] : 0, lens ? lens[i] : 0, rule_egress ? rule_egress[i] : -2,
            rule_ingress ? rule_ingress[i] : -2, revision, now_ns);
    }
    return made;
}

uint32_t mcnp_ct_dump(const struct mcnp_ct *ct, uint64_t now_ns, struct mcnp_ct_flows *out)
{
    uint32_t s, m = 0;

    for (s = 0; s <= ct->mask && m < out->capacity; s++) {
        const struct entry *e = &ct->e[s];
        int ob;
        if (!ct->tag[s] || expired(ct, e, now_ns))
            continue;
        ob = e->orig_is_b;
        out->slot[m] = s;
        memcpy(out->src + (size_t)m * 16, ob ? e->b : e->a, 16);
        memcpy(out->dst + (size_t)m * 16, ob ? e->a : e->b, 16);
        out->sport[m] = ob ? e->pb : e->pa;
        out->dport[m] = ob ? e->pa : e->pb;
        out->proto[m] = e->proto;
        out->state[m] = e->state;
        out->revision[m] = e->revision;
        out->rule_egress[m] = e->rule_egress;
        out->rule_ingress[m] = e->rule_ingress;
        out->created_ns[m] = e->created;
        out->last_ns[m] = e->last;
        out->packets_orig[m] = e->packets[0];
        out->packets_reply[m] = e->packets[1];
        out->bytes_orig[m] = e->bytes[0];
        out->bytes_reply[m] = e->bytes[1];
        m++;
    }
    return m;
}

uint32_t mcnp_ct_kill(struct mcnp_ct *ct, const uint32_t *slots, uint32_t n)
{
    uint32_t i, killed = 0;
    for (i = 0; i < n; i++) {
        if (slots[i] <= ct->mask && ct->tag[slots[i]]) {
            clear_slot(ct, slots[i]);
            killed++;
        }
    }
    ct->st.killed += killed;
    return killed;
}

void mcnp_ct_set_revision(struct mcnp_ct *ct, uint32_t revision)
{
    uint32_t s;
    for (s = 0; s <= ct->mask; s++)
        if (ct->tag[s])
            ct->e[s].revision = revision;
}

uint32_t mcnp_ct_sweep(struct mcnp_ct *ct, uint32_t start, uint32_t count, uint64_t now_ns)
{
    uint32_t j, s, freed = 0;
    for (j = 0; j < count && j <= ct->mask; j++) {
        s = (start + j) & ct->mask;
        if (ct->tag[s] && expired(ct, &ct->e[s], now_ns)) {
            clear_slot(ct, s);
            freed++;
        }
    }
    ct->st.expired += freed;
    return freed;
}

uint32_t mcnp_ct_count(const struct mcnp_ct *ct, uint64_t now_ns)
{
    uint32_t s, live = 0;
    for (s = 0; s <= ct->mask; s++)
        if (ct->tag[s] && !expired(ct, &ct->e[s], now_ns))
            live++;
    return live;
}

void mcnp_ct_clear(struct mcnp_ct *ct)
{
    memset(ct->tag, 0, (size_t)(ct->mask + 1) * sizeof(*ct->tag));
}
