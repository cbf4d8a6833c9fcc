"""Judging whole batches of packets against one ``PolicyTables`` revision.

A batch is judged with a fixed number of vectorised steps whatever its size or the
number of policies (``fastpath.tables`` describes the arrays):

1. each address → its slot: exact match among the addresses one pod owns, else the
   ipBlock interval it falls in;
2. (protocol, destination port) → its port atom;
3. per direction, ``ports[cell[class[subject], atom[other]], patom]``.

The C kernel (``fastpath._match``, built from ``csrc/match.c``) does the same over the
same arrays in one FFI call per batch; the numpy path is the fallback when the
extension is not built and the second opinion the tests compare it with.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from .tables import DENIED, NOT_ENFORCED, PolicyTables

logger = logging.getLogger(__name__)

__all__ = ["Judgement", "judge", "judge_c", "judge_numpy", "check_tables", "TablesError", "NOT_ENFORCED", "DENIED", "HAVE_C"]

try:  # the compiled kernel; absent in a tree that was not built
    from ._match import ffi as _ffi, lib as _lib

    HAVE_C = True
except ImportError:  # pragma: no cover - depends on the build
    _ffi = _lib = None
    HAVE_C = False


class Judgement:
    """Per packet: ``allowed`` (bool[n]); per side (``egress``, ``ingress``, int32[n])
    the admitting rule id, ``DENIED`` (-1) or ``NOT_ENFORCED`` (-2: not judged here, or
    the endpoint is not isolated). A plain slotted class: one is made per batch."""

    __slots__ = ("allowed", "egress", "ingress")

    def __init__(self, allowed: np.ndarray, egress: np.ndarray, ingress: np.ndarray):
        self.allowed, self.egress, self.ingress = allowed, egress, ingress

    def __repr__(self) -> str:
        return f"Judgement(allowed={self.allowed!r}, egress={self.egress!r}, ingress={self.ingress!r})"


def _slots(t: PolicyTables, addrs: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(addrs, dtype=np.uint8).view("S16").ravel()
    keys = t.arrays["ip_keys"]
    interval = np.searchsorted(t.arrays["net_bounds"].view("S16").ravel(), q, side="right") - 1
    if len(keys) == 0:
        return interval
    sorted_keys = keys.view("S16").ravel()
    pos = np.searchsorted(sorted_keys, q)
    np.minimum(pos, len(keys) - 1, out=pos)
    hit = sorted_keys[pos] == q
    return np.where(hit, t.arrays["ip_slot"][pos], interval)


def judge_numpy(t: PolicyTables, src: np.ndarray, dst: np.ndarray, proto: np.ndarray, dport: np.ndarray) -> Judgement:
    """The numpy implementation of :func:`judge`."""
    src, dst, proto, dport = _batch(src, dst, proto, dport)
    a = t.arrays
    s, d = _slots(t, src), _slots(t, dst)
    pidx = a["proto_index"][np.asarray(proto, dtype=np.uint8)].astype(np.int32)
    key = (pidx << 16) | np.where(pidx == 3, 0, np.asarray(dport, dtype=np.int32))
    patom = np.searchsorted(a["port_bounds"], key, side="right") - 1
    eg = a["eg_ports"][a["eg_cell"][a["eg_class"][s], a["eg_atom"][d]], patom]
    ing = a["in_ports"][a["in_cell"][a["in_class"][d], a["in_atom"][s]], patom]
    return Judgement((eg != DENIED) & (ing != DENIED), eg, ing)


class TablesError(ValueError):
    """Tables whose indices point outside their own arrays (a corrupt hand-over)."""


def check_tables(t: PolicyTables) -> None:
    """Every index the kernel follows stays inside the array it indexes. Done once per
    revision, so the C loop can trust the tables."""
    a = t.arrays
    slots = len(a["eg_class"])
    patoms = len(a["port_bounds"])

    def within(name: str, arr: np.ndarray, limit: int) -> None:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
            raise TablesError(f"tables revision {t.revision}: {name} out of range 0..{limit - 1}")

    if a["ip_keys"].shape != (len(a["ip_slot"]), 16) or a["net_bounds"].ndim != 2 or len(a["net_bounds"]) == 0:
        raise TablesError(f"tables revision {t.revision}: malformed address arrays")
    if a["net_bounds"][0].any():  # the interval lookup finds every address at or after bound 0
        raise TablesError(f"tables revision {t.revision}: net_bounds does not start at the zero address")
    if patoms == 0 or a["port_bounds"][0] != 0 or a["proto_index"].shape != (256,):
        raise TablesError(f"tables revision {t.revision}: malformed port arrays")
    if len(a["net_bounds"]) > slots or any(len(a[k]) != slots for k in ("eg_atom", "in_class", "in_atom")):
        raise TablesError(f"tables revision {t.revision}: slot arrays disagree")
    within("ip_slot", a["ip_slot"], slots)
    cap = len(a["ip_hash_slot"])
    if cap < 2 or cap & (cap - 1) or a["ip_hash_keys"].shape != (cap, 16) or not (a["ip_hash_slot"] < 0).any():
        raise TablesError(f"tables revision {t.revision}: malformed address hash")
    within("ip_hash_slot", a["ip_hash_slot"][a["ip_hash_slot"] >= 0], slots)
    within("proto_index", a["proto_index"], 4)
    for d in ("eg", "in"):
        cell, ports = a[f"{d}_cell"], a[f"{d}_ports"]
        if cell.ndim != 2 or ports.ndim != 2 or ports.shape[1] != patoms or cell.shape[0] == 0:
            raise TablesError(f"tables revision {t.revision}: malformed {d} tables")
        within(f"{d}_class", a[f"{d}_class"], cell.shape[0])
        within(f"{d}_atom", a[f"{d}_atom"], cell.shape[1])
        within(f"{d}_cell", cell, ports.shape[0])


class _Prepared:
    """The C view of one tables revision (keeps the arrays it points into alive)."""

    def __init__(self, t: PolicyTables):
        check_tables(t)
        a = t.arrays
        self.keep = [np.ascontiguousarray(a[k]) for k in a]
        arr = dict(zip(a, self.keep))
        s = self.struct = _ffi.new("struct mcnp_match_tables *")

        def ptr(name: str, ctype: str):
            return _ffi.cast(ctype, _ffi.from_buffer(arr[name], require_writable=False))

        self.ptrs = [
            ptr("ip_keys", "uint8_t *"), ptr("ip_slot", "int32_t *"),
            ptr("ip_hash_keys", "uint8_t *"), ptr("ip_hash_slot", "int32_t *"), ptr("net_bounds", "uint8_t *"),
            ptr("port_bounds", "int32_t *"), ptr("proto_index", "int8_t *"),
            ptr("eg_class", "int32_t *"), ptr("eg_atom", "int32_t *"), ptr("eg_cell", "int32_t *"), ptr("eg_ports", "int32_t *"),
            ptr("in_class", "int32_t *"), ptr("in_atom", "int32_t *"), ptr("in_cell", "int32_t *"), ptr("in_ports", "int32_t *"),
        ]
        (s.ip_keys, s.ip_slot, s.hash_keys, s.hash_slot, s.net_bounds, s.port_bounds, s.proto_index,
         s.eg_class, s.eg_atom, s.eg_cell, s.eg_ports, s.in_class, s.in_atom, s.in_cell, s.in_ports) = self.ptrs
        s.n_ip, s.n_net, s.n_port = len(arr["ip_slot"]), len(arr["net_bounds"]), len(arr["port_bounds"])
        s.hash_bits = len(arr["ip_hash_slot"]).bit_length() - 1
        s.eg_atoms, s.in_atoms = arr["eg_cell"].shape[1], arr["in_cell"].shape[1]
        s.patoms = len(arr["port_bounds"])


_prepared: "weakref.WeakKeyDictionary[PolicyTables, _Prepared]" = weakref.WeakKeyDictionary()


def _batch(src, dst, proto, dport):
    src = np.ascontiguousarray(src, dtype=np.uint8)
    dst = np.ascontiguousarray(dst, dtype=np.uint8)
    proto = np.ascontiguousarray(proto, dtype=np.uint8)
    dport = np.ascontiguousarray(dport, dtype=np.uint16)
    n = len(proto)
    if src.shape != (n, 16) or dst.shape != (n, 16) or dport.shape != (n,):
        raise ValueError(f"judge: batch shapes disagree: src {src.shape}, dst {dst.shape}, proto {proto.shape}, dport {dport.shape}")
    return src, dst, proto, dport


def judge_c(t: PolicyTables, src: np.ndarray, dst: np.ndarray, proto: np.ndarray, dport: np.ndarray) -> Judgement:
    """The C implementation of :func:`judge`: one FFI call for the batch."""
    prep = _prepared.get(t)
    if prep is None:
        prep = _prepared[t] = _Prepared(t)
    src, dst, proto, dport = _batch(src, dst, proto, dport)
    n = len(proto)
    out = np.empty(9 * n, dtype=np.uint8)  # one allocation: egress, ingress, allowed
    if n:
        fb = _ffi.from_buffer
        res = fb("int32_t[]", out)
        _lib.mcnp_judge(prep.struct, n, fb(src), fb(dst), fb(proto), fb("uint16_t[]", dport),
                        fb(out[8 * n:]), res, res + n)
    return Judgement(out[8 * n:].view(np.bool_), out[: 4 * n].view(np.int32), out[4 * n: 8 * n].view(np.int32))


def judge(t: PolicyTables, src: np.ndarray, dst: np.ndarray, proto: np.ndarray, dport: np.ndarray) -> Judgement:
    """Judge a batch: ``src``/``dst`` ``uint8[n, 16]``, ``proto`` ``uint8[n]``,
    ``dport`` ``uint16[n]``. Egress is judged when the source is a local endpoint,
    ingress when the destination is (docs/seams.md). Uses the C kernel when built."""
    if HAVE_C:
        return judge_c(t, src, dst, proto, dport)
    return judge_numpy(t, src, dst, proto, dport)
