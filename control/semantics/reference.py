"""The reference evaluator: the rules of docs/semantics.md, read literally, one pair at a time.

It is deliberately simple — a direct transcription of rules S1–S9 and M1–M8 with the
reasons kept — because it is the meaning of mcnp: ``mcnp explain`` answers with it, and
the compiled matcher is tested against it. Nothing here is optimised.

Traffic is judged twice (rule M3): egress by the source pod's cluster with the source
pod's policies, ingress by the destination pod's cluster with the destination's. An
endpoint that is a bare IP (not a pod that can take part, rule S8) is judged by nobody
on its side, and only ipBlock peers can match it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

from control.semantics.model import MC_KEY, ClusterSet, IPAddress, Peer, Pod, Policy, PortSpec

INGRESS, EGRESS = "Ingress", "Egress"

Endpoint = Union[Pod, IPAddress]


@dataclass
class Decision:
    """What admitted the traffic on one side: policy, rule, peer and port indices."""

    policy: str  # cluster/namespace/name
    direction: str
    rule: int
    peer: Optional[int]  # None: the rule has no peers (matches all)
    port: Optional[int]  # None: the rule has no ports (matches all)
    peer_text: str = "all peers"
    port_text: str = "all ports"

    def to_json(self) -> dict:
        return {
            "policy": self.policy,
            "rule": f"{'ingress' if self.direction == INGRESS else 'egress'}[{self.rule}]",
            "peer": self.peer,
            "port": self.port,
            "peer_text": self.peer_text,
            "port_text": self.port_text,
        }


@dataclass
class Side:
    """One direction's verdict with its reasons."""

    direction: str
    cluster: Optional[str]  # the cluster that enforces this side; None for a non-pod
    pod: Optional[str]
    isolated: bool = False
    policies: list[str] = field(default_factory=list)  # those isolating the pod
    decision: Optional[Decision] = None
    rejected: list[str] = field(default_factory=list)  # fail-closed stand-ins among policies

    @property
    def allowed(self) -> bool:
        return not self.isolated or self.decision is not None

    @property
    def reason(self) -> str:
        what = "egress" if self.direction == EGRESS else "ingress"
        if self.pod is None:
            return f"the {'source' if self.direction == EGRESS else 'destination'} is not a pod: no {what} policy applies"
        if not self.isolated:
            return f"{self.pod} is not isolated for {what}: no policy selects it with {self.direction}"
        if self.decision is not None:
            d = self.decision
            return f"allowed by {d.policy} {what}[{d.rule}] (peer: {d.peer_text}; port: {d.port_text})"
        return f"{self.pod} is isolated for {what} by {', '.join(self.policies)} and no rule admits this traffic"

    def to_json(self) -> dict:
        return {
            "cluster": self.cluster,
            "pod": self.pod,
            "isolated": self.isolated,
            "policies": self.policies,
            "allowed": self.allowed,
            "rule": self.decision.to_json() if self.decision else None,
            "reason": self.reason,
        }


@dataclass
class Verdict:
    egress: Side
    ingress: Side

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    def to_json(self) -> dict:
        return {"allowed": self.allowed, "egress": self.egress.to_json(), "ingress": self.ingress.to_json()}


class ReferenceEvaluator:
    """Judges (source, destination, port, protocol) over a :class:`ClusterSet`."""

    def __init__(self, cset: ClusterSet):
        self.cset = cset
        self.options = cset.options

    # ------------------------------------------------------------------ selection

    def selects(self, policy: Policy, pod: Pod) -> bool:
        """Rule M3: a policy selects pods of its own cluster and namespace only."""
        return (
            pod.can_take_part
            and pod.cluster == policy.cluster
            and pod.namespace == policy.namespace
            and policy.pod_selector.matches(self.cset.effective_pod_labels(pod))
        )

    def isolating(self, pod: Pod, direction: str) -> list[Policy]:
        """Rule S1: the policies of the pod's namespace that select it for ``direction``."""
        state = self.cset.clusters[pod.cluster]
        found = [p for p in state.policies.values() if direction in p.types and self.selects(p, pod)]
        return sorted(found, key=lambda p: (p.namespace, p.name))

    def peer_clusters(self, policy: Policy, peer: Peer) -> list[str]:
        """Rules M4/M7: which clusters a selector peer can reach."""
        if not self.options.multicluster:
            return [policy.cluster]
        if peer.mentions(MC_KEY) or self.options.default_peer_scope == "clusterset":
            return list(self.cset.clusters)
        return [policy.cluster]

    def peer_matches(self, policy: Policy, peer: Peer, target: Endpoint) -> bool:
        if peer.ip_block is not None:  # rule M6: cluster-agnostic, also for pod IPs
            ip = target.ip if isinstance(target, Pod) else target
            return ip is not None and peer.ip_block.contains(ip)
        if not isinstance(target, Pod) or not target.can_take_part:
            return False
        if target.cluster not in self.peer_clusters(policy, peer):
            return False
        if peer.namespace_selector is None:
            # podSelector alone: the policy's namespace — in another cluster, the
            # namespace of the same name (rule M5, namespace sameness).
            if target.namespace != policy.namespace:
                return False
        elif not peer.namespace_selector.matches(self.cset.effective_namespace_labels(target.cluster, target.namespace)):
            return False
        return peer.pod_selector is None or peer.pod_selector.matches(self.cset.effective_pod_labels(target))

    @staticmethod
    def port_matches(spec: PortSpec, dst: Endpoint, port: int, protocol: str) -> bool:
        if spec.protocol != protocol:
            return False
        if spec.port is None:
            return True
        if isinstance(spec.port, str):  # rule S4: resolved against the destination pod
            if not isinstance(dst, Pod):
                return False  # rule S8: a named port towards a non-pod matches nothing
            return dst.named_port(spec.port, protocol) == port
        if spec.end_port is not None:
            return spec.port <= port <= spec.end_port
        return spec.port == port

    # ------------------------------------------------------------------ verdicts

    def side(self, direction: str, subject: Endpoint, other: Endpoint, dst: Endpoint, port: int, protocol: str) -> Side:
        if not isinstance(subject, Pod) or not subject.can_take_part:
            return Side(direction, None, None)
        policies = self.isolating(subject, direction)
        side = Side(direction, subject.cluster, subject.ref, bool(policies), [p.ref for p in policies])
        side.rejected = [p.ref for p in policies if p.rejected]
        for policy in policies:
            for ri, rule in enumerate(policy.rules(direction)):
                peer_idx = None
                if rule.peers:
                    peer_idx = next((i for i, peer in enumerate(rule.peers) if self.peer_matches(policy, peer, other)), None)
                    if peer_idx is None:
                        continue
                port_idx = None
                if rule.ports:
                    port_idx = next((i for i, s in enumerate(rule.ports) if self.port_matches(s, dst, port, protocol)), None)
                    if port_idx is None:
                        continue
                side.decision = Decision(
                    policy.ref, direction, ri, peer_idx, port_idx,
                    str(rule.peers[peer_idx]) if peer_idx is not None else "all peers",
                    str(rule.ports[port_idx]) if port_idx is not None else "all ports",
                )
                return side
        return side

    def evaluate(self, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> Verdict:
        """The whole verdict: egress by the source's cluster AND ingress by the
        destination's (rule M3). A pod talking to itself is judged like any pair (S7)."""
        return Verdict(
            egress=self.side(EGRESS, src, dst, dst, port, protocol),
            ingress=self.side(INGRESS, dst, src, dst, port, protocol),
        )

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
        return self.evaluate(src, dst, port, protocol).allowed


def resolve_endpoint(cset: ClusterSet, text: str) -> Endpoint:
    """A pod reference ``cluster/namespace/pod`` or an IP address. An IP that exactly
    one pod claims resolves to that pod; one claimed by pods of two clusters is a
    conflict (rule M8) and stays a bare IP."""
    if "/" in text:
        parts = text.split("/")
        if len(parts) != 3:
            raise LookupError(f"{text!r} is not a pod reference (cluster/namespace/pod)")
        if parts[0] not in cset.clusters:
            raise LookupError(f"no cluster {parts[0]!r} is loaded (clusters: {', '.join(sorted(cset.clusters))})")
        pod = cset.pod(text)
        if pod is None:
            raise LookupError(f"no pod {text!r}: cluster {parts[0]!r} has no pod {parts[2]!r} in namespace {parts[1]!r}")
        return pod
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise LookupError(f"{text!r} is neither a pod reference (cluster/namespace/pod) nor an IP address") from None
    owners = [p for p in cset.pods() if p.can_take_part and ip in p.ips]
    return owners[0] if len(owners) == 1 else ip
