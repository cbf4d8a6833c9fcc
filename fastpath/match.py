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
from dataclasses import dataclass

import numpy as np

from .tables import DENIED, NOT_ENFORCED, PolicyTables

logger = logging.getLogger(__name__)

__all__ = ["Judgement", "judge", "judge_numpy", "NOT_ENFORCED", "DENIED", "HAVE_C"]

try:  # the compiled kernel; absent in a tree that was not built
    from ._match import ffi as _ffi, lib as _lib

    HAVE_C = True
except ImportError:  # pragma: no cover - depends on the build
    _ffi = _lib = None
    HAVE_C = False


@dataclass(frozen=True)
class Judgement:
    """Per packet: ``allowed``; per side the admitting rule id, ``DENIED`` (-1) or
    ``NOT_ENFORCED`` (-2: not judged here, or the endpoint is not isolated)."""

    allowed: np.ndarray  # bool[n]
    egress: np.ndarray  # int32[n]
    ingress: np.ndarray  # int32[n]


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
    a = t.arrays
    s, d = _slots(t, src), _slots(t, dst)
    pidx = a["proto_index"][np.asarray(proto, dtype=np.uint8)].astype(np.int32)
    key = (pidx << 16) | np.where(pidx == 3, 0, np.asarray(dport, dtype=np.int32))
    patom = np.searchsorted(a["port_bounds"], key, side="right") - 1
    eg = a["eg_ports"][a["eg_cell"][a["eg_class"][s], a["eg_atom"][d]], patom]
    ing = a["in_ports"][a["in_cell"][a["in_class"][d], a["in_atom"][s]], patom]
    return Judgement((eg != DENIED) & (ing != DENIED), eg, ing)


def judge(t: PolicyTables, src: np.ndarray, dst: np.ndarray, proto: np.ndarray, dport: np.ndarray) -> Judgement:
    """Judge a batch: ``src``/``dst`` ``uint8[n, 16]``, ``proto`` ``uint8[n]``,
    ``dport`` ``uint16[n]``. Egress is judged when the source is a local endpoint,
    ingress when the destination is (docs/seams.md)."""
    return judge_numpy(t, src, dst, proto, dport)
