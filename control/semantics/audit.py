"""Audit mode: which policies are tried rather than enforced, and what that means.

An operator rolling out a policy wants to see what it would block before it blocks
anything. A policy in audit mode is left out of enforcement entirely: the enforced
verdict is the verdict of the cluster set *without* the audited policies, so a pod
isolated only by audited policies is not isolated, and an enforced policy is never
widened by an audited one's rules (they are not there). What full enforcement would
decide is the verdict of the cluster set *with* every policy; traffic the first admits
and the second denies passes and is recorded as "would deny" (docs/operations.md,
"Audit mode").

A policy is in audit when its annotation ``mcnp.io/audit: "true"`` says so, or when
the node's ``audit`` setting names it, its namespace or its cluster
(:class:`AuditScope`). Audit never widens anything it does not name: a policy outside
the scope is enforced exactly as before, whatever the audited ones say.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from control.semantics.model import ClusterSet, Policy
from control.semantics.objects import DNS_LABEL
from control.semantics.reference import ReferenceEvaluator, Side

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditScope:
    """The ``audit`` setting: whole clusters, namespaces (``cluster/ns``) and policies
    (``cluster/ns/name``) in audit mode, besides policies annotated so."""

    clusters: frozenset = frozenset()
    namespaces: frozenset = frozenset()
    policies: frozenset = frozenset()

    @classmethod
    def parse(cls, scopes: Iterable[str]) -> "AuditScope":
        """From ``--audit`` values: ``cluster``, ``cluster/ns`` or ``cluster/ns/name``.
        Raises ValueError naming the first value that is none of those."""
        parts: dict[int, set] = {1: set(), 2: set(), 3: set()}
        for text in scopes:
            pieces = str(text).split("/")
            if len(pieces) not in parts or not all(pieces) or not DNS_LABEL.match(pieces[0]):
                raise ValueError(f"{text!r} is not CLUSTER, CLUSTER/NAMESPACE or CLUSTER/NAMESPACE/POLICY")
            parts[len(pieces)].add(str(text))
        return cls(frozenset(parts[1]), frozenset(parts[2]), frozenset(parts[3]))

    @classmethod
    def from_mapping(cls, data: Any) -> "AuditScope":
        """From the config file: ``{clusters: [...], namespaces: [...], policies: [...]}``
        (each a list of the matching form), or a list of ``--audit`` values."""
        if isinstance(data, AuditScope):
            return data
        if data is None:
            return cls()
        if isinstance(data, list):
            return cls.parse(data)
        if not isinstance(data, Mapping):
            raise TypeError("must be a mapping {clusters, namespaces, policies} or a list of scopes")
        unknown = sorted(set(data) - {"clusters", "namespaces", "policies"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(str, unknown))} (clusters, namespaces, policies)")
        scope = cls()
        for key, depth in (("clusters", 1), ("namespaces", 2), ("policies", 3)):
            values = data.get(key) or []
            if not isinstance(values, list):
                raise TypeError(f"{key}: must be a list")
            wrong = [v for v in values if not isinstance(v, str) or v.count("/") != depth - 1]
            if wrong:
                raise ValueError(f"{key}: {wrong[0]!r} is not {'/'.join(['CLUSTER', 'NAMESPACE', 'POLICY'][:depth])}")
            scope = scope.merge(cls.parse(values))
        return scope

    def merge(self, other: "AuditScope") -> "AuditScope":
        return AuditScope(self.clusters | other.clusters, self.namespaces | other.namespaces,
                          self.policies | other.policies)

    def by(self, policy: Policy) -> Optional[str]:
        """Why ``policy`` is in audit (``annotation`` or ``setting``), None when it is
        enforced. A fail-closed stand-in (rule S9) is audited only when the setting
        names it: an invalid object's own annotation is not trusted."""
        if policy.audit and not policy.rejected:
            return "annotation"
        if policy.cluster in self.clusters or f"{policy.cluster}/{policy.namespace}" in self.namespaces \
                or policy.ref in self.policies:
            return "setting"
        return None

    def covers(self, policy: Policy) -> bool:
        return self.by(policy) is not None

    def cluster_names(self) -> set[str]:
        """Every cluster the setting names (to check against the clusterset)."""
        return set(self.clusters) | {s.split("/", 1)[0] for s in self.namespaces | self.policies}

    def to_json(self) -> dict:
        return {"clusters": sorted(self.clusters), "namespaces": sorted(self.namespaces),
                "policies": sorted(self.policies)}


NO_SETTING = AuditScope()


def any_audited(cset: ClusterSet, scope: AuditScope, clusters: Optional[Iterable[str]] = None) -> bool:
    """Whether some policy (of ``clusters``, None: of any) is in audit."""
    wanted = None if clusters is None else set(clusters)
    return any(scope.covers(p) for name, state in cset.clusters.items()
               if wanted is None or name in wanted for p in state.policies.values())


def enforced(cset: ClusterSet, scope: AuditScope) -> ClusterSet:
    """The cluster set as enforcement sees it: every audited policy left out (the
    objects are shared, not copied). ``cset`` itself when nothing is in audit."""
    if not any_audited(cset, scope):
        return cset
    clusters = {name: dataclasses.replace(state, policies={k: p for k, p in state.policies.items() if not scope.covers(p)})
                for name, state in cset.clusters.items()}
    return ClusterSet(clusters, cset.options)


def explain(cset: ClusterSet, scope: AuditScope, src, dst, port: int, protocol: str) -> dict:
    """``explain``'s JSON with audit mode: the verdict enforcement gives, and per side
    (and overall) whether full enforcement would deny it (``would_deny``) and which of
    the policies isolating the pod are in audit (``audit_policies``, with
    ``audit_reason``: what full enforcement says)."""
    full = ReferenceEvaluator(cset).evaluate(src, dst, port, protocol)
    in_force = enforced(cset, scope)
    verdict = full if in_force is cset else ReferenceEvaluator(in_force).evaluate(src, dst, port, protocol)
    out = verdict.to_json()
    for name, side, whole in (("egress", verdict.egress, full.egress), ("ingress", verdict.ingress, full.ingress)):
        out[name].update(_audit_side(cset, scope, side, whole))
    out["would_deny"] = verdict.allowed and not full.allowed
    return out


def _audit_side(cset: ClusterSet, scope: AuditScope, side: Side, whole: Side) -> dict:
    """One side's audit fields: ``whole`` is the side judged with every policy."""
    audited = [ref for ref in whole.policies if scope.covers(policy_of(cset, ref))]
    return {"audit_policies": audited, "would_deny": side.allowed and not whole.allowed,
            "audit_reason": whole.reason if audited else None}


def policy_of(cset: ClusterSet, ref: str) -> Policy:
    cluster, namespace, name = ref.split("/", 2)
    return cset.clusters[cluster].policies[(namespace, name)]
