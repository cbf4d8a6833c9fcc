"""The policy compiler: cluster state → one immutable, revisioned ``PolicyTables``.

The packet path must judge a packet with a constant number of array lookups whatever
the number of policies, so the compiler does the set algebra up front (see
``control.compile.direction`` for the words): addresses become *slots* (the one pod
that owns an IP, or the ipBlock interval of an address no single pod owns, rule M8),
slots become per-direction *atoms* (alike for every peer) and *classes* (local
endpoints isolated alike), and a (class, atom) cell names a *port set* whose row over
port atoms holds the first admitting rule — the rule the reference evaluator would
name (policies by name, rules, peers and ports in order).

Selectors are evaluated over all pods at once through an inverted label index
(``control.compile.selection``), never pod by pod.

Incremental recompiles (:class:`Compiler`):

* incremental — a pod's labels, IPs, ports or phase changing, a pod added or removed:
  the pod's peer matches are re-evaluated (one pod against every peer column), its
  atom and class looked up or created (a new atom costs one cell per class, a new class
  one cell per atom), the address table rebuilt (a sort of the pod IPs);
* incremental — a policy added, changed or removed: policies are append-only inside a
  direction (a changed one is removed and appended, so its rule ids need not follow
  the order rules are tried in), its new peer columns split atoms, and the classes of
  the local endpoints of its namespace are re-derived; an ipBlock boundary not cut yet
  or a named port no rule used before falls back to a full compile;
* not incremental — a namespace added, changed or removed, a cluster added or removed,
  a change of ``Options``: a full compile (the same code path as the first one). Atoms
  and classes left unused by incremental changes are garbage until the next full
  compile; after ``compact_after`` incremental changes the compiler does a full
  compile by itself.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from fastpath.tables import PolicyTables, build_ip_hash, ip_key, proto_index_table

from control.compile.direction import Direction, PortSpace, RuleIds
from control.compile.selection import (EGRESS, INGRESS, AddressSpace, PodIndex, peer_column, policy_ip_blocks,
                                      selector_peer_matches)
from control.semantics.model import ClusterSet, Pod, Policy

logger = logging.getLogger(__name__)

Local = Callable[[Pod], bool]


def compile_tables(cset: ClusterSet, local: Local, revision: int, clusters=None,
                   audited: Optional[Callable[[Policy], bool]] = None) -> PolicyTables:
    """Compile ``cset`` for the endpoints ``local`` accepts (this node's pods; every
    pod for an offline whole-clusterset view), enforcing the policies of ``clusters``
    (None: every cluster's) except those ``audited`` accepts (audit mode: they take
    no part, ``control.semantics.audit``)."""
    return Compiler(cset, local, clusters=clusters, audited=audited).tables(revision)


class Compiler:
    """Compiles a cluster set and keeps what it needs to follow changes cheaply.

    ``clusters`` names the clusters whose policies this node can enforce (the daemon:
    its own cluster, rule M3); None means every cluster. Policies of other clusters
    take no part at all — not in the tables, not in what a change costs — and pods of
    other clusters are never local endpoints. Nor do the policies ``audited`` accepts
    (audit mode): the tables are then what enforcement does without them."""

    def __init__(self, cset: ClusterSet, local: Local, compact_after: int = 2000, clusters=None,
                 audited: Optional[Callable[[Policy], bool]] = None):
        self.cset = cset
        self._local = local
        self.clusters = None if clusters is None else frozenset(clusters)
        self.audited = audited
        self.compact_after = compact_after
        self.full_compiles = 0
        self.incremental_changes = 0
        self._build()

    def enforces(self, policy: Policy) -> bool:
        """The one place that says which policies the tables hold."""
        if self.clusters is not None and policy.cluster not in self.clusters:
            return False
        return self.audited is None or not self.audited(policy)

    def local(self, pod: Pod) -> bool:
        return (self.clusters is None or pod.cluster in self.clusters) and bool(self._local(pod))

    def rebuild(self, cset: ClusterSet) -> None:
        """Full compile of ``cset`` (after namespace, cluster or option changes)."""
        self.cset = cset
        self._build()

    def update(self, cset: ClusterSet, changes) -> str:
        """Follow ``changes`` (a ``control.node.store.Changes``: pod references, namespace
        keys, policy references, ``everything``) from the last compiled cluster set to
        ``cset`` by the cheapest correct path. Returns the path taken: ``"none"``
        (nothing this node enforces changed: the tables stand), ``"incremental"`` or
        ``"full"``."""
        if changes.everything or changes.namespaces:
            self.rebuild(cset)
            return "full"
        policies = [ref for ref in changes.policies if self.clusters is None or ref.split("/", 1)[0] in self.clusters]
        if not changes.pods and not policies:
            self.cset = cset
            return "none"
        before = self.full_compiles
        if changes.pods:
            self.pods_changed(cset, changes.pods)
        if policies and self.full_compiles == before:
            self.policies_changed(cset, policies)
        self.cset = cset
        return "full" if self.full_compiles != before else "incremental"

    def pods_changed(self, cset: ClusterSet, refs) -> None:
        """The pods ``refs`` (``cluster/namespace/name``) were added, changed or removed
        in ``cset``, and nothing else changed. Falls back to a full compile when a pod
        brings a named-port number no port atom can express."""
        self.cset = cset
        first_pod_slot = self.space.size
        addresses_changed = False
        for ref in refs:
            pod = cset.pod(ref)
            alive = pod is not None and pod.can_take_part
            identity = self.identity_of.get(ref)
            if identity is not None:
                self.dirty.add(identity)
            if not alive:
                if identity is not None:
                    addresses_changed = True
                    self.identities[identity] = None
                    self.id_keys[identity] = ()
                    self.is_local[identity] = False
                    self.has_ip[identity] = False
                    for direction in self.directions.values():
                        direction.update_slot(self, first_pod_slot + identity, None, False)
                continue
            if not self.ports.expresses(pod, [n for direction in self.directions.values() for n in direction.named]):
                logger.debug("Pod %s resolves a named port to a new number: full compile", ref)
                self._build()
                return
            if identity is None:
                identity = self.identity_of[ref] = len(self.identities)
                self.dirty.add(identity)
                self.identities.append(pod)
                self.id_keys.append(())
                self.is_local = np.append(self.is_local, False)
                self.has_ip = np.append(self.has_ip, False)
                self.pod_interval = np.append(self.pod_interval, 0)
                for direction in self.directions.values():
                    direction.grow(first_pod_slot + len(self.identities))
            self.identities[identity] = pod
            keys, is_local = tuple(ip_key(ip) for ip in pod.ips), self.local(pod)
            if keys != self.id_keys[identity] or is_local != self.is_local[identity]:
                addresses_changed = True  # a label change leaves the address table as it is
            self.id_keys[identity] = keys
            self.is_local[identity] = is_local
            interval = self.interval_of(pod)
            self.has_ip[identity], self.pod_interval[identity] = interval >= 0, max(interval, 0)
            for direction in self.directions.values():
                direction.update_slot(self, first_pod_slot + identity, pod, bool(self.is_local[identity]))
        if addresses_changed:
            self._address_table()
        self._count_change()

    def policies_changed(self, cset: ClusterSet, refs) -> None:
        """The policies ``refs`` were added, changed or removed in ``cset``, and
        nothing else changed. Only what they touch is recomputed: their peer columns
        (which can split atoms) and the classes of the local endpoints of their
        namespaces. Falls back to a full compile when one brings an ipBlock boundary
        or a named port the tables cannot tell apart yet."""
        self.cset = cset
        changes = []
        for ref in refs:
            cluster, ns, name = ref.split("/", 2)
            state = cset.clusters.get(cluster)
            new = state.policies.get((ns, name)) if state is not None else None
            if new is not None and not self.enforces(new):
                new = None  # put in audit mode: it leaves the tables as if removed
            old = self.policies.get(ref)
            if (self.clusters is not None and cluster not in self.clusters) or new == old:
                continue
            changes.append((ref, old, new))
        if not changes:
            return
        fresh = [new for _, _, new in changes if new is not None]
        if not self._can_add(fresh):
            logger.debug("A policy brings an ipBlock boundary or a named port not compiled yet: full compile")
            self._build()
            return
        old_of_new = self.ports.add_rules([r for p in fresh for direction in self.directions if direction in p.types for r in p.rules(direction)])
        if old_of_new is not None:
            for direction in self.directions.values():
                direction.remap_port_atoms(old_of_new)
        namespaces = set()
        for ref, old, new in changes:
            for direction in self.directions.values():
                direction.remove_policy(ref)
                if new is not None and direction.direction in new.types:
                    direction.add_policy(self, new)
            namespaces.add((old or new).cluster + "/" + (old or new).namespace)
            if new is None:
                self.policies.pop(ref, None)
            else:
                self.policies[ref] = new
        self._reclassify(namespaces)
        self._count_change()

    def _can_add(self, policies: list[Policy]) -> bool:
        """Can these policies be added without recutting the address space or adding
        a named-port context?"""
        for policy in policies:
            for direction in self.directions.values():
                if direction.direction in policy.types and not direction.knows_named_ports(policy):
                    return False
            for block in policy_ip_blocks(policy):
                if not self.space.has_boundaries_of(block):
                    return False
        return True

    def _reclassify(self, namespaces: set[str]) -> None:
        """Re-derive the class of every local endpoint in ``namespaces``."""
        first_pod_slot = self.space.size
        for identity in np.flatnonzero(self.is_local).tolist():
            pod = self.identities[identity]
            if pod is None or f"{pod.cluster}/{pod.namespace}" not in namespaces:
                continue
            labels = self.cset.effective_pod_labels(pod)
            for direction in self.directions.values():
                direction.class_of_slot[first_pod_slot + identity] = direction.class_of(self, pod, labels, int(direction.ctx_of_slot[first_pod_slot + identity]))

    def column_values(self, policy: Policy, peer) -> np.ndarray:
        """``bool[slots]``: which slots one peer column matches, now. The pod index is
        the last full compile's: identities changed since then are asked one by one."""
        out = peer_column(self.index, self.space, self.pod_interval, self.has_ip, policy, peer)
        if peer.ip_block is not None:
            return out  # addresses are kept current for every identity, changed or not
        first_pod_slot, cset = self.space.size, self.cset
        for identity in self.dirty:
            pod = self.identities[identity]
            out[first_pod_slot + identity] = pod is not None and selector_peer_matches(
                cset, policy, peer, pod, cset.effective_pod_labels(pod), cset.effective_namespace_labels(pod.cluster, pod.namespace))
        return out

    def _count_change(self) -> None:
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
        self.identity_of = {p.ref: identity for identity, p in enumerate(self.identities)}
        self.id_keys = [tuple(ip_key(ip) for ip in p.ips) for p in self.identities]
        #: Identities changed since this build (the pod index does not know them).
        self.dirty: set[int] = set()
        self.policies = {p.ref: p for p in cset.policies() if self.enforces(p)}
        self.index = PodIndex(cset, self.identities)
        self.space = AddressSpace([b for p in self.policies.values() for b in policy_ip_blocks(p)])
        keys, self.has_ip = self.index.primary_keys()
        self.pod_interval = np.where(self.has_ip, self.space.interval_of(keys), 0)
        self.is_local = np.fromiter((self.local(p) for p in self.identities), dtype=bool, count=len(self.identities))
        self.rule_ids = RuleIds()
        self.directions = {name: Direction(name, self) for name in (EGRESS, INGRESS)}
        resolved = [
            (protocol, self.index.named_port(name, protocol))
            for direction in self.directions.values()
            for name, protocol in direction.named
        ]
        self.ports = PortSpace([rule for direction in self.directions.values() for _, _, rule in direction.rules], resolved)
        for direction in self.directions.values():
            direction.build(self)
        self._address_table()
        self.full_compiles += 1
        self.incremental_changes = 0

    def _address_table(self) -> None:
        """Exact IP → slot for every address exactly one identity claims (rule M8)."""
        first_pod_slot = self.space.size
        owners: dict[bytes, int] = {}
        conflicted: set[bytes] = set()
        for identity, keys in enumerate(self.id_keys):
            for key in keys:
                if key in owners and owners[key] != identity:
                    conflicted.add(key)
                owners.setdefault(key, identity)
        unique = sorted(k for k in owners if k not in conflicted)
        self.conflicts = len(conflicted)
        # A conflicted address that one of this node's pods claims: as a peer it stays
        # unknown (only ipBlock), but the local pod behind it must still be judged for
        # its own isolation — otherwise another cluster could lift a local pod's
        # policies by reporting its IP. ``tables()`` gives each such address a slot of
        # its own (see ``_hybrid_slots``).
        claimants: dict[bytes, list[int]] = {}
        for identity, keys in enumerate(self.id_keys):
            if self.is_local[identity]:
                for key in keys:
                    if key in conflicted:
                        claimants.setdefault(key, []).append(identity)
        self.hybrid = sorted(claimants.items())
        keys = np.frombuffer(b"".join(unique), dtype=np.uint8).reshape(-1, 16) if unique else np.zeros((0, 16), np.uint8)
        self.ip_keys = keys.copy()
        self.ip_slot = np.fromiter((first_pod_slot + owners[k] for k in unique), dtype=np.int32, count=len(unique))
        self.ip_hash_keys, self.ip_hash_slot = build_ip_hash(self.ip_keys, self.ip_slot)
        local = sorted([k for k in unique if self.is_local[owners[k]]] + [k for k, _ in self.hybrid])
        self.local_ips = np.frombuffer(b"".join(local), dtype=np.uint8).reshape(-1, 16).copy() if local else np.zeros((0, 16), np.uint8)

    def _hybrid_slots(self, arrays: dict[str, np.ndarray]) -> None:
        """Append one slot per conflicted address a local pod claims (rule M8 without
        failing open): as the subject it takes the local claimant's class — the first
        isolated one if several local pods claim it — and as the peer the atom of the
        ipBlock interval the address falls in, exactly what an unknown address gets."""
        if not self.hybrid:
            return
        first_pod_slot = self.space.size
        bounds = self.space.bound_keys.view("S16").ravel()
        first = len(arrays["eg_class"])
        extra_keys, extra_slots = [], []
        for extra, (key, owners) in enumerate(self.hybrid):
            interval = int(np.searchsorted(bounds, np.frombuffer(key, dtype="S16"), side="right")[0]) - 1
            for side in ("eg", "in"):
                classes = [int(arrays[f"{side}_class"][first_pod_slot + owner]) for owner in owners]
                chosen = next((cls for cls in classes if cls != 0), classes[0])
                arrays[f"{side}_class"] = np.append(arrays[f"{side}_class"], np.int32(chosen))
                arrays[f"{side}_atom"] = np.append(arrays[f"{side}_atom"], arrays[f"{side}_atom"][interval])
            extra_keys.append(key)
            extra_slots.append(first + extra)
        keys = np.concatenate([self.ip_keys, np.frombuffer(b"".join(extra_keys), dtype=np.uint8).reshape(-1, 16)])
        slots = np.concatenate([self.ip_slot, np.asarray(extra_slots, dtype=np.int32)])
        order = np.argsort(keys.view("S16").ravel(), kind="stable")
        arrays["ip_keys"], arrays["ip_slot"] = keys[order], slots[order]
        arrays["ip_hash_keys"], arrays["ip_hash_slot"] = build_ip_hash(arrays["ip_keys"], arrays["ip_slot"])

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
        self._hybrid_slots(arrays)
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
