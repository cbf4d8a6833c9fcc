"""Packet loop counters: numpy arrays, optionally living in shared memory.

The hot path never logs; it adds to these arrays.  Every frame the loop
receives is counted exactly once in ``verdicts[verdict, reason]``, so
``verdicts.sum() == frames received`` is an invariant the tests check.
``rule_hits[rule_id]`` counts new flows (and untracked packets) admitted by
each rule, per direction side that named it.  ``gauges`` hold loop-level
facts (batches, table revision in force, live flows, ...).

When built over a buffer (a ``multiprocessing.shared_memory`` block), the
worker process writes and the control process reads the same memory:
counters are monotonic 64-bit values written by one writer, so a reader sees
each value either before or after an update, never torn (aligned 8-byte
stores on the platforms we run on).
"""

from __future__ import annotations

import numpy as np

from fastpath import parse

PASS, DROP = 0, 1
VERDICT_NAMES = ("pass", "drop")

#: Why a frame was passed or dropped.  Parser statuses >= MALFORMED_MIN are
#: reasons too (frames dropped as malformed), under their parser names.
REASONS = (
    "l2",              # pass: non-IP frame (ARP, LLDP, ...), switched without policy
    "nd",              # pass: IPv6 neighbour discovery / MLD, without policy
    "established",     # pass: a tracked flow, original direction
    "reply",           # pass: a tracked flow, reply direction
    "allowed",         # pass: judged and admitted by the tables (new flow or untracked)
    "no_tables",       # drop: IP before the first tables were published (fail closed)
    "spoofed",         # drop: source IP is not the pod's own on a pod port
    "bad_src_mac",     # drop: multicast/broadcast source MAC
    "mac_conflict",    # drop: source MAC belongs to another pod port
    "denied_egress",   # drop: the source pod's egress policy denies it
    "denied_ingress",  # drop: the destination pod's ingress policy denies it
    "hairpin",         # drop: destination MAC is behind the port the frame came in on
    "no_destination",  # drop: flooding found no other port
) + tuple(name for code, name in sorted(parse.STATUS_NAMES.items())
          if code >= parse.MALFORMED_MIN)
REASON = {name: i for i, name in enumerate(REASONS)}
#: reason index of each parser status (malformed ones only; others -1)
STATUS_REASON = np.full(256, -1, dtype=np.int16)
for _code, _name in parse.STATUS_NAMES.items():
    if _code >= parse.MALFORMED_MIN:
        STATUS_REASON[_code] = REASON[_name]
STATUS_REASON[parse.MALFORMED_MIN:][STATUS_REASON[parse.MALFORMED_MIN:] < 0] = REASON["truncated"]

GAUGES = ("batches", "frames", "revision", "flows", "flood_copies", "rechecks",
          "flows_cut", "rx_empty_polls", "heartbeat_ns", "judged",
          "flood_copy_failures")
GAUGE = {name: i for i, name in enumerate(GAUGES)}

DEFAULT_MAX_RULES = 65536


class Counters:
    """The loop's counters, over a private buffer or a shared one.

    ``size_for(max_rules)`` says how many bytes a buffer needs.  The layout
    is: verdicts int64[2, len(REASONS)], gauges int64[len(GAUGES)],
    rule_hits int64[max_rules + 1] (the last cell counts rule ids beyond
    ``max_rules``).
    """

    def __init__(self, buffer=None, max_rules: int = DEFAULT_MAX_RULES):
        self.max_rules = max_rules
        nv, ng = 2 * len(REASONS), len(GAUGES)
        total = nv + ng + max_rules + 1
        if buffer is None:
            cells = np.zeros(total, dtype=np.int64)
        else:
            cells = np.frombuffer(buffer, dtype=np.int64, count=total)
        self.cells = cells
        self.verdicts = cells[:nv].reshape(2, len(REASONS))
        self.verdict_cells = cells[:nv]  # flat view: pass reasons, then drop reasons
        self.gauges = cells[nv:nv + ng]
        self.rule_hits = cells[nv + ng:]

    @staticmethod
    def size_for(max_rules: int = DEFAULT_MAX_RULES) -> int:
        return 8 * (2 * len(REASONS) + len(GAUGES) + max_rules + 1)

    def add(self, verdict: int, reason: str, count: int) -> None:
        if count:
            self.verdicts[verdict, REASON[reason]] += count

    def add_rule_hits(self, rule_ids: np.ndarray) -> None:
        """Count one hit per entry of ``rule_ids`` (negative ids are ignored)."""
        ids = rule_ids[rule_ids >= 0]
        if len(ids):
            ids = np.minimum(ids, self.max_rules)
            np.add.at(self.rule_hits, ids, 1)

    def total(self) -> int:
        return int(self.verdicts.sum())

    def snapshot(self, rules: list | None = None, top: int = 100) -> dict:
        """JSON-able view for ``/v1/stats``: non-zero verdict counters, gauges, rule hits."""
        out = {
            "verdicts": {VERDICT_NAMES[v]: {REASONS[r]: int(c) for r, c in enumerate(row) if c}
                         for v, row in enumerate(self.verdicts)},
            **{name: int(self.gauges[i]) for name, i in GAUGE.items()},
        }
        hits = np.nonzero(self.rule_hits)[0]
        hits = hits[np.argsort(self.rule_hits[hits])[::-1]][:top]
        out["rule_hits"] = [
            {"rule": int(i), "hits": int(self.rule_hits[i]),
             **({"name": rules[i]} if rules and i < len(rules) else {})}
            for i in hits if i < self.max_rules]
        return out
