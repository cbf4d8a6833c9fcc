"""Batch parser and checksum fixer against frames built by hand (no privileges needed).

Frames are assembled with struct from the protocol layouts; expected values come
from the builders' inputs, and checksums from an independent Python reference.
A property checked throughout: the parser never looks past a frame's length, so
changing the bytes after a frame never changes what it reports.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import parse
from fastpath.parse import ParsedBatch, fix_l4_checksums, parse_batch

from .frames import inet_sum

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
V4_A, V4_B = "198.18.0.1", "198.18.0.2"
V6_A, V6_B = "2001:db8::1", "2001:db8::2"
COLUMNS = [name for name, _, _ in parse._FIELDS]


# ---- frame builders ---------------------------------------------------------

def eth(payload: bytes, ethertype: int, tags: list[tuple[int, int]] = (), dst=MAC_B, src=MAC_A):
    """Ethernet header with VLAN tags given as (tpid, vid), outermost first."""
    hdr = dst + src
    for tpid, vid in tags:
        hdr += struct.pack("!HH", tpid, vid)
    return hdr + struct.pack("!H", ethertype) + payload


def ipv4(payload: bytes, proto: int, src=V4_A, dst=V4_B, options=b"", frag=0, mf=False,
         ihl=None, total=None, version=4):
    ihl = (20 + len(options)) // 4 if ihl is None else ihl
    total = 20 + len(options) + len(payload) if total is None else total
    fo = (0x2000 if mf else 0) | frag
    hdr = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, total, 7, fo, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return eth(hdr + options + payload, 0x0800)


def ext(nh: int, body_len8: int = 0) -> bytes:
    """A hop-by-hop/routing/destination-options header of (body_len8+1)*8 bytes."""
    return struct.pack("!BB", nh, body_len8) + bytes(6 + 8 * body_len8)


def ipv6(payload: bytes, nh: int, src=V6_A, dst=V6_B, exts: list[tuple[int, bytes]] = (),
         version=6, plen=None):
    """exts: (type, header bytes whose first byte is patched to the next type)."""
    chain = b""
    types = [t for t, _ in exts] + [nh]
    for i, (_, h) in enumerate(exts):
        chain += bytes([types[i + 1]]) + h[1:]
    first = types[0]
    body = chain + payload
    plen = len(body) if plen is None else plen
    hdr = struct.pack("!IHBB16s16s", version << 28, plen, first, 64,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return eth(hdr + body, 0x86DD)


def tcp(sport=40000, dport=80, flags=0x02, payload=b"", doff=5, csum=0):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 65535, csum, 0) + \
        bytes(4 * (doff - 5) if doff > 5 else 0) + payload


def udp(sport=40000, dport=53, payload=b"", length=None, csum=0):
    length = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, length, csum) + payload


def claim_doff(segment: bytes, doff: int) -> bytes:
    """A TCP segment whose data offset claims doff words without having them."""
    return segment[:12] + bytes([doff << 4]) + segment[13:]


def sctp(sport=5000, dport=6000, payload=b"\x01" * 16):
    return struct.pack("!HHII", sport, dport, 42, 0) + payload


def icmp_echo(ident=0x1234, typ=8, code=0):
    return struct.pack("!BBHHH", typ, code, 0, ident, 1) + b"ping"


def frag_hdr(offset8: int, more: bool) -> bytes:
    return struct.pack("!BBHI", 0, 0, offset8 << 3 | int(more), 99)


ARP = eth(struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_A, bytes(4), bytes(6),
                      bytes(4)), 0x0806)


def parse_frames(frames: list[bytes], slot: int = 2048, fill: int = 0xAA) -> ParsedBatch:
    """Parse frames laid out one per slot, the rest of each slot filled with `fill`."""
    buf = np.full(slot * max(len(frames), 1), fill, dtype=np.uint8)
    for i, f in enumerate(frames):
        buf[i * slot:i * slot + len(f)] = np.frombuffer(f, dtype=np.uint8)
    addrs = np.arange(len(frames), dtype=np.uint64) * slot
    lens = np.array([len(f) for f in frames], dtype=np.uint32)
    return parse_batch(buf, addrs, lens, len(frames), out=ParsedBatch(max(len(frames), 1)))


def one(frame: bytes) -> dict:
    pb = parse_frames([frame])
    return {c: getattr(pb, c)[0] for c in COLUMNS}


def mapped(v4: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{v4}").packed


# ---- well-formed frames -------------------------------------------------------

def test_udp_ipv4_fields():
    r = one(ipv4(udp(1234, 53, b"hello"), 17))
    assert r["status"] == parse.OK_IP and r["family"] == 4 and r["proto"] == 17
    assert (r["sport"], r["dport"]) == (1234, 53)
    assert bytes(r["src"]) == mapped(V4_A) and bytes(r["dst"]) == mapped(V4_B)
    assert (r["l3_off"], r["l4_off"], r["l4_len"]) == (14, 34, 13)
    assert r["eth_src"] == 0x020000000001 and r["eth_dst"] == 0x020000000002
    assert r["ethertype"] == 0x0800 and r["vlan"] == 0 and r["frag"] == 0


def test_s16_views_share_memory():
    pb = parse_frames([ipv4(udp(), 17), ipv6(udp(), 17)])
    assert pb.src_s16[0] == mapped(V4_A)
    assert pb.dst_s16[1] == ipaddress.IPv6Address(V6_B).packed


def test_tcp_with_ipv4_options_and_flags():
    opts = bytes([1, 1, 1, 0]) + bytes([0x44, 8, 5, 0, 0, 0, 0, 0])  # NOPs, EOL, timestamp
    r = one(ipv4(tcp(40001, 443, flags=0x12), 6, options=opts))
    assert r["status"] == parse.OK_IP and r["l4_off"] == 14 + 20 + len(opts)
    assert (r["sport"], r["dport"], r["tcp_flags"]) == (40001, 443, 0x12)


@pytest.mark.parametrize("tags,outer,inner,l3", [
    ([(0x8100, 100)], 100, 0, 18),
    ([(0x88A8, 200), (0x8100, 300)], 200, 300, 22),
    ([(0x9100, 7), (0x8100, 0x2000 | 4095)], 7, 4095, 22),  # PCP bits are not the VID
])
def test_vlan_and_qinq(tags, outer, inner, l3):
    f = eth(ipv4(udp(), 17)[14:], 0x0800, tags)
    r = one(f)
    assert r["status"] == parse.OK_IP and (r["vlan"], r["vlan_inner"]) == (outer, inner)
    assert r["l3_off"] == l3 and r["dport"] == 53


def test_three_tags_are_malformed():
    f = eth(ipv4(udp(), 17)[14:], 0x0800, [(0x88A8, 1), (0x8100, 2), (0x8100, 3)])
    assert one(f)["status"] == parse.TOO_MANY_TAGS


def test_ipv6_extension_headers_are_walked():
    exts = [(0, ext(0)), (43, ext(0, 1)), (60, ext(0, 2)),
            (51, struct.pack("!BBHII", 0, 4, 0, 1, 2) + bytes(12))]  # AH: (4+2)*4 = 24 B
    f = ipv6(tcp(5555, 8080), 6, exts=exts)
    r = one(f)
    assert r["status"] == parse.OK_IP and r["family"] == 6 and r["proto"] == 6
    assert (r["sport"], r["dport"]) == (5555, 8080)
    assert r["l4_off"] == 14 + 40 + 8 + 16 + 24 + 24
    assert bytes(r["src"]) == ipaddress.IPv6Address(V6_A).packed


@pytest.mark.parametrize("nh", [50, 59])
def test_ipv6_stops_at_esp_and_no_next_header(nh):
    r = one(ipv6(bytes(16), nh))
    assert r["status"] == parse.OK_IP and r["proto"] == nh and r["sport"] == 0


def test_fragments_ipv4():
    first = one(ipv4(udp(1, 2, bytes(40)), 17, mf=True))
    later = one(ipv4(bytes(24), 17, frag=3))
    assert first["status"] == parse.OK_IP and first["frag"] == parse.FRAG_FIRST
    assert first["dport"] == 2
    assert later["status"] == parse.FRAGMENT and later["frag"] == parse.FRAG_NONFIRST
    assert later["proto"] == 17 and later["sport"] == 0 and later["family"] == 4


def test_fragments_ipv6():
    first = one(ipv6(tcp(9, 10), 6, exts=[(44, frag_hdr(0, True))]))
    later = one(ipv6(bytes(32), 6, exts=[(44, frag_hdr(5, False))]))
    atomic = one(ipv6(tcp(9, 10), 6, exts=[(44, frag_hdr(0, False))]))
    assert first["status"] == parse.OK_IP and first["frag"] == 1 and first["sport"] == 9
    assert later["status"] == parse.FRAGMENT and later["proto"] == 6 and later["frag"] == 2
    assert atomic["status"] == parse.OK_IP and atomic["frag"] == 0


def test_tiny_first_fragment_is_malformed():
    assert one(ipv4(bytes(8), 6, mf=True))["status"] == parse.TINY_FRAGMENT
    assert one(ipv6(bytes(8), 6, exts=[(44, frag_hdr(0, True))]))["status"] == \
        parse.TINY_FRAGMENT


def test_icmp_echo_carries_identifier():
    r = one(ipv4(icmp_echo(0xBEEF, 8), 1))
    assert r["status"] == parse.OK_IP and (r["icmp_type"], r["icmp_code"]) == (8, 0)
    assert r["sport"] == r["dport"] == 0xBEEF
    r6 = one(ipv6(icmp_echo(0x4242, 129), 58))
    assert r6["status"] == parse.OK_IP and r6["icmp_type"] == 129
    assert r6["sport"] == r6["dport"] == 0x4242
    unreach = one(ipv4(struct.pack("!BBHI", 3, 1, 0, 0) + bytes(28), 1))
    assert (unreach["icmp_type"], unreach["icmp_code"], unreach["sport"]) == (3, 1, 0)


@pytest.mark.parametrize("icmp6_type", [133, 134, 135, 136, 137, 130, 131, 143])
def test_neighbour_discovery_and_mld(icmp6_type):
    body = struct.pack("!BBHI", icmp6_type, 0, 0, 0) + bytes(16)
    r = one(ipv6(body, 58, exts=[(0, ext(0))] if icmp6_type in (130, 131, 143) else []))
    assert r["status"] == parse.ND and r["icmp_type"] == icmp6_type


@pytest.mark.parametrize("frame,ethertype", [
    (ARP, 0x0806),
    (eth(bytes(46), 0x88CC), 0x88CC),            # LLDP
    (eth(bytes(46), 0x0030), 0x0030),            # 802.3 length field
    (eth(bytes(46), 0x1234, [(0x8100, 5)]), 0x1234),
], ids=["arp", "lldp", "802.3", "vlan-unknown"])
def test_non_ip_is_l2_only(frame, ethertype):
    r = one(frame)
    assert r["status"] == parse.NON_IP and r["ethertype"] == ethertype and r["family"] == 0


def test_ethernet_padding_is_not_payload():
    f = ipv4(udp(1, 2, b"x"), 17)
    r = one(f + bytes(60 - len(f)))
    assert r["status"] == parse.OK_IP and r["l4_len"] == 9


def test_sctp_ports():
    r = one(ipv6(sctp(3868, 3869), 132))
    assert r["status"] == parse.OK_IP and (r["sport"], r["dport"]) == (3868, 3869)


# ---- malformed frames ---------------------------------------------------------

@pytest.mark.parametrize("frame,status", [
    (ipv4(udp(), 17, ihl=4), parse.BAD_IHL),
    (ipv4(udp(), 17, version=6), parse.BAD_VERSION),
    (ipv6(udp(), 17, version=4), parse.BAD_VERSION),
    (ipv4(udp(), 17, total=19), parse.BAD_LENGTH),
    (ipv4(udp(), 17, total=200), parse.TRUNCATED),
    (ipv6(udp(), 17, plen=500), parse.TRUNCATED),
    (ipv6(udp(), 17, exts=[(60, ext(0)), (0, ext(0))]), parse.BAD_EXT_HEADER),
    (ipv6(udp(), 17, exts=[(60, ext(0))] * 9), parse.BAD_EXT_HEADER),
    (ipv6(udp(), 17, exts=[(44, frag_hdr(0, False))] * 2), parse.BAD_EXT_HEADER),
    (ipv4(tcp(doff=4), 6), parse.BAD_L4_HEADER),
    (ipv4(claim_doff(tcp(), 15), 6), parse.BAD_L4_HEADER),
    (ipv4(udp(length=7), 17), parse.BAD_L4_HEADER),
    (ipv4(udp(length=99), 17), parse.BAD_L4_HEADER),
    (MAC_A + MAC_B + b"\x08", parse.TRUNCATED),
], ids=lambda v: parse.STATUS_NAMES.get(v, "") if isinstance(v, int) else "")
def test_malformed_frames_get_named_status(frame, status):
    r = one(frame)
    assert r["status"] == status
    assert r["family"] == 0 and r["sport"] == 0 and not r["src"].any()


def test_bad_descriptors():
    buf = np.zeros(100, dtype=np.uint8)
    addrs = np.array([90, 200, 0], dtype=np.uint64)
    lens = np.array([20, 1, 100000], dtype=np.uint32)
    pb = parse_batch(buf, addrs, lens, 3)
    assert list(pb.status[:3]) == [parse.BAD_DESCRIPTOR] * 3


VALID = [
    ipv4(udp(1, 2, b"abc"), 17), ipv4(tcp(), 6, options=bytes(8)),
    eth(ipv4(tcp(), 6)[14:], 0x0800, [(0x88A8, 1), (0x8100, 2)]),
    ipv6(tcp(), 6, exts=[(0, ext(0)), (44, frag_hdr(0, True)), (60, ext(0, 1))]),
    ipv6(icmp_echo(typ=128), 58), ipv4(icmp_echo(), 1), ipv6(sctp(), 132),
    ipv6(struct.pack("!BBHI", 135, 0, 0, 0) + bytes(16), 58),
]


@pytest.mark.parametrize("frame", VALID, ids=range(len(VALID)))
def test_truncated_at_every_offset_is_malformed(frame):
    assert one(frame)["status"] in (parse.OK_IP, parse.ND)
    cuts = [frame[:k] for k in range(len(frame))]
    pb = parse_frames(cuts, slot=256, fill=0x00)
    assert (pb.status[: len(cuts)] >= parse.MALFORMED_MIN).all()
    assert_same(pb, parse_frames(cuts, slot=256, fill=0xFF), len(cuts))


def assert_same(a: ParsedBatch, b: ParsedBatch, n: int) -> None:
    for c in COLUMNS:
        np.testing.assert_array_equal(getattr(a, c)[:n], getattr(b, c)[:n], err_msg=c)


def test_batch_reuse_clears_previous_values():
    pb = ParsedBatch(4)
    big = [ipv6(tcp(7, 8), 6)] * 4
    buf = np.frombuffer(b"".join(big), dtype=np.uint8)
    addrs = np.arange(4, dtype=np.uint64) * len(big[0])
    lens = np.full(4, len(big[0]), dtype=np.uint32)
    parse_batch(buf, addrs, lens, 4, out=pb)
    buf2 = np.frombuffer(ARP, dtype=np.uint8)
    parse_batch(buf2, np.zeros(1, np.uint64), np.array([len(ARP)], np.uint32), 1, out=pb)
    assert pb.n == 1 and pb.status[0] == parse.NON_IP and pb.sport[0] == 0
    assert not pb.src[0].any() and pb.family[0] == 0


def test_batch_larger_than_capacity_is_refused():
    pb = ParsedBatch(2)
    with pytest.raises(ValueError):
        parse_batch(np.zeros(64, np.uint8), np.zeros(3, np.uint64), np.zeros(3, np.uint32), 3,
                    out=pb)


# ---- checksums ----------------------------------------------------------------

def pseudo(frame_l3: bytes, family: int, proto: int, l4_len: int) -> bytes:
    if family == 4:
        return frame_l3[12:20] + struct.pack("!BBH", 0, proto, l4_len)
    return frame_l3[8:40] + struct.pack("!IxxxB", l4_len, proto)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_reference_vector():
    assert crc32c(b"123456789") == 0xE3069283


def reference_checksum(frame: bytes, l3: int, l4: int, family: int, proto: int) -> bytes:
    """The checksum field bytes a correct sender would have written."""
    seg = bytearray(frame[l4:])
    if proto == 132:
        seg[8:12] = bytes(4)
        return struct.pack("<I", crc32c(bytes(seg)))
    off = 16 if proto == 6 else 6
    seg[off:off + 2] = bytes(2)
    v = 0xFFFF - inet_sum(pseudo(frame[l3:], family, proto, len(seg)) + bytes(seg))
    if proto == 17 and v == 0:
        v = 0xFFFF
    return struct.pack("!H", v)


def partial(frame: bytes, l3: int, l4: int, family: int, proto: int) -> bytes:
    """The frame as a CHECKSUM_PARTIAL sender leaves it: pseudo-header sum only."""
    f = bytearray(frame)
    if proto == 132:
        f[l4 + 8:l4 + 12] = bytes(4)
    else:
        off = 16 if proto == 6 else 6
        f[l4 + off:l4 + off + 2] = struct.pack("!H", inet_sum(
            pseudo(frame[l3:], family, proto, len(frame) - l4)))
    return bytes(f)


CSUM_CASES = [
    (ipv4(tcp(payload=b"odd-length!"), 6), 4, 6),
    (ipv4(udp(payload=bytes(range(200))), 17), 4, 17),
    (ipv6(tcp(payload=b"abc"), 6, exts=[(60, ext(0))]), 6, 6),
    (ipv6(udp(payload=b"hello world"), 17), 6, 17),
    (ipv4(sctp(), 132), 4, 132),
    (ipv6(sctp(payload=bytes(range(37))), 132), 6, 132),
]


def csum_field(frame: bytes, l4: int, proto: int) -> bytes:
    off = {6: 16, 17: 6, 132: 8}[proto]
    return frame[l4 + off:l4 + off + (4 if proto == 132 else 2)]


CSUM_IDS = ["tcp4", "udp4", "tcp6-ext", "udp6", "sctp4", "sctp6"]


@pytest.mark.parametrize("frame,family,proto", CSUM_CASES, ids=CSUM_IDS)
@pytest.mark.parametrize("only_partial", [False, True])
def test_fix_checksums_matches_reference(frame, family, proto, only_partial):
    l3, l4 = one(frame)["l3_off"], one(frame)["l4_off"]
    want = reference_checksum(frame, l3, l4, family, proto)
    sent = partial(frame, l3, l4, family, proto)
    buf = np.frombuffer(sent, dtype=np.uint8).copy()
    addrs, lens = np.zeros(1, np.uint64), np.array([len(sent)], np.uint32)
    pb = parse_batch(buf, addrs, lens, 1)
    assert fix_l4_checksums(buf, addrs, lens, pb, only_partial=only_partial) == 1
    assert csum_field(buf.tobytes(), l4, proto) == want


@pytest.mark.parametrize("frame,family,proto", CSUM_CASES, ids=CSUM_IDS)
def test_only_partial_leaves_corrupt_checksums(frame, family, proto):
    l3, l4 = one(frame)["l3_off"], one(frame)["l4_off"]
    bad = bytearray(partial(frame, l3, l4, family, proto))
    off = {6: 16, 17: 6, 132: 8}[proto]
    bad[l4 + off] ^= 0x5A  # neither the partial signature nor the right value
    buf = np.frombuffer(bytes(bad), dtype=np.uint8).copy()
    addrs, lens = np.zeros(1, np.uint64), np.array([len(bad)], np.uint32)
    pb = parse_batch(buf, addrs, lens, 1)
    assert fix_l4_checksums(buf, addrs, lens, pb, only_partial=True) == 0
    assert buf.tobytes() == bytes(bad)
    assert fix_l4_checksums(buf, addrs, lens, pb) == 1
    assert csum_field(buf.tobytes(), l4, proto) == reference_checksum(frame, l3, l4, family,
                                                                      proto)


def test_fix_respects_mask_and_skips_fragments_and_non_ip():
    frames = [ipv4(udp(payload=b"a"), 17), ipv4(udp(payload=b"b"), 17),
              ipv4(udp(1, 2, bytes(16)), 17, mf=True), ARP]
    slot = 256
    buf = np.zeros(slot * len(frames), dtype=np.uint8)
    for i, f in enumerate(frames):
        buf[i * slot:i * slot + len(f)] = np.frombuffer(f, dtype=np.uint8)
    before = buf.copy()
    addrs = np.arange(len(frames), dtype=np.uint64) * slot
    lens = np.array([len(f) for f in frames], dtype=np.uint32)
    pb = parse_batch(buf, addrs, lens, len(frames))
    mask = np.array([False, True, True, True])
    assert fix_l4_checksums(buf, addrs, lens, pb, mask) == 1
    changed = np.flatnonzero((buf != before).reshape(len(frames), slot).any(axis=1))
    assert list(changed) == [1]


# ---- fuzzing --------------------------------------------------------------------

KNOWN_STATUS = set(parse.STATUS_NAMES)


def check_invariants(pb: ParsedBatch, lens: np.ndarray) -> None:
    n = pb.n
    st_ = pb.status[:n]
    assert set(np.unique(st_)) <= KNOWN_STATUS
    ip_ok = np.isin(st_, [parse.OK_IP, parse.ND, parse.FRAGMENT])
    assert (pb.l4_off[:n][ip_ok].astype(np.int64) + pb.l4_len[:n][ip_ok] <= lens[:n][ip_ok]).all()
    assert np.isin(pb.family[:n][ip_ok], [4, 6]).all()
    bad = st_ >= parse.MALFORMED_MIN
    assert (pb.sport[:n][bad] == 0).all() and (pb.family[:n][bad] == 0).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=16))
def test_fuzz_random_bytes(frames):
    pb_a = parse_frames(frames, slot=256, fill=0x00)
    pb_b = parse_frames(frames, slot=256, fill=0xFF)
    assert_same(pb_a, pb_b, len(frames))
    check_invariants(pb_a, np.array([len(f) for f in frames], dtype=np.uint32))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)),
                                        max_size=6), st.integers(0, 200))
def test_fuzz_mutated_valid_frames(frame, flips, cut):
    f = bytearray(frame)
    for pos, val in flips:
        if pos < len(f):
            f[pos] = val
    f = bytes(f[: max(cut, 0)] if cut < len(f) else f)
    pb_a, pb_b = parse_frames([f], slot=256, fill=0x00), parse_frames([f], slot=256, fill=0xFF)
    assert_same(pb_a, pb_b, 1)
    check_invariants(pb_a, np.array([len(f)], dtype=np.uint32))


def test_fuzz_million_frames():
    """>= 1,000,000 random and mutated frames through parse, in large numpy batches.

    Each frame sits in a 256-byte slot followed by random bytes; the batch is
    parsed twice with different bytes after every frame and must not change.
    """
    rng = np.random.default_rng(308)
    slot, batch, rounds = 256, 65536, 16  # 16 x 65536 = 1,048,576 frames
    templates = np.zeros((len(VALID), slot), dtype=np.uint8)
    tlens = np.array([len(f) for f in VALID], dtype=np.uint32)
    for i, f in enumerate(VALID):
        templates[i, :len(f)] = np.frombuffer(f, dtype=np.uint8)
    pb_a, pb_b = ParsedBatch(batch), ParsedBatch(batch)
    addrs = np.arange(batch, dtype=np.uint64) * slot
    seen = set()
    for r in range(rounds):
        if r % 2 == 0:  # random bytes, with an IP ethertype half of the time
            frames = rng.integers(0, 256, (batch, slot), dtype=np.uint8)
            et = rng.integers(0, 3, batch)
            frames[et == 0, 12:14] = (0x08, 0x00)
            frames[et == 1, 12:14] = (0x86, 0xDD)
            frames[et == 0, 14] = 0x45
            frames[et == 1, 14] = 0x60
            lens = rng.integers(0, 200, batch).astype(np.uint32)
        else:  # valid frames with a few bytes replaced and random truncation
            pick = rng.integers(0, len(VALID), batch)
            frames = templates[pick].copy()
            lens = tlens[pick].copy()
            for _ in range(3):
                pos = (rng.random(batch) * lens).astype(np.int64)
                frames[np.arange(batch), pos] = rng.integers(0, 256, batch, dtype=np.uint8)
            cut = rng.random(batch) < 0.3
            lens[cut] = (rng.random(cut.sum()) * lens[cut]).astype(np.uint32)
        buf = frames.reshape(-1)
        parse_batch(buf, addrs, lens, batch, out=pb_a)
        tail = np.arange(slot)[None, :] >= lens[:, None]
        frames[tail] ^= 0xFF  # change every byte after each frame
        parse_batch(buf, addrs, lens, batch, out=pb_b)
        assert_same(pb_a, pb_b, batch)
        check_invariants(pb_a, lens)
        seen.update(np.unique(pb_a.status).tolist())
    assert {parse.OK_IP, parse.TRUNCATED, parse.NON_IP} <= seen
