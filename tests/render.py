"""Model values back into the objects ``kubectl get -o yaml`` prints: the inverse of
``control.semantics.objects``, so generated worlds (benchmarks, the soak run) are written as the
manifests a user would have and read back through the same parser."""

from __future__ import annotations

from control.semantics.model import NS_NAME_KEY, ClusterState, Namespace, Peer, Pod, Policy, Rule, Selector


def selector_doc(sel: Selector) -> dict:
    exprs = []
    for r in sel.requirements:
        expr = {"key": r.key, "operator": r.op}
        if r.op in ("In", "NotIn"):
            expr["values"] = sorted(r.values)
        exprs.append(expr)
    return {"matchExpressions": exprs} if exprs else {}


def peer_doc(peer: Peer) -> dict:
    if peer.ip_block is not None:
        block = {"cidr": str(peer.ip_block.cidr)}
        if peer.ip_block.excepts:
            block["except"] = [str(e) for e in peer.ip_block.excepts]
        return {"ipBlock": block}
    out = {}
    if peer.pod_selector is not None:
        out["podSelector"] = selector_doc(peer.pod_selector)
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = selector_doc(peer.namespace_selector)
    return out


def rule_doc(rule: Rule, peers_key: str) -> dict:
    out: dict = {}
    if rule.peers:
        out[peers_key] = [peer_doc(p) for p in rule.peers]
    if rule.ports:
        out["ports"] = [{k: v for k, v in (("protocol", p.protocol), ("port", p.port), ("endPort", p.end_port)) if v is not None}
                        for p in rule.ports]
    return out


def policy_doc(p: Policy) -> dict:
    spec = {"podSelector": selector_doc(p.pod_selector), "policyTypes": sorted(p.types),
            "ingress": [rule_doc(r, "from") for r in p.ingress], "egress": [rule_doc(r, "to") for r in p.egress]}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": p.name, "namespace": p.namespace}, "spec": spec}


def pod_doc(p: Pod) -> dict:
    ports = [{"containerPort": c.port, "protocol": c.protocol, **({"name": c.name} if c.name else {})} for c in p.ports]
    spec: dict = {"containers": [{"name": "main", "ports": ports}]}
    if p.node is not None:
        spec["nodeName"] = p.node
    if p.host_network:
        spec["hostNetwork"] = True
    status: dict = {"phase": p.phase}
    if p.ips:
        status["podIP"] = str(p.ips[0])
        status["podIPs"] = [{"ip": str(ip)} for ip in p.ips]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels)},
            "spec": spec, "status": status}


def namespace_doc(ns: Namespace) -> dict:
    labels = {k: v for k, v in ns.labels.items() if k != NS_NAME_KEY}  # the API server sets it
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": labels}}


def cluster_docs(state: ClusterState) -> list[dict]:
    """Every object of one cluster; fail-closed stand-ins of rejected policies are left
    out (they were never written by anyone)."""
    return ([namespace_doc(n) for n in state.namespaces.values()]
            + [pod_doc(p) for p in state.pods.values()]
            + [policy_doc(p) for p in state.policies.values() if not p.rejected])
