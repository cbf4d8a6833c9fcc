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
#: reasons too (frames dropped as malformed), under their parser names.  The
#: first ``N_PIPELINE_REASONS`` are csrc/mcnp_pipeline.h's MCNP_R_* codes.
REASONS = (
    "established",     # pass: a cached flow that raced its own installation
    "reply",           # pass: the same, reply direction
    "allowed",         # pass: judged and admitted by the tables (a new flow)
    "rechecked",       # pass: a flow of an older revision, admitted again
    "no_tables",       # drop: IP before the first tables were published (fail closed)
    "pod_not_ready",   # drop: the pod's addresses are not in the tables yet (fail closed)
    "spoofed",         # drop: the source IP is not the pod's own
    "denied_egress",   # drop: the source pod's egress policy denies it
    "denied_ingress",  # drop: the destination pod's ingress policy denies it
    "non_ip",          # drop: a non-IP frame the hooks did not decide (malformed ARP/ND)
    "no_peer",         # drop: the other end of the pod's veth has no socket
    "unknown_port",    # drop: a frame from a socket the loop does not know
    "cache_error",     # drop: the flow cache refused the admitted flow (not sent: it would loop)
    "would_deny",      # pass: a new flow enforcement admits and the audit tables deny (audit mode)
    "oversize",        # drop: a first packet userspace cannot take whole (over the MTU, or no
                       # multi-buffer sockets): its flow judged from its headers, itself not delivered
) + tuple(name for code, name in sorted(parse.STATUS_NAMES.items())
          if code >= parse.MALFORMED_MIN)
REASON = {name: i for i, name in enumerate(REASONS)}
N_PIPELINE_REASONS = REASON["oversize"] + 1
#: reason index of each parser status (malformed ones only; others -1)
STATUS_REASON = np.full(256, -1, dtype=np.int16)
for _code, _name in parse.STATUS_NAMES.items():
    if _code >= parse.MALFORMED_MIN:
        STATUS_REASON[_code] = REASON[_name]
STATUS_REASON[parse.MALFORMED_MIN:][STATUS_REASON[parse.MALFORMED_MIN:] < 0] = REASON["truncated"]

GAUGES = ("batches", "frames", "revision", "flows", "rechecks", "flows_cut",
          "rx_empty_polls", "heartbeat_ns", "judged", "cache_errors", "pods",
          "recheck_ns", "expired", "flow_classes")
GAUGE = {name: i for i, name in enumerate(GAUGES)}

#: Judged rows kept for observers (a ring; a power of two).
LOG_SIZE = 4096
VERDICT_LOG = np.dtype([("seq", "<u8"), ("time_ns", "<u8"), ("zone", "<u8"), ("src", "u1", 16),
                        ("dst", "u1", 16), ("sport", "<u2"), ("dport", "<u2"), ("proto", "u1"),
                        ("role", "u1"), ("allowed", "u1"), ("reason", "u1"),
                        ("rule_egress", "<i4"), ("rule_ingress", "<i4"), ("revision", "<u4"),
                        ("pad", "<u4")])


class Counters:
    """The loop's counters and verdict log, over a private buffer or a shared one.

    ``size_for()`` says how many bytes a buffer needs.  The layout is:
    verdicts int64[2, len(REASONS)], gauges int64[len(GAUGES)], the log's next
    sequence number, then the verdict log (``LOG_SIZE`` rows of
    ``VERDICT_LOG``).  Rule hits live beside the tables they count
    (:mod:`fastpath.shm`), so they always name the rule of their revision.
    """

    def __init__(self, buffer=None):
        nv, ng = 2 * len(REASONS), len(GAUGES)
        cells_n = nv + ng + 1
        if buffer is None:
            buffer = bytearray(self.size_for())
        cells = np.frombuffer(buffer, dtype=np.int64, count=cells_n)
        self.cells = cells
        self.verdicts = cells[:nv].reshape(2, len(REASONS))
        self.verdict_cells = cells[:nv]  # flat view: pass reasons, then drop reasons
        self.gauges = cells[nv:nv + ng]
        self.log_seq = np.frombuffer(buffer, dtype=np.uint64, count=1, offset=8 * (nv + ng))
        self.log = np.frombuffer(buffer, dtype=VERDICT_LOG, count=LOG_SIZE, offset=8 * cells_n)

    @staticmethod
    def size_for() -> int:
        return 8 * (2 * len(REASONS) + len(GAUGES) + 1) + VERDICT_LOG.itemsize * LOG_SIZE

    def add(self, verdict: int, reason: str, count: int) -> None:
        if count:
            self.verdicts[verdict, REASON[reason]] += count

    def total(self) -> int:
        return int(self.verdicts.sum())

    def recent(self, after_seq: int, limit: int) -> np.ndarray:
        """Log rows with seq > after_seq (at most ``limit``, oldest first) still in the ring."""
        end = int(self.log_seq[0])
        start = max(after_seq + 1, end - LOG_SIZE + 1, 0)
        start = max(start, end - limit)
        if start >= end:
            return self.log[:0].copy()
        idx = np.arange(start, end) & (LOG_SIZE - 1)
        rows = self.log[idx].copy()
        return rows[rows["seq"] == np.arange(start, end)]  # skip rows overwritten meanwhile

    def snapshot(self) -> dict:
        """JSON-able view for ``/v1/stats``: non-zero verdict counters and gauges."""
        return {
            "verdicts": {VERDICT_NAMES[v]: {REASONS[r]: int(c) for r, c in enumerate(row) if c}
                         for v, row in enumerate(self.verdicts)},
            **{name: int(self.gauges[i]) for name, i in GAUGE.items()},
        }
