/* The kernel side of one node's dataplane: maps, hooks, the flow cache.
 *
 * See mcnp_kernel.h for the contract.  Hooks are attached through netlink
 * (bpf_xdp_attach), not BPF links: an attached hook outlives the daemon, which
 * is what keeps a pod filtered while the daemon restarts or is upgraded.  The
 * program of every hook is its own loaded instance (the pod's zone, its socket
 * slot and its role are constants of the instance), sharing this run's maps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>

#include "mcnp_kernel.h"

#define HOOK_PROG_NAME "mcnp_hook"
#define HOOK_FRAGS_PROG_NAME "mcnp_hook_frags" /* frags-aware: native mode on jumbo veths */
#define NODE_ADDRS_MAX 256
#ifndef ENOTSUPP
#define ENOTSUPP 524 /* the kernel's, not in libc headers */
#endif

struct mcnp_kernel {
    char obj_path[4096];
    int fds[MCNP_MAP_COUNT];
    uint32_t flow_capacity;
    uint32_t class_capacity;
};

static const char *const MAP_NAMES[MCNP_MAP_COUNT] = {
    "xsks", "flows", "pods", "node_addrs", "config", "kstats", "classes",
};
/* Pinned maps outlive the daemon; NULL: this run's own. */
static const char *const PIN_NAMES[MCNP_MAP_COUNT] = {
    NULL, MCNP_PIN_FLOWS, MCNP_PIN_PODS, MCNP_PIN_NODE, MCNP_PIN_CONFIG, NULL, MCNP_PIN_CLASSES,
};

struct map_shape {
    enum bpf_map_type type;
    uint32_t key, value, max;
};

struct capacities {
    uint32_t flows, pods, classes;
};

static struct map_shape shape_of(int which, struct capacities cap)
{
    switch (which) {
    case MCNP_MAP_XSKS:
        return (struct map_shape){ BPF_MAP_TYPE_XSKMAP, 4, 4, MCNP_XSKS_MAX };
    case MCNP_MAP_FLOWS:
        return (struct map_shape){ BPF_MAP_TYPE_LRU_HASH, sizeof(struct mcnp_flow_key),
                                   sizeof(struct mcnp_flow), cap.flows };
    case MCNP_MAP_CLASSES:
        return (struct map_shape){ BPF_MAP_TYPE_LRU_HASH, sizeof(struct mcnp_flow_key),
                                   sizeof(struct mcnp_flow), cap.classes };
    case MCNP_MAP_PODS:
        return (struct map_shape){ BPF_MAP_TYPE_HASH, 8, sizeof(struct mcnp_pod), cap.pods };
    case MCNP_MAP_NODE:
        return (struct map_shape){ BPF_MAP_TYPE_HASH, 16, 1, NODE_ADDRS_MAX };
    case MCNP_MAP_CONFIG:
        return (struct map_shape){ BPF_MAP_TYPE_ARRAY, 4, sizeof(struct mcnp_config), 1 };
    default:
        return (struct map_shape){ BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, MCNP_K_COUNT };
    }
}

static int create_map(int which, struct map_shape s)
{
    int fd = bpf_map_create(s.type, MAP_NAMES[which], s.key, s.value, s.max, NULL);
    return fd < 0 ? -errno : fd;
}

/* A pinned map of the same shape (max_entries may differ: it keeps its own). */
static int open_pinned(const char *path, struct map_shape s)
{
    struct bpf_map_info info = {};
    uint32_t len = sizeof(info);
    int fd = bpf_obj_get(path);

    if (fd < 0)
        return -errno;
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0 || info.type != s.type ||
        info.key_size != s.key || info.value_size != s.value) {
        close(fd);
        unlink(path); /* another layout: replaced, never misread */
        return -ENOENT;
    }
    return fd;
}

static int open_map(int which, const char *pin_dir, struct capacities cap, int *reused)
{
    struct map_shape s = shape_of(which, cap);
    char path[4200];
    int fd;

    if (!pin_dir || !*pin_dir || !PIN_NAMES[which])
        return create_map(which, s);
    snprintf(path, sizeof(path), "%s/%s", pin_dir, PIN_NAMES[which]);
    fd = open_pinned(path, s);
    if (fd >= 0) {
        if (which == MCNP_MAP_FLOWS)
            *reused = 1;
        return fd;
    }
    fd = create_map(which, s);
    if (fd >= 0 && bpf_obj_pin(fd, path) != 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

int mcnp_kernel_open(struct mcnp_kernel **out, const char *obj_path, const char *pin_dir,
                     uint32_t flow_capacity, uint32_t class_capacity, uint32_t pod_capacity,
                     int *reused)
{
    struct capacities cap = { flow_capacity, pod_capacity, class_capacity };
    struct mcnp_kernel *k;
    struct bpf_map_info info = {};
    uint32_t len = sizeof(info);
    int i, fd;

    *out = NULL;
    *reused = 0;
    if (!obj_path || strlen(obj_path) >= sizeof(k->obj_path) || flow_capacity < 64 ||
        class_capacity < 64 || pod_capacity < 1)
        return -EINVAL;
    if (pin_dir && *pin_dir && mkdir(pin_dir, 0700) != 0 && errno != EEXIST)
        return -errno;
    k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    strcpy(k->obj_path, obj_path);
    for (i = 0; i < MCNP_MAP_COUNT; i++)
        k->fds[i] = -1;
    for (i = 0; i < MCNP_MAP_COUNT; i++) {
        fd = open_map(i, pin_dir, cap, reused);
        if (fd < 0) {
            mcnp_kernel_close(k);
            return fd;
        }
        k->fds[i] = fd;
    }
    k->flow_capacity = flow_capacity;
    if (bpf_obj_get_info_by_fd(k->fds[MCNP_MAP_FLOWS], &info, &len) == 0)
        k->flow_capacity = info.max_entries;
    k->class_capacity = class_capacity;
    len = sizeof(info);
    if (bpf_obj_get_info_by_fd(k->fds[MCNP_MAP_CLASSES], &info, &len) == 0)
        k->class_capacity = info.max_entries;
    *out = k;
    return 0;
}

void mcnp_kernel_close(struct mcnp_kernel *k)
{
    int i;
    if (!k)
        return;
    for (i = 0; i < MCNP_MAP_COUNT; i++)
        if (k->fds[i] >= 0)
            close(k->fds[i]);
    free(k);
}

int mcnp_kernel_map_fd(struct mcnp_kernel *k, int which)
{
    return which >= 0 && which < MCNP_MAP_COUNT ? k->fds[which] : -EINVAL;
}

uint32_t mcnp_kernel_capacity(struct mcnp_kernel *k, int which)
{
    return which == MCNP_MAP_CLASSES ? k->class_capacity : k->flow_capacity;
}

/* The flow cache or the classes: the maps of flow keys. */
static int flow_map(struct mcnp_kernel *k, int which)
{
    return which == MCNP_MAP_CLASSES ? k->fds[MCNP_MAP_CLASSES] : k->fds[MCNP_MAP_FLOWS];
}

/* ---- hooks ---------------------------------------------------------------- */

static int set_rodata(struct bpf_object *obj, const struct mcnp_hook_cfg *cfg)
{
    struct bpf_map *map;
    size_t size = 0;

    bpf_object__for_each_map(map, obj) {
        const char *name = bpf_map__name(map);
        size_t n = strlen(name);
        if (n >= 7 && strcmp(name + n - 7, ".rodata") == 0) {
            bpf_map__initial_value(map, &size);
            if (size != sizeof(*cfg))
                return -EPROTO; /* the program's constants are not one mcnp_hook_cfg */
            return bpf_map__set_initial_value(map, cfg, sizeof(*cfg));
        }
    }
    return -ENOENT;
}

/* Load one instance of the hook (the program named name; the other build is not
 * loaded) with cfg as its constants and the shared maps. */
static int load_instance(struct mcnp_kernel *k, const struct mcnp_hook_cfg *cfg,
                         const char *name, struct bpf_object **objp)
{
    struct bpf_object *obj = bpf_object__open_file(k->obj_path, NULL);
    struct bpf_program *prog, *each;
    int i, err;

    *objp = NULL;
    if (!obj)
        return -errno ? -errno : -ENOENT;
    bpf_object__for_each_program(each, obj)
        bpf_program__set_autoload(each, strcmp(bpf_program__name(each), name) == 0);
    err = set_rodata(obj, cfg);
    for (i = 0; !err && i < MCNP_MAP_COUNT; i++) {
        struct bpf_map *map = bpf_object__find_map_by_name(obj, MAP_NAMES[i]);
        err = map ? bpf_map__reuse_fd(map, k->fds[i]) : -ENOENT;
    }
    if (!err)
        err = bpf_object__load(obj);
    prog = err ? NULL : bpf_object__find_program_by_name(obj, name);
    if (!err && !prog)
        err = -ENOENT;
    if (err) {
        bpf_object__close(obj);
        return err < 0 ? err : -err;
    }
    *objp = obj;
    return bpf_program__fd(prog);
}

static uint32_t mode_flags(int xdp_mode)
{
    return xdp_mode == MCNP_XDP_NATIVE ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE;
}

/* Native mode on a veth whose MTU is past what a non-frags program takes there (a page,
 * less headroom and the shared info: 3,506 bytes on x86-64): the frags-aware build.
 * The veth checks its peer's MTU; a pod's pair has one MTU, and an attach refused
 * with ERANGE all the same is retried with the frags-aware build. */
static int native_frags(const char *ifname, int xdp_mode)
{
    struct ifreq ifr = {};
    int fd, mtu = 0;

    if (xdp_mode != MCNP_XDP_NATIVE)
        return 0;
    fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFMTU, &ifr) == 0)
        mtu = ifr.ifr_mtu;
    close(fd);
    return mtu > 3506;
}

int mcnp_hook_attach(struct mcnp_kernel *k, const char *ifname, uint64_t zone, uint32_t slot,
                     uint32_t role, int xdp_mode)
{
    struct mcnp_hook_cfg cfg = { .zone = zone, .slot = slot, .role = role };
    struct bpf_prog_info info = {};
    uint32_t len = sizeof(info);
    struct bpf_object *obj;
    int ifindex = (int)if_nametoindex(ifname);
    int prog_fd, err;

    if (!ifindex)
        return -ENODEV;
    if (slot >= MCNP_XSKS_MAX || role > MCNP_ROLE_INGRESS)
        return -EINVAL;
    prog_fd = load_instance(k, &cfg, native_frags(ifname, xdp_mode) ? HOOK_FRAGS_PROG_NAME
                                                                     : HOOK_PROG_NAME, &obj);
    if (prog_fd < 0)
        return prog_fd;
    /* Without XDP_FLAGS_UPDATE_IF_NOEXIST the kernel swaps the program in
     * place: an interface already hooked is never left without a hook. */
    err = bpf_xdp_attach(ifindex, prog_fd, mode_flags(xdp_mode), NULL);
    if (err == -ERANGE && xdp_mode == MCNP_XDP_NATIVE) {
        /* veth: the peer's MTU is beyond what a non-frags native program takes */
        bpf_object__close(obj);
        prog_fd = load_instance(k, &cfg, HOOK_FRAGS_PROG_NAME, &obj);
        if (prog_fd < 0)
            return prog_fd;
        err = bpf_xdp_attach(ifindex, prog_fd, mode_flags(xdp_mode), NULL);
    }
    if (err)
        err = err < 0 ? err : -err;
    else if (bpf_obj_get_info_by_fd(prog_fd, &info, &len) == 0)
        err = (int)info.id;
    bpf_object__close(obj); /* the interface holds the program now */
    return err;
}

int mcnp_hook_test(struct mcnp_kernel *k, uint64_t zone, uint32_t slot, uint32_t role,
                   const uint8_t *frame, uint32_t len)
{
    struct mcnp_hook_cfg cfg = { .zone = zone, .slot = slot, .role = role };
    struct bpf_object *obj;
    uint8_t out[4096];
    int prog_fd, err;
    LIBBPF_OPTS(bpf_test_run_opts, run, .data_in = frame, .data_size_in = len,
                .data_out = out, .data_size_out = sizeof(out), .repeat = 1);

    if (slot >= MCNP_XSKS_MAX || role > MCNP_ROLE_INGRESS || len > sizeof(out))
        return -EINVAL;
    prog_fd = load_instance(k, &cfg, HOOK_PROG_NAME, &obj);
    if (prog_fd < 0)
        return prog_fd;
    err = bpf_prog_test_run_opts(prog_fd, &run);
    bpf_object__close(obj);
    if (err)
        return err < 0 ? err : -err;
    return (int)run.retval;
}

int mcnp_hook_query(const char *ifname, uint32_t *prog_id, int *ours)
{
    LIBBPF_OPTS(bpf_xdp_query_opts, q);
    struct bpf_prog_info info = {};
    uint32_t len = sizeof(info);
    int ifindex = (int)if_nametoindex(ifname);
    int fd, err;

    *prog_id = 0;
    *ours = 0;
    if (!ifindex)
        return -ENODEV;
    err = bpf_xdp_query(ifindex, 0, &q);
    if (err)
        return err;
    *prog_id = q.prog_id;
    if (!q.prog_id)
        return 0;
    fd = bpf_prog_get_fd_by_id(q.prog_id);
    if (fd < 0)
        return -errno;
    if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0)
        *ours = strcmp(info.name, HOOK_PROG_NAME) == 0 ||
                strncmp(info.name, HOOK_FRAGS_PROG_NAME, sizeof(info.name) - 1) == 0;
    close(fd);
    return 0;
}

int mcnp_hook_detach(const char *ifname)
{
    LIBBPF_OPTS(bpf_xdp_query_opts, q);
    uint32_t id;
    int ours, err, ifindex = (int)if_nametoindex(ifname);

    err = mcnp_hook_query(ifname, &id, &ours);
    if (err)
        return err;
    if (!id || !ours)
        return 0;
    if (bpf_xdp_query(ifindex, 0, &q) != 0)
        return -errno;
    err = bpf_xdp_detach(ifindex, q.attach_mode == XDP_ATTACHED_DRV ? XDP_FLAGS_DRV_MODE
                                                                   : XDP_FLAGS_SKB_MODE, NULL);
    return err ? (err < 0 ? err : -err) : 1;
}

/* ---- small maps ------------------------------------------------------------ */

static int sys(int rc) { return rc ? -errno : 0; }

int mcnp_xsk_register(struct mcnp_kernel *k, uint32_t slot, int xsk_fd)
{
    return sys(bpf_map_update_elem(k->fds[MCNP_MAP_XSKS], &slot, &xsk_fd, BPF_ANY));
}

int mcnp_xsk_unregister(struct mcnp_kernel *k, uint32_t slot)
{
    int err = sys(bpf_map_delete_elem(k->fds[MCNP_MAP_XSKS], &slot));
    return err == -ENOENT ? 0 : err;
}

int mcnp_pod_set(struct mcnp_kernel *k, uint64_t zone, const struct mcnp_pod *pod)
{
    return sys(bpf_map_update_elem(k->fds[MCNP_MAP_PODS], &zone, pod, BPF_ANY));
}

int mcnp_pod_delete(struct mcnp_kernel *k, uint64_t zone)
{
    int err = sys(bpf_map_delete_elem(k->fds[MCNP_MAP_PODS], &zone));
    return err == -ENOENT ? 0 : err;
}

int mcnp_pod_zones(struct mcnp_kernel *k, uint64_t *zones, uint32_t max)
{
    uint64_t key, next;
    uint64_t *prev = NULL;
    uint32_t n = 0;

    while (n < max && bpf_map_get_next_key(k->fds[MCNP_MAP_PODS], prev, &next) == 0) {
        zones[n++] = next;
        key = next;
        prev = &key;
    }
    return (int)n;
}

int mcnp_node_addrs_set(struct mcnp_kernel *k, const uint8_t *addrs, uint32_t n)
{
    int fd = k->fds[MCNP_MAP_NODE];
    uint8_t key[16], next[16], one = 1;
    uint8_t *prev = NULL;
    uint32_t i;
    int keep;

    if (n > NODE_ADDRS_MAX)
        return -E2BIG;
    for (i = 0; i < n; i++)
        if (bpf_map_update_elem(fd, addrs + 16 * i, &one, BPF_ANY) != 0)
            return -errno;
    while (bpf_map_get_next_key(fd, prev, next) == 0) {
        for (keep = 0, i = 0; i < n && !keep; i++)
            keep = memcmp(addrs + 16 * i, next, 16) == 0;
        if (!keep) {
            bpf_map_delete_elem(fd, next);
            prev = NULL; /* restart: the iteration point is gone */
            continue;
        }
        memcpy(key, next, 16);
        prev = key;
    }
    return 0;
}

int mcnp_config_set(struct mcnp_kernel *k, const struct mcnp_config *cfg)
{
    uint32_t zero = 0;
    return sys(bpf_map_update_elem(k->fds[MCNP_MAP_CONFIG], &zero, cfg, BPF_ANY));
}

int mcnp_config_get(struct mcnp_kernel *k, struct mcnp_config *cfg)
{
    uint32_t zero = 0;
    return sys(bpf_map_lookup_elem(k->fds[MCNP_MAP_CONFIG], &zero, cfg));
}

int mcnp_kstats(struct mcnp_kernel *k, uint64_t *out)
{
    int ncpu = libbpf_num_possible_cpus(), c, err = 0;
    uint64_t *vals;
    uint32_t key;

    if (ncpu <= 0)
        return ncpu ? ncpu : -EINVAL;
    vals = calloc((size_t)ncpu, sizeof(uint64_t));
    if (!vals)
        return -ENOMEM;
    for (key = 0; key < MCNP_K_COUNT; key++) {
        out[key] = 0;
        if (bpf_map_lookup_elem(k->fds[MCNP_MAP_KSTATS], &key, vals) != 0) {
            err = -errno;
            break;
        }
        for (c = 0; c < ncpu; c++)
            out[key] += vals[c];
    }
    free(vals);
    return err;
}

/* ---- the flow cache ---------------------------------------------------------- */

int mcnp_flows_update(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      const struct mcnp_flow *vals, uint32_t n)
{
    int fd = flow_map(k, which);
    uint32_t count = n, i;

    if (n == 0)
        return 0;
    if (bpf_map_update_batch(fd, keys, vals, &count, NULL) == 0)
        return (int)n;
    if (errno != EINVAL && errno != ENOTSUPP && errno != EOPNOTSUPP)
        return -errno;
    for (i = 0; i < n; i++) /* kernels without batch ops for this map type */
        if (bpf_map_update_elem(fd, &keys[i], &vals[i], BPF_ANY) != 0)
            return -errno;
    return (int)n;
}

int mcnp_flows_delete(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      uint32_t n)
{
    int fd = flow_map(k, which);
    uint32_t done = 0, gone = 0, count, i;

    /* In batches; a batch stops at the first key already gone (an LRU map evicts by
     * itself), so that one is skipped and the batch goes on after it. */
    while (done < n) {
        count = n - done;
        if (bpf_map_delete_batch(fd, keys + done, &count, NULL) == 0) {
            gone += count;
            break;
        }
        gone += count;
        done += count;
        if (errno == ENOENT) {
            done++;
            continue;
        }
        if (errno != EINVAL && errno != ENOTSUPP && errno != EOPNOTSUPP)
            return -errno;
        for (i = done; i < n; i++) /* kernels without batch ops for this map type */
            if (bpf_map_delete_elem(fd, &keys[i]) == 0)
                gone++;
        break;
    }
    return (int)gone;
}

int mcnp_flows_lookup(struct mcnp_kernel *k, int which, const struct mcnp_flow_key *keys,
                      uint32_t n, struct mcnp_flow *vals, uint8_t *found)
{
    int fd = flow_map(k, which);
    uint32_t i;
    int hits = 0;

    for (i = 0; i < n; i++) {
        found[i] = bpf_map_lookup_elem(fd, &keys[i], &vals[i]) == 0;
        hits += found[i];
    }
    return hits;
}

int mcnp_flows_dump(struct mcnp_kernel *k, int which, struct mcnp_flow_key *keys,
                    struct mcnp_flow *vals, uint32_t capacity)
{
    uint64_t cursor = 0;
    int started = 0;

    /* one walk from the start, as far as the arrays go */
    return mcnp_flows_dump_slice(k, which, &cursor, &started, keys, vals, capacity, capacity);
}

int mcnp_flows_dump_slice(struct mcnp_kernel *k, int which, uint64_t *cursor, int *started,
                          struct mcnp_flow_key *keys, struct mcnp_flow *vals, uint32_t max,
                          uint32_t capacity)
{
    int fd = flow_map(k, which);
    uint64_t out = 0;
    uint32_t total = 0, count;
    int err;

    if (max > capacity)
        max = capacity;
    while (total < max) {
        count = capacity - total; /* the kernel copies whole buckets: leave it room */
        if (count > max - total + 64)
            count = max - total + 64;
        err = bpf_map_lookup_batch(fd, *started ? cursor : NULL, &out, keys + total,
                                   vals + total, &count, NULL);
        total += count;
        if (err) {
            if (errno == ENOENT) { /* the end of the map: the next walk starts over */
                *started = 0;
                return (int)total;
            }
            return -errno;
        }
        *cursor = out;
        *started = 1;
    }
    return (int)total;
}

uint64_t mcnp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
