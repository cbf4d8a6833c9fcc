"""The policy compiler: cluster state → one immutable, revisioned ``PolicyTables``.

The packet path must judge a packet with a constant number of array lookups whatever
the number of policies, so the compiler does the set algebra up front (see
``control.compile_direction`` for the words): addresses become *slots* (the one pod
that owns an IP, or the ipBlock interval of an address no single pod owns, rule M8),
slots become per-direction *atoms* (alike for every peer) and *classes* (local
endpoints isolated alike), and a (class, atom) cell names a *port set* whose row over
port atoms holds the first admitting rule — the rule the reference evaluator would
name (policies by name, rules, peers and ports in order).

Selectors are evaluated over all pods at once through an inverted label index
(``control.compile_select``), never pod by pod.

Incremental recompiles (:class:`Compiler`):

* incremental — a pod's labels, IPs, ports or phase changing, a pod added or removed:
  the pod's peer matches are re-evaluated (one pod against every peer column), its
  atom and class looked up or created (a new atom costs one cell per class, a new class
  one cell per atom), the address table rebuilt (a sort of the pod IPs);
* not incremental — a policy or namespace added, changed or removed, a cluster added or
  removed, a change of ``Options`` or of which pods are local: a full compile (the same
  code path as the first one). Atoms and classes left unused by incremental changes
  are garbage until the next full compile; after ``compact_after`` incremental changes
  the compiler does a full compile by itself.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from fastpath.tables import PolicyTables, build_ip_hash, ip_key, proto_index_table

from .compile_direction import Direction, PortSpace, RuleIds
from .compile_select import EGRESS, INGRESS, AddressSpace, PodIndex, all_ip_blocks
from .model import ClusterSet, Pod

logger = logging.getLogger(__name__)

Local = Callable[[Pod], bool]


def compile_tables(cset: ClusterSet, local: Local, revision: int) -> PolicyTables:
    """Compile ``cset`` for the endpoints ``local`` accepts (this node's pods; every
    pod for an offline whole-clusterset view)."""
    return Compiler(cset, local).tables(revision)


class Compiler:
    """Compiles a cluster set and keeps what it needs to follow pod changes cheaply."""

    def __init__(self, cset: ClusterSet, local: Local, compact_after: int = 2000):
        self.cset = cset
        self.local = local
        self.compact_after = compact_after
        self.full_compiles = 0
        self.incremental_changes = 0
        self._build()

    def rebuild(self, cset: ClusterSet) -> None:
        """Full compile of ``cset`` (after policy, namespace, cluster or option changes)."""
        self.cset = cset
        self._build()

    def pods_changed(self, cset: ClusterSet, refs) -> None:
        """The pods ``refs`` (``cluster/namespace/name``) were added, changed or removed
        in ``cset``, and nothing else changed. Falls back to a full compile when a pod
        brings a named-port number no port atom can express."""
        self.cset = cset
        m = self.space.size
        addresses_changed = False
        for ref in refs:
            pod = cset.pod(ref)
            alive = pod is not None and pod.can_take_part
            i = self.identity_of.get(ref)
            if not alive:
                if i is not None:
                    addresses_changed = True
                    self.identities[i] = None
                    self.id_keys[i] = ()
                    self.is_local[i] = False
                    for d in self.directions.values():
                        d.update_slot(self, m + i, None, False)
                continue
            if not self.ports.expresses(pod, [n for d in self.directions.values() for n in d.named]):
                logger.debug("Pod %s resolves a named port to a new number: full compile", ref)
                self._build()
                return
            if i is None:
                i = self.identity_of[ref] = len(self.identities)
                self.identities.append(pod)
                self.id_keys.append(())
                self.is_local = np.append(self.is_local, False)
                for d in self.directions.values():
                    d.grow(m + len(self.identities))
            self.identities[i] = pod
            keys, is_local = tuple(ip_key(ip) for ip in pod.ips), bool(self.local(pod))
            if keys != self.id_keys[i] or is_local != self.is_local[i]:
                addresses_changed = True  # a label change leaves the address table as it is
            self.id_keys[i] = keys
            self.is_local[i] = is_local
            for d in self.directions.values():
                d.update_slot(self, m + i, pod, bool(self.is_local[i]))
        if addresses_changed:
            self._address_table()
        self.incremental_changes += 1
        if self.incremental_changes >= self.compact_after:
            self._build()

    def interval_of(self, pod: Pod) -> int:
        """The ipBlock interval of a pod's primary address (-1: it has none)."""
        if pod.ip is None:
            return -1
        return int(self.space.interval_of(np.frombuffer(ip_key(pod.ip), np.uint8).reshape(1, 16))[0])

    # ------------------------------------------------------------------ full compile

    def _build(self) -> None:
        cset = self.cset
        self.identities: list[Pod | None] = [p for p in cset.pods() if p.can_take_part]
        self.identity_of = {p.ref: i for i, p in enumerate(self.identities)}
        self.id_keys = [tuple(ip_key(ip) for ip in p.ips) for p in self.identities]
        self.index = PodIndex(cset, self.identities)
        self.space = AddressSpace(all_ip_blocks(cset))
        keys, self.has_ip = self.index.primary_keys()
        self.pod_interval = np.where(self.has_ip, self.space.interval_of(keys), 0)
        self.is_local = np.fromiter((bool(self.local(p)) for p in self.identities), dtype=bool, count=len(self.identities))
        self.rule_ids = RuleIds()
        self.directions = {d: Direction(d, self) for d in (EGRESS, INGRESS)}
        resolved = [
            (protocol, self.index.named_port(name, protocol))
            for direction in self.directions.values()
            for name, protocol in direction.named
        ]
        self.ports = PortSpace([r for d in self.directions.values() for _, _, r in d.rules], resolved)
        for direction in self.directions.values():
            direction.build(self)
        self._address_table()
        self.full_compiles += 1
        self.incremental_changes = 0

    def _address_table(self) -> None:
        """Exact IP → slot for every address exactly one identity claims (rule M8)."""
        m = self.space.size
        owners: dict[bytes, int] = {}
        conflicted: set[bytes] = set()
        for i, keys in enumerate(self.id_keys):
            for key in keys:
                if key in owners and owners[key] != i:
                    conflicted.add(key)
                owners.setdefault(key, i)
        unique = sorted(k for k in owners if k not in conflicted)
        self.conflicts = len(conflicted)
        keys = np.frombuffer(b"".join(unique), dtype=np.uint8).reshape(-1, 16) if unique else np.zeros((0, 16), np.uint8)
        self.ip_keys = keys.copy()
        self.ip_slot = np.fromiter((m + owners[k] for k in unique), dtype=np.int32, count=len(unique))
        self.ip_hash_keys, self.ip_hash_slot = build_ip_hash(self.ip_keys, self.ip_slot)
        local = sorted(k for k in unique if self.is_local[owners[k]])
        self.local_ips = np.frombuffer(b"".join(local), dtype=np.uint8).reshape(-1, 16).copy() if local else np.zeros((0, 16), np.uint8)

    # ------------------------------------------------------------------ output

    def tables(self, revision: int) -> PolicyTables:
        eg, ing = self.directions[EGRESS], self.directions[INGRESS]
        arrays = {
            "ip_keys": self.ip_keys,
            "ip_slot": self.ip_slot,
            "ip_hash_keys": self.ip_hash_keys,
            "ip_hash_slot": self.ip_hash_slot,
            "net_bounds": self.space.bound_keys,
            "port_bounds": self.ports.bounds,
            "proto_index": proto_index_table(),
            **eg.arrays("eg"),
            **ing.arrays("in"),
            "local_ips": self.local_ips,
        }
        arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        meta = {
            "identities": len(self.identities),
            "full_compiles": self.full_compiles,
            "incremental_changes": self.incremental_changes,
            "intervals": self.space.size,
            "port_atoms": self.ports.size,
            "conflicted_ips": self.conflicts,
            "local_endpoints": int(self.is_local.sum()),
            "egress": {"classes": len(eg.class_policies), "atoms": int(eg.cells.shape[1]), "port_sets": len(eg.port_rows)},
            "ingress": {"classes": len(ing.class_policies), "atoms": int(ing.cells.shape[1]), "port_sets": len(ing.port_rows)},
        }
        return PolicyTables(revision, arrays, list(self.rule_ids.rules), meta)
