"""The packet loop: receive a batch, decide every frame, transmit or drop.

Stages, per batch (numbered as in the code of :meth:`Pipeline.process`):

1. parse the whole batch (one C call); malformed frames are dropped with the
   parser's reason;
2. L2 sanity: a multicast source MAC is dropped;
3. anti-spoofing: an IP frame from a pod port must carry its pod's address;
4. MAC learning (a MAC held by a pod port does not move);
5. policy for IP frames: before the first tables, drop (fail closed); else
   conntrack classifies the batch, frames of known flows pass, the rest are
   judged by ONE tables revision, and allowed new flows are recorded;
6. forwarding: MAC table lookup, hairpins dropped;
7. L4 checksums of forwarded IP frames fixed (veth sends CHECKSUM_PARTIAL);
8. unicast grouped per output port; broadcast/multicast/unknown flooded to
   every other port (copies in fresh frames);
9. dropped frames go back to the pool; every frame is counted exactly once
   in ``counters.verdicts``.

:class:`Pipeline` holds the decisions and works on any byte buffer with a
frame pool (``copy``/``free``), so it runs unchanged over a UMEM or over a
plain numpy buffer (:class:`BufferFrames`: fuzzing, tests, replay).
:class:`Loop` adds the AF_XDP ports: poll, gather, process, transmit.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Callable

import numpy as np

from fastpath import parse
from fastpath.conntrack import NEW, ORIG, REPLY, UNTRACKED, ConnTrack
from fastpath.counters import DROP, GAUGE, PASS, REASON, REASONS, STATUS_REASON, Counters
from fastpath.switch import FLOOD, Switch

logger = logging.getLogger(__name__)

DENIED = -1

# Per parser status: the reason a frame starts with, and whether it is IP.
_START_REASON = STATUS_REASON.copy()
_START_REASON[parse.NON_IP] = REASON["l2"]
_START_REASON[parse.ND] = REASON["nd"]
_START_REASON[parse.OK_IP] = REASON["allowed"]     # provisional, decided in stage 5
_START_REASON[parse.FRAGMENT] = REASON["allowed"]
_START_REASON[_START_REASON < 0] = REASON["truncated"]  # codes the parser never writes
_IS_IP = np.zeros(256, dtype=bool)
_IS_IP[[parse.OK_IP, parse.FRAGMENT]] = True
_PASS_REASON = np.array([r in ("l2", "nd", "established", "reply", "allowed") for r in REASONS])
_R = {name: np.int16(i) for name, i in REASON.items()}
# reason -> flat index into verdicts (pass row or drop row), for one bincount per batch
_FLAT = np.where(_PASS_REASON, np.arange(len(REASONS)), len(REASONS) + np.arange(len(REASONS)))
_MCAST = np.uint64(1 << 40)
# conntrack result -> reason for tracked frames, and whether the matcher must judge it
_CT_REASON = np.full(8, REASON["allowed"], dtype=np.int16)
_CT_REASON[ORIG], _CT_REASON[REPLY] = REASON["established"], REASON["reply"]
_CT_JUDGE = np.zeros(8, dtype=bool)
_CT_JUDGE[[NEW, UNTRACKED]] = True


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
        self.ct = conntrack or ConnTrack(clock=clock, batch=batch)
        self.counters = counters or Counters()
        self.parsed = parse.ParsedBatch(batch)
        self.tables = None
        self.fix_checksums = fix_checksums
        self._rule_eg = np.full(batch, -2, dtype=np.int32)
        self._rule_in = np.full(batch, -2, dtype=np.int32)
        self._commit = np.zeros(batch, dtype=bool)
        self._all_allowed = np.full(batch, _R["allowed"], dtype=np.int16)
        self._all_true = np.ones(batch, dtype=bool)

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
        return cut

    # -- one batch ---------------------------------------------------------------

    def process(self, buf: np.ndarray, addrs: np.ndarray, lens: np.ndarray,
                in_port: np.ndarray, n: int, pool) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Decide frames ``[0, n)``; returns ``[(port, addrs, lens), ...]`` to transmit.

        Frames not returned were dropped and handed back to ``pool``; copies
        for flooding come from ``pool``.  The caller owns the returned frames.
        """
        if n == 0:
            return []
        now = self.clock()
        addrs, lens, in_port = addrs[:n], lens[:n], in_port[:n]
        # 1. parse
        p = parse.parse_batch(buf, addrs, lens, n, out=self.parsed)
        st = p.status[:n]
        if st.any():
            reason = _START_REASON[st]
            alive = _PASS_REASON[reason]
            ip = _IS_IP[st]
        else:  # the common case: every frame is a well-formed IP packet
            reason = self._all_allowed[:n].copy()
            alive = self._all_true[:n].copy()
            ip = self._all_true[:n].copy()
        eth_src = p.eth_src[:n]
        # 2. a multicast source MAC is never legitimate
        group_src = eth_src & _MCAST
        if group_src.any():
            bad_mac = alive & group_src.astype(bool)
            reason[bad_mac] = _R["bad_src_mac"]
            alive &= ~bad_mac
        # 3. anti-spoofing on pod ports (before the first tables, all IP is dropped)
        if self.tables is None:
            reason[alive & ip] = _R["no_tables"]
            alive &= ~ip
        spoofed = self.switch.spoofed(in_port, p.src)
        if spoofed.any():
            spoofed &= alive & ip
            reason[spoofed] = _R["spoofed"]
            alive &= ~spoofed
        # 4. learn source MACs
        conflict = self.switch.learn(in_port[alive], eth_src[alive], now)
        if conflict.any():
            idx = np.nonzero(alive)[0][conflict]
            reason[idx] = _R["mac_conflict"]
            alive[idx] = False
        # 5. policy
        ip &= alive
        if ip.any():
            self._police(buf, addrs, lens, n, st, ip, reason, alive, now)
        # 6. forwarding
        out = self.switch.forward(p.eth_dst[:n])
        hairpin = out == in_port
        if hairpin.any():
            hairpin &= alive
            reason[hairpin] = _R["hairpin"]
            alive &= ~hairpin
        # 7. checksums of what leaves
        if self.fix_checksums:
            fix = alive & (st == parse.OK_IP)
            if fix.any():
                parse.fix_l4_checksums(buf, addrs, lens, p, fix, only_partial=True)
        # 8. unicast per port, flooding
        sends = self._unicast(addrs, lens, out, alive & (out >= 0))
        flood = alive & (out == FLOOD)
        if flood.any():
            sends += self._flood(addrs, lens, in_port, flood, reason, alive, pool)
        # 9. drops back to the pool, every frame counted once
        if not alive.all():
            pool.free(np.ascontiguousarray(addrs[~alive]))
        c = self.counters
        c.verdict_cells += np.bincount(_FLAT[reason], minlength=2 * len(REASONS))
        g = c.gauges
        g[GAUGE["batches"]] += 1
        g[GAUGE["frames"]] += n
        return sends

    def _police(self, buf, addrs, lens, n, st, ip, reason, alive, now) -> None:
        """Stage 5: conntrack, then judge what it does not know, with one revision."""
        tables = self.tables
        if tables is None:
            reason[ip] = _R["no_tables"]
            alive &= ~ip
            return
        p = self.parsed
        tracked = ip & (st == parse.OK_IP)
        aux = self.ct.aux(p, n, buf, addrs)
        res, fresh = self.ct.lookup(p, n, tracked, aux, lens, now)
        np.copyto(reason, _CT_REASON[res], where=tracked)
        # New flows, untracked protocols and fragments are judged packet by packet.
        judge_mask = _CT_JUDGE[res]
        judge_mask |= st == parse.FRAGMENT
        judge_mask &= ip
        if not judge_mask.any():
            return
        idx = np.nonzero(judge_mask)[0]
        j = self.judge(tables, p.src[idx], p.dst[idx], p.proto[idx], p.dport[idx])
        ok = np.asarray(j.allowed, dtype=bool)
        eg, ing = np.asarray(j.egress), np.asarray(j.ingress)
        self.counters.gauges[GAUGE["judged"]] += len(idx)
        denied = idx[~ok]
        if len(denied):
            reason[denied] = np.where(eg[~ok] == DENIED, _R["denied_egress"], _R["denied_ingress"])
            alive[denied] = False
        if ok.any():
            self.counters.add_rule_hits(eg[ok])
            self.counters.add_rule_hits(ing[ok])
            commit = self._commit[:n]
            commit[:] = False
            commit[idx[ok]] = True
            commit &= res == NEW
            if commit.any():
                self._rule_eg[:n][idx] = eg
                self._rule_in[:n][idx] = ing
                self.ct.commit(p, n, commit, aux, tables.revision, self._rule_eg[:n],
                               self._rule_in[:n], lens, now)

    def _unicast(self, addrs, lens, out, sel) -> list:
        if not sel.any():
            return []
        if sel.all() and (out == out[0]).all():
            return [(int(out[0]), addrs.copy(), lens.copy())]
        idx = np.nonzero(sel)[0]
        ports = out[idx]
        order = np.argsort(ports, kind="stable")
        idx, ports = idx[order], ports[order]
        cuts = np.flatnonzero(np.diff(ports)) + 1
        return [(int(out[g[0]]), addrs[g], lens[g]) for g in np.split(idx, cuts)]

    def _flood(self, addrs, lens, in_port, flood, reason, alive, pool) -> list:
        """Send each flooded frame to every port but its own: the original to the
        first such port, copies to the others."""
        nports = self.switch.n_ports
        idx = np.nonzero(flood)[0]
        if nports < 2:
            reason[idx] = _R["no_destination"]
            alive[idx] = False
            return []
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
        self.closed = False

    @property
    def counters(self) -> Counters:
        return self.pipeline.counters

    def step(self) -> int:
        """Receive one batch from all ports, decide it, transmit; returns frames received."""
        n = 0
        share = max(1, self.batch // len(self.ports))
        for i, port in enumerate(self.ports):
            got = port.rx_into(self._addrs, self._lens, offset=n,
                               max=min(share if i < len(self.ports) - 1 else self.batch - n,
                                       self.batch - n))
            if got:
                self._in_port[n:n + got] = i
                n += got
        if n == 0:
            return 0
        for port_index, addrs, lens in self.pipeline.process(
                self.umem.buf, self._addrs, self._lens, self._in_port, n, self.umem):
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
