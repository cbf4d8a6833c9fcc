"""The packet loop: the frames the hooks hand to userspace, judged in batches.

mcnp filters beside the node's CNI (docs/architecture.md, "Node model"): every
local pod has a hook on both ends of its veth, the node-side end (egress: what
the pod sends) and the pod's eth0 (ingress: what it receives), each with an
AF_XDP socket.  The hooks pass the flows userspace admitted, in the kernel;
the loop sees the rest:

1. receive from every socket (one C call, fair start);
2. classify (C): parse; fail closed before the first tables and for a pod whose
   addresses are not known yet; anti-spoofing on the egress end; the flow
   cache's word (a flow that raced its own installation passes, a flow of an
   older revision is judged again in its opening direction);
3. judge the gathered rows with ONE tables revision (the matcher, once per
   batch; Services in Python) — and, while some policy is in audit mode, again
   with the audit tables (every policy), so that a new flow enforcement admits
   but full enforcement would not passes as "would deny";
4. finish (C): write admitted flows to the cache in one batch, fix L4
   checksums, and send each allowed frame into the *other* end of its pod's
   veth, so it crosses the hook again, finds its flow and continues on the
   path the CNI built; count every frame once;
5. transmit (one ring call per socket) and free the drops.

A batch nobody needs to judge is one C call (``mcnp_pipe_step``).

:class:`Loop` owns the UMEM, the sockets and the pipeline; pods come and go
with :meth:`Loop.add_pod` / :meth:`Loop.remove_pod` between batches.  The
flow cache's upkeep (re-checking on new tables, expiry, listing) is
:mod:`fastpath.flows`.
"""

from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastpath import kernel as K
from fastpath._dp import ffi, lib
from fastpath.counters import GAUGE, N_PIPELINE_REASONS, REASON, REASONS, STATUS_REASON, Counters
from fastpath.match import DENIED, NOT_ENFORCED, judge
from fastpath.netns import Namespace
from fastpath.parse import ParsedBatch
from fastpath.rings import Port, Umem

logger = logging.getLogger(__name__)

#: The packet loop's defaults, in one place (docs/dataplane.md).
DEFAULTS = dict(batch=256, frames=16384, frame_size=4096, ring_size=512, fill=128,
                spin_us=50, poll_ms=10, xdp_mode="generic")
MAX_PORTS = lib.MCNP_XSKS_MAX
J_EGRESS, J_BOTH, J_SERVICE = lib.MCNP_J_EGRESS, lib.MCNP_J_BOTH, lib.MCNP_J_SERVICE


def _check_reason_codes() -> None:
    """The C pipeline names reasons by number: they must be counters.REASONS' order."""
    for name in REASONS[:N_PIPELINE_REASONS]:
        if getattr(lib, "MCNP_R_" + name.upper()) != REASON[name]:
            raise RuntimeError(f"csrc/mcnp_pipeline.h and fastpath/counters.py disagree on {name!r}")


_check_reason_codes()


def _ptr(ctype: str, arr: np.ndarray):
    return ffi.cast(ctype, arr.ctypes.data)


@dataclass
class PodHooks:
    """One attached pod: its sandbox, zone and the two sockets' port indices."""
    sandbox: str
    zone: int
    egress: int
    ingress: int
    host_ifname: str
    pod_ifname: str
    netns: str
    ips: list[str] = field(default_factory=list)
    mac: bytes | None = None


class Services:
    """Service addresses as the egress end sees them (rule S11), sorted for C.

    ``defer`` VIPs send to pods of the local cluster only: the backend's
    ingress end judges the source's egress there, after the node's NAT chose it
    (every node of the cluster enforces its pods' egress). Other VIPs are judged
    here against every endpoint address; the connection passes only if all
    would (the backend kube-proxy picks is not known yet)."""

    def __init__(self, entries: list[dict] | None = None):
        self.by_key: dict[bytes, dict] = {}
        for e in entries or ():
            self.by_key[self.key(e["ip"], e["protocol"], e["port"])] = e
        keys = sorted(self.by_key)
        self.vips = np.frombuffer(b"".join(keys), dtype=np.uint8).copy() if keys else \
            np.zeros(20, dtype=np.uint8)
        self.n = len(keys)

    @staticmethod
    def key(ip: str, proto: int, port: int) -> bytes:
        return K.addr16(ip) + bytes([proto, 0]) + int(port).to_bytes(2, "big")


class Pipeline:
    """The C pipeline's state (struct mcnp_pipe) and the arrays it points at."""

    def __init__(self, kern: K.Kernel, counters: Counters, batch: int, max_ports: int = 64):
        self.batch = batch
        self.counters = counters
        self.parsed = ParsedBatch(batch)
        self.tables = None
        #: What full enforcement would do while some policy is in audit mode (the
        #: tables in force leave audited policies out); None otherwise.
        self.audit_tables = None
        self.judge = judge
        self.services = Services()
        c = self._c = ffi.new("struct mcnp_pipe *")
        self._keep = []
        c.capacity = batch
        c.kernel = kern.c
        c.parsed = ffi.cast("struct mcnp_parsed *", self.parsed._c)
        c.fix_checksums = 1
        self.hooks = ffi.new("struct mcnp_hook_info[]", MAX_PORTS)
        c.hooks = self.hooks
        self.start_reason = np.where(STATUS_REASON >= 0, STATUS_REASON, REASON["truncated"]).astype(np.int16)
        c.start_reason = _ptr("int16_t *", self.start_reason)
        c.verdicts = _ptr("int64_t *", counters.verdict_cells)
        c.n_reasons = len(REASONS)
        for name in ("batches", "frames", "judged", "cache_errors"):
            setattr(c, f"gauge_{name}", _ptr("int64_t *", counters.gauges[GAUGE[name]:]))
        c.log = ffi.cast("struct mcnp_verdict *", counters.log.ctypes.data)
        c.log_size = len(counters.log)
        c.log_seq = _ptr("uint64_t *", counters.log_seq)
        self._no_hits = np.zeros(1, dtype=np.int64)
        self.set_rule_hits(self._no_hits)
        self._alloc_frames(batch)
        self._alloc_ports(max_ports)
        self.set_services([])

    def _arr(self, field_name: str, ctype: str, shape, dtype) -> np.ndarray:
        a = np.zeros(shape, dtype=dtype)
        self._keep.append(a)
        setattr(self._c, field_name, ffi.cast(ctype, a.ctypes.data))
        setattr(self, field_name, a)
        return a

    def _alloc_frames(self, n: int) -> None:
        for name, ctype, shape, dtype in (
                ("reason", "int16_t *", n, np.int16), ("alive", "uint8_t *", n, np.uint8),
                ("fix_mask", "uint8_t *", n, np.uint8), ("found", "uint8_t *", n, np.uint8),
                ("keys", "struct mcnp_flow_key *", n, K.FLOW_KEY),
                ("cached", "struct mcnp_flow *", n, K.FLOW),
                ("judge_idx", "uint32_t *", n, np.uint32), ("judge_src", "uint8_t *", (n, 16), np.uint8),
                ("judge_dst", "uint8_t *", (n, 16), np.uint8), ("judge_proto", "uint8_t *", n, np.uint8),
                ("judge_dport", "uint16_t *", n, np.uint16), ("judge_kind", "uint8_t *", n, np.uint8),
                ("judge_recheck", "uint8_t *", n, np.uint8), ("drop_addrs", "uint64_t *", n, np.uint64),
                ("new_keys", "struct mcnp_flow_key *", n, K.FLOW_KEY),
                ("new_vals", "struct mcnp_flow *", n, K.FLOW),
                ("old_keys", "struct mcnp_flow_key *", n, K.FLOW_KEY),
                ("class_keys", "struct mcnp_flow_key *", n, K.FLOW_KEY),
                ("class_vals", "struct mcnp_flow *", n, K.FLOW)):
            self._arr(name, ctype, shape, dtype)

    def _alloc_ports(self, max_ports: int) -> None:
        """TX lists for max_ports sockets (grown when pods come)."""
        self._c.max_ports = max_ports
        self._arr("tx_addrs", "uint64_t *", (max_ports, self.batch), np.uint64)
        self._arr("tx_lens", "uint32_t *", (max_ports, self.batch), np.uint32)
        self._arr("tx_count", "uint32_t *", max_ports, np.uint32)

    def ensure_ports(self, n_ports: int) -> None:
        if n_ports > self._c.max_ports:
            self._alloc_ports(min(MAX_PORTS, max(n_ports, 2 * self._c.max_ports)))
        self._c.n_ports = n_ports

    @property
    def rule_hits(self) -> np.ndarray:
        return self._hits

    def set_rule_hits(self, hits: np.ndarray) -> None:
        """Where admitted flows count their rules: the array of the tables in force."""
        self._hits = hits
        self._c.rule_hits = _ptr("int64_t *", hits)
        self._c.max_rules = max(len(hits) - 1, 0)

    def set_tables(self, tables, timeouts: dict[str, float], audit_tables=None, classes: bool = True) -> None:
        """The tables in force; ``classes``: record the class of each new flow admitted
        (the hooks admit its other new flows by it)."""
        self.tables = tables
        self._c.classes = int(classes)
        self.audit_tables = audit_tables if tables is not None else None
        self._c.revision = tables.revision if tables is not None else 0
        for i, name in enumerate(K.STATES):
            self._c.timeout_ns[i] = int(timeouts[name] * 1e9)

    def set_services(self, entries: list[dict]) -> None:
        self.services = Services(entries)
        self._vips = self.services.vips
        self._c.vips = _ptr("uint8_t *", self._vips)
        self._c.n_vips = self.services.n

    def set_hook(self, index: int, zone: int, peer: int, role: int, ips: list[str],
                 ready: bool) -> None:
        h = self.hooks[index]
        h.zone, h.peer, h.role, h.ready = zone, peer, role, int(ready)
        h.n_ips = min(len(ips), 4)
        for i, ip in enumerate(ips[:4]):
            ffi.memmove(h.ips[i], K.addr16(ip), 16)

    def clear_hook(self, index: int) -> None:
        h = self.hooks[index]
        h.zone, h.peer, h.ready, h.n_ips = 0, -1, 0, 0

    # -- the part Python keeps ---------------------------------------------------------

    def verdicts(self, n_judge: int):
        """Verdicts of the gathered rows by the tables in force: (ok, egress rule,
        ingress rule)."""
        self._c.n_judge = n_judge
        return self._judge_rows(self.tables, n_judge)

    def audit_verdicts(self, n_judge: int):
        """The audit tables' (egress, ingress) rule ids of the gathered rows, two per
        row as ``mcnp_pipe_finish`` takes them; None when no policy is in audit."""
        if self.audit_tables is None:
            return None
        _, eg, ing = self._judge_rows(self.audit_tables, n_judge)
        return np.ascontiguousarray(np.stack([eg, ing], axis=1), dtype=np.int32)

    def _judge_rows(self, tables, n_judge: int):
        src, dst = self.judge_src[:n_judge], self.judge_dst[:n_judge]
        proto, dport = self.judge_proto[:n_judge], self.judge_dport[:n_judge]
        kind = self.judge_kind[:n_judge]
        j = self.judge(tables, src, dst, proto, dport)
        eg = np.array(j.egress, dtype=np.int32)
        ing = np.array(j.ingress, dtype=np.int32)
        ok = np.array(j.allowed, dtype=np.uint8)
        egress_only = kind == J_EGRESS
        ok[egress_only] = eg[egress_only] != DENIED
        ing[egress_only] = NOT_ENFORCED
        for r in np.nonzero(kind == J_SERVICE)[0]:
            ok[r], eg[r] = self._service(tables, int(r))
            ing[r] = NOT_ENFORCED
        return ok, eg, ing

    def _service(self, tables, r: int) -> tuple[int, int]:
        """Rule S11 for a row leaving a pod towards a Service address."""
        key = bytes(self.judge_dst[r]) + bytes([int(self.judge_proto[r]), 0]) + \
            int(self.judge_dport[r]).to_bytes(2, "big")
        svc = self.services.by_key.get(key)
        if svc is None:
            return 0, DENIED
        if svc.get("defer"):
            return 1, NOT_ENFORCED
        eps = svc.get("endpoints") or []
        if not eps:
            return 0, DENIED  # kube-proxy rejects it too
        n = len(eps)
        src = np.repeat(self.judge_src[r:r + 1], n, axis=0)
        dst = np.stack([np.frombuffer(K.addr16(ip), dtype=np.uint8) for ip, _ in eps])
        proto = np.full(n, self.judge_proto[r], dtype=np.uint8)
        dport = np.array([port for _, port in eps], dtype=np.uint16)
        j = self.judge(tables, src, dst, proto, dport)
        if bool(np.all(j.egress != DENIED)):
            return 1, int(j.egress[0])
        return 0, DENIED

    def finish(self, buf_c, buf_len, addrs_c, lens_c, in_port_c, n: int, now: int,
               n_judge: int) -> None:
        if self.tables is None:
            lib.mcnp_pipe_finish(self._c, buf_c, buf_len, addrs_c, lens_c, in_port_c, n, now,
                                 ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL)
            return
        ok, eg, ing = self.verdicts(n_judge)
        audit = self.audit_verdicts(n_judge)
        fb = ffi.from_buffer
        lib.mcnp_pipe_finish(self._c, buf_c, buf_len, addrs_c, lens_c, in_port_c, n, now,
                             fb("uint8_t[]", ok), fb("int32_t[]", eg), fb("int32_t[]", ing),
                             ffi.NULL if audit is None else fb("int32_t[]", audit))

    def process(self, buf: np.ndarray, addrs: np.ndarray, lens: np.ndarray,
                in_port: np.ndarray, n: int, now: int | None = None):
        """Classify, judge and finish one batch over any buffer (tests, fuzzing):
        returns ``(sends, drops)``, ``sends`` as ``[(port, addrs)]`` per TX list."""
        fb = ffi.from_buffer
        now = K.now_ns() if now is None else now
        c_buf = fb("uint8_t[]", buf, require_writable=True)
        args = (c_buf, len(buf), fb("uint64_t[]", addrs), fb("uint32_t[]", lens), fb("int16_t[]", in_port))
        n_judge = lib.mcnp_pipe_classify(self._c, *args, n, now)
        self.finish(*args, n, now, n_judge)
        sends = [(port, self.tx_addrs[port, :count].copy())
                 for port, count in enumerate(self.tx_count[:self._c.n_ports]) if count]
        return sends, self.drop_addrs[:self._c.n_drop].copy()

    def reasons(self, n: int) -> np.ndarray:
        """The last batch's reason per frame."""
        return self.reason[:n].copy()


class Loop:
    """The pods' sockets over one UMEM, and the pipeline over them (see the module)."""

    def __init__(self, kern: K.Kernel, counters: Counters | None = None, *,
                 node_ns: Namespace | None = None, **options):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown loop options: {', '.join(sorted(unknown))}")
        self.opt = {**DEFAULTS, **options}
        self.kernel = kern
        self.node_ns = node_ns
        self.counters = counters or Counters()
        # a slot per packet of a batch: a batch of packets in pieces never runs short
        self.umem = Umem(self.opt["frames"], self.opt["frame_size"], self.opt["ring_size"],
                         slots=self.opt["batch"])
        self.pipeline = Pipeline(kern, self.counters, self.opt["batch"])
        self.ports: list[Port | None] = []
        self._cports = ffi.new("struct mcnp_port *[]", MAX_PORTS)
        self.pods: dict[str, PodHooks] = {}
        self._poll = select.poll()
        b = self.opt["batch"]
        self.addrs = np.zeros(b, dtype=np.uint64)
        self.lens = np.zeros(b, dtype=np.uint32)
        self.in_port = np.zeros(b, dtype=np.int16)
        fb = ffi.from_buffer
        self._c_addrs, self._c_lens = fb("uint64_t[]", self.addrs), fb("uint32_t[]", self.lens)
        self._c_in_port = fb("int16_t[]", self.in_port)
        self._c_buf = fb("uint8_t[]", self.umem.buf)
        self._received = ffi.new("uint32_t *")
        self._start = 0

    # -- pods ---------------------------------------------------------------------------

    def _free_index(self) -> int:
        for i, p in enumerate(self.ports):
            if p is None:
                return i
        if len(self.ports) >= MAX_PORTS:
            raise K.KernelError(28, f"no socket slot left (at most {MAX_PORTS})")
        self.ports.append(None)
        return len(self.ports) - 1

    def _open(self, ifname: str) -> int:
        i = self._free_index()
        # A deep fill ring absorbs a burst while the loop sleeps; shared fairly when
        # many pods are hooked (the pool holds every socket's fill frames).
        sockets = sum(p is not None for p in self.ports) + 1
        fill = min(self.opt["fill"], max(16, self.opt["frames"] // (2 * sockets)))
        port = Port(self.umem, ifname, fill=fill)
        self.ports[i] = port
        self._cports[i] = port._c
        self.kernel.register(i, port.fd)
        self._poll.register(port.fd, select.POLLIN)
        self.pipeline.ensure_ports(len(self.ports))
        return i

    def _close(self, i: int) -> None:
        port = self.ports[i]
        if port is None:
            return
        self.kernel.unregister(i)
        self._poll.unregister(port.fd)
        self.pipeline.clear_hook(i)
        self._cports[i] = ffi.NULL
        self.ports[i] = None
        port.close()
        while self.ports and self.ports[-1] is None:
            self.ports.pop()
        self.pipeline.ensure_ports(len(self.ports))

    def add_pod(self, sandbox: str, netns: str, pod_ifname: str, host_ifname: str,
                ips: list[str], mac: bytes | None, ready: bool = False,
                isolated: bool = True) -> PodHooks:
        """Hook both ends of a pod's veth; fail closed until :meth:`set_pod` says
        the pod is known.  Sockets first, then the hooks: by the time a frame is
        redirected, a socket is waiting.  Raises (leaving nothing behind) on failure."""
        if sandbox in self.pods:
            self.remove_pod(sandbox)
        zone = K.zone_of(sandbox)
        pod_ns = Namespace.from_path(netns)
        opened: list[int] = []
        try:
            self.kernel.set_pod(zone, ips, mac, False, True)
            eg = self._open(host_ifname)
            opened.append(eg)
            with pod_ns.entered():
                ing = self._open(pod_ifname)
                opened.append(ing)
            hooks = PodHooks(sandbox, zone, eg, ing, host_ifname, pod_ifname, netns, list(ips), mac)
            self.pipeline.set_hook(eg, zone, ing, K.EGRESS, ips, False)
            self.pipeline.set_hook(ing, zone, eg, K.INGRESS, ips, False)
            mode = self.opt["xdp_mode"]
            self.kernel.attach(host_ifname, zone, eg, K.EGRESS, mode)
            with pod_ns.entered():
                self.kernel.attach(pod_ifname, zone, ing, K.INGRESS, mode)
        except Exception:
            for i in opened:
                self._close(i)
            self.kernel.delete_pod(zone)
            raise
        finally:
            pod_ns.close()
        self.pods[sandbox] = hooks
        self.set_pod(sandbox, ips, ready, isolated)
        return hooks

    def set_pod(self, sandbox: str, ips: list[str], ready: bool, isolated: bool) -> None:
        """The pod's addresses as the tables in force know them, and whether it is isolated."""
        h = self.pods[sandbox]
        h.ips = list(ips)
        self.pipeline.set_hook(h.egress, h.zone, h.ingress, K.EGRESS, ips, ready)
        self.pipeline.set_hook(h.ingress, h.zone, h.egress, K.INGRESS, ips, ready)
        self.kernel.set_pod(h.zone, ips, h.mac, ready, isolated)

    def remove_pod(self, sandbox: str) -> bool:
        """Detach a pod's hooks and close its sockets; its cached flows go with the
        next sweep (:mod:`fastpath.flows`).  A vanished veth is fine."""
        h = self.pods.pop(sandbox, None)
        if h is None:
            return False
        self.kernel.detach(h.host_ifname)
        try:
            pod_ns = Namespace.from_path(h.netns)
        except OSError:
            pod_ns = None  # the pod's namespace is gone, and its veth with it
        if pod_ns is not None:
            try:
                with pod_ns.entered():
                    self.kernel.detach(h.pod_ifname)
            finally:
                pod_ns.close()
        self._close(h.egress)
        self._close(h.ingress)
        self.kernel.delete_pod(h.zone)
        return True

    # -- batches --------------------------------------------------------------------------

    def set_tables(self, tables, timeouts: dict[str, float], hits: np.ndarray, audit_tables=None,
                   classes: bool = True) -> None:
        self.pipeline.set_tables(tables, timeouts, audit_tables, classes)
        self.pipeline.set_rule_hits(hits)

    def step(self, now: int | None = None) -> int:
        """One batch from every socket; returns the frames received."""
        if not self.ports:
            return 0
        now = K.now_ns() if now is None else now
        p = self.pipeline
        self._start = (self._start + 1) % len(self.ports)
        need = lib.mcnp_pipe_step(p._c, self._cports, self.umem._c, self._c_buf, len(self.umem.buf),
                                  self._c_addrs, self._c_lens, self._c_in_port, self._start, now,
                                  self._received)
        n = int(self._received[0])
        if need:
            p.finish(self._c_buf, len(self.umem.buf), self._c_addrs, self._c_lens, self._c_in_port,
                     n, now, int(p._c.n_judge))
            lib.mcnp_pipe_send(p._c, self._cports, self.umem._c)
        return n

    def run(self, should_stop: Callable[[], bool], between_batches: Callable[[], None] | None = None,
            max_frames: int | None = None) -> int:
        """Process batches until ``should_stop()`` (or ``max_frames`` received); sleeps
        in poll() when the rings stay empty for spin_us, and goes on sleeping without
        spinning while polls time out (an idle node's loop wakes every poll_ms for its
        housekeeping only).  Returns frames processed.

        While it spins it yields the CPU to anything else that wants it: the worker
        often shares a CPU with the pods it serves, and a spinner that does not yield
        holds back the very receiver its next frame is for (measured on the node
        testbed: a first packet's round trip 1.06 ms with a 200 µs spin that did not
        yield, 0.41-0.44 ms yielding or not spinning, against 0.15-0.19 ms for the
        CNI alone)."""
        total = 0
        spin_ns = self.opt["spin_us"] * 1000
        idle_since = None
        asleep = False  # the last poll() timed out: nothing came, poll again without spinning
        while not should_stop():
            n = self.step()
            total += n
            if between_batches is not None:
                between_batches()
            if max_frames is not None and total >= max_frames:
                break
            if n:
                idle_since, asleep = None, False
                continue
            now = time.monotonic_ns()
            if asleep or (idle_since is not None and now - idle_since > spin_ns):
                self.counters.gauges[GAUGE["rx_empty_polls"]] += 1
                asleep = not self._poll.poll(self.opt["poll_ms"])
                idle_since = None
            elif idle_since is None:
                idle_since = now
            else:
                os.sched_yield()
        return total

    def port_stats(self) -> dict:
        out = {}
        for h in self.pods.values():
            for role, i in (("egress", h.egress), ("ingress", h.ingress)):
                port = self.ports[i]
                if port is not None:
                    out[f"{h.sandbox[:12]}/{role}"] = {"ifname": port.ifname, **port.stats()}
        return out

    def close(self) -> None:
        """Close the sockets; the hooks stay attached (fail static: a restarted
        daemon takes them over).  :meth:`remove_pod` is what takes a pod off."""
        for i in range(len(self.ports)):
            if self.ports[i] is not None:
                self.kernel.unregister(i)
                self.ports[i].close()
                self.ports[i] = None
        self.umem.close()

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
