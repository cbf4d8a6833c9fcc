"""Kubernetes objects (as ``kubectl get -o yaml`` prints them) → validated model values.

This module is the one choke point that rejects invalid input. It validates what the
API server would (so a manifest the server would refuse cannot silently mean
something) and raises :class:`~control.semantics.model.InvalidObject` naming the source, the
object and the field path.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any, Mapping, Optional

from control.semantics.model import (
    AUDIT_ANNOTATION,
    EVERYTHING,
    NS_NAME_KEY,
    PROTOCOLS,
    SERVICE_NAME_KEY,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    IPBlock,
    Namespace,
    Peer,
    Pod,
    Policy,
    PortSpec,
    Requirement,
    Rule,
    Selector,
    Service,
    ServicePort,
)

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: Service names are RFC 1035 labels: they start with a letter.
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
#: Most addresses one endpoint of an EndpointSlice may list (as the API server allows).
MAX_ENDPOINT_ADDRESSES = 100


def describe(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` for messages, robust to malformed metadata."""
    kind = obj.get("kind", "object") if isinstance(obj, Mapping) else "object"
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name", "?")
    ns = meta.get("namespace")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


class _Ctx:
    """Where we are, so every error names file, object and field. The object's
    description is made only when an error needs it (most objects are valid, and a
    daemon's first lists parse tens of thousands of them)."""

    __slots__ = ("source", "_obj")

    def __init__(self, source: str, obj: Mapping[str, Any]):
        self.source = source
        self._obj = obj

    @property
    def obj(self) -> str:
        return describe(self._obj)

    def fail(self, path: str, message: str) -> InvalidObject:
        return InvalidObject(self.source, self.obj, path, message)


# --------------------------------------------------------------------------- helpers


def _mapping(ctx: _Ctx, value: Any, path: str, required: bool = False) -> Mapping[str, Any]:
    if type(value) is dict:  # parsed JSON and YAML; the ABC check below is slow
        return value
    if value is None:
        if required:
            raise ctx.fail(path, "is required")
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"must be an object, not {type(value).__name__}")
    return value


def _list(ctx: _Ctx, value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, f"must be a list, not {type(value).__name__}")
    return value


def _protocol(ctx: _Ctx, value: Any, path: str) -> str:
    """A protocol field: TCP when omitted, else exactly TCP, UDP or SCTP (the API server
    is case-sensitive, so ``tcp`` is refused rather than guessed)."""
    protocol = value or "TCP"
    if protocol not in PROTOCOLS:
        raise ctx.fail(path, f"unsupported protocol {protocol!r} (must be TCP, UDP or SCTP)")
    return protocol


def _port_number(ctx: _Ctx, value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(path, f"invalid port {value!r}" if value is not None else "is required")
    if not 1 <= value <= 65535:
        raise ctx.fail(path, f"port {value} out of range 1-65535")
    return value


def _ip_address(ctx: _Ctx, value: Any, path: str):
    try:
        return ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise ctx.fail(path, f"invalid IP address {value!r}") from None


#: Label keys and values already found valid (labels repeat across objects); bounded,
#: emptied when full.
_VALID_KEYS: set = set()
_VALID_VALUES: set = set()
_VALID_MAX = 1 << 16


def _remember(cache: set, item: str) -> None:
    if len(cache) >= _VALID_MAX:
        cache.clear()
    cache.add(item)


def _label_key(ctx: _Ctx, key: Any, path: str) -> str:
    if type(key) is str and key in _VALID_KEYS:
        return key
    if not isinstance(key, str) or not key:
        raise ctx.fail(path, f"invalid label key {key!r}")
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ctx.fail(path, f"invalid label key {key!r}: bad prefix")
    if len(name) > 63 or not _LABEL_NAME.match(name):
        raise ctx.fail(path, f"invalid label key {key!r}")
    if type(key) is str:
        _remember(_VALID_KEYS, key)
    return key


def _label_value(ctx: _Ctx, value: Any, path: str) -> str:
    if type(value) is str and value in _VALID_VALUES:
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.fail(path, f"invalid label value {value!r}")
    value = str(value)
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ctx.fail(path, f"invalid label value {value!r}")
    _remember(_VALID_VALUES, value)
    return value


def labels_of(ctx: _Ctx, value: Any, path: str) -> dict[str, str]:
    if type(value) is dict and value.keys() <= _VALID_KEYS and all(type(v) is str and v in _VALID_VALUES for v in value.values()):
        return dict(value)  # every label seen valid before: nothing to check or name
    return {_label_key(ctx, k, f"{path}.{k}"): _label_value(ctx, v, f"{path}.{k}") for k, v in _mapping(ctx, value, path).items()}


def selector(ctx: _Ctx, value: Any, path: str) -> Selector:
    """A LabelSelector: matchLabels and matchExpressions, ANDed."""
    value = _mapping(ctx, value, path)
    unknown = set(value) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ctx.fail(f"{path}.{sorted(unknown)[0]}", "unknown selector field")
    reqs = [Requirement(k, "In", frozenset([v])) for k, v in labels_of(ctx, value.get("matchLabels"), f"{path}.matchLabels").items()]
    for i, expr in enumerate(_list(ctx, value.get("matchExpressions"), f"{path}.matchExpressions")):
        p = f"{path}.matchExpressions[{i}]"
        expr = _mapping(ctx, expr, p)
        key = _label_key(ctx, expr.get("key"), f"{p}.key")
        op = expr.get("operator")
        if op not in _OPERATORS:
            raise ctx.fail(f"{p}.operator", f"invalid operator {op!r} (must be one of {', '.join(_OPERATORS)})")
        values = _list(ctx, expr.get("values"), f"{p}.values")
        if op in ("In", "NotIn") and not values:
            raise ctx.fail(f"{p}.values", f"must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise ctx.fail(f"{p}.values", f"must be empty for operator {op}")
        vals = frozenset(_label_value(ctx, v, f"{p}.values[{j}]") for j, v in enumerate(values))
        reqs.append(Requirement(key, op, vals))
    return Selector(tuple(reqs))


def _network(ctx: _Ctx, value: Any, path: str):
    if not isinstance(value, str):
        raise ctx.fail(path, f"invalid CIDR {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ctx.fail(path, f"invalid CIDR {value!r}") from None


def ip_block(ctx: _Ctx, value: Any, path: str) -> IPBlock:
    value = _mapping(ctx, value, path)
    if "cidr" not in value:
        raise ctx.fail(f"{path}.cidr", "is required")
    cidr = _network(ctx, value["cidr"], f"{path}.cidr")
    excepts = []
    for i, e in enumerate(_list(ctx, value.get("except"), f"{path}.except")):
        net = _network(ctx, e, f"{path}.except[{i}]")
        if net.version != cidr.version or not net.subnet_of(cidr) or net == cidr:
            raise ctx.fail(f"{path}.except[{i}]", f"{e} must be a strict subset of cidr {cidr}")
        excepts.append(net)
    return IPBlock(cidr, tuple(excepts))


def peer(ctx: _Ctx, value: Any, path: str) -> Peer:
    value = _mapping(ctx, value, path)
    pod_sel = selector(ctx, value["podSelector"], f"{path}.podSelector") if value.get("podSelector") is not None else None
    ns_sel = (
        selector(ctx, value["namespaceSelector"], f"{path}.namespaceSelector")
        if value.get("namespaceSelector") is not None
        else None
    )
    block = ip_block(ctx, value["ipBlock"], f"{path}.ipBlock") if value.get("ipBlock") is not None else None
    if block is not None and (pod_sel is not None or ns_sel is not None):
        raise ctx.fail(path, "ipBlock may not be combined with podSelector or namespaceSelector")
    if block is None and pod_sel is None and ns_sel is None:
        raise ctx.fail(path, "must specify podSelector, namespaceSelector or ipBlock")
    return Peer(pod_sel, ns_sel, block)


def port_spec(ctx: _Ctx, value: Any, path: str) -> PortSpec:
    value = _mapping(ctx, value, path)
    protocol = _protocol(ctx, value.get("protocol"), f"{path}.protocol")
    port = value.get("port")
    end = value.get("endPort")
    if isinstance(port, bool):
        raise ctx.fail(f"{path}.port", f"invalid port {port!r}")
    if isinstance(port, int):
        if not 1 <= port <= 65535:
            raise ctx.fail(f"{path}.port", f"port {port} out of range 1-65535")
    elif isinstance(port, str):
        if not _IANA_SVC_NAME.match(port) or "--" in port or not re.search("[a-z]", port):
            raise ctx.fail(f"{path}.port", f"invalid named port {port!r} (must be an IANA service name)")
    elif port is not None:
        raise ctx.fail(f"{path}.port", f"invalid port {port!r}")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            raise ctx.fail(f"{path}.endPort", f"invalid endPort {end!r}")
        if port is None:
            raise ctx.fail(f"{path}.endPort", "may not be set without port")
        if isinstance(port, str):
            raise ctx.fail(f"{path}.endPort", "may not be set with a named port")
        if not port <= end <= 65535:
            raise ctx.fail(f"{path}.endPort", f"endPort {end} must be >= port {port} and <= 65535")
    return PortSpec(protocol, port, end)


def rule(ctx: _Ctx, value: Any, path: str, peers_field: str) -> Rule:
    value = _mapping(ctx, value, path)
    peers = tuple(peer(ctx, p, f"{path}.{peers_field}[{i}]") for i, p in enumerate(_list(ctx, value.get(peers_field), f"{path}.{peers_field}")))
    ports = tuple(port_spec(ctx, p, f"{path}.ports[{i}]") for i, p in enumerate(_list(ctx, value.get("ports"), f"{path}.ports")))
    return Rule(peers, ports)


def _metadata(ctx: _Ctx, obj: Mapping[str, Any], namespaced: bool) -> tuple[Optional[str], str]:
    meta = _mapping(ctx, obj.get("metadata"), "metadata", required=True)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ctx.fail("metadata.name", "is required")
    ns = meta.get("namespace") if namespaced else None
    if namespaced and ns is None:
        ns = "default"
    if namespaced and (not isinstance(ns, str) or not DNS_LABEL.match(ns)):
        raise ctx.fail("metadata.namespace", f"invalid namespace {ns!r}")
    return ns, name


# --------------------------------------------------------------------------- kinds


def policy_types(ctx: _Ctx, spec: Mapping[str, Any]) -> frozenset:
    """Rule S2: omitted (or empty) policyTypes means Ingress, plus Egress when the policy
    has a non-empty egress list."""
    types = _list(ctx, spec.get("policyTypes"), "spec.policyTypes")
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            raise ctx.fail(f"spec.policyTypes[{i}]", f"invalid policy type {t!r}")
    if types:
        return frozenset(types)
    return frozenset(["Ingress", "Egress"]) if spec.get("egress") else frozenset(["Ingress"])


def network_policy(obj: Mapping[str, Any], cluster: str, source: str) -> Policy:
    ctx = _Ctx(source, obj)
    ns, name = _metadata(ctx, obj, namespaced=True)
    spec = _mapping(ctx, obj.get("spec"), "spec", required=True)
    pod_sel = selector(ctx, spec.get("podSelector"), "spec.podSelector")
    types = policy_types(ctx, spec)
    ingress = tuple(rule(ctx, r, f"spec.ingress[{i}]", "from") for i, r in enumerate(_list(ctx, spec.get("ingress"), "spec.ingress")))
    egress = tuple(rule(ctx, r, f"spec.egress[{i}]", "to") for i, r in enumerate(_list(ctx, spec.get("egress"), "spec.egress")))
    return Policy(cluster, ns, name, pod_sel, types, ingress, egress, source, audit=audit_annotation(ctx, obj))


def audit_annotation(ctx: _Ctx, obj: Mapping[str, Any]) -> bool:
    """The ``mcnp.io/audit`` annotation: ``"true"`` puts the policy in audit mode,
    ``"false"`` or none leaves it enforced; anything else is invalid (never guessed:
    a typo must not quietly stop enforcement). A fail-closed stand-in (rule S9) never
    reads it: an invalid object's annotations are not trusted either."""
    annotations = _mapping(ctx, obj["metadata"].get("annotations"), "metadata.annotations")
    value = annotations.get(AUDIT_ANNOTATION)
    if value is None:
        return False
    if value in ("true", "false"):
        return value == "true"
    raise ctx.fail(f"metadata.annotations[{AUDIT_ANNOTATION}]", f'must be the string "true" or "false", not {value!r}')


def fail_closed_policy(obj: Mapping[str, Any], cluster: str, source: str, error: InvalidObject) -> Optional[Policy]:
    """The stand-in for a *new* invalid policy (rule S9): it isolates the pods its
    podSelector selects — the whole namespace when that selector is itself invalid — in
    the directions it names (both when those cannot be read) and admits nothing.
    Returns None when the object has no usable namespace/name at all."""
    ctx = _Ctx(source, obj)
    try:
        ns, name = _metadata(ctx, obj, namespaced=True)
    except InvalidObject:
        return None
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    try:
        pod_sel = selector(ctx, spec.get("podSelector"), "spec.podSelector")
    except InvalidObject:
        pod_sel = EVERYTHING
    try:
        types = policy_types(ctx, spec)
    except InvalidObject:
        types = frozenset(["Ingress", "Egress"])
    return Policy(cluster, ns, name, pod_sel, types, (), (), source, rejected=str(error))


def fail_closed_duplicates(objs: list[Mapping[str, Any]], cluster: str, source: str, message: str) -> Optional[Policy]:
    """The stand-in for policies of one name that several sources claim with none of them
    in force yet (a cold start): which one is meant cannot be known, so the pods every
    claimant would select are isolated in every direction any of them names, and
    nothing is admitted. When the claimants select differently, the whole namespace."""
    error = InvalidObject(source, describe(objs[0]), "metadata.name", message)
    stand_ins = [fail_closed_policy(obj, cluster, source, error) for obj in objs]
    if any(p is None for p in stand_ins):
        return None
    first = stand_ins[0]
    pod_sel = first.pod_selector if all(p.pod_selector == first.pod_selector for p in stand_ins) else EVERYTHING
    types = frozenset().union(*(p.types for p in stand_ins))
    return Policy(cluster, first.namespace, first.name, pod_sel, types, (), (), source, rejected=str(error))


def namespace(obj: Mapping[str, Any], cluster: str, source: str) -> Namespace:
    ctx = _Ctx(source, obj)
    _, name = _metadata(ctx, obj, namespaced=False)
    if not DNS_LABEL.match(name):
        raise ctx.fail("metadata.name", f"invalid namespace name {name!r}")
    labels = labels_of(ctx, obj["metadata"].get("labels"), "metadata.labels")
    labels[NS_NAME_KEY] = name  # always set by the API server (rule S5)
    return Namespace(cluster, name, labels, source)


def pod(obj: Mapping[str, Any], cluster: str, source: str) -> Pod:
    ctx = _Ctx(source, obj)
    ns, name = _metadata(ctx, obj, namespaced=True)
    labels = labels_of(ctx, obj["metadata"].get("labels"), "metadata.labels")
    spec = _mapping(ctx, obj.get("spec"), "spec")
    status = _mapping(ctx, obj.get("status"), "status")
    ips = []
    raw = [status["podIP"]] if status.get("podIP") else []
    for i, entry in enumerate(_list(ctx, status.get("podIPs"), "status.podIPs")):
        ip = _mapping(ctx, entry, f"status.podIPs[{i}]").get("ip")
        if ip:
            raw.append(ip)
    for text in dict.fromkeys(raw) if all(type(t) is str for t in raw) else raw:  # podIP is podIPs[0]: parse it once
        ip = _ip_address(ctx, text, "status.podIP")
        if ip not in ips:
            ips.append(ip)
    ports = []
    for ci, container in enumerate(_list(ctx, spec.get("containers"), "spec.containers")):
        cpath = f"spec.containers[{ci}]"
        container = _mapping(ctx, container, cpath)
        for pi, p in enumerate(_list(ctx, container.get("ports"), f"{cpath}.ports")):
            ppath = f"{cpath}.ports[{pi}]"
            p = _mapping(ctx, p, ppath)
            number = _port_number(ctx, p.get("containerPort"), f"{ppath}.containerPort")
            proto = _protocol(ctx, p.get("protocol"), f"{ppath}.protocol")
            pname = p.get("name")
            if pname is not None and (not isinstance(pname, str) or not _IANA_SVC_NAME.match(pname)):
                raise ctx.fail(f"{ppath}.name", f"invalid port name {pname!r}")
            ports.append(ContainerPort(pname, number, proto))
    node = spec.get("nodeName")
    return Pod(
        cluster, ns, name, labels, tuple(ips), node if isinstance(node, str) else None,
        tuple(ports), bool(spec.get("hostNetwork")), str(status.get("phase") or "Running"), source,
    )


def cluster_property_value(obj: Mapping[str, Any], source: str) -> Optional[str]:
    """The cluster name a ``ClusterProperty cluster.clusterset.k8s.io`` declares (rule
    M1), or None for any other ClusterProperty."""
    ctx = _Ctx(source, obj)
    _, name = _metadata(ctx, obj, namespaced=False)
    if name != "cluster.clusterset.k8s.io":
        return None
    value = _mapping(ctx, obj.get("spec"), "spec", required=True).get("value")
    if not isinstance(value, str) or not DNS_LABEL.match(value):
        raise ctx.fail("spec.value", f"invalid cluster name {value!r} (must be an RFC 1123 label)")
    return value


# --------------------------------------------------------------------------- services


def _cluster_ips(ctx: _Ctx, spec: Mapping[str, Any], kind: str) -> tuple[tuple, bool]:
    """``spec.clusterIP``/``spec.clusterIPs`` → (addresses, headless). ``clusterIPs[0]``
    is ``clusterIP`` when both are given; at most one address per family; ``None``
    (headless) stands alone."""
    cip = spec.get("clusterIP")
    listed = _list(ctx, spec.get("clusterIPs"), "spec.clusterIPs")
    if cip not in (None, "") and listed and listed[0] != cip:
        raise ctx.fail("spec.clusterIPs[0]", f"{listed[0]!r} must equal spec.clusterIP {cip!r}")
    raw, path = (listed, "spec.clusterIPs") if listed else ([cip] if cip not in (None, "") else [], "spec.clusterIP")
    if kind == "ExternalName":
        if raw:
            raise ctx.fail(path, "must be empty for type ExternalName")
        return (), False
    if "None" in raw:
        if len(raw) > 1:
            raise ctx.fail(path, "None (headless) may not be combined with addresses")
        if kind != "ClusterIP":
            raise ctx.fail("spec.type", f"a headless Service (clusterIP None) must be of type ClusterIP, not {kind}")
        return (), True
    if len(raw) > 2:
        raise ctx.fail(path, "may hold at most two addresses, one per family")
    ips = tuple(_ip_address(ctx, t, f"{path}[{i}]" if listed else path) for i, t in enumerate(raw))
    if len(ips) == 2 and ips[0].version == ips[1].version:
        raise ctx.fail(f"{path}[1]", f"{ips[1]} must be of the other family than {ips[0]}")
    return ips, False


def _target_port(ctx: _Ctx, value: Any, path: str) -> None:
    if value is None or (isinstance(value, str) and _IANA_SVC_NAME.match(value) and re.search("[a-z]", value)):
        return
    if isinstance(value, str):
        raise ctx.fail(path, f"invalid named port {value!r} (must be an IANA service name)")
    _port_number(ctx, value, path)


def _service_ports(ctx: _Ctx, spec: Mapping[str, Any], required: bool) -> tuple[ServicePort, ...]:
    """``spec.ports`` as the API server accepts them: a number, TCP/UDP/SCTP, a name
    (an RFC 1123 label) on every port when there are several, names and (port,
    protocol) pairs unique."""
    raw = _list(ctx, spec.get("ports"), "spec.ports")
    if required and not raw:
        raise ctx.fail("spec.ports", "is required (a Service with a ClusterIP needs at least one port)")
    out: list[ServicePort] = []
    for i, entry in enumerate(raw):
        path = f"spec.ports[{i}]"
        entry = _mapping(ctx, entry, path)
        number = _port_number(ctx, entry.get("port"), f"{path}.port")
        protocol = _protocol(ctx, entry.get("protocol"), f"{path}.protocol")
        name = entry.get("name") or None
        if name is None and len(raw) > 1:
            raise ctx.fail(f"{path}.name", "is required when the Service has several ports")
        if name is not None and (not isinstance(name, str) or not DNS_LABEL.match(name)):
            raise ctx.fail(f"{path}.name", f"invalid port name {name!r} (must be an RFC 1123 label)")
        if name is not None and any(p.name == name for p in out):
            raise ctx.fail(f"{path}.name", f"duplicate port name {name!r}")
        if any(p.port == number and p.protocol == protocol for p in out):
            raise ctx.fail(f"{path}.port", f"duplicate port {protocol}/{number}")
        _target_port(ctx, entry.get("targetPort"), f"{path}.targetPort")
        out.append(ServicePort(name, number, protocol))
    return tuple(out)


def service(obj: Mapping[str, Any], cluster: str, source: str) -> Service:
    """A Service (``v1``): its type, ClusterIPs (both families) and ports."""
    ctx = _Ctx(source, obj)
    ns, name = _metadata(ctx, obj, namespaced=True)
    if not _DNS_1035_LABEL.match(name):
        raise ctx.fail("metadata.name", f"invalid Service name {name!r} (must be an RFC 1035 label)")
    spec = _mapping(ctx, obj.get("spec"), "spec", required=True)
    kind = spec.get("type") or "ClusterIP"
    if kind not in SERVICE_TYPES:
        raise ctx.fail("spec.type", f"invalid type {kind!r} (must be one of {', '.join(SERVICE_TYPES)})")
    ips, headless = _cluster_ips(ctx, spec, kind)
    ports = _service_ports(ctx, spec, required=kind != "ExternalName" and not headless)
    return Service(cluster, ns, name, kind, ips, ports, source, external_ips=_external_ips(ctx, obj, spec))


def _external_ips(ctx: _Ctx, obj: Mapping[str, Any], spec: Mapping[str, Any]) -> tuple:
    """``spec.externalIPs`` and the load balancer's ingress addresses kube-proxy
    translates (``ipMode`` ``VIP``, the default; ``Proxy`` ones go through the balancer)."""
    out = [_ip_address(ctx, t, f"spec.externalIPs[{i}]")
           for i, t in enumerate(_list(ctx, spec.get("externalIPs"), "spec.externalIPs"))]
    balancer = _mapping(ctx, _mapping(ctx, obj.get("status"), "status").get("loadBalancer"), "status.loadBalancer")
    for i, ingress in enumerate(_list(ctx, balancer.get("ingress"), "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        ingress = _mapping(ctx, ingress, path)
        mode = ingress.get("ipMode") or "VIP"
        if mode not in ("VIP", "Proxy"):
            raise ctx.fail(f"{path}.ipMode", f"invalid ipMode {mode!r} (must be VIP or Proxy)")
        if ingress.get("ip") is not None and mode == "VIP":
            out.append(_ip_address(ctx, ingress["ip"], f"{path}.ip"))
    return tuple(dict.fromkeys(out))


def _endpoint_port(ctx: _Ctx, value: Any, path: str) -> EndpointPort:
    value = _mapping(ctx, value, path)
    name = value.get("name") or None
    if name is not None and (not isinstance(name, str) or not DNS_LABEL.match(name)):
        raise ctx.fail(f"{path}.name", f"invalid port name {name!r} (must be an RFC 1123 label)")
    port = value.get("port")
    port = None if port is None else _port_number(ctx, port, f"{path}.port")
    return EndpointPort(name, port, _protocol(ctx, value.get("protocol"), f"{path}.protocol"))


def _endpoint(ctx: _Ctx, value: Any, path: str, address_type: str) -> Endpoint:
    """One endpoint: its addresses (1-100, of the slice's family; FQDN ones are
    checked for form and not kept: kube-proxy does not use them) and readiness."""
    value = _mapping(ctx, value, path)
    raw = _list(ctx, value.get("addresses"), f"{path}.addresses")
    if not raw:
        raise ctx.fail(f"{path}.addresses", "is required (at least one address)")
    if len(raw) > MAX_ENDPOINT_ADDRESSES:
        raise ctx.fail(f"{path}.addresses", f"may hold at most {MAX_ENDPOINT_ADDRESSES} addresses")
    addresses = []
    for i, text in enumerate(raw):
        apath = f"{path}.addresses[{i}]"
        if address_type == "FQDN":
            if not isinstance(text, str) or not _DNS_SUBDOMAIN.match(text):
                raise ctx.fail(apath, f"invalid FQDN {text!r}")
            continue
        ip = _ip_address(ctx, text, apath)
        if f"IPv{ip.version}" != address_type:
            raise ctx.fail(apath, f"{ip} is not an {address_type} address (the slice's addressType)")
        if ip not in addresses:
            addresses.append(ip)
    conditions = _mapping(ctx, value.get("conditions"), f"{path}.conditions")
    ready = conditions.get("ready")
    if ready is not None and not isinstance(ready, bool):
        raise ctx.fail(f"{path}.conditions.ready", f"must be true or false, not {ready!r}")
    return Endpoint(tuple(addresses), ready is not False)


def endpoint_slice(obj: Mapping[str, Any], cluster: str, source: str) -> EndpointSlice:
    """An EndpointSlice (``discovery.k8s.io/v1``): the Service its label names, its
    ports and its endpoints."""
    ctx = _Ctx(source, obj)
    ns, name = _metadata(ctx, obj, namespaced=True)
    labels = labels_of(ctx, obj["metadata"].get("labels"), "metadata.labels")
    address_type = obj.get("addressType")
    if address_type not in ADDRESS_TYPES:
        raise ctx.fail("addressType", "is required" if address_type is None else
                       f"invalid addressType {address_type!r} (must be one of {', '.join(ADDRESS_TYPES)})")
    ports = tuple(_endpoint_port(ctx, p, f"ports[{i}]") for i, p in enumerate(_list(ctx, obj.get("ports"), "ports")))
    for i, p in enumerate(ports):
        if any(q.name == p.name for q in ports[:i]):
            raise ctx.fail(f"ports[{i}].name", f"duplicate port name {p.name or ''!r}")
    endpoints = tuple(_endpoint(ctx, e, f"endpoints[{i}]", address_type)
                      for i, e in enumerate(_list(ctx, obj.get("endpoints"), "endpoints")))
    return EndpointSlice(cluster, ns, name, labels.get(SERVICE_NAME_KEY) or None, address_type, ports, endpoints, source)


def _readable(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """``obj`` when it is a mapping, else an empty one (for the lenient readers)."""
    return obj if isinstance(obj, Mapping) else {}


def fail_closed_service(obj: Mapping[str, Any], cluster: str, source: str, error: InvalidObject) -> Optional[Service]:
    """The stand-in for a *new* invalid Service (rule S9): whatever ClusterIPs and
    ports can still be read, reaching no endpoint, so a connection to them is denied
    rather than judged as one to a plain address (kube-proxy might still translate it).
    None when no address can be read (then nothing can translate it either)."""
    ctx = _Ctx(source, obj)
    try:
        ns, name = _metadata(ctx, obj, namespaced=True)
    except InvalidObject:
        return None
    spec = _readable(obj.get("spec"))
    listed = [t for f in ("clusterIPs", "externalIPs") if isinstance(spec.get(f), list) for t in spec[f]]
    ips = []
    for text in [spec.get("clusterIP"), *listed]:
        try:
            ip = ipaddress.ip_address(text) if isinstance(text, str) else None
        except ValueError:
            ip = None
        if ip is not None and ip not in ips:
            ips.append(ip)
    ports = []
    for entry in spec.get("ports") if isinstance(spec.get("ports"), list) else []:
        entry = _readable(entry)
        number, protocol = entry.get("port"), entry.get("protocol") or "TCP"
        if type(number) is int and 1 <= number <= 65535 and protocol in PROTOCOLS:
            ports.append(ServicePort(None, number, protocol))
    if not ips:
        return None
    return Service(cluster, ns, name, "ClusterIP", tuple(ips), tuple(dict.fromkeys(ports)), source, rejected=str(error))


def fail_closed_endpoint_slice(obj: Mapping[str, Any], cluster: str, source: str,
                               error: InvalidObject) -> Optional[EndpointSlice]:
    """The stand-in for a *new* invalid EndpointSlice (rule S9): which endpoints it
    meant cannot be known, so the Service its label names reaches none — every
    Service of its namespace when that label cannot be read. None when the object has
    no usable namespace/name."""
    ctx = _Ctx(source, obj)
    try:
        ns, name = _metadata(ctx, obj, namespaced=True)
    except InvalidObject:
        return None
    labels = _readable(_readable(obj.get("metadata")).get("labels"))
    service_name = labels.get(SERVICE_NAME_KEY)
    if not isinstance(service_name, str) or not _LABEL_VALUE.match(service_name) or not service_name:
        service_name = None
    return EndpointSlice(cluster, ns, name, service_name, source=source, rejected=str(error))


def _fail_closed_claimants(kind: str, objs: list[Mapping[str, Any]], cluster: str, source: str, message: str) -> list:
    error = InvalidObject(source, describe(objs[0]), "metadata.name", message)
    return [STAND_INS[kind](obj, cluster, source, error) for obj in objs]


def fail_closed_service_duplicates(objs: list[Mapping[str, Any]], cluster: str, source: str,
                                   message: str) -> Optional[Service]:
    """Services of one name that several sources claim, none in force yet: every
    address any claimant names, with every port any names, reaching no endpoint."""
    stand_ins = [s for s in _fail_closed_claimants("Service", objs, cluster, source, message) if s is not None]
    if not stand_ins:
        return None
    ips = tuple(dict.fromkeys(ip for s in stand_ins for ip in s.cluster_ips))
    ports = tuple(dict.fromkeys(p for s in stand_ins for p in s.ports))
    return dataclasses.replace(stand_ins[0], cluster_ips=ips, ports=ports, source=source)


def fail_closed_endpoint_slice_duplicates(objs: list[Mapping[str, Any]], cluster: str, source: str,
                                          message: str) -> Optional[EndpointSlice]:
    """EndpointSlices of one name that several sources claim, none in force yet: the
    Service they name reaches no endpoint — every Service of the namespace when they
    name different ones."""
    stand_ins = _fail_closed_claimants("EndpointSlice", objs, cluster, source, message)
    if any(s is None for s in stand_ins):
        return None
    names = {s.service for s in stand_ins}
    return dataclasses.replace(stand_ins[0], service=names.pop() if len(names) == 1 else None, source=source)


#: Every kind the store and manifest directories read, and its parser.
PARSERS = {"Namespace": namespace, "Pod": pod, "NetworkPolicy": network_policy, "Service": service,
           "EndpointSlice": endpoint_slice}
#: Kinds whose new invalid object is replaced by a fail-closed stand-in (rule S9), with
#: the function making it; other kinds' new invalid objects take no part.
STAND_INS = {"NetworkPolicy": fail_closed_policy, "Service": fail_closed_service,
             "EndpointSlice": fail_closed_endpoint_slice}
#: The same for a name several sources claim with none of them in force yet.
DUPLICATE_STAND_INS = {"NetworkPolicy": fail_closed_duplicates, "Service": fail_closed_service_duplicates,
                       "EndpointSlice": fail_closed_endpoint_slice_duplicates}
