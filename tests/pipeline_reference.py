"""The packet pipeline written with numpy over the Python switch and conntrack
layers: the oracle the C pipeline (csrc/pipeline.c) is compared with.

This is how the loop decided batches before the per-frame work moved to C,
stage for stage as docs/dataplane.md describes them.  It is slow (tens of
numpy calls per batch) and exists only for tests.
"""

from __future__ import annotations

import time

import numpy as np

from fastpath import parse
from fastpath.conntrack import NEW, ORIG, REPLY, UNTRACKED, ConnTrack
from fastpath.counters import REASON, REASONS, STATUS_REASON, Counters
from fastpath.switch import FLOOD

_START = STATUS_REASON.copy()
_START[parse.NON_IP] = REASON["l2"]
_START[parse.ND] = REASON["nd"]
_START[parse.OK_IP] = _START[parse.FRAGMENT] = REASON["allowed"]
_START[_START < 0] = REASON["truncated"]
_IS_IP = np.zeros(256, dtype=bool)
_IS_IP[[parse.OK_IP, parse.FRAGMENT]] = True
_PASS = np.array([r in ("l2", "nd", "established", "reply", "allowed") for r in REASONS])
_R = {name: np.int16(i) for name, i in REASON.items()}
_CT_REASON = np.full(8, REASON["allowed"], dtype=np.int16)
_CT_REASON[ORIG], _CT_REASON[REPLY] = REASON["established"], REASON["reply"]
_CT_JUDGE = np.zeros(8, dtype=bool)
_CT_JUDGE[[NEW, UNTRACKED]] = True


class ReferencePipeline:
    """Same constructor and ``set_tables``/``process`` contract as
    :class:`fastpath.loop.Pipeline`; ``reasons`` holds the last batch's reason
    per frame."""

    def __init__(self, switch, judge, batch: int = 256, clock=time.monotonic_ns):
        self.switch, self.judge, self.clock = switch, judge, clock
        self.ct = ConnTrack(clock=clock, batch=batch)
        self.counters = Counters()
        self.parsed = parse.ParsedBatch(batch)
        self.tables = None
        self.reasons = np.zeros(0, dtype=np.int16)

    def set_tables(self, tables, bindings=None) -> int:
        if bindings is not None:
            self.switch.bind(bindings)
        cut = self.ct.recheck(tables, self.judge) if tables is not None else 0
        self.tables = tables
        return cut

    def process(self, buf, addrs, lens, in_port, n, pool):
        now = self.clock()
        addrs, lens, in_port = addrs[:n], lens[:n], in_port[:n]
        p = parse.parse_batch(buf, addrs, lens, n, out=self.parsed)
        st = p.status[:n]
        reason = _START[st]
        alive = _PASS[reason]
        ip = _IS_IP[st].copy()
        eth_src = p.eth_src[:n]
        bad_mac = alive & (eth_src & np.uint64(1 << 40)).astype(bool)
        reason[bad_mac] = _R["bad_src_mac"]
        alive &= ~bad_mac
        if self.tables is None:
            reason[alive & ip] = _R["no_tables"]
            alive &= ~ip
        spoofed = self.switch.spoofed(in_port, p.src) & alive & ip
        reason[spoofed] = _R["spoofed"]
        alive &= ~spoofed
        conflict = self.switch.learn(in_port[alive], eth_src[alive], now)
        idx = np.nonzero(alive)[0][conflict]
        reason[idx] = _R["mac_conflict"]
        alive[idx] = False
        ip &= alive
        if ip.any():
            self._police(buf, addrs, lens, n, st, ip, reason, alive, now)
        out = self.switch.forward(p.eth_dst[:n])
        hairpin = (out == in_port) & alive
        reason[hairpin] = _R["hairpin"]
        alive &= ~hairpin
        fix = alive & (st == parse.OK_IP)
        if fix.any():
            parse.fix_l4_checksums(buf, addrs, lens, p, fix, only_partial=True)
        sends = []
        for q in range(self.switch.n_ports):
            sel = np.nonzero(alive & (out == q))[0]
            if len(sel):
                sends.append((q, addrs[sel], lens[sel]))
        flood = alive & (out == FLOOD)
        if flood.any():
            sends += self._flood(addrs, lens, in_port, flood, reason, alive, pool)
        if not alive.all():
            pool.free(np.ascontiguousarray(addrs[~alive]))
        flat = np.where(_PASS[reason], reason, len(REASONS) + reason)
        self.counters.verdict_cells += np.bincount(flat, minlength=2 * len(REASONS))
        self.reasons = reason
        return sends

    def _police(self, buf, addrs, lens, n, st, ip, reason, alive, now):
        p = self.parsed
        tracked = ip & (st == parse.OK_IP)
        aux = self.ct.aux(p, n, buf, addrs)
        res, _ = self.ct.lookup(p, n, tracked, aux, lens, now)
        np.copyto(reason, _CT_REASON[res], where=tracked)
        judge = (_CT_JUDGE[res] | (st == parse.FRAGMENT)) & ip
        if not judge.any():
            return
        idx = np.nonzero(judge)[0]
        j = self.judge(self.tables, p.src[idx], p.dst[idx], p.proto[idx], p.dport[idx])
        ok = np.asarray(j.allowed, dtype=bool)
        eg, ing = np.asarray(j.egress), np.asarray(j.ingress)
        denied = idx[~ok]
        reason[denied] = np.where(eg[~ok] == -1, _R["denied_egress"], _R["denied_ingress"])
        alive[denied] = False
        self.counters.add_rule_hits(eg[ok])
        self.counters.add_rule_hits(ing[ok])
        commit = np.zeros(n, dtype=bool)
        commit[idx[ok]] = True
        commit &= res == NEW
        rule_eg = np.full(n, -2, dtype=np.int32)
        rule_in = np.full(n, -2, dtype=np.int32)
        rule_eg[idx], rule_in[idx] = eg, ing
        if commit.any():
            self.ct.commit(p, n, commit, aux, self.tables.revision, rule_eg, rule_in, lens, now)

    def _flood(self, addrs, lens, in_port, flood, reason, alive, pool):
        idx = np.nonzero(flood)[0]
        if self.switch.n_ports < 2:
            reason[idx] = _R["no_destination"]
            alive[idx] = False
            return []
        first = np.where(in_port[idx] == 0, 1, 0)
        sends = []
        for q in range(self.switch.n_ports):
            to_q = in_port[idx] != q
            orig = idx[to_q & (first == q)]
            if len(orig):
                sends.append((q, addrs[orig], lens[orig]))
            need = idx[to_q & (first != q)]
            if len(need):
                copies = pool.copy(np.ascontiguousarray(addrs[need]),
                                   np.ascontiguousarray(lens[need]))
                if len(copies):
                    sends.append((q, copies, lens[need][:len(copies)].copy()))
        return sends
