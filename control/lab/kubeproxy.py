"""kube-proxy's iptables translation of Services, installed in the test nodes.

What kube-proxy's iptables mode would install on each node of a cluster, read from the
Service and EndpointSlice (``discovery.k8s.io/v1``) manifests of the cluster's
directory: in the nat table a ``KUBE-SERVICES`` chain, jumped to from PREROUTING (pods'
traffic) and OUTPUT (the node's own), matching each ClusterIP and port into a
``KUBE-SVC-*`` chain that picks one ready endpoint with ``statistic --mode random`` and
DNATs to it in a ``KUBE-SEP-*`` chain; an endpoint that reaches itself through its
Service (hairpin) is marked and masqueraded in ``KUBE-POSTROUTING``, as kube-proxy
does. A Service port without ready endpoints is rejected in the filter table. A slice
port of the same name (and protocol) as the Service port gives the target port.

``sync`` rewrites all of it in every node namespace of the testbed, one
``iptables-restore --noflush`` per node (stale chains removed, the jumps from the
built-in chains added once), so it can run again at any time on a running testbed.
ClusterIPs must lie in ``layout.SERVICE_NET`` (pods route that block through their
node); headless Services and Services without a ClusterIP are left out with a note.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import subprocess
from dataclasses import dataclass, field
from typing import Mapping

from control.lab.layout import SERVICE_NET
from control.lab.net import popen_in
from control.lab.state import TestbedError
from control.semantics.manifests import read_directory
from control.semantics.model import InvalidObject

logger = logging.getLogger(__name__)

PROTOCOLS = ("TCP", "UDP")
MASQ_MARK = "0x4000"
#: Built-in chains and the kube-proxy chain each jumps to, per table.
HOOKS = {
    "nat": [("PREROUTING", "KUBE-SERVICES"), ("OUTPUT", "KUBE-SERVICES"), ("POSTROUTING", "KUBE-POSTROUTING")],
    "filter": [("FORWARD", "KUBE-SERVICES"), ("OUTPUT", "KUBE-SERVICES")],
}
_OWN = ("KUBE-SVC-", "KUBE-SEP-")


@dataclass
class ServicePort:
    service: str  # "namespace/name"
    name: str  # the port's name ("" when unnamed)
    cluster_ip: str
    port: int
    protocol: str
    endpoints: list[tuple[str, int]] = field(default_factory=list)  # ready (ip, target port)


def _bad(src: str, kind: str, name: str, fld: str, msg: str) -> TestbedError:
    return TestbedError(str(InvalidObject(src, f"{kind} {name}", fld, msg)), 2)


def _service_ports(src: str, obj: Mapping, notes: list[str]) -> list[ServicePort]:
    meta = obj.get("metadata") or {}
    ref = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
    spec = obj.get("spec") or {}
    cip = spec.get("clusterIP")
    if cip in (None, "", "None"):
        notes.append(f"{src}: Service {ref}: no ClusterIP (headless or external): no translation")
        return []
    try:
        addr = ipaddress.ip_address(cip)
    except ValueError:
        raise _bad(src, "Service", ref, "spec.clusterIP", f"{cip!r} is not an IP address") from None
    if addr not in SERVICE_NET:
        raise _bad(src, "Service", ref, "spec.clusterIP", f"{cip} is outside {SERVICE_NET}, the test hosts' Service range")
    out = []
    for i, p in enumerate(spec.get("ports") or []):
        proto = str(p.get("protocol", "TCP")).upper()
        port = p.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise _bad(src, "Service", ref, f"spec.ports[{i}].port", f"{port!r} is not a port number")
        if proto not in PROTOCOLS:
            notes.append(f"{src}: Service {ref}: {proto} port {port} not translated (test hosts speak TCP and UDP)")
            continue
        out.append(ServicePort(ref, str(p.get("name") or ""), cip, port, proto))
    return out


def _slice_endpoints(src: str, obj: Mapping) -> tuple[str, dict[tuple[str, str], int], list[str]]:
    """(service ref, {(port name, protocol): port}, ready addresses) of one slice."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace", "default")
    svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    name = f"{ns}/{meta.get('name')}"
    if not svc:
        raise _bad(src, "EndpointSlice", name, "metadata.labels", "no kubernetes.io/service-name label")
    if obj.get("addressType", "IPv4") != "IPv4":
        return f"{ns}/{svc}", {}, []
    ports = {}
    for i, p in enumerate(obj.get("ports") or []):
        if not isinstance(p.get("port"), int):
            raise _bad(src, "EndpointSlice", name, f"ports[{i}].port", f"{p.get('port')!r} is not a port number")
        ports[(str(p.get("name") or ""), str(p.get("protocol", "TCP")).upper())] = p["port"]
    ready = []
    for i, ep in enumerate(obj.get("endpoints") or []):
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        for addr in ep.get("addresses") or []:
            try:
                ready.append(str(ipaddress.IPv4Address(addr)))
            except ValueError:
                raise _bad(src, "EndpointSlice", name, f"endpoints[{i}].addresses", f"{addr!r} is not an IPv4 address") from None
    return f"{ns}/{svc}", ports, ready


def read_services(cluster_dir: str, notes: list[str]) -> list[ServicePort]:
    """Every translatable Service port of one manifest directory with its endpoints."""
    try:
        docs = read_directory(cluster_dir)
    except InvalidObject as e:
        raise TestbedError(str(e), 2) from None
    ports: list[ServicePort] = []
    slices = []
    for doc in docs:
        kind = doc.obj.get("kind")
        if kind == "Service":
            ports += _service_ports(doc.source, doc.obj, notes)
        elif kind == "EndpointSlice":
            slices.append(_slice_endpoints(doc.source, doc.obj))
    for sp in ports:
        for svc, slice_ports, ready in slices:
            target = slice_ports.get((sp.name, sp.protocol))
            if svc == sp.service and target is not None:
                sp.endpoints += [(ip, target) for ip in ready if (ip, target) not in sp.endpoints]
    return ports


def _chain(kind: str, *parts) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"KUBE-{kind}-" + base64.b32encode(digest).decode()[:16]


def restore_input(ports: list[ServicePort], existing: dict[str, set[str]], hooked: set[tuple[str, str, str]]) -> str:
    """``iptables-restore --noflush`` input: every kube-proxy chain of ours declared (so
    flushed), stale ones deleted, jumps from built-in chains added when missing."""
    nat_chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    nat = [f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
           f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
           f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
           "-A KUBE-POSTROUTING -j MASQUERADE --random-fully"]
    filt = []
    for sp in ports:
        proto = sp.protocol.lower()
        match = f"-d {sp.cluster_ip}/32 -p {proto} -m {proto} --dport {sp.port}"
        comment = f'-m comment --comment "{sp.service}:{sp.name or sp.port} cluster IP"'
        if not sp.endpoints:
            filt.append(f"-A KUBE-SERVICES {match} {comment} -m conntrack --ctstate NEW -j REJECT --reject-with icmp-port-unreachable")
            continue
        svc = _chain("SVC", sp.service, sp.name, sp.protocol)
        nat_chains.append(svc)
        nat.append(f"-A KUBE-SERVICES {match} {comment} -j {svc}")
        for i, (ip, target) in enumerate(sp.endpoints):
            sep = _chain("SEP", sp.service, sp.name, sp.protocol, ip, target)
            nat_chains.append(sep)
            left = len(sp.endpoints) - i
            pick = f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
            nat.append(f"-A {svc} {pick}-j {sep}")
            nat += [f"-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ", f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ip}:{target}"]
    out = []
    for table, chains, rules in (("nat", nat_chains, nat), ("filter", ["KUBE-SERVICES"], filt)):
        stale = sorted(c for c in existing.get(table, set()) if c.startswith(_OWN) and c not in chains)
        out += [f"*{table}"] + [f":{c} - [0:0]" for c in chains + stale] + rules + [f"-X {c}" for c in stale]
        out += [f"-A {builtin} -m comment --comment \"kubernetes service portals\" -j {target}"
                for builtin, target in HOOKS[table] if (table, builtin, target) not in hooked]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def _parse_save(text: str) -> tuple[dict[str, set[str]], set[tuple[str, str, str]]]:
    """Chains per table and (table, built-in chain, target) jumps of ``iptables-save``."""
    chains: dict[str, set[str]] = {}
    hooked = set()
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            chains[table] = set()
        elif line.startswith(":") and table:
            chains[table].add(line[1:].split()[0])
        elif line.startswith("-A ") and table:
            words = line.split()
            if "-j" in words and words[1] in {b for b, _ in HOOKS.get(table, [])}:
                hooked.add((table, words[1], words[words.index("-j") + 1]))
    return chains, hooked


def _run_all(argvs: dict[str, tuple[list[str], str]], inputs: dict[str, str]) -> dict[str, str]:
    """Run one command per namespace at once; their outputs, or TestbedError."""
    procs = {k: popen_in(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (argv, ns) in argvs.items()}
    outs, errors = {}, []
    for k, proc in procs.items():
        outs[k], err = proc.communicate(inputs.get(k, ""), timeout=60)
        if proc.returncode != 0:
            errors.append(f"{argvs[k][0][0]} in {argvs[k][1]}: {err.strip()}")
    if errors:
        raise TestbedError("installing Services failed: " + "; ".join(errors))
    return outs


def sync(state: dict, notes: list[str] | None = None) -> dict[str, int]:
    """Install every cluster's Services in each of its node namespaces; returns the
    number of translated Service ports per cluster. Safe to run again at any time."""
    notes = notes if notes is not None else []
    per_cluster = {name: read_services(path, notes) for name, path in state["clusters"]}
    nodes = state["nodes"]
    saved = _run_all({k: (["iptables-save"], n["netns"]) for k, n in nodes.items()}, {})
    inputs = {}
    for key, node in nodes.items():
        existing, hooked = _parse_save(saved[key])
        inputs[key] = restore_input(per_cluster[node["cluster"]], existing, hooked)
    _run_all({k: (["iptables-restore", "-w", "5", "--noflush"], n["netns"]) for k, n in nodes.items()}, inputs)
    return {c: len(p) for c, p in per_cluster.items()}
