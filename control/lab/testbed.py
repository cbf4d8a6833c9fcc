"""``mcnp testbed up`` / ``down``: test hosts that act as Kubernetes nodes would.

The testbed plays the container runtime, the kubelet and kube-proxy on manifest
directories (docs/architecture.md, Test hosts; docs/interfaces.md); mcnp (``--mode
mcnp``) runs beside it as it would beside a real CNI, and ``--mode none`` is the same
hosts without it, the baseline::

    pod netns (eth0 from the CNI)            pod netns ...
          │ veth made by ptp / bridge              │
    node netns "cluster/node" ── uplink ──┐   node netns ── uplink ──┐
    (ip_forward, CNI conflist, kube-proxy  │                         │
     rules, mcnp daemon in mode mcnp)      └── core netns: bridge br0 ┘

Every node of every cluster has one uplink veth into the core, whose bridge joins them
all on one segment, and an address of its own, node *i* → 198.19.255.(i+1) (the
reserved ``layout.NODE_NET``). Pod addresses reach their node with no per-pod step
outside CNI ADD, so a pod added later by anyone following docs/interfaces.md is
reachable as soon as its ADD returns:

* routed (``--cni ptp``): the node's address sits on the uplink with the whole pod
  range (198.18.0.0/15) on link, and ``proxy_arp`` on the uplink. ptp gives each pod a
  /32 route through its host veth, so the owning node, and only it, answers ARP for a
  pod on the core segment (the kernel proxies only for addresses routed out of another
  interface); ``proxy_delay`` 0 makes that answer immediate. Pods route the range
  through their gateway, the node's address (``GATEWAY=`` in the node's ``cni_args``,
  which static IPAM reads), which ptp puts on the host side of each pod veth.
* bridged (``--cni bridge``): the testbed makes the node's CNI bridge ``cni0`` itself,
  enslaves the uplink and puts the node's address on it (the bridge plugin then finds
  both in place, ``isGateway``); every pod of every node sits on one L2 segment.
  ``hairpinMode`` is on, as the kubelet wants it: a pod reaching itself through its
  Service is DNATed by the bridge netfilter and bridged back out of the port it came in.
  ``net.bridge.bridge-nf-call-iptables=1`` (kubeadm's requirement, so that Service
  replies bridged between two pods of one node are un-NATed): on this kernel the
  bridge netfilter is built in, the sysctl exists in every network namespace and it
  is set in each node's.

Both CNIs get static IPAM with a route for ``layout.SERVICE_NET`` via the node, where
kube-proxy's translation (``control.lab.kubeproxy``) waits. Each node has its own CNI
configuration directory (exactly one ``*.conflist``, cniVersion 1.0.0: ptp or bridge,
then in mode mcnp ``mcnp-cni`` with the node's socket) and binary directory (links to
the reference plugins and to ``mcnp-cni``). Pods are made by ``control.lab.kubelet``,
the same code that adds and removes pods on a running testbed. In mode mcnp a daemon
per node starts (detached, output in a log file) and is ready before any ADD of its
node runs, since ADD fails while the daemon cannot take the pod. Everything is recorded
(``control.lab.state``) before it is made, so ``down`` removes it even after a failed
``up``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from control.lab import kubelet, kubeproxy, state as st
from control.lab.layout import (API_LISTEN, CNI_BRIDGE, CNI_VERSION, CNIS, CORE_BRIDGE, DAEMON_GRACE, IPAM, LINK_TIMEOUT, MCNP_CNI,
                                MODES, NETWORK_NAME, NODE_NET, NODE_SYSCTLS, NO_IPV6, POD_PREFIX_LEN, SERVER_GRACE, SERVICE_NET,
                                UPLINK, cni_plugin_dir, prefix_default, state_dir_default)
from control.lab.net import NetError, ip_batch, list_netns, netns_name, write_sysctl
from control.lab.proc import http_get, start_detached, stop, tail
from control.lab.state import TestbedError
from control.semantics.manifests import load_clusterset
from control.semantics.model import InvalidObject

logger = logging.getLogger(__name__)

load_state = st.load  # the callers' name for it


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    mode: str
    cni: str
    prefix: str
    clusters: list[tuple[str, str]]  # (name, absolute directory)
    nodes: dict[str, dict] = field(default_factory=dict)  # key -> state record
    pods: dict[str, dict] = field(default_factory=dict)  # ref -> state record
    notes: list[str] = field(default_factory=list)


def _new_node(plan: Plan, key: str, state_dir: str) -> dict:
    i = len(plan.nodes)
    if i + 1 >= NODE_NET.num_addresses - 1:
        raise TestbedError(f"node {key}: more nodes than {NODE_NET} has addresses", 2)
    cluster, name = key.split("/", 1)
    home = os.path.join(state_dir, f"n{i}")
    address = str(NODE_NET[i + 1])
    return {
        "netns": netns_name(plan.prefix, cluster, name), "cluster": cluster, "name": name, "address": address,
        "core_port": f"node{i}", "dir": home, "cni_conf_dir": os.path.join(home, "net.d"),
        "cni_bin_dir": os.path.join(home, "bin"), "cni_cache_dir": os.path.join(home, "cache"),
        "pod_prefix_len": POD_PREFIX_LEN, "cni_args": f"GATEWAY={address}",
        "api": API_LISTEN if plan.mode == "mcnp" else None, "cni_socket": os.path.join(home, "cni.sock"),
        "daemon_state_dir": os.path.join(home, "mcnp"), "bpf_dir": os.path.join(home, "bpf"),
    }


def make_plan(cluster_specs: list[tuple[Optional[str], str]], mode: str, cni: str, prefix: str, state_dir: str,
              extra_ports: tuple = ()) -> Plan:
    """Read the manifests and decide every name and address; nothing is made yet.
    ``extra_ports`` ((protocol, number), ...) are served by every pod besides its
    declared ones, so a probe on them shows the policy's verdict, not a closed port."""
    if mode not in MODES:
        hint = " (the baseline without mcnp is --mode none; the CNI is chosen with --cni)" if mode == "bridge" else ""
        raise TestbedError(f"unknown mode {mode!r}: choose {' or '.join(MODES)}{hint}", 2)
    if cni not in CNIS:
        raise TestbedError(f"unknown CNI {cni!r}: choose {' or '.join(CNIS)}", 2)
    for proto, number in extra_ports:
        if str(proto).upper() not in ("TCP", "UDP") or not 1 <= int(number) <= 65535:
            raise TestbedError(f"extra port {proto}/{number}: want TCP or UDP and a port in 1-65535", 2)
    try:
        cset, notes = load_clusterset([(n, os.path.abspath(d)) for n, d in cluster_specs], strict=True)
    except InvalidObject as e:
        raise TestbedError(str(e), 2) from None
    plan = Plan(mode, cni, prefix, [(c, os.path.abspath(d)) for c, (_, d) in zip(cset.clusters, cluster_specs)], notes=list(notes))
    for _, path in plan.clusters:
        kubeproxy.read_services(path, plan.notes)  # invalid Services stop `up` before anything is made
    owner: dict[str, str] = {}
    for cname, cluster in cset.clusters.items():
        unplaced = []
        for pod in sorted(cluster.pods.values(), key=lambda p: p.ref):
            if not pod.can_take_part:
                plan.notes.append(f"{pod.ref}: no test host (hostNetwork, no IP or finished: rule S8)")
                continue
            ip = kubelet.check_address(str(pod.ip), f"{pod.source}: Pod {pod.ref}: status.podIP")
            if ip in owner:
                raise TestbedError(f"{pod.source}: Pod {pod.ref}: status.podIP: {ip} is also the IP of {owner[ip]}; test hosts need distinct addresses", 2)
            owner[ip] = pod.ref
            if pod.node is None:
                unplaced.append(pod.name)
            key = f"{cname}/{pod.node or cname}"
            if key not in plan.nodes:
                plan.nodes[key] = _new_node(plan, key, state_dir)
            declared = [{"containerPort": cp.port, "protocol": cp.protocol} for cp in pod.ports]
            plan.pods[pod.ref] = {"netns": netns_name(prefix, cname, pod.namespace, pod.name), "ip": ip, "node": key,
                                  "manifest": None, "container_id": secrets.token_hex(32),
                                  "ports": kubelet.served_ports(declared, extra_ports, plan.notes, pod.ref)}
        if unplaced:
            plan.notes.append(f"cluster {cname}: pods without spec.nodeName placed on node {cname!r}: {', '.join(unplaced)}")
    return plan


def _initial_state(plan: Plan, state_dir: str, extra_ports: tuple) -> dict:
    core = plan.prefix + "core"
    return {
        "version": st.VERSION, "dir": state_dir, "mode": plan.mode, "cni": plan.cni, "prefix": plan.prefix, "core": core,
        "clusters": [list(c) for c in plan.clusters],
        "netns": [core] + [n["netns"] for n in plan.nodes.values()] + [p["netns"] for p in plan.pods.values()],
        "nodes": plan.nodes, "pods": plan.pods, "servers": {}, "daemons": {},
        "extra_ports": [[str(p).upper(), int(n)] for p, n in extra_ports],
    }


# --------------------------------------------------------------------------- nodes and core


def _build_nodes(state: dict) -> None:
    """Core and node namespaces, uplinks, node addresses and sysctls, in a handful of
    ``ip`` processes."""
    core, nodes = state["core"], state["nodes"]
    ip_batch(f"netns add {ns}" for ns in [core] + [n["netns"] for n in nodes.values()])
    write_sysctl(core, NO_IPV6)
    ip_batch(f"link add {UPLINK} netns {n['netns']} type veth peer name {n['core_port']} netns {core}" for n in nodes.values())
    core_cmds = [f"link add {CORE_BRIDGE} type bridge", f"link set {CORE_BRIDGE} up", "link set lo up"]
    for node in nodes.values():
        core_cmds += [f"link set {node['core_port']} master {CORE_BRIDGE}", f"link set {node['core_port']} up"]
        write_sysctl(node["netns"], NODE_SYSCTLS)
        cmds = ["link set lo up"]
        if state["cni"] == "bridge":
            cmds += [f"link add {CNI_BRIDGE} type bridge", f"link set {UPLINK} master {CNI_BRIDGE}",
                     f"addr add {node['address']}/{POD_PREFIX_LEN} dev {CNI_BRIDGE}", f"link set {CNI_BRIDGE} up"]
        else:
            cmds.append(f"addr add {node['address']}/{POD_PREFIX_LEN} dev {UPLINK}")
            write_sysctl(node["netns"], {f"net.ipv4.conf.{UPLINK}.proxy_arp": "1", f"net.ipv4.neigh.{UPLINK}.proxy_delay": "0"})
        ip_batch(cmds + [f"link set {UPLINK} up"], netns=node["netns"])
    ip_batch(core_cmds, netns=core)


def conflist(state: dict, node: dict) -> dict:
    """The node's CNI configuration list (docs/architecture.md, Test hosts)."""
    ipam = {"type": IPAM, "routes": [{"dst": str(SERVICE_NET), "gw": node["address"]}]}
    if state["cni"] == "bridge":
        main = {"type": "bridge", "bridge": CNI_BRIDGE, "isGateway": True, "hairpinMode": True, "ipam": ipam}
    else:
        main = {"type": "ptp", "ipam": ipam}
    plugins = [main]
    if state["mode"] == "mcnp":
        plugins.append({"type": "mcnp-cni", "socket": node["cni_socket"]})
    return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": plugins}


def _write_cni(state: dict) -> None:
    """Per node: the configuration directory and the binary directory of links. A
    missing plugin binary stops ``up`` here, naming the file."""
    plugin_dir = cni_plugin_dir()
    needed = {name: os.path.join(plugin_dir, name) for name in (state["cni"], IPAM)}
    if state["mode"] == "mcnp":
        needed["mcnp-cni"] = MCNP_CNI
    missing = [path for path in needed.values() if not os.access(path, os.X_OK)]
    if missing:
        raise TestbedError(f"CNI plugin binaries missing: {', '.join(missing)} (containernetworking-plugins and "
                           f"mcnp-cni are installed by ./dev setup)")
    links = dict(needed)
    links.update({n: os.path.join(plugin_dir, n) for n in sorted(os.listdir(plugin_dir)) if n not in links})
    for node in state["nodes"].values():
        for d in (node["cni_conf_dir"], node["cni_bin_dir"], node["cni_cache_dir"], node["daemon_state_dir"]):
            os.makedirs(d, exist_ok=True)
        for name, target in links.items():
            os.symlink(target, os.path.join(node["cni_bin_dir"], name))
        with open(os.path.join(node["cni_conf_dir"], f"10-{NETWORK_NAME}.conflist"), "w") as f:
            json.dump(conflist(state, node), f, indent=1)


def _wait_links_up(namespaces: list[str], timeout: float) -> None:
    """Wait until every interface is operationally up: a bridge port forwards only
    once the kernel's link watcher has seen its carrier, and drops what comes before."""
    pending = set(namespaces)
    deadline = time.monotonic() + timeout
    while True:
        procs = {ns: subprocess.Popen(["ip", "-n", ns, "-j", "link", "show"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for ns in pending}
        down: dict[str, list[str]] = {}
        for ns, proc in procs.items():
            out, _ = proc.communicate()
            links = json.loads(out or b"[]")
            down[ns] = [link["ifname"] for link in links if link["ifname"] != "lo" and link.get("operstate") not in ("UP", "UNKNOWN")]
            if not down[ns] and links:
                pending.discard(ns)
        if not pending:
            return
        if time.monotonic() > deadline:
            ns = sorted(pending)[0]
            raise TestbedError(f"links in {ns} not up within {timeout:.0f} s: {', '.join(down[ns]) or 'none listed'}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- daemons


def mcnp_run_command(node: dict, state: dict) -> list[str]:
    """The daemon of one node, every flag in this one place: all clusters' manifest
    directories, the node's namespace, CNI socket, state and BPF directories, and its
    API on the node's own loopback."""
    exe = os.path.join(os.path.dirname(sys.executable), "mcnp")
    if not os.path.exists(exe):
        exe = shutil.which("mcnp") or exe
    argv = [exe, "run", "--node-name", node["name"], "--local-cluster", node["cluster"]]
    for name, path in state["clusters"]:
        argv += ["--cluster", f"{name}=dir:{path}"]
    return argv + ["--netns", node["netns"], "--cni-socket", node["cni_socket"], "--state-dir", node["daemon_state_dir"],
                   "--bpf-dir", node["bpf_dir"], "--api-listen", node["api"]]


DaemonCommand = Callable[[dict, dict], list]


def _daemon_ready(node: dict) -> bool:
    """``/readyz`` answers 200 once every cluster is listed; probes need more — the
    dataplane running with compiled tables in force — which ``/v1/stats`` shows (a
    daemon that does not report a dataplane is ready at 200)."""
    try:
        status, _ = http_get(node["api"], "/readyz", timeout=1.0, netns=node["netns"])
        if status != 200:
            return False
        status, stats = http_get(node["api"], "/v1/stats", timeout=1.0, netns=node["netns"])
    except (OSError, NetError):
        return False
    dp = stats.get("dataplane") if status == 200 and isinstance(stats, dict) else None
    if not isinstance(dp, dict) or "generation_in_force" not in dp:
        return True
    return bool(dp.get("ready")) and 0 < dp["generation_in_force"] == dp.get("published_generation")


def _start_daemons(state: dict, timeout: float, command: DaemonCommand) -> None:
    procs: dict[str, subprocess.Popen] = {}
    try:
        for key, node in state["nodes"].items():
            procs[key] = start_detached(state, "daemons", key, node["netns"], command(node, state), node["netns"])
    finally:
        st.save(state)
    pending = set(procs)
    deadline = time.monotonic() + timeout
    while pending:
        for key in sorted(pending):
            if procs[key].poll() is not None:
                raise TestbedError(f"the daemon of node {key} exited with code {procs[key].returncode}:\n{tail(state['daemons'][key]['log'])}")
            if _daemon_ready(state["nodes"][key]):
                pending.discard(key)
        if pending and time.monotonic() > deadline:
            key = sorted(pending)[0]
            raise TestbedError(f"the daemon of node {key} was not ready within {timeout:.0f} s:\n{tail(state['daemons'][key]['log'])}")
        time.sleep(0.1 if pending else 0)


# --------------------------------------------------------------------------- up


def _build(state: dict, ready_timeout: float, daemon_command: DaemonCommand) -> None:
    """Everything ``up`` makes, in order; the state is saved after every step."""
    _build_nodes(state)
    _write_cni(state)
    notes: list[str] = []
    kubeproxy.sync(state, notes)
    _wait_links_up([state["core"]] + [n["netns"] for n in state["nodes"].values()], LINK_TIMEOUT)
    if state["mode"] == "mcnp":
        _start_daemons(state, ready_timeout, daemon_command)
    refs = sorted(state["pods"])
    kubelet.make_namespaces(state["pods"][r]["netns"] for r in refs)
    kubelet.cni_add(state, refs)
    try:
        kubelet.start_servers(state, refs)
    finally:
        st.save(state)


def up(cluster_specs: list[tuple[Optional[str], str]], mode: str = "mcnp", json_out: bool = False, log: Callable[[str], None] = print, *,
       cni: str = "ptp", prefix: Optional[str] = None, state_dir: Optional[str] = None, ready_timeout: float = 90.0,
       daemon_command: DaemonCommand = mcnp_run_command, extra_ports: tuple = ()) -> int:
    """Build the testbed; exit code 0 when every server listens and every daemon is
    ready, 2 for invalid input, 1 when building failed (everything made is removed)."""
    if json_out and log is print:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731 - keep stdout pure JSON
    state_dir = os.path.abspath(state_dir or state_dir_default())
    if os.geteuid() != 0:
        log("mcnp testbed: needs root (network namespaces, and XDP for the daemons)")
        return 1
    started = time.monotonic()
    try:
        if st.load(state_dir) is not None:
            raise TestbedError(f"a testbed is already up (state in {state_dir}); run `mcnp testbed down` first")
        plan = make_plan(cluster_specs, mode, cni, prefix or prefix_default(), state_dir, extra_ports)
    except TestbedError as e:
        log(f"mcnp testbed: {e}")
        return e.code
    for note in plan.notes:
        log(f"note: {note}")
    state = _initial_state(plan, state_dir, extra_ports)
    clash = sorted(set(state["netns"]) & list_netns())
    if clash:
        log(f"mcnp testbed: network namespace {clash[0]} already exists (left by another run?); remove it or choose another prefix")
        return 1
    long_socket = [n["cni_socket"] for n in plan.nodes.values() if len(n["cni_socket"].encode()) > 107]
    if long_socket:
        log(f"mcnp testbed: the socket path {long_socket[0]} is too long for a unix socket; choose a shorter state directory")
        return 2
    os.makedirs(state_dir, exist_ok=True)
    with st.locked(state_dir):
        st.save(state)
        try:
            _build(state, ready_timeout, daemon_command)
        except (TestbedError, NetError, OSError) as e:
            log(f"mcnp testbed: {e}")
            log("mcnp testbed: removing what was made")
            _down(state, log)
            return 1
        except BaseException:
            _down(state, log)
            raise
    log(f"testbed up ({cni} CNI, mode {mode}): {len(plan.pods)} pods on {len(plan.nodes)} nodes of "
        f"{len(plan.clusters)} clusters in {time.monotonic() - started:.1f} s; state in {state_dir}")
    if json_out:
        print(json.dumps(summary(state), indent=1, sort_keys=True))
    return 0


def summary(state: dict) -> dict:
    """The ``--json`` answer, exactly the shape docs/interfaces.md promises."""
    return {
        "pods": {r: {"netns": p["netns"], "ip": p["ip"], "node": p["node"]} for r, p in state["pods"].items()},
        "nodes": {k: {"netns": n["netns"], "cni_conf_dir": n["cni_conf_dir"], "cni_bin_dir": n["cni_bin_dir"],
                      "pod_prefix_len": n["pod_prefix_len"], "cni_args": n["cni_args"], "api": n["api"]}
                  for k, n in state["nodes"].items()},
    }


def sync_services(state_dir: Optional[str] = None) -> dict[str, int]:
    """Install the Services of every cluster's directory again on the running testbed
    (after a Service or EndpointSlice manifest changed); translated ports per cluster."""
    with st.locked(state_dir):
        return kubeproxy.sync(st.require(state_dir))


# --------------------------------------------------------------------------- teardown


def _down(state: dict, log: Callable[[str], None]) -> int:
    stuck = stop(list(state.get("daemons", {}).values()), grace=DAEMON_GRACE)
    stuck += stop(list(state.get("servers", {}).values()), grace=SERVER_GRACE)
    present = list_netns()
    ip_batch((f"netns del {ns}" for ns in state["netns"] if ns in present), force=True)
    left = [ns for ns in state["netns"] if ns in list_netns()]
    for node in state["nodes"].values():
        if os.path.ismount(node["bpf_dir"]):
            subprocess.run(["umount", node["bpf_dir"]], check=False)
        shutil.rmtree(node["dir"], ignore_errors=True)
    manifests = [p["manifest"] for p in state["pods"].values() if p.get("manifest")]
    for path in manifests:
        if os.path.exists(path):
            os.unlink(path)
    left_dirs = [n["dir"] for n in state["nodes"].values() if os.path.exists(n["dir"])]
    if stuck or left or left_dirs:
        what = [f"process {pid}" for pid in stuck] + [f"netns {ns}" for ns in left] + [f"directory {d}" for d in left_dirs]
        log(f"mcnp testbed: could not remove {', '.join(what)}; state kept in {state['dir']}")
        return 1
    shutil.rmtree(os.path.join(state["dir"], "logs"), ignore_errors=True)
    os.unlink(st.state_path(state["dir"]))
    log(f"testbed down: removed {len(state['netns'])} network namespaces")
    return 0


def down(state_dir: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    """Remove everything the saved state names: daemons, servers, namespaces, node
    directories, manifests of added pods. Safe to run again; 0 when nothing is left."""
    state_dir = os.path.abspath(state_dir or state_dir_default())
    if not os.path.isdir(state_dir):
        log("mcnp testbed: no testbed is up")
        return 0
    try:
        with st.locked(state_dir):
            state = st.load(state_dir)
            code = _down(state, log) if state is not None else 0
    except TestbedError as e:
        log(f"mcnp testbed: {e}")
        return 1
    if state is None:
        log("mcnp testbed: no testbed is up")
    if code == 0:
        for leftover in (os.path.join(state_dir, "lock"), state_dir):
            try:
                (os.rmdir if leftover == state_dir else os.unlink)(leftover)
            except OSError:
                pass  # the directory holds something else: leave it
    return code


# --------------------------------------------------------------------------- daemon API


def api_get(node: str, path: str, timeout: float = 5.0, state_dir: Optional[str] = None):
    """``GET path`` on the daemon of ``node`` ("cluster/node", or a node name that is
    unique in the testbed) → (status, parsed JSON or text)."""
    state = st.require(state_dir)
    rec = state["nodes"][st.node_key(state, node)]
    if not rec.get("api"):
        raise LookupError(f"node {node!r} runs no daemon (mode {state['mode']})")
    return http_get(rec["api"], path, timeout, netns=rec["netns"])
