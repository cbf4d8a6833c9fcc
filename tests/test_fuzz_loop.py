"""Fuzz: over a million random and mutated frames through parse + the whole pipeline.

Frames are built in big batches straight into a numpy buffer: well-formed
templates (TCP, UDP, SCTP, ICMP, IPv4 and IPv6, VLAN tags, fragments, ARP,
neighbour discovery) from the pods' own addresses and from strangers, with
random byte mutations, truncations and garbage tails, plus frames of pure
noise and descriptors pointing outside the buffer.  The pipeline runs with
real compiled tables and the real matcher.  Every batch must come back with
each frame either transmitted or freed (exactly once), and counted exactly
once in the verdict counters.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fastpath.counters import REASONS
from fastpath.loop import BufferFrames, Pipeline
from fastpath.switch import Switch
from fastpath.trafgen import arp_request, frame

pytestmark = pytest.mark.slow

FRAMES = 1_000_000
BATCH = 4096
SLOT = 256            # bytes per frame slot in the fuzz buffer
PODS = {"pa": "198.18.30.1", "pb": "198.18.30.2", "pc": "2001:db8::30:3"}
STRANGER = "198.18.31.7"


def compiled_tables():
    from control.compile.compiler import compile_tables
    from tests.builders import make_clusterset, make_pod, make_policy, peer_pods
    objs = [make_pod("default", name, ip, {"app": name}) for name, ip in
            (("a", PODS["pa"]), ("b", PODS["pb"]), ("c", PODS["pc"]))]
    objs.append(make_policy("default", "b-in", {"matchLabels": {"app": "b"}}, ingress=[
        {"from": [peer_pods(app="a")], "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}]}]))
    objs.append(make_policy("default", "c-eg", {"matchLabels": {"app": "c"}}, egress=[
        {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}], "ports": [{"protocol": "SCTP", "port": 9}]}],
        types=["Egress"]))
    return compile_tables(make_clusterset({"c1": objs}), lambda pod: True, 1)


def templates() -> list[bytes]:
    a, b, c = PODS["pa"], PODS["pb"], PODS["pc"]
    out = []
    for src, dst in ((a, b), (b, a), (STRANGER, b), (a, STRANGER)):
        for proto, dport in ((6, 80), (6, 81), (17, 53), (132, 9), (1, 0)):
            out.append(frame(src, dst, proto, 40000, dport, src_mac="02:00:00:00:30:01",
                             dst_mac="02:00:00:00:30:02"))
    for proto in (6, 17, 132, 58):
        out.append(frame(c, "2001:db8::99", proto, 1, 9, src_mac="02:00:00:00:30:03",
                         dst_mac="33:33:00:00:00:01"))
    out.append(arp_request("02:00:00:00:30:01", a, b))
    nd = frame(c, "ff02::1", 58, 0, 0, icmp_type=135, dst_mac="33:33:ff:00:00:01")
    out.append(nd)
    # one VLAN tag, an IPv4 fragment, an IPv6 hop-by-hop header
    udp = frame(a, b, 17, 1, 53)
    out.append(udp[:12] + b"\x81\x00\x00\x07" + udp[12:])
    frag = bytearray(frame(a, b, 17, 1, 53))
    frag[20:22] = struct.pack("!H", 0x2000 | 5)
    out.append(bytes(frag))
    v6 = bytearray(frame(c, "2001:db8::1", 17, 1, 9))
    v6[20] = 0
    out.append(bytes(v6[:54]) + bytes([17, 0, 0, 0, 0, 0, 0, 0]) + bytes(v6[54:]))
    return out


def make_batch(rng, tmpl: np.ndarray, tlen: np.ndarray):
    """One batch of fuzz frames: (buf, addrs, lens, in_port)."""
    kind = rng.integers(0, 10, BATCH)
    pick = rng.integers(0, len(tmpl), BATCH)
    rows = tmpl[pick].copy()
    lens = tlen[pick].astype(np.uint32)
    noise = kind == 0
    rows[noise] = rng.integers(0, 256, (int(noise.sum()), SLOT), dtype=np.uint8)
    lens[noise] = rng.integers(0, SLOT + 1, int(noise.sum()))
    # byte mutations in the headers of most frames
    mut = kind >= 4
    k = 4
    r = np.repeat(np.nonzero(mut)[0], k)
    rows[r, rng.integers(0, 90, len(r))] = rng.integers(0, 256, len(r), dtype=np.uint8)
    # truncations and garbage tails
    cut = kind == 1
    lens[cut] = (lens[cut] * rng.random(int(cut.sum()))).astype(np.uint32)
    grow = kind == 2
    lens[grow] = np.minimum(SLOT, lens[grow] + rng.integers(1, 64, int(grow.sum()))).astype(np.uint32)
    buf = np.zeros((BATCH * 3) * SLOT, dtype=np.uint8)  # frames, then room for flood copies
    buf[: BATCH * SLOT] = rows.reshape(-1)
    addrs = np.arange(BATCH, dtype=np.uint64) * np.uint64(SLOT)
    # a few descriptors outside the buffer
    bad = rng.random(BATCH) < 0.002
    addrs[bad] = np.uint64(len(buf)) + rng.integers(0, 4096, int(bad.sum())).astype(np.uint64)
    in_port = rng.integers(0, 4, BATCH).astype(np.int16)
    return buf, addrs, lens, in_port


def template_slots() -> tuple[np.ndarray, np.ndarray]:
    """The templates laid out one per SLOT-byte row, with their lengths."""
    raw = templates()
    tmpl = np.zeros((len(raw), SLOT), dtype=np.uint8)
    tlen = np.zeros(len(raw), dtype=np.uint32)
    for i, f in enumerate(raw):
        tmpl[i, :len(f)] = np.frombuffer(f, dtype=np.uint8)
        tlen[i] = len(f)
    return tmpl, tlen


def test_million_frames_never_crash_and_every_frame_is_accounted():
    from fastpath.match import judge
    rng = np.random.default_rng(308)
    tmpl, tlen = template_slots()
    switch = Switch(["pa", "pb", "pc", "up"], uplink=3)
    pipe = Pipeline(switch, judge=judge, batch=BATCH)
    pipe.set_tables(compiled_tables(), {name: [ip] for name, ip in PODS.items()})
    done = 0
    while done < FRAMES:
        buf, addrs, lens, in_port = make_batch(rng, tmpl, tlen)
        pool = BufferFrames(buf, range(BATCH * SLOT, len(buf), SLOT), frame_size=SLOT)
        before = pipe.counters.total()
        sends = pipe.process(buf, addrs, lens, in_port, BATCH, pool)
        assert pipe.counters.total() - before == BATCH
        originals = set(addrs.tolist())
        sent = [a for _, sa, _ in sends for a in sa.tolist() if a in originals]
        assert len(sent) == len(set(sent)), "a frame was sent twice"
        assert set(sent).isdisjoint(pool.freed), "a frame was both sent and freed"
        assert set(sent) | set(pool.freed) == originals, "a frame was lost"
        for port, sa, sl in sends:
            assert 0 <= port < 4 and len(sa) == len(sl)
        done += BATCH
    v = pipe.counters.verdicts
    assert v.sum() == done
    counted = {REASONS[r] for r in np.nonzero(v.sum(axis=0))[0]}
    # The fuzz reached the interesting verdicts, not just one of them.
    assert {"allowed", "l2", "truncated", "spoofed", "denied_ingress", "established"} <= counted


def test_c_pipeline_decides_every_frame_as_the_numpy_reference():
    """The C pipeline against the numpy pipeline it replaced (tests/pipeline_reference.py):
    same reason per frame, same frames to the same ports in the same order, same
    bytes on the way out (checksums, flood copies), same counters and rule hits."""
    from fastpath.match import judge
    from tests.pipeline_reference import ReferencePipeline
    rng = np.random.default_rng(4242)
    tmpl, tlen = template_slots()
    now = [10**12]
    clock = lambda: now[0]  # noqa: E731
    bindings = {name: [ip] for name, ip in PODS.items()}
    pipes = []
    for make in (lambda sw: Pipeline(sw, judge=judge, batch=BATCH, clock=clock),
                 lambda sw: ReferencePipeline(sw, judge, batch=BATCH, clock=clock)):
        pipe = make(Switch(["pa", "pb", "pc", "up"], uplink=3))
        pipe.set_tables(compiled_tables(), bindings)
        pipes.append(pipe)
    c_pipe, ref = pipes
    for _ in range(40):
        buf, addrs, lens, in_port = make_batch(rng, tmpl, tlen)
        outs = []
        for pipe in pipes:
            b = buf.copy()
            pool = BufferFrames(b, range(BATCH * SLOT, len(b), SLOT), frame_size=SLOT)
            sends = pipe.process(b, addrs.copy(), lens.copy(), in_port.copy(), BATCH, pool)
            outs.append((b, [(q, a.tolist(), ln.tolist()) for q, a, ln in sends],
                         sorted(pool.freed), pipe.reasons.copy()))
        (b1, s1, f1, r1), (b2, s2, f2, r2) = outs
        assert (r1 == r2).all(), [(REASONS[x], REASONS[y]) for x, y in zip(r1, r2) if x != y][:5]
        assert s1 == s2
        assert f1 == f2
        assert (b1 == b2).all()
        now[0] += 10**9
    assert (c_pipe.counters.verdicts == ref.counters.verdicts).all()
    assert (c_pipe.counters.rule_hits == ref.counters.rule_hits).all()
    assert c_pipe.ct.stats() == ref.ct.stats()
    assert c_pipe.counters.verdicts.sum() == 40 * BATCH
