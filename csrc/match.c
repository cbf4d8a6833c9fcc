/* mcnp batch matcher: judge a batch of packets against compiled policy tables.
 *
 * The tables are the numpy arrays of fastpath/tables.py (this kernel only reads
 * them): one call judges a whole batch, so the FFI is crossed once per batch.
 * The steps are exactly those of the numpy path in fastpath/match.py:
 *
 *   1. address -> slot: hash lookup among the addresses one pod owns (the numpy
 *      path binary-searches the same set), else the ipBlock interval the address
 *      falls in;
 *   2. (protocol, destination port) -> port atom: binary search over port cuts;
 *   3. per direction: ports[cell[class[subject] * atoms + atom[other]] * patoms + patom].
 *
 * Every index read from the tables was range-checked once per revision by the
 * Python side (fastpath/match.py, check_tables), so the loop itself has no
 * branches beyond the searches.
 *
 * The block between the CDEF markers is plain C that csrc/build.py hands to
 * cffi's cdef(): the binding is declared once, here.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* CDEF BEGIN */
struct mcnp_match_tables {
    const uint8_t *ip_keys;      /* [n_ip][16], sorted */
    const int32_t *ip_slot;      /* [n_ip] */
    int64_t n_ip;
    const uint8_t *hash_keys;    /* [hash_cap][16]: open addressing, linear probing */
    const int32_t *hash_slot;    /* [hash_cap], -1 = empty bucket (at least one is) */
    int64_t hash_bits;           /* hash_cap = 1 << hash_bits */
    const uint8_t *net_bounds;   /* [n_net][16], sorted, first all zero */
    int64_t n_net;
    const int32_t *port_bounds;  /* [n_port], sorted, first 0 */
    int64_t n_port;
    const int8_t *proto_index;   /* [256] */
    const int32_t *eg_class, *eg_atom, *eg_cell, *eg_ports;
    int64_t eg_atoms;            /* columns of eg_cell */
    const int32_t *in_class, *in_atom, *in_cell, *in_ports;
    int64_t in_atoms;            /* columns of in_cell */
    int64_t patoms;              /* columns of eg_ports and in_ports (= n_port) */
};

/* Judge n packets. src/dst: [n][16] addresses (IPv4-mapped), proto: [n], dport: [n].
 * Writes allowed[n] (0/1), egress[n] and ingress[n] (rule id, -1 denied, -2 not
 * enforced). Returns n. */
int64_t mcnp_judge(const struct mcnp_match_tables *t, int64_t n,
                   const uint8_t *src, const uint8_t *dst,
                   const uint8_t *proto, const uint16_t *dport,
                   uint8_t *allowed, int32_t *egress, int32_t *ingress);
/* CDEF END */

struct key128 { uint64_t hi, lo; };

static inline struct key128 load_key(const uint8_t *p)
{
    uint64_t hi, lo;
    memcpy(&hi, p, 8);
    memcpy(&lo, p + 8, 8);
    struct key128 k = { __builtin_bswap64(hi), __builtin_bswap64(lo) };
    return k;
}

static inline int key_less(struct key128 a, struct key128 b)
{
    return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo);
}

/* Number of keys in sorted keys[0..n) that are <= k. */
static inline int64_t upper_bound(const uint8_t *keys, int64_t n, struct key128 k)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if (key_less(k, load_key(keys + 16 * mid)))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Same function as fastpath.tables.ip_hash. */
static inline uint64_t hash_key(struct key128 k, int64_t bits)
{
    uint64_t h = (k.hi ^ (k.lo * 0x9E3779B97F4A7C15ULL)) * 0xC2B2AE3D27D4EB4FULL;
    return h >> (64 - bits);
}

static inline int32_t slot_of(const struct mcnp_match_tables *t, const uint8_t *addr)
{
    struct key128 k = load_key(addr);
    uint64_t mask = ((uint64_t)1 << t->hash_bits) - 1;
    for (uint64_t h = hash_key(k, t->hash_bits);; h = (h + 1) & mask) {
        int32_t s = t->hash_slot[h];
        if (s < 0)
            break;
        struct key128 found = load_key(t->hash_keys + 16 * h);
        if (found.hi == k.hi && found.lo == k.lo)
            return s;
    }
    return (int32_t)(upper_bound(t->net_bounds, t->n_net, k) - 1);
}

static inline int64_t port_atom(const struct mcnp_match_tables *t, uint8_t proto, uint16_t port)
{
    int32_t idx = t->proto_index[proto];
    int32_t key = (idx << 16) | (idx == 3 ? 0 : port);
    int64_t lo = 0, hi = t->n_port;
    while (lo < hi) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if (key < t->port_bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo - 1;
}

int64_t mcnp_judge(const struct mcnp_match_tables *t, int64_t n,
                   const uint8_t *src, const uint8_t *dst,
                   const uint8_t *proto, const uint16_t *dport,
                   uint8_t *allowed, int32_t *egress, int32_t *ingress)
{
    for (int64_t i = 0; i < n; i++) {
        int32_t s = slot_of(t, src + 16 * i);
        int32_t d = slot_of(t, dst + 16 * i);
        int64_t pa = port_atom(t, proto[i], dport[i]);
        int32_t eps = t->eg_cell[(int64_t)t->eg_class[s] * t->eg_atoms + t->eg_atom[d]];
        int32_t ips = t->in_cell[(int64_t)t->in_class[d] * t->in_atoms + t->in_atom[s]];
        int32_t e = t->eg_ports[(int64_t)eps * t->patoms + pa];
        int32_t g = t->in_ports[(int64_t)ips * t->patoms + pa];
        egress[i] = e;
        ingress[i] = g;
        allowed[i] = (e != -1) & (g != -1);
    }
    return n;
}
