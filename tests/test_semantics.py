"""One test (or a few) per rule of docs/semantics.md, on the reference evaluator.

Worlds are built with the builders in ``tests/builders.py`` through the real parser.
"""

import ipaddress

import pytest

from control.semantics.model import MC_KEY, Options
from control.semantics.reference import ReferenceEvaluator, resolve_endpoint
from tests.builders import make_clusterset, make_namespace, make_pod, make_policy, peer_ns, peer_pods

WEB = [("http", 80, "TCP"), ("dns", 53, "UDP"), ("sig", 7000, "SCTP")]


def world(policies_c1=(), policies_c2=(), options=Options(), extra_c1=(), extra_c2=()):
    c1 = [
        make_namespace("x", team="a"),
        make_namespace("y", team="b"),
        make_pod("x", "a", "198.18.1.1", {"app": "a"}, WEB),
        make_pod("x", "b", "198.18.1.2", {"app": "b"}, WEB),
        make_pod("y", "a", "198.18.1.3", {"app": "a"}, WEB),
        *extra_c1,
        *policies_c1,
    ]
    c2 = [
        make_namespace("x", team="a"),
        make_namespace("z", team="c"),
        make_pod("x", "a", "198.18.2.1", {"app": "a"}, [("http", 8080, "TCP")]),
        make_pod("z", "a", "198.18.2.2", {"app": "a"}, WEB),
        *extra_c2,
        *policies_c2,
    ]
    return make_clusterset({"c1": c1, "c2": c2}, options)


def allowed(cset, src, dst, port=80, proto="TCP"):
    ev = ReferenceEvaluator(cset)
    return ev.allowed(resolve_endpoint(cset, src), resolve_endpoint(cset, dst), port, proto)


# --------------------------------------------------------------------------- S1, S2


def test_s1_unisolated_pods_allow_everything():
    cset = world()
    assert allowed(cset, "c1/x/a", "c1/y/a") and allowed(cset, "c1/y/a", "c2/z/a", 9, "UDP")


def test_s1_isolation_by_any_selecting_policy_and_rules_are_a_union():
    deny = make_policy("x", "deny", {}, ingress=[])
    allow_b = make_policy("x", "allow-b", {"matchLabels": {"app": "a"}}, ingress=[{"from": [peer_pods(app="b")]}])
    cset = world([deny, allow_b])
    assert allowed(cset, "c1/x/b", "c1/x/a")  # one rule of one policy suffices
    assert not allowed(cset, "c1/y/a", "c1/x/a")
    assert not allowed(cset, "c1/x/a", "c1/x/b")  # x/b isolated by deny only


def test_s2_policy_types_omitted():
    # no policyTypes and an egress list: both directions isolated
    both = make_policy("x", "p", {"matchLabels": {"app": "a"}}, egress=[{"to": [peer_pods(app="b")]}])
    cset = world([both])
    ev = ReferenceEvaluator(cset)
    assert cset.clusters["c1"].policies[("x", "p")].types == {"Ingress", "Egress"}
    assert not allowed(cset, "c1/x/b", "c1/x/a")  # ingress isolated, no ingress rules
    assert allowed(cset, "c1/x/a", "c1/x/b") and not allowed(cset, "c1/x/a", "c1/y/a")
    # no egress list: ingress only
    only_in = make_policy("x", "q", {}, ingress=[{}])
    assert world([only_in]).clusters["c1"].policies[("x", "q")].types == {"Ingress"}
    # policyTypes: [] means omitted
    empty = make_policy("x", "r", {}, types=[])
    assert world([empty]).clusters["c1"].policies[("x", "r")].types == {"Ingress"}
    assert ev.isolating(cset.pod("c1/x/a"), "Egress")


def test_s2_egress_only_policy_leaves_ingress_open():
    p = make_policy("x", "p", {}, egress=[], types=["Egress"])
    cset = world([p])
    assert allowed(cset, "c1/y/a", "c1/x/a") and not allowed(cset, "c1/x/a", "c1/y/a")


# --------------------------------------------------------------------------- S3


def test_s3_empty_from_matches_every_peer_and_empty_ports_every_protocol():
    p = make_policy("x", "p", {}, ingress=[{}])
    cset = world([p])
    for proto in ("TCP", "UDP", "SCTP"):
        assert allowed(cset, "c1/x/b", "c1/x/a", 4242, proto)
    assert allowed(cset, "c1/y/a", "c1/x/a", 4242, "SCTP")
    ev = ReferenceEvaluator(cset)
    # ICMP has no port; a port-less rule admits it too
    assert ev.allowed(cset.pod("c1/y/a"), cset.pod("c1/x/a"), 0, "ICMP")


def test_s3_empty_rule_from_admits_other_clusters_too():
    # `from` missing matches every peer — every source, whatever its cluster
    cset = world([make_policy("x", "p", {}, ingress=[{}])])
    assert allowed(cset, "c2/z/a", "c1/x/a")


def test_s3_ingress_empty_list_isolates_and_admits_nothing():
    cset = world([make_policy("x", "p", {}, ingress=[])])
    assert not allowed(cset, "c1/x/b", "c1/x/a") and not allowed(cset, "c1/x/a", "c1/x/a")


def test_s3_port_default_protocol_is_tcp_and_port_range():
    p = make_policy("x", "p", {}, ingress=[{"ports": [{"port": 80}, {"protocol": "UDP", "port": 1000, "endPort": 1010}, {"protocol": "SCTP"}]}])
    cset = world([p])
    assert allowed(cset, "c1/y/a", "c1/x/a", 80, "TCP")
    assert not allowed(cset, "c1/y/a", "c1/x/a", 80, "UDP")
    assert allowed(cset, "c1/y/a", "c1/x/a", 1000, "UDP") and allowed(cset, "c1/y/a", "c1/x/a", 1010, "UDP")
    assert not allowed(cset, "c1/y/a", "c1/x/a", 1011, "UDP") and not allowed(cset, "c1/y/a", "c1/x/a", 999, "UDP")
    assert allowed(cset, "c1/y/a", "c1/x/a", 1, "SCTP") and allowed(cset, "c1/y/a", "c1/x/a", 65535, "SCTP")
    assert not ReferenceEvaluator(cset).allowed(cset.pod("c1/y/a"), cset.pod("c1/x/a"), 0, "ICMP")


# --------------------------------------------------------------------------- S4


def test_s4_named_port_resolves_against_destination_for_ingress_and_egress():
    ing = make_policy("x", "in", {}, ingress=[{"ports": [{"port": "http"}]}])
    cset = world([ing])
    assert allowed(cset, "c1/y/a", "c1/x/a", 80) and not allowed(cset, "c1/y/a", "c1/x/a", 8080)
    eg = make_policy("x", "eg", {}, egress=[{"ports": [{"port": "http"}]}], types=["Egress"])
    cset = world([eg])
    # destination c2/x/a names its http port 8080: it is resolved there, not at the source
    assert allowed(cset, "c1/x/a", "c2/x/a", 8080) and not allowed(cset, "c1/x/a", "c2/x/a", 80)
    assert allowed(cset, "c1/x/a", "c1/y/a", 80)


def test_s4_named_port_protocol_must_match():
    p = make_policy("x", "p", {}, ingress=[{"ports": [{"port": "dns", "protocol": "TCP"}]}])
    cset = world([p])
    assert not allowed(cset, "c1/y/a", "c1/x/a", 53, "TCP") and not allowed(cset, "c1/y/a", "c1/x/a", 53, "UDP")
    p = make_policy("x", "p", {}, ingress=[{"ports": [{"port": "dns", "protocol": "UDP"}]}])
    assert allowed(world([p]), "c1/y/a", "c1/x/a", 53, "UDP")


# --------------------------------------------------------------------------- S5


def test_s5_peer_forms():
    pods_only = make_policy("x", "p", {}, ingress=[{"from": [peer_pods(app="a")]}])
    cset = world([pods_only])
    assert allowed(cset, "c1/x/a", "c1/x/b") and not allowed(cset, "c1/y/a", "c1/x/b")  # own namespace only
    ns_only = make_policy("x", "p", {}, ingress=[{"from": [peer_ns(team="b")]}])
    cset = world([ns_only])
    assert allowed(cset, "c1/y/a", "c1/x/b") and not allowed(cset, "c1/x/a", "c1/x/b")
    both = make_policy("x", "p", {}, ingress=[{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}])
    cset = world([both])
    assert allowed(cset, "c1/x/b", "c1/x/a") and not allowed(cset, "c1/y/a", "c1/x/a")


@pytest.mark.parametrize(
    "expr,from_y_a",
    [
        ({"key": "app", "operator": "In", "values": ["a", "z"]}, True),
        ({"key": "app", "operator": "NotIn", "values": ["a"]}, False),
        ({"key": "app", "operator": "Exists"}, True),
        ({"key": "app", "operator": "DoesNotExist"}, False),
        ({"key": "missing", "operator": "NotIn", "values": ["v"]}, True),
    ],
)
def test_s5_match_expressions(expr, from_y_a):
    p = make_policy("x", "p", {}, ingress=[{"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [expr]}}]}])
    assert allowed(world([p]), "c1/y/a", "c1/x/a") is from_y_a


def test_s5_namespaces_carry_their_name_label():
    p = make_policy("x", "p", {}, ingress=[{"from": [peer_ns(**{"kubernetes.io/metadata.name": "y"})]}])
    assert allowed(world([p]), "c1/y/a", "c1/x/a")


def test_s5_ipblock_with_except_also_matches_pod_ips():
    p = make_policy("x", "p", {}, ingress=[{"from": [{"ipBlock": {"cidr": "198.18.1.0/24", "except": ["198.18.1.3/32"]}}]}])
    cset = world([p])
    assert allowed(cset, "c1/x/b", "c1/x/a") and not allowed(cset, "c1/y/a", "c1/x/a")
    ev = ReferenceEvaluator(cset)
    assert ev.allowed(ipaddress.ip_address("198.18.1.200"), cset.pod("c1/x/a"), 80, "TCP")
    assert not ev.allowed(ipaddress.ip_address("198.19.0.1"), cset.pod("c1/x/a"), 80, "TCP")


# --------------------------------------------------------------------------- S7, S8


def test_s7_self_traffic_is_judged_like_any_pair():
    p = make_policy("x", "p", {"matchLabels": {"app": "a"}}, ingress=[{"from": [peer_pods(app="b")]}])
    cset = world([p])
    assert not allowed(cset, "c1/x/a", "c1/x/a")


def test_s8_pods_that_cannot_take_part():
    def host_net(o):
        o["spec"]["hostNetwork"] = True

    def done(o):
        o["status"]["phase"] = "Succeeded"

    extra = [make_pod("x", "h", "198.18.1.50", {"app": "b"}, [], host_net), make_pod("x", "d", "198.18.1.51", {"app": "b"}, [], done)]
    p = make_policy("x", "p", {}, ingress=[{"from": [peer_pods(app="b")]}])
    cset = world([p], extra_c1=extra)
    ev = ReferenceEvaluator(cset)
    # not selected: a hostNetwork pod is not isolated by the namespace-wide policy
    assert not ev.isolating(cset.pod("c1/x/h"), "Ingress")
    # not matched as a peer: only its IP is known, as an address
    assert not ev.allowed(cset.pod("c1/x/h"), cset.pod("c1/x/a"), 80, "TCP")
    assert resolve_endpoint(cset, "198.18.1.50") == ipaddress.ip_address("198.18.1.50")
    assert not cset.pod("c1/x/d").can_take_part


def test_s8_named_port_towards_non_pod_matches_nothing():
    p = make_policy("x", "p", {}, egress=[{"ports": [{"port": "http"}]}], types=["Egress"])
    cset = world([p])
    ev = ReferenceEvaluator(cset)
    assert not ev.allowed(cset.pod("c1/x/a"), ipaddress.ip_address("198.18.9.9"), 80, "TCP")


# --------------------------------------------------------------------------- M2–M8


pytestmark_mc = pytest.mark.MultiClusterNetworkPolicyLabelExtensions


@pytestmark_mc
def test_m4_peer_without_key_stays_in_own_cluster():
    p = make_policy("x", "p", {}, ingress=[{"from": [peer_ns(team="c")]}])
    cset = world(policies_c2=[p])
    assert allowed(cset, "c2/z/a", "c2/x/a") and not allowed(cset, "c1/y/a", "c2/x/a")


@pytestmark_mc
@pytest.mark.parametrize(
    "expr,from_c1,from_c2",
    [
        ({"key": MC_KEY, "operator": "In", "values": ["c1"]}, True, False),
        ({"key": MC_KEY, "operator": "NotIn", "values": ["c1"]}, False, True),
        ({"key": MC_KEY, "operator": "Exists"}, True, True),
        ({"key": MC_KEY, "operator": "DoesNotExist"}, False, False),
    ],
)
def test_m4_key_operators_in_namespace_selector(expr, from_c1, from_c2):
    p = make_policy("x", "p", {}, ingress=[{"from": [{"namespaceSelector": {"matchExpressions": [expr]}}]}])
    cset = world(policies_c2=[p])
    assert allowed(cset, "c1/y/a", "c2/x/a") is from_c1
    assert allowed(cset, "c2/z/a", "c2/x/a") is from_c2


@pytestmark_mc
def test_m5_pod_selector_with_key_means_same_namespace_in_each_cluster():
    p = make_policy("x", "p", {}, ingress=[{"from": [{"podSelector": {"matchLabels": {MC_KEY: "c1"}}}]}])
    cset = world(policies_c2=[p])
    assert allowed(cset, "c1/x/a", "c2/x/a") and allowed(cset, "c1/x/b", "c2/x/a")
    assert not allowed(cset, "c1/y/a", "c2/x/a")  # other namespace
    assert not allowed(cset, "c2/z/a", "c2/x/a")  # other cluster


@pytestmark_mc
def test_m5_conflicting_selectors_admit_nothing():
    peer = {"podSelector": {"matchLabels": {MC_KEY: "c1"}}, "namespaceSelector": {"matchLabels": {MC_KEY: "c2"}}}
    cset = world(policies_c2=[make_policy("x", "p", {}, ingress=[{"from": [peer]}])])
    assert not any(allowed(cset, s, "c2/x/a") for s in ("c1/x/a", "c1/y/a", "c2/z/a", "c2/x/a"))


@pytestmark_mc
def test_m2_forged_key_label_is_overridden():
    forged_pod = make_pod("y", "f", "198.18.1.9", {"app": "a", MC_KEY: "c2"})
    forged_ns = make_namespace("y", **{MC_KEY: "c2"})
    p = make_policy("x", "p", {}, ingress=[{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {MC_KEY: "c2"}}}]}])
    cset = world(policies_c2=[p], extra_c1=[forged_pod])
    assert not allowed(cset, "c1/y/f", "c2/x/a")
    assert allowed(cset, "c2/z/a", "c2/x/a")
    q = make_policy("x", "q", {}, ingress=[{"from": [peer_ns(**{MC_KEY: "c2"})]}])
    cset = make_clusterset({"c1": [forged_ns, forged_pod], "c2": [make_pod("x", "a", "198.18.2.1"), q]})
    assert not allowed(cset, "c1/y/f", "c2/x/a")


@pytestmark_mc
def test_m3_cross_cluster_needs_egress_and_ingress():
    eg = make_policy("y", "eg", {}, egress=[{"to": [peer_ns(**{MC_KEY: "c2"})]}], types=["Egress"])
    ing = make_policy("z", "in", {}, ingress=[{"from": [peer_ns(**{MC_KEY: "c1", "kubernetes.io/metadata.name": "x"})]}])
    cset = world([eg], [ing])
    assert not allowed(cset, "c1/y/a", "c2/z/a")  # egress ok, ingress admits only c1/x
    assert allowed(cset, "c1/x/a", "c2/z/a")
    assert not allowed(cset, "c1/y/a", "c1/x/a")  # egress of c1/y only towards c2


@pytestmark_mc
def test_m3_policies_select_only_their_own_cluster():
    p = make_policy("x", "p", {"matchLabels": {MC_KEY: "c1"}}, ingress=[])
    cset = world(policies_c2=[p])
    assert allowed(cset, "c2/z/a", "c2/x/a")  # selects no pod in c2


@pytestmark_mc
def test_m6_ipblock_is_cluster_agnostic():
    p = make_policy("x", "p", {}, ingress=[{"from": [{"ipBlock": {"cidr": "198.18.1.0/24"}}]}])
    cset = world(policies_c2=[p])
    assert allowed(cset, "c1/y/a", "c2/x/a") and not allowed(cset, "c2/z/a", "c2/x/a")


@pytestmark_mc
def test_m7_default_peer_scope_clusterset_and_feature_off():
    p = make_policy("x", "p", {}, ingress=[{"from": [peer_pods(app="a")]}])
    local = world(policies_c2=[p])
    assert not allowed(local, "c1/x/a", "c2/x/a")
    cs = world(policies_c2=[p], options=Options(default_peer_scope="clusterset"))
    assert allowed(cs, "c1/x/a", "c2/x/a") and not allowed(cs, "c1/y/a", "c2/x/a")  # namespace sameness
    q = make_policy("x", "q", {}, ingress=[{"from": [peer_ns(**{MC_KEY: "c1"})]}])
    off = world(policies_c2=[q], options=Options(multicluster=False))
    assert not allowed(off, "c1/y/a", "c2/x/a") and not allowed(off, "c2/z/a", "c2/x/a")


@pytestmark_mc
def test_m8_ip_claimed_by_two_clusters_is_not_a_pod_address():
    dup = make_pod("z", "dup", "198.18.1.1")
    cset = world(extra_c2=[dup])
    assert resolve_endpoint(cset, "198.18.1.1") == ipaddress.ip_address("198.18.1.1")
    assert resolve_endpoint(cset, "c2/z/dup").cluster == "c2"  # by reference, judged as it is


@pytestmark_mc
def test_m4_named_port_on_remote_pod():
    eg = make_policy("x", "eg", {}, egress=[{"to": [peer_ns(**{MC_KEY: "c2"})], "ports": [{"port": "http"}]}], types=["Egress"])
    cset = world([eg])
    assert allowed(cset, "c1/x/a", "c2/x/a", 8080) and not allowed(cset, "c1/x/a", "c2/x/a", 80)
    assert allowed(cset, "c1/x/a", "c2/z/a", 80)


def test_explain_names_the_deciding_rule():
    p = make_policy("x", "p", {}, ingress=[{"from": [peer_ns(team="zz")]}, {"from": [peer_pods(app="b")], "ports": [{"port": 80}]}])
    cset = world([p])
    v = ReferenceEvaluator(cset).evaluate(cset.pod("c1/x/b"), cset.pod("c1/x/a"), 80, "TCP")
    j = v.to_json()
    assert j["allowed"] and j["ingress"]["rule"]["policy"] == "c1/x/p" and j["ingress"]["rule"]["rule"] == "ingress[1]"
    assert j["ingress"]["rule"]["peer"] == 0 and j["ingress"]["rule"]["port"] == 0
    assert j["egress"]["isolated"] is False and j["ingress"]["policies"] == ["c1/x/p"]
