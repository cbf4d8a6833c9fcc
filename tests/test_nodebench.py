"""The node benchmarks' helpers (bench/nodebench.py, bench/nft.py, bench/sendgen.py):
the world they measure admits exactly the measured traffic, the CPU and UDP accounting
read the kernel's tables right, records the report would refuse are refused here, and
the nftables configuration means what the policies mean (checked against the reference
evaluator, and loaded by ``nft`` when root)."""

import ipaddress
import os
import subprocess
import uuid

import numpy as np
import pytest

from bench import nft, sendgen
from bench import nodebench as nb
from control.semantics.manifests import load_clusterset
from control.semantics.reference import ReferenceEvaluator
from tests.builders import make_clusterset, make_pod, make_policy

GEN = f"{nb.CLUSTER}/{nb.NAMESPACE}/{nb.SENDER[0]}"
RECV = f"{nb.CLUSTER}/{nb.NAMESPACE}/{nb.RECEIVER[0]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    nb.write_world(str(d), 50)
    cset, _ = load_clusterset([(nb.CLUSTER, str(d))])
    return cset


def test_world_admits_exactly_the_measured_traffic(world):
    ev = ReferenceEvaluator(world)
    gen, recv = world.pod(GEN), world.pod(RECV)
    assert len(world.clusters[nb.CLUSTER].policies) == 50
    for port, proto in [(nb.ECHO_PORT, "UDP"), (nb.FLOOD_PORT, "UDP"), (nb.IPERF_PORT, "TCP"),
                        (nb.NEW_FLOW_DPORTS[0], "UDP"), (sum(nb.NEW_FLOW_DPORTS) - 1, "UDP")]:
        v = ev.evaluate(gen, recv, port, proto)
        assert v.allowed, (port, proto)
        assert v.egress.decision.policy.endswith(nb.ADMITTING) and v.ingress.decision.policy.endswith(nb.ADMITTING)
    for port, proto in [(sum(nb.NEW_FLOW_DPORTS), "UDP"), (1000, "TCP"), (nb.IPERF_PORT, "UDP"), (80, "TCP")]:
        assert not ev.allowed(gen, recv, port, proto), (port, proto)
    # a filler admits its own peer only
    filler = world.clusters[nb.CLUSTER].policies[(nb.NAMESPACE, "filler-3")]
    assert [str(p.ip_block.cidr) for p in filler.egress[0].peers] == [f"{nb.filler_address(3)}/32"]


@pytest.mark.parametrize("bad", [0, -1, True, "10"])
def test_world_needs_the_admitting_policy(bad):
    with pytest.raises(nb.BenchError, match="policies must be an integer"):
        nb.world_manifests(bad)


def test_filler_addresses_are_distinct_and_bounded():
    addrs = {nb.filler_address(i) for i in range(16384)}
    assert len(addrs) == 16384
    with pytest.raises(nb.BenchError):
        nb.filler_address(16384)


STAT = """cpu  100 0 50 1000 10 0 5 0 0 0
cpu0 60 0 30 400 5 0 3 0 0 0
cpu1 40 0 20 600 5 0 2 0 0 0
intr 12345
"""


def test_cpu_busy_counts_every_cpu_but_idle_and_iowait():
    busy, total = nb.cpu_busy_jiffies(STAT)
    assert busy == (60 + 30 + 3) + (40 + 20 + 2)
    assert total == busy + 400 + 5 + 600 + 5
    with pytest.raises(nb.BenchError, match="no CPU"):
        nb.cpu_busy_jiffies("intr 1\n")


def test_cpu_window_converts_jiffies_to_seconds():
    ticks = os.sysconf("SC_CLK_TCK")
    readings = iter([(0, 0), (3 * ticks, 0)])
    clock = iter([10.0, 12.0])
    with nb.CpuWindow(clock=lambda: next(clock), reader=lambda: next(readings)) as w:
        pass
    assert (w.cpu_s, w.seconds) == (3.0, 2.0)


SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 5 7 2 9 2 0 0 0 0
"""


def test_udp_arrivals_count_delivered_unlistened_and_dropped():
    assert nb.udp_arrivals(text=SNMP) == 5 + 7 + 2
    with pytest.raises(nb.BenchError, match="no Udp counters"):
        nb.udp_arrivals(text="Ip: a\nIp: 1\n")
    with pytest.raises(nb.BenchError, match="NoPorts"):
        nb.udp_arrivals(text="Udp: InDatagrams\nUdp: 1\n")


def test_udp_arrivals_of_this_process():
    assert nb.udp_arrivals(os.getpid()) >= 0


def test_records_are_what_the_report_accepts():
    from bench import report
    w = nb.CpuWindow()
    w.cpu_s, w.seconds = 3.0, 2.0
    recs = [nb.rate_record("udp-1flow", "mcnp", 10, 1, "pps", 900, 1000, w, 2.0),
            nb.record("rtt-established", "cni", 10, 1, "ms", 0.12)]
    assert recs[0]["received"] == 450 and recs[0]["offered"] == 500 and recs[0]["dropped"] == 50
    bench = {"name": "test_node_comparison", "extra_info": {"comparison": {"records": recs}}}
    assert len(report.comparison_records(bench)) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"config": "bridge"}, "unknown configuration"),
    ({"unit": "Mpps"}, "unknown unit"),
    ({"received": float("nan")}, "received"),
    ({"received": -1}, "received"),
    ({"cpu_s": 1.0}, "seconds"),
    ({"cpu_s": 1.0, "seconds": 0}, "seconds"),
])
def test_bad_records_are_refused(kwargs, match):
    args = {"workload": "w", "config": "cni", "policies": 10, "rnd": 1, "unit": "pps", "received": 1.0, **kwargs}
    extra = {k: args.pop(k) for k in ("cpu_s", "seconds") if k in args}
    with pytest.raises(nb.BenchError, match=match):
        nb.record(**args, **extra)


def test_rounds_alternate_the_order():
    assert nb.order(1) == list(nb.CONFIGS)
    assert nb.order(2) == list(reversed(nb.CONFIGS))


def test_percentile_and_iperf_parsing():
    assert nb.percentile([3, 1, 2], 50) == 2
    assert nb.percentile(list(range(101)), 99) == 99
    with pytest.raises(nb.BenchError):
        nb.percentile([], 50)
    assert nb.iperf_gbps({"end": {"sum_received": {"bits_per_second": 2.5e9}}}) == 2.5
    with pytest.raises(nb.BenchError, match="refused"):
        nb.iperf_gbps({"error": "unable to connect: refused"})
    with pytest.raises(nb.BenchError, match="sum_received"):
        nb.iperf_gbps({"end": {}})


def test_settle_waits_for_a_quiet_counter():
    values = iter([1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    assert nb.settle(lambda: next(values), quiet_s=0.1, limit_s=2.0) == 3


def test_new_flow_ports_never_repeat_within_the_span():
    sports, dports = ((10000, 500), (20000, 40))
    s, d = sendgen.port_columns(0, 500 * 40, sports, dports)
    assert len(set(zip(s.tolist(), d.tolist()))) == 500 * 40
    assert s.min() == 10000 and s.max() == 10499 and d.min() == 20000 and d.max() == 20039
    assert s.dtype == np.uint16 and d.dtype == np.uint16


def test_batch_rewrites_ports_in_every_frame():
    from tests.frames import frame
    b = sendgen.Batch(frame("198.18.0.1", "198.18.0.2", 17, 1, 2))
    s, d = sendgen.port_columns(5, sendgen.BATCH, (100, 1000), (200, 10))
    b.set_ports(s, d)
    assert int.from_bytes(bytes(b.buf[7, 34:36]), "big") == 112
    assert int.from_bytes(bytes(b.buf[7, 36:38]), "big") == 200
    assert bytes(b.buf[7, 40:42]) == b"\0\0"
    with pytest.raises(sendgen.SendError):
        sendgen.Batch(b"\0" * 100)


# --------------------------------------------------------------------------- nftables


def _sets(text: str) -> dict[str, str]:
    """set name -> its elements line."""
    out, name = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("set "):
            name, out[line.split()[1]] = line.split()[1], ""
        elif line.startswith("elements") and name:
            out[name] = line
    return out


def test_ruleset_puts_established_first_and_holds_the_allowed_pairs(world):
    text = nft.ruleset(world, [nft.Endpoint(world.pod(GEN), "veth-gen")])
    fwd = text[text.index("chain forward"):]
    assert fwd.index("ct state established,related accept") < fwd.index('iifname "veth-gen" jump egress_0')
    sets = _sets(text)
    assert f"{nb.RECEIVER[2]}/32 . udp . {nb.FLOOD_PORT}" in sets["egress_0_pairs"]
    assert f"{nb.RECEIVER[2]}/32 . udp . 20000-20999" in sets["egress_0_pairs"]
    assert f"{nb.filler_address(7)}/32 . tcp . 1007" in sets["ingress_0_pairs"]
    assert sets["egress_0_addrs"] == ""


def test_ruleset_covers_open_sides_named_ports_and_excepts():
    pods = [make_pod("x", "a", "198.18.1.1", {"app": "a"}, [("web", 8080, "TCP")]),
            make_pod("x", "b", "198.18.1.2", {"app": "b"}, [("web", 9090, "TCP")]),
            make_policy("x", "any-port", {"matchLabels": {"app": "a"}}, types=["Egress"],
                        egress=[{"to": [{"ipBlock": {"cidr": "198.18.0.0/16", "except": ["198.18.1.0/24"]}}]}]),
            make_policy("x", "named", {"matchLabels": {"app": "a"}}, types=["Egress"],
                        egress=[{"to": [{"podSelector": {}}], "ports": [{"port": "web"}]}]),
            make_policy("x", "open-in", {"matchLabels": {"app": "b"}}, types=["Ingress"], ingress=[{}])]
    cset = make_clusterset({"c": pods})
    text = nft.ruleset(cset, [nft.Endpoint(cset.pod("c/x/a"), "va"), nft.Endpoint(cset.pod("c/x/b"), "vb")])
    sets = _sets(text)
    # except carved out; the named port resolved on each destination pod
    assert "198.18.0.0/24" in sets["egress_0_addrs"] and "198.18.1.0/24" not in sets["egress_0_addrs"]
    assert "198.18.1.2/32 . tcp . 9090" in sets["egress_0_pairs"] and "198.18.1.1/32 . tcp . 8080" in sets["egress_0_pairs"]
    # b's ingress admits everything, a's ingress and b's egress are not isolated: no chains
    assert 'oifname "vb"' not in text and 'oifname "va"' not in text and 'iifname "vb"' not in text
    with pytest.raises(nft.NftError, match="interface name"):
        nft.ruleset(cset, [nft.Endpoint(cset.pod("c/x/a"), 'a"b')])


def test_ruleset_elements_agree_with_the_reference_evaluator(world):
    """Every (peer, port) the sets hold for the sender's egress is admitted by the
    reference evaluator, and every port the measured pair uses is in them."""
    ev = ReferenceEvaluator(world)
    gen, recv = world.pod(GEN), world.pod(RECV)
    pairs, addrs = nft.allowed_sets(ev, gen, "Egress", [gen, recv])
    assert not addrs
    for element in pairs:
        net, proto, ports = element.split(" . ")
        first = int(ports.split("-")[0])
        ip = net.split("/")[0]
        dst = recv if ip == nb.RECEIVER[2] else (gen if ip == nb.SENDER[2] else ipaddress.ip_address(ip))
        assert ev.evaluate(gen, dst, first, proto.upper()).egress.allowed, element


@pytest.mark.skipif(os.geteuid() != 0, reason="nft needs CAP_NET_ADMIN in its namespace")
def test_nft_loads_the_ruleset(world):
    ns = f"nbt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft.load(ns, nft.ruleset(world, [nft.Endpoint(world.pod(GEN), "veth-gen"),
                                         nft.Endpoint(world.pod(RECV), "veth-recv")]))
        listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet", nft.TABLE, "ingress_1_pairs"],
                                capture_output=True, text=True, check=True).stdout
        assert f"{nb.SENDER[2]} . udp . {nb.ECHO_PORT}" in listed
        nft.load(ns, nft.ruleset(world, [nft.Endpoint(world.pod(GEN), "veth-gen")]))  # replaced, not added
        tables = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True).stdout
        assert tables.count(nft.TABLE) == 1
        with pytest.raises(nft.NftError, match="nft -f"):
            nft.load(ns, "table inet mcnp_bench { chain c { nonsense } }\n")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
