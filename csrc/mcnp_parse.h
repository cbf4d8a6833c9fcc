/* The batch frame parser and L4 checksum fixer (parse.c).
 *
 * The block between the CDEF markers is plain C declarations without
 * preprocessor lines: csrc/build.py hands it to cffi's cdef(), so the binding
 * cannot drift from what the C code implements.  One call handles a whole
 * batch (arrays of buffer offsets and lengths): one FFI crossing per batch.
 */
#ifndef MCNP_PARSE_H
#define MCNP_PARSE_H
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

/* CDEF END */

#endif /* MCNP_PARSE_H */
