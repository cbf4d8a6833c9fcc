"""AF_XDP plumbing on real veth ports: two hosts talk through a Python forwarder.

Topology (all in fresh namespaces, 198.18.0.0/15 on-link, no routes out)::

    [host A] eth0 198.18.0.1 ==veth== pa [node ns] pb ==veth== eth0 198.18.0.2 [host B]

The XDP program is attached to ``pa`` and ``pb`` inside the node namespace; a
forwarding thread moves every frame from one port to the other through the
shared UMEM (no copy), fixing L4 checksums on the way, since the hosts send
CHECKSUM_PARTIAL frames.  A UDP echo and a TCP exchange must succeed through
it.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests import netns_util as nu

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(not nu.is_root(), reason="needs root for netns, BPF and AF_XDP"),
]

xsk = pytest.importorskip("fastpath.xsk")
from fastpath import parse  # noqa: E402

A_IP, B_IP = "198.18.0.1", "198.18.0.2"
BATCH = 64


class Forwarder(threading.Thread):
    """Move frames pa -> pb and pb -> pa, fixing checksums; bounded in time and count."""

    def __init__(self, umem, pa, pb, deadline_s: float = 30.0, max_frames: int = 100_000):
        super().__init__(daemon=True)
        self.umem, self.ports = umem, (pa, pb)
        self.deadline = time.monotonic() + deadline_s
        self.max_frames = max_frames
        self.stop = threading.Event()
        self.forwarded = 0
        self.fixed = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            self._run()
        except BaseException as e:  # surfaced by the test
            self.error = e

    def _run(self):
        addrs = np.empty(BATCH, dtype=np.uint64)
        lens = np.empty(BATCH, dtype=np.uint32)
        pb_ = parse.ParsedBatch(BATCH)
        fds = {p.fd: (p, q) for p, q in (self.ports, self.ports[::-1])}
        while not self.stop.is_set() and time.monotonic() < self.deadline \
                and self.forwarded < self.max_frames:
            ready, _, _ = select.select(list(fds), [], [], 0.05)
            for fd in ready:
                src, dst = fds[fd]
                n = src.rx_into(addrs, lens)
                if n == 0:
                    continue
                parse.parse_batch(self.umem.buf, addrs, lens, n, out=pb_)
                self.fixed += parse.fix_l4_checksums(self.umem.buf, addrs, lens, pb_)
                self.forwarded += dst.tx(addrs[:n], lens[:n])


@pytest.fixture
def two_hosts():
    """Yield (node, host_a, host_b) namespaces wired as in the module docstring."""
    with nu.netns("node") as node, nu.netns("a") as a, nu.netns("b") as b:
        for ns in (node, a, b):  # no IPv6 autoconfiguration chatter in the counted traffic
            nu.run_in(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        nu.veth_pair("pa", node, "eth0", a)
        nu.veth_pair("pb", node, "eth0", b)
        nu.add_address(a, "eth0", f"{A_IP}/15")
        nu.add_address(b, "eth0", f"{B_IP}/15")
        yield node, a, b


@pytest.fixture
def forwarder(two_hosts):
    node, a, b = two_hosts
    # The UMEM is made in the test's own netns: ports may live in any other one.
    with xsk.Umem(frames=2048, frame_size=2048, ring_size=512) as umem:
        with nu.in_netns(node):
            pa = xsk.Port(umem, "pa", fill=256)
            pb = xsk.Port(umem, "pb", fill=256)
        fwd = Forwarder(umem, pa, pb)
        fwd.start()
        try:
            yield fwd, two_hosts
        finally:
            fwd.stop.set()
            fwd.join(5)
    # leaving the Umem block closed both ports; nothing stays attached
    assert pa.closed and pb.closed


def _socket_in(ns: str, kind: int) -> socket.socket:
    with nu.in_netns(ns):
        return socket.socket(socket.AF_INET, kind)


def test_udp_echo_through_af_xdp(forwarder):
    fwd, (node, a, b) = forwarder
    server = _socket_in(b, socket.SOCK_DGRAM)
    client = _socket_in(a, socket.SOCK_DGRAM)
    with server, client:
        server.bind((B_IP, 7007))
        server.settimeout(5)
        client.settimeout(5)
        for i in range(5):  # bounded; the first may wait for ARP through the forwarder
            payload = f"ping {i}".encode()
            client.sendto(payload, (B_IP, 7007))
            data, peer = server.recvfrom(2048)
            assert data == payload and peer[0] == A_IP
            server.sendto(data.upper(), peer)
            assert client.recvfrom(2048)[0] == payload.upper()
    assert fwd.error is None
    assert fwd.fixed >= 10  # every UDP frame needed its checksum completed


def test_tcp_connection_through_af_xdp(forwarder):
    fwd, (node, a, b) = forwarder
    listener = _socket_in(b, socket.SOCK_STREAM)
    client = _socket_in(a, socket.SOCK_STREAM)
    with listener, client:
        listener.bind((B_IP, 7008))
        listener.listen(1)
        listener.settimeout(5)
        client.settimeout(5)
        client.connect((B_IP, 7008))
        conn, peer = listener.accept()
        with conn:
            conn.settimeout(5)
            assert peer[0] == A_IP
            blob = bytes(range(256)) * 64  # 16 KiB: several full-size segments
            client.sendall(blob)
            got = b""
            while len(got) < len(blob):
                chunk = conn.recv(65536)
                assert chunk, "connection closed early"
                got += chunk
            assert got == blob
            conn.sendall(b"bye")
            assert client.recv(16) == b"bye"
    assert fwd.error is None
    stats = fwd.ports[0].stats()
    assert stats["rx_frames"] > 0 and fwd.ports[1].stats()["tx_frames"] > 0
    counters = fwd.ports[0].xdp_counters()
    assert counters["redirect"] >= stats["rx_frames"]


def test_ports_close_and_detach(two_hosts):
    """Closing a port detaches its program; a new Umem can bind the same port again."""
    node, a, b = two_hosts
    # re-binding right after a close is where EBUSY shows up
    for mode in ("auto", "generic", "native", "auto"):
        with xsk.Umem(frames=1024, ring_size=256) as umem:
            with nu.in_netns(node):
                port = xsk.Port(umem, "pa", fill=128, xdp_mode=mode)
            assert port.xdp_mode == (mode if mode != "auto" else "native")
            assert umem.free_frames == 1024 - 128
            assert "prog/xdp" in nu.ip("-d", "link", "show", "pa", ns=node).stdout
            port.close()  # from the root netns: detaching must not depend on it
            assert umem.free_frames == 1024  # the fill ring's frames came back
        assert "prog/xdp" not in nu.ip("-d", "link", "show", "pa", ns=node).stdout


def test_killed_process_leaves_no_program(two_hosts):
    """SIGKILL skips every cleanup; the BPF link still takes the program away."""
    node, _, _ = two_hosts
    code = ("import sys, time; from fastpath import xsk; u = xsk.Umem(frames=256, ring_size=64);"
            " p = xsk.Port(u, 'pa', fill=32); print('ready', flush=True); time.sleep(30)")
    proc = nu.popen_in(node, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert "prog/xdp" in nu.ip("-d", "link", "show", "pa", ns=node).stdout
    finally:
        proc.kill()
        proc.wait(10)
    for _ in range(50):  # bounded: the link is released as the process's files close
        if "prog/xdp" not in nu.ip("-d", "link", "show", "pa", ns=node).stdout:
            break
        time.sleep(0.1)
    assert "prog/xdp" not in nu.ip("-d", "link", "show", "pa", ns=node).stdout


def test_ports_reopen_on_one_umem(two_hosts):
    """Ports come and go with pods: the same Umem reopens them, even after the last closed."""
    node, _, _ = two_hosts
    with xsk.Umem(frames=1024, ring_size=256) as umem:
        for _ in range(3):
            with nu.in_netns(node):
                pa = xsk.Port(umem, "pa", fill=128)
                pb = xsk.Port(umem, "pb", fill=128)
            assert umem.free_frames == 1024 - 256
            pa.close()
            pb.close()
            assert umem.free_frames == 1024


def test_open_on_missing_interface_raises(two_hosts):
    node, _, _ = two_hosts
    with xsk.Umem(frames=256, ring_size=64) as umem:
        with nu.in_netns(node), pytest.raises(xsk.XskError) as err:
            xsk.Port(umem, "nosuchif0")
        assert err.value.errno == 19  # ENODEV
        assert umem.free_frames == 256


def test_pool_ownership_and_copy():
    with xsk.Umem(frames=64, ring_size=64) as umem:
        a = umem.alloc(10)
        assert len(a) == 10 and umem.free_frames == 54
        assert len(set(a.tolist())) == 10 and not (a % umem.frame_size).any()
        umem.buf[int(a[0]):int(a[0]) + 5] = np.frombuffer(b"hello", np.uint8)
        dup = umem.copy(a[:1], np.array([5], np.uint32))
        assert umem.buf[int(dup[0]):int(dup[0]) + 5].tobytes() == b"hello"
        umem.free(a)
        umem.free(a[:3])  # already free: refused and counted, the pool stays sane
        assert umem.bad_frees == 3 and umem.free_frames == 63
        umem.free(dup)
        rest = umem.alloc(100)
        assert len(rest) == 64  # never more than exists
        assert len(umem.copy(a[:2], np.array([5, 5], np.uint32))) == 0  # pool empty


def _arp_request(src_mac: bytes) -> bytes:
    return (b"\xff" * 6 + src_mac + b"\x08\x06" + bytes.fromhex("0001080006040001") + src_mac
            + bytes([198, 18, 0, 9]) + bytes(6) + bytes([198, 18, 0, 1])).ljust(60, b"\0")


def _rx_packets(ns: str, ifname: str) -> int:
    out = nu.ip("-s", "-j", "link", "show", ifname, ns=ns).stdout
    import json
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def test_tx_delivers_and_returns_frames(two_hosts):
    """Frames given to tx reach the peer; ring overflow and bad descriptors are counted."""
    node, a, _ = two_hosts
    frame = np.frombuffer(_arp_request(bytes.fromhex("02000000aa01")), np.uint8)
    with xsk.Umem(frames=1024, ring_size=64) as umem:
        with nu.in_netns(node):
            port = xsk.Port(umem, "pa", fill=32)
        before = _rx_packets(a, "eth0")
        addrs = umem.alloc(200)  # more than the TX ring holds
        for addr in addrs:
            umem.buf[int(addr):int(addr) + len(frame)] = frame
        lens = np.full(len(addrs), len(frame), np.uint32)
        queued = port.tx(addrs, lens)
        assert 0 < queued <= 64
        stats = port.stats()
        assert stats["tx_ring_full"] == 200 - queued
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
