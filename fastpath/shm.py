"""Shared memory between the control process and the packet-loop worker.

Two things cross the process boundary without pickling arrays:

* **Policy tables.**  Every :meth:`TablesPublisher.publish` writes a whole new
  segment named ``<prefix>-t<generation>`` (JSON header with the tables'
  layout and what the loop needs besides — the pods' addresses, the Service
  addresses —, the packed arrays, room for the rule hits of this revision and,
  while some policy is in audit mode, the packed audit tables) and only *then*
  stores the generation number in the control block.  The worker polls that
  one integer between batches; when it changes, it maps the named segment,
  which is complete by construction, and swaps it in.  A segment is never
  written after its generation is announced, so the loop can never see a
  half-written table, and it never waits for the publisher.  Old segments
  are unlinked once the worker reports a newer generation in force.
* **Counters** (:class:`fastpath.counters.Counters`) live in a segment
  ``<prefix>-c`` that the worker writes and the control process reads.
* **Rule hits** live in the segment of the tables they count: rule ids are
  numbers of one revision, so hits are folded into totals keyed by what the
  rule *is* (policy, direction, rule, peer, port) when their segment goes, and
  a policy's counters follow it across any number of compiles.

The control block (``<prefix>-ctl``, int64 cells, see ``CTL_*``) also carries
the worker's readiness and its pid.

The control process creates every segment with
``multiprocessing.shared_memory`` (so they are cleaned up even if it dies);
the worker maps them with plain ``mmap`` of ``/dev/shm/<name>``, which keeps
Python's resource tracker from unlinking the control process's segments when
the worker exits.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
from multiprocessing import shared_memory

import numpy as np

CTL_PUBLISHED, CTL_IN_FORCE, CTL_READY, CTL_PID = range(4)
CTL_CELLS = 16
_HEAD = struct.Struct("<QQ")  # header length, data length
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _named_hits(rules: list, hits: np.ndarray):
    for i in np.nonzero(hits[:len(rules)])[0]:
        yield json.dumps(rules[i], sort_keys=True), int(hits[i])


def new_prefix() -> str:
    """A segment name prefix unique to one Dataplane."""
    return f"mcnp-{os.getpid()}-{secrets.token_hex(4)}"


def attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write without registering it anywhere."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class TablesPublisher:
    """Control-process side: creates the control block and counters, publishes tables."""

    def __init__(self, prefix: str, counters_size: int):
        self.prefix = prefix
        self.ctl_shm = shared_memory.SharedMemory(f"{prefix}-ctl", create=True, size=8 * CTL_CELLS)
        self.ctl = np.ndarray(CTL_CELLS, dtype=np.int64, buffer=self.ctl_shm.buf)
        self.ctl[:] = 0
        self.counters_shm = shared_memory.SharedMemory(f"{prefix}-c", create=True,
                                                       size=max(counters_size, 8))
        np.ndarray(counters_size // 8, dtype=np.int64, buffer=self.counters_shm.buf)[:] = 0
        self._segments: dict[int, tuple[shared_memory.SharedMemory, list, np.ndarray]] = {}
        #: hits of reclaimed revisions, by the rule's identity (JSON of its name)
        self.folded: dict[str, int] = {}
        self.generation = 0

    def publish(self, tables, extra: dict, audit_tables=None) -> int:
        """Write a new generation and announce it; returns its number.
        ``audit_tables`` (audit mode: what full enforcement would do) travel in the
        same segment, after the rule hits, so both are swapped in at once."""
        header, data = tables.pack()
        n_hits = len(tables.rules) + 1
        body = {"tables": header, "extra": extra, "hits": n_hits}
        if audit_tables is not None:
            audit_header, audit_data = audit_tables.pack()
            body["audit"] = {"tables": audit_header, "length": len(audit_data)}
        head = json.dumps(body).encode()
        start = _aligned(_HEAD.size + len(head))
        hits_at = _aligned(start + len(data))
        audit_at = _aligned(hits_at + 8 * n_hits)
        size = audit_at + (len(audit_data) if audit_tables is not None else 0)
        gen = self.generation + 1
        seg = shared_memory.SharedMemory(f"{self.prefix}-t{gen}", create=True, size=size)
        _HEAD.pack_into(seg.buf, 0, len(head), len(data))
        seg.buf[_HEAD.size:_HEAD.size + len(head)] = head
        seg.buf[start:start + len(data)] = data
        if audit_tables is not None:
            seg.buf[audit_at:audit_at + len(audit_data)] = audit_data
        hits = np.ndarray(n_hits, dtype=np.int64, buffer=seg.buf, offset=hits_at)
        hits[:] = 0
        self._segments[gen] = (seg, list(tables.rules), hits)
        self.generation = gen
        self.ctl[CTL_PUBLISHED] = gen  # announce only once the segment is complete
        self.reclaim()
        return gen

    def reclaim(self) -> None:
        """Unlink segments older than the generation the worker has in force, folding
        their rule hits into the totals first."""
        in_force = int(self.ctl[CTL_IN_FORCE])
        for gen in [g for g in self._segments if g < in_force]:
            seg, rules, hits = self._segments.pop(gen)
            for name, count in _named_hits(rules, hits):
                self.folded[name] = self.folded.get(name, 0) + count
            del hits
            seg.close()
            seg.unlink()

    def rule_hits(self) -> list[dict]:
        """Admitted flows per rule, across every revision so far, by what the rule is."""
        totals = dict(self.folded)
        for _, rules, hits in self._segments.values():
            for name, count in _named_hits(rules, hits):
                totals[name] = totals.get(name, 0) + count
        return [{"name": json.loads(name), "hits": count}
                for name, count in sorted(totals.items(), key=lambda kv: -kv[1]) if count]

    def close(self) -> None:
        for seg, _, hits in self._segments.values():
            del hits
            seg.close()
            seg.unlink()
        self._segments.clear()
        del self.ctl
        for shm in (self.ctl_shm, self.counters_shm):
            shm.close()
            shm.unlink()


class TablesReader:
    """Worker side: notices a new generation and maps it (between batches)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._ctl_map = attach(f"{prefix}-ctl")
        self.ctl = np.ndarray(CTL_CELLS, dtype=np.int64, buffer=self._ctl_map)
        self.counters_map = attach(f"{prefix}-c")
        self.generation = 0
        self._maps: list[mmap.mmap] = []
        #: The audit tables of the generation last taken, ``(header, data)`` as
        #: ``PolicyTables.unpack`` takes them; None when no policy is in audit.
        self.audit = None

    def changed(self) -> bool:
        """One integer read: is a newer generation published?"""
        return self.ctl[CTL_PUBLISHED] != self.generation

    def take(self):
        """Map the newest generation; returns ``(generation, tables_header, data, extra,
        hits)``.

        ``data`` is a memoryview of the mapped segment; the caller builds the
        tables from it (``PolicyTables.unpack``) and keeps it alive while in use;
        ``hits`` is the revision's rule-hit array (int64, one per rule + 1).
        """
        gen = int(self.ctl[CTL_PUBLISHED])
        m = attach(f"{self.prefix}-t{gen}")
        head_len, data_len = _HEAD.unpack_from(m, 0)
        head = json.loads(bytes(m[_HEAD.size:_HEAD.size + head_len]))
        start = _aligned(_HEAD.size + head_len)
        data = memoryview(m)[start:start + data_len]
        hits_at = _aligned(start + data_len)
        n_hits = int(head["hits"])
        hits = np.ndarray(n_hits, dtype=np.int64, buffer=m, offset=hits_at)
        self.audit = None
        audit = head.get("audit")
        if audit is not None:
            audit_at = _aligned(hits_at + 8 * n_hits)
            self.audit = (audit["tables"], memoryview(m)[audit_at:audit_at + audit["length"]])
        self._maps.append(m)
        self.generation = gen
        return gen, head["tables"], data, head["extra"], hits

    def in_force(self, gen: int) -> None:
        """Report the generation now used, and release mappings of older ones."""
        self.ctl[CTL_IN_FORCE] = gen
        keep = []
        for m in self._maps[:-1]:
            try:
                m.close()
            except BufferError:  # arrays of an old table still referenced: later
                keep.append(m)
        self._maps = keep + self._maps[-1:]
