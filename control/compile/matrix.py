"""Reachability of every (source, destination) pod pair for one port and protocol.

``mcnp matrix --summary`` over 3 clusters × 1,000 pods asks 9 million questions; the
compiled engine answers them without a Python loop over pairs. For one port and
protocol a rule's port part depends only on the destination (named ports, rule S4) and
its peer part only on the other end, so per direction:

* every rule becomes two boolean vectors over the pods (peer matches, port matches);
* subjects (the pods whose side is judged) are grouped by the policies isolating them
  (and, for ingress, by which rules' ports admit them as the destination);
* each group gets one row over the other ends — the OR of its rules' vectors;
* the pair matrix is one gather of those rows, egress AND ingress (rule M3).

Pods are judged as they are (rule M8: ``matrix`` works on pod references, so an IP two
pods claim does not matter here). ``reference_matrix`` asks the reference evaluator
pair by pair — the oracle, and the ``--engine reference`` path.
"""

from __future__ import annotations

import numpy as np

from control.compile.selection import EGRESS, INGRESS, AddressSpace, PodIndex, all_ip_blocks, peer_column, policies_for
from control.semantics.model import ClusterSet, Pod, Rule
from control.semantics.reference import ReferenceEvaluator


def reference_matrix(cset: ClusterSet, sources: list[Pod], destinations: list[Pod], port: int, protocol: str) -> np.ndarray:
    ev = ReferenceEvaluator(cset)
    out = np.zeros((len(sources), len(destinations)), dtype=bool)
    for i, s in enumerate(sources):
        for j, d in enumerate(destinations):
            out[i, j] = ev.allowed(s, d, port, protocol)
    return out


def compiled_matrix(cset: ClusterSet, sources: list[Pod], destinations: list[Pod], port: int, protocol: str) -> np.ndarray:
    """``bool[len(sources), len(destinations)]``: is each pair allowed, both sides?"""
    universe: dict[str, int] = {}
    pods: list[Pod] = []
    for p in (*sources, *destinations):
        if p.ref not in universe:
            universe[p.ref] = len(pods)
            pods.append(p)
    si = np.fromiter((universe[p.ref] for p in sources), dtype=np.int64, count=len(sources))
    di = np.fromiter((universe[p.ref] for p in destinations), dtype=np.int64, count=len(destinations))
    world = _World(cset, pods, port, protocol)
    egress = world.egress_rows()  # [groups, pods] over destinations, and group of each pod
    ingress = world.ingress_rows()  # [groups, pods] over sources, and group of each pod
    eg_rows, eg_group = egress
    in_rows, in_group = ingress
    allowed = eg_rows[np.ix_(eg_group[si], di)]
    allowed &= in_rows[np.ix_(in_group[di], si)].T
    return allowed


class _World:
    """Per-rule peer and port vectors over one list of pods, for one port/protocol."""

    def __init__(self, cset: ClusterSet, pods: list[Pod], port: int, protocol: str):
        self.cset = cset
        self.index = PodIndex(cset, pods)
        self.n = len(pods)
        self.port, self.protocol = port, protocol
        self.space = AddressSpace(all_ip_blocks(cset))
        keys, has_ip = self.index.primary_keys()
        self.pod_interval = np.where(has_ip, self.space.interval_of(keys), -1)
        self.has_ip = has_ip

    def _peers(self, policy, rule: Rule) -> np.ndarray:
        """Which pods (as the other end) some peer of ``rule`` matches."""
        if not rule.peers:
            return np.ones(self.n, dtype=bool)
        mask = np.zeros(self.n, dtype=bool)
        for peer in rule.peers:
            mask |= peer_column(self.index, self.space, self.pod_interval, self.has_ip, policy, peer)[self.space.size:]
        return mask

    def _ports(self, rule: Rule) -> np.ndarray | bool:
        """Which pods, as the destination, some port entry of ``rule`` admits."""
        if not rule.ports:
            return True
        result: np.ndarray | bool = False
        for spec in rule.ports:
            if spec.protocol != self.protocol:
                continue
            if spec.port is None:
                return True
            if isinstance(spec.port, str):  # rule S4, per destination pod
                result = result | (self.index.named_port(spec.port, self.protocol) == self.port)
            elif spec.end_port is not None:
                if spec.port <= self.port <= spec.end_port:
                    return True
            elif spec.port == self.port:
                return True
        return result

    def _selection(self, direction: str):
        policies = policies_for(self.cset, direction)
        present = set(self.index.ns_ids)
        policies = [p for p in policies if (p.cluster, p.namespace) in present]
        sel = np.zeros((len(policies), self.n), dtype=bool)
        for i, p in enumerate(policies):
            sel[i] = self.index.selected_by(p)
        return policies, sel

    def egress_rows(self) -> tuple[np.ndarray, np.ndarray]:
        policies, sel = self._selection(EGRESS)
        admits = np.zeros((len(policies), self.n), dtype=bool)  # over destinations
        for i, p in enumerate(policies):
            for rule in p.egress:
                ports = self._ports(rule)
                if ports is False:
                    continue
                admits[i] |= self._peers(p, rule) & ports
        groups, group_of = _group_columns(sel)
        rows = np.empty((len(groups), self.n), dtype=bool)
        for g, members in enumerate(groups):
            rows[g] = admits[members].any(axis=0) if len(members) else True
        return rows, group_of

    def ingress_rows(self) -> tuple[np.ndarray, np.ndarray]:
        policies, sel = self._selection(INGRESS)
        rules = [(i, p, r) for i, p in enumerate(policies) for r in p.ingress]
        ports = np.zeros((len(rules), self.n), dtype=bool)  # over destinations (the subjects)
        for k, (_, _, rule) in enumerate(rules):
            ports[k] = self._ports(rule)
        owner = np.fromiter((i for i, _, _ in rules), dtype=np.int64, count=len(rules))
        # A destination's row depends on its isolating policies and on which of their
        # rules' ports admit it: group by both.
        groups, group_of = _group_columns(np.vstack([sel, ports]))
        peers: dict[int, np.ndarray] = {}
        rows = np.empty((len(groups), self.n), dtype=bool)
        for g, members in enumerate(groups):
            chosen = members[members < len(policies)]
            if not len(chosen):
                rows[g] = True
                continue
            live = members[members >= len(policies)] - len(policies)
            live = live[np.isin(owner[live], chosen)]
            row = np.zeros(self.n, dtype=bool)
            for k in live:
                if k not in peers:
                    i, p, rule = rules[k]
                    peers[k] = self._peers(p, rule)
                row |= peers[k]
            rows[g] = row
        return rows, group_of


def _group_columns(matrix: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Group the columns of a boolean matrix by content: (for each group, the row
    indices set in it), and the group of each column."""
    n = matrix.shape[1]
    if matrix.shape[0] == 0:
        return [np.zeros(0, dtype=np.int64)], np.zeros(n, dtype=np.int64)
    packed = np.packbits(matrix, axis=0).T.copy()  # one row of bytes per column
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    uniq, first, group_of = np.unique(keys, return_index=True, return_inverse=True)
    groups = [np.flatnonzero(matrix[:, c]) for c in first]
    return groups, group_of.reshape(-1)
