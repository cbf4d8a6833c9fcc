// SPDX-License-Identifier: GPL-2.0
/* The hook on one end of a pod's veth pair.
 *
 * mcnp filters beside the node's CNI: every pod gets this program on both ends
 * of its veth, the node-side end (frames leaving the pod: its egress) and the
 * pod's eth0 (frames entering it: its ingress).  Each attachment is its own
 * instance, told at load time which pod (zone) and which end it serves.
 *
 * Per frame, in order:
 *   1. ARP and IPv6 neighbour discovery pass, once the pod is the sender it
 *      claims to be (rule S12: a pod cannot answer for a neighbour's address);
 *      other non-IP frames pass only for a pod isolated in no direction.
 *   2. The node's own traffic to and from its pods passes (rule S10).
 *   3. A flow userspace admitted under the tables in force passes on the CNI's
 *      path, with its state, counters and idle time kept here.  A new TCP,
 *      UDP or SCTP flow of a class userspace admitted under those tables
 *      (same end, addresses, protocol and destination port: mcnp_proto.h)
 *      is recorded here as userspace would record it, and passes — only while
 *      this end's socket is bound (the daemon is there to revise the class).
 *   4. Everything else goes to the AF_XDP socket of this end, where userspace
 *      judges it, records the flow here and sends the frame on through the
 *      other end of the veth, so it comes back to step 3 and passes.
 * The default is XDP_DROP: with no socket bound (daemon away) nothing that was
 * not judged before passes, while admitted flows keep going (fail static).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mcnp_proto.h"

/* Set by the loader for each instance (csrc/kernel.c). */
const volatile struct mcnp_hook_cfg hook = {};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MCNP_XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024); /* resized by the loader */
	__type(key, struct mcnp_flow_key);
	__type(value, struct mcnp_flow);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024); /* resized by the loader */
	__type(key, struct mcnp_flow_key);
	__type(value, struct mcnp_flow);
} classes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct mcnp_pod);
} pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u8[16]);
	__type(value, __u8);
} node_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mcnp_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MCNP_K_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} kstats SEC(".maps");

#define ETH_P_ARP_ 0x0806
#define IPPROTO_ICMPV6_ MCNP_P_ICMPV6
#define IPPROTO_SCTP_ MCNP_P_SCTP
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define LAST_NS_GRAIN (1ULL << 20) /* ns */

struct pkt {
	struct mcnp_flow_key key;  /* oriented by this hook's pod */
	__u8 src[16];
	__u8 dst[16];
	__u8 tcp_flags;
	__u8 chunk;                /* SCTP: first chunk type */
	__u8 icmp_type;
	__u8 trackable;            /* key computed (no IPv6 extension headers) */
	__u32 len;
};

static __always_inline int count(__u32 what, int action)
{
	__u64 *c = bpf_map_lookup_elem(&kstats, &what);
	if (c)
		*c += 1;
	return action;
}

static __always_inline void v4_mapped(__u8 *out, __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int pod_owns(const struct mcnp_pod *pod, const __u8 *addr)
{
	int i;
#pragma unroll
	for (i = 0; i < MCNP_POD_IPS; i++)
		if (i < pod->n_ips && addr_eq(pod->ips[i], addr))
			return 1;
	return 0;
}

static __always_inline int is_node(const __u8 *addr)
{
	return bpf_map_lookup_elem(&node_addrs, addr) != NULL;
}

/* Rule S12 for ARP: the sender hardware address is the frame's source and
 * the pod's MAC, the sender protocol address one of the pod's (0: a probe). */
static __always_inline int arp_ok(void *data, void *end, const struct mcnp_pod *pod)
{
	struct ethhdr *eth = data;
	__u8 *a = data + sizeof(*eth);
	__u32 spa;
	__u8 mapped[16];

	if ((void *)(a + 28) > end)
		return 0;
	/* Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4 */
	if (a[0] != 0 || a[1] != 1 || a[2] != 0x08 || a[3] != 0 || a[4] != 6 || a[5] != 4)
		return 0;
	if (!mac_eq(a + 8, eth->h_source))
		return 0;
	if ((pod->flags & MCNP_POD_MAC_KNOWN) && !mac_eq(a + 8, pod->mac))
		return 0;
	__builtin_memcpy(&spa, a + 14, 4);
	if (spa == 0)
		return 1;
	v4_mapped(mapped, spa);
	return pod_owns(pod, mapped);
}

static __always_inline int link_local6(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

static __always_inline int unspecified6(const __u8 *a)
{
	const __u64 *x = (const __u64 *)a;
	return x[0] == 0 && x[1] == 0;
}

/* IPv4: the addresses, and ports or echo identifiers where there are any. */
static __always_inline int parse_v4(void *data, void *end, struct pkt *p)
{
	struct iphdr {
		__u8 vihl, tos;
		__u16 tot_len, id, frag_off;
		__u8 ttl, protocol;
		__u16 check;
		__u32 saddr, daddr;
	} *ip = data + sizeof(struct ethhdr);
	__u32 ihl;
	__u8 *l4;

	if ((void *)(ip + 1) > end)
		return -1;
	ihl = (ip->vihl & 0x0f) * 4;
	if ((ip->vihl >> 4) != 4 || ihl < 20)
		return -1;
	v4_mapped(p->src, ip->saddr);
	v4_mapped(p->dst, ip->daddr);
	p->key.proto = ip->protocol;
	if (bpf_ntohs(ip->frag_off) & 0x1fff)
		return 0; /* a non-first fragment: no ports, judged with port 0 */
	l4 = (__u8 *)ip + ihl;
	if (ihl > 60)
		return -1;
	return (int)((long)l4 - (long)data);
}

static __always_inline int parse_v6(void *data, void *end, struct pkt *p)
{
	__u8 *ip = data + sizeof(struct ethhdr);

	if ((void *)(ip + 40) > end)
		return -1;
	if ((ip[0] >> 4) != 6)
		return -1;
	__builtin_memcpy(p->src, ip + 8, 16);
	__builtin_memcpy(p->dst, ip + 24, 16);
	p->key.proto = ip[6];
	if (ip[6] == 0) {
		/* One hop-by-hop header (MLD reports carry a router alert): look past it,
		 * so the listener reports of a pod are checked here like the rest of ND. */
		__u8 *h = ip + 40;
		__u32 hlen;

		if ((void *)(h + 8) > end)
			return -1;
		hlen = ((__u32)h[1] + 1) * 8;
		if (hlen > 64 || h[0] != IPPROTO_ICMPV6_) {
			p->trackable = 0; /* userspace parses longer chains */
			return 0;
		}
		p->key.proto = IPPROTO_ICMPV6_;
		return sizeof(struct ethhdr) + 40 + hlen;
	}
	switch (ip[6]) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP_:
	case IPPROTO_ICMPV6_:
		return sizeof(struct ethhdr) + 40;
	}
	p->trackable = 0; /* extension headers: userspace parses them */
	return 0;
}

/* Ports (host order) as the packet carries them: sport, dport. */
static __always_inline int parse_l4(void *data, void *end, int off, struct pkt *p,
				    __u16 *sport, __u16 *dport)
{
	__u8 *h = data + (off & 0xff);

	*sport = *dport = 0;
	switch (p->key.proto) {
	case IPPROTO_TCP:
		if ((void *)(h + 14) > end)
			return -1;
		p->tcp_flags = h[13];
		break;
	case IPPROTO_UDP:
		if ((void *)(h + 8) > end)
			return -1;
		break;
	case IPPROTO_SCTP_:
		if ((void *)(h + 13) > end)
			return -1;
		p->chunk = h[12];
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6_:
		if ((void *)(h + 8) > end)
			return -1;
		p->icmp_type = h[0];
		/* echo request/reply: the identifier is both "ports" */
		if (MCNP_IS_ECHO(p->key.proto, h[0])) {
			*sport = *dport = ((__u16)h[4] << 8) | h[5];
			return 0;
		}
		*sport = *dport = ((__u16)h[0] << 8) | h[1]; /* type and code */
		return 0;
	default:
		return 0;
	}
	*sport = ((__u16)h[0] << 8) | h[1];
	*dport = ((__u16)h[2] << 8) | h[3];
	return 0;
}

static __always_inline int is_echo_request(__u8 type) { return MCNP_IS_ECHO_REQUEST(type); }

/* Rule S12 for neighbour discovery sent by the pod: its source is one of its
 * addresses, link-local or unspecified (DAD); an advertisement's target too. */
static __always_inline int nd_ok(void *data, void *end, int l4, struct pkt *p,
				 const struct mcnp_pod *pod)
{
	__u8 *icmp = data + (l4 & 0xff);

	if (!(link_local6(p->src) || unspecified6(p->src) || pod_owns(pod, p->src)))
		return 0;
	if (p->icmp_type == 136) {
		if ((void *)(icmp + 24) > end)
			return 0;
		return link_local6(icmp + 8) || pod_owns(pod, icmp + 8);
	}
	return 1;
}

static __always_inline int is_nd(__u8 type)
{
	return (type >= 133 && type <= 137) || (type >= 130 && type <= 132) || type == 143;
}

/* Advance the flow's state with a packet of it; returns 0 when the packet must
 * be judged again instead (a new connection on the tuple of a closed one). */
static __always_inline int follow(struct mcnp_flow *f, struct pkt *p, int from_opener)
{
	__u8 st = f->state;

	if (p->key.proto == IPPROTO_TCP) {
		__u8 fl = p->tcp_flags;
		if ((fl & TCP_SYN) && !(fl & TCP_ACK) && from_opener &&
		    (st == MCNP_CTS_TCP_CLOSED || st == MCNP_CTS_TCP_CLOSING))
			return 0;
		if (fl & TCP_RST) {
			st = MCNP_CTS_TCP_CLOSED;
		} else if (fl & TCP_FIN) {
			f->fin |= from_opener ? 1 : 2;
			st = f->fin == 3 ? MCNP_CTS_TCP_CLOSED : MCNP_CTS_TCP_CLOSING;
		} else if (st == MCNP_CTS_TCP_OPENING && !from_opener) {
			st = MCNP_CTS_TCP_ESTABLISHED;
		}
	} else if (p->key.proto == IPPROTO_SCTP_) {
		__u8 c = p->chunk;
		if (c == 1 && from_opener && (st == MCNP_CTS_SCTP_CLOSED || st == MCNP_CTS_SCTP_CLOSING))
			return 0;
		if (c == 6 || c == 14)
			st = MCNP_CTS_SCTP_CLOSED;
		else if (c == 7 || c == 8)
			st = MCNP_CTS_SCTP_CLOSING;
		else if (st == MCNP_CTS_SCTP_OPENING && !from_opener)
			st = MCNP_CTS_SCTP_ESTABLISHED;
	}
	if (st != f->state) /* written only when it changes: the entry is shared by CPUs */
		f->state = st;
	return 1;
}

static __always_inline struct mcnp_config *config_in_force(void)
{
	__u32 zero = 0;
	struct mcnp_config *cfg = bpf_map_lookup_elem(&config, &zero);

	return cfg && cfg->revision ? cfg : NULL;
}

static __always_inline int fresh(const struct mcnp_flow *f, const struct mcnp_config *cfg, __u64 now)
{
	__u32 st = f->state;

	return f->revision == cfg->revision && st < MCNP_CTS_COUNT &&
	       now - f->last_ns <= cfg->timeout_ns[st];
}

/* Step 3: a cached flow of the revision in force, not idle past its timeout.
 * 1: passed; 0: cached but not usable as it is (userspace decides); -1: no entry. */
static __always_inline int cached(struct pkt *p, struct mcnp_config *cfg, __u64 now)
{
	struct mcnp_flow *f = bpf_map_lookup_elem(&flows, &p->key);
	int from_opener, side;

	if (!f)
		return -1;
	if (!fresh(f, cfg, now))
		return 0;
	from_opener = f->opener == hook.role;
	if (!follow(f, p, from_opener))
		return 0;
	side = from_opener ? 0 : 1;
	/* Idle time to ~1 ms: both directions, often on two CPUs, share this entry, and a
	 * write per packet would move its cache line back and forth for nothing. */
	if (now - f->last_ns > LAST_NS_GRAIN)
		f->last_ns = now;
	__sync_fetch_and_add(&f->packets[side], 1);
	__sync_fetch_and_add(&f->bytes[side], p->len);
	return 1;
}

/* Step 3, a first packet: the flow's class, admitted by userspace under the tables in
 * force, admits it too.  The flow is recorded as userspace records a flow it admits
 * (pipeline.c), this packet counted; 1 when it passes. */
static __always_inline int by_class(struct pkt *p, struct mcnp_config *cfg, __u64 now, int fragment)
{
	struct mcnp_flow_key ck;
	struct mcnp_flow *c, f = {};
	__u8 proto = p->key.proto;
	__u32 slot = hook.slot;

	if (!(cfg->flags & MCNP_CFG_CLASSES) || fragment ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP_))
		return 0;
	/* Only while the judge is there: with this end's socket gone (the daemon away)
	 * nothing new passes, as nothing new passes without classes (fail static). */
	if (!bpf_map_lookup_elem(&xsks, &slot))
		return 0;
	ck = p->key;
	mcnp_class_key(&ck, hook.role);
	c = bpf_map_lookup_elem(&classes, &ck);
	if (!c || !fresh(c, cfg, now) || c->opener != hook.role)
		return 0;
	f.created_ns = now;
	f.last_ns = now;
	f.revision = c->revision;
	f.rule_egress = c->rule_egress;
	f.rule_ingress = c->rule_ingress;
	f.state = mcnp_opening_state(proto, 0);
	f.opener = hook.role;
	follow(&f, p, 1);
	f.packets[0] = 1;
	f.bytes[0] = p->len;
	if (bpf_map_update_elem(&flows, &p->key, &f, BPF_NOEXIST))
		return 0; /* raced another packet of it: userspace decides this one */
	c->last_ns = now;
	__sync_fetch_and_add(&c->packets[0], 1);
	return 1;
}

static __always_inline int to_userspace(void)
{
	int action = bpf_redirect_map(&xsks, hook.slot, XDP_DROP);
	return count(action == XDP_REDIRECT ? MCNP_K_REDIRECT : MCNP_K_DROP_NO_SOCKET, action);
}

/* A first packet too long for a UMEM frame: whole, in pieces, where userspace takes
 * that and the packet could be sent on as it is; else its headers only, with lengths
 * that agree with what is left and the judge-only mark (mcnp_proto.h), for userspace
 * to judge and record the flow without delivering anything.  Returns 0 when the frame
 * goes as it is, 1 when it was cut, -1 when it cannot be cut (dropped). */
static __always_inline int judge_only(struct xdp_md *ctx, const struct mcnp_config *cfg,
				      __u32 len, __u16 ethertype, int l4, __u8 proto)
{
	__u32 mtu_len = len - sizeof(struct ethhdr); /* its L3 length: the helper counts the first buffer only */
	void *data, *end;
	__u8 *b;

	if (len <= MCNP_USER_FRAME_MAX)
		return 0;
	if (cfg && (cfg->flags & MCNP_CFG_WHOLE) && len <= MCNP_USER_PACKET_MAX &&
	    bpf_check_mtu(ctx, 0, &mtu_len, 0, 0) == BPF_MTU_CHK_RET_SUCCESS)
		return 0;
	if (bpf_xdp_adjust_tail(ctx, -(int)(len - MCNP_JUDGE_ONLY_LEN)))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	b = data;
	if ((void *)(b + MCNP_JUDGE_ONLY_LEN) > end)
		return -1;
	b[0] = 0x02; b[1] = 0x6d; b[2] = 0x63; b[3] = 0x6e; b[4] = 0x70; b[5] = 0x01;
	if (ethertype == ETH_P_IP) {
		b[16] = (MCNP_JUDGE_ONLY_LEN - 14) >> 8;
		b[17] = (MCNP_JUDGE_ONLY_LEN - 14) & 0xff;
	} else {
		b[18] = (MCNP_JUDGE_ONLY_LEN - 54) >> 8;
		b[19] = (MCNP_JUDGE_ONLY_LEN - 54) & 0xff;
	}
	if (proto == IPPROTO_UDP && l4 > 0 && l4 < MCNP_JUDGE_ONLY_LEN - 8) {
		__u32 off = (__u32)l4;
		__u8 *u;

		asm volatile("" : "+r"(off)); /* keep the mask: the verifier needs the bound */
		off &= 0xff;
		u = data + off;
		if ((void *)(u + 6) > end)
			return -1;
		u[4] = (MCNP_JUDGE_ONLY_LEN - off) >> 8;
		u[5] = (MCNP_JUDGE_ONLY_LEN - off) & 0xff;
	}
	return 1;
}

/* The flow's key as the hook's pod sees it (pipeline.c computes the same bytes). */
static __always_inline void flow_key(struct pkt *p, __u64 zone, int egress, __u16 sport, __u16 dport)
{
	p->key.zone = zone;
	if (egress) {
		__builtin_memcpy(p->key.pod_addr, p->src, 16);
		__builtin_memcpy(p->key.peer_addr, p->dst, 16);
		p->key.pod_port = sport;
		p->key.peer_port = dport;
	} else {
		__builtin_memcpy(p->key.pod_addr, p->dst, 16);
		__builtin_memcpy(p->key.peer_addr, p->src, 16);
		p->key.pod_port = dport;
		p->key.peer_port = sport;
	}
	if (MCNP_IS_ECHO(p->key.proto, p->icmp_type)) {
		/* who asked: the sender of a request, the receiver of a reply */
		int asked_by_pod = is_echo_request(p->icmp_type) ? egress : !egress;
		p->key.initiator = asked_by_pod ? 0 : 1;
	}
}

/* The hook, in two builds.  frags: the packet may come in several buffers (a program
 * marked xdp.frags); the headers are always in the first, which is all the parsers read.
 * mcnp_hook is not frags-aware, on purpose: measured here, one TCP connection across
 * nodes did 11.1 Gbit/s with the program marked xdp.frags and 12.5-13.9 without (CNI
 * alone 14.7-15.2), in generic mode, where the kernel hands a non-frags program every
 * packet linear.  Native mode on a veth whose peer's MTU exceeds a page refuses a
 * non-frags program (ERANGE): there csrc/kernel.c attaches mcnp_hook_frags. */
static __always_inline int hook_body(struct xdp_md *ctx, const int frags)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct mcnp_pod *pod;
	struct mcnp_config *cfg;
	struct pkt p = {};
	__u64 now = 0;
	int ready, found = 0;
	__u64 zone = hook.zone;
	__u16 sport, dport, proto;
	int egress = hook.role == MCNP_ROLE_EGRESS;
	int l4;

	if ((void *)(eth + 1) > end)
		return to_userspace(); /* userspace counts malformed frames */
	pod = bpf_map_lookup_elem(&pods, &zone);
	if (!pod)
		return to_userspace();
	proto = bpf_ntohs(eth->h_proto);
	p.len = frags ? (__u32)bpf_xdp_get_buff_len(ctx) : (__u32)(end - data);

	/* 1. non-IP */
	if (proto == ETH_P_ARP_) {
		if (!egress || arp_ok(data, end, pod))
			return count(MCNP_K_PASS_ARP, XDP_PASS);
		return count(MCNP_K_DROP_ARP, XDP_DROP);
	}
	if (proto == ETH_P_IP) {
		l4 = parse_v4(data, end, &p);
		p.trackable = 1;
	} else if (proto == ETH_P_IPV6) {
		p.trackable = 1;
		l4 = parse_v6(data, end, &p);
	} else {
		if ((pod->flags & MCNP_POD_READY) && !(pod->flags & MCNP_POD_ISOLATED))
			return count(MCNP_K_PASS_L2, XDP_PASS);
		return count(MCNP_K_DROP_L2, XDP_DROP);
	}
	if (l4 < 0 || !p.trackable)
		return to_userspace();
	if (l4 > 0 && parse_l4(data, end, l4, &p, &sport, &dport) < 0)
		return to_userspace();
	if (l4 == 0)
		sport = dport = 0;
	if (p.key.proto == IPPROTO_ICMPV6_ && is_nd(p.icmp_type) && l4 > 0) {
		if (!egress || nd_ok(data, end, l4, &p, pod))
			return count(MCNP_K_PASS_ND, XDP_PASS);
		return count(MCNP_K_DROP_ND, XDP_DROP);
	}

	/* 3 before 2 (the flows of a pod are most of what a hook sees): a flow admitted
	 * under the tables in force; the key is the pod's view.  The pod must be known to
	 * the tables and, leaving it, send from its own address. */
	cfg = config_in_force();
	ready = (pod->flags & MCNP_POD_READY) && (!egress || pod_owns(pod, p.src));
	if (ready) {
		flow_key(&p, zone, egress, sport, dport);
		if (cfg) {
			now = bpf_ktime_get_ns();
			found = cached(&p, cfg, now);
			if (found == 1)
				return count(MCNP_K_PASS_FLOW, XDP_PASS);
		}
	}

	/* 2. the node's own traffic */
	if (egress ? is_node(p.dst) : is_node(p.src))
		return count(MCNP_K_PASS_NODE, XDP_PASS);
	if (!ready)
		return to_userspace(); /* not known yet, or spoofed: userspace drops and counts it */

	/* 3, a first packet: a new flow of a class admitted under the tables in force */
	if (found == -1 && cfg && by_class(&p, cfg, now, l4 == 0))
		return count(MCNP_K_PASS_CLASS, XDP_PASS);

	/* 4. userspace judges (the headers only, of a first packet it cannot take whole) */
	switch (judge_only(ctx, cfg, p.len, proto, l4, p.key.proto)) {
	case -1:
		return count(MCNP_K_DROP_OVERSIZE, XDP_DROP);
	case 1:
		count(MCNP_K_JUDGE_ONLY, 0);
	}
	return to_userspace();
}

SEC("xdp")
int mcnp_hook(struct xdp_md *ctx)
{
	return hook_body(ctx, 0);
}

SEC("xdp.frags")
int mcnp_hook_frags(struct xdp_md *ctx)
{
	return hook_body(ctx, 1);
}

char LICENSE[] SEC("license") = "GPL";
