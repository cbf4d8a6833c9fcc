"""The packet loop: receive a batch, decide every frame, transmit or drop.

Stages, per batch (as in ``csrc/pipeline.c``, which does the per-frame work):

1. parse the whole batch; malformed frames are dropped with the parser's
   reason;
2. L2 sanity: a multicast source MAC is dropped;
3. fail closed before the first tables; anti-spoofing: an IP frame from a
   pod port must carry its pod's address;
4. MAC learning (a MAC held by a pod port does not move);
5. policy for IP frames: conntrack classifies the batch, frames of known
   flows pass, the rest are judged by ONE tables revision, and allowed new
   flows are recorded;
6. forwarding: MAC table lookup, hairpins dropped;
7. L4 checksums of forwarded IP frames fixed (veth sends CHECKSUM_PARTIAL);
8. unicast grouped per output port; broadcast/multicast/unknown flooded to
   every other port (copies in fresh frames);
9. dropped frames go back to the pool; every frame is counted exactly once
   in ``counters.verdicts``.

The per-frame work is C (``csrc/pipeline.c``): ``mcnp_pipe_classify``
(stages 1-5a) and ``mcnp_pipe_finish`` (5b-9).  Between them Python does only
what belongs in Python: the matcher (``judge``, numpy, once per batch and only
when a frame needs a verdict) and inserting newly seen MACs into the switch's
table.  Flooding copies stay in Python too; they are rare (ARP, unknown
unicast).  Over AF_XDP, :meth:`Loop.step` is one C call (``mcnp_pipe_step``:
receive, classify, finish, transmit, free the drops) for every batch that
needs neither.

:class:`Pipeline` holds the decisions and works on any byte buffer with a
frame pool (``copy``/``free``), so it runs unchanged over a UMEM or over a
plain numpy buffer (:class:`BufferFrames`: fuzzing, tests, replay).
:class:`Loop` adds the AF_XDP ports: poll, gather, process, transmit.
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import Callable

import numpy as np

from fastpath import parse
from fastpath._ct import ffi, lib
from fastpath.conntrack import ConnTrack
from fastpath.counters import GAUGE, REASON, REASONS, STATUS_REASON, Counters
from fastpath.switch import Switch

logger = logging.getLogger(__name__)

# Per parser status: the reason a frame starts with (provisional for IP).
_START_REASON = STATUS_REASON.copy()
_START_REASON[parse.NON_IP] = REASON["l2"]
_START_REASON[parse.ND] = REASON["nd"]
_START_REASON[parse.OK_IP] = REASON["allowed"]     # provisional, decided in stage 5
_START_REASON[parse.FRAGMENT] = REASON["allowed"]
_START_REASON[_START_REASON < 0] = REASON["truncated"]  # codes the parser never writes
_PASS_REASON = np.array([r in ("l2", "nd", "established", "reply", "allowed") for r in REASONS],
                        dtype=np.uint8)


def _check_reason_codes() -> None:
    """The C pipeline names reasons by number: they must be counters.REASONS' order."""
    for name in ("l2", "nd", "established", "reply", "allowed", "no_tables", "spoofed",
                 "bad_src_mac", "mac_conflict", "denied_egress", "denied_ingress", "hairpin",
                 "no_destination"):
        if getattr(lib, "MCNP_R_" + name.upper()) != REASON[name]:
            raise RuntimeError(f"csrc/mcnp_ct.h and fastpath/counters.py disagree on {name!r}")


_check_reason_codes()


def _ptr(ctype: str, arr: np.ndarray):
    return ffi.cast(ctype, arr.ctypes.data)


class BufferFrames:
    """A frame pool over a plain numpy buffer: what :class:`Pipeline` needs of a UMEM."""

    def __init__(self, buf: np.ndarray, free_addrs, frame_size: int = 2048):
        self.buf = buf
        self.frame_size = frame_size
        self._free = [int(a) for a in free_addrs]
        self.freed: list[int] = []

    def copy(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        k = min(len(addrs), len(self._free))
        out = np.array([self._free.pop() for _ in range(k)], dtype=np.uint64)
        for dst, src, ln in zip(out.tolist(), addrs[:k].tolist(), lens[:k].tolist()):
            self.buf[dst:dst + ln] = self.buf[src:src + ln]
        return out

    def free(self, addrs: np.ndarray) -> None:
        self.freed.extend(int(a) for a in addrs)


class _Arg:
    """A cffi pointer to a caller's array, remade only when the array object changes
    (the packet loop passes the same arrays every batch)."""

    __slots__ = ("obj", "ptr", "size")

    def __init__(self):
        self.obj = None
        self.ptr = ffi.NULL
        self.size = 0

    def get(self, arr, ctype: str, dtype, what: str):
        if arr is not self.obj:
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or not arr.flags.c_contiguous:
                raise TypeError(f"{what} must be a C-contiguous {np.dtype(dtype).name} array")
            self.ptr = ffi.from_buffer(ctype, arr)
            self.obj, self.size = arr, len(arr)
        return self.ptr


class Pipeline:
    """Every decision of the packet loop, for one batch at a time.

    ``judge`` is :func:`fastpath.match.judge` (injected for tests).  Tables
    change only through :meth:`set_tables`, between batches.
    """

    def __init__(self, switch: Switch, judge: Callable | None = None,
                 conntrack: ConnTrack | None = None, counters: Counters | None = None,
                 batch: int = 256, clock: Callable[[], int] = time.monotonic_ns,
                 fix_checksums: bool = True):
        if judge is None:
            from fastpath.match import judge
        self.judge = judge
        self.switch = switch
        self.clock = clock
        self.batch = batch
        self.ct = conntrack or ConnTrack(clock=clock, batch=batch)
        self.counters = counters or Counters()
        self.parsed = parse.ParsedBatch(batch)
        self.tables = None
        self.fix_checksums = fix_checksums
        self._args = {name: _Arg() for name in ("buf", "addrs", "lens", "in_port")}
        self._c = self._make_c(batch)
        self._mac_refs = self._bound_ref = None
        self._last_n = 0
        self._sync_switch()

    def _make_c(self, batch: int):
        """The C pipeline's state: pointers into arrays this object keeps alive."""
        nports = self.switch.n_ports
        c = ffi.new("struct mcnp_pipe *")
        keep = self._keep = {}

        def arr(name, ctype, shape, dtype, fill=0):
            a = np.full(shape, fill, dtype=dtype)
            keep[name] = a
            setattr(c, name, _ptr(ctype, a))
            return a

        c.capacity, c.n_ports = batch, nports
        c.ct = self.ct._ct
        c.parsed = ffi.cast("struct mcnp_parsed *", self.parsed.c_address())
        c.fix_checksums = int(self.fix_checksums)
        counters = self.counters
        c.verdicts = _ptr("int64_t *", counters.verdict_cells)
        c.n_reasons = len(REASONS)
        c.rule_hits = _ptr("int64_t *", counters.rule_hits)
        c.max_rules = counters.max_rules
        gauges = counters.gauges
        for field, name in (("gauge_batches", "batches"), ("gauge_frames", "frames"),
                            ("gauge_judged", "judged")):
            setattr(c, field, ffi.cast("int64_t *", gauges.ctypes.data + 8 * GAUGE[name]))
        keep["counters"] = counters
        keep["start_reason"] = _START_REASON
        keep["reason_pass"] = _PASS_REASON
        c.start_reason = _ptr("int16_t *", _START_REASON)
        c.reason_pass = _ptr("uint8_t *", _PASS_REASON)
        arr("reason", "int16_t *", batch, np.int16)
        arr("alive", "uint8_t *", batch, np.uint8)
        arr("ct_result", "uint8_t *", batch, np.uint8)
        arr("aux", "uint8_t *", batch, np.uint8)
        arr("fix_mask", "uint8_t *", batch, np.uint8)
        self._judge_idx = arr("judge_idx", "uint32_t *", batch, np.uint32)
        self._judge_src = arr("judge_src", "uint8_t *", (batch, 16), np.uint8)
        self._judge_dst = arr("judge_dst", "uint8_t *", (batch, 16), np.uint8)
        self._judge_proto = arr("judge_proto", "uint8_t *", batch, np.uint8)
        self._judge_dport = arr("judge_dport", "uint16_t *", batch, np.uint16)
        self._learn_idx = arr("learn_idx", "uint32_t *", batch, np.uint32)
        self.tx_addrs = arr("tx_addrs", "uint64_t *", (nports, batch), np.uint64)
        self.tx_lens = arr("tx_lens", "uint32_t *", (nports, batch), np.uint32)
        self.tx_count = arr("tx_count", "uint32_t *", nports, np.uint32)
        self._flood_idx = arr("flood_idx", "uint32_t *", batch, np.uint32)
        self._drop_addrs = arr("drop_addrs", "uint64_t *", batch, np.uint64)
        return c

    def _sync_switch(self) -> None:
        """Point the C pipeline at the switch's current bindings and MAC table
        (both are replaced, never edited in place, when they change)."""
        sw, c = self.switch, self._c
        if sw.bound is not self._bound_ref:
            bound = np.ascontiguousarray(sw.bound)
            is_pod = np.ascontiguousarray(sw.is_pod, dtype=np.uint8)
            self._bound_ref, self._bound_keep = sw.bound, (bound, is_pod)
            c.bound = _ptr("uint8_t *", bound)
            c.is_pod = _ptr("uint8_t *", is_pod)
            c.max_ips = bound.shape[1]
        m, refs = sw.macs, self._mac_refs
        if refs is None or m.macs is not refs[0] or m.ports is not refs[1] or m.seen is not refs[2]:
            refs = (m.macs, m.ports, m.seen)
            if (m.macs.dtype, m.ports.dtype, m.seen.dtype) != (np.uint64, np.int16, np.int64):
                raise TypeError("MAC table arrays must be uint64 MACs, int16 ports, int64 times")
            if not (m.macs.flags.c_contiguous and m.ports.flags.c_contiguous
                    and m.seen.flags.c_contiguous):
                m.macs, m.ports, m.seen = (np.ascontiguousarray(a) for a in refs)
                refs = (m.macs, m.ports, m.seen)
            self._mac_refs = refs
            c.mac_keys = _ptr("uint64_t *", m.macs)
            c.mac_ports = _ptr("int16_t *", m.ports)
            c.mac_seen = _ptr("int64_t *", m.seen)
            c.mac_n = len(m.macs)

    # -- policy hand-over ------------------------------------------------------

    def set_tables(self, tables, bindings: dict[str, list[str]] | None = None) -> int:
        """Switch to a new tables revision (between batches).  Tracked flows are
        re-judged by the new revision and those it denies are cut; returns how many."""
        if bindings is not None:
            self.switch.bind(bindings)
        cut = 0
        if tables is not None:
            cut = self.ct.recheck(tables, self.judge)
            g = self.counters.gauges
            g[GAUGE["rechecks"]] += 1
            g[GAUGE["flows_cut"]] += cut
            g[GAUGE["revision"]] = tables.revision
        else:
            self.ct.clear()
        self.tables = tables
        self._c.have_tables = int(tables is not None)
        return cut

    # -- one batch ---------------------------------------------------------------

    def process(self, buf: np.ndarray, addrs: np.ndarray, lens: np.ndarray,
                in_port: np.ndarray, n: int, pool) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Decide frames ``[0, n)``; returns ``[(port, addrs, lens), ...]`` to transmit.

        ``addrs`` is uint64, ``lens`` uint32, ``in_port`` int16 (the port index
        each frame came in on).  Frames not returned were dropped and handed
        back to ``pool``; copies for flooding come from ``pool``.  The caller
        owns the returned frames; the returned arrays are valid until the next
        call.
        """
        if n == 0:
            return []
        floods = self.decide(buf, addrs, lens, in_port, n, pool)
        return [(q, self.tx_addrs[q, :cnt], self.tx_lens[q, :cnt])
                for q, cnt in enumerate(self.tx_count.tolist()) if cnt] + floods

    def decide(self, buf: np.ndarray, addrs: np.ndarray, lens: np.ndarray,
               in_port: np.ndarray, n: int, pool) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """:meth:`process` without assembling the unicast lists: afterwards port
        ``q`` has ``tx_count[q]`` frames to send in ``tx_addrs[q]``/``tx_lens[q]``
        (rows of arrays this object reuses).  Returns the flooded sends."""
        args, c = self._args, self._c
        p_buf, buf_len = self._buffer(buf)
        p_addrs = args["addrs"].get(addrs, "uint64_t[]", np.uint64, "addrs")
        p_lens = args["lens"].get(lens, "uint32_t[]", np.uint32, "lens")
        p_in = args["in_port"].get(in_port, "int16_t[]", np.int16, "in_port")
        if not 0 < n <= min(self.batch, args["addrs"].size, args["lens"].size,
                            args["in_port"].size):
            raise ValueError(f"n={n} exceeds the batch capacity or the descriptor arrays")
        self._sync_switch()
        now = self.clock()
        # 1-5a in C: parse, sanity, anti-spoofing, MAC learning, conntrack
        lib.mcnp_pipe_classify(c, p_buf, buf_len, p_addrs, p_lens, p_in, n, now)
        floods = self.complete(buf, addrs, lens, in_port, n, now, pool)
        if c.n_drop:
            pool.free(self._drop_addrs[:c.n_drop])
        return floods

    def _buffer(self, buf) -> tuple:
        """cffi pointer and length of the frame buffer, remade only when it changes."""
        a_buf = self._args["buf"]
        if buf is not a_buf.obj:
            a_buf.ptr = ffi.from_buffer("uint8_t[]", buf, require_writable=self.fix_checksums)
            a_buf.obj, a_buf.size = buf, len(a_buf.ptr)
        return a_buf.ptr, a_buf.size

    def complete(self, buf, addrs, lens, in_port, n: int, now: int, pool) -> list:
        """After ``mcnp_pipe_classify``: insert new MACs, judge, run
        ``mcnp_pipe_finish`` (5b-9) and make the flooding copies; returns the
        flooded sends.  Drops are left in ``drop_addrs`` for the caller."""
        c, args = self._c, self._args
        p_buf, buf_len = self._buffer(buf)
        p_addrs = args["addrs"].get(addrs, "uint64_t[]", np.uint64, "addrs")
        p_lens = args["lens"].get(lens, "uint32_t[]", np.uint32, "lens")
        p_in = args["in_port"].get(in_port, "int16_t[]", np.int16, "in_port")
        if c.n_learn:
            self._learn(in_port, c.n_learn, now)
        k = c.n_judge
        if k:
            # 5b. one revision judges every frame of the batch that needs it
            j = self.judge(self.tables, self._judge_src[:k], self._judge_dst[:k],
                           self._judge_proto[:k], self._judge_dport[:k])
            allowed = np.ascontiguousarray(j.allowed, dtype=np.uint8)
            eg = np.ascontiguousarray(j.egress, dtype=np.int32)
            ing = np.ascontiguousarray(j.ingress, dtype=np.int32)
            if min(len(allowed), len(eg), len(ing)) < k:
                raise ValueError("judge returned fewer verdicts than frames")
            lib.mcnp_pipe_finish(c, p_buf, buf_len, p_addrs, p_lens, p_in, n, now,
                                 ffi.from_buffer("uint8_t[]", allowed),
                                 ffi.from_buffer("int32_t[]", eg),
                                 ffi.from_buffer("int32_t[]", ing),
                                 self.tables.revision & 0xFFFFFFFF)
        else:
            lib.mcnp_pipe_finish(c, p_buf, buf_len, p_addrs, p_lens, p_in, n, now,
                                 ffi.NULL, ffi.NULL, ffi.NULL, 0)
        self._last_n = n
        return self.floods(addrs, lens, in_port, pool)

    def floods(self, addrs, lens, in_port, pool) -> list:
        """The flooded sends of the last finished batch (copies made from ``pool``)."""
        count = self._c.n_flood
        return self._flood(addrs, lens, in_port, count, pool) if count else []

    @property
    def reasons(self) -> np.ndarray:
        """The last batch's reason (index into ``counters.REASONS``) per frame."""
        return self._keep["reason"][:self._last_n]

    def _learn(self, in_port: np.ndarray, count: int, now: int) -> None:
        """Slow path: insert the MACs classify found new (or moved off the uplink)."""
        idx = self._learn_idx[:count]
        entries = dict(zip(self.parsed.eth_src[idx].tolist(), in_port[idx].tolist()))
        self.switch.macs.update(entries, now)
        self._sync_switch()

    def _flood(self, addrs, lens, in_port, count: int, pool) -> list:
        """Send each flooded frame to every port but its own: the original to the
        first such port, copies to the others (the C side dropped floods when
        there is no other port)."""
        nports = self.switch.n_ports
        idx = self._flood_idx[:count].astype(np.intp)
        first = np.where(in_port[idx] == 0, 1, 0)
        sends = []
        for q in range(nports):
            to_q = in_port[idx] != q
            orig = idx[to_q & (first == q)]
            if len(orig):
                sends.append((q, addrs[orig], lens[orig]))
            need = idx[to_q & (first != q)]
            if len(need):
                copies = pool.copy(np.ascontiguousarray(addrs[need]), np.ascontiguousarray(lens[need]))
                g = self.counters.gauges
                g[GAUGE["flood_copies"]] += len(copies)
                g[GAUGE["flood_copy_failures"]] += len(need) - len(copies)
                if len(copies):
                    sends.append((q, copies, lens[need][:len(copies)].copy()))
        return sends


class Loop:
    """The pipeline over AF_XDP ports sharing one UMEM.

    ``ifnames`` are the ports in pipeline order; ``uplink`` names the uplink
    among them (or None).  Use as a context manager, or call :meth:`close`:
    ports detach their XDP programs and sockets close on every exit path.
    ``between_batches`` (if given) is called after every batch and after
    every idle poll, and is where a worker picks up new tables; it must be
    cheap.  On empty rings the loop spins for ``spin_us`` before sleeping in
    ``poll()`` for at most ``poll_ms``.
    """

    def __init__(self, ifnames: list[str], uplink: str | None = None, *,
                 judge: Callable | None = None, batch: int = 256, frames: int = 8192,
                 frame_size: int = 2048, ring_size: int = 2048, xdp_mode: str = "auto",
                 counters: Counters | None = None, ct_capacity: int = 65536,
                 ct_timeouts: dict | None = None, poll_ms: int = 10, spin_us: int = 200):
        from fastpath.xsk import Port, Umem
        self.ifnames = list(ifnames)
        self.batch = batch
        self.poll_ms = poll_ms
        self.spin_s = spin_us / 1e6
        up = self.ifnames.index(uplink) if uplink is not None else None
        switch = Switch(self.ifnames, uplink=up)
        self.pipeline = Pipeline(switch, judge=judge, counters=counters, batch=batch,
                                 conntrack=ConnTrack(ct_capacity, ct_timeouts, batch=batch))
        fill = min(ring_size, max(64, (frames // 2) // max(len(self.ifnames), 1)))
        self.umem = Umem(frames=frames, frame_size=frame_size, ring_size=ring_size)
        self.ports = []
        try:
            for name in self.ifnames:
                self.ports.append(Port(self.umem, name, xdp_mode=xdp_mode, fill=fill))
        except BaseException:
            self.close()
            raise
        self._addrs = np.empty(batch, dtype=np.uint64)
        self._lens = np.empty(batch, dtype=np.uint32)
        self._in_port = np.empty(batch, dtype=np.int16)
        self._poll = select.poll()
        for port in self.ports:
            self._poll.register(port.fd, select.POLLIN)
        self._rings = _Rings(self.ports, self.umem, self._addrs, self._lens, self._in_port)
        self._buf, self._buf_len = self.pipeline._buffer(self.umem.buf)
        self.closed = False

    @property
    def counters(self) -> Counters:
        return self.pipeline.counters

    def step(self) -> int:
        """Receive one batch from all ports, decide it, transmit; returns frames received.

        One C call does the whole batch unless a frame needs Python (a verdict
        from the matcher, a new MAC); floods are always copied here."""
        pipeline, rings, umem = self.pipeline, self._rings, self.umem
        pipeline._sync_switch()
        now = pipeline.clock()
        n = lib.mcnp_pipe_step(pipeline._c, rings.c, self._buf, self._buf_len, now)
        if n < 0:
            n = -n
            floods = pipeline.complete(umem.buf, self._addrs, self._lens, self._in_port, n, now,
                                       umem)
            lib.mcnp_pipe_send(pipeline._c, rings.c)
            if pipeline._c.n_drop:
                umem.free(pipeline._drop_addrs[:pipeline._c.n_drop])
        elif n:
            pipeline._last_n = n
            floods = pipeline.floods(self._addrs, self._lens, self._in_port, umem)
        else:
            floods = ()
        if rings.c.error:
            rings.fail()
        for port_index, addrs, lens in floods:
            self.ports[port_index].tx(addrs, lens)
        return n

    def run(self, should_stop: Callable[[], bool], between_batches: Callable[[], None] | None = None,
            max_frames: int | None = None) -> int:
        """Run until ``should_stop()`` is true (checked between batches) or
        ``max_frames`` were received; returns frames received."""
        total = 0
        gauges = self.counters.gauges
        idle_since = None
        while not should_stop():
            got = self.step()
            total += got
            if between_batches is not None:
                between_batches()
            if got:
                idle_since = None
                continue
            # Spin briefly on empty rings before sleeping in poll(): a wake-up
            # from poll costs scheduler latency on every packet at low load.
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            if now - idle_since > self.spin_s:
                gauges[GAUGE["rx_empty_polls"]] += 1
                self._poll.poll(self.poll_ms)
            if max_frames is not None and total >= max_frames:
                break
        return total

    def close(self) -> None:
        """Detach programs, close sockets and the UMEM.  Idempotent."""
        for port in getattr(self, "ports", []):
            port.close()
        if getattr(self, "umem", None) is not None:
            self.umem.close()
        self.closed = True

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Rings:
    """The AF_XDP side of one batch for ``mcnp_pipe_step``: the ports, the UMEM
    and the ring functions of ``fastpath._xsk`` as C pointers, made once.

    ``Port.rx_into``/``Port.tx``/``Umem.free`` wrap the same C functions and
    check their arguments on every call (~3 us each here); the loop's arrays
    never change, so the C pipeline calls them directly, with the semantics of
    those methods.
    """

    def __init__(self, ports, umem, addrs: np.ndarray, lens: np.ndarray, in_port: np.ndarray):
        from fastpath._xsk import ffi as xffi, lib as xlib

        def address(cdata) -> int:
            return int(xffi.cast("uintptr_t", cdata))

        self._ports = ports
        c = self.c = ffi.new("struct mcnp_rings *")
        self._port_array = ffi.new("struct mcnp_port *[]",
                                   [ffi.cast("struct mcnp_port *", p.c_address()) for p in ports])
        c.n_ports = len(ports)
        c.ports = self._port_array
        c.umem = ffi.cast("struct mcnp_umem *", umem.c_address())
        c.rx = ffi.cast("mcnp_rx_fn", address(xffi.addressof(xlib, "mcnp_rx_batch")))
        c.tx = ffi.cast("mcnp_tx_fn", address(xffi.addressof(xlib, "mcnp_tx_batch")))
        c.free = ffi.cast("mcnp_free_fn", address(xffi.addressof(xlib, "mcnp_pool_free")))
        c.addrs = _ptr("uint64_t *", addrs)
        c.lens = _ptr("uint32_t *", lens)
        c.in_port = _ptr("int16_t *", in_port)
        c.batch = min(len(addrs), len(lens), len(in_port))
        self._keep = (addrs, lens, in_port, ports, umem)

    def fail(self) -> None:
        """Raise the error a ring call reported (and clear it)."""
        from fastpath.xsk import XskError
        rc, port = -self.c.error, self.c.error_port
        self.c.error = 0
        raise XskError(rc, f"ring operation on {self._ports[port].ifname}: {os.strerror(rc)}")
