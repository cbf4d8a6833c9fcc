"""Policies that are valid but probably not what their author meant (``mcnp lint``).

Invalid objects stop the offline tools (rule S9); these findings do not, because each
has a legitimate reading: a selector naming a cluster that is not in the clusterset
(yet) admits nothing from it, and a policy that selects no pod today may select the
pods of tomorrow's deployment. They are worth a look before a rollout, and ``matrix``
prints the same warnings for the clusterset it loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

from control.semantics.model import MC_KEY, ClusterSet, Peer, Policy, Selector
from control.semantics.reference import EGRESS, INGRESS, ReferenceEvaluator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One warning about one policy, naming where it was read and the field concerned."""

    policy: str  # cluster/namespace/name
    source: str
    field: str
    message: str
    kind: str  # "unknown-cluster" or "selects-nothing"

    def __str__(self) -> str:
        ns_name = self.policy.split("/", 1)[1]
        return f"{self.source}: NetworkPolicy {ns_name} (cluster {self.policy.split('/')[0]}): {self.field}: {self.message}"

    def to_json(self) -> dict:
        return {"policy": self.policy, "source": self.source, "field": self.field, "message": self.message, "kind": self.kind}


def lint(cset: ClusterSet) -> list[Finding]:
    """Every finding over the clusterset's policies, in policy order."""
    evaluator = ReferenceEvaluator(cset)
    out: list[Finding] = []
    for policy in sorted(cset.policies(), key=lambda p: p.ref):
        if policy.rejected:
            continue  # an invalid object: reported as an error, not linted
        out.extend(unknown_clusters(cset, policy))
        if not any(evaluator.selects(policy, pod) for pod in cset.clusters[policy.cluster].pods.values()):
            out.append(Finding(policy.ref, policy.source, "spec.podSelector",
                               f"selects no pod of namespace {policy.namespace} ({policy.pod_selector}): "
                               "it isolates nothing and admits nothing", "selects-nothing"))
    return out


def unknown_clusters(cset: ClusterSet, policy: Policy) -> Iterator[Finding]:
    """Peers whose selectors name (``In`` or ``matchLabels``) clusters not loaded."""
    known = set(cset.clusters)
    for direction, rules in ((INGRESS, policy.ingress), (EGRESS, policy.egress)):
        side, peers_key = ("ingress", "from") if direction == INGRESS else ("egress", "to")
        for ri, rule in enumerate(rules):
            for pi, peer in enumerate(rule.peers):
                for which, names in named_clusters(peer):
                    missing = sorted(names - known)
                    if missing and cset.options.multicluster:
                        yield Finding(policy.ref, policy.source, f"spec.{side}[{ri}].{peers_key}[{pi}].{which}",
                                      f"names cluster {', '.join(missing)}, not in the clusterset "
                                      f"({', '.join(sorted(known))}): nothing there is admitted", "unknown-cluster")


def named_clusters(peer: Peer) -> Iterator[tuple[str, frozenset]]:
    """(selector field, cluster names) for each selector of ``peer`` naming clusters."""
    for which, selector in (("podSelector", peer.pod_selector), ("namespaceSelector", peer.namespace_selector)):
        names = _named(selector)
        if names:
            yield which, names


def _named(selector: Optional[Selector]) -> frozenset:
    if selector is None:
        return frozenset()
    found: set[str] = set()
    for req in selector.requirements:
        if req.key == MC_KEY and req.op in ("In", "NotIn"):
            found |= set(req.values)
    return frozenset(found)
