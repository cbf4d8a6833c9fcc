"""Connection tracking (rule S6): replies of an allowed connection are allowed.

A thin layer over the C table in ``csrc/conntrack.c`` (``fastpath._ct``).  The
packet loop's C pipeline (``csrc/pipeline.c``) looks up and commits flows
frame by frame inside its two calls per batch; :meth:`ConnTrack.lookup` and
:meth:`ConnTrack.commit` do the same for a whole parsed batch from Python
(one FFI crossing each), for tests and tools.

When the policy tables change revision, :meth:`ConnTrack.recheck` re-judges
the original direction of every tracked flow against the new tables in one
vectorised pass and removes the flows the new revision no longer admits, so a
policy change cuts established connections instead of letting them live on
until they time out.

Time is injected (``clock`` returns nanoseconds) so tests can age flows
without sleeping.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Callable

import numpy as np

from fastpath._ct import ffi, lib

NEW = lib.MCNP_CT_NEW
ORIG = lib.MCNP_CT_ORIG
REPLY = lib.MCNP_CT_REPLY
UNTRACKED = lib.MCNP_CT_UNTRACKED
SKIPPED = lib.MCNP_CT_SKIPPED

#: flow state code -> name (also the keys of ``timeouts``)
STATE_NAMES = {
    lib.MCNP_CTS_TCP_OPENING: "tcp_opening",
    lib.MCNP_CTS_TCP_ESTABLISHED: "tcp_established",
    lib.MCNP_CTS_TCP_CLOSING: "tcp_closing",
    lib.MCNP_CTS_TCP_CLOSED: "tcp_closed",
    lib.MCNP_CTS_UDP: "udp",
    lib.MCNP_CTS_ICMP: "icmp",
    lib.MCNP_CTS_SCTP_OPENING: "sctp_opening",
    lib.MCNP_CTS_SCTP_ESTABLISHED: "sctp_established",
    lib.MCNP_CTS_SCTP_CLOSING: "sctp_closing",
    lib.MCNP_CTS_SCTP_CLOSED: "sctp_closed",
}
_STATE_CODES = {name: code for code, name in STATE_NAMES.items()}

PROTO_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6"}
SCTP = 132

# (field, dtype, per-flow shape) in the order of struct mcnp_ct_flows
_FLOW_FIELDS = (
    ("slot", np.uint32, ()), ("src", np.uint8, (16,)), ("dst", np.uint8, (16,)),
    ("sport", np.uint16, ()), ("dport", np.uint16, ()), ("proto", np.uint8, ()),
    ("state", np.uint8, ()), ("revision", np.uint32, ()), ("rule_egress", np.int32, ()),
    ("rule_ingress", np.int32, ()), ("created_ns", np.uint64, ()), ("last_ns", np.uint64, ()),
    ("packets_orig", np.uint64, ()), ("packets_reply", np.uint64, ()),
    ("bytes_orig", np.uint64, ()), ("bytes_reply", np.uint64, ()),
)
_CTYPES = {np.uint8: "uint8_t *", np.uint16: "uint16_t *", np.uint32: "uint32_t *",
           np.int32: "int32_t *", np.uint64: "uint64_t *"}


def _ptr(ctype: str, arr: np.ndarray):
    return ffi.cast(ctype, arr.ctypes.data)


def ip_text(addr16: np.ndarray) -> str:
    """16 network-order bytes (IPv4 as ``::ffff:a.b.c.d``) as an address string."""
    ip = ipaddress.IPv6Address(bytes(addr16))
    return str(ip.ipv4_mapped or ip)


class FlowColumns:
    """Flows exported from the table as column arrays (original direction)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.n = 0
        self._c = ffi.new("struct mcnp_ct_flows *")
        self._c.capacity = capacity
        for name, dtype, shape in _FLOW_FIELDS:
            arr = np.zeros((capacity, *shape), dtype=dtype)
            setattr(self, name, arr)
            setattr(self._c, name, _ptr(_CTYPES[dtype], arr))


class ConnTrack:
    """A bounded flow table.

    ``capacity`` is rounded up to a power of two.  ``timeouts`` maps state
    names (:data:`STATE_NAMES` values) to seconds, overriding the defaults
    (TCP opening 30 s, established 3600 s, closing 120 s, closed 10 s; UDP
    60 s; ICMP echo 30 s; SCTP opening 30 s, established 3600 s, closing
    30 s, closed 10 s).
    """

    def __init__(self, capacity: int = 65536, timeouts: dict[str, float] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns, batch: int = 256):
        self._ct = ffi.gc(lib.mcnp_ct_new(capacity), lib.mcnp_ct_free)
        if self._ct == ffi.NULL:
            raise MemoryError(f"cannot allocate a flow table of {capacity} entries")
        self.clock = clock
        for name, seconds in (timeouts or {}).items():
            if name not in _STATE_CODES:
                raise ValueError(f"unknown conntrack state {name!r} in timeouts")
            lib.mcnp_ct_set_timeout(self._ct, _STATE_CODES[name], int(seconds * 1e9))
        self._stats = ffi.new("struct mcnp_ct_stats *")
        self.capacity = self.stats()["capacity"]
        self._result = np.zeros(batch, dtype=np.uint8)
        self._aux = np.zeros(batch, dtype=np.uint8)
        self._dump: FlowColumns | None = None
        self._sweep_at = 0
        self._cols_of: tuple | None = None  # (parsed batch, its column pointers)

    # -- per batch ---------------------------------------------------------

    def _ensure(self, n: int) -> None:
        if n > len(self._result):
            self._result = np.zeros(n, dtype=np.uint8)
            self._aux = np.zeros(n, dtype=np.uint8)

    def _cols(self, parsed) -> tuple:
        """cffi pointers to a parsed batch's columns, made once per batch object
        (``ndarray.ctypes`` is slow, and the packet loop reuses one batch)."""
        if self._cols_of is None or self._cols_of[0] is not parsed:
            self._cols_of = (parsed, (
                _ptr("uint8_t *", parsed.src), _ptr("uint8_t *", parsed.dst),
                _ptr("uint8_t *", parsed.proto), _ptr("uint16_t *", parsed.sport),
                _ptr("uint16_t *", parsed.dport)))
        return self._cols_of[1]

    def aux(self, parsed, n: int, buf=None, addrs: np.ndarray | None = None) -> np.ndarray:
        """The per-frame state input of the C table: TCP flags, ICMP type, SCTP chunk.

        The parser leaves ``tcp_flags`` zero for non-TCP and ``icmp_type`` zero
        for non-ICMP frames, so one OR gives both.  The first SCTP chunk type
        is read from the frame itself (only when the batch has SCTP).
        """
        self._ensure(n)
        aux = self._aux[:n]
        np.bitwise_or(parsed.tcp_flags[:n], parsed.icmp_type[:n], out=aux)
        if buf is not None and addrs is not None:
            sctp = (parsed.proto[:n] == SCTP) & (parsed.status[:n] == 0) & (parsed.frag[:n] == 0)
            sctp &= parsed.l4_len[:n] >= 16
            if sctp.any():
                where = addrs[:n][sctp] + parsed.l4_off[:n][sctp].astype(np.uint64) + 12
                aux[sctp] = np.frombuffer(buf, dtype=np.uint8)[where.astype(np.intp)]
        return aux

    def lookup(self, parsed, n: int, mask: np.ndarray | None, aux: np.ndarray,
               lens: np.ndarray | None = None, now: int | None = None) -> tuple[np.ndarray, int]:
        """Classify frames ``[0, n)`` of a parsed batch; returns (result view, new count).

        ``mask`` (uint8/bool, or None for all) selects the frames to track;
        the others get ``SKIPPED``.  The result view is reused by the next call.
        """
        self._ensure(n)
        now = self.clock() if now is None else now
        res = self._result[:n]
        cmask = ffi.NULL if mask is None else ffi.from_buffer("uint8_t[]", _u8(mask))
        fresh = lib.mcnp_ct_lookup(
            self._ct, n, cmask, *self._cols(parsed), ffi.from_buffer("uint8_t[]", aux),
            ffi.NULL if lens is None else ffi.from_buffer("uint32_t[]", lens),
            now, ffi.from_buffer("uint8_t[]", res))
        return res, fresh

    def commit(self, parsed, n: int, commit: np.ndarray, aux: np.ndarray, revision: int,
               rule_egress: np.ndarray | None = None, rule_ingress: np.ndarray | None = None,
               lens: np.ndarray | None = None, now: int | None = None) -> int:
        """Record flows for the frames selected by ``commit``; returns flows created.

        ``rule_egress``/``rule_ingress`` (int32, per frame) are the rule ids
        of the judgement that admitted each flow, kept for ``/v1/flows``.
        """
        now = self.clock() if now is None else now
        return lib.mcnp_ct_commit(
            self._ct, n, ffi.from_buffer("uint8_t[]", _u8(commit)),
            *self._cols(parsed), ffi.from_buffer("uint8_t[]", aux),
            ffi.NULL if lens is None else ffi.from_buffer("uint32_t[]", lens),
            ffi.NULL if rule_egress is None else ffi.from_buffer("int32_t[]", _i32(rule_egress)),
            ffi.NULL if rule_ingress is None else ffi.from_buffer("int32_t[]", _i32(rule_ingress)),
            revision & 0xFFFFFFFF, now)

    def sweep(self, slots: int = 4096, now: int | None = None) -> int:
        """Free expired entries in the next ``slots`` slots (round robin); cheap, call often."""
        now = self.clock() if now is None else now
        freed = lib.mcnp_ct_sweep(self._ct, self._sweep_at, slots, now)
        self._sweep_at = (self._sweep_at + slots) % self.capacity
        return freed

    # -- policy changes ------------------------------------------------------

    def export(self, now: int | None = None) -> FlowColumns:
        """Every live flow as column arrays (reused by the next call)."""
        if self._dump is None:
            self._dump = FlowColumns(self.capacity)
        now = self.clock() if now is None else now
        self._dump.n = lib.mcnp_ct_dump(self._ct, now, self._dump._c)
        return self._dump

    def recheck(self, tables, judge: Callable, now: int | None = None) -> int:
        """Re-judge every flow's original direction against ``tables``; cut the denied.

        Flows still allowed are stamped with the new revision (and keep their
        original rule ids).  Returns the number of flows removed.
        """
        cols = self.export(now)
        n = cols.n
        killed = 0
        if n:
            j = judge(tables, cols.src[:n], cols.dst[:n], cols.proto[:n], cols.dport[:n])
            deny = ~np.asarray(j.allowed[:n], dtype=bool)
            if deny.any():
                slots = np.ascontiguousarray(cols.slot[:n][deny])
                killed = lib.mcnp_ct_kill(self._ct, ffi.from_buffer("uint32_t[]", slots),
                                          len(slots))
        lib.mcnp_ct_set_revision(self._ct, tables.revision & 0xFFFFFFFF)
        return killed

    def clear(self) -> None:
        lib.mcnp_ct_clear(self._ct)

    # -- introspection -------------------------------------------------------

    def stats(self) -> dict[str, int]:
        lib.mcnp_ct_get_stats(self._ct, self._stats)
        s = self._stats
        return {name: int(getattr(s, name)) for name in (
            "lookups", "hits", "created", "refreshed", "expired", "evicted", "killed",
            "reopened", "capacity")}

    def count(self, now: int | None = None) -> int:
        """Live flows (a full scan of the table)."""
        return lib.mcnp_ct_count(self._ct, self.clock() if now is None else now)

    def flows(self, limit: int = 1000, now: int | None = None) -> list[dict]:
        """Live flows as JSON-able dicts for ``/v1/flows``, most recently seen first."""
        now = self.clock() if now is None else now
        cols = self.export(now)
        n = cols.n
        order = np.argsort(cols.last_ns[:n])[::-1][:max(limit, 0)]
        out = []
        for i in order:
            out.append({
                "src": ip_text(cols.src[i]), "dst": ip_text(cols.dst[i]),
                "sport": int(cols.sport[i]), "dport": int(cols.dport[i]),
                "protocol": PROTO_NAMES.get(int(cols.proto[i]), str(int(cols.proto[i]))),
                "state": STATE_NAMES.get(int(cols.state[i]), "unknown"),
                "revision": int(cols.revision[i]),
                "rule_egress": int(cols.rule_egress[i]), "rule_ingress": int(cols.rule_ingress[i]),
                "age_s": round((now - int(cols.created_ns[i])) / 1e9, 3),
                "idle_s": round((now - int(cols.last_ns[i])) / 1e9, 3),
                "packets": [int(cols.packets_orig[i]), int(cols.packets_reply[i])],
                "bytes": [int(cols.bytes_orig[i]), int(cols.bytes_reply[i])],
            })
        return out


def _u8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8 and a.flags.c_contiguous:
        return a
    if a.dtype == np.bool_ and a.flags.c_contiguous:
        return a.view(np.uint8)
    return np.ascontiguousarray(a, dtype=np.uint8)


def _i32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.int32)
