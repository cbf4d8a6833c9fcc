"""``mcnp testbed up`` / ``down``: test hosts built from manifest directories.

The layout (DESIGN.md section 4)::

    pod netns (eth0: pod IP/15) ── veth ── node netns (pod ports + uplink, no IPs)
                                              │ uplink veth
                                           core netns (kernel bridge of every uplink)

In ``mcnp`` mode a daemon per node netns switches between its ports; in ``bridge`` mode a
kernel bridge does, without policy — the baseline. Every pod runs ``podserver`` on its
declared ports. All of it is recorded in a state file *before* it is made, so ``down``
(with no arguments, any number of times) removes exactly what ``up`` made, even when
``up`` failed half way.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from control.semantics.manifests import load_clusterset
from control.semantics.model import InvalidObject
from control.lab.net import NetError, ip_batch, list_netns, netns_name, popen_in, write_sysctl
from control.lab.proc import start_detached, stop, tail, unix_get

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/mcnp/testbed"
DEFAULT_PREFIX = "mcnp-"
#: The only addresses test hosts may use (DESIGN.md section 4).
POD_NET = ipaddress.ip_network("198.18.0.0/15")
#: XDP in native mode on veth needs a peer MTU of at most 3506 (DESIGN.md section 3).
MTU = 1500
MODES = ("mcnp", "bridge")
#: Seconds a daemon gets to detach its programs after SIGTERM before its session is
#: killed; pod servers get one second.
DAEMON_GRACE = 5.0
PODSERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "podserver.py")
#: Test hosts carry IPv4 pod addresses only; without IPv6 the node and core namespaces
#: really hold no addresses and no router solicitations wander through the switches.
NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


class TestbedError(Exception):
    """A testbed that cannot be built; ``code`` 2 for invalid input, 1 otherwise."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def state_dir_default() -> str:
    """The state directory; ``MCNP_TESTBED_DIR`` moves it (tests use their own)."""
    return os.environ.get("MCNP_TESTBED_DIR", DEFAULT_STATE_DIR)


def prefix_default() -> str:
    """The namespace name prefix; ``MCNP_TESTBED_PREFIX`` changes it, so a test's
    testbed never meets a demo's."""
    return os.environ.get("MCNP_TESTBED_PREFIX", DEFAULT_PREFIX)


# --------------------------------------------------------------------------- the plan


@dataclass
class PodPlan:
    ref: str
    ip: str
    netns: str
    node: str  # node key "cluster/node"
    port_if: str  # the pod port's name in the node netns
    ports: list[tuple[str, int]]  # (protocol, number) the pod's server listens on


@dataclass
class NodePlan:
    key: str  # "cluster/node"
    cluster: str
    name: str
    netns: str
    uplink: str
    core_port: str  # the uplink's peer in the core netns
    ports: dict[str, str] = field(default_factory=dict)  # ifname -> pod ref


@dataclass
class Plan:
    mode: str
    prefix: str
    core: str
    clusters: list[tuple[str, str]]  # (name, absolute directory)
    pods: dict[str, PodPlan] = field(default_factory=dict)
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def namespaces(self) -> list[str]:
        return [self.core] + [n.netns for n in self.nodes.values()] + [p.netns for p in self.pods.values()]


def make_plan(cluster_specs: list[tuple[Optional[str], str]], mode: str, prefix: str,
              extra_ports: tuple = ()) -> Plan:
    """Read the manifests and decide every name and address; nothing is made yet.
    ``extra_ports`` ((protocol, number), ...) are served by every pod besides its
    declared ones, so a probe on them shows the policy's verdict, not a closed port."""
    for proto, number in extra_ports:
        if str(proto).upper() not in ("TCP", "UDP") or not 1 <= int(number) <= 65535:
            raise TestbedError(f"extra port {proto}/{number}: want TCP or UDP and a port in 1-65535", 2)
    try:
        cset, notes = load_clusterset([(n, os.path.abspath(d)) for n, d in cluster_specs], strict=True)
    except InvalidObject as e:
        raise TestbedError(str(e), 2) from None
    plan = Plan(mode, prefix, prefix + "core", [(c, os.path.abspath(d)) for c, (_, d) in zip(cset.clusters, cluster_specs)])
    plan.notes.extend(notes)
    owner: dict[str, str] = {}
    for cname, cluster in cset.clusters.items():
        unplaced = []
        for pod in sorted(cluster.pods.values(), key=lambda p: p.ref):
            if not pod.can_take_part:
                plan.notes.append(f"{pod.ref}: no test host (hostNetwork, no IP or finished: rule S8)")
                continue
            ip = pod.ip
            if ip.version != 4 or ip not in POD_NET:
                raise TestbedError(f"{pod.source}: Pod {pod.ref}: status.podIP: {ip} is outside {POD_NET}, the only range test hosts may use", 2)
            if str(ip) in owner:
                raise TestbedError(f"{pod.source}: Pod {pod.ref}: status.podIP: {ip} is also the IP of {owner[str(ip)]}; test hosts need distinct addresses", 2)
            owner[str(ip)] = pod.ref
            node_name = pod.node or cname
            if pod.node is None:
                unplaced.append(pod.name)
            key = f"{cname}/{node_name}"
            node = plan.nodes.get(key)
            if node is None:
                i = len(plan.nodes)
                node = plan.nodes[key] = NodePlan(key, cname, node_name, netns_name(prefix, cname, node_name), "uplink", f"node{i}")
            port_if = f"pod{len(node.ports)}"
            node.ports[port_if] = pod.ref
            ports = [(proto.upper(), int(n)) for proto, n in extra_ports]
            for cp in pod.ports:
                if cp.protocol == "SCTP":
                    plan.notes.append(f"{pod.ref}: SCTP port {cp.port} not served (this kernel has no SCTP sockets)")
                elif (cp.protocol, cp.port) not in ports:
                    ports.append((cp.protocol, cp.port))
            plan.pods[pod.ref] = PodPlan(pod.ref, str(ip), netns_name(prefix, cname, pod.namespace, pod.name), key, port_if, ports)
        if unplaced:
            plan.notes.append(f"cluster {cname}: pods without spec.nodeName placed on node {cname!r}: {', '.join(unplaced)}")
    return plan


# --------------------------------------------------------------------------- state


def _state_path(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def load_state(state_dir: Optional[str] = None) -> Optional[dict]:
    """The saved state of the testbed that is up, or None. Keys: ``mode``, ``core``,
    ``netns`` (every namespace made), ``pods`` (ref → netns, ip, node, port, ports),
    ``nodes`` (key → netns, cluster, name, uplink, ports), ``servers`` (ref → pid),
    ``daemons`` (node key → pid, log, api)."""
    path = _state_path(state_dir or state_dir_default())
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise TestbedError(f"the testbed state {path} is unreadable ({e}); remove what it made by hand") from None


def _save(state: dict) -> None:
    path = _state_path(state["dir"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _initial_state(plan: Plan, state_dir: str) -> dict:
    return {
        "version": 1,
        "dir": state_dir,
        "mode": plan.mode,
        "prefix": plan.prefix,
        "core": plan.core,
        "clusters": [list(c) for c in plan.clusters],
        "netns": plan.namespaces(),
        "pods": {r: {"netns": p.netns, "ip": p.ip, "node": p.node, "port": p.port_if,
                     "ports": [{"protocol": pr, "port": n} for pr, n in p.ports]} for r, p in plan.pods.items()},
        "nodes": {k: {"netns": n.netns, "cluster": n.cluster, "name": n.name, "uplink": n.uplink,
                      "core_port": n.core_port, "ports": dict(n.ports)} for k, n in plan.nodes.items()},
        "servers": {},
        "daemons": {},
    }


# --------------------------------------------------------------------------- building


def _build_network(plan: Plan) -> None:
    """Namespaces, veths, addresses and (bridge mode) bridges, in a handful of ``ip``
    processes."""
    ip_batch(f"netns add {ns}" for ns in plan.namespaces())
    for ns in plan.namespaces():
        write_sysctl(ns, NO_IPV6)
    links = []
    for node in plan.nodes.values():
        links.append(f"link add {node.uplink} mtu {MTU} netns {node.netns} type veth peer name {node.core_port} mtu {MTU} netns {plan.core}")
    for pod in plan.pods.values():
        node = plan.nodes[pod.node]
        links.append(f"link add {pod.port_if} mtu {MTU} netns {node.netns} type veth peer name eth0 mtu {MTU} netns {pod.netns}")
    ip_batch(links)

    batches: dict[str, list[str]] = {plan.core: ["link add br0 type bridge", "link set br0 up"]}
    for node in plan.nodes.values():
        cmds = batches[node.netns] = ["link set lo up"]
        ports = list(node.ports) + [node.uplink]
        if plan.mode == "bridge":
            cmds += ["link add br0 type bridge", "link set br0 up"] + [f"link set {p} master br0" for p in ports]
        cmds += [f"link set {p} up" for p in ports]
        batches[plan.core] += [f"link set {node.core_port} master br0", f"link set {node.core_port} up"]
    for pod in plan.pods.values():
        batches[pod.netns] = ["link set lo up", f"addr add {pod.ip}/{POD_NET.prefixlen} dev eth0", "link set eth0 up"]
    _run_parallel({ns: ["ip", "-n", ns, "-batch", "-"] for ns in batches}, {ns: "\n".join(c) + "\n" for ns, c in batches.items()})
    if plan.mode == "mcnp":
        # An in-kernel redirect into a veth only delivers when its peer has GRO on or an
        # XDP program (DESIGN.md section 3): the daemon's ports carry its program, the
        # far ends (pod eth0, core-side uplink peers) get GRO.
        gro = {p.netns: ["ethtool", "-K", "eth0", "gro", "on"] for p in plan.pods.values()}
        procs = {ns: popen_in(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for ns, argv in gro.items()}
        procs["core"] = popen_in(plan.core, ["sh", "-c", " && ".join(f"ethtool -K {n.core_port} gro on" for n in plan.nodes.values()) or "true"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for ns, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise NetError(f"turning GRO on in {ns} failed: {err.strip()}")


def _wait_links_up(plan: Plan, timeout: float) -> None:
    """Wait until every interface is operationally up. The kernel attaches a device's
    queueing discipline (and lets a bridge port forward) only when its link watcher
    gets round to the carrier change — up to a second later — and drops what is sent
    before: a probe right after ``up`` would see a dead network."""
    pending = set(plan.namespaces())
    deadline = time.monotonic() + timeout
    while True:
        procs = {ns: subprocess.Popen(["ip", "-n", ns, "-j", "link", "show"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for ns in pending}
        down: dict[str, list[str]] = {}
        for ns, proc in procs.items():
            out, _ = proc.communicate()
            links = json.loads(out or b"[]")
            down[ns] = [link["ifname"] for link in links if link["ifname"] != "lo" and link.get("operstate") != "UP"]
            if not down[ns] and links:
                pending.discard(ns)
        if not pending:
            return
        if time.monotonic() > deadline:
            ns = sorted(pending)[0]
            raise TestbedError(f"links in {ns} not up within {timeout:.0f} s: {', '.join(down[ns]) or 'none listed'}")
        time.sleep(0.05)


def _run_parallel(argvs: dict[str, list[str]], inputs: dict[str, str]) -> None:
    procs = {k: subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k, argv in argvs.items()}
    errors = []
    for k, proc in procs.items():
        _, err = proc.communicate(inputs[k])
        if proc.returncode != 0:
            errors.append(f"{k}: {err.strip()}")
    if errors:
        raise NetError("ip -batch failed: " + "; ".join(errors))


def _start_servers(plan: Plan, state: dict, timeout: float) -> None:
    """One podserver per pod with ports; returns when each has bound every port."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for pod in plan.pods.values():
            if pod.ports:
                argv = [sys.executable, "-I", "-S", PODSERVER] + [f"{pr}:{n}" for pr, n in pod.ports]
                procs[pod.ref] = start_detached(state, "servers", pod.ref, pod.netns, argv, pod.netns, stdout=subprocess.PIPE)
    finally:
        _save(state)
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
                ref = key.data
                line = key.fileobj.readline()
                if line.strip() != b"ready":
                    raise TestbedError(f"the server of {ref} failed:\n{tail(state['servers'][ref]['log'])}")
                sel.unregister(key.fileobj)
                pending.discard(ref)
    finally:
        for proc in procs.values():
            proc.stdout.close()
        sel.close()


def api_address(state_dir: str, node_key: str) -> str:
    path = os.path.join(state_dir, node_key.replace("/", "-") + ".sock")
    if len(path.encode()) > 100:  # sun_path holds 108 bytes
        path = os.path.join(state_dir, "d" + hashlib.sha256(node_key.encode()).hexdigest()[:12] + ".sock")
    return "unix:" + path


def mcnp_run_command(node: NodePlan, clusters: list[tuple[str, str]], api: str) -> list[str]:
    """The daemon of one node: every cluster's manifests, the node's pod ports and
    uplink, its API on a unix socket."""
    exe = os.path.join(os.path.dirname(sys.executable), "mcnp")
    if not os.path.exists(exe):
        exe = shutil.which("mcnp") or exe
    argv = [exe, "run", "--node-name", node.name, "--local-cluster", node.cluster]
    for name, path in clusters:
        argv += ["--cluster", f"{name}=dir:{path}"]
    for ifname, ref in node.ports.items():
        argv += ["--attach", f"{ifname}={ref}"]
    return argv + ["--uplink", node.uplink, "--api-listen", api]


DaemonCommand = Callable[[NodePlan, list, str], list]


def _daemon_ready(sock: str) -> bool:
    """``/readyz`` answers 200 once every cluster is listed; probes need more — the
    dataplane running with compiled tables in force — which ``/v1/stats`` shows (a
    daemon without a dataplane, or one that does not report it, is ready at 200)."""
    try:
        status, _ = unix_get(sock, "/readyz", timeout=1.0)
        if status != 200:
            return False
        status, stats = unix_get(sock, "/v1/stats", timeout=1.0)
    except OSError:
        return False
    dp = stats.get("dataplane") if status == 200 and isinstance(stats, dict) else None
    if not isinstance(dp, dict) or "generation_in_force" not in dp:
        return True
    return bool(dp.get("ready")) and 0 < dp["generation_in_force"] == dp.get("published_generation")


def _start_daemons(plan: Plan, state: dict, timeout: float, command: DaemonCommand) -> None:
    procs: dict[str, subprocess.Popen] = {}
    try:
        for node in plan.nodes.values():
            api = api_address(state["dir"], node.key)
            sock = api[len("unix:"):]
            if os.path.exists(sock):
                os.unlink(sock)
            procs[node.key] = start_detached(state, "daemons", node.key, node.netns, command(node, plan.clusters, api), node.netns)
            state["daemons"][node.key]["api"] = api
    finally:
        _save(state)
    pending = set(procs)
    deadline = time.monotonic() + timeout
    while pending:
        for key in sorted(pending):
            info = state["daemons"][key]
            if procs[key].poll() is not None:
                raise TestbedError(f"the daemon of node {key} exited with code {procs[key].returncode}:\n{tail(info['log'])}")
            if _daemon_ready(info["api"][len("unix:"):]):
                pending.discard(key)
        if not pending:
            break
        if time.monotonic() > deadline:
            key = sorted(pending)[0]
            raise TestbedError(f"the daemon of node {key} was not ready within {timeout:.0f} s:\n{tail(state['daemons'][key]['log'])}")
        time.sleep(0.2)


def up(cluster_specs: list[tuple[Optional[str], str]], mode: str = "mcnp", json_out: bool = False, log: Callable[[str], None] = print, *,
       prefix: Optional[str] = None, state_dir: Optional[str] = None, ready_timeout: float = 90.0,
       daemon_command: DaemonCommand = mcnp_run_command, extra_ports: tuple = ()) -> int:
    """Build the testbed; exit code 0 when every server listens and every daemon is
    ready, 2 for invalid input, 1 when building failed (everything made is removed)."""
    if json_out and log is print:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731 - keep stdout pure JSON
    state_dir = os.path.abspath(state_dir or state_dir_default())
    if os.geteuid() != 0:
        log("mcnp testbed: needs root (network namespaces, and XDP for the daemons)")
        return 1
    if mode not in MODES:
        log(f"mcnp testbed: unknown mode {mode!r} (choose {' or '.join(MODES)})")
        return 2
    try:
        existing = load_state(state_dir)
    except TestbedError as e:
        log(f"mcnp testbed: {e}")
        return 1
    if existing is not None:
        log(f"mcnp testbed: a testbed is already up (state in {state_dir}); run `mcnp testbed down` first")
        return 1
    started = time.monotonic()
    try:
        plan = make_plan(cluster_specs, mode, prefix or prefix_default(), extra_ports)
    except TestbedError as e:
        log(f"mcnp testbed: {e}")
        return e.code
    for note in plan.notes:
        log(f"note: {note}")
    clash = sorted(set(plan.namespaces()) & list_netns())
    if clash:
        log(f"mcnp testbed: network namespace {clash[0]} already exists (left by another run?); remove it or choose another prefix")
        return 1
    os.makedirs(state_dir, exist_ok=True)
    state = _initial_state(plan, state_dir)
    _save(state)
    try:
        _build_network(plan)
        _start_servers(plan, state, timeout=30.0)
        _wait_links_up(plan, timeout=10.0)
        if mode == "mcnp":
            _start_daemons(plan, state, ready_timeout, daemon_command)
    except (TestbedError, NetError, OSError) as e:
        log(f"mcnp testbed: {e}")
        log("mcnp testbed: removing what was made")
        down(state_dir, log=log)
        return 1
    except BaseException:
        down(state_dir, log=log)
        raise
    log(f"testbed up ({mode}): {len(plan.pods)} pods on {len(plan.nodes)} nodes of {len(plan.clusters)} clusters "
        f"in {time.monotonic() - started:.1f} s; state in {state_dir}")
    if json_out:
        print(json.dumps(summary(state), indent=1, sort_keys=True))
    return 0


def summary(state: dict) -> dict:
    """The ``--json`` answer: pods as DESIGN.md section 5 names them, plus the nodes."""
    return {
        "pods": {r: {"netns": p["netns"], "ip": p["ip"]} for r, p in state["pods"].items()},
        "nodes": {k: {"netns": n["netns"], "uplink": n["uplink"], "ports": n["ports"],
                      **({"api": state["daemons"][k]["api"]} if k in state["daemons"] else {})}
                  for k, n in state["nodes"].items()},
        "core": state["core"],
        "mode": state["mode"],
    }


# --------------------------------------------------------------------------- teardown


def down(state_dir: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    """Remove everything the saved state names: daemons, servers, namespaces, files.
    Safe to run again; 0 when nothing of the testbed is left."""
    state_dir = os.path.abspath(state_dir or state_dir_default())
    try:
        state = load_state(state_dir)
    except TestbedError as e:
        log(f"mcnp testbed: {e}")
        return 1
    if state is None:
        log("mcnp testbed: no testbed is up")
        return 0
    stuck = stop(list(state.get("daemons", {}).values()), grace=DAEMON_GRACE)
    stuck += stop(list(state.get("servers", {}).values()), grace=1.0)
    ip_batch((f"netns del {ns}" for ns in state["netns"] if ns in list_netns()), force=True)
    left = [ns for ns in state["netns"] if ns in list_netns()]
    if stuck or left:
        what = [f"process {pid}" for pid in stuck] + [f"netns {ns}" for ns in left]
        log(f"mcnp testbed: could not remove {', '.join(what)}; state kept in {state_dir}")
        return 1
    for info in state.get("daemons", {}).values():
        sock = info.get("api", "")[len("unix:"):]
        if sock and os.path.exists(sock):
            os.unlink(sock)
    shutil.rmtree(os.path.join(state_dir, "logs"), ignore_errors=True)
    os.unlink(_state_path(state_dir))
    try:
        os.rmdir(state_dir)
    except OSError:
        pass
    log(f"testbed down: removed {len(state['netns'])} network namespaces")
    return 0


# --------------------------------------------------------------------------- daemon API


def api_get(node: str, path: str, timeout: float = 5.0, state_dir: Optional[str] = None):
    """``GET path`` on the daemon of ``node`` ("cluster/node", or a node name that is
    unique in the testbed) → (status, parsed JSON or text)."""
    state = load_state(state_dir)
    if state is None:
        raise LookupError("no testbed is up")
    daemons = state.get("daemons", {})
    keys = [node] if node in daemons else [k for k in daemons if k.split("/", 1)[1] == node]
    if len(keys) != 1:
        raise LookupError(f"no single daemon for node {node!r} (have: {', '.join(sorted(daemons)) or 'none'})")
    return unix_get(daemons[keys[0]]["api"][len("unix:"):], path, timeout)
