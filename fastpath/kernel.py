"""The kernel side of a node's dataplane: the hooks' maps, hooks and flow cache.

One :class:`Kernel` per daemon run holds the maps every hook shares
(``csrc/mcnp_kernel.h``).  The flow cache and its classes, the pods' addresses, the node's own
addresses and the config (tables revision in force, idle timeouts) are pinned
under ``pin_dir`` on a bpffs, so a restarted daemon finds what its predecessor
left: the hooks stay attached while it is away and keep passing the flows that
were admitted, while everything else is dropped (their socket map is gone).

The structs are mirrored here as numpy dtypes (checked against the C sizes at
import), so the flow cache can be read, judged and written back in batches.
Every C failure becomes :class:`KernelError` in :func:`_check`.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os

import numpy as np

from fastpath._dp import ffi, lib

logger = logging.getLogger(__name__)

#: The hook program built from csrc/xdp_filter.bpf.c, shipped in the package.
BPF_OBJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xdp_filter.bpf.o")

EGRESS, INGRESS = lib.MCNP_ROLE_EGRESS, lib.MCNP_ROLE_INGRESS
ROLE_NAMES = {EGRESS: "egress", INGRESS: "ingress"}
XDP_MODES = {"generic": lib.MCNP_XDP_GENERIC, "native": lib.MCNP_XDP_NATIVE}
POD_IPS = 4

STATES = ("tcp_opening", "tcp_established", "tcp_closing", "tcp_closed", "udp", "icmp",
          "sctp_opening", "sctp_established", "sctp_closing", "sctp_closed", "other")
#: Idle timeouts (seconds) per flow state; settings may override them.
DEFAULT_TIMEOUTS = {
    "tcp_opening": 30, "tcp_established": 3600, "tcp_closing": 120, "tcp_closed": 10,
    "udp": 60, "icmp": 30, "sctp_opening": 30, "sctp_established": 3600,
    "sctp_closing": 30, "sctp_closed": 10, "other": 30,
}
KSTATS = ("pass_flow", "pass_node", "pass_arp", "pass_nd", "pass_l2", "redirect",
          "drop_arp", "drop_nd", "drop_l2", "drop_no_socket", "judge_only", "drop_oversize",
          "pass_class")
#: The maps of flow keys: the flow cache, and the flow classes (csrc/mcnp_proto.h).
FLOWS, CLASSES = lib.MCNP_MAP_FLOWS, lib.MCNP_MAP_CLASSES
CLASS_KINDS = {EGRESS: lib.MCNP_KIND_CLASS_EGRESS, INGRESS: lib.MCNP_KIND_CLASS_INGRESS}

FLOW_KEY = np.dtype([("zone", "<u8"), ("pod_addr", "u1", 16), ("peer_addr", "u1", 16),
                     ("pod_port", "<u2"), ("peer_port", "<u2"), ("proto", "u1"),
                     ("initiator", "u1"), ("kind", "u1"), ("pad", "u1")])
FLOW = np.dtype([("created_ns", "<u8"), ("last_ns", "<u8"), ("packets", "<u8", 2),
                 ("bytes", "<u8", 2), ("revision", "<u4"), ("rule_egress", "<i4"),
                 ("rule_ingress", "<i4"), ("state", "u1"), ("opener", "u1"), ("fin", "u1"),
                 ("pad", "u1")])


def _check_layout() -> None:
    for dtype, ctype in ((FLOW_KEY, "struct mcnp_flow_key"), (FLOW, "struct mcnp_flow")):
        if dtype.itemsize != ffi.sizeof(ctype):
            raise RuntimeError(f"fastpath/kernel.py and csrc/mcnp_proto.h disagree on {ctype}")
    if len(STATES) != lib.MCNP_CTS_COUNT or len(KSTATS) != lib.MCNP_K_COUNT:
        raise RuntimeError("fastpath/kernel.py and csrc/mcnp_proto.h disagree on the enums")


_check_layout()


_MAP_NAMES = {FLOWS: "flow cache", CLASSES: "flow classes"}


class KernelError(OSError):
    """A BPF operation failed (errno and what was being done)."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KernelError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def zone_of(sandbox_id: str) -> int:
    """A pod's zone: 64 bits of a hash of its sandbox id, stable across daemon
    restarts (the flow cache outlives the daemon) and never reused by another pod."""
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") or 1


def addr16(ip: str) -> bytes:
    """An address as the hooks store it: IPv6 bytes, IPv4 as ::ffff:a.b.c.d."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        return b"\0" * 10 + b"\xff\xff" + a.packed
    return a.packed


def addr_str(raw) -> str:
    """The inverse of :func:`addr16`."""
    b = bytes(raw)
    if b[:12] == b"\0" * 10 + b"\xff\xff":
        return str(ipaddress.IPv4Address(b[12:]))
    return str(ipaddress.IPv6Address(b))


def _mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding ``path``."""
    best = ("/", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2:
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, fields[2])
    return best


def ensure_bpffs(pin_dir: str) -> None:
    """Make ``pin_dir`` a directory on a bpffs: under an existing one (the node's
    ``/sys/fs/bpf``), else a bpffs mounted at ``pin_dir`` itself."""
    pin_dir = os.path.abspath(pin_dir)
    if _mount_of(pin_dir)[1] == "bpf":
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        return
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", pin_dir.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, f"mounting a bpffs at {pin_dir}: {os.strerror(err)}")


class Kernel:
    """The maps of one daemon run (see the module docstring).

    ``pin_dir`` None keeps nothing pinned (tests); otherwise it must lie on a
    bpffs (:func:`ensure_bpffs`).  ``reused`` tells whether the flow cache was
    found there (a restart): its flows then wait for the first tables, which
    re-check them.
    """

    def __init__(self, pin_dir: str | None = None, *, flow_capacity: int = 131072,
                 class_capacity: int = 65536, pod_capacity: int = 4096,
                 bpf_object: str = BPF_OBJECT):
        out = ffi.new("struct mcnp_kernel **")
        reused = ffi.new("int *")
        _check(lib.mcnp_kernel_open(out, bpf_object.encode(), (pin_dir or "").encode(),
                                    flow_capacity, class_capacity, pod_capacity, reused),
               f"opening the dataplane's BPF maps{' under ' + pin_dir if pin_dir else ''}")
        self._c = out[0]
        self.pin_dir = pin_dir
        self.reused = bool(reused[0])
        self.flow_capacity = lib.mcnp_kernel_capacity(self._c, FLOWS)
        self.class_capacity = lib.mcnp_kernel_capacity(self._c, CLASSES)
        self._pod = ffi.new("struct mcnp_pod *")
        self._cfg = ffi.new("struct mcnp_config *")
        self._kstats = ffi.new("uint64_t[]", len(KSTATS))

    @property
    def c(self):
        return self._c

    def close(self) -> None:
        if self._c is not None:
            lib.mcnp_kernel_close(self._c)
            self._c = None

    # -- hooks ------------------------------------------------------------------

    def attach(self, ifname: str, zone: int, slot: int, role: int, mode: str = "generic") -> int:
        """Load and attach a hook to ``ifname`` (the caller's namespace); returns its
        program id.  An interface already hooked is switched over atomically."""
        return _check(lib.mcnp_hook_attach(self._c, ifname.encode(), zone, slot, role,
                                           XDP_MODES[mode]),
                      f"attaching the {ROLE_NAMES[role]} hook to {ifname}")

    def test_run(self, frame: bytes, zone: int, role: int, slot: int = 0) -> str:
        """The hook's decision on one frame (BPF_PROG_RUN; nothing attached): "pass",
        "drop", "redirect" (to userspace; "drop" too when no socket is in the slot)."""
        rc = _check(lib.mcnp_hook_test(self._c, zone, slot, role, frame, len(frame)),
                    "running the hook on a frame")
        return {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}.get(rc, str(rc))

    @staticmethod
    def detach(ifname: str) -> bool:
        """Detach our hook from ``ifname`` if it has one; a missing interface is fine."""
        rc = lib.mcnp_hook_detach(ifname.encode())
        if rc == -errno.ENODEV:
            return False
        return bool(_check(rc, f"detaching the hook of {ifname}"))

    @staticmethod
    def hooked(ifname: str) -> bool:
        """Whether ``ifname`` (caller's namespace) carries one of our hooks."""
        prog_id, ours = ffi.new("uint32_t *"), ffi.new("int *")
        rc = lib.mcnp_hook_query(ifname.encode(), prog_id, ours)
        return rc == 0 and bool(ours[0])

    def register(self, slot: int, fd: int) -> None:
        _check(lib.mcnp_xsk_register(self._c, slot, fd), f"registering socket slot {slot}")

    def unregister(self, slot: int) -> None:
        _check(lib.mcnp_xsk_unregister(self._c, slot), f"removing socket slot {slot}")

    # -- pods, node, config ---------------------------------------------------------

    def set_pod(self, zone: int, ips: list[str], mac: bytes | None, ready: bool,
                isolated: bool) -> None:
        """What the hooks check for a pod without userspace (ARP sender, non-IP)."""
        pod = self._pod
        ffi.memmove(pod, b"\0" * ffi.sizeof("struct mcnp_pod"), ffi.sizeof("struct mcnp_pod"))
        pod.flags = (lib.MCNP_POD_READY if ready else 0) | \
            (lib.MCNP_POD_ISOLATED if isolated else 0) | (lib.MCNP_POD_MAC_KNOWN if mac else 0)
        pod.n_ips = min(len(ips), POD_IPS)
        for i, ip in enumerate(ips[:POD_IPS]):
            ffi.memmove(pod.ips[i], addr16(ip), 16)
        if mac:
            ffi.memmove(pod.mac, mac, 6)
        _check(lib.mcnp_pod_set(self._c, zone, pod), "recording a pod in the hooks' map")

    def delete_pod(self, zone: int) -> None:
        _check(lib.mcnp_pod_delete(self._c, zone), "removing a pod from the hooks' map")

    def pod_zones(self) -> list[int]:
        out = ffi.new("uint64_t[]", 65536)
        n = _check(lib.mcnp_pod_zones(self._c, out, 65536), "listing the pods' map")
        return [int(out[i]) for i in range(n)]

    def set_node_addrs(self, ips: list[str]) -> None:
        """The node's own addresses: traffic between them and its pods always passes (S10)."""
        raw = b"".join(addr16(ip) for ip in ips)
        _check(lib.mcnp_node_addrs_set(self._c, ffi.from_buffer(raw) if raw else ffi.NULL,
                                       len(ips)), "setting the node's addresses")

    def set_config(self, revision: int, timeouts: dict[str, float], classes: bool = True,
                   whole: bool = False) -> None:
        """The tables revision in force (flows of other revisions go to userspace);
        ``classes``: the hooks admit new flows of classes admitted under it; ``whole``:
        userspace takes a packet longer than a frame in pieces (``Umem.multi_buffer``),
        so the hooks send it whole instead of its headers only."""
        cfg = self._cfg
        cfg.revision = revision
        cfg.flags = (lib.MCNP_CFG_CLASSES if classes else 0) | (lib.MCNP_CFG_WHOLE if whole else 0)
        for i, name in enumerate(STATES):
            cfg.timeout_ns[i] = int(timeouts[name] * 1e9)
        _check(lib.mcnp_config_set(self._c, cfg), "setting the hooks' config")

    def kstats(self) -> dict[str, int]:
        _check(lib.mcnp_kstats(self._c, self._kstats), "reading the hooks' counters")
        return dict(zip(KSTATS, (int(v) for v in self._kstats)))

    # -- the flow cache --------------------------------------------------------------

    # Each takes ``which``: FLOWS (the flow cache) or CLASSES (the flow classes).

    def dump(self, capacity: int | None = None, which: int = FLOWS) -> tuple[np.ndarray, np.ndarray]:
        """Every entry: (keys, values) as FLOW_KEY / FLOW arrays."""
        cap = capacity or (self.class_capacity if which == CLASSES else self.flow_capacity)
        keys = np.empty(cap, dtype=FLOW_KEY)  # only the rows the kernel fills are returned
        vals = np.empty(cap, dtype=FLOW)
        n = _check(lib.mcnp_flows_dump(self._c, which, ffi.from_buffer("struct mcnp_flow_key[]", keys),
                                       ffi.from_buffer("struct mcnp_flow[]", vals), cap),
                   f"reading the {_MAP_NAMES[which]}")
        return keys[:n], vals[:n]

    def dump_slice(self, walk: "Walk", max_entries: int, which: int = FLOWS) -> tuple[np.ndarray, np.ndarray]:
        """About ``max_entries`` more entries of ``walk`` through the map (whole hash
        buckets); ``walk.done`` tells that this slice reached the end (the next starts over)."""
        cap = max_entries + 256
        keys = np.empty(cap, dtype=FLOW_KEY)
        vals = np.empty(cap, dtype=FLOW)
        n = _check(lib.mcnp_flows_dump_slice(self._c, which, walk.cursor, walk.started,
                                             ffi.from_buffer("struct mcnp_flow_key[]", keys),
                                             ffi.from_buffer("struct mcnp_flow[]", vals), max_entries, cap),
                   f"reading the {_MAP_NAMES[which]}")
        return keys[:n], vals[:n]

    def update(self, keys: np.ndarray, vals: np.ndarray, which: int = FLOWS) -> None:
        if len(keys):
            _check(lib.mcnp_flows_update(self._c, which, ffi.from_buffer("struct mcnp_flow_key[]", keys),
                                         ffi.from_buffer("struct mcnp_flow[]", vals), len(keys)),
                   f"writing to the {_MAP_NAMES[which]}")

    def delete(self, keys: np.ndarray, which: int = FLOWS) -> int:
        if not len(keys):
            return 0
        return _check(lib.mcnp_flows_delete(self._c, which, ffi.from_buffer("struct mcnp_flow_key[]", keys),
                                            len(keys)), f"removing entries from the {_MAP_NAMES[which]}")

    def clear(self, which: int) -> int:
        """Remove every entry; returns how many went."""
        return self.delete(self.dump(which=which)[0], which)

    def lookup(self, keys: np.ndarray, which: int = FLOWS) -> tuple[np.ndarray, np.ndarray]:
        vals = np.zeros(len(keys), dtype=FLOW)
        found = np.zeros(len(keys), dtype=np.uint8)
        if len(keys):
            lib.mcnp_flows_lookup(self._c, which, ffi.from_buffer("struct mcnp_flow_key[]", keys),
                                  len(keys), ffi.from_buffer("struct mcnp_flow[]", vals),
                                  ffi.from_buffer("uint8_t[]", found))
        return vals, found.astype(bool)


class Walk:
    """A position in a walk through a map of flow keys, slice by slice (Kernel.dump_slice)."""

    def __init__(self):
        self.cursor = ffi.new("uint64_t *")
        self.started = ffi.new("int *")

    @property
    def done(self) -> bool:
        """True between walks: the last slice reached the end of the map."""
        return not self.started[0]


def now_ns() -> int:
    """The hooks' clock (CLOCK_MONOTONIC)."""
    return int(lib.mcnp_now_ns())
