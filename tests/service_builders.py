"""Service and EndpointSlice objects in the shapes ``kubectl get -o yaml`` prints, for the
tests of rule S11 (parsing, the store, the sources and ``services_for``)."""

from __future__ import annotations

from typing import Optional


def make_service(namespace: str, name: str, cluster_ips, ports: list, type_: Optional[str] = None) -> dict:
    """``cluster_ips``: one address (or ``"None"``), a list of them, or None for none;
    ``ports`` as ``[(name or None, port, protocol)]``."""
    spec: dict = {"ports": [{"port": p, "protocol": proto, "targetPort": p, **({"name": n} if n else {})}
                            for n, p, proto in ports]}
    if isinstance(cluster_ips, str):
        cluster_ips = [cluster_ips]
    if cluster_ips:
        spec["clusterIP"], spec["clusterIPs"] = cluster_ips[0], list(cluster_ips)
    if type_ is not None:
        spec["type"] = type_
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def make_slice(namespace: str, name: str, service: Optional[str], ports: list, endpoints: list,
               address_type: str = "IPv4") -> dict:
    """``ports`` as ``[(name or None, port, protocol)]``; ``endpoints`` as addresses (a
    ready endpoint each) or ``(address or [addresses], ready)`` pairs (``ready`` None:
    no condition given)."""
    eps = []
    for e in endpoints:
        addresses, ready = (e, True) if isinstance(e, str) else e
        entry: dict = {"addresses": [addresses] if isinstance(addresses, str) else list(addresses)}
        if ready is not None:
            entry["conditions"] = {"ready": ready}
        eps.append(entry)
    meta: dict = {"name": name, "namespace": namespace}
    if service is not None:
        meta["labels"] = {"kubernetes.io/service-name": service}
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, "addressType": address_type,
        "ports": [{"name": n or "", "port": p, "protocol": proto} for n, p, proto in ports], "endpoints": eps,
    }
