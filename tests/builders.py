"""Small builders for tests: raw Kubernetes objects in the shapes ``kubectl`` prints,
and a :class:`ClusterSet` made from them through the real parser."""

from __future__ import annotations

from typing import Any, Callable

from control.semantics import objects
from control.semantics.model import ClusterSet, ClusterState, Options

Tweak = Callable[[dict], None]


def make_namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels)}}


def make_pod(namespace: str, name: str, ip: str, labels: dict | None = None, ports: list | None = None, *tweaks: Tweak) -> dict:
    """A running pod; ``ports`` as ``[(name, number, protocol)]``."""
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in (ports or [])]}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }
    for tweak in tweaks:
        tweak(obj)
    return obj


def make_policy(namespace: str, name: str, pod_selector: dict | None = None, *, ingress: Any = None, egress: Any = None, types: list | None = None) -> dict:
    spec: dict = {"podSelector": pod_selector if pod_selector is not None else {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def make_clusterset(clusters: dict[str, list[dict]], options: Options = Options()) -> ClusterSet:
    """``{cluster: [objects]}`` → ClusterSet, through the strict parser. Namespaces that
    pods use but that are not listed are created with their default label."""
    cset = ClusterSet(options=options)
    for cname, objs in clusters.items():
        state = ClusterState(cname)
        for obj in objs:
            kind = obj["kind"]
            if kind == "Namespace":
                ns = objects.namespace(obj, cname, "test")
                state.namespaces[ns.name] = ns
            elif kind == "Pod":
                pod = objects.pod(obj, cname, "test")
                state.pods[(pod.namespace, pod.name)] = pod
            else:
                pol = objects.network_policy(obj, cname, "test")
                state.policies[(pol.namespace, pol.name)] = pol
        for pod in list(state.pods.values()):
            if pod.namespace not in state.namespaces:
                state.namespaces[pod.namespace] = objects.namespace(make_namespace(pod.namespace), cname, "test")
        cset.clusters[cname] = state
    return cset


def peer_pods(**labels: str) -> dict:
    return {"podSelector": {"matchLabels": dict(labels)}}


def peer_ns(**labels: str) -> dict:
    return {"namespaceSelector": {"matchLabels": dict(labels)}}
