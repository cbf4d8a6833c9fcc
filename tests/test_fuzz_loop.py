"""Fuzz: a million random and mutated frames through parse + the whole userspace pipeline.

Frames are built in big batches straight into a numpy buffer: well-formed templates
(TCP, UDP, SCTP, ICMP, IPv4 and IPv6, VLAN tags, fragments, ARP, neighbour
discovery) from the pods' own addresses and from strangers, with random byte
mutations, truncations and garbage tails, plus frames of pure noise and descriptors
pointing outside the buffer, arriving on any hook (both ends of three pods' veths,
one pod not ready, and ports that do not exist).  The pipeline runs with real
compiled tables, the real matcher and a real (unpinned) flow cache.  Every batch must
come back with each frame sent exactly once or dropped, counted exactly once; a frame
is only ever sent into the other end of its own pod's veth; nothing passes from a pod
that is not ready, or leaves a pod with another address.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fastpath.kernel import addr16
from fastpath.parse import parse_batch
from tests import netns_util as nu
from tests.frames import arp_request, frame

pytestmark = [
    pytest.mark.slow, pytest.mark.privileged,
    pytest.mark.skipif(not nu.is_root(), reason="BPF maps need root"),
]

FRAMES = 1_000_000
BATCH = 4096
SLOT = 256            # bytes per frame slot in the fuzz buffer
PODS = {"a": "198.18.30.1", "b": "198.18.30.2", "c": "2001:db8::30:3"}
STRANGER = "198.18.31.7"
PORTS = 7             # hooks 0..5 (pods a, b, c: egress, ingress), 6 and beyond: unknown


def compiled_tables():
    from control.compile.compiler import compile_tables
    from tests.builders import make_clusterset, make_pod, make_policy, peer_pods
    objs = [make_pod("default", name, ip, {"app": name}) for name, ip in PODS.items()]
    objs.append(make_policy("default", "b-in", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [peer_pods(app="a")], "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}]}]))
    objs.append(make_policy("default", "c-eg", {"matchLabels": {"app": "c"}}, egress=[
        {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}], "ports": [{"protocol": "SCTP", "port": 9}]}],
        types=["Egress"]))
    return compile_tables(make_clusterset({"c1": objs}), lambda pod: True, 1)


def templates() -> list[bytes]:
    a, b, c = PODS["a"], PODS["b"], PODS["c"]
    out = []
    for src, dst in ((a, b), (b, a), (STRANGER, b), (a, STRANGER), (b, "255.255.255.255")):
        for proto, dport in ((6, 80), (6, 81), (17, 53), (132, 9), (1, 0)):
            out.append(frame(src, dst, proto, 40000, dport, src_mac="02:00:00:00:30:01",
                             dst_mac="02:00:00:00:30:02"))
    for proto in (6, 17, 132, 58):
        out.append(frame(c, "2001:db8::99", proto, 1, 9, src_mac="02:00:00:00:30:03",
                         dst_mac="33:33:00:00:00:01"))
    out.append(arp_request("02:00:00:00:30:01", a, b))
    out.append(frame(c, "ff02::1", 58, 0, 0, icmp_type=135, dst_mac="33:33:ff:00:00:01"))
    udp = frame(a, b, 17, 1, 53)
    out.append(udp[:12] + b"\x81\x00\x00\x07" + udp[12:])  # one VLAN tag
    frag = bytearray(frame(a, b, 17, 1, 53))
    frag[20:22] = struct.pack("!H", 0x2000 | 5)  # an IPv4 fragment
    out.append(bytes(frag))
    v6 = bytearray(frame(c, "2001:db8::1", 17, 1, 9))
    v6[20] = 0  # an IPv6 hop-by-hop header
    out.append(bytes(v6[:54]) + bytes([17, 0, 0, 0, 0, 0, 0, 0]) + bytes(v6[54:]))
    return out


def template_slots() -> tuple[np.ndarray, np.ndarray]:
    raw = templates()
    tmpl = np.zeros((len(raw), SLOT), dtype=np.uint8)
    tlen = np.zeros(len(raw), dtype=np.uint32)
    for i, f in enumerate(raw):
        tmpl[i, :len(f)] = np.frombuffer(f, dtype=np.uint8)
        tlen[i] = len(f)
    return tmpl, tlen


def make_batch(rng, tmpl: np.ndarray, tlen: np.ndarray):
    """One batch of fuzz frames: (buf, addrs, lens, in_port)."""
    kind = rng.integers(0, 10, BATCH)
    pick = rng.integers(0, len(tmpl), BATCH)
    rows = tmpl[pick].copy()
    lens = tlen[pick].astype(np.uint32)
    noise = kind == 0
    rows[noise] = rng.integers(0, 256, (int(noise.sum()), SLOT), dtype=np.uint8)
    lens[noise] = rng.integers(0, SLOT + 1, int(noise.sum()))
    mut = kind >= 4  # byte mutations in the headers
    r = np.repeat(np.nonzero(mut)[0], 4)
    rows[r, rng.integers(0, 90, len(r))] = rng.integers(0, 256, len(r), dtype=np.uint8)
    cut = kind == 1
    lens[cut] = (lens[cut] * rng.random(int(cut.sum()))).astype(np.uint32)
    grow = kind == 2
    lens[grow] = np.minimum(SLOT, lens[grow] + rng.integers(1, 64, int(grow.sum()))).astype(np.uint32)
    buf = np.zeros(BATCH * SLOT, dtype=np.uint8)
    buf[:] = rows.reshape(-1)
    addrs = np.arange(BATCH, dtype=np.uint64) * np.uint64(SLOT)
    bad = rng.random(BATCH) < 0.002  # descriptors outside the buffer
    addrs[bad] = np.uint64(len(buf)) + rng.integers(0, 4096, int(bad.sum())).astype(np.uint64)
    in_port = rng.integers(0, PORTS + 1, BATCH).astype(np.int16)
    in_port[rng.random(BATCH) < 0.001] = -1
    return buf, addrs, lens, in_port


def make_pipeline():
    from fastpath import kernel as K
    from fastpath.counters import Counters
    from fastpath.loop import Pipeline
    kern = K.Kernel(None, flow_capacity=65536)
    pipe = Pipeline(kern, Counters(), BATCH, max_ports=PORTS)
    for i, (name, ip) in enumerate(PODS.items()):
        pipe.set_hook(2 * i, zone=i + 1, peer=2 * i + 1, role=K.EGRESS, ips=[ip], ready=True)
        pipe.set_hook(2 * i + 1, zone=i + 1, peer=2 * i, role=K.INGRESS, ips=[ip], ready=True)
    pipe.set_hook(6, zone=9, peer=-1, role=K.EGRESS, ips=["198.18.30.9"], ready=False)  # not ready
    pipe.ensure_ports(PORTS)
    tables = compiled_tables()
    kern.set_config(tables.revision, K.DEFAULT_TIMEOUTS)
    pipe.set_tables(tables, K.DEFAULT_TIMEOUTS)
    pipe.set_rule_hits(np.zeros(len(tables.rules) + 1, dtype=np.int64))
    return kern, pipe


def test_million_frames_never_crash_and_every_frame_is_accounted():
    from fastpath.counters import REASONS
    rng = np.random.default_rng(308)
    tmpl, tlen = template_slots()
    kern, pipe = make_pipeline()
    try:
        done = 0
        while done < FRAMES:
            buf, addrs, lens, in_port = make_batch(rng, tmpl, tlen)
            before = pipe.counters.total()
            sends, drops = pipe.process(buf, addrs, lens, in_port, BATCH)
            assert pipe.counters.total() - before == BATCH
            sent = np.concatenate([a for _, a in sends]) if sends else np.zeros(0, np.uint64)
            assert len(sent) + len(drops) == BATCH, "a frame was lost or doubled"
            assert len(set(sent.tolist()) | set(drops.tolist())) == len(set(addrs.tolist()))
            index = {int(a): i for i, a in enumerate(addrs.tolist())}
            for port, out in sends:
                src_ports = in_port[[index[int(a)] for a in out]]
                peers = src_ports ^ 1  # a frame goes only into the other end of its pod's veth
                assert (peers == port).all() and (src_ports < 6).all()
            for port, out in sends:
                if port % 2 == 1:  # sent on from an egress hook: its source is the pod's
                    rows = [index[int(a)] for a in out]
                    parsed = parse_batch(buf, addrs[rows].copy(), lens[rows].copy(), len(rows))
                    own = addr16(list(PODS.values())[port // 2])
                    assert all(bytes(parsed.src[i]) == own for i in range(len(rows)))
            done += BATCH
        v = pipe.counters.verdicts
        assert v.sum() == done
        counted = {REASONS[r] for r in np.nonzero(v.sum(axis=0))[0]}
        assert {"allowed", "established", "truncated", "spoofed", "denied_ingress", "denied_egress",
                "pod_not_ready", "non_ip", "unknown_port"} <= counted
    finally:
        kern.close()
