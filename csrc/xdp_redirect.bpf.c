// SPDX-License-Identifier: GPL-2.0
/* Redirect every frame arriving on a port to the AF_XDP socket bound to its
 * receive queue, where mcnp parses and judges it.
 *
 * Default action is XDP_DROP: when no socket is bound (daemon stopping or
 * starting), frames are dropped rather than handed to the kernel stack, so a
 * policy enforcer that is not running never lets traffic bypass it.  One
 * per-CPU counter per returned action, counted at the single exit.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "mcnp_xsk.h"

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MCNP_XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MCNP_STATS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdp_stats SEC(".maps");

SEC("xdp")
int xdp_redirect_xsk(struct xdp_md *ctx)
{
	__u32 action = XDP_DROP;
	__u64 *count;

	action = bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_DROP);

	count = bpf_map_lookup_elem(&xdp_stats, &action);
	if (count)
		*count += 1;
	return action;
}

char LICENSE[] SEC("license") = "GPL";
