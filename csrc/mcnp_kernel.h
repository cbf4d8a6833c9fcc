/* The kernel side of one node's dataplane (kernel.c): the BPF maps the hooks
 * share, loading and attaching a hook on one end of a pod's veth, and batch
 * operations on the flow cache.
 *
 * Maps that must outlive the daemon (flows, classes, pods, node addresses, config) are
 * pinned under a directory on a bpffs, so a restarted or upgraded daemon finds
 * the flows its predecessor admitted and the hooks it left attached keep
 * working while it is away.  The XSKMAP and the counters belong to one run of
 * the daemon: hooks of a previous run point at a socket map whose sockets are
 * all gone, so whatever they would hand to userspace is dropped, never passed.
 *
 * Functions return 0 or a count on success and a negative errno on failure;
 * fastpath/kernel.py turns them into exceptions.  The block between the CDEF
 * markers is what cffi sees (csrc/build.py).
 */
#ifndef MCNP_KERNEL_H
#define MCNP_KERNEL_H
#include <stdint.h>
#include "mcnp_proto.h"

/* CDEF BEGIN */

struct mcnp_kernel;

enum {
    MCNP_XDP_GENERIC = 1,    /* skb mode: keeps GSO on the veth (docs/dataplane.md) */
    MCNP_XDP_NATIVE = 2      /* driver mode: the kernel turns GSO off on the peer */
};

enum { MCNP_MAP_XSKS = 0, MCNP_MAP_FLOWS = 1, MCNP_MAP_PODS = 2, MCNP_MAP_NODE = 3,
       MCNP_MAP_CONFIG = 4, MCNP_MAP_KSTATS = 5, MCNP_MAP_CLASSES = 6, MCNP_MAP_COUNT = 7 };

/* Open (or create and pin) the maps under pin_dir (NULL or "": nothing
 * pinned, for tests) for the hook program in obj_path.  A pinned map whose
 * layout differs is replaced; *reused tells whether the flow cache was found
 * (a restart) rather than made. */
int mcnp_kernel_open(struct mcnp_kernel **out, const char *obj_path, const char *pin_dir,
                     uint32_t flow_capacity, uint32_t class_capacity, uint32_t pod_capacity,
                     int *reused);
void mcnp_kernel_close(struct mcnp_kernel *k);
int mcnp_kernel_map_fd(struct mcnp_kernel *k, int which);
/* Entries the flow cache (MCNP_MAP_FLOWS) or the classes (MCNP_MAP_CLASSES) hold. */
uint32_t mcnp_kernel_capacity(struct mcnp_kernel *k, int which);

/* Load an instance of the hook for (zone, slot, role) and attach it to
 * ifname in the caller's network namespace, replacing any program there
 * atomically (so re-attaching never leaves the interface unhooked).  Returns
 * the program id. */
int mcnp_hook_attach(struct mcnp_kernel *k, const char *ifname, uint64_t zone, uint32_t slot,
                     uint32_t role, int xdp_mode);
/* Run an instance of the hook on one frame (BPF_PROG_RUN, nothing attached) and
 * return its XDP action: tests of the hook's decisions. */
int mcnp_hook_test(struct mcnp_kernel *k, uint64_t zone, uint32_t slot, uint32_t role,
                   const uint8_t *frame, uint32_t len);
/* Detach the hook from ifname (caller's namespace) if it is one of ours;
 * returns 1 if one was detached, 0 if none was there. */
int mcnp_hook_detach(const char *ifname);
/* The id of the XDP program attached to ifname (0: none) and whether it is a
 * mcnp hook. */
int mcnp_hook_query(const char *ifname, uint32_t *prog_id, int *ours);

int mcnp_xsk_register(struct mcnp_kernel *k, uint32_t slot, int xsk_fd);
int mcnp_xsk_unregister(struct mcnp_kernel *k, uint32_t slot);

int mcnp_pod_set(struct mcnp_kernel *k, uint64_t zone, const struct mcnp_pod *pod);
int mcnp_pod_delete(struct mcnp_kernel *k, uint64_t zone);
/* Zones present in the pods map (up to max); returns how many. */
int mcnp_pod_zones(struct mcnp_kernel *k, uint64_t *zones, uint32_t max);
/* Make the node-address set exactly addrs[n][16]. */
int mcnp_node_addrs_set(struct mcnp_kernel *k, const uint8_t *addrs, uint32_t n);
int mcnp_config_set(struct mcnp_kernel *k, const struct mcnp_config *cfg);
int mcnp_config_get(struct mcnp_kernel *k, struct mcnp_config *cfg);
/* The hooks' per-CPU counters summed: out[MCNP_K_COUNT]. */
int mcnp_kstats(struct mcnp_kernel *k, uint64_t *out);

/* The flow cache and the flow classes (which: MCNP_MAP_FLOWS or MCNP_MAP_CLASSES),
 * in batches: one system call for many entries where the kernel allows it. */
int mcnp_flows_update(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      const struct mcnp_flow *vals, uint32_t n);
int mcnp_flows_delete(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      uint32_t n);
/* found[i] = 1 and vals[i] filled for each key present. */
int mcnp_flows_lookup(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      uint32_t n, struct mcnp_flow *vals, uint8_t *found);
/* Copy up to capacity entries; returns how many. */
int mcnp_flows_dump(struct mcnp_kernel *k, int which, struct mcnp_flow_key *keys,
                    struct mcnp_flow *vals, uint32_t capacity);
/* Copy the next entries of a walk through the map, about max of them (whole hash
 * buckets: a few more may come; capacity bounds the arrays).  *cursor is the walk's
 * position (*started 0: from the start); *started is 0 again once the walk reached
 * the end.  Returns how many were copied. */
int mcnp_flows_dump_slice(struct mcnp_kernel *k, int which, uint64_t *cursor, int *started,
                          struct mcnp_flow_key *keys, struct mcnp_flow *vals, uint32_t max,
                          uint32_t capacity);
/* CLOCK_MONOTONIC in ns, the clock the hooks stamp flows with. */
uint64_t mcnp_now_ns(void);

/* CDEF END */

#endif /* MCNP_KERNEL_H */
