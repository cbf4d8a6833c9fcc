"""Selectors, peers and ipBlocks evaluated over whole populations at once.

The compiler and the compiled matrix never ask "does selector S match pod P" pair by
pair: with 10,000 pods and thousands of selectors that is tens of millions of Python
calls. Instead :class:`PodIndex` keeps an inverted index (label key → value → the
pods carrying it, as index arrays) and answers "which pods does S match" with a few
numpy operations per requirement, cached per requirement and per selector (policies
share selectors a lot). :class:`AddressSpace` does the same for ipBlocks: every cidr and
except boundary cuts the address space into intervals, an ipBlock is a boolean mask over
intervals, and an address finds its interval with one binary search.

The meaning is the model's (``Requirement``/``Selector`` in ``control.semantics.model``) and
docs/semantics.md; this module only changes how many objects are judged per call.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from fastpath.tables import ip_keys

from control.semantics.model import MC_KEY, ClusterSet, IPBlock, Options, Peer, Pod, Policy, Requirement, Selector

INGRESS, EGRESS = "Ingress", "Egress"

_V4_LO = 0xFFFF << 32
_V4_HI = _V4_LO + (1 << 32)
_TOP = 1 << 128


def policies_for(cset: ClusterSet, direction: str) -> list[Policy]:
    """Policies that isolate in ``direction``, in the order rules are tried: a pod's
    isolating policies share its cluster and namespace, so ordering by (cluster,
    namespace, name) everywhere is the reference evaluator's order for every pod."""
    found = [p for p in cset.policies() if direction in p.types]
    return sorted(found, key=lambda p: (p.cluster, p.namespace, p.name))


def _postings(label_sets: Iterable[tuple[int, object]], n: int) -> dict[str, dict[str, np.ndarray]]:
    raw: dict[str, dict[str, list[int]]] = {}
    for i, labels in label_sets:
        for k, v in labels.items():
            raw.setdefault(k, {}).setdefault(v, []).append(i)
    return {k: {v: np.asarray(idx, dtype=np.int64) for v, idx in by_value.items()} for k, by_value in raw.items()}


class _LabelTable:
    """An inverted label index over ``n`` objects with cached requirement masks."""

    def __init__(self, postings: dict[str, dict[str, np.ndarray]], n: int):
        self.postings = postings
        self.n = n
        self._req: dict[Requirement, np.ndarray] = {}
        self._sel: dict[Selector, np.ndarray] = {}

    def requirement(self, req: Requirement) -> np.ndarray:
        mask = self._req.get(req)
        if mask is not None:
            return mask
        mask = np.zeros(self.n, dtype=bool)
        by_value = self.postings.get(req.key, {})
        if req.op in ("In", "NotIn"):
            for v in req.values:
                idx = by_value.get(v)
                if idx is not None:
                    mask[idx] = True
        else:
            for idx in by_value.values():
                mask[idx] = True
        if req.op in ("NotIn", "DoesNotExist"):
            mask = ~mask
        self._req[req] = mask
        return mask

    def selector(self, sel: Selector) -> np.ndarray:
        mask = self._sel.get(sel)
        if mask is not None:
            return mask
        mask = np.ones(self.n, dtype=bool)
        for req in sel.requirements:
            mask &= self.requirement(req)
        self._sel[sel] = mask
        return mask


class PodIndex:
    """A fixed list of pods (any pods: eligibility is part of every answer), with
    their namespaces, ready for vectorised selector, peer and selection masks."""

    def __init__(self, cset: ClusterSet, pods: Sequence[Pod]):
        self.cset = cset
        self.options = cset.options
        self.pods = list(pods)
        n = self.n = len(self.pods)
        self.cluster_ids = {name: i for i, name in enumerate(cset.clusters)}
        self.part = np.fromiter((p.can_take_part for p in self.pods), dtype=bool, count=n)
        self.pod_cluster = np.fromiter((self.cluster_ids.get(p.cluster, -1) for p in self.pods), dtype=np.int32, count=n)
        ns_ids: dict[tuple[str, str], int] = {}
        self.nsname_ids: dict[str, int] = {}
        pod_ns, pod_nsname = [], []
        for p in self.pods:
            pod_ns.append(ns_ids.setdefault((p.cluster, p.namespace), len(ns_ids)))
            pod_nsname.append(self.nsname_ids.setdefault(p.namespace, len(self.nsname_ids)))
        self.ns_ids = ns_ids
        self.pod_ns = np.asarray(pod_ns, dtype=np.int64)
        self.pod_nsname = np.asarray(pod_nsname, dtype=np.int32)
        mc = self.options.multicluster
        self.pod_labels = _LabelTable(_postings(((i, self._effective(p.labels, p.cluster, mc)) for i, p in enumerate(self.pods)), n), n)
        ns_labels = (
            (i, self._effective(cset.clusters[c].namespace_labels(ns) if c in cset.clusters else {}, c, mc))
            for (c, ns), i in ns_ids.items()
        )
        self.ns_labels = _LabelTable(_postings(ns_labels, len(ns_ids)), len(ns_ids))
        self._cluster_mask: dict[str, np.ndarray] = {}
        self._nsname_mask: dict[str, np.ndarray] = {}
        self._named: dict[tuple[str, str], np.ndarray] = {}
        self._port_sets: Optional[list] = None

    @staticmethod
    def _effective(labels, cluster: str, multicluster: bool):
        """Rule M2 without a dict copy per object: the key's value is the cluster's."""
        if not multicluster:
            return labels
        return _WithCluster(labels, cluster)

    # ------------------------------------------------------------------ building blocks

    def in_cluster(self, cluster: str) -> np.ndarray:
        mask = self._cluster_mask.get(cluster)
        if mask is None:
            mask = self._cluster_mask[cluster] = self.pod_cluster == self.cluster_ids.get(cluster, -2)
        return mask

    def in_namespace_named(self, name: str) -> np.ndarray:
        mask = self._nsname_mask.get(name)
        if mask is None:
            mask = self._nsname_mask[name] = self.pod_nsname == self.nsname_ids.get(name, -2)
        return mask

    def pods_matching(self, sel: Selector) -> np.ndarray:
        return self.pod_labels.selector(sel)

    def pods_in_namespaces_matching(self, sel: Selector) -> np.ndarray:
        return self.ns_labels.selector(sel)[self.pod_ns] if self.n else np.zeros(0, dtype=bool)

    def peer_clusters_unrestricted(self, peer: Peer) -> bool:
        return reaches_all_clusters(self.options, peer)

    # ------------------------------------------------------------------ answers

    def selected_by(self, policy: Policy) -> np.ndarray:
        """Pods ``policy`` selects (rule M3: its own cluster and namespace only)."""
        mask = self.part & self.in_cluster(policy.cluster) & self.in_namespace_named(policy.namespace)
        return mask & self.pods_matching(policy.pod_selector)

    def selector_peer(self, policy: Policy, peer: Peer) -> np.ndarray:
        """Pods a selector peer of ``policy`` matches (rules S5, S8, M4, M5, M7)."""
        mask = self.part.copy()
        if not self.peer_clusters_unrestricted(peer):
            mask &= self.in_cluster(policy.cluster)
        if peer.namespace_selector is None:
            mask &= self.in_namespace_named(policy.namespace)  # namespace sameness (M5)
        else:
            mask &= self.pods_in_namespaces_matching(peer.namespace_selector)
        if peer.pod_selector is not None:
            mask &= self.pods_matching(peer.pod_selector)
        return mask

    def named_port(self, name: str, protocol: str) -> np.ndarray:
        """``int32[n]``: each pod's container port called ``name`` for ``protocol``, -1 if none."""
        vec = self._named.get((name, protocol))
        if vec is None:
            if self._port_sets is None:  # replicas share their ports: resolve per distinct set
                groups: dict[tuple, int] = {}
                self._port_of = np.fromiter((groups.setdefault(p.ports, len(groups)) for p in self.pods), dtype=np.int64, count=self.n)
                self._port_sets = list(groups)
            per_set = [next((cp.port for cp in ports if cp.name == name and cp.protocol == protocol), -1) for ports in self._port_sets]
            vec = np.asarray(per_set, dtype=np.int32)[self._port_of] if self.n else np.zeros(0, np.int32)
            self._named[(name, protocol)] = vec
        return vec

    def primary_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(``uint8[n, 16]`` keys of primary IPs, ``bool[n]`` has an IP)."""
        has = np.fromiter((p.ip is not None for p in self.pods), dtype=bool, count=self.n)
        keys = np.zeros((self.n, 16), dtype=np.uint8)
        if has.any():
            keys[has] = ip_keys([p.ip for p in self.pods if p.ip is not None])
        return keys, has


def peer_column(index: PodIndex, space: "AddressSpace", pod_interval: np.ndarray, has_ip: np.ndarray,
                policy: Policy, peer: Peer) -> np.ndarray:
    """``bool[space.size + len(has_ip)]``: the address intervals, then the pods, that one
    peer of ``policy`` matches — the one evaluation of a peer column that the full
    compile, the incremental compile and ``matrix`` share. ``has_ip`` and
    ``pod_interval`` give each pod's primary address: whether it has one, and the
    interval it falls in. Selector peers are answered for the pods of ``index``; pods
    after them (added since the index was built) are left False for the caller."""
    intervals = space.size
    out = np.zeros(intervals + len(has_ip), dtype=bool)
    if peer.ip_block is not None:  # rule M6: cluster-agnostic, also for pod addresses
        in_block = space.block_mask(peer.ip_block)
        out[:intervals] = in_block
        out[intervals:] = has_ip & in_block[pod_interval]
    else:
        out[intervals: intervals + index.n] = index.selector_peer(policy, peer)
    return out


def reaches_all_clusters(options: Options, peer: Peer) -> bool:
    """Rules M4/M7: does a selector peer reach beyond the policy's own cluster?"""
    if not options.multicluster:
        return False
    return options.default_peer_scope == "clusterset" or peer.mentions(MC_KEY)


def selector_peer_matches(cset: ClusterSet, policy: Policy, peer: Peer, pod: Pod, labels, ns_labels) -> bool:
    """One pod against one selector peer — :meth:`PodIndex.selector_peer` for a single
    pod, used by incremental recompiles. ``labels``/``ns_labels`` are the pod's and its
    namespace's effective labels."""
    if not pod.can_take_part:
        return False
    if pod.cluster != policy.cluster and not reaches_all_clusters(cset.options, peer):
        return False
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not peer.namespace_selector.matches(ns_labels):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(labels)


class _WithCluster:
    """A read-only label view with ``MC_KEY`` forced to the object's cluster (rule M2)."""

    __slots__ = ("labels", "cluster")

    def __init__(self, labels, cluster: str):
        self.labels, self.cluster = labels, cluster

    def items(self):
        for k, v in self.labels.items():
            if k != MC_KEY:
                yield k, v
        yield MC_KEY, self.cluster


# --------------------------------------------------------------------------- addresses


def _net_range(net) -> tuple[int, int]:
    """``[lo, hi)`` of a network in the 128-bit key space (IPv4 mapped into ::ffff:0:0/96)."""
    lo, hi = int(net.network_address), int(net.broadcast_address) + 1
    if net.version == 4:
        return _V4_LO + lo, _V4_LO + hi
    return lo, hi


class AddressSpace:
    """Intervals of the address space cut at every ipBlock boundary.

    An interval is either wholly inside or wholly outside each cidr and except, so an
    ipBlock is a boolean mask over intervals. IPv6 cidrs never contain IPv4 addresses
    (the reference's ``ip.version`` check), so the IPv4-mapped range is cut out of them.
    """

    def __init__(self, blocks: Iterable[IPBlock]):
        self.blocks = list(dict.fromkeys(blocks))
        cuts = {0, _V4_LO, _V4_HI}
        for b in self.blocks:
            for net in (b.cidr, *b.excepts):
                cuts.update(_net_range(net))
        cuts.discard(_TOP)
        self.bounds = sorted(cuts)
        self.position = {v: i for i, v in enumerate(self.bounds)}
        self.position[_TOP] = len(self.bounds)
        self.bound_keys = np.frombuffer(b"".join(v.to_bytes(16, "big") for v in self.bounds), dtype=np.uint8).reshape(-1, 16).copy()
        self._sorted = self.bound_keys.view("S16").ravel()
        self._masks: dict[IPBlock, np.ndarray] = {}

    @property
    def size(self) -> int:
        return len(self.bounds)

    def block_mask(self, block: IPBlock) -> np.ndarray:
        mask = self._masks.get(block)
        if mask is not None:
            return mask
        mask = np.zeros(self.size, dtype=bool)
        lo, hi = _net_range(block.cidr)
        mask[self.position[lo]: self.position[hi]] = True
        if block.cidr.version == 6:
            mask[self.position[_V4_LO]: self.position[_V4_HI]] = False
        for e in block.excepts:
            lo, hi = _net_range(e)
            mask[self.position[lo]: self.position[hi]] = False
        self._masks[block] = mask
        return mask

    def has_boundaries_of(self, block: IPBlock) -> bool:
        """Is ``block`` a union of intervals already (no new cut needed)?"""
        return all(v in self.position for net in (block.cidr, *block.excepts) for v in _net_range(net))

    def interval_of(self, keys: np.ndarray) -> np.ndarray:
        """``int64[n]`` interval of each ``uint8[n, 16]`` key."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        q = np.ascontiguousarray(keys).view("S16").ravel()
        return np.searchsorted(self._sorted, q, side="right") - 1


def policy_ip_blocks(policy: Policy) -> list[IPBlock]:
    return [peer.ip_block for d in (INGRESS, EGRESS) for r in policy.rules(d) for peer in r.peers if peer.ip_block is not None]


def all_ip_blocks(cset: ClusterSet) -> list[IPBlock]:
    return [b for p in cset.policies() for b in policy_ip_blocks(p)]
