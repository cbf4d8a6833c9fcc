"""End to end: real TCP, UDP and crafted frames through hooks beside a routed CNI.

Topology (fresh namespaces, 198.18.0.0/15 only, no routes out), wired the way the
reference ``ptp`` CNI plugin wires pods: each pod's eth0 holds its /32 and a default
route via the gateway 198.18.10.254, which every host-side veth holds too::

    [pod a] eth0 198.18.10.1 ==veth== pa \
    [pod b] eth0 198.18.10.2 ==veth== pb  [node: routes, ip_forward; mcnp]  upl 198.18.20.254 ==veth== 198.18.20.1 [r]
    [pod c] eth0 198.18.10.3 ==veth== pc /

mcnp hooks both ends of each pod's veth; the node routes.  Policy (revision 1), on
pod b, ingress only: from pods app=a on TCP 8080 and UDP 5353; from ipBlock
198.18.20.0/24 on SCTP 3868.  Revision 2 drops the TCP rule: an established
connection from a to b must then be cut.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests import netns_util as nu

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not nu.is_root(), reason="needs root for netns, BPF and AF_XDP"),
]

IPS = {"a": "198.18.10.1", "b": "198.18.10.2", "c": "198.18.10.3", "r": "198.18.20.1"}
DENY_WAIT = 1.0


def policies(tcp: bool) -> list[dict]:
    from tests.builders import make_policy, peer_pods
    ports = ([{"port": 8080}] if tcp else []) + [{"protocol": "UDP", "port": 5353}]
    return [make_policy("default", "b-in", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [peer_pods(app="a")], "ports": ports},
        {"from": [{"ipBlock": {"cidr": "198.18.20.0/24"}}], "ports": [{"protocol": "SCTP", "port": 3868}]},
    ])]


def tables(revision: int, tcp: bool):
    from control.compile.compiler import compile_tables
    from tests.builders import make_clusterset, make_pod
    pods = [make_pod("default", name, IPS[name], {"app": name}) for name in "abc"]
    cset = make_clusterset({"c1": pods + policies(tcp)})
    return compile_tables(cset, lambda pod: pod.cluster == "c1", revision)


GATEWAY = "198.18.10.254"


def wire_ptp(node: str, pod_ns: str, host_if: str, ip: str, mtu: int = 1500) -> None:
    """What the ptp plugin does for one pod."""
    nu.veth_pair("eth0", pod_ns, host_if, node, mtu=mtu)
    nu.add_address(pod_ns, "eth0", f"{ip}/32")
    nu.ip("route", "add", GATEWAY, "dev", "eth0", "scope", "link", ns=pod_ns)
    nu.ip("route", "add", "198.18.0.0/15", "via", GATEWAY, "dev", "eth0", ns=pod_ns)
    nu.add_address(node, host_if, f"{GATEWAY}/32")
    nu.ip("route", "add", f"{ip}/32", "dev", host_if, "scope", "link", ns=node)


def sandbox(hosts, name) -> dict:
    mac = nu.ip("-br", "link", "show", "eth0", ns=hosts[name]).stdout.split()[2]
    return {"id": f"sandbox-{name}", "netns": f"{nu.NETNS_DIR}/{hosts[name]}", "ifname": "eth0",
            "host_ifname": f"p{name}", "ips": [IPS[name]], "mac": mac}


@pytest.fixture(scope="module")
def net():
    with built_net() as built:
        yield built


@contextlib.contextmanager
def built_net(mtu: int = 1500, **loop_options):
    """Namespaces, veths, routes and a running Dataplane; torn down whatever happens."""
    from fastpath.worker import Dataplane
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(nu.netns("node"))
        hosts = {name: stack.enter_context(nu.netns(name)) for name in "abcr"}
        nu.run_in(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for name in "abc":
            wire_ptp(node, hosts[name], f"p{name}", IPS[name], mtu)
        nu.veth_pair("eth0", hosts["r"], "upl", node)
        nu.add_address(node, "upl", "198.18.20.254/24")
        nu.add_address(hosts["r"], "eth0", f"{IPS['r']}/24")
        nu.ip("route", "add", "198.18.10.0/24", "via", "198.18.20.254", ns=hosts["r"])
        dp = Dataplane(netns=node, **loop_options)
        stack.callback(dp.close)
        dp.wait_ready(15)
        for name in "abc":
            dp.attach(sandbox(hosts, name))
        yield dp, hosts, node


def publish(dp, revision, tcp=True):
    dp.publish(tables(revision, tcp), {f"sandbox-{n}": {"ref": f"c1/default/{n}", "ips": [IPS[n]],
                                                       "ready": True, "isolated": n == "b"}
                                       for n in "abc"})
    deadline = time.monotonic() + 5
    while dp.revision_in_force() != revision:
        assert time.monotonic() < deadline, "worker did not take the new tables"
        time.sleep(0.01)


class Server(threading.Thread):
    """TCP echo (accept, echo until close) or UDP echo on one socket; bounded."""

    def __init__(self, sock, kind, deadline_s=30):
        super().__init__(daemon=True)
        self.sock, self.kind = sock, kind
        self.deadline = time.monotonic() + deadline_s
        self.stop = threading.Event()
        self.sock.settimeout(0.1)

    def run(self):
        while time.monotonic() < self.deadline and not self.stop.is_set():
            try:
                if self.kind == "udp":
                    data, peer = self.sock.recvfrom(65535)
                    self.sock.sendto(data, peer)
                else:
                    conn, _ = self.sock.accept()
                    threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            except (socket.timeout, OSError):
                if self.sock.fileno() < 0:
                    return

    def _echo(self, conn):
        conn.settimeout(0.1)
        with conn:
            while time.monotonic() < self.deadline and not self.stop.is_set():
                try:
                    data = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)


@contextlib.contextmanager
def server(ns, ip, port, kind):
    with nu.in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    if kind == "tcp":
        s.listen()
    t = Server(s, kind)
    t.start()
    try:
        yield
    finally:
        t.stop.set()
        t.join(2)
        s.close()


def tcp_connect(ns, ip, port, timeout):
    with nu.in_netns(ns):
        c = socket.socket()
    c.settimeout(timeout)
    try:
        c.connect((ip, port))
    except OSError:
        c.close()
        return None
    return c


def udp_echo(ns, ip, port, timeout):
    with nu.in_netns(ns):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with c:
        c.settimeout(timeout)
        c.sendto(b"hello", (ip, port))
        try:
            return c.recvfrom(64)[0] == b"hello"
        except OSError:
            return False


def test_fail_closed_before_first_tables():
    """Hooked pods carry no IP traffic until tables are published (a network of its
    own: never depends on which tests ran before)."""
    with built_net() as (dp, hosts, _):
        assert dp.revision_in_force() is None
        with server(hosts["b"], IPS["b"], 5353, "udp"):
            assert not udp_echo(hosts["a"], IPS["b"], 5353, DENY_WAIT)
        assert dp.stats()["verdicts"]["drop"].get("no_tables", 0) >= 1


def test_tcp_and_udp_allowed_denied_and_replies(net):
    dp, hosts, _ = net
    publish(dp, 1)
    with server(hosts["b"], IPS["b"], 8080, "tcp"), server(hosts["b"], IPS["b"], 9090, "tcp"), \
            server(hosts["b"], IPS["b"], 5353, "udp"), server(hosts["a"], IPS["a"], 7070, "tcp"):
        c = tcp_connect(hosts["a"], IPS["b"], 8080, 3)
        assert c is not None and nu.echo_ok(c)
        c.close()
        assert tcp_connect(hosts["a"], IPS["b"], 9090, DENY_WAIT) is None   # port not allowed
        assert tcp_connect(hosts["c"], IPS["b"], 8080, DENY_WAIT) is None   # peer not allowed
        assert udp_echo(hosts["a"], IPS["b"], 5353, 3)
        assert not udp_echo(hosts["c"], IPS["b"], 5353, DENY_WAIT)
        # b's egress and a's ingress are not isolated: b may open to a.
        c = tcp_connect(hosts["b"], IPS["a"], 7070, 3)
        assert c is not None and nu.echo_ok(c)
        c.close()
    stats = dp.stats()
    assert stats["verdicts"]["drop"]["denied_ingress"] >= 3
    # replies and later packets pass in the kernel, on the flows userspace admitted
    assert stats["hooks"]["pass_flow"] >= 4
    assert any(f["dport"] == 5353 and f["packets"][1] >= 1 for f in dp.flows())


def test_policy_change_cuts_an_established_connection(net):
    dp, hosts, _ = net
    publish(dp, 10)
    with server(hosts["b"], IPS["b"], 8080, "tcp"):
        c = tcp_connect(hosts["a"], IPS["b"], 8080, 3)
        assert c is not None and nu.echo_ok(c)
        assert any(f["dport"] == 8080 and f["state"] == "tcp_established" for f in dp.flows())
        publish(dp, 11, tcp=False)
        try:
            assert not nu.echo_ok(c, b"after", timeout=DENY_WAIT)
        finally:
            c.close()
    assert dp.stats()["flows_cut"] >= 1
    flows = [f for f in dp.flows() if f["dport"] == 8080 and f["revision"] == 11]
    # a's egress is not isolated: its side of the flow stands; b's side is gone
    assert flows and not any(f["pod"] == "c1/default/b" for f in flows)


def sctp_frame(dst_mac, dport, chunk=1):
    from tests.frames import frame
    return frame(IPS["r"], IPS["b"], 132, 40000, dport, src_mac="02:00:00:00:20:01",
                 dst_mac=dst_mac, chunk=chunk)


def test_sctp_judged_from_crafted_frames(net):
    """This kernel has no SCTP sockets: raw frames from r, captured at b."""
    dp, hosts, _ = net
    publish(dp, 20)
    dp, hosts, node = net
    gw_mac = nu.ip("-br", "link", "show", "upl", ns=node).stdout.split()[2]  # r's next hop
    with nu.in_netns(hosts["b"]):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    with nu.in_netns(hosts["r"]):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with cap, tx:
        cap.bind(("eth0", 0))
        cap.settimeout(0.2)
        tx.bind(("eth0", 0))
        for dport in (3868, 3869):
            tx.send(sctp_frame(gw_mac, dport))
        seen = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                data = cap.recv(2048)
            except socket.timeout:
                continue
            if len(data) > 37 and data[23] == 132:
                seen.add(int.from_bytes(data[36:38], "big"))
    assert seen == {3868}
    sctp = [f for f in dp.flows() if f["protocol"] == "SCTP"]
    assert [(f["dport"], f["state"]) for f in sctp] == [(3868, "sctp_opening")]


def test_spoofed_source_from_a_pod_is_dropped(net):
    dp, hosts, _ = net
    publish(dp, 30)
    from tests.frames import frame
    before = dp.stats()["verdicts"]["drop"].get("spoofed", 0)
    with nu.in_netns(hosts["c"]):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with tx:
        tx.bind(("eth0", 0))
        tx.send(frame(IPS["a"], IPS["b"], 17, 1, 5353, src_mac="02:00:00:00:10:03",
                      dst_mac="ff:ff:ff:ff:ff:ff"))
    deadline = time.monotonic() + 2
    while dp.stats()["verdicts"]["drop"].get("spoofed", 0) == before:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_pods_come_and_go_without_leaking_sockets_frames_or_map_entries(net):
    """DEL never leaks: a pod detached and attached again twenty times leaves the
    sockets, the UMEM's free frames and the hooks' pod map as they were."""
    dp, hosts, _ = net
    publish(dp, 40)
    before = dp.stats()
    for _ in range(20):
        assert dp.detach("sandbox-c")
        gone = dp.stats()
        assert gone["sockets"] == before["sockets"] - 2 and gone["kernel_pods"] == before["kernel_pods"] - 1
        dp.attach(sandbox(hosts, "c"))
    after = dp.stats()
    for k in ("sockets", "hooked_pods", "kernel_pods"):
        assert after[k] == before[k], k
    assert after["umem"]["free"] == before["umem"]["free"] and after["umem"]["bad_frees"] == 0
    assert not dp.detach("no-such-sandbox")


@pytest.mark.parametrize("xdp_mode", ["generic", "native"])
def test_pods_with_mtu_9000(xdp_mode):
    """Jumbo frames: TCP segments of 8,000 bytes pass (the SYN is judged, the rest goes in
    the kernel); the first datagram of a UDP flow, longer than a UMEM frame, reaches
    userspace in pieces at each end that sees the flow first, is judged there and
    delivered whole, byte for byte; another flow of the same class is admitted by the
    hooks. A denied jumbo datagram stays denied. Nothing is cut to its headers. In native
    mode the veths refuse a program that is not frags-aware: the frags-aware build runs."""
    with built_net(mtu=9000, xdp_mode=xdp_mode) as (dp, hosts, node):
        publish(dp, 1)
        shown = nu.ip("-d", "link", "show", "pa", ns=node).stdout
        assert ("mcnp_hook_frags" in shown) == (xdp_mode == "native"), shown
        assert dp.stats()["umem"]["multi_buffer"] is True
        with server(hosts["b"], IPS["b"], 8080, "tcp"), server(hosts["b"], IPS["b"], 5353, "udp"):
            c = tcp_connect(hosts["a"], IPS["b"], 8080, 3)
            assert c is not None
            with c:
                big = b"x" * 8000
                for _ in range(5):
                    c.sendall(big)
                    got = b""
                    while len(got) < len(big):
                        chunk = c.recv(65536)
                        assert chunk
                        got += chunk
                    assert got == big
            with nu.in_netns(hosts["a"]):
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with u:
                u.settimeout(1.0)
                first = bytes(range(256)) * 32 + b"end"  # 8,195 bytes: three pieces of 3,840
                u.sendto(first, (IPS["b"], 5353))
                assert u.recv(9000) == first  # judged at a's end and at b's, delivered whole
                u.sendto(b"z" * 6000, (IPS["b"], 5353))
                assert u.recv(9000) == b"z" * 6000  # the flow passes in the kernel now
            with nu.in_netns(hosts["a"]):
                u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with u2:  # another flow of the same class: admitted by the hooks, delivered whole
                u2.settimeout(1.0)
                before = dp.stats()["hooks"]["pass_class"]
                u2.sendto(b"v" * 6000, (IPS["b"], 5353))
                assert u2.recv(9000) == b"v" * 6000
                assert dp.stats()["hooks"]["pass_class"] >= before + 2  # a's end and b's
            with nu.in_netns(hosts["c"]):
                d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with d:
                d.settimeout(0.5)
                for _ in range(2):
                    d.sendto(b"w" * 6000, (IPS["b"], 5353))  # c may not reach b on UDP 5353
                    with pytest.raises(socket.timeout):
                        d.recv(9000)
        stats = dp.stats()
        ports = stats["ports"].values()
        # a's first datagram at a's end and at b's; c's at c's end and at b's (denied there)
        assert sum(p["rx_multi"] for p in ports) >= 4
        assert sum(p["rx_multi_dropped"] for p in ports) == 0
        assert stats["hooks"]["judge_only"] == 0 and stats["verdicts"]["drop"].get("oversize", 0) == 0
        assert stats["verdicts"]["drop"]["denied_ingress"] >= 1
        assert stats["umem"]["free_slots"] == stats["umem"]["slots"] and stats["umem"]["bad_frees"] == 0
