"""``mcnp testbed up/down`` and real-connection probes (DESIGN.md section 4).

The privileged tests build real test hosts under a prefix of their own
(``mcnpt-<pid>-``) with a state directory of their own, and always tear down.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

from control.lab import probe, testbed
from control.semantics.manifests import load_clusterset
from control.semantics.reference import ReferenceEvaluator
from control.lab.net import NetError, list_netns, process_start_time, session_members

ROOT = os.geteuid() == 0
_needs_root = pytest.mark.skipif(not ROOT, reason="needs root and network namespaces")


def privileged(test):
    return pytest.mark.privileged(_needs_root(test))


PREFIX = f"mcnpt-{os.getpid()}-"

POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  {node}
  containers:
  - name: main
    ports: {ports}
status: {{phase: Running, podIP: {ip}}}
"""
WEB = "[{containerPort: 80, protocol: TCP}, {containerPort: 53, protocol: UDP}, {containerPort: 9, protocol: SCTP}]"


def write_cluster(path, pods) -> str:
    """A manifest directory: one namespace ``x`` and ``pods`` as (name, node, ip, ports)."""
    os.makedirs(path, exist_ok=True)
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"]
    for name, node, ip, ports in pods:
        docs.append(POD.format(name=name, ns="x", ip=ip, ports=ports, node=f"nodeName: {node}" if node else ""))
    with open(os.path.join(path, "pods.yaml"), "w") as f:
        f.write("---\n".join(docs))
    return str(path)


@pytest.fixture
def clusters(tmp_path):
    """Two clusters, three nodes, five pods; one pod without a node, one hostNetwork."""
    c1 = write_cluster(tmp_path / "c1", [
        ("a", "n1", "198.18.0.1", WEB), ("b", "n1", "198.18.0.2", WEB), ("c", "n2", "198.18.1.3", WEB),
    ])
    c2 = write_cluster(tmp_path / "c2", [("a", "n1", "198.19.0.1", WEB), ("d", None, "198.19.0.4", WEB)])
    with open(os.path.join(c2, "host.yaml"), "w") as f:
        f.write("apiVersion: v1\nkind: Pod\nmetadata: {name: h, namespace: x}\n"
                "spec: {hostNetwork: true, containers: [{name: m}]}\nstatus: {podIP: 10.0.0.7}\n")
    return [("c1", c1), ("c2", c2)]


@pytest.fixture
def state_dir(tmp_path):
    """A state directory of the test's own; whatever the test leaves up is torn down."""
    d = str(tmp_path / "state")
    try:
        yield d
    finally:
        if testbed.load_state(d) is not None:
            testbed.down(d, log=lambda m: None)
        leftover = sorted(ns for ns in list_netns() if ns.startswith(PREFIX))
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in leftover), text=True, check=False)


def ours() -> set[str]:
    return {ns for ns in list_netns() if ns.startswith(PREFIX)}


# --------------------------------------------------------------------------- planning (no root)


def test_plan_names_nodes_ports_and_notes(clusters):
    plan = testbed.make_plan(clusters, "bridge", PREFIX)
    assert sorted(plan.pods) == ["c1/x/a", "c1/x/b", "c1/x/c", "c2/x/a", "c2/x/d"]
    assert sorted(plan.nodes) == ["c1/n1", "c1/n2", "c2/c2", "c2/n1"]
    assert plan.nodes["c1/n1"].ports == {"pod0": "c1/x/a", "pod1": "c1/x/b"}
    assert plan.pods["c2/x/d"].node == "c2/c2"
    assert plan.pods["c1/x/a"].ports == [("TCP", 80), ("UDP", 53)]
    names = plan.namespaces()
    assert len(set(names)) == len(names) and all(n.startswith(PREFIX) and "/" not in n for n in names)
    ifnames = [i for n in plan.nodes.values() for i in list(n.ports) + [n.uplink, n.core_port]]
    assert all(len(i) <= 15 for i in ifnames)
    notes = "\n".join(plan.notes)
    assert "SCTP port 9 not served" in notes
    assert "c2/x/h: no test host" in notes
    assert "placed on node 'c2': d" in notes


def test_plan_serves_extra_ports_on_every_pod(clusters):
    plan = testbed.make_plan(clusters, "bridge", PREFIX, extra_ports=[("tcp", 5432), ("TCP", 80)])
    assert all(p.ports == [("TCP", 5432), ("TCP", 80), ("UDP", 53)] for p in plan.pods.values())
    with pytest.raises(testbed.TestbedError, match="extra port SCTP/9"):
        testbed.make_plan(clusters, "bridge", PREFIX, extra_ports=[("SCTP", 9)])


@pytest.mark.parametrize("ip", ["10.1.2.3", "198.20.0.1", "fd00::1"])
def test_plan_refuses_addresses_outside_the_test_range(tmp_path, ip):
    c = write_cluster(tmp_path / "c", [("a", "n1", "198.18.0.1", WEB), ("bad", "n1", ip, WEB)])
    with pytest.raises(testbed.TestbedError) as err:
        testbed.make_plan([("c", c)], "bridge", PREFIX)
    assert err.value.code == 2
    assert "c/x/bad" in str(err.value) and "198.18.0.0/15" in str(err.value)


def test_plan_refuses_one_address_for_two_pods(tmp_path):
    c1 = write_cluster(tmp_path / "c1", [("a", "n1", "198.18.0.1", WEB)])
    c2 = write_cluster(tmp_path / "c2", [("a", "n1", "198.18.0.1", WEB)])
    with pytest.raises(testbed.TestbedError, match="also the IP of c1/x/a"):
        testbed.make_plan([("c1", c1), ("c2", c2)], "bridge", PREFIX)


def test_probe_refuses_protocols_it_cannot_speak():
    with pytest.raises(ValueError, match="SCTP"):
        probe.probe_many([("ns", "198.18.0.1", 80, "SCTP")])


# --------------------------------------------------------------------------- real hosts


@privileged
def test_bridge_mode_every_pair_reaches_every_other(clusters, state_dir, capsys):
    assert testbed.up(clusters, mode="bridge", json_out=True, prefix=PREFIX, state_dir=state_dir) == 0
    out = json.loads(capsys.readouterr().out)
    pods = out["pods"]
    assert sorted(pods) == ["c1/x/a", "c1/x/b", "c1/x/c", "c2/x/a", "c2/x/d"]
    assert all(set(p) == {"netns", "ip"} and p["netns"] in list_netns() for p in pods.values())
    assert pods["c1/x/c"]["ip"] == "198.18.1.3"

    # Each pod host carries its IP on eth0 with the on-link /15; node namespaces none.
    addr = subprocess.run(["ip", "-n", pods["c1/x/c"]["netns"], "-j", "addr", "show", "dev", "eth0"], capture_output=True, text=True, check=True)
    info = json.loads(addr.stdout)[0]
    assert [(a["local"], a["prefixlen"]) for a in info["addr_info"]] == [("198.18.1.3", 15)]
    assert info["mtu"] == 1500
    node_ns = out["nodes"]["c1/n1"]["netns"]
    addrs = json.loads(subprocess.run(["ip", "-n", node_ns, "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    assert all(not a["addr_info"] for a in addrs if a["ifname"] != "lo")

    refs = sorted(pods)
    pairs = [(s, d) for s in refs for d in refs if s != d]  # self pairs skipped (rule S7)
    served = [(pods[s]["netns"], pods[d]["ip"], port, proto) for s, d in pairs for port, proto in ((80, "TCP"), (53, "UDP"))]
    closed = [(pods[s]["netns"], pods[d]["ip"], port, proto) for s, d in pairs for port, proto in ((81, "TCP"), (54, "UDP"))]
    results = probe.probe_many(served + closed)
    assert results[: len(served)] == [True] * len(served)
    assert results[len(served):] == [False] * len(closed)
    assert probe.probe(pods["c1/x/a"]["netns"], pods["c2/x/d"]["ip"], 80, "TCP") is True

    async def from_a_running_loop():  # the probing thread is probe_many's own
        return probe.probe_many(served[:4])
    assert asyncio.run(from_a_running_loop()) == [True] * 4
    with pytest.raises(NetError, match="does not exist"):
        probe.probe_many([(PREFIX + "missing", "198.18.0.1", 80, "TCP")])


@privileged
def test_down_removes_everything_and_is_safe_twice(clusters, state_dir):
    assert testbed.up(clusters, mode="bridge", prefix=PREFIX, state_dir=state_dir, log=lambda m: None) == 0
    state = testbed.load_state(state_dir)
    servers = list(state["servers"].values())
    assert len(servers) == 5 and all(process_start_time(s["pid"]) == s["start"] for s in servers)
    assert set(state["netns"]) == ours()
    assert testbed.up(clusters, mode="bridge", prefix=PREFIX, state_dir=state_dir, log=lambda m: None) == 1  # already up

    assert testbed.down(state_dir, log=lambda m: None) == 0
    assert ours() == set()
    assert all(process_start_time(s["pid"]) is None for s in servers)
    assert testbed.load_state(state_dir) is None
    assert testbed.down(state_dir, log=lambda m: None) == 0


@privileged
def test_up_refuses_outside_range_and_makes_nothing(tmp_path, state_dir):
    c = write_cluster(tmp_path / "c", [("a", "n1", "198.18.0.1", WEB), ("bad", "n1", "192.0.2.1", WEB)])
    lines = []
    assert testbed.up([("c", c)], mode="bridge", prefix=PREFIX, state_dir=state_dir, log=lines.append) == 2
    assert any("192.0.2.1 is outside 198.18.0.0/15" in line for line in lines)
    assert ours() == set() and testbed.load_state(state_dir) is None


@privileged
def test_failing_daemon_tears_down_what_was_made(clusters, state_dir):
    lines = []
    failing = lambda node, clusters, api: [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]  # noqa: E731
    assert testbed.up(clusters, mode="mcnp", prefix=PREFIX, state_dir=state_dir, log=lines.append, daemon_command=failing) == 1
    text = "\n".join(lines)
    assert "exited with code 3" in text and "boom" in text
    assert ours() == set() and testbed.load_state(state_dir) is None


#: Stands in for `mcnp run` until readiness: answers GET over the unix socket named by
#: --api-listen (after a moment, so that up really has to wait), with its arguments.
FAKE_DAEMON = textwrap.dedent(r'''
    import http.server, json, socketserver, sys, time
    path = sys.argv[sys.argv.index("--api-listen") + 1][len("unix:"):]
    time.sleep(0.5)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"path": self.path, "argv": sys.argv[1:]}).encode()
            self.send_response(200 if self.path in ("/readyz", "/v1/args") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    class Server(socketserver.UnixStreamServer):
        def get_request(self):
            return self.socket.accept()[0], ("unix", 0)
    Server(path, Handler).serve_forever()
''')


@privileged
def test_mcnp_mode_waits_for_daemons_in_node_namespaces(clusters, state_dir, monkeypatch):
    monkeypatch.setenv("MCNP_TESTBED_DIR", state_dir)  # api_get finds the state by default

    def fake(node, cl, api):
        return [sys.executable, "-c", FAKE_DAEMON] + testbed.mcnp_run_command(node, cl, api)[1:]

    assert testbed.up(clusters, mode="mcnp", prefix=PREFIX, state_dir=state_dir, log=lambda m: None, daemon_command=fake) == 0
    state = testbed.load_state()
    assert sorted(state["daemons"]) == ["c1/n1", "c1/n2", "c2/c2", "c2/n1"]
    status, body = testbed.api_get("c1/n1", "/v1/args")
    assert status == 200
    argv = body["argv"]
    assert argv[:5] == ["run", "--node-name", "n1", "--local-cluster", "c1"]
    assert f"c1=dir:{clusters[0][1]}" in argv and f"c2=dir:{clusters[1][1]}" in argv
    assert "pod0=c1/x/a" in argv and "pod1=c1/x/b" in argv and argv[argv.index("--uplink") + 1] == "uplink"
    assert testbed.api_get("c2", "/readyz")[0] == 200  # a bare node name that is unique
    # The daemon runs in its node's namespace, and that namespace holds its ports.
    for key, info in state["daemons"].items():
        netns = state["nodes"][key]["netns"]
        assert os.stat(f"/proc/{info['pid']}/ns/net").st_ino == os.stat(f"/var/run/netns/{netns}").st_ino
    links = json.loads(subprocess.run(["ip", "-n", state["nodes"]["c1/n1"]["netns"], "-j", "link"], capture_output=True, text=True, check=True).stdout)
    assert {"pod0", "pod1", "uplink"} <= {l["ifname"] for l in links}
    assert not any(l.get("linkinfo", {}).get("info_kind") == "bridge" for l in links)
    # Redirects into a veth need GRO on its far end (DESIGN.md section 3).
    netns = state["pods"]["c1/x/a"]["netns"]
    features = subprocess.run(["ip", "netns", "exec", netns, "ethtool", "-k", "eth0"], capture_output=True, text=True, check=True).stdout
    assert "generic-receive-offload: on" in features
    daemons = list(state["daemons"].values())
    assert testbed.down(state_dir, log=lambda m: None) == 0
    assert ours() == set() and all(process_start_time(d["pid"]) is None for d in daemons)


#: A daemon that ignores SIGTERM and leaves a worker process behind in its session.
STUBBORN_DAEMON = "import signal, subprocess, sys\n" \
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n" + FAKE_DAEMON


@privileged
def test_down_kills_a_stubborn_daemon_and_its_workers(clusters, state_dir, monkeypatch):
    monkeypatch.setattr(testbed, "DAEMON_GRACE", 0.5)

    def stubborn(node, cl, api):
        return [sys.executable, "-c", STUBBORN_DAEMON] + testbed.mcnp_run_command(node, cl, api)[1:]

    assert testbed.up(clusters[:1], mode="mcnp", prefix=PREFIX, state_dir=state_dir, log=lambda m: None, daemon_command=stubborn) == 0
    state = testbed.load_state(state_dir)
    sessions = {d["pid"]: session_members(d["pid"]) for d in state["daemons"].values()}
    assert all(len(members) == 2 for members in sessions.values())  # daemon + worker
    assert testbed.down(state_dir, log=lambda m: None) == 0
    assert all(session_members(sid) == [] for sid in sessions)
    assert ours() == set()


POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 80}]
"""


@privileged
@pytest.mark.slow
def test_mcnp_mode_real_daemons_enforce_what_the_reference_expects(tmp_path, state_dir):
    """The whole path: real `mcnp run` daemons switching real connections, observed
    beside the reference evaluator's verdicts."""
    if not os.path.exists(os.path.join(os.path.dirname(testbed.__file__), "..", "fastpath", "xdp_redirect.bpf.o")):
        pytest.skip("the XDP program is not built (./dev setup)")
    c1 = write_cluster(tmp_path / "c1", [("a", "n1", "198.18.0.1", WEB), ("b", "n1", "198.18.0.2", WEB), ("c", "n2", "198.18.1.3", WEB)])
    c2 = write_cluster(tmp_path / "c2", [("b", "n1", "198.19.0.2", WEB)])
    with open(os.path.join(c1, "policy.yaml"), "w") as f:
        f.write(POLICY)
    lines = []
    assert testbed.up([("c1", c1), ("c2", c2)], mode="mcnp", prefix=PREFIX, state_dir=state_dir, log=lines.append) == 0, "\n".join(lines)
    state = testbed.load_state(state_dir)
    cset, _ = load_clusterset([("c1", c1), ("c2", c2)])
    oracle = ReferenceEvaluator(cset)
    pods = sorted(cset.pods(), key=lambda p: p.ref)
    cases = [(s, d, port, proto) for s in pods for d in pods if s.ref != d.ref for port, proto in ((80, "TCP"), (53, "UDP"))]
    observed = probe.probe_many([(state["pods"][s.ref]["netns"], str(d.ip), port, proto) for s, d, port, proto in cases])
    expected = [oracle.evaluate(s, d, port, proto).allowed for s, d, port, proto in cases]
    assert any(expected) and not all(expected)  # the policy matters for some pairs only
    assert {(s.ref, d.ref, proto): o for (s, d, _, proto), o in zip(cases, observed)} == \
        {(s.ref, d.ref, proto): e for (s, d, _, proto), e in zip(cases, expected)}


@privileged
def test_cli_up_json_and_down(clusters, state_dir):
    mcnp = os.path.join(os.path.dirname(sys.executable), "mcnp")
    env = dict(os.environ, MCNP_TESTBED_DIR=state_dir, MCNP_TESTBED_PREFIX=PREFIX)
    helped = subprocess.run([mcnp, "testbed", "--help"], capture_output=True, text=True, env=env)
    if not os.path.exists(mcnp) or helped.returncode != 0:
        pytest.skip("`mcnp testbed` is not wired into the command line yet")
    args = [a for name, d in clusters for a in ("--cluster", f"{name}={d}")]
    proc = subprocess.run([mcnp, "testbed", "up", *args, "--mode", "bridge", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pods = json.loads(proc.stdout)["pods"]
    assert {p["netns"] for p in pods.values()} <= ours()
    down = subprocess.run([mcnp, "testbed", "down"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0, down.stderr
    assert ours() == set()
