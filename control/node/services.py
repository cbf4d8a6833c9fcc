"""Service addresses for the dataplane (rule S11), derived from the store's snapshot.

Policies apply to pod addresses after Service translation, but a packet leaving a pod
still carries the ClusterIP: kube-proxy (or any NAT on the node) picks the backend
after the pod's egress hook saw it. So the dataplane needs, per Service address of the
local cluster (its ClusterIPs, and the external and load-balancer addresses kube-proxy
translates the same way), protocol and port, the endpoints a connection there can
reach, and where the source's egress is to be judged:

* ``defer`` — every endpoint is a pod of the local cluster that takes part (rule S8):
  the connection reaches that pod's veth after NAT, where the pod's node judges the
  source's egress (every node of the cluster enforces its pods' egress) and the
  backend's ingress against the backend actually chosen.
* otherwise — some endpoint is not such a pod (a node, an external address, a pod of
  another cluster, an address two clusters claim): nobody would see the connection
  after NAT with the source known, so the source's node judges its egress against
  *every* endpoint address on its port, and lets it pass only if all would: whichever
  one kube-proxy picks, the connection is one policy allows (conservative, never wider
  than S11).
* no ready endpoint — the entry lists none and the dataplane denies it, as kube-proxy
  rejects it. So does a Service that stands in for an invalid one, and one whose
  EndpointSlice is invalid (rule S9): what it would reach cannot be known.

Only the local cluster's Services appear: a ClusterIP is translated only by the nodes
of its own cluster, and remote clusters' Services never reach this node's NAT.
"""

from __future__ import annotations

import logging
from typing import Optional

from control.semantics.model import PROTOCOL_NUMBERS, ClusterSet, ClusterState, EndpointSlice, Service, ServicePort

logger = logging.getLogger(__name__)

#: Service types with a ClusterIP that kube-proxy translates.
TRANSLATED_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


def services_for(cset: ClusterSet, local_cluster: str) -> list[dict]:
    """One entry per (address, protocol, port) of every Service of ``local_cluster``
    with a ClusterIP (its ClusterIPs, external IPs and load-balancer IPs: see
    ``Service.addresses``), sorted by address, protocol and port::

        {"ip": "198.19.254.10", "protocol": 6, "port": 80, "service": "cluster/ns/name",
         "endpoints": [["198.18.1.5", 8080], ...], "defer": bool}

    Two Services claiming one address and port (which the API server never allows, a
    manifest directory may) give one entry with the endpoints of both, their
    references joined by ``,``: the conservative rule then covers either."""
    state = cset.clusters.get(local_cluster)
    if state is None:
        return []
    slices = _slices_by_service(state)
    entries: dict[tuple, dict] = {}
    for svc in sorted(state.services.values(), key=lambda s: (s.namespace, s.name)):
        if svc.type not in TRANSLATED_TYPES:
            continue
        own = slices.get((svc.namespace, svc.name), [])
        blocked = svc.rejected is not None or svc.namespace in slices.blocked \
            or any(s.rejected is not None for s in own)
        for ip in svc.addresses:
            for port in svc.ports:
                endpoints = set() if blocked else _endpoints(own, port, ip.version)
                _add(entries, (ip.version, ip.packed, PROTOCOL_NUMBERS[port.protocol], port.port), svc, ip, port,
                     endpoints)
    deferrable = _deferrable(cset, local_cluster, {ep[0] for e in entries.values() for ep in e["endpoints"]})
    out = []
    for key in sorted(entries):
        entry = entries[key]
        eps = sorted(entry["endpoints"], key=lambda e: (e[0].version, e[0].packed, e[1]))
        entry["defer"] = bool(eps) and all(ip in deferrable for ip, _ in eps)
        entry["endpoints"] = [[str(ip), port] for ip, port in eps]
        out.append(entry)
    return out


def _add(entries: dict, key: tuple, svc: Service, ip, port: ServicePort, endpoints: set) -> None:
    entry = entries.get(key)
    if entry is None:
        entries[key] = {"ip": str(ip), "protocol": key[2], "port": port.port, "service": svc.ref,
                        "endpoints": endpoints, "defer": False}
        return
    logger.warning("Services %s and %s both claim %s %s/%d: judged against the endpoints of both",
                   entry["service"], svc.ref, ip, port.protocol, port.port)
    entry["service"] += f",{svc.ref}"
    entry["endpoints"] |= endpoints


class _Slices(dict):
    """(namespace, Service name) → its EndpointSlices; ``blocked``: the namespaces
    where an invalid slice whose Service cannot be read leaves every Service none."""

    def __init__(self):
        super().__init__()
        self.blocked: set[str] = set()


def _slices_by_service(state: ClusterState) -> _Slices:
    out = _Slices()
    for s in state.endpoint_slices.values():
        if s.service is not None:
            out.setdefault((s.namespace, s.service), []).append(s)
        elif s.rejected is not None:
            out.blocked.add(s.namespace)
    return out


def _endpoints(slices: list[EndpointSlice], port: ServicePort, version: int) -> set:
    """The ready endpoints of ``port`` in ``slices``, as (address, port) pairs: from each
    slice of the ClusterIP's family, the port entry of the Service port's name (both
    unnamed, or the same name) and protocol. Every address an endpoint lists counts
    (kube-proxy uses the first; judging all is never wider)."""
    out = set()
    for s in slices:
        if s.address_type != f"IPv{version}":
            continue
        number = _slice_port(s, port)
        if number is None:
            continue
        for ep in s.endpoints:
            if ep.ready:
                out.update((ip, number) for ip in ep.addresses)
    return out


def _slice_port(s: EndpointSlice, port: ServicePort) -> Optional[int]:
    for p in s.ports:
        if p.name == port.name and p.protocol == port.protocol:
            return p.port
    return None


def _deferrable(cset: ClusterSet, local_cluster: str, addresses: set) -> set:
    """Those of ``addresses`` that are the address of a pod of the local cluster that
    takes part (rule S8) and of no pod of another cluster (rule M8: an address two
    clusters claim is unknown to the dataplane)."""
    if not addresses:
        return set()
    local, foreign = set(), set()
    for pod in cset.pods():
        if not pod.can_take_part:
            continue
        hits = addresses.intersection(pod.ips)
        if hits:
            (local if pod.cluster == local_cluster else foreign).update(hits)
    return local - foreign

