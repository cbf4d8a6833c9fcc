"""Random cluster sets for property tests, benchmarks and soak runs.

``random_world(seed, ...)`` builds a :class:`ClusterSet` directly from model values
(no YAML), deterministic for a seed, exercising what the semantics care about: the
multi-cluster key in every selector position and operator, forged key labels on pods
and namespaces, ipBlocks with excepts that cover pod IPs, named ports, endPort, every
protocol, rejected (fail-closed) policies, conflicting IPs and pods that cannot take
part. ``worlds()`` is the hypothesis strategy over small ones; ``random_packets`` draws
flows over a world's pod and non-pod addresses.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from control.semantics.model import (
    MC_KEY,
    NS_NAME_KEY,
    ClusterSet,
    ClusterState,
    ContainerPort,
    IPBlock,
    Namespace,
    Options,
    Peer,
    Pod,
    Policy,
    PortSpec,
    Requirement,
    Rule,
    Selector,
)

NAMESPACES = ("x", "y", "z", "web", "db", "ops", "ml", "edge")
LABELS = {"app": ("a", "b", "c", "d"), "tier": ("front", "back"), "env": ("prod", "dev"), "team": ("red", "blue", "green")}
NS_LABELS = {"env": ("prod", "dev"), "team": ("red", "blue"), "zone": ("1", "2")}
PORT_NAMES = ("http", "dns", "metrics", "grpc")
PORTS = (53, 80, 81, 443, 8080, 9090)
PROTOCOLS = ("TCP", "UDP", "SCTP")
#: Protocol numbers packets use: TCP, UDP, SCTP, ICMP, ICMPv6, GRE.
PACKET_PROTOS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6", 47: "GRE"}


@dataclass(frozen=True)
class Shape:
    """Knobs of a random world (probabilities are per object)."""

    clusters: int = 3
    pods_per_cluster: int = 1000
    policies_per_cluster: int = 200
    namespaces: int = 6
    nodes_per_cluster: int = 10
    forged: float = 0.05  # objects carrying a user-set multi-cluster key
    ineligible: float = 0.03  # hostNetwork / finished / no IP
    conflicts: float = 0.01  # pods reusing another pod's IP
    rejected: float = 0.02  # fail-closed stand-ins
    ip_blocks: float = 0.15  # share of peers that are ipBlocks
    mc_key: float = 0.3  # share of selectors that mention the multi-cluster key
    replicas: float = 8.0  # mean pods per workload (replicas share labels and ports)


def cluster_names(n: int) -> list[str]:
    return [f"cluster-{i + 1}" for i in range(n)]


def pod_ip(cluster_idx: int, i: int) -> ipaddress.IPv4Address:
    """Pod addresses inside 198.18.0.0/15: 16k per cluster."""
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + cluster_idx * 16384 + 10 + i)


class _Gen:
    def __init__(self, seed: int, shape: Shape, options: Options):
        self.r = random.Random(seed)
        self.s = shape
        self.options = options
        self.clusters = cluster_names(shape.clusters)

    def labels(self, vocab: dict, forged: bool) -> dict:
        r = self.r
        out = {k: r.choice(vs) for k, vs in vocab.items() if r.random() < 0.6}
        if forged:
            out[MC_KEY] = r.choice(self.clusters + ["elsewhere"])
        return out

    def requirement(self, vocab: dict, mc: bool) -> Requirement:
        r = self.r
        if mc:
            key, values = MC_KEY, self.clusters + ["elsewhere"]
        else:
            key = r.choice(list(vocab))
            values = list(vocab[key]) + ["nope"]
        op = r.choice(("In", "In", "NotIn", "Exists", "DoesNotExist"))
        if op in ("In", "NotIn"):
            return Requirement(key, op, frozenset(r.sample(values, r.randint(1, 2))))
        return Requirement(key, op)

    def selector(self, vocab: dict, ns_names: bool = False) -> Selector:
        r = self.r
        n = r.choice((0, 0, 1, 1, 2))
        reqs = [self.requirement(vocab, r.random() < self.s.mc_key) for _ in range(n)]
        if ns_names and r.random() < 0.3:
            reqs.append(Requirement(NS_NAME_KEY, "In", frozenset([r.choice(NAMESPACES[: self.s.namespaces])])))
        return Selector(tuple(reqs))

    def ip_block(self) -> IPBlock:
        r = self.r
        c = r.randrange(self.s.clusters)
        base = int(pod_ip(c, 0)) - 10
        choice = r.random()
        if choice < 0.1:
            return IPBlock(ipaddress.ip_network("0.0.0.0/0"), (ipaddress.ip_network(f"{ipaddress.IPv4Address(base)}/18"),))
        if choice < 0.15:
            return IPBlock(ipaddress.ip_network("::/0"))
        if choice < 0.2:
            return IPBlock(ipaddress.ip_network("203.0.113.0/24"))
        plen = r.choice((18, 20, 22, 24))
        net = ipaddress.ip_network(f"{ipaddress.IPv4Address(base + r.randrange(0, 1 << (32 - 18 - 0)) & ~((1 << (32 - plen)) - 1))}/{plen}")
        excepts = []
        for _ in range(r.choice((0, 0, 1, 2))):
            elen = r.randint(plen + 1, 30)
            off = r.randrange(0, 1 << (32 - plen)) & ~((1 << (32 - elen)) - 1)
            excepts.append(ipaddress.ip_network(f"{ipaddress.IPv4Address(int(net.network_address) + off)}/{elen}"))
        return IPBlock(net, tuple(excepts))

    def peer(self) -> Peer:
        r = self.r
        if r.random() < self.s.ip_blocks:
            return Peer(ip_block=self.ip_block())
        kind = r.random()
        if kind < 0.35:
            return Peer(pod_selector=self.selector(LABELS))
        if kind < 0.7:
            return Peer(namespace_selector=self.selector(NS_LABELS, ns_names=True))
        return Peer(pod_selector=self.selector(LABELS), namespace_selector=self.selector(NS_LABELS, ns_names=True))

    def port_spec(self) -> PortSpec:
        r = self.r
        proto = r.choice(PROTOCOLS)
        kind = r.random()
        if kind < 0.15:
            return PortSpec(proto, None)
        if kind < 0.4:
            return PortSpec(proto, r.choice(PORT_NAMES))
        port = r.choice(PORTS)
        if kind < 0.55:
            return PortSpec(proto, port, port + r.choice((1, 10, 1000)))
        return PortSpec(proto, port)

    def rule(self) -> Rule:
        r = self.r
        peers = tuple(self.peer() for _ in range(r.choice((0, 1, 1, 2, 3))))
        ports = tuple(self.port_spec() for _ in range(r.choice((0, 1, 1, 2))))
        return Rule(peers, ports)

    def policy(self, cluster: str, i: int) -> Policy:
        r = self.r
        ns = r.choice(NAMESPACES[: self.s.namespaces])
        types = r.choice((frozenset(["Ingress"]), frozenset(["Egress"]), frozenset(["Ingress", "Egress"])))
        sel = self.selector(LABELS) if r.random() < 0.8 else Selector()
        if r.random() < self.s.rejected:
            return Policy(cluster, ns, f"p{i}", sel, types, (), (), "random", rejected="invalid in a random way")
        ingress = tuple(self.rule() for _ in range(r.choice((0, 1, 1, 2, 3)))) if "Ingress" in types else ()
        egress = tuple(self.rule() for _ in range(r.choice((0, 1, 1, 2, 3)))) if "Egress" in types else ()
        return Policy(cluster, ns, f"p{i}", sel, types, ingress, egress, "random")

    def workload(self) -> tuple:
        """(namespace, labels, container ports) shared by the replicas of a workload."""
        r = self.r
        ns = self.r.choice(NAMESPACES[: self.s.namespaces])
        ports = tuple(
            ContainerPort(name, r.choice(PORTS), r.choice(PROTOCOLS))
            for name in PORT_NAMES if r.random() < 0.4
        ) + ((ContainerPort(None, 80, "TCP"),) if r.random() < 0.5 else ())
        return ns, self.labels(LABELS, r.random() < self.s.forged), ports

    def pod(self, cluster: str, ci: int, i: int, taken: list, workloads: list) -> Pod:
        r = self.r
        s = self.s
        if not workloads or r.random() < 1 / s.replicas:
            workloads.append(self.workload())
        ns, labels, ports = r.choice(workloads)
        if r.random() < 0.1:  # a replica relabelled by hand
            labels = self.labels(LABELS, r.random() < s.forged)
        ip = pod_ip(ci, i)
        if taken and r.random() < s.conflicts:
            ip = r.choice(taken)
        taken.append(ip)
        host, phase, ips = False, "Running", (ip,)
        if r.random() < s.ineligible:
            what = r.choice(("host", "done", "failed", "noip"))
            host, phase = what == "host", {"done": "Succeeded", "failed": "Failed"}.get(what, "Running")
            ips = () if what == "noip" else ips
        node = f"{cluster}-node-{r.randrange(s.nodes_per_cluster)}"
        return Pod(cluster, ns, f"pod-{i}", labels, ips, node, ports, host, phase, "random")


def random_world(seed: int, clusters: int = 3, pods_per_cluster: int = 1000, policies_per_cluster: int = 200,
                 options: Options = Options(), shape: Shape | None = None) -> ClusterSet:
    """A deterministic random cluster set (see the module docstring)."""
    shape = shape or Shape()
    shape = Shape(**{**shape.__dict__, "clusters": clusters, "pods_per_cluster": pods_per_cluster,
                     "policies_per_cluster": policies_per_cluster})
    g = _Gen(seed, shape, options)
    cset = ClusterSet(options=options)
    taken: list = []
    for ci, cname in enumerate(g.clusters):
        state = ClusterState(cname)
        for ns in NAMESPACES[: shape.namespaces]:
            if g.r.random() < 0.9:  # sometimes a pod's namespace object is missing
                labels = g.labels(NS_LABELS, g.r.random() < shape.forged)
                labels[NS_NAME_KEY] = ns
                state.namespaces[ns] = Namespace(cname, ns, labels)
        workloads: list = []
        for i in range(pods_per_cluster):
            pod = g.pod(cname, ci, i, taken, workloads)
            state.pods[(pod.namespace, pod.name)] = pod
        for i in range(policies_per_cluster):
            pol = g.policy(cname, i)
            state.policies[(pol.namespace, pol.name)] = pol
        cset.clusters[cname] = state
    return cset


@st.composite
def worlds(draw, max_clusters: int = 3, max_pods: int = 12, max_policies: int = 8):
    """Small random worlds, both Options variants, with generous edge-case rates."""
    options = Options(draw(st.booleans()), draw(st.sampled_from(("local", "clusterset"))))
    shape = Shape(
        namespaces=draw(st.integers(1, 4)),
        nodes_per_cluster=2,
        forged=draw(st.sampled_from((0.0, 0.3))),
        ineligible=draw(st.sampled_from((0.0, 0.2))),
        conflicts=draw(st.sampled_from((0.0, 0.2))),
        rejected=draw(st.sampled_from((0.0, 0.2))),
        ip_blocks=draw(st.sampled_from((0.0, 0.3))),
        mc_key=draw(st.sampled_from((0.0, 0.3, 0.7))),
        replicas=draw(st.sampled_from((1.0, 3.0))),
    )
    return random_world(
        draw(st.integers(0, 2**32 - 1)),
        clusters=draw(st.integers(1, max_clusters)),
        pods_per_cluster=draw(st.integers(1, max_pods)),
        policies_per_cluster=draw(st.integers(0, max_policies)),
        options=options,
        shape=shape,
    )


def world_addresses(cset: ClusterSet, rng: random.Random, extra: int = 8) -> list:
    """Every pod address of the world plus some that no pod has (inside and outside
    the pod ranges, and IPv6)."""
    addrs = {ip for p in cset.pods() for ip in p.ips}
    addrs = sorted(addrs, key=lambda a: (a.version, a))
    base = int(pod_ip(0, 0))
    for _ in range(extra):
        addrs.append(ipaddress.IPv4Address(base - 10 + rng.randrange(3 * 16384)))
    addrs += [ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("2001:db8::1")]
    return addrs


def random_packets(cset: ClusterSet, n: int, seed: int = 0):
    """``(src, dst, proto, dport, flows)``: arrays ready for ``judge`` and the
    ``[(src_ip, dst_ip, proto_number, port)]`` they encode."""
    from fastpath.tables import ip_keys

    rng = random.Random(seed)
    addrs = world_addresses(cset, rng)
    pod_addrs = [ip for p in cset.pods() for ip in p.ips] or addrs
    ports = list(PORTS) + [p.port for pod in cset.pods() for p in pod.ports] + [0, 1, 65535]
    for pol in cset.policies():
        for rule in pol.ingress + pol.egress:
            ports += [s.end_port for s in rule.ports if s.end_port] + [s.port for s in rule.ports if isinstance(s.port, int)]
    flows = []
    for _ in range(n):
        proto = rng.choice((6, 6, 6, 17, 17, 132, 1, 58, 47))
        port = rng.choice(ports) if proto in (6, 17, 132) else 0
        if proto in (6, 17, 132) and rng.random() < 0.1:
            port = rng.choice(ports) + rng.choice((1, 5, 500))
            port = min(port, 65535)
        flows.append((rng.choice(pod_addrs if rng.random() < 0.8 else addrs), rng.choice(pod_addrs if rng.random() < 0.8 else addrs), proto, port))
    src = ip_keys([f[0] for f in flows])
    dst = ip_keys([f[1] for f in flows])
    proto = np.array([f[2] for f in flows], dtype=np.uint8)
    dport = np.array([f[3] for f in flows], dtype=np.uint16)
    return src, dst, proto, dport, flows
