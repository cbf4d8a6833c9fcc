"""AF_XDP sockets and the hooks on real veths: rings, frame ownership, attach and detach,
and what a killed daemon leaves behind.

Topology (fresh namespaces, 198.18.0.0/15 only, no routes out)::

    [host A] eth0 198.18.0.1 ==veth== pa [node ns] pb ==veth== eth0 198.18.0.2 [host B]

Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import netns_util as nu

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not nu.is_root(), reason="needs root for netns, BPF and AF_XDP"),
]

from fastpath import kernel as K  # noqa: E402
from fastpath import rings  # noqa: E402

A_IP, B_IP = "198.18.0.1", "198.18.0.2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two_hosts():
    """Yield (node, host_a, host_b) namespaces wired as in the module docstring."""
    with nu.netns("node") as node, nu.netns("a") as a, nu.netns("b") as b:
        for ns in (node, a, b):  # no IPv6 autoconfiguration chatter in the counted traffic
            nu.run_in(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                           "net.ipv6.conf.default.disable_ipv6=1"])
        nu.veth_pair("pa", node, "eth0", a)
        nu.veth_pair("pb", node, "eth0", b)
        nu.add_address(a, "eth0", f"{A_IP}/15")
        nu.add_address(b, "eth0", f"{B_IP}/15")
        yield node, a, b


def hooked(ns: str, ifname: str) -> bool:
    return "prog/xdp" in nu.ip("-d", "link", "show", ifname, ns=ns).stdout


def _rx_packets(ns: str, ifname: str) -> int:
    out = nu.ip("-s", "-j", "link", "show", ifname, ns=ns).stdout
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def test_ports_reopen_on_one_umem(two_hosts):
    """Sockets come and go with pods: one Umem reopens them, and every frame of a closed
    socket's fill ring comes back to the pool."""
    node, _, _ = two_hosts
    with rings.Umem(frames=1024, ring_size=256) as umem:
        for _ in range(3):
            with nu.in_netns(node):
                pa = rings.Port(umem, "pa", fill=128)
                pb = rings.Port(umem, "pb", fill=128)
            assert umem.free_frames == 1024 - 256
            pa.close()
            pb.close()
            assert umem.free_frames == 1024


def test_open_on_missing_interface_raises(two_hosts):
    node, _, _ = two_hosts
    with rings.Umem(frames=256, ring_size=64) as umem:
        with nu.in_netns(node), pytest.raises(rings.XskError) as err:
            rings.Port(umem, "nosuchif0")
        assert err.value.errno == 19  # ENODEV
        assert umem.free_frames == 256


def test_pool_ownership():
    with rings.Umem(frames=64, ring_size=64) as umem:
        a = umem.alloc(10)
        assert len(a) == 10 and umem.free_frames == 54
        assert len(set(a.tolist())) == 10 and not (a % umem.frame_size).any()
        umem.free(a)
        umem.free(a[:3])  # already free: refused and counted, the pool stays sane
        assert umem.bad_frees == 3 and umem.free_frames == 64
        assert len(umem.alloc(100)) == 64  # never more than exists


def _arp_request(src_mac: bytes) -> bytes:
    return (b"\xff" * 6 + src_mac + b"\x08\x06" + bytes.fromhex("0001080006040001") + src_mac
            + bytes([198, 18, 0, 9]) + bytes(6) + bytes([198, 18, 0, 1])).ljust(60, b"\0")


def test_tx_delivers_and_returns_frames(two_hosts):
    """Frames given to tx reach the other end; ring overflow and bad descriptors are counted."""
    node, a, _ = two_hosts
    frame = np.frombuffer(_arp_request(bytes.fromhex("02000000aa01")), np.uint8)
    with rings.Umem(frames=1024, ring_size=64) as umem:
        with nu.in_netns(node):
            port = rings.Port(umem, "pa", fill=32)
        before = _rx_packets(a, "eth0")
        addrs = umem.alloc(200)  # more than the TX ring holds
        for addr in addrs:
            umem.buf[int(addr):int(addr) + len(frame)] = frame
        queued = port.tx(addrs, np.full(len(addrs), len(frame), np.uint32))
        assert 0 < queued <= 64
        assert port.stats()["tx_ring_full"] == 200 - queued
        for _ in range(100):  # bounded wait for the last completions
            if port.stats()["tx_outstanding"] == 0:
                break
            port.reap()
            time.sleep(0.01)
        assert umem.free_frames == 1024 - 32  # everything but the fill ring came back
        assert _rx_packets(a, "eth0") - before == queued
        bad = np.array([umem.frames * umem.frame_size + 4096], np.uint64)
        assert port.tx(bad, np.array([60], np.uint32)) == 0
        assert port.stats()["tx_invalid"] == 1


def test_hooks_replace_atomically_and_detach_only_ours(two_hosts):
    node, _, _ = two_hosts
    kern = K.Kernel(None, flow_capacity=1024)
    try:
        with nu.in_netns(node):
            first = kern.attach("pa", zone=1, slot=0, role=K.EGRESS)
            second = kern.attach("pa", zone=1, slot=0, role=K.EGRESS)  # a restart re-hooks
            assert second != first and K.Kernel.hooked("pa") and not K.Kernel.hooked("pb")
            assert K.Kernel.detach("pb") is False  # nothing of ours there
            assert K.Kernel.detach("pa") is True
            assert not K.Kernel.hooked("pa")
            with pytest.raises(K.KernelError):
                kern.attach("nosuchif0", zone=1, slot=0, role=K.EGRESS)
    finally:
        kern.close()


def _reaches(ns: str, ip: str) -> bool:
    """A TCP SYN to a closed port: refused (RST came back) means both ways passed."""
    import socket
    with nu.in_netns(ns):
        s = socket.socket()
    with s:
        s.settimeout(1.0)
        try:
            s.connect((ip, 9))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return True


def test_a_killed_daemon_leaves_its_hooks_and_nothing_unjudged_passes(two_hosts):
    """SIGKILL skips every cleanup. The hooks stay attached (a detached hook would leave
    the pod unfiltered) and, with no socket to hand frames to, drop what they have not
    seen admitted; the node's own traffic still passes (rule S10)."""
    node, a, b = two_hosts
    nu.run_in(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    nu.add_address(node, "pa", "198.18.0.254/32")
    nu.ip("route", "add", f"{A_IP}/32", "dev", "pa", ns=node)
    code = ("import time; from fastpath import kernel as K, rings;"
            " k = K.Kernel(None); u = rings.Umem(frames=256, ring_size=64);"
            " p = rings.Port(u, 'pa', fill=32); k.register(0, p.fd);"
            " k.set_pod(7, ['198.18.0.1'], None, True, True);"
            " k.set_node_addrs(['198.18.0.254']); k.attach('pa', 7, 0, K.EGRESS);"
            " print('ready', flush=True); time.sleep(30)")
    proc = nu.popen_in(node, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert hooked(node, "pa")
    finally:
        proc.kill()
        proc.wait(10)
    try:
        time.sleep(0.2)
        assert hooked(node, "pa"), "the hook must outlive the process"
        nu.ip("neigh", "replace", B_IP, "lladdr", "02:00:00:00:00:0b", "dev", "eth0", ns=a)
        assert not _reaches(a, B_IP)  # unjudged: dropped, never passed
        assert _reaches(a, "198.18.0.254")  # the node's own address: rule S10
    finally:
        with nu.in_netns(node):
            K.Kernel.detach("pa")
    assert not hooked(node, "pa")


def test_sockets_on_interfaces_with_the_same_index_in_two_namespaces():
    """Interface indexes are per namespace: two pods' eth0 often share one. Sockets on
    both, over one UMEM, must each get rings of their own (libxdp's shared-socket
    helper matched them by index alone, and the second bind failed with EINVAL)."""
    with nu.netns("x") as x, nu.netns("y") as y:
        for ns in (x, y):
            nu.ip("link", "add", "e0", "index", "77", "type", "veth", "peer", "name", "f0", ns=ns)
            nu.ip("link", "set", "e0", "up", ns=ns)
            nu.ip("link", "set", "f0", "up", ns=ns)
        with rings.Umem(frames=512, ring_size=64) as umem:
            with nu.in_netns(x):
                px = rings.Port(umem, "e0", fill=32)
            with nu.in_netns(y):
                py = rings.Port(umem, "e0", fill=32)
            assert px.fd != py.fd and umem.free_frames == 512 - 64
            px.close()
            py.close()
            assert umem.free_frames == 512


def test_a_failing_transmit_stays_that_sockets_fault(two_hosts):
    """A kick the kernel refuses (the interface went down) is counted on its socket and
    returns the frames queued; it never raises out of the batch (one pod's fault must not
    stop the node's packet loop)."""
    node, _, _ = two_hosts
    frame = np.frombuffer(_arp_request(bytes.fromhex("02000000aa01")), np.uint8)
    with rings.Umem(frames=256, ring_size=64) as umem:
        with nu.in_netns(node):
            port = rings.Port(umem, "pa", fill=16)
        nu.ip("link", "set", "pa", "down", ns=node)
        addrs = umem.alloc(8)
        for addr in addrs:
            umem.buf[int(addr):int(addr) + len(frame)] = frame
        queued = port.tx(addrs, np.full(len(addrs), len(frame), np.uint32))
        assert queued == 8
        assert port.stats()["kick_errors"] >= 1
        port.close()
        assert umem.free_frames == 256  # nothing lost on the way
