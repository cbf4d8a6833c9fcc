"""Connection tracking: replies, states, timeouts on an injected clock, bounds, re-check."""

from types import SimpleNamespace

import numpy as np
import pytest

from fastpath import conntrack as ct_mod
from fastpath.conntrack import NEW, ORIG, REPLY, UNTRACKED, ConnTrack
from fastpath.parse import parse_batch
from fastpath.trafgen import FrameBuffer, frame

SEC = 1_000_000_000
A, B, C = "198.18.0.10", "198.18.0.20", "198.18.0.30"
A6, B6 = "2001:db8::a", "2001:db8::b"
SYN, SYNACK, ACK, FIN, RST = 0x02, 0x12, 0x10, 0x11, 0x14


class Clock:
    def __init__(self):
        self.t = 1000 * SEC

    def __call__(self):
        return self.t


def run(ct, frames, commit_new=True, revision=1):
    """One batch through lookup (+ commit of every NEW frame); returns the results."""
    fb = FrameBuffer(frames)
    p = parse_batch(fb.buf, fb.addrs, fb.lens, len(frames))
    n = len(frames)
    aux = ct.aux(p, n, fb.buf, fb.addrs).copy()
    res, fresh = ct.lookup(p, n, None, aux, fb.lens)
    res = res.copy()
    assert fresh == int((res == NEW).sum())
    if commit_new:
        ct.commit(p, n, res == NEW, aux, revision, lens=fb.lens)
    return list(res)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ct(clock):
    return ConnTrack(capacity=1024, clock=clock)


def test_tcp_reply_and_further_packets_are_known(ct):
    assert run(ct, [frame(A, B, 6, 40000, 80, flags=SYN)]) == [NEW]
    assert run(ct, [frame(B, A, 6, 80, 40000, flags=SYNACK),
                    frame(A, B, 6, 40000, 80, flags=ACK)]) == [REPLY, ORIG]
    (flow,) = ct.flows()
    assert (flow["src"], flow["dst"], flow["sport"], flow["dport"]) == (A, B, 40000, 80)
    assert flow["state"] == "tcp_established" and flow["packets"] == [2, 1]


def test_other_ports_and_the_reverse_opening_are_new(ct):
    run(ct, [frame(A, B, 6, 40000, 80)])
    assert run(ct, [frame(A, B, 6, 40001, 80), frame(A, B, 17, 40000, 80),
                    frame(C, B, 6, 40000, 80)], commit_new=False) == [NEW, NEW, NEW]


def test_udp_ipv6_and_sctp_replies(ct):
    run(ct, [frame(A6, B6, 17, 5000, 53), frame(A, B, 132, 7000, 9000, chunk=1)])
    assert run(ct, [frame(B6, A6, 17, 53, 5000), frame(B, A, 132, 9000, 7000, chunk=2)]) == \
        [REPLY, REPLY]
    states = {f["protocol"]: f["state"] for f in ct.flows()}
    assert states == {"UDP": "udp", "SCTP": "sctp_established"}


def test_icmp_echo_is_keyed_requester_first(ct):
    run(ct, [frame(A, B, 1, 77, 77, icmp_type=8)])
    reply = frame(B, A, 1, 77, 77, icmp_type=0)
    request_back = frame(B, A, 1, 77, 77, icmp_type=8)
    assert run(ct, [reply, request_back], commit_new=False) == [REPLY, NEW]
    # An unsolicited echo reply never opens a flow, and ICMP errors are untracked.
    assert run(ct, [frame(C, A, 1, 5, 5, icmp_type=0), frame(C, A, 1, 0, 0, icmp_type=3)]) == \
        [NEW, UNTRACKED]
    assert run(ct, [frame(C, A, 1, 5, 5, icmp_type=0)], commit_new=False) == [NEW]


def test_timeouts_follow_the_state(ct, clock):
    run(ct, [frame(A, B, 6, 1, 80, flags=SYN), frame(A, B, 17, 2, 53)])
    clock.t += 31 * SEC  # unanswered SYN (30 s) expires; UDP (60 s) lives
    assert run(ct, [frame(B, A, 6, 80, 1, flags=SYNACK), frame(B, A, 17, 53, 2)],
               commit_new=False) == [NEW, REPLY]
    run(ct, [frame(A, B, 6, 3, 80, flags=SYN)])
    run(ct, [frame(B, A, 6, 80, 3, flags=SYNACK)])
    clock.t += 1800 * SEC  # established lives an hour
    assert run(ct, [frame(A, B, 6, 3, 80, flags=ACK)]) == [ORIG]
    assert run(ct, [frame(A, B, 6, 3, 80, flags=RST)]) == [ORIG]
    clock.t += 11 * SEC  # closed flows linger 10 s
    assert run(ct, [frame(B, A, 6, 80, 3, flags=ACK)], commit_new=False) == [NEW]


def test_configured_timeouts_and_sweep(clock):
    ct = ConnTrack(capacity=64, clock=clock, timeouts={"udp": 5})
    run(ct, [frame(A, B, 17, 1, 53)])
    clock.t += 4 * SEC
    assert ct.count() == 1
    clock.t += 2 * SEC
    assert ct.count() == 0
    assert ct.sweep(slots=64) == 1
    with pytest.raises(ValueError):
        ConnTrack(timeouts={"tcp_sometimes": 1})


def test_new_syn_on_a_closed_flow_is_judged_again(ct):
    run(ct, [frame(A, B, 6, 1, 80, flags=SYN)])
    run(ct, [frame(B, A, 6, 80, 1, flags=RST)])
    assert run(ct, [frame(A, B, 6, 1, 80, flags=SYN)], commit_new=False) == [NEW]
    assert ct.stats()["reopened"] == 1


def test_lone_rst_opens_nothing(ct):
    run(ct, [frame(A, B, 6, 1, 80, flags=RST)])
    assert ct.count() == 0


def test_table_is_bounded_and_evictions_counted(clock):
    ct = ConnTrack(capacity=64, clock=clock)
    frames = [frame(A, B, 17, 1000 + i, 53) for i in range(500)]
    for i in range(0, 500, 100):
        run(ct, frames[i:i + 100])
        clock.t += SEC
    stats = ct.stats()
    assert ct.count() <= 64
    assert stats["created"] == 500
    assert stats["evicted"] >= 500 - 64
    # The most recent flows are the ones kept.
    assert run(ct, [frame(B, A, 17, 53, 1499)], commit_new=False) == [REPLY]


def test_masked_frames_are_skipped(ct):
    fb = FrameBuffer([frame(A, B, 17, 1, 2), frame(A, B, 17, 3, 4)])
    p = parse_batch(fb.buf, fb.addrs, fb.lens, 2)
    aux = ct.aux(p, 2)
    res, fresh = ct.lookup(p, 2, np.array([True, False]), aux)
    assert list(res) == [NEW, ct_mod.SKIPPED] and fresh == 1


def _judge_denying(dport_denied):
    """A stand-in matcher for the re-check: denies one destination port."""
    def judge(tables, src, dst, proto, dport):
        allowed = np.asarray(dport) != dport_denied
        n = len(allowed)
        return SimpleNamespace(allowed=allowed, egress=np.full(n, -2, np.int32),
                               ingress=np.where(allowed, 0, -1).astype(np.int32))
    return judge


def test_recheck_cuts_flows_the_new_revision_denies(ct):
    run(ct, [frame(A, B, 6, 1, 80), frame(A, B, 6, 2, 443), frame(A6, B6, 17, 3, 80)])
    tables = SimpleNamespace(revision=2)
    killed = ct.recheck(tables, _judge_denying(80))
    assert killed == 2
    assert [(f["dport"], f["revision"]) for f in ct.flows()] == [(443, 2)]
    assert run(ct, [frame(B, A, 6, 80, 1, flags=SYNACK)], commit_new=False) == [NEW]
    assert run(ct, [frame(B, A, 6, 443, 2, flags=SYNACK)]) == [REPLY]
    assert ct.stats()["killed"] == 2


def test_flows_dump_is_json_able_and_limited(ct):
    import json
    run(ct, [frame(A, B, 17, i, 53) for i in range(10)])
    assert len(ct.flows(limit=3)) == 3
    json.dumps(ct.flows())
