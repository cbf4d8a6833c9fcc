/* A bounded line-rate traffic generator and a frame counter, for benchmarks.
 *
 * Generator: BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES runs a two-
 * instruction XDP program (return XDP_TX) `repeat` times over one frame; in
 * live-frames mode the kernel really transmits every XDP_TX out of the given
 * ingress interface, so one core produces millions of frames per second with
 * no copy from userspace.  Each call is bounded by `repeat`; the Python side
 * bounds the number of calls in count and time.
 *
 * Counter: an XDP program counting frames (and bytes) in a per-CPU array and
 * dropping them, so a sink measures what arrived without a socket's cost.
 *
 * Both programs are a handful of instructions assembled here, which keeps the
 * benchmark independent of the BPF object build.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

/* CDEF BEGIN */
int mcnp_tg_load_tx(void);
int mcnp_tg_run(int prog_fd, int ifindex, const uint8_t *frame, uint32_t len,
                uint32_t repeat, uint32_t batch_size, uint32_t *duration_ns);
int mcnp_tg_counter_load(int *map_fd);
int mcnp_tg_counter_read(int map_fd, uint64_t *packets, uint64_t *bytes);
int mcnp_tg_attach(int ifindex, int prog_fd, int generic);
int mcnp_tg_detach(int ifindex, int generic);
/* CDEF END */

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })

static int load(const struct bpf_insn *insns, size_t n, const char *name)
{
    LIBBPF_OPTS(bpf_prog_load_opts, opts);
    int fd = bpf_prog_load(BPF_PROG_TYPE_XDP, name, "GPL", insns, n, &opts);
    return fd < 0 ? -errno : fd;
}

int mcnp_tg_load_tx(void)
{
    struct bpf_insn prog[] = {
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, XDP_TX),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };
    return load(prog, 2, "mcnp_tg_tx");
}

int mcnp_tg_run(int prog_fd, int ifindex, const uint8_t *frame, uint32_t len,
                uint32_t repeat, uint32_t batch_size, uint32_t *duration_ns)
{
    struct xdp_md ctx = { .data = 0, .data_end = len, .ingress_ifindex = (uint32_t)ifindex };
    LIBBPF_OPTS(bpf_test_run_opts, opts,
        .data_in = frame,
        .data_size_in = len,
        .ctx_in = &ctx,
        .ctx_size_in = sizeof(ctx),
        .repeat = (int)repeat,
        .flags = BPF_F_TEST_XDP_LIVE_FRAMES,
        .batch_size = batch_size,
    );
    int rc = bpf_prog_test_run_opts(prog_fd, &opts);
    if (rc < 0)
        return -errno;
    if (duration_ns)
        *duration_ns = opts.duration;
    return 0;
}

int mcnp_tg_counter_load(int *map_fd)
{
    int mfd = bpf_map_create(BPF_MAP_TYPE_PERCPU_ARRAY, "mcnp_tg_cnt", 4, 16, 1, NULL);
    int fd;
    if (mfd < 0)
        return -errno;
    {
        struct bpf_insn prog[] = {
            /* r6 = frame length (data_end - data) */
            INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_1, 0, 0),
            INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_6, BPF_REG_1, 4, 0),
            INSN(BPF_ALU64 | BPF_SUB | BPF_X, BPF_REG_6, BPF_REG_2, 0, 0),
            /* key 0 on the stack */
            INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, 0),
            INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
            INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
            INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, mfd),
            INSN(0, 0, 0, 0, 0),
            INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
            INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 6, 0),
            INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_1, BPF_REG_0, 0, 0),
            INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_1, 0, 0, 1),
            INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_0, BPF_REG_1, 0, 0),
            INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_1, BPF_REG_0, 8, 0),
            INSN(BPF_ALU64 | BPF_ADD | BPF_X, BPF_REG_1, BPF_REG_6, 0, 0),
            INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_0, BPF_REG_1, 8, 0),
            INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, XDP_DROP),
            INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
        };
        fd = load(prog, sizeof(prog) / sizeof(prog[0]), "mcnp_tg_count");
    }
    if (fd < 0) {
        close(mfd);
        return fd;
    }
    *map_fd = mfd;
    return fd;
}

int mcnp_tg_counter_read(int map_fd, uint64_t *packets, uint64_t *bytes)
{
    int ncpu = libbpf_num_possible_cpus(), i;
    uint32_t key = 0;
    uint64_t vals[2 * 256];
    if (ncpu <= 0 || ncpu > 256)
        return -EINVAL;
    if (bpf_map_lookup_elem(map_fd, &key, vals) < 0)
        return -errno;
    *packets = *bytes = 0;
    for (i = 0; i < ncpu; i++) {
        *packets += vals[2 * i];
        *bytes += vals[2 * i + 1];
    }
    return 0;
}

int mcnp_tg_attach(int ifindex, int prog_fd, int generic)
{
    int rc = bpf_xdp_attach(ifindex, prog_fd, generic ? XDP_FLAGS_SKB_MODE : XDP_FLAGS_DRV_MODE, NULL);
    return rc < 0 ? rc : 0;
}

int mcnp_tg_detach(int ifindex, int generic)
{
    int rc = bpf_xdp_detach(ifindex, generic ? XDP_FLAGS_SKB_MODE : XDP_FLAGS_DRV_MODE, NULL);
    return rc < 0 ? rc : 0;
}
