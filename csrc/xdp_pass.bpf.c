// SPDX-License-Identifier: GPL-2.0
/* An XDP program that only passes every frame.
 *
 * Configuration (b) of the node benchmarks (bench/bench_node.py): attached in
 * generic (skb) mode on both ends of every pod veth, the same hooks mcnp uses,
 * it measures what any XDP design costs on veth before it does any work: the
 * limit mcnp's own hooks are compared with.  Built by the benchmark with clang;
 * the daemon never loads it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
