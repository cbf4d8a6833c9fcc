"""mcnp beside a real CNI, as an attacker and an operator would try it: broadcasts,
forged ARP and non-IP frames (rule S12), and a daemon killed at the worst moment.

Each test builds its own testbed (``mcnp testbed`` with the reference CNI plugins and
real daemons) under a prefix and state directory of its own, with addresses in
198.18.0.0/15 only, bounds every probe in count and time, and tears everything down.

World: cluster c1, namespace x, node n1; pods a, b, c.  Pod b admits only TCP 80 and 81
from pods labelled app=a; a and c are isolated by nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time

import pytest

from control.lab import state as lab_state
from control.lab import testbed
from control.lab.net import list_netns, process_start_time
from control.lab.proc import start_detached
from tests import netns_util as nu

pytestmark = [
    pytest.mark.privileged, pytest.mark.slow,
    pytest.mark.skipif(not nu.is_root(), reason="needs root, network namespaces and XDP"),
]

PREFIX = f"mcnpn-{os.getpid()}-"
IPS = {"a": "198.18.5.1", "b": "198.18.5.2", "c": "198.18.5.3"}
PORTS = "[{containerPort: 80, protocol: TCP}, {containerPort: 53, protocol: UDP}]"
POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}
spec: {{nodeName: n1, containers: [{{name: main, ports: {ports}}}]}}
status: {{phase: Running, podIP: {ip}}}
"""
POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 81}]
"""


@pytest.fixture
def bed(tmp_path, request):
    """A running testbed of the world above; yields (state, netns of each pod, node key)."""
    cni = getattr(request, "param", "ptp")
    d = tmp_path / "c1"
    d.mkdir()
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", POLICY]
    docs += [POD.format(name=n, ip=ip, ports=PORTS) for n, ip in IPS.items()]
    (d / "objects.yaml").write_text("---\n".join(docs))
    state_dir = str(tmp_path / "state")
    lines: list[str] = []
    try:
        code = testbed.up([("c1", str(d))], mode="mcnp", cni=cni, prefix=PREFIX, state_dir=state_dir,
                          log=lines.append)
        assert code == 0, "\n".join(lines)
        state = testbed.load_state(state_dir)
        pods = {ref.rsplit("/", 1)[1]: info["netns"] for ref, info in state["pods"].items()}
        yield state, pods, next(iter(state["nodes"])), state_dir
    finally:
        if testbed.load_state(state_dir) is not None:
            testbed.down(state_dir, log=lambda m: None)
        assert not [ns for ns in list_netns() if ns.startswith(PREFIX)]


def _sock(ns: str, family=socket.AF_INET, kind=socket.SOCK_STREAM, proto=0) -> socket.socket:
    with nu.in_netns(ns):
        return socket.socket(family, kind, proto)


def connects(ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    s = _sock(ns)
    with s:
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
            return True
        except OSError:
            return False


class Echo(threading.Thread):
    """A TCP echo server in a pod, for a connection that lives across a restart; bounded."""

    def __init__(self, ns: str, ip: str, port: int, seconds: float = 60):
        super().__init__(daemon=True)
        self.sock = _sock(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()

    def run(self):
        conns = []
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                conn, _ = self.sock.accept()
                conn.settimeout(0.2)
                conns.append(conn)
            except OSError:
                pass
            for conn in conns:
                try:
                    data = conn.recv(64)
                    if data:
                        conn.sendall(data)
                except OSError:
                    pass
        for conn in conns:
            conn.close()
        self.sock.close()


def echo(conn: socket.socket, payload: bytes) -> bool:
    return nu.echo_ok(conn, payload, timeout=1.5)


def test_a_killed_daemon_fails_static_and_a_restarted_one_takes_over(bed):
    """SIGKILL of the node's daemon: the established connection keeps going, nothing new
    passes (allowed or not) while it is away; restarted, it finds every pod on its node
    again and enforces within seconds, the connection still up."""
    state, pods, node_key, _ = bed
    server = Echo(pods["b"], IPS["b"], 81)
    server.start()
    try:
        conn = _sock(pods["a"])
        conn.settimeout(3)
        conn.connect((IPS["b"], 81))
        assert echo(conn, b"before")
        assert connects(pods["a"], IPS["b"], 80) and not connects(pods["c"], IPS["b"], 80)

        info = state["daemons"][node_key]
        assert process_start_time(info["pid"]) == info["start"]  # ours, by PID
        os.killpg(info["pid"], signal.SIGKILL)  # the daemon and its packet loop
        os.waitpid(info["pid"], 0)
        time.sleep(0.3)
        assert echo(conn, b"while-away"), "an admitted connection must keep going (fail static)"
        assert not connects(pods["a"], IPS["b"], 80), "nothing unjudged passes while the daemon is away"
        assert not connects(pods["c"], IPS["b"], 80)

        node = state["nodes"][node_key]
        started = time.monotonic()
        start_detached(state, "daemons", node_key, node["netns"], testbed.mcnp_run_command(node, state),
                       node["netns"])
        lab_state.save(state)
        while not connects(pods["a"], IPS["b"], 80, timeout=0.3):
            assert time.monotonic() - started < 15, "the restarted daemon did not enforce again"
        took = time.monotonic() - started
        assert not connects(pods["c"], IPS["b"], 80)
        assert echo(conn, b"after"), "the connection admitted before the restart still stands"
        conn.close()
        print(f"restart: allowed connections pass again {took:.2f} s after the daemon was started")
    finally:
        server.stop.set()
        server.join(2)


def _udp_listener(ns: str, port: int) -> socket.socket:
    s = _sock(ns, kind=socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    return s


def _received(s: socket.socket, seconds: float = 1.0) -> int:
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            s.recv(2048)
            n += 1
        except OSError:
            pass
    return n


def _mac(ns: str) -> bytes:
    return bytes.fromhex(nu.ip("-br", "link", "show", "eth0", ns=ns).stdout.split()[2].replace(":", ""))


@pytest.mark.parametrize("bed", ["bridge"], indirect=True)
def test_broadcast_forged_arp_and_non_ip_frames_on_a_bridged_node(bed):
    """Rule S12 on one L2 segment (issue 11, items 1 and 5)."""
    state, pods, node_key, state_dir = bed
    # 1. a UDP broadcast reaches the pod whose ingress admits it (c), never the one whose
    #    ingress denies it (b)
    lb, lc = _udp_listener(pods["b"], 5400), _udp_listener(pods["c"], 5400)
    tx = _sock(pods["a"], kind=socket.SOCK_DGRAM)
    with lb, lc, tx:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        for dst in ("255.255.255.255", "198.18.255.255"):
            for _ in range(3):
                tx.sendto(b"hello", (dst, 5400))
        got_c, got_b = _received(lc), _received(lb)
    assert got_c >= 3 and got_b == 0, (got_b, got_c)

    # 2. a forged ARP reply: a claims b's address; nobody learns it
    mac_a, mac_b = _mac(pods["a"]), _mac(pods["b"])
    nu.run_in(pods["c"], ["ip", "neigh", "replace", IPS["b"], "lladdr", mac_b.hex(":"), "dev", "eth0",
                          "nud", "stale"])
    raw = _sock(pods["a"], socket.AF_PACKET, socket.SOCK_RAW)
    with raw:
        raw.bind(("eth0", 0))
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac_a, socket.inet_aton(IPS["b"]),
                          b"\xff" * 6, socket.inet_aton(IPS["b"]))
        for _ in range(3):
            raw.send(b"\xff" * 6 + mac_a + b"\x08\x06" + arp + bytes(18))
    time.sleep(0.3)
    neigh = nu.ip("neigh", "show", IPS["b"], ns=pods["c"]).stdout
    assert mac_a.hex(":") not in neigh and mac_b.hex(":") in neigh, neigh

    # 3. non-IP frames: pass between pods isolated in no direction (a to c), never into an
    #    isolated pod (b)
    ether = 0x88B5
    rb = _sock(pods["b"], socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ether))
    rc = _sock(pods["c"], socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ether))
    raw = _sock(pods["a"], socket.AF_PACKET, socket.SOCK_RAW)
    with rb, rc, raw:
        for s in (rb, rc):
            s.bind(("eth0", 0))
            s.settimeout(0.2)
        raw.bind(("eth0", 0))
        for dst in (_mac(pods["b"]), _mac(pods["c"]), b"\xff" * 6):
            raw.send(dst + mac_a + struct.pack("!H", ether) + b"local experimental".ljust(46, b"\0"))
        got_c, got_b = _received(rc), _received(rb)
    assert got_c >= 2 and got_b == 0, (got_b, got_c)

    status, stats = testbed.api_get(node_key, "/v1/stats", state_dir=state_dir)
    hooks = stats["dataplane"]["hooks"]
    assert hooks["drop_arp"] >= 3 and hooks["drop_l2"] >= 2


SERVICE_WORLD = """\
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}, {podSelector: {matchLabels: {app: c}}}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 198.19.254.20
  ports: [{name: http, port: 8080, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: [198.18.6.2]
"""


def test_connections_through_a_cluster_ip_are_judged_against_the_backend(tmp_path):
    """Rule S11 with egress policies: a's egress admits pods app=b on TCP 80 only, and
    reaches b through the ClusterIP (the source's egress is judged against b, after the
    node's NAT chose it, by b's node); c's egress admits nothing, so c cannot, though b's
    ingress would admit it; b on another node than a."""
    d = tmp_path / "c1"
    d.mkdir()
    pods = {"a": ("198.18.6.1", "n1"), "b": ("198.18.6.2", "n2"), "c": ("198.18.6.3", "n1")}
    docs = [SERVICE_WORLD] + [POD.format(name=n, ip=ip, ports=PORTS).replace("nodeName: n1", f"nodeName: {node}")
                              for n, (ip, node) in pods.items()]
    (d / "objects.yaml").write_text("---\n".join(docs))
    state_dir = str(tmp_path / "state")
    lines: list[str] = []
    try:
        assert testbed.up([("c1", str(d))], mode="mcnp", cni="ptp", prefix=PREFIX, state_dir=state_dir,
                          log=lines.append) == 0, "\n".join(lines)
        state = testbed.load_state(state_dir)
        ns = {ref.rsplit("/", 1)[1]: info["netns"] for ref, info in state["pods"].items()}
        for _ in range(3):  # the later ones are new flows of admitted classes at a's end and b's
            assert connects(ns["a"], "198.19.254.20", 8080, timeout=2)
        for _ in range(2):  # c's end admits by class what b's end still denies
            assert not connects(ns["c"], "198.19.254.20", 8080)
        assert connects(ns["a"], pods["b"][0], 80, timeout=2)
        assert not connects(ns["a"], pods["c"][0], 80)  # a's egress admits app=b only
    finally:
        if testbed.load_state(state_dir) is not None:
            testbed.down(state_dir, log=lambda m: None)


def test_detach_all_takes_mcnp_off_the_node(bed):
    """The operator's way off a node: every hook gone, the maps unpinned, the pods on the
    CNI's path (unfiltered: a connection the policy denied now gets through)."""
    import subprocess
    import sys

    state, pods, node_key, _ = bed
    node = state["nodes"][node_key]
    assert not connects(pods["c"], IPS["b"], 80)
    exe = os.path.join(os.path.dirname(sys.executable), "mcnp")
    res = subprocess.run([exe, "run", "--detach-all", "--netns", node["netns"], "--state-dir",
                          node["daemon_state_dir"], "--bpf-dir", node["bpf_dir"]],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "detached 6 hook(s)" in res.stdout and "removed 5 pinned map(s)" in res.stdout
    assert not [n for n in os.listdir(node["bpf_dir"]) if n.endswith("_v1")]  # nothing of mcnp's left
    for ns in list(pods.values()) + [node["netns"]]:
        assert "prog/xdp" not in nu.ip("-d", "link", ns=ns).stdout
    assert connects(pods["c"], IPS["b"], 80)


@pytest.mark.parametrize("bed", ["ptp", "bridge"], indirect=True)
def test_flow_counters_agree_with_what_was_carried_and_new_tables_cut_flows(bed):
    """Ten UDP echoes on one admitted flow are ten packets each way in both pods' views of
    it (the kernel carried all but the first); then new tables that deny an established
    TCP connection stop it at once, while the connection they still admit goes on."""
    state, pods, node_key, state_dir = bed
    rx = _sock(pods["a"], kind=socket.SOCK_DGRAM)
    with rx:
        rx.settimeout(1.0)
        for i in range(10):
            rx.sendto(b"%02d" % i, (IPS["c"], 53))
            assert rx.recv(64) == b"%02d" % i
        sport = rx.getsockname()[1]
    _, flows = testbed.api_get(node_key, "/v1/flows?limit=1000", state_dir=state_dir)
    mine = [f for f in flows["flows"] if f["protocol"] == "UDP" and f["sport"] == sport]
    assert sorted(f["pod"] for f in mine) == ["c1/x/a", "c1/x/c"]
    assert all(f["packets"] == [10, 10] for f in mine), mine

    servers = [Echo(pods["b"], IPS["b"], 81)]
    for s in servers:
        s.start()
    try:
        conn = _sock(pods["a"])
        conn.settimeout(3)
        conn.connect((IPS["b"], 81))
        assert echo(conn, b"before")
        _, before = testbed.api_get(node_key, "/v1/tables", state_dir=state_dir)
        objects = os.path.join(state["clusters"][0][1], "objects.yaml")
        text = open(objects).read().replace("{protocol: TCP, port: 80}, {protocol: TCP, port: 81}",
                                            "{protocol: TCP, port: 80}")
        tmp = objects + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, objects)  # the safe way to change a watched file
        deadline = time.monotonic() + 10
        while True:
            _, now = testbed.api_get(node_key, "/v1/tables", state_dir=state_dir)
            _, stats = testbed.api_get(node_key, "/v1/stats", state_dir=state_dir)
            dp = stats["dataplane"]
            if now["compiled_revision"] > before["compiled_revision"] and \
                    dp["generation_in_force"] == dp["published_generation"]:
                break
            assert time.monotonic() < deadline, "the change did not come into force"
            time.sleep(0.05)
        assert not echo(conn, b"after"), "a flow the new tables deny must stop at the swap"
        conn.close()
        assert not connects(pods["a"], IPS["b"], 81)
        assert connects(pods["a"], IPS["b"], 80)
    finally:
        for s in servers:
            s.stop.set()
            s.join(2)


@pytest.mark.parametrize("bed", ["ptp", "bridge"], indirect=True)
def test_new_connections_of_an_admitted_class_pass_in_the_kernel_and_are_counted(bed):
    """Twenty connections from a to b:81: the first is judged in userspace at both ends,
    the others are admitted by their class in the hooks; the rule that admits them counts
    every one, and the class admits nothing to anyone else."""
    state, pods, node_key, state_dir = bed
    n = 20

    def snapshot():
        _, stats = testbed.api_get(node_key, "/v1/stats", state_dir=state_dir)
        dp = stats["dataplane"]
        hits = {json.dumps(r["name"], sort_keys=True): r["hits"] for r in dp["rule_hits"]}
        return dp["hooks"]["pass_class"], hits

    server = Echo(pods["b"], IPS["b"], 81)
    server.start()
    try:
        classes0, hits0 = snapshot()
        for i in range(n):
            with _sock(pods["a"]) as conn:
                conn.settimeout(3)
                conn.connect((IPS["b"], 81))
                assert echo(conn, b"%02d" % i)
        assert not connects(pods["c"], IPS["b"], 81) and not connects(pods["c"], IPS["b"], 80)
        classes1, hits1 = snapshot()
    finally:
        server.stop.set()
        server.join(2)
    assert classes1 - classes0 >= 2 * (n - 1) - 2, (classes0, classes1)  # both ends, all but the first
    grown = {name: hits1[name] - hits0.get(name, 0) for name in hits1 if hits1[name] != hits0.get(name, 0)}
    assert list(grown.values()) == [n], grown  # the one rule of b-in for port 81, once per connection
    _, shown = testbed.api_get(node_key, "/v1/classes", state_dir=state_dir)
    mine = {(c["pod"], c["direction"]): c for c in shown["classes"] if c["src"] == IPS["a"] and c["dport"] == 81}
    assert set(mine) == {("c1/x/a", "egress"), ("c1/x/b", "ingress")}, shown
    assert all(c["dst"] == IPS["b"] and c["admitted"] >= n - 2 for c in mine.values()), mine
    # c's end admitted c's attempt (c's egress is not isolated); b's end denied it: no class there
    assert not [c for c in shown["classes"] if c["src"] == IPS["c"] and c["pod"] == "c1/x/b"]
