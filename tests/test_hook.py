"""The hook's decisions, frame by frame, with BPF_PROG_RUN (nothing attached): rule S12
for ARP, neighbour discovery and other non-IP frames, rule S10 for the node's traffic,
and the flow cache — revisions, idle timeouts, TCP and SCTP endings, ICMP echo
direction, eviction.  "drop" here is what goes to userspace when no socket waits
(the hook hands the frame to its slot, which is empty): every miss ends there, so
a frame the cache has not admitted never passes.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests import netns_util as nu
from tests.frames import arp_request, frame, mac_bytes

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not nu.is_root(), reason="BPF needs root")]

from fastpath import kernel as K  # noqa: E402

POD, PEER, NODE = "198.18.40.1", "198.18.40.2", "198.18.40.254"
POD_MAC, OTHER_MAC = "02:00:00:00:40:01", "02:00:00:00:40:09"
ZONE = 4711
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


@pytest.fixture
def kern():
    k = K.Kernel(None, flow_capacity=64)
    k.set_pod(ZONE, [POD], mac_bytes(POD_MAC), ready=True, isolated=False)
    k.set_node_addrs([NODE])
    k.set_config(5, K.DEFAULT_TIMEOUTS)
    yield k
    k.close()


def out(src=POD, dst=PEER, proto=6, sport=40000, dport=80, **kw) -> bytes:
    return frame(src, dst, proto, sport, dport, src_mac=POD_MAC, **kw)


def key(pod_port=40000, peer_port=80, proto=6, peer=PEER, initiator=0) -> np.ndarray:
    k = np.zeros(1, dtype=K.FLOW_KEY)
    k["zone"], k["proto"], k["pod_port"], k["peer_port"] = ZONE, proto, pod_port, peer_port
    k["pod_addr"][0] = np.frombuffer(K.addr16(POD), np.uint8)
    k["peer_addr"][0] = np.frombuffer(K.addr16(peer), np.uint8)
    k["initiator"] = initiator
    return k


def admit(kern, k: np.ndarray, revision=5, state=0, opener=K.EGRESS) -> None:
    v = np.zeros(1, dtype=K.FLOW)
    v["revision"], v["state"], v["opener"] = revision, state, opener
    v["created_ns"] = v["last_ns"] = K.now_ns()
    kern.update(k, v)


def arp_reply(sender_mac: str, sender_ip: str, eth_src: str | None = None) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac_bytes(sender_mac),
                       bytes(map(int, sender_ip.split("."))), b"\xff" * 6, bytes(4))
    return (b"\xff" * 6 + mac_bytes(eth_src or sender_mac) + b"\x08\x06" + body).ljust(60, b"\0")


def test_arp_from_the_pod_must_carry_its_own_addresses(kern):
    run = lambda f, role=K.EGRESS: kern.test_run(f, ZONE, role)  # noqa: E731
    assert run(arp_request(POD_MAC, POD, PEER)) == "pass"
    assert run(arp_request(POD_MAC, "0.0.0.0", POD)) == "pass"            # a probe
    assert run(arp_reply(POD_MAC, PEER)) == "drop"                          # claims the neighbour's IP
    assert run(arp_reply(OTHER_MAC, POD)) == "drop"                         # not the pod's MAC
    assert run(arp_reply(POD_MAC, POD, eth_src=OTHER_MAC)) == "drop"        # sender is not the source
    assert run(arp_reply(OTHER_MAC, PEER), K.INGRESS) == "pass"             # into the pod: its own business
    assert kern.kstats()["drop_arp"] == 3


def test_non_ip_frames_only_for_pods_isolated_in_no_direction(kern):
    lldp = (b"\x01\x80\xc2\x00\x00\x0e" + mac_bytes(POD_MAC) + b"\x88\xb5").ljust(60, b"\0")
    assert kern.test_run(lldp, ZONE, K.EGRESS) == "pass"
    kern.set_pod(ZONE, [POD], mac_bytes(POD_MAC), ready=True, isolated=True)
    assert kern.test_run(lldp, ZONE, K.EGRESS) == "drop"
    assert kern.test_run(lldp, ZONE, K.INGRESS) == "drop"
    kern.set_pod(ZONE, [POD], mac_bytes(POD_MAC), ready=False, isolated=False)
    assert kern.test_run(lldp, ZONE, K.EGRESS) == "drop"  # not known yet: fail closed


def test_the_nodes_own_traffic_always_passes(kern):
    assert kern.test_run(out(dst=NODE), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(frame(NODE, POD, 6, 1, 8080), ZONE, K.INGRESS) == "pass"
    assert kern.test_run(out(), ZONE, K.EGRESS) == "drop"  # anyone else: judged first
    assert kern.kstats()["pass_node"] == 2


def test_a_cached_flow_passes_only_under_the_revision_in_force(kern):
    admit(kern, key())
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(frame(PEER, POD, 6, 80, 40000, flags=ACK), ZONE, K.INGRESS) == "pass"  # reply
    kern.set_config(6, K.DEFAULT_TIMEOUTS)  # new tables: every flow goes to be judged again
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "drop"
    admit(kern, key(), revision=6)
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "pass"
    kern.set_config(0, K.DEFAULT_TIMEOUTS)  # no tables (a daemon's first start): nothing cached passes
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "drop"


def test_counters_follow_both_directions(kern):
    admit(kern, key())
    for _ in range(3):
        assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(frame(PEER, POD, 6, 80, 40000, flags=ACK), ZONE, K.INGRESS) == "pass"
    vals, found = kern.lookup(key())
    assert found[0] and vals["packets"][0].tolist() == [3, 1]
    assert vals["state"][0] == K.STATES.index("tcp_established")  # the responder spoke


def test_spoofed_sources_and_idle_flows_are_never_passed(kern):
    admit(kern, key())
    assert kern.test_run(out(src="198.18.40.3", flags=ACK), ZONE, K.EGRESS) == "drop"
    short = dict(K.DEFAULT_TIMEOUTS, tcp_opening=0.000001)
    kern.set_config(5, short)
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "drop"


def test_tcp_endings_and_a_new_connection_on_the_same_tuple(kern):
    admit(kern, key(), state=K.STATES.index("tcp_established"))
    assert kern.test_run(out(flags=FIN | ACK), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(frame(PEER, POD, 6, 80, 40000, flags=FIN | ACK), ZONE, K.INGRESS) == "pass"
    vals, _ = kern.lookup(key())
    assert vals["state"][0] == K.STATES.index("tcp_closed")
    assert kern.test_run(out(flags=SYN), ZONE, K.EGRESS) == "drop"  # judged again, as new
    admit(kern, key(), state=K.STATES.index("tcp_established"))
    assert kern.test_run(out(flags=RST), ZONE, K.EGRESS) == "pass"
    vals, _ = kern.lookup(key())
    assert vals["state"][0] == K.STATES.index("tcp_closed")


def test_an_echo_request_from_the_other_side_is_a_new_flow(kern):
    admit(kern, key(pod_port=7, peer_port=7, proto=1, initiator=0))  # the pod pinged the peer
    assert kern.test_run(out(proto=1, sport=7, dport=7, icmp_type=8), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(frame(PEER, POD, 1, 7, 7, icmp_type=0), ZONE, K.INGRESS) == "pass"
    assert kern.test_run(frame(PEER, POD, 1, 7, 7, icmp_type=8), ZONE, K.INGRESS) == "drop"


def test_a_full_cache_evicts_and_an_evicted_flow_is_judged_again(kern):
    for port in range(200):
        admit(kern, key(pod_port=10000 + port))
    keys, _ = kern.dump()
    assert len(keys) <= 64  # the map's bound
    kept = set(keys["pod_port"].tolist())
    gone = [p for p in range(10000, 10200) if p not in kept]
    assert gone
    for port in gone[:20]:
        assert kern.test_run(out(sport=port, flags=ACK), ZONE, K.EGRESS) == "drop"
    for port in list(kept)[:5]:
        assert kern.test_run(out(sport=port, flags=ACK), ZONE, K.EGRESS) == "pass"


def test_mld_reports_behind_a_hop_by_hop_header_are_checked_in_the_kernel(kern):
    """A listener report (ICMPv6 143 behind a router-alert hop-by-hop header) from the
    pod's link-local address passes; one from an address that is not the pod's does not."""
    def mld(src: str) -> bytes:
        import ipaddress
        hbh = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # next: ICMPv6; router alert
        icmp = bytes([143, 0, 0, 0, 0, 0, 0, 1]) + bytes([4, 0, 0, 0]) + ipaddress.IPv6Address("ff02::1:3").packed
        body = hbh + icmp
        ip6 = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([0, 1]) + \
            ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address("ff02::16").packed
        return b"\x33\x33\x00\x00\x00\x16" + mac_bytes(POD_MAC) + b"\x86\xdd" + ip6 + body
    assert kern.test_run(mld("fe80::1"), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(mld("2001:db8::66"), ZONE, K.EGRESS) == "drop"
    assert kern.kstats()["pass_nd"] == 1 and kern.kstats()["drop_nd"] == 1


# -- flow classes: a new flow of a class userspace admitted passes without it ----------

def admit_class(kern, peer_port=80, pod_port=0, proto=6, role=K.EGRESS, revision=5, rules=(3, -2)):
    k = key(pod_port=pod_port, peer_port=peer_port, proto=proto)
    k["kind"] = K.CLASS_KINDS[role]
    v = np.zeros(1, dtype=K.FLOW)
    v["revision"], v["opener"] = revision, role
    v["state"] = {6: 0, 17: K.STATES.index("udp"), 132: K.STATES.index("sctp_opening")}.get(proto, 10)
    v["rule_egress"], v["rule_ingress"] = rules
    v["created_ns"] = v["last_ns"] = K.now_ns()
    kern.update(k, v, K.CLASSES)
    return k


@pytest.fixture
def judged(kern):
    """The hook's socket slot holds a socket: the daemon is there."""
    with nu.socket_in_slot(kern, 0):
        yield kern


def test_a_new_flow_of_an_admitted_class_is_recorded_and_passes(judged):
    kern = judged
    ck = admit_class(kern)
    assert kern.test_run(out(sport=41000, flags=SYN), ZONE, K.EGRESS) == "pass"
    vals, found = kern.lookup(key(pod_port=41000))
    assert found[0]
    v = vals[0]
    assert (int(v["revision"]), int(v["rule_egress"]), int(v["rule_ingress"])) == (5, 3, -2)
    assert int(v["opener"]) == K.EGRESS and int(v["state"]) == K.STATES.index("tcp_opening")
    assert v["packets"].tolist() == [1, 0] and v["bytes"][0] == 60
    assert kern.test_run(frame(PEER, POD, 6, 80, 41000, flags=SYN | ACK), ZONE, K.INGRESS) == "pass"  # its reply
    assert kern.lookup(ck, K.CLASSES)[0]["packets"][0].tolist() == [1, 0]  # flows it admitted
    assert kern.kstats()["pass_class"] == 1 and kern.kstats()["pass_flow"] == 1


def test_a_class_admits_nothing_else(judged):
    kern = judged
    admit_class(kern)
    assert kern.test_run(out(sport=41001, dport=81), ZONE, K.EGRESS) == "redirect"             # another port
    assert kern.test_run(out(proto=17, sport=41001), ZONE, K.EGRESS) == "redirect"             # another protocol
    assert kern.test_run(out(dst="198.18.40.3", sport=41001), ZONE, K.EGRESS) == "redirect"    # another peer
    assert kern.test_run(frame(PEER, POD, 6, 41001, 80), ZONE, K.INGRESS) == "redirect"        # the other end
    assert kern.test_run(out(src="198.18.40.3", sport=41001), ZONE, K.EGRESS) == "redirect"    # spoofed source
    assert kern.kstats()["pass_class"] == 0
    assert not kern.lookup(key(pod_port=41001))[1][0]


def test_a_class_admits_only_under_the_revision_in_force_and_while_enabled(judged):
    kern = judged
    admit_class(kern, revision=4)
    assert kern.test_run(out(sport=41000), ZONE, K.EGRESS) == "redirect"
    admit_class(kern, revision=5)
    kern.set_config(5, K.DEFAULT_TIMEOUTS, classes=False)
    assert kern.test_run(out(sport=41001), ZONE, K.EGRESS) == "redirect"
    kern.set_config(5, dict(K.DEFAULT_TIMEOUTS, tcp_opening=0.000001))  # the class idle too long
    assert kern.test_run(out(sport=41002), ZONE, K.EGRESS) == "redirect"
    kern.set_config(5, K.DEFAULT_TIMEOUTS)
    assert kern.test_run(out(sport=41003), ZONE, K.EGRESS) == "pass"


def test_a_flow_already_cached_is_never_taken_over_by_its_class(judged):
    kern = judged
    """An entry of an older revision (or a closed connection) is userspace's to re-judge;
    the class does not overwrite it."""
    admit_class(kern)
    admit(kern, key(), revision=4)
    assert kern.test_run(out(flags=ACK), ZONE, K.EGRESS) == "redirect"
    assert int(kern.lookup(key())[0]["revision"][0]) == 4


def test_classes_are_for_tcp_udp_and_sctp_first_packets_only(judged):
    kern = judged
    admit_class(kern, proto=1, peer_port=7)
    assert kern.test_run(out(proto=1, sport=7, dport=7, icmp_type=8), ZONE, K.EGRESS) == "redirect"
    admit_class(kern, proto=17, peer_port=53)
    udp = bytearray(out(proto=17, sport=41000, dport=53))
    assert kern.test_run(bytes(udp), ZONE, K.EGRESS) == "pass"
    udp[20:22] = (0x0001).to_bytes(2, "big")  # a later fragment: no ports to match a class by
    assert kern.test_run(bytes(udp), ZONE, K.EGRESS) == "redirect"
    admit_class(kern, proto=132, peer_port=9)
    assert kern.test_run(out(proto=132, sport=41000, dport=9), ZONE, K.EGRESS) == "pass"


def test_an_ingress_class_admits_new_flows_the_peer_opens(judged):
    kern = judged
    admit_class(kern, peer_port=0, pod_port=8080, role=K.INGRESS, rules=(7, 9))
    assert kern.test_run(frame(PEER, POD, 6, 5555, 8080), ZONE, K.INGRESS) == "pass"
    vals, found = kern.lookup(key(pod_port=8080, peer_port=5555))
    assert found[0] and int(vals["opener"][0]) == K.INGRESS and int(vals["rule_ingress"][0]) == 9
    assert kern.test_run(out(sport=8080, dport=5555, flags=SYN | ACK), ZONE, K.EGRESS) == "pass"  # its reply
    assert kern.test_run(out(sport=5556, dport=8080), ZONE, K.EGRESS) == "redirect"  # the pod opening: not this class


def test_while_the_daemon_is_away_no_class_admits_anything(kern):
    """No socket in the hook's slot (the daemon killed or stopped): the class stays, but
    a new flow of it is not passed (fail static: only flows admitted before keep going)."""
    admit_class(kern)
    admit(kern, key(pod_port=40500))
    assert kern.test_run(out(sport=41000), ZONE, K.EGRESS) == "drop"
    assert kern.test_run(out(sport=40500, flags=ACK), ZONE, K.EGRESS) == "pass"
    with nu.socket_in_slot(kern, 0):
        assert kern.test_run(out(sport=41001), ZONE, K.EGRESS) == "pass"
    assert kern.test_run(out(sport=41002), ZONE, K.EGRESS) == "drop"
    assert kern.kstats()["pass_class"] == 1
