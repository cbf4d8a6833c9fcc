"""The compiled policy tables: the one value the control plane hands the packet path.

A :class:`PolicyTables` is immutable and revisioned. It is a flat set of numpy arrays
(plus the ``rules`` list that names what a rule id means) so that the packet loop can
judge a batch with a few gathers, and so that the whole value can cross a process
boundary through shared memory without pickling arrays (:meth:`PolicyTables.pack` /
:meth:`PolicyTables.unpack`, zero-copy views).

How a packet is judged (``fastpath.match``) — the arrays, in the order they are used:

Slots, in this order: ``m`` ipBlock intervals (slot = interval index), then one per
identity (slot ``m + identity``: a pod), then one per address that two clusters claim
and a local pod is among the claimants (rule M8: judged as that pod when it is the
subject, as its interval when it is the peer). ``slots`` is their total.

``ip_keys`` ``uint8[n, 16]`` sorted, ``ip_slot`` ``int32[n]``
    Exact lookup of an address (IPv4 as IPv4-mapped IPv6, network order) to its
    *slot*: the identity (pod) that alone owns it, or the extra slot of a conflicted
    local address. Other addresses claimed by two pods are absent (rule M8: they are
    unknown addresses). ``ip_hash_keys``/``ip_hash_slot`` hold the same map as a hash
    table (:func:`build_ip_hash`, -1 marks an empty bucket) for the C kernel.
``net_bounds`` ``uint8[m, 16]`` sorted, first entry all zero
    Interval starts over every ipBlock boundary. An address not in ``ip_keys`` gets
    the slot of the interval it falls in.
``port_bounds`` ``int32[k]`` sorted, first entry 0; ``proto_index`` ``int8[256]``
    Port atoms: the key ``proto_index[proto] << 16 | port`` (TCP 0, UDP 1, SCTP 2,
    every other protocol 3 with port 0) falls into one interval ``patom``.
``eg_class``/``in_class`` ``int32[slots]``, ``eg_atom``/``in_atom`` ``int32[slots]``
    Per direction, the local endpoint class of a slot (0: not a local endpoint, or not
    isolated in that direction) and the peer atom of a slot.
``eg_cell``/``in_cell`` ``int32[classes, atoms]``, ``eg_ports``/``in_ports`` ``int32[portsets, patoms]``
    ``cell[class, atom]`` is a port set; ``ports[portset, patom]`` the verdict:
    ``NOT_ENFORCED`` (-2), ``DENIED`` (-1) or the id of the admitting rule.

Egress: ``eg_ports[eg_cell[eg_class[src], eg_atom[dst]], patom]``; ingress the same
with ``in_*`` and the roles of source and destination swapped.

``local_ips`` ``uint8[l, 16]`` sorted: the addresses of the endpoints judged on their
own side here (:meth:`PolicyTables.local_endpoint_ips`); not used by the lookup.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

NOT_ENFORCED = -2
DENIED = -1

#: Protocol numbers → port-space index. Everything not listed shares index 3 and is
#: only admitted by rules without ports (rule S3).
PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_OTHER = 0, 1, 2, 3
PROTO_BY_NAME = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP}
PORT_SPACE = 4 << 16

_ALIGN = 64
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def proto_index_table() -> np.ndarray:
    table = np.full(256, PROTO_OTHER, dtype=np.int8)
    table[6], table[17], table[132] = PROTO_TCP, PROTO_UDP, PROTO_SCTP
    return table


def ip_key(ip) -> bytes:
    """The 16-byte key of an address: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = ipaddress.ip_address(ip)
    return _V4_PREFIX + ip.packed if ip.version == 4 else ip.packed


def ip_keys(ips) -> np.ndarray:
    """``uint8[n, 16]`` keys of addresses (``ipaddress`` objects or strings)."""
    out = np.zeros((len(ips), 16), dtype=np.uint8)
    if len(ips):
        out[:] = np.frombuffer(b"".join(ip_key(ip) for ip in ips), dtype=np.uint8).reshape(-1, 16)
    return out


def key_to_ip(key) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(key)
    return ipaddress.IPv4Address(raw[12:]) if raw[:12] == _V4_PREFIX else ipaddress.IPv6Address(raw)


_HASH_K1 = np.uint64(0x9E3779B97F4A7C15)
_HASH_K2 = np.uint64(0xC2B2AE3D27D4EB4F)


def ip_hash(keys: np.ndarray, bits: int) -> np.ndarray:
    """Bucket of each ``uint8[n, 16]`` key in a table of ``2**bits`` buckets; the C
    kernel computes the same function (csrc/match.c, ``hash_key``)."""
    words = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2).astype(np.uint64)
    hi, lo = words[:, 0], words[:, 1]
    with np.errstate(over="ignore"):
        h = (hi ^ (lo * _HASH_K1)) * _HASH_K2
    return (h >> np.uint64(64 - bits)).astype(np.int64)


def build_ip_hash(keys: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An open-addressing (linear probing) table of ``keys`` → ``slots`` with at least
    half its buckets empty: ``(bucket keys uint8[cap, 16], bucket slot int32[cap], -1
    when empty)``. The packet path finds a pod address in about one probe instead of
    a binary search's dozen dependent loads."""
    n = len(keys)
    bits = max(4, int(2 * n - 1).bit_length())
    cap = 1 << bits
    out_keys = np.zeros((cap, 16), dtype=np.uint8)
    out_slot = np.full(cap, -1, dtype=np.int32)
    mask = cap - 1
    pos = ip_hash(keys, bits) if n else np.zeros(0, dtype=np.int64)
    pending = np.arange(n)
    # Insert in rounds: every pending key tries its current bucket, one key wins each
    # free bucket, the others move one bucket on. A key's probe path from its hash to
    # its bucket is then all occupied, which is what a lookup needs.
    while pending.size:
        p = pos[pending]
        free = out_slot[p] < 0
        if free.any():
            buckets, first = np.unique(p[free], return_index=True)
            winners = pending[free][first]
            out_slot[buckets] = slots[winners]
            out_keys[buckets] = keys[winners]
            won = np.zeros(n, dtype=bool)
            won[winners] = True
            pending = pending[~won[pending]]
        pos[pending] = (pos[pending] + 1) & mask
    return out_keys, out_slot


#: Every array a PolicyTables carries, with its dtype (shapes vary).
ARRAYS = {
    "ip_keys": np.uint8,
    "ip_slot": np.int32,
    "ip_hash_keys": np.uint8,
    "ip_hash_slot": np.int32,
    "net_bounds": np.uint8,
    "port_bounds": np.int32,
    "proto_index": np.int8,
    "eg_class": np.int32,
    "eg_atom": np.int32,
    "eg_cell": np.int32,
    "eg_ports": np.int32,
    "in_class": np.int32,
    "in_atom": np.int32,
    "in_cell": np.int32,
    "in_ports": np.int32,
    "local_ips": np.uint8,
}


@dataclass(frozen=True, eq=False)
class PolicyTables:
    """One compiled revision. Arrays are read-only; build a new value to change it."""

    revision: int
    arrays: Mapping[str, np.ndarray]
    #: rule id → ``{"policy", "direction", "rule", "peer", "port"}`` (peer/port None
    #: when the rule has no peers/ports: it matches all of them).
    rules: list = field(default_factory=list)
    #: Small JSON-able facts (counts) for ``/v1/tables`` and logs.
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        missing = set(ARRAYS) - set(self.arrays)
        if missing:
            raise ValueError(f"PolicyTables lacks arrays {sorted(missing)}")
        for name, arr in self.arrays.items():
            if arr.dtype != ARRAYS[name]:
                raise ValueError(f"PolicyTables array {name} has dtype {arr.dtype}, expected {np.dtype(ARRAYS[name])}")
            if arr.flags.writeable:
                arr.flags.writeable = False

    def __getattr__(self, name: str) -> np.ndarray:
        # Arrays read as attributes (tables.eg_cell); only called for unknown names.
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def n_identities(self) -> int:
        return int(self.meta.get("identities", 0))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def local_endpoint_ips(self) -> set[str]:
        """The addresses of this node's endpoints (those judged on their side)."""
        return {str(key_to_ip(k)) for k in self.arrays["local_ips"]}

    def rule(self, rule_id: int) -> dict | None:
        return self.rules[rule_id] if 0 <= rule_id < len(self.rules) else None

    def summary(self) -> dict:
        return {"revision": self.revision, "bytes": self.nbytes, "rules": len(self.rules), **dict(self.meta)}

    # ------------------------------------------------------------------ hand-over

    def pack(self) -> tuple[dict, bytearray]:
        """``(header, buffer)``: a JSON-able header and one buffer holding every array,
        each 64-byte aligned, for a shared-memory hand-over."""
        layout, offset = [], 0
        for name in ARRAYS:
            arr = np.ascontiguousarray(self.arrays[name])
            offset = -(-offset // _ALIGN) * _ALIGN
            layout.append({"name": name, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
            offset += arr.nbytes
        buf = bytearray(max(offset, 1))
        view = memoryview(buf)
        for entry in layout:
            arr = np.ascontiguousarray(self.arrays[entry["name"]])
            view[entry["offset"]: entry["offset"] + entry["nbytes"]] = arr.reshape(-1).view(np.uint8).data
        header = {"revision": self.revision, "arrays": layout, "rules": self.rules, "meta": dict(self.meta), "size": len(buf)}
        json.dumps(header)  # the header must stay JSON-able: fail here, not in the reader
        return header, buf

    @classmethod
    def unpack(cls, header: Mapping[str, Any], buffer) -> "PolicyTables":
        """Rebuild from :meth:`pack` output; arrays are read-only views of ``buffer``."""
        arrays = {}
        for entry in header["arrays"]:
            dtype = np.dtype(ARRAYS[entry["name"]])
            count = int(np.prod(entry["shape"], dtype=np.int64)) if entry["shape"] else 1
            if count == 0:
                arr = np.zeros(entry["shape"], dtype=dtype)
            else:
                arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=entry["offset"]).reshape(entry["shape"])
            arrays[entry["name"]] = arr
        return cls(int(header["revision"]), arrays, list(header["rules"]), dict(header.get("meta", {})))
