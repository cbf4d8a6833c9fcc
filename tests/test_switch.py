"""The L2 switch and the packet pipeline on synthetic frames in a numpy buffer."""

import ipaddress
from types import SimpleNamespace

import numpy as np
import pytest

from fastpath.counters import DROP, PASS, REASON
from fastpath.loop import BufferFrames, Pipeline
from fastpath.switch import FLOOD, MacTable, Switch
from fastpath.trafgen import FrameBuffer, arp_request, frame, mac_bytes

SEC = 1_000_000_000
MAC = {"a": "02:00:00:00:00:0a", "b": "02:00:00:00:00:0b", "c": "02:00:00:00:00:0c",
       "r": "02:00:00:00:00:99"}
IP = {"a": "198.18.1.1", "b": "198.18.1.2", "c": "198.18.1.3", "r": "198.18.9.9"}
PORTS = ["pa", "pb", "pc", "up"]          # a, b, c are pods; "up" leads to r
IN = {"a": 0, "b": 1, "c": 2, "r": 3}


def mac_int(name):
    return int.from_bytes(mac_bytes(MAC[name]), "big")


class FakeTables:
    """A stand-in for PolicyTables + judge: allows a set of (src, dst, proto, dport)."""

    def __init__(self, revision, allowed):
        self.revision = revision
        self.allowed = {(ipaddress.ip_address(s), ipaddress.ip_address(d), p, port)
                        for s, d, p, port in allowed}


def fake_judge(tables, src, dst, proto, dport):
    def addr(row):
        ip = ipaddress.IPv6Address(bytes(row))
        return ip.ipv4_mapped or ip
    ok = np.array([(addr(s), addr(d), int(p), int(port)) in tables.allowed
                   for s, d, p, port in zip(src, dst, proto, dport)], dtype=bool)
    n = len(ok)
    return SimpleNamespace(allowed=ok, egress=np.where(ok, 0, -1).astype(np.int32),
                           ingress=np.full(n, -2, np.int32))


class Clock:
    t = 100 * SEC

    def __call__(self):
        return self.t


@pytest.fixture
def pipe():
    sw = Switch(PORTS, uplink=3)
    sw.bind({"pa": [IP["a"]], "pb": [IP["b"]], "pc": [IP["c"], "2001:db8::c"]})
    return Pipeline(sw, judge=fake_judge, clock=Clock())


def send(pipe, items):
    """items: [(sender, frame bytes)]; returns ({port: [frame bytes]}, pool)."""
    fb = FrameBuffer([f for _, f in items], spare=64)
    in_port = np.array([IN[who] for who, _ in items], dtype=np.int16)
    pool = BufferFrames(fb.buf, fb.free)
    before = pipe.counters.total()
    sends = pipe.process(fb.buf, fb.addrs, fb.lens, in_port, len(items), pool)
    assert pipe.counters.total() - before == len(items)  # every frame counted once
    out = {}
    for port, addrs, lens in sends:
        for a, ln in zip(addrs, lens):
            out.setdefault(port, []).append(fb.bytes_of(a, ln))
    return out, pool


def udp(s, d, sport=1000, dport=53, **kw):
    return frame(IP[s], IP[d], 17, sport, dport, src_mac=MAC[s], dst_mac=MAC[d], **kw)


def test_mac_table_lookup_learn_and_age():
    t = MacTable(capacity=2, ageing_ns=10)
    t.update({5: 1, 3: 2}, now=0)
    assert list(t.lookup(np.array([3, 5, 7], dtype=np.uint64))) == [2, 1, FLOOD]
    t.update({9: 0}, now=0)
    assert t.full_drops == 1 and len(t) == 2
    t.seen[0] = 100
    assert t.expire(now=50) == 1 and t.entries() == [(3, 2)]


def test_antispoof_checks_pod_ports_only():
    sw = Switch(["p0", "up"], uplink=1)
    sw.bind({"p0": ["198.18.0.1", "2001:db8::1"]})
    src = np.stack([np.frombuffer(ipaddress.IPv6Address(f"::ffff:{a}").packed, np.uint8)
                    for a in ("198.18.0.1", "198.18.0.2", "198.18.0.2")])
    in_port = np.array([0, 0, 1], dtype=np.int16)
    assert list(sw.spoofed(in_port, src)) == [False, True, False]
    assert sw.bindings() == {"p0": ["198.18.0.1", "2001:db8::1"]}


def test_pod_mac_does_not_move_to_another_pod_port():
    sw = Switch(["p0", "p1", "up"], uplink=2)
    macs = np.array([0x020000000001], dtype=np.uint64)
    assert not sw.learn(np.array([0], np.int16), macs, 0).any()
    assert sw.learn(np.array([1], np.int16), macs, 1).all()
    assert list(sw.forward(macs)) == [0]
    # broadcast and multicast always flood
    group = np.array([0xFFFFFFFFFFFF, 0x01005E000001], dtype=np.uint64)
    assert list(sw.forward(group)) == [FLOOD, FLOOD]


def test_ip_is_dropped_until_tables_arrive_but_arp_passes(pipe):
    out, pool = send(pipe, [("a", udp("a", "b")), ("a", arp_request(MAC["a"], IP["a"], IP["b"]))])
    assert sorted(out) == [1, 2, 3]  # the ARP broadcast floods to every other port
    assert pipe.counters.verdicts[DROP, REASON["no_tables"]] == 1
    assert pipe.counters.verdicts[PASS, REASON["l2"]] == 1
    assert len(pool.freed) == 1


def test_policy_conntrack_and_replies(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["b"], 17, 53)]))
    # Learn where b and a live (ARP both ways), then talk.
    send(pipe, [("b", arp_request(MAC["b"], IP["b"], IP["a"])),
                ("a", arp_request(MAC["a"], IP["a"], IP["b"]))])
    out, _ = send(pipe, [("a", udp("a", "b")), ("a", udp("a", "b", dport=54))])
    assert list(out) == [1] and len(out[1]) == 1
    out, _ = send(pipe, [("b", udp("b", "a", 53, 1000))])
    assert list(out) == [0]
    v = pipe.counters.verdicts
    assert v[PASS, REASON["allowed"]] == 1 and v[PASS, REASON["reply"]] == 1
    assert v[DROP, REASON["denied_egress"]] == 1
    assert pipe.counters.rule_hits[0] == 1
    # A new revision that no longer allows the flow cuts it.
    assert pipe.set_tables(FakeTables(2, [])) == 1
    out, _ = send(pipe, [("b", udp("b", "a", 53, 1000))])
    assert out == {}


def test_spoofed_source_is_dropped(pipe):
    pipe.set_tables(FakeTables(1, [(IP["b"], IP["c"], 17, 53)]))
    out, _ = send(pipe, [("a", udp("b", "c") .replace(mac_bytes(MAC["b"]), mac_bytes(MAC["a"]), 1))])
    assert out == {}
    assert pipe.counters.verdicts[DROP, REASON["spoofed"]] == 1


def test_malformed_and_bad_macs_are_counted(pipe):
    pipe.set_tables(FakeTables(1, []))
    short = udp("a", "b")[:20]
    bad_mac = udp("a", "b").replace(mac_bytes(MAC["a"]), b"\x01\x00\x5e\x00\x00\x01", 1)
    out, pool = send(pipe, [("a", short), ("a", bad_mac)])
    v = pipe.counters.verdicts
    assert out == {} and len(pool.freed) == 2
    assert v[DROP, REASON["truncated"]] == 1 and v[DROP, REASON["bad_src_mac"]] == 1


def test_checksum_partial_frames_are_fixed_on_the_way_out(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["r"], 6, 80)]))
    good = frame(IP["a"], IP["r"], 6, 5555, 80, src_mac=MAC["a"], dst_mac=MAC["r"])
    raw = bytearray(good)
    # What a veth sends with CHECKSUM_PARTIAL: only the pseudo-header sum.
    import struct
    s = sum(struct.unpack("!4H", bytes(raw[26:34]))) + 6 + 20
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    raw[50:52] = struct.pack("!H", s)
    send(pipe, [("r", arp_request(MAC["r"], IP["r"], IP["a"]))])
    out, _ = send(pipe, [("a", bytes(raw))])
    assert out[3] == [good]


def test_unknown_unicast_floods_and_hairpin_drops(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["b"], 17, 53)]))
    out, _ = send(pipe, [("a", udp("a", "b"))])  # b not learned yet
    assert sorted(out) == [1, 2, 3] and all(f == [udp("a", "b")] for f in out.values())
    send(pipe, [("b", arp_request(MAC["b"], IP["b"], IP["a"]))])
    # b's MAC is behind port 1: a frame from port 1 to it goes nowhere
    hair = mac_bytes(MAC["b"]) + arp_request(MAC["b"], IP["b"], IP["a"])[6:]
    out, _ = send(pipe, [("b", hair)])
    assert out == {}
    assert pipe.counters.verdicts[DROP, REASON["hairpin"]] == 1


def test_one_revision_per_batch_and_new_revision_between_batches(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["b"], 17, 53)]))
    send(pipe, [("b", arp_request(MAC["b"], IP["b"], IP["a"]))])
    out, _ = send(pipe, [("a", udp("a", "b", 1)), ("a", udp("a", "b", 2))])
    assert len(out[1]) == 2
    pipe.set_tables(FakeTables(2, [(IP["a"], IP["b"], 17, 54)]))
    out, _ = send(pipe, [("a", udp("a", "b", 3)), ("a", udp("a", "b", 4, 54))])
    assert [f[34:36] for f in out[1]] == [b"\x00\x04"]
    assert pipe.counters.gauges[2] == 2  # revision gauge


def test_a_frame_from_an_unknown_port_index_is_dropped_not_indexed(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["b"], 17, 53)]))
    fb = FrameBuffer([udp("a", "b")], spare=4)
    pool = BufferFrames(fb.buf, fb.free)
    sends = pipe.process(fb.buf, fb.addrs, fb.lens, np.array([7], np.int16), 1, pool)
    assert sends == [] and pool.freed == [int(fb.addrs[0])]
    assert pipe.counters.verdicts[DROP, REASON["bad_descriptor"]] == 1


def test_pipeline_follows_the_mac_table_when_it_is_replaced(pipe):
    pipe.set_tables(FakeTables(1, [(IP["a"], IP["b"], 17, 53)]))
    send(pipe, [("b", arp_request(MAC["b"], IP["b"], IP["a"]))])
    out, _ = send(pipe, [("a", udp("a", "b"))])
    assert list(out) == [1]                       # b learned: unicast
    pipe.switch.macs.expire(now=Clock.t + 10**15)  # everything ages out
    assert len(pipe.switch.macs) == 0
    out, _ = send(pipe, [("a", udp("a", "b", 1001))])
    assert sorted(out) == [1, 2, 3]               # unknown again: flooded


def test_flooding_with_no_other_port_is_a_counted_drop():
    sw = Switch(["only"], uplink=0)
    pipe = Pipeline(sw, judge=fake_judge, clock=Clock())
    fb = FrameBuffer([arp_request(MAC["r"], IP["r"], IP["a"])], spare=4)
    pool = BufferFrames(fb.buf, fb.free)
    assert pipe.process(fb.buf, fb.addrs, fb.lens, np.zeros(1, np.int16), 1, pool) == []
    assert pipe.counters.verdicts[DROP, REASON["no_destination"]] == 1
    assert pool.freed == [int(fb.addrs[0])]
