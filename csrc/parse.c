/* Batch frame parser and L4 checksum fixer.
 *
 * One call parses a whole batch of Ethernet frames into column arrays (see
 * struct mcnp_parsed), so the matcher can work on numpy views and the FFI is
 * crossed once per batch.  Every read is checked against the frame length and
 * the IP packet's own length; a frame that fails a check gets a malformed
 * status naming the first defect, never a crash and never a read past its end.
 */
#include <string.h>
#include "mcnp_parse.h"
#include "mcnp_proto.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define ETH_P_QINQ_OLD 0x9100
#define MAX_TAGS 2
#define MAX_EXT_HEADERS 8

#define P_TCP MCNP_P_TCP
#define P_UDP MCNP_P_UDP
#define P_SCTP MCNP_P_SCTP
#define P_ICMP MCNP_P_ICMP
#define P_ICMPV6 MCNP_P_ICMPV6

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint64_t rd_mac(const uint8_t *p)
{
    return (uint64_t)p[0] << 40 | (uint64_t)p[1] << 32 | (uint64_t)p[2] << 24 |
           (uint64_t)p[3] << 16 | (uint64_t)p[4] << 8 | (uint64_t)p[5];
}

static int icmpv6_is_nd(uint8_t type)
{
    return (type >= 133 && type <= 137) || (type >= 130 && type <= 132) || type == 143;
}

/* Fill the L4 fields; f[l4 .. end) is the transport payload of the packet. */
static uint8_t parse_l4(const uint8_t *f, uint32_t l4, uint32_t end, uint8_t proto,
                        uint8_t family, uint8_t frag, const struct mcnp_parsed *o,
                        uint32_t i)
{
    uint32_t rem = end - l4;
    uint8_t short_status = frag == 1 ? MCNP_TINY_FRAGMENT : MCNP_TRUNCATED;
    const uint8_t *h = f + l4;

    switch (proto) {
    case P_TCP:
        if (rem < 20)
            return short_status;
        if ((h[12] >> 4) < 5 || (frag == 0 && (uint32_t)(h[12] >> 4) * 4 > rem))
            return MCNP_BAD_L4_HEADER;
        o->sport[i] = rd16(h);
        o->dport[i] = rd16(h + 2);
        o->tcp_flags[i] = h[13];
        return MCNP_OK_IP;
    case P_UDP:
        if (rem < 8)
            return short_status;
        if (frag == 0 && (rd16(h + 4) < 8 || rd16(h + 4) > rem))
            return MCNP_BAD_L4_HEADER;
        o->sport[i] = rd16(h);
        o->dport[i] = rd16(h + 2);
        return MCNP_OK_IP;
    case P_SCTP:
        if (rem < 12)
            return short_status;
        o->sport[i] = rd16(h);
        o->dport[i] = rd16(h + 2);
        return MCNP_OK_IP;
    case P_ICMP:
    case P_ICMPV6:
        if ((proto == P_ICMP) != (family == 4))
            return MCNP_OK_IP; /* ICMP in IPv6 or ICMPv6 in IPv4: no fields */
        if (rem < 8)
            return short_status;
        o->icmp_type[i] = h[0];
        o->icmp_code[i] = h[1];
        /* Echo request/reply (and ICMPv4 timestamp/info) carry an identifier
         * that plays the role of a port for connection tracking. */
        if ((family == 4 && (h[0] == 0 || h[0] == 8 || h[0] == 13 || h[0] == 14)) ||
            (family == 6 && (h[0] == 128 || h[0] == 129))) {
            o->sport[i] = rd16(h + 4);
            o->dport[i] = rd16(h + 4);
        }
        if (family == 6 && frag == 0 && icmpv6_is_nd(h[0]))
            return MCNP_ND;
        return MCNP_OK_IP;
    default:
        return MCNP_OK_IP;
    }
}

static uint8_t parse_ipv4(const uint8_t *f, uint32_t len, uint32_t off,
                          const struct mcnp_parsed *o, uint32_t i)
{
    const uint8_t *h = f + off;
    uint32_t ihl, tot, end, fo;
    uint8_t frag;

    if (off + 20 > len)
        return MCNP_TRUNCATED;
    if ((h[0] >> 4) != 4)
        return MCNP_BAD_VERSION;
    ihl = (uint32_t)(h[0] & 0x0f) * 4;
    if (ihl < 20)
        return MCNP_BAD_IHL;
    if (off + ihl > len)
        return MCNP_TRUNCATED;
    tot = rd16(h + 2);
    if (tot < ihl)
        return MCNP_BAD_LENGTH;
    if (off + tot > len)
        return MCNP_TRUNCATED;
    end = off + tot;

    o->family[i] = 4;
    o->proto[i] = h[9];
    memset(o->src + (size_t)i * 16, 0, 10);
    memset(o->dst + (size_t)i * 16, 0, 10);
    o->src[(size_t)i * 16 + 10] = o->src[(size_t)i * 16 + 11] = 0xff;
    o->dst[(size_t)i * 16 + 10] = o->dst[(size_t)i * 16 + 11] = 0xff;
    memcpy(o->src + (size_t)i * 16 + 12, h + 12, 4);
    memcpy(o->dst + (size_t)i * 16 + 12, h + 16, 4);

    fo = rd16(h + 6);
    frag = (fo & 0x1fff) ? 2 : (fo & 0x2000) ? 1 : 0;
    o->frag[i] = frag;
    o->l4_off[i] = (uint16_t)(off + ihl);
    o->l4_len[i] = (uint16_t)(end - off - ihl);
    if (frag == 2)
        return MCNP_FRAGMENT;
    return parse_l4(f, off + ihl, end, h[9], 4, frag, o, i);
}

static uint8_t parse_ipv6(const uint8_t *f, uint32_t len, uint32_t off,
                          const struct mcnp_parsed *o, uint32_t i)
{
    const uint8_t *h = f + off;
    uint32_t end, cur, hl;
    uint8_t nh, frag = 0;
    int n_ext, n_frag = 0;

    if (off + 40 > len)
        return MCNP_TRUNCATED;
    if ((h[0] >> 4) != 6)
        return MCNP_BAD_VERSION;
    end = off + 40 + rd16(h + 4);
    if (end > len)
        return MCNP_TRUNCATED;

    o->family[i] = 6;
    memcpy(o->src + (size_t)i * 16, h + 8, 16);
    memcpy(o->dst + (size_t)i * 16, h + 24, 16);

    nh = h[6];
    cur = off + 40;
    for (n_ext = 0;; n_ext++) {
        int is_ext = nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51;
        if (!is_ext)
            break;
        if (n_ext >= MAX_EXT_HEADERS || (nh == 0 && n_ext > 0))
            return MCNP_BAD_EXT_HEADER;
        if (nh == 44) { /* fragment header: fixed 8 bytes */
            uint16_t fo;
            if (cur + 8 > end)
                return MCNP_TRUNCATED;
            if (++n_frag > 1)
                return MCNP_BAD_EXT_HEADER;
            fo = rd16(f + cur + 2);
            nh = f[cur];
            cur += 8;
            if (fo & 0xfff8) {
                frag = 2;
                break;
            }
            if (fo & 1)
                frag = 1;
            continue;
        }
        if (cur + 2 > end)
            return MCNP_TRUNCATED;
        hl = nh == 51 ? ((uint32_t)f[cur + 1] + 2) * 4 : ((uint32_t)f[cur + 1] + 1) * 8;
        if (cur + hl > end)
            return MCNP_TRUNCATED;
        nh = f[cur];
        cur += hl;
    }

    o->proto[i] = nh;
    o->frag[i] = frag;
    o->l4_off[i] = (uint16_t)cur;
    o->l4_len[i] = (uint16_t)(end - cur);
    if (frag == 2)
        return MCNP_FRAGMENT;
    return parse_l4(f, cur, end, nh, 6, frag, o, i);
}

static uint8_t parse_one(const uint8_t *f, uint32_t len, const struct mcnp_parsed *o,
                         uint32_t i)
{
    uint32_t off = 12;
    uint16_t et;
    int tags = 0;

    if (len < ETH_HLEN)
        return MCNP_TRUNCATED;
    o->eth_dst[i] = rd_mac(f);
    o->eth_src[i] = rd_mac(f + 6);
    et = rd16(f + off);
    off += 2;
    while (et == ETH_P_8021Q || et == ETH_P_8021AD || et == ETH_P_QINQ_OLD) {
        if (tags == MAX_TAGS)
            return MCNP_TOO_MANY_TAGS;
        if (off + 4 > len)
            return MCNP_TRUNCATED;
        if (tags == 0)
            o->vlan[i] = rd16(f + off) & 0x0fff;
        else
            o->vlan_inner[i] = rd16(f + off) & 0x0fff;
        et = rd16(f + off + 2);
        off += 4;
        tags++;
    }
    o->ethertype[i] = et;
    o->l3_off[i] = (uint16_t)off;
    if (et == ETH_P_IP)
        return parse_ipv4(f, len, off, o, i);
    if (et == ETH_P_IPV6)
        return parse_ipv6(f, len, off, o, i);
    /* ARP, LLDP, 802.3 length frames, anything else: switched at L2 only. */
    return MCNP_NON_IP;
}

static void clear_one(const struct mcnp_parsed *o, uint32_t i)
{
    o->family[i] = o->proto[i] = o->frag[i] = o->tcp_flags[i] = 0;
    o->icmp_type[i] = o->icmp_code[i] = 0;
    o->sport[i] = o->dport[i] = o->ethertype[i] = o->vlan[i] = o->vlan_inner[i] = 0;
    o->l3_off[i] = o->l4_off[i] = o->l4_len[i] = 0;
    o->eth_src[i] = o->eth_dst[i] = 0;
    memset(o->src + (size_t)i * 16, 0, 16);
    memset(o->dst + (size_t)i * 16, 0, 16);
}

/* Keep only what a malformed frame's first checks established: the MACs and
 * VLANs are still needed to count it against a port; IP fields are not. */
static void clear_l3(const struct mcnp_parsed *o, uint32_t i)
{
    o->family[i] = o->proto[i] = o->frag[i] = o->tcp_flags[i] = 0;
    o->icmp_type[i] = o->icmp_code[i] = 0;
    o->sport[i] = o->dport[i] = 0;
    o->l4_off[i] = o->l4_len[i] = 0;
    memset(o->src + (size_t)i * 16, 0, 16);
    memset(o->dst + (size_t)i * 16, 0, 16);
}

void mcnp_parse_batch(const uint8_t *buf, uint64_t buf_len, const uint64_t *addrs,
                      const uint32_t *lens, uint32_t n, const struct mcnp_parsed *out)
{
    uint32_t i;

    if (n > out->capacity)
        n = out->capacity;
    for (i = 0; i < n; i++) {
        uint8_t st;
        clear_one(out, i);
        /* Frames longer than 64 KiB cannot be described by 16-bit offsets. */
        if (addrs[i] > buf_len || lens[i] > buf_len - addrs[i] || lens[i] > 0xffff) {
            out->status[i] = MCNP_BAD_DESCRIPTOR;
            continue;
        }
        st = parse_one(buf + addrs[i], lens[i], out, i);
        if (st >= MCNP_MALFORMED_MIN)
            clear_l3(out, i);
        out->status[i] = st;
    }
}

/* ---- L4 checksums ------------------------------------------------------ */

/* Ones'-complement sum of len bytes in native word order (RFC 1071: the sum
 * is byte-order independent as long as it is stored back the same way). */
static uint64_t csum_add(uint64_t sum, const uint8_t *p, uint32_t len)
{
    uint32_t w;
    while (len >= 4) {
        memcpy(&w, p, 4);
        sum += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        sum += h;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint8_t last[2] = { p[0], 0 };
        uint16_t h;
        memcpy(&h, last, 2);
        sum += h;
    }
    return sum;
}

static uint16_t csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* Sum of the pseudo-header of the packet at f (RFC 768/793, RFC 8200 8.1). */
static uint64_t pseudo_sum(const uint8_t *f, uint32_t l3, uint8_t family, uint8_t proto,
                           uint32_t l4_len)
{
    uint8_t tail[8] = { 0 };
    uint64_t sum;
    if (family == 4) {
        sum = csum_add(0, f + l3 + 12, 8);
        tail[1] = proto;
        tail[2] = (uint8_t)(l4_len >> 8);
        tail[3] = (uint8_t)l4_len;
        return csum_add(sum, tail, 4);
    }
    sum = csum_add(0, f + l3 + 8, 32);
    tail[2] = (uint8_t)(l4_len >> 8);
    tail[3] = (uint8_t)l4_len;
    tail[7] = proto;
    return csum_add(sum, tail, 8);
}

static uint32_t crc32c_table[256];
static int crc32c_ready;

static void crc32c_init(void)
{
    uint32_t i, k, c;
    for (i = 0; i < 256; i++) {
        c = i;
        for (k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[i] = c;
    }
    crc32c_ready = 1;
}

static uint32_t crc32c(const uint8_t *p, uint32_t len)
{
    uint32_t c = 0xffffffffu;
    while (len--)
        c = crc32c_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* Rewrite one frame's L4 checksum; returns 1 if it was rewritten. */
static int fix_one(uint8_t *f, const struct mcnp_parsed *p, uint32_t i, int only_partial)
{
    uint32_t l3 = p->l3_off[i], l4 = p->l4_off[i], l4_len = p->l4_len[i];
    uint8_t proto = p->proto[i], family = p->family[i];
    uint8_t *h = f + l4;

    if (proto == P_TCP || proto == P_UDP) {
        uint32_t coff = proto == P_TCP ? 16 : 6;
        uint64_t ps;
        uint16_t cur, v;
        if (proto == P_UDP)
            l4_len = rd16(h + 4); /* the datagram may be shorter than the IP payload */
        ps = pseudo_sum(f, l3, family, proto, l4_len);
        memcpy(&cur, h + coff, 2);
        if (only_partial) {
            /* CHECKSUM_PARTIAL leaves the folded pseudo-header sum in the field. */
            uint16_t want = csum_fold(ps);
            if (cur != want && !((cur == 0 || cur == 0xffff) && (want == 0 || want == 0xffff)))
                return 0;
        }
        memset(h + coff, 0, 2);
        v = (uint16_t)~csum_fold(csum_add(ps, h, l4_len));
        if (proto == P_UDP && v == 0)
            v = 0xffff; /* zero means "no checksum" in UDP */
        memcpy(h + coff, &v, 2);
        return 1;
    }
    if (proto == P_SCTP) {
        uint32_t c;
        if (only_partial && (h[8] | h[9] | h[10] | h[11]) != 0)
            return 0;
        if (!crc32c_ready)
            crc32c_init();
        memset(h + 8, 0, 4);
        c = crc32c(h, l4_len);
        /* SCTP stores the CRC32c least significant byte first. */
        h[8] = (uint8_t)c;
        h[9] = (uint8_t)(c >> 8);
        h[10] = (uint8_t)(c >> 16);
        h[11] = (uint8_t)(c >> 24);
        return 1;
    }
    return 0;
}

uint32_t mcnp_fix_l4_checksums(uint8_t *buf, uint64_t buf_len, const uint64_t *addrs,
                               const uint32_t *lens, uint32_t n,
                               const struct mcnp_parsed *parsed, const uint8_t *mask,
                               int only_partial)
{
    uint32_t i, fixed = 0;

    if (n > parsed->capacity)
        n = parsed->capacity;
    for (i = 0; i < n; i++) {
        if (mask && !mask[i])
            continue;
        /* Fragments carry a checksum over the reassembled datagram: not ours. */
        if (parsed->status[i] != MCNP_OK_IP || parsed->frag[i] != 0)
            continue;
        /* The parse already bounded l4_off + l4_len by this descriptor; check
         * the descriptor again in case buf or addrs changed since. */
        if (addrs[i] > buf_len || lens[i] > buf_len - addrs[i] ||
            (uint32_t)parsed->l4_off[i] + parsed->l4_len[i] > lens[i])
            continue;
        fixed += (uint32_t)fix_one(buf + addrs[i], parsed, i, only_partial);
    }
    return fixed;
}
