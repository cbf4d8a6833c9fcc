/* What the XDP program (csrc/xdp_filter.bpf.c) and the user side share: the
 * layout of the BPF maps, the roles of a hook, flow states and the kernel's
 * counters.  Plain fixed-width types only, so the same bytes mean the same
 * thing on both sides; fastpath/kernel.py mirrors the structs as numpy dtypes
 * and checks their sizes against this header at import.
 *
 * The block between the CDEF markers is what cffi sees (csrc/build.py).
 */
#ifndef MCNP_PROTO_H
#define MCNP_PROTO_H

#ifdef __bpf__
#include <linux/types.h>
typedef __u8 uint8_t;
typedef __u16 uint16_t;
typedef __u32 uint32_t;
typedef __u64 uint64_t;
typedef __s32 int32_t;
#else
#include <stdint.h>
#endif


/* IP protocols and ICMP types every stage names (parser, pipeline, hook). */
#define MCNP_P_ICMP 1
#define MCNP_P_TCP 6
#define MCNP_P_UDP 17
#define MCNP_P_ICMPV6 58
#define MCNP_P_SCTP 132
#define MCNP_ICMP_ECHO_REPLY 0
#define MCNP_ICMP_ECHO_REQUEST 8
#define MCNP_ICMPV6_ECHO_REQUEST 128
#define MCNP_ICMPV6_ECHO_REPLY 129
#define MCNP_IS_ECHO(proto, type) \
    (((proto) == MCNP_P_ICMP && ((type) == MCNP_ICMP_ECHO_REQUEST || (type) == MCNP_ICMP_ECHO_REPLY)) || \
     ((proto) == MCNP_P_ICMPV6 && ((type) == MCNP_ICMPV6_ECHO_REQUEST || (type) == MCNP_ICMPV6_ECHO_REPLY)))
#define MCNP_IS_ECHO_REQUEST(type) ((type) == MCNP_ICMP_ECHO_REQUEST || (type) == MCNP_ICMPV6_ECHO_REQUEST)

/* A packet longer than a UMEM frame takes (copy mode) reaches userspace in pieces
 * (multi-buffer sockets, MCNP_CFG_WHOLE) and is handed on whole when it is at most
 * MCNP_USER_PACKET_MAX bytes and fits the MTU of the interface it came in on (so it
 * can be sent on as it is).  Any other (a GRO aggregate, a kernel without multi-buffer
 * sockets) cannot: the hook sends its first MCNP_JUDGE_ONLY_LEN bytes, lengths
 * rewritten to match and the destination MAC set to this mark, so userspace judges the
 * flow and records it but delivers nothing; the flow's next packets pass in the kernel. */
#define MCNP_USER_FRAME_MAX 3840
#define MCNP_USER_PACKET_MAX 16384
#define MCNP_JUDGE_ONLY_LEN 256
#define MCNP_JUDGE_ONLY_MAC 0x026d636e7001ULL  /* 02:6d:63:6e:70:01 */

/* Names of the pinned maps (under the daemon's bpf directory).  The suffix is
 * the layout's version: a daemon whose structs differ makes maps of its own
 * instead of misreading another version's. */
#define MCNP_PIN_FLOWS  "flows_v1"
#define MCNP_PIN_PODS   "pods_v1"
#define MCNP_PIN_NODE   "node_addrs_v1"
#define MCNP_PIN_CONFIG "config_v1"
#define MCNP_PIN_CLASSES "classes_v1"

/* CDEF BEGIN */

enum {
    MCNP_POD_IPS = 4,          /* addresses per pod the kernel checks */
    MCNP_XSKS_MAX = 4096       /* AF_XDP sockets per node (two per pod) */
};

/* A hook is one end of a pod's veth pair. */
enum {
    MCNP_ROLE_EGRESS = 0,   /* the node-side end: frames leaving the pod */
    MCNP_ROLE_INGRESS = 1   /* the pod's own end (eth0): frames entering the pod */
};

/* Flow states, each with its own idle timeout (struct mcnp_config). */
enum {
    MCNP_CTS_TCP_OPENING = 0,
    MCNP_CTS_TCP_ESTABLISHED = 1,
    MCNP_CTS_TCP_CLOSING = 2,
    MCNP_CTS_TCP_CLOSED = 3,
    MCNP_CTS_UDP = 4,
    MCNP_CTS_ICMP = 5,
    MCNP_CTS_SCTP_OPENING = 6,
    MCNP_CTS_SCTP_ESTABLISHED = 7,
    MCNP_CTS_SCTP_CLOSING = 8,
    MCNP_CTS_SCTP_CLOSED = 9,
    MCNP_CTS_OTHER = 10,      /* other protocols, ICMP errors, non-first fragments */
    MCNP_CTS_COUNT = 11
};

/* What a key names: one flow, or a flow class (the flows one end of a pod's veth
 * opens between two addresses to one destination port, whatever their source
 * port: the verdict never depends on it).  A class lives in the classes map,
 * its opener's source port 0; the hook admits a new flow of a class userspace
 * admitted under the tables in force without asking userspace again. */
enum {
    MCNP_KIND_FLOW = 0,
    MCNP_KIND_CLASS_EGRESS = 1,   /* opened by the pod: pod_port 0 */
    MCNP_KIND_CLASS_INGRESS = 2   /* opened by the peer: peer_port 0 */
};

/* A flow as one pod sees it: the key is oriented by the pod, not by the
 * packet, so both directions of a connection find the same entry from either
 * end of the pod's veth.  Every pod has its own zone: a flow between two pods
 * of one node has one entry per pod, each admitted by that pod's side. */
struct mcnp_flow_key {
    uint64_t zone;            /* the pod's sandbox */
    uint8_t pod_addr[16];     /* IPv4 as ::ffff:a.b.c.d */
    uint8_t peer_addr[16];
    uint16_t pod_port;        /* host order; ICMP echo: the identifier */
    uint16_t peer_port;
    uint8_t proto;
    uint8_t initiator;        /* ICMP echo: 0 the pod asked, 1 the peer asked */
    uint8_t kind;             /* MCNP_KIND_* */
    uint8_t pad;
};

struct mcnp_flow {
    uint64_t created_ns;      /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
    uint64_t last_ns;
    uint64_t packets[2];      /* [0] from the side that opened the flow, [1] replies;
                                 a class: [0] flows the hook admitted by it */
    uint64_t bytes[2];
    uint32_t revision;        /* tables revision that admitted (or re-checked) it */
    int32_t rule_egress;      /* rule ids as the matcher names them */
    int32_t rule_ingress;
    uint8_t state;
    uint8_t opener;           /* MCNP_ROLE_* of the hook the opening packet passed */
    uint8_t fin;              /* bit 0: FIN from the opener, bit 1: from the other side */
    uint8_t pad;
};

/* Per pod (keyed by zone): what the kernel checks without userspace. */
enum {
    MCNP_POD_READY = 1,           /* known to the tables in force */
    MCNP_POD_ISOLATED = 2,        /* isolated in either direction: no non-IP but ARP/ND */
    MCNP_POD_MAC_KNOWN = 4
};

struct mcnp_pod {
    uint32_t flags;
    uint8_t n_ips;
    uint8_t mac[6];
    uint8_t pad;
    uint8_t ips[4][16];       /* MCNP_POD_IPS */
};

/* What each attached instance of the hook is told at load time (.rodata). */
struct mcnp_hook_cfg {
    uint64_t zone;
    uint32_t slot;            /* its AF_XDP socket's index in the XSKMAP */
    uint32_t role;            /* MCNP_ROLE_* */
};

enum {
    MCNP_CFG_CLASSES = 1,     /* admit new flows of admitted classes in the hook */
    MCNP_CFG_WHOLE = 2        /* userspace takes packets longer than a frame in pieces */
};

struct mcnp_config {
    uint32_t revision;        /* tables revision in force; 0: none yet */
    uint32_t flags;           /* MCNP_CFG_* */
    uint64_t timeout_ns[11];  /* MCNP_CTS_COUNT */
};

/* The kernel's per-CPU counters, one per outcome. */
enum {
    MCNP_K_PASS_FLOW = 0,     /* a cached flow of the revision in force */
    MCNP_K_PASS_NODE = 1,     /* the node's own traffic (rule S10) */
    MCNP_K_PASS_ARP = 2,
    MCNP_K_PASS_ND = 3,
    MCNP_K_PASS_L2 = 4,       /* other non-IP frames of a pod that is not isolated */
    MCNP_K_REDIRECT = 5,      /* handed to userspace */
    MCNP_K_DROP_ARP = 6,      /* ARP whose sender is not the pod */
    MCNP_K_DROP_ND = 7,       /* neighbour discovery whose addresses are not the pod's */
    MCNP_K_DROP_L2 = 8,       /* non-IP frame of an isolated pod */
    MCNP_K_DROP_NO_SOCKET = 9,/* userspace not there (daemon away): nothing unjudged passes */
    MCNP_K_JUDGE_ONLY = 10,   /* a first packet too long for userspace: its headers sent to be judged */
    MCNP_K_DROP_OVERSIZE = 11,/* such a packet that could not be cut */
    MCNP_K_PASS_CLASS = 12,   /* a new flow of a class admitted under the tables in force */
    MCNP_K_COUNT = 13
};

/* CDEF END */

/* The state a flow opened by a packet of proto starts in (a later fragment, which
 * carries no ports: MCNP_CTS_OTHER whatever its protocol). */
static inline uint8_t mcnp_opening_state(uint8_t proto, int later_fragment)
{
    if (later_fragment)
        return MCNP_CTS_OTHER;
    switch (proto) {
    case MCNP_P_TCP: return MCNP_CTS_TCP_OPENING;
    case MCNP_P_UDP: return MCNP_CTS_UDP;
    case MCNP_P_SCTP: return MCNP_CTS_SCTP_OPENING;
    case MCNP_P_ICMP:
    case MCNP_P_ICMPV6: return MCNP_CTS_ICMP;
    default: return MCNP_CTS_OTHER;
    }
}

/* The key of the class of the flow whose key is k, opened at the end of role: the
 * opener's source port is any (the hook and userspace must make the same bytes). */
static inline void mcnp_class_key(struct mcnp_flow_key *k, uint32_t role)
{
    if (role == MCNP_ROLE_EGRESS) {
        k->kind = MCNP_KIND_CLASS_EGRESS;
        k->pod_port = 0;
    } else {
        k->kind = MCNP_KIND_CLASS_INGRESS;
        k->peer_port = 0;
    }
}

#endif /* MCNP_PROTO_H */
