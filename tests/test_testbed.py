"""``mcnp testbed up/down`` on the node model, and real-connection probes
(docs/architecture.md, Test hosts; docs/interfaces.md).

The privileged tests build real test hosts under a prefix of their own
(``mcnpt-<pid>-``) with a state directory of their own, always tear down, and probe with
bounded counts and timeouts. The reference CNI plugins are never a reason to skip: a
machine without them fails these tests.
"""

from __future__ import annotations

import json
import os
import time
import subprocess
import sys

import pytest
import yaml

from control.lab import cni_runtime, kubelet, kubeproxy, layout, probe, testbed
from control.lab.net import NetError, list_netns, process_start_time

ROOT = os.geteuid() == 0
_needs_root = pytest.mark.skipif(not ROOT, reason="needs root and network namespaces")


def privileged(test):
    return pytest.mark.privileged(_needs_root(test))


PREFIX = f"mcnpt-{os.getpid()}-"
QUIET = {"log": lambda m: None}

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
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 198.19.254.10
  ports: [{name: http, port: 8080, targetPort: 80}, {name: dns, port: 53, protocol: UDP}, {name: none, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a1b2c, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [%s]
- addresses: [198.18.0.99]
  conditions: {ready: false}
"""


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
    """Two clusters, four nodes, five pods; one pod without a node, one hostNetwork; a
    Service in c1 whose ready endpoint is c1/x/c (on another node than c1/x/a)."""
    c1 = write_cluster(tmp_path / "c1", [
        ("a", "n1", "198.18.0.1", WEB), ("b", "n1", "198.18.0.2", WEB), ("c", "n2", "198.18.1.3", WEB),
    ])
    with open(os.path.join(c1, "service.yaml"), "w") as f:
        f.write(SERVICE % "198.18.1.3")
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
            testbed.down(d, **QUIET)
        leftover = sorted(ns for ns in list_netns() if ns.startswith(PREFIX))
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in leftover), text=True, check=False)


def ours() -> set[str]:
    return {ns for ns in list_netns() if ns.startswith(PREFIX)}


def up_json(clusters, state_dir, capsys, **kw) -> dict:
    lines = []
    assert testbed.up(clusters, json_out=True, prefix=PREFIX, state_dir=state_dir, log=lines.append, **kw) == 0, "\n".join(lines)
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- planning (no root)


def test_plan_names_nodes_pods_and_notes(clusters, tmp_path):
    plan = testbed.make_plan(clusters, "none", "ptp", PREFIX, str(tmp_path / "s"))
    assert sorted(plan.pods) == ["c1/x/a", "c1/x/b", "c1/x/c", "c2/x/a", "c2/x/d"]
    assert sorted(plan.nodes) == ["c1/n1", "c1/n2", "c2/c2", "c2/n1"]
    assert plan.pods["c2/x/d"]["node"] == "c2/c2"
    assert plan.pods["c1/x/a"]["ports"] == [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 53}]
    addresses = sorted(n["address"] for n in plan.nodes.values())
    assert addresses == ["198.19.255.1", "198.19.255.2", "198.19.255.3", "198.19.255.4"]
    assert all(n["cni_args"] == f"GATEWAY={n['address']}" and n["pod_prefix_len"] == 15 and n["api"] is None for n in plan.nodes.values())
    names = [n["netns"] for n in plan.nodes.values()] + [p["netns"] for p in plan.pods.values()]
    assert len(set(names)) == len(names) and all(n.startswith(PREFIX) and "/" not in n for n in names)
    notes = "\n".join(plan.notes)
    assert "SCTP port 9 not served" in notes
    assert "c2/x/h: no test host" in notes
    assert "placed on node 'c2': d" in notes


def test_plan_serves_extra_ports_on_every_pod(clusters, tmp_path):
    plan = testbed.make_plan(clusters, "none", "ptp", PREFIX, str(tmp_path), extra_ports=[("tcp", 5432), ("TCP", 80)])
    want = [{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 53}]
    assert all(p["ports"] == want for p in plan.pods.values())
    with pytest.raises(testbed.TestbedError, match="extra port SCTP/9"):
        testbed.make_plan(clusters, "none", "ptp", PREFIX, str(tmp_path), extra_ports=[("SCTP", 9)])


@pytest.mark.parametrize("ip, why", [("10.1.2.3", "outside 198.18.0.0/15"), ("198.20.0.1", "outside 198.18.0.0/15"),
                                     ("fd00::1", "outside 198.18.0.0/15"), ("198.19.255.7", "reserves"), ("198.19.254.3", "reserves")])
def test_plan_refuses_addresses_test_pods_may_not_have(tmp_path, ip, why):
    c = write_cluster(tmp_path / "c", [("a", "n1", "198.18.0.1", WEB), ("bad", "n1", ip, WEB)])
    with pytest.raises(testbed.TestbedError) as err:
        testbed.make_plan([("c", c)], "none", "ptp", PREFIX, str(tmp_path))
    assert err.value.code == 2
    assert "c/x/bad" in str(err.value) and why in str(err.value)


def test_plan_refuses_one_address_for_two_pods(tmp_path):
    c1 = write_cluster(tmp_path / "c1", [("a", "n1", "198.18.0.1", WEB)])
    c2 = write_cluster(tmp_path / "c2", [("a", "n1", "198.18.0.1", WEB)])
    with pytest.raises(testbed.TestbedError, match="also the IP of c1/x/a"):
        testbed.make_plan([("c1", c1), ("c2", c2)], "none", "ptp", PREFIX, str(tmp_path))


@pytest.mark.parametrize("mode, cni, message", [
    ("bridge", "ptp", "the baseline without mcnp is --mode none"),
    ("switch", "ptp", "unknown mode 'switch'"),
    ("none", "flannel", "unknown CNI 'flannel'"),
])
def test_plan_refuses_unknown_modes_and_cnis(clusters, tmp_path, mode, cni, message):
    with pytest.raises(testbed.TestbedError, match=message) as err:
        testbed.make_plan(clusters, mode, cni, PREFIX, str(tmp_path))
    assert err.value.code == 2


def test_conflists_chain_mcnp_cni_last_in_mode_mcnp(clusters, tmp_path):
    for mode, cni in (("none", "ptp"), ("mcnp", "bridge")):
        plan = testbed.make_plan(clusters, mode, cni, PREFIX, str(tmp_path))
        state = testbed._initial_state(plan, str(tmp_path), ())
        node = state["nodes"]["c1/n1"]
        conf = testbed.conflist(state, node)
        assert conf["cniVersion"] == "1.0.0" and conf["name"]
        main = conf["plugins"][0]
        assert main["type"] == cni and main["ipam"] == {"type": "static", "routes": [{"dst": "198.19.254.0/24", "gw": node["address"]}]}
        if mode == "mcnp":
            assert main["bridge"] == "cni0" and main["isGateway"] is True and main["hairpinMode"] is True
            assert conf["plugins"][1:] == [{"type": "mcnp-cni", "socket": node["cni_socket"]}]
            assert node["api"] == "127.0.0.1:9901"
        else:
            assert len(conf["plugins"]) == 1


def test_pod_args_are_those_of_section_5():
    assert cni_runtime.pod_args("x", "a", "c0ffee", "198.18.0.1", 15, "GATEWAY=198.19.255.1") == \
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=c0ffee;IP=198.18.0.1/15;GATEWAY=198.19.255.1"
    assert cni_runtime.pod_args("x", "a", "c0ffee", "198.18.0.1", 15).endswith("IP=198.18.0.1/15")


def test_load_conflist_wants_exactly_one(tmp_path):
    with pytest.raises(cni_runtime.CniError, match="exactly one"):
        cni_runtime.load_conflist(str(tmp_path))
    (tmp_path / "a.conflist").write_text('{"cniVersion": "1.0.0", "name": "n", "plugins": []}')
    with pytest.raises(cni_runtime.CniError, match="plugins"):
        cni_runtime.load_conflist(str(tmp_path))


def test_kube_proxy_rules_pick_ready_endpoints_at_random_and_masquerade_hairpins(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "svc.yaml").write_text(SERVICE % "198.18.1.3, 198.18.1.4, 198.18.1.5")
    notes: list[str] = []
    ports = {p.name: p for p in kubeproxy.read_services(str(d), notes)}
    assert ports["http"].endpoints == [("198.18.1.3", 80), ("198.18.1.4", 80), ("198.18.1.5", 80)]  # not the unready one
    assert ports["dns"].protocol == "UDP" and ports["none"].endpoints == []
    text = kubeproxy.restore_input(list(ports.values()), {"nat": {"KUBE-SVC-STALEONE"}}, {("nat", "PREROUTING", "KUBE-SERVICES")})
    nat, filt = text.split("COMMIT\n")[:2]
    assert "--probability 0.3333333333" in nat and "--probability 0.5000000000" in nat
    assert nat.count("-p tcp -m tcp -j DNAT --to-destination 198.18.1.") == 3 and "--to-destination 198.18.1.5:80" in nat
    assert nat.count("-p udp -m udp -j DNAT --to-destination 198.18.1.") == 3 and "--to-destination 198.18.1.5:53" in nat
    assert "-A KUBE-SERVICES -d 198.19.254.10/32 -p udp -m udp --dport 53" in nat
    assert nat.count("-j KUBE-MARK-MASQ") == 6 and "-s 198.18.1.4/32 -j KUBE-MARK-MASQ" in nat and "MASQUERADE" in nat
    assert ":KUBE-SVC-STALEONE - [0:0]" in nat and "-X KUBE-SVC-STALEONE" in nat
    assert "-A PREROUTING" not in nat  # already hooked
    assert "-A OUTPUT -m comment" in nat and "-A POSTROUTING -m comment" in nat
    assert "--dport 9090" in filt and "REJECT" in filt and "--dport 9090" not in nat


@pytest.mark.parametrize("doc, field", [
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n", "spec.clusterIP"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 198.19.254.1, ports: [{port: http}]}\n", "spec.ports[0].port"),
    ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: x}\nendpoints: []\n", "metadata.labels"),
])
def test_kube_proxy_refuses_invalid_services(tmp_path, doc, field):
    (tmp_path / "s.yaml").write_text(doc)
    with pytest.raises(testbed.TestbedError) as err:
        kubeproxy.read_services(str(tmp_path), [])
    assert err.value.code == 2 and field in str(err.value) and "s.yaml" in str(err.value)


def test_probe_refuses_protocols_it_cannot_speak():
    with pytest.raises(ValueError, match="SCTP"):
        probe.probe_many([("ns", "198.18.0.1", 80, "SCTP")])


def test_probes_on_testbed_name_pods_nodes_and_addresses():
    state = {"pods": {"c/x/a": {"netns": "pa", "ip": "198.18.0.1"}}, "nodes": {"c/n": {"netns": "nn", "address": "198.19.255.1"}}}
    assert probe.on_testbed(state, [("c/x/a", "c/n", 80, "TCP"), ("c/n", "c/x/a", 53, "UDP"), ("c/x/a", "198.19.254.1", 8080, "TCP")]) == \
        [("pa", "198.19.255.1", 80, "TCP"), ("nn", "198.18.0.1", 53, "UDP"), ("pa", "198.19.254.1", 8080, "TCP")]
    with pytest.raises(LookupError, match="c/x/zz"):
        probe.on_testbed(state, [("c/x/a", "c/x/zz", 80, "TCP")])


# --------------------------------------------------------------------------- real hosts, --mode none

CNIS = pytest.mark.parametrize("cni", ["ptp", "bridge"])


@privileged
@CNIS
def test_every_pod_reaches_every_pod_node_and_service(clusters, state_dir, capsys, cni):
    out = up_json(clusters, state_dir, capsys, mode="none", cni=cni)
    assert set(out) == {"pods", "nodes"}
    pods, nodes = out["pods"], out["nodes"]
    assert sorted(pods) == ["c1/x/a", "c1/x/b", "c1/x/c", "c2/x/a", "c2/x/d"]
    assert all(set(p) == {"netns", "ip", "node"} and p["netns"] in list_netns() for p in pods.values())
    assert pods["c1/x/c"] == {"netns": pods["c1/x/c"]["netns"], "ip": "198.18.1.3", "node": "c1/n2"}
    assert all(set(n) == {"netns", "cni_conf_dir", "cni_bin_dir", "pod_prefix_len", "cni_args", "api"} and n["api"] is None
               for n in nodes.values())
    assert len(os.listdir(nodes["c1/n1"]["cni_conf_dir"])) == 1
    # What kubeadm demands of a node: forwarding, and bridged frames through iptables.
    sysctl = subprocess.run(["ip", "netns", "exec", nodes["c1/n1"]["netns"], "sysctl", "-n", "net.ipv4.ip_forward",
                             "net.bridge.bridge-nf-call-iptables"], capture_output=True, text=True, check=True).stdout.split()
    assert sysctl == ["1", "1"]

    # eth0 from the CNI: the pod's address with the node's prefix length, checksum offload left alone.
    addr = json.loads(subprocess.run(["ip", "-n", pods["c1/x/c"]["netns"], "-j", "addr", "show", "dev", "eth0"],
                                     capture_output=True, text=True, check=True).stdout)[0]
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("198.18.1.3", 15)]
    features = subprocess.run(["ip", "netns", "exec", pods["c1/x/c"]["netns"], "ethtool", "-k", "eth0"], capture_output=True, text=True, check=True).stdout
    assert "tx-checksumming: on" in features

    refs = sorted(pods)
    pairs = [(s, d) for s in refs for d in refs if s != d]  # self pairs skipped (rule S7)
    state = testbed.load_state(state_dir)
    served = probe.on_testbed(state, [(s, d, port, proto) for s, d in pairs for port, proto in ((80, "TCP"), (53, "UDP"))])
    closed = probe.on_testbed(state, [(s, d, port, proto) for s, d in pairs for port, proto in ((81, "TCP"), (54, "UDP"))])
    from_nodes = probe.on_testbed(state, [(n, p, 80, "TCP") for p in refs for n in (pods[p]["node"],)])  # S10: a node to its pods
    results = probe.probe_many(served + closed + from_nodes)
    assert results == [True] * len(served) + [False] * len(closed) + [True] * len(from_nodes)

    # Services: c1's ClusterIP lands on its one ready endpoint, c1/x/c on another node,
    # from pods of both nodes and from a node itself; the endpoint reaches itself through
    # it (hairpin, masqueraded); a port without endpoints is refused; c2's nodes do not
    # translate c1's Service.
    cip = "198.19.254.10"
    via_service = probe.on_testbed(state, [("c1/x/a", cip, 8080, "TCP"), ("c1/x/b", cip, 53, "UDP"), ("c1/n1", cip, 8080, "TCP"),
                                           ("c1/x/c", cip, 8080, "TCP"), ("c1/x/a", cip, 9090, "TCP"), ("c2/x/a", cip, 8080, "TCP")])
    assert probe.probe_many(via_service, tcp_timeout=0.5, udp_timeout=0.5) == [True, True, True, True, False, False]

    with pytest.raises(NetError, match="does not exist"):
        probe.probe_many([(PREFIX + "missing", "198.18.0.1", 80, "TCP")])


def hand_made_pod(node: dict, netns: str, name: str, ip: str, command: str, prev=None):
    """A pod made with nothing but the JSON of `testbed up` and docs/interfaces.md: `ip
    netns add`, then each plugin of the node's conflist run in the node netns, by hand."""
    conf_file = [f for f in os.listdir(node["cni_conf_dir"]) if f.endswith(".conflist")]
    assert len(conf_file) == 1
    with open(os.path.join(node["cni_conf_dir"], conf_file[0])) as f:
        conf = json.load(f)
    if command == "ADD":
        subprocess.run(["ip", "netns", "add", netns], check=True)
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=hand-{name};IP={ip}/{node['pod_prefix_len']}"
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=f"hand-{name}", CNI_NETNS=f"/var/run/netns/{netns}", CNI_IFNAME="eth0",
               CNI_PATH=node["cni_bin_dir"], CNI_ARGS=args + (";" + node["cni_args"] if node["cni_args"] else ""))
    plugins = conf["plugins"] if command == "ADD" else conf["plugins"][::-1]
    for plugin in plugins:
        stdin = dict(plugin, name=conf["name"], cniVersion=conf["cniVersion"], **({"prevResult": prev} if prev else {}))
        run = subprocess.run(["ip", "netns", "exec", node["netns"], os.path.join(node["cni_bin_dir"], plugin["type"])],
                             input=json.dumps(stdin), capture_output=True, text=True, env=env, timeout=30)
        assert run.returncode == 0, f"{plugin['type']} {command}: {run.stdout} {run.stderr}"
        if command == "ADD":
            prev = json.loads(run.stdout)
    if command == "DEL":
        subprocess.run(["ip", "netns", "del", netns], check=True)
    return prev


@privileged
@CNIS
def test_pods_added_later_are_reachable_when_add_returns_and_gone_after_del(clusters, state_dir, capsys, cni):
    out = up_json(clusters, state_dir, capsys, mode="none", cni=cni)
    c1 = dict(clusters)["c1"]

    # With the lab's own runtime: on a node that has pods, probed at once.
    rec = kubelet.add_pod("c1", "x", "late", "198.18.2.7", "n2", [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}],
                          state_dir=state_dir)
    state = testbed.load_state(state_dir)
    now = probe.on_testbed(state, [("c1/x/a", "c1/x/late", 80, "TCP"), ("c2/x/a", "c1/x/late", 53, "UDP"),
                                   ("c1/x/late", "c1/x/c", 80, "TCP"), ("c1/n2", "c1/x/late", 80, "TCP")])
    assert probe.probe_many(now, tcp_timeout=1.0, udp_timeout=1.0) == [True] * 4
    manifest = yaml.safe_load(open(rec["manifest"]))
    assert os.path.dirname(rec["manifest"]) == c1 and manifest["spec"]["nodeName"] == "n2"
    assert manifest["status"]["podIP"] == "198.18.2.7"
    with pytest.raises(testbed.TestbedError, match="198.18.2.7 is the IP of c1/x/late"):
        kubelet.add_pod("c1", "x", "twin", "198.18.2.7", "n1", state_dir=state_dir)
    with pytest.raises(testbed.TestbedError, match="no node c1/n9"):
        kubelet.add_pod("c1", "x", "lost", "198.18.2.8", "n9", state_dir=state_dir)

    # By hand, from the JSON alone: netns, plugins, a listener.
    node = out["nodes"]["c2/n1"]
    hand = PREFIX + "hand"
    result = hand_made_pod(node, hand, "hand", "198.19.3.3", "ADD")
    assert result["ips"][0]["address"] == "198.19.3.3/15"
    server = subprocess.Popen(["ip", "netns", "exec", hand, sys.executable, "-I", "-S", kubelet.PODSERVER, "TCP:80"], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"ready"
        assert probe.probe_many(probe.on_testbed(state, [("c1/x/b", "198.19.3.3", 80, "TCP"), ("c2/n1", "198.19.3.3", 80, "TCP")])) == [True, True]
    finally:
        server.kill()
        server.wait(timeout=5)
    hand_made_pod(node, hand, "hand", "198.19.3.3", "DEL", prev=result)
    assert hand not in list_netns()

    # DEL: unreachable, namespace, server, manifest and host veth gone.
    server_pid = state["servers"]["c1/x/late"]["pid"]
    kubelet.remove_pod("c1/x/late", state_dir=state_dir)
    assert probe.probe_many(now[:1] + probe.on_testbed(state, [("c1/x/b", "198.19.3.3", 80, "TCP")]), tcp_timeout=0.5) == [False, False]
    assert rec["netns"] not in list_netns() and not os.path.exists(rec["manifest"]) and process_start_time(server_pid) is None
    links = json.loads(subprocess.run(["ip", "-n", out["nodes"]["c1/n2"]["netns"], "-j", "link"], capture_output=True, text=True, check=True).stdout)
    assert len([link for link in links if link["ifname"].startswith("veth")]) == (1 if cni == "ptp" else 1)  # c1/x/c's only
    assert "c1/x/late" not in testbed.load_state(state_dir)["pods"]


@privileged
def test_services_resync_on_a_running_testbed(clusters, state_dir, capsys):
    up_json(clusters, state_dir, capsys, mode="none", cni="bridge")
    state = testbed.load_state(state_dir)
    c1 = dict(clusters)["c1"]
    with open(os.path.join(c1, "service.yaml"), "w") as f:  # c1/x/a now the endpoint, on the client's own bridge
        f.write((SERVICE % "198.18.0.1").replace("198.19.254.10", "198.19.254.20"))
    assert testbed.sync_services(state_dir) == {"c1": 3, "c2": 0}
    checks = probe.on_testbed(state, [("c1/x/b", "198.19.254.20", 8080, "TCP"), ("c1/x/b", "198.19.254.20", 53, "UDP"),
                                      ("c1/x/b", "198.19.254.10", 8080, "TCP")])
    assert probe.probe_many(checks, tcp_timeout=0.5, udp_timeout=0.5) == [True, True, False]
    saved = subprocess.run(["ip", "netns", "exec", state["nodes"]["c1/n1"]["netns"], "iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    assert saved.count("-A PREROUTING") == 1 and "198.19.254.10" not in saved  # hooked once, the old ClusterIP gone


@privileged
def test_down_removes_everything_and_is_safe_twice(clusters, state_dir):
    assert testbed.up(clusters, mode="none", prefix=PREFIX, state_dir=state_dir, **QUIET) == 0
    rec = kubelet.add_pod("c2", "x", "late", "198.19.9.9", "n1", state_dir=state_dir)
    state = testbed.load_state(state_dir)
    servers = list(state["servers"].values())
    assert len(servers) == 6 and all(process_start_time(s["pid"]) == s["start"] for s in servers)
    assert set(state["netns"]) == ours()
    assert testbed.up(clusters, mode="none", prefix=PREFIX, state_dir=state_dir, **QUIET) == 1  # already up

    assert testbed.down(state_dir, **QUIET) == 0
    assert ours() == set() and not os.path.exists(state_dir) and not os.path.exists(rec["manifest"])
    assert all(process_start_time(s["pid"]) is None for s in servers)
    assert testbed.down(state_dir, **QUIET) == 0


@privileged
def test_missing_plugin_binaries_fail_up_and_leave_nothing(clusters, state_dir, tmp_path, monkeypatch):
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    monkeypatch.setenv("MCNP_CNI_PLUGIN_DIR", str(empty))
    lines = []
    assert testbed.up(clusters, mode="none", prefix=PREFIX, state_dir=state_dir, log=lines.append) == 1
    assert any(f"{empty}/ptp" in line and "missing" in line for line in lines), lines
    assert ours() == set() and testbed.load_state(state_dir) is None


@privileged
def test_up_refuses_reserved_address_and_makes_nothing(tmp_path, state_dir):
    c = write_cluster(tmp_path / "c", [("a", "n1", "198.18.0.1", WEB), ("bad", "n1", "198.19.255.1", WEB)])
    lines = []
    assert testbed.up([("c", c)], mode="none", prefix=PREFIX, state_dir=state_dir, log=lines.append) == 2
    assert any("198.19.255.1 is in 198.19.255.0/24" in line for line in lines)
    assert ours() == set() and testbed.load_state(state_dir) is None


@privileged
def test_cli_up_json_and_down(clusters, state_dir):
    mcnp = os.path.join(os.path.dirname(sys.executable), "mcnp")
    env = dict(os.environ, MCNP_TESTBED_DIR=state_dir, MCNP_TESTBED_PREFIX=PREFIX)
    args = [a for name, d in clusters for a in ("--cluster", f"{name}={d}")]
    old = subprocess.run([mcnp, "testbed", "up", *args, "--mode", "bridge"], capture_output=True, text=True, env=env, timeout=60)
    assert old.returncode == 2 and "--mode none" in old.stderr and ours() == set()
    proc = subprocess.run([mcnp, "testbed", "up", *args, "--cni", "bridge", "--mode", "none", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {p["netns"] for p in out["pods"].values()} <= ours() and out["nodes"]["c1/n1"]["cni_args"] == "GATEWAY=198.19.255.1"
    down = subprocess.run([mcnp, "testbed", "down"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0, down.stderr
    assert ours() == set()


# --------------------------------------------------------------------------- --mode mcnp

MCNP_CNI_MISSING = not os.access(layout.MCNP_CNI, os.X_OK)
_needs_mcnp_cni = pytest.mark.skipif(MCNP_CNI_MISSING, reason=f"the chained plugin {layout.MCNP_CNI} is not built (./dev setup)")

#: Stands in for `mcnp run`: after a moment (so that `up` really has to wait) it
#: answers GET on --api-listen (in its node netns) and takes every mcnp-cni request on
#: --cni-socket, recording them for /v1/cni.
FAKE_DAEMON = r'''
import http.server, json, os, socket, sys, threading, time
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
seen = []
time.sleep(0.5)
cni = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
cni.bind(flag("--cni-socket"))
cni.listen(16)
def serve_cni():
    while True:
        conn, _ = cni.accept()
        with conn, conn.makefile("rwb") as f:
            seen.append(json.loads(f.readline()))
            f.write(b'{"ok": true}\n')
threading.Thread(target=serve_cni, daemon=True).start()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"argv": argv, "cni": seen, "pid": os.getpid()}).encode()
        self.send_response(200 if self.path in ("/readyz", "/v1/args") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
host, port = flag("--api-listen").rsplit(":", 1)
http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
'''


def fake_daemon(node, state):
    return [sys.executable, "-c", FAKE_DAEMON] + testbed.mcnp_run_command(node, state)[1:]


@privileged
@_needs_mcnp_cni
def test_mcnp_mode_chains_mcnp_cni_to_a_ready_daemon_per_node(clusters, state_dir, capsys, monkeypatch):
    monkeypatch.setenv("MCNP_TESTBED_DIR", state_dir)  # api_get finds the state by default
    out = up_json(clusters, state_dir, capsys, mode="mcnp", cni="ptp", daemon_command=fake_daemon)
    assert all(n["api"] == "127.0.0.1:9901" for n in out["nodes"].values())
    state = testbed.load_state()
    assert sorted(state["daemons"]) == ["c1/n1", "c1/n2", "c2/c2", "c2/n1"]
    status, body = testbed.api_get("c1/n1", "/v1/args")
    argv = body["argv"]
    node = state["nodes"]["c1/n1"]
    assert status == 200 and argv[:5] == ["run", "--node-name", "n1", "--local-cluster", "c1"]
    assert f"c1=dir:{clusters[0][1]}" in argv and f"c2=dir:{clusters[1][1]}" in argv
    for flag, value in (("--netns", node["netns"]), ("--cni-socket", node["cni_socket"]), ("--state-dir", node["daemon_state_dir"]),
                        ("--bpf-dir", node["bpf_dir"]), ("--api-listen", "127.0.0.1:9901")):
        assert argv[argv.index(flag) + 1] == value
    # Each daemon runs in its node's namespace (the API is on that namespace's loopback).
    for key, info in state["daemons"].items():
        assert os.stat(f"/proc/{info['pid']}/ns/net").st_ino == os.stat(f"/var/run/netns/{state['nodes'][key]['netns']}").st_ino

    # Every ADD went through mcnp-cni to its node's daemon, with ptp's result as prevResult.
    requests = body["cni"]
    assert sorted(r["config"]["prevResult"]["ips"][0]["address"] for r in requests) == ["198.18.0.1/15", "198.18.0.2/15"]
    assert all(r["command"] == "ADD" and "K8S_POD_NAMESPACE=x" in r["args"] for r in requests)
    rec = kubelet.add_pod("c1", "x", "late", "198.18.3.3", "n1", state_dir=state_dir)
    assert probe.probe_many(probe.on_testbed(testbed.load_state(), [("c1/x/a", "c1/x/late", 80, "TCP")])) == [True]
    kubelet.remove_pod("c1/x/late", state_dir=state_dir)
    commands = [(r["command"], r["containerID"]) for r in testbed.api_get("c1/n1", "/v1/args")[1]["cni"]]
    assert commands[-2:] == [("ADD", rec["container_id"]), ("DEL", rec["container_id"])]
    assert testbed.api_get("c2", "/readyz")[0] == 200  # a bare node name that is unique
    with pytest.raises(LookupError, match="no single node 'n1'"):
        testbed.api_get("n1", "/readyz")

    daemons = list(state["daemons"].values())
    assert testbed.down(state_dir, **QUIET) == 0
    assert ours() == set() and all(process_start_time(d["pid"]) is None for d in daemons)


@privileged
@_needs_mcnp_cni
def test_failing_daemon_tears_down_what_was_made(clusters, state_dir):
    lines = []
    failing = lambda node, state: [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]  # noqa: E731
    assert testbed.up(clusters, mode="mcnp", prefix=PREFIX, state_dir=state_dir, log=lines.append, daemon_command=failing) == 1
    text = "\n".join(lines)
    assert "exited with code 3" in text and "boom" in text
    assert ours() == set() and testbed.load_state(state_dir) is None


#: A daemon that ignores SIGTERM and leaves a worker process behind in its session.
STUBBORN_DAEMON = "import signal, subprocess, sys\n" \
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n" + FAKE_DAEMON


@privileged
@_needs_mcnp_cni
def test_down_kills_a_stubborn_daemon_and_its_workers(clusters, state_dir, monkeypatch):
    from control.lab.net import session_members

    monkeypatch.setattr(testbed, "DAEMON_GRACE", 0.5)

    def stubborn(node, state):
        return [sys.executable, "-c", STUBBORN_DAEMON] + testbed.mcnp_run_command(node, state)[1:]

    assert testbed.up(clusters[:1], mode="mcnp", prefix=PREFIX, state_dir=state_dir, daemon_command=stubborn, **QUIET) == 0
    state = testbed.load_state(state_dir)
    sessions = {d["pid"]: session_members(d["pid"]) for d in state["daemons"].values()}
    assert all(len(members) == 2 for members in sessions.values())  # daemon + worker
    assert testbed.down(state_dir, **QUIET) == 0
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


def _daemon_flags_missing() -> str:
    mcnp = os.path.join(os.path.dirname(sys.executable), "mcnp")
    helped = subprocess.run([mcnp, "run", "--help"], capture_output=True, text=True)
    return ", ".join(f for f in ("--cni-socket", "--state-dir", "--bpf-dir") if f not in helped.stdout)


@privileged
@_needs_mcnp_cni
@pytest.mark.slow
@CNIS
def test_mcnp_mode_real_daemons_enforce_what_the_reference_expects(tmp_path, state_dir, cni):
    """The whole path: real `mcnp run` daemons beside the CNI, real connections between
    pods (one added while the daemons run), through a ClusterIP and from a node,
    observed beside the reference evaluator's verdicts."""
    from control.semantics.manifests import load_clusterset
    from control.semantics.reference import ReferenceEvaluator

    missing = _daemon_flags_missing()
    if missing:
        pytest.skip(f"`mcnp run` does not take {missing} yet (the node model's daemon flags)")
    c1 = write_cluster(tmp_path / "c1", [("a", "n1", "198.18.0.1", WEB), ("b", "n1", "198.18.0.2", WEB), ("c", "n2", "198.18.1.3", WEB)])
    c2 = write_cluster(tmp_path / "c2", [("b", "n1", "198.19.0.2", WEB)])
    with open(os.path.join(c1, "policy.yaml"), "w") as f:
        f.write(POLICY)
    with open(os.path.join(c1, "service.yaml"), "w") as f:
        f.write(SERVICE % "198.18.0.1")  # c1/x/a behind the ClusterIP: only pods labelled app=b get in
    lines = []
    assert testbed.up([("c1", c1), ("c2", c2)], mode="mcnp", cni=cni, prefix=PREFIX, state_dir=state_dir, log=lines.append) == 0, "\n".join(lines)
    kubelet.add_pod("c1", "x", "b2", "198.18.1.9", "n2",
                    [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 53, "protocol": "UDP"}],
                    labels={"app": "b"}, state_dir=state_dir)
    state = testbed.load_state(state_dir)
    cset, _ = load_clusterset([("c1", c1), ("c2", c2)])
    oracle = ReferenceEvaluator(cset)
    pods = sorted(cset.pods(), key=lambda p: p.ref)
    cases = [(s, d, port, proto) for s in pods for d in pods if s.ref != d.ref for port, proto in ((80, "TCP"), (53, "UDP"))]
    expected = {(s.ref, d.ref, proto): oracle.evaluate(s, d, port, proto).allowed for s, d, port, proto in cases}
    assert any(expected.values()) and not all(expected.values())  # the policy matters for some pairs only
    # The pod added last is in force on every node once each has read its manifest: its
    # pairs may be denied for a moment (fail closed), never allowed against the policy.
    deadline = time.monotonic() + 5
    while True:
        observed = dict(zip(expected, probe.probe_many(probe.on_testbed(
            state, [(s.ref, d.ref, port, proto) for s, d, port, proto in cases]))))
        fail_open = [k for k, o in observed.items() if o and not expected[k]]
        assert not fail_open, f"allowed against the policy: {fail_open}"
        late = [k for k, o in observed.items() if o != expected[k]]
        assert all("c1/x/b2" in k[:2] for k in late), f"disagreements beyond the new pod: {late}"
        if not late or time.monotonic() > deadline:
            break
    assert observed == expected
    extra = probe.on_testbed(state, [("c1/x/b2", "198.19.254.10", 8080, "TCP"), ("c1/x/c", "198.19.254.10", 8080, "TCP"),
                                     ("c1/n1", "c1/x/a", 80, "TCP")])
    assert probe.probe_many(extra) == [True, False, True]  # S11 judged on the backend; S10 for the node
