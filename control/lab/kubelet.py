"""Pods on the test hosts, made and removed as a kubelet and its container runtime would.

docs/interfaces.md (Adding a pod by hand) spells the sequence, and this module follows it
for every pod, those ``testbed up`` finds in the manifests and those added later: write the Pod
manifest (``spec.nodeName``, no IP yet) into its cluster's directory; create the pod's
network namespace; run the node's CNI configuration list with ADD
(``control.lab.cni_runtime``); start the pod's workload (``podserver``, serving each
declared TCP and UDP container port); write ``status.podIP`` into the manifest. Removal
is the reverse: DEL, stop the workload, delete the namespace, remove the manifest.
Pods found in the manifests at ``up`` already carry their manifest and IP, so only the
middle steps run for them.

Every change of the testbed's state holds its lock (``control.lab.state``), so pods can
be added and removed from other processes while the testbed runs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import selectors
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import yaml

from control.lab import cni_runtime, state as st
from control.lab.layout import ADD_CONCURRENCY, NO_IPV6, POD_NET, SERVER_GRACE, SERVER_START_TIMEOUT, reserved_block
from control.lab.net import NetError, ip_batch, list_netns, netns_name, write_sysctl
from control.lab.proc import start_detached, stop, tail
from control.lab.state import TestbedError

logger = logging.getLogger(__name__)

PODSERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "podserver.py")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def check_address(ip: str, where: str) -> str:
    """A pod address test hosts may use (in POD_NET, outside the reserved blocks)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise TestbedError(f"{where}: {ip!r} is not an IP address", 2) from None
    if addr.version != 4 or addr not in POD_NET:
        raise TestbedError(f"{where}: {ip} is outside {POD_NET}, the only range test hosts may use", 2)
    block = reserved_block(addr)
    if block is not None:
        raise TestbedError(f"{where}: {ip} is in {block}, which the testbed reserves for nodes and Services", 2)
    return str(addr)


# --------------------------------------------------------------------------- sandboxes


def make_namespaces(names: Iterable[str]) -> None:
    """Pod namespaces as a runtime makes them: loopback up, no IPv6 (test hosts carry
    IPv4 only)."""
    names = list(names)
    ip_batch(f"netns add {ns}" for ns in names)
    for ns in names:
        write_sysctl(ns, NO_IPV6)
        ip_batch(["link set lo up"], netns=ns)


def _cni_args(state: dict, ref: str) -> str:
    pod = state["pods"][ref]
    node = state["nodes"][pod["node"]]
    _, namespace, name = ref.split("/")
    return cni_runtime.pod_args(namespace, name, pod["container_id"], pod["ip"], node["pod_prefix_len"], node["cni_args"])


def cni_add(state: dict, refs: list[str]) -> None:
    """CNI ADD for each pod (a few at once); the first failure raised as TestbedError."""
    def one(ref: str) -> None:
        pod = state["pods"][ref]
        node = state["nodes"][pod["node"]]
        try:
            cni_runtime.add(node, pod["container_id"], pod["netns"], _cni_args(state, ref), cache_dir=node["cni_cache_dir"])
        except cni_runtime.CniError as e:
            raise TestbedError(f"pod {ref} on node {pod['node']}: CNI ADD: {e}") from None

    with ThreadPoolExecutor(max_workers=ADD_CONCURRENCY) as pool:
        for future in [pool.submit(one, ref) for ref in refs]:
            future.result()


def start_servers(state: dict, refs: list[str], timeout: float = SERVER_START_TIMEOUT) -> None:
    """One podserver per pod with ports; returns when each has bound every port. Each
    is recorded in ``state["servers"]`` as it starts."""
    procs: dict[str, subprocess.Popen] = {}
    for ref in refs:
        pod = state["pods"][ref]
        if pod["ports"]:
            argv = [sys.executable, "-I", "-S", PODSERVER] + [f"{p['protocol']}:{p['port']}" for p in pod["ports"]]
            procs[ref] = start_detached(state, "servers", ref, pod["netns"], argv, pod["netns"], stdout=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    for ref, proc in procs.items():
        sel.register(proc.stdout, selectors.EVENT_READ, ref)
    pending = set(procs)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ref = sorted(pending)[0]
                raise TestbedError(f"the server of {ref} was not ready within {timeout:.0f} s:\n{tail(state['servers'][ref]['log'])}")
            for key, _ in sel.select(left):
                if key.fileobj.readline().strip() != b"ready":
                    raise TestbedError(f"the server of {key.data} failed:\n{tail(state['servers'][key.data]['log'])}")
                sel.unregister(key.fileobj)
                pending.discard(key.data)
    finally:
        for proc in procs.values():
            proc.stdout.close()
        sel.close()


def served_ports(container_ports: list[dict], extra: Iterable, notes: list[str], ref: str) -> list[dict]:
    """What a pod's server listens on: the extra ports, then each declared TCP and UDP
    container port once."""
    out = [{"protocol": str(p).upper(), "port": int(n)} for p, n in extra]
    for cp in container_ports:
        proto = str(cp.get("protocol", "TCP")).upper()
        port = cp.get("containerPort")
        if proto not in ("TCP", "UDP"):
            notes.append(f"{ref}: {proto} port {port} not served (test hosts speak TCP and UDP)")
        elif {"protocol": proto, "port": port} not in out:
            out.append({"protocol": proto, "port": int(port)})
    return out


# --------------------------------------------------------------------------- manifests


def _write_manifest(path: str, obj: dict) -> None:
    """Whole or not at all: a watcher never reads a half-written file (the temporary
    name starts with a dot, which manifest directories skip)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)
    os.replace(tmp, path)


def pod_manifest(namespace: str, name: str, node: str, labels: dict, container_ports: list[dict], ip: Optional[str]) -> dict:
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]} if ip else {"phase": "Pending"}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"nodeName": node, "containers": [{"name": "main", "ports": list(container_ports)}]},
        "status": status,
    }


# --------------------------------------------------------------------------- add / remove


def _validate_new(state: dict, cluster: str, namespace: str, name: str, ip: str, node: str) -> tuple[str, str]:
    ref = f"{cluster}/{namespace}/{name}"
    if not _DNS_LABEL.match(namespace) or not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        raise TestbedError(f"pod {ref}: namespace and name must be DNS names (lower case, digits, '-')", 2)
    dirs = dict(state["clusters"])
    if cluster not in dirs:
        raise TestbedError(f"pod {ref}: no cluster {cluster!r} in the testbed (have: {', '.join(sorted(dirs))})", 2)
    key = f"{cluster}/{node}"
    if key not in state["nodes"]:
        raise TestbedError(f"pod {ref}: no node {key} in the testbed (a running testbed gains no nodes)", 2)
    if ref in state["pods"]:
        raise TestbedError(f"pod {ref} is already on the testbed", 2)
    ip = check_address(ip, f"pod {ref}")
    holder = next((r for r, p in state["pods"].items() if p["ip"] == ip), None)
    if holder:
        raise TestbedError(f"pod {ref}: {ip} is the IP of {holder}", 2)
    return ref, key


def add_pod(cluster: str, namespace: str, name: str, ip: str, node: str, container_ports: Optional[list[dict]] = None,
            labels: Optional[dict] = None, state_dir: Optional[str] = None) -> dict:
    """Add a pod to the running testbed (docs/interfaces.md, Adding a pod by hand); returns its record
    (``netns``, ``ip``, ``node``, ...). ``container_ports`` are in the Pod's own shape
    (``containerPort``, ``protocol``, ``name``); default TCP 80. The pod is reachable
    when this returns. On failure what was made is removed again."""
    container_ports = list(container_ports if container_ports is not None else [{"containerPort": 80, "protocol": "TCP"}])
    labels = dict(labels if labels is not None else {"app": name})
    with st.locked(state_dir):
        state = st.require(state_dir)
        ref, key = _validate_new(state, cluster, namespace, name, ip, node)
        notes: list[str] = []
        netns = netns_name(state["prefix"], cluster, namespace, name)
        if netns in list_netns():
            raise TestbedError(f"pod {ref}: network namespace {netns} already exists")
        manifest = os.path.join(dict(state["clusters"])[cluster], f"pod_{namespace}_{name}.yaml")
        state["pods"][ref] = {"netns": netns, "ip": str(ipaddress.ip_address(ip)), "node": key, "manifest": manifest,
                              "container_id": secrets.token_hex(32),
                              "ports": served_ports(container_ports, state.get("extra_ports", []), notes, ref)}
        state["netns"].append(netns)
        st.save(state)
        for note in notes:
            logger.info("%s", note)
        try:
            _write_manifest(manifest, pod_manifest(namespace, name, node, labels, container_ports, None))
            make_namespaces([netns])
            cni_add(state, [ref])
            start_servers(state, [ref])
            st.save(state)
            _write_manifest(manifest, pod_manifest(namespace, name, node, labels, container_ports, state["pods"][ref]["ip"]))
        except (TestbedError, NetError, OSError) as e:
            _remove(state, ref)
            st.save(state)
            raise e if isinstance(e, TestbedError) else TestbedError(f"pod {ref}: {e}") from None
        return dict(state["pods"][ref])


def _remove(state: dict, ref: str) -> list[str]:
    """DEL, stop the server, delete the namespace and our manifest; the problems met."""
    problems = []
    pod = state["pods"][ref]
    if pod["netns"] in list_netns():
        node = state["nodes"][pod["node"]]
        try:
            cni_runtime.delete(node, pod["container_id"], pod["netns"], _cni_args(state, ref), cache_dir=node["cni_cache_dir"])
        except cni_runtime.CniError as e:
            problems.append(f"CNI DEL: {e}")
    server = state["servers"].pop(ref, None)
    if server and stop([server], grace=SERVER_GRACE):
        problems.append(f"server {server['pid']} would not stop")
    ip_batch([f"netns del {pod['netns']}"] if pod["netns"] in list_netns() else [], force=True)
    if pod["netns"] in list_netns():
        problems.append(f"netns {pod['netns']} would not go")
    else:
        state["netns"] = [ns for ns in state["netns"] if ns != pod["netns"]]
    if pod.get("manifest") and os.path.exists(pod["manifest"]):
        os.unlink(pod["manifest"])
    del state["pods"][ref]
    return problems


def remove_pod(ref: str, state_dir: Optional[str] = None) -> None:
    """Remove a pod from the running testbed: CNI DEL, its server, its namespace, and
    the manifest ``add_pod`` wrote (a pod from the user's own manifests keeps its
    document; remove it there). Raises TestbedError naming what could not be undone."""
    with st.locked(state_dir):
        state = st.require(state_dir)
        if ref not in state["pods"]:
            raise TestbedError(f"no pod {ref} on the testbed", 2)
        problems = _remove(state, ref)
        st.save(state)
    if problems:
        raise TestbedError(f"pod {ref}: " + "; ".join(problems))
