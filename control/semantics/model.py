"""The objects mcnp reasons about, validated, immutable and cluster-qualified.

Everything downstream — the reference evaluator, the compiler, the control loop — works
on these values, never on raw Kubernetes dictionaries. Parsing (``control.semantics.objects``)
turns the shapes ``kubectl get -o yaml`` prints into them and is the one place that
rejects invalid input, with :class:`InvalidObject` naming file, object and field.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

#: The NPEP-308 label: inside a peer's selectors it selects pods of other clusters.
MC_KEY = "networking.k8s.io/multicluster-name"
#: The label the API server sets on every namespace.
NS_NAME_KEY = "kubernetes.io/metadata.name"
#: The NetworkPolicy annotation that puts a policy in audit mode ("true" or "false").
AUDIT_ANNOTATION = "mcnp.io/audit"

PROTOCOLS = ("TCP", "UDP", "SCTP")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class InvalidObject(ValueError):
    """An object that cannot take part, with where and why (rule S9)."""

    def __init__(self, source: str, obj: str, field_path: str, message: str):
        super().__init__(f"{source}: {obj}: {field_path}: {message}")
        self.source = source
        self.obj = obj
        self.field = field_path
        self.message = message


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class Requirement:
    """One label requirement; ``matchLabels`` entries become ``In`` with one value."""

    key: str
    op: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.op == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.op == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class Selector:
    """A label selector: the AND of its requirements; no requirement selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def mentions(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        parts = []
        for r in self.requirements:
            if r.op == "In" and len(r.values) == 1:
                parts.append(f"{r.key}={next(iter(r.values))}")
            elif r.op in ("In", "NotIn"):
                parts.append(f"{r.key} {r.op.lower()} ({','.join(sorted(r.values))})")
            elif r.op == "Exists":
                parts.append(r.key)
            else:
                parts.append(f"!{r.key}")
        return ",".join(parts)


EVERYTHING = Selector()


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        if ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip in e for e in self.excepts)

    def __str__(self) -> str:
        if not self.excepts:
            return f"ipBlock {self.cidr}"
        return f"ipBlock {self.cidr} except {','.join(map(str, self.excepts))}"


@dataclass(frozen=True)
class Peer:
    """One entry of ``from``/``to``: selectors (AND) or an ipBlock, never both."""

    pod_selector: Optional[Selector] = None
    namespace_selector: Optional[Selector] = None
    ip_block: Optional[IPBlock] = None

    def mentions(self, key: str) -> bool:
        return any(s is not None and s.mentions(key) for s in (self.pod_selector, self.namespace_selector))

    def __str__(self) -> str:
        if self.ip_block is not None:
            return str(self.ip_block)
        parts = []
        if self.namespace_selector is not None:
            parts.append(f"namespaceSelector {self.namespace_selector}")
        if self.pod_selector is not None:
            parts.append(f"podSelector {self.pod_selector}")
        return " and ".join(parts)


@dataclass(frozen=True)
class PortSpec:
    """A port entry: ``port`` None means every port of ``protocol``; a str is a named port."""

    protocol: str = "TCP"
    port: Union[int, str, None] = None
    end_port: Optional[int] = None

    def __str__(self) -> str:
        if self.port is None:
            return f"{self.protocol}/*"
        if self.end_port is not None:
            return f"{self.protocol}/{self.port}-{self.end_port}"
        return f"{self.protocol}/{self.port}"


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule. Empty ``peers`` matches every peer, empty ``ports``
    every port and protocol (rule S3)."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PortSpec, ...] = ()


@dataclass(frozen=True)
class Policy:
    cluster: str
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset  # of "Ingress", "Egress"
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    source: str = ""
    #: Set when the object was invalid and this is its fail-closed stand-in (rule S9).
    rejected: Optional[str] = None
    #: The annotation ``mcnp.io/audit: "true"``: traffic this policy would deny passes
    #: and is recorded as "would deny" (docs/operations.md, "Audit mode").
    audit: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "Ingress" else self.egress


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class ContainerPort:
    name: Optional[str]
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Namespace:
    cluster: str
    name: str
    labels: Mapping[str, str]
    source: str = ""


@dataclass(frozen=True)
class Pod:
    cluster: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    ips: tuple[IPAddress, ...] = ()
    node: Optional[str] = None
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    phase: str = "Running"
    source: str = ""

    @property
    def ref(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    @property
    def ip(self) -> Optional[IPAddress]:
        """The primary address (``status.podIP``), the one probes and ipBlocks see."""
        return self.ips[0] if self.ips else None

    @property
    def can_take_part(self) -> bool:
        """Rule S8: hostNetwork pods, pods without an IP and finished pods are neither
        selected nor matched as peers."""
        return not self.host_network and bool(self.ips) and self.phase not in ("Succeeded", "Failed")

    def named_port(self, name: str, protocol: str) -> Optional[int]:
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


# --------------------------------------------------------------------------- services

#: The label an EndpointSlice names its Service with.
SERVICE_NAME_KEY = "kubernetes.io/service-name"
#: IP protocol numbers of the protocols Services and policies speak.
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}


#: A port of a Service (``name`` None when unnamed: a single-port Service) is the same
#: triple as a container's.
ServicePort = ContainerPort


@dataclass(frozen=True)
class Service:
    """A Service as kube-proxy reads it (rule S11). ``cluster_ips`` is empty for a
    headless Service (``clusterIP: None``), an ExternalName one and one whose address
    is not allocated yet: none of those is translated."""

    cluster: str
    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: tuple[IPAddress, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    source: str = ""
    #: Set when the object was invalid and this is its fail-closed stand-in (rule S9):
    #: its addresses and ports, as far as they could be read, reach no endpoint.
    rejected: Optional[str] = None
    #: The other addresses kube-proxy translates for the cluster's pods just as the
    #: ClusterIPs: ``spec.externalIPs`` and the load balancer's ingress addresses
    #: (``status.loadBalancer.ingress[].ip``, unless its ``ipMode`` is ``Proxy``).
    external_ips: tuple[IPAddress, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """Every address a connection to this Service is translated from: none
        without a ClusterIP (kube-proxy leaves such a Service alone)."""
        if not self.cluster_ips:
            return ()
        return tuple(dict.fromkeys(self.cluster_ips + self.external_ips))


#: A port entry of an EndpointSlice, the same triple again: ``name`` None when
#: unnamed, ``port`` None when the slice leaves it open (no Service port can use it).
EndpointPort = ContainerPort


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[IPAddress, ...]
    #: ``conditions.ready`` is not false (unknown counts as ready, as kube-proxy reads it).
    ready: bool = True


@dataclass(frozen=True)
class EndpointSlice:
    cluster: str
    namespace: str
    name: str
    #: The Service it belongs to (its ``kubernetes.io/service-name`` label), None when
    #: it carries none (then it belongs to no Service).
    service: Optional[str]
    address_type: str = "IPv4"  # IPv4, IPv6 or FQDN (which kube-proxy does not use)
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    source: str = ""
    #: Set when the object was invalid and this is its fail-closed stand-in (rule S9):
    #: the Service it names reaches no endpoint — every Service of its namespace
    #: when the name cannot be read.
    rejected: Optional[str] = None


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class Options:
    """Semantics switches (rule M7)."""

    multicluster: bool = True
    default_peer_scope: str = "local"  # or "clusterset"


@dataclass
class ClusterState:
    """One cluster's objects, keyed by namespace and name."""

    name: str
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    pods: dict[tuple[str, str], Pod] = field(default_factory=dict)
    policies: dict[tuple[str, str], Policy] = field(default_factory=dict)
    services: dict[tuple[str, str], Service] = field(default_factory=dict)
    endpoint_slices: dict[tuple[str, str], EndpointSlice] = field(default_factory=dict)

    def table(self, kind: str) -> dict:
        """The objects of one kind (as manifests and the store name kinds)."""
        return {"Namespace": self.namespaces, "Pod": self.pods, "NetworkPolicy": self.policies,
                "Service": self.services, "EndpointSlice": self.endpoint_slices}[kind]

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        return ns.labels if ns is not None else {NS_NAME_KEY: name}


@dataclass
class ClusterSet:
    clusters: dict[str, ClusterState] = field(default_factory=dict)
    options: Options = field(default_factory=Options)

    def pods(self):
        for c in self.clusters.values():
            yield from c.pods.values()

    def policies(self):
        for c in self.clusters.values():
            yield from c.policies.values()

    def pod(self, ref: str) -> Optional[Pod]:
        parts = ref.split("/")
        if len(parts) != 3 or parts[0] not in self.clusters:
            return None
        return self.clusters[parts[0]].pods.get((parts[1], parts[2]))

    def effective_pod_labels(self, pod: Pod) -> Mapping[str, str]:
        return effective_labels(pod.labels, pod.cluster, self.options)

    def effective_namespace_labels(self, cluster: str, namespace: str) -> Mapping[str, str]:
        return effective_labels(self.clusters[cluster].namespace_labels(namespace), cluster, self.options)


def effective_labels(labels: Mapping[str, str], cluster: str, options: Options) -> Mapping[str, str]:
    """Labels as selectors see them (rule M2): with the feature on, every object of
    cluster C carries ``MC_KEY=C``, overriding whatever its users set."""
    if not options.multicluster:
        return labels
    if labels.get(MC_KEY) == cluster:
        return labels
    out = dict(labels)
    out[MC_KEY] = cluster
    return out
