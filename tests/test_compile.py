"""The compiled tables as a value: hand-over through a buffer, immutability, what the
rule ids name, address conflicts (rule M8), local endpoints, and incremental updates
giving the same answers as a full compile."""

from __future__ import annotations

import ipaddress
import random

import numpy as np
import pytest

from control.compile.compiler import Compiler, compile_tables
from fastpath import match
from fastpath.tables import DENIED, NOT_ENFORCED, PolicyTables, ip_keys
from tests.builders import make_clusterset, make_namespace, make_policy, make_pod, peer_pods
from tests.worlds import random_packets, random_world


def everything(pod) -> bool:
    return True


def judge_one(tables, src, dst, proto=6, port=80):
    j = match.judge(tables, ip_keys([src]), ip_keys([dst]), np.array([proto], np.uint8), np.array([port], np.uint16))
    return bool(j.allowed[0]), int(j.egress[0]), int(j.ingress[0])


def same_answers(a: PolicyTables, b: PolicyTables, packets) -> None:
    src, dst, proto, dport, _ = packets
    ja, jb = match.judge(a, src, dst, proto, dport), match.judge(b, src, dst, proto, dport)
    assert (ja.allowed == jb.allowed).all()
    assert [a.rule(int(r)) for r in ja.egress] == [b.rule(int(r)) for r in jb.egress]
    assert [a.rule(int(r)) for r in ja.ingress] == [b.rule(int(r)) for r in jb.ingress]
    assert ((ja.egress < 0) == (jb.egress < 0)).all() and ((ja.ingress < 0) == (jb.ingress < 0)).all()
    assert (ja.egress[ja.egress < 0] == jb.egress[jb.egress < 0]).all()


def test_pack_unpack_is_zero_copy_and_judges_alike():
    cset = random_world(3, clusters=2, pods_per_cluster=60, policies_per_cluster=20)
    tables = compile_tables(cset, everything, revision=42)
    header, buf = tables.pack()
    back = PolicyTables.unpack(header, buf)
    assert back.revision == 42 and back.rules == tables.rules
    for name, arr in tables.arrays.items():
        assert np.array_equal(back.arrays[name], arr), name
        if arr.size:
            assert np.shares_memory(back.arrays[name], np.frombuffer(buf, np.uint8)), name
    packets = random_packets(cset, 500, seed=1)
    same_answers(tables, back, packets)


def test_tables_are_read_only():
    tables = compile_tables(random_world(1, clusters=1, pods_per_cluster=10, policies_per_cluster=3), everything, 1)
    with pytest.raises(ValueError):
        tables.arrays["eg_cell"][0, 0] = 5


def _two_clusters_sharing_an_ip():
    pol = make_policy("x", "allow", {}, ingress=[
        {"from": [peer_pods(app="a")]},
        {"from": [{"ipBlock": {"cidr": "198.18.9.0/24"}}], "ports": [{"port": 81}]},
    ])
    return make_clusterset({
        "c1": [make_namespace("x"), make_pod("x", "server", "198.18.1.1", {"app": "s"}), make_pod("x", "a", "198.18.9.9", {"app": "a"}), pol],
        "c2": [make_namespace("x"), make_pod("x", "a", "198.18.9.9", {"app": "a"})],
    })


def test_an_ip_two_pods_claim_is_an_unknown_address():
    cset = _two_clusters_sharing_an_ip()
    tables = compile_tables(cset, everything, 1)
    assert tables.meta["conflicted_ips"] == 1
    # The selector peer cannot match an address nobody owns alone...
    assert judge_one(tables, "198.18.9.9", "198.18.1.1", port=80)[0] is False
    # ...but the ipBlock still can (rules M6, M8).
    allowed, egress, ingress = judge_one(tables, "198.18.9.9", "198.18.1.1", port=81)
    assert allowed and egress == NOT_ENFORCED
    assert tables.rules[ingress] == {"policy": "c1/x/allow", "direction": "Ingress", "rule": 1, "peer": 0, "port": 0}


def test_local_endpoints_and_sides_judged():
    cset = _two_clusters_sharing_an_ip()
    tables = compile_tables(cset, lambda p: p.name == "server", 1)
    assert tables.local_endpoint_ips() == {"198.18.1.1"}
    # The server is local: its ingress is judged. Traffic towards a non-local pod is
    # judged by nobody here.
    assert judge_one(tables, "198.18.1.1", "198.18.9.9")[1:] == (NOT_ENFORCED, NOT_ENFORCED)
    assert judge_one(tables, "203.0.113.1", "198.18.1.1")[2] == DENIED


def test_rule_ids_name_policy_rule_peer_and_port():
    cset = random_world(5, clusters=2, pods_per_cluster=40, policies_per_cluster=10)
    tables = compile_tables(cset, everything, 1)
    refs = {p.ref: p for p in cset.policies()}
    for rule in tables.rules:
        assert set(rule) == {"policy", "direction", "rule", "peer", "port"}
        policy = refs[rule["policy"]]
        r = policy.rules(rule["direction"])[rule["rule"]]
        assert (rule["peer"] is None) == (not r.peers) and (rule["port"] is None) == (not r.ports)


def test_malformed_batches_get_a_verdict():
    tables = compile_tables(random_world(2, clusters=1, pods_per_cluster=10, policies_per_cluster=4), everything, 1)
    empty = match.judge(tables, np.zeros((0, 16), np.uint8), np.zeros((0, 16), np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint16))
    assert empty.allowed.shape == (0,)
    j = match.judge(tables, np.full((1, 16), 255, np.uint8), np.zeros((1, 16), np.uint8), np.array([255], np.uint8), np.array([65535], np.uint16))
    assert j.allowed.shape == (1,)


def test_empty_clusterset_compiles():
    tables = compile_tables(make_clusterset({}), everything, 0)
    assert judge_one(tables, "198.18.0.1", "198.18.0.2") == (True, NOT_ENFORCED, NOT_ENFORCED)


def test_ipv6_blocks_do_not_contain_ipv4_addresses():
    pol = make_policy("x", "v6", {}, ingress=[{"from": [{"ipBlock": {"cidr": "::/0"}}]}])
    cset = make_clusterset({"c1": [make_namespace("x"), make_pod("x", "s", "198.18.1.1"), pol]})
    tables = compile_tables(cset, everything, 1)
    assert judge_one(tables, "198.18.7.7", "198.18.1.1")[0] is False
    assert judge_one(tables, ipaddress.ip_address("2001:db8::5"), "198.18.1.1")[0] is True


# --------------------------------------------------------------------------- incremental


def mutate(cset, rng, count: int) -> list[str]:
    """Random pod changes of the kinds the incremental path handles; returns refs."""
    import dataclasses

    from tests.worlds import LABELS

    refs = []
    for _ in range(count):
        cname = rng.choice(sorted(cset.clusters))
        state = cset.clusters[cname]
        key = rng.choice(sorted(state.pods))
        pod = state.pods[key]
        what = rng.choice(("labels", "labels", "remove", "add", "phase", "ip", "ports", "forge"))
        if what == "labels":
            labels = {k: rng.choice(v) for k, v in LABELS.items() if rng.random() < 0.6}
            pod = dataclasses.replace(pod, labels=labels)
        elif what == "forge":
            pod = dataclasses.replace(pod, labels={**pod.labels, "networking.k8s.io/multicluster-name": rng.choice(sorted(cset.clusters))})
        elif what == "remove":
            del state.pods[key]
            refs.append(pod.ref)
            continue
        elif what == "add":
            pod = dataclasses.replace(pod, name=f"{pod.name}-copy{rng.randrange(10**6)}",
                                      ips=(ipaddress.ip_address("198.19.0.0") + rng.randrange(60000),))
        elif what == "phase":
            pod = dataclasses.replace(pod, phase=rng.choice(("Running", "Succeeded", "Pending")))
        elif what == "ip":
            other = rng.choice(list(cset.pods()))
            pod = dataclasses.replace(pod, ips=other.ips or pod.ips)
        else:
            pod = dataclasses.replace(pod, ports=tuple(reversed(pod.ports)))
        state.pods[(pod.namespace, pod.name)] = pod
        refs.append(pod.ref)
    return refs


def packets_touching(cset, refs, rng):
    """Flows from and to the changed pods (to and from every other pod)."""
    from tests.worlds import PORTS

    changed = [ip for r in refs if (p := cset.pod(r)) is not None for ip in p.ips]
    others = [ip for p in cset.pods() for ip in p.ips]
    flows = []
    for a in changed:
        for b in others:
            proto = rng.choice((6, 6, 17, 132, 1))
            port = rng.choice(PORTS) if proto != 1 else 0
            flows += [(a, b, proto, port), (b, a, proto, port)]
    if not flows:
        flows = [(others[0], others[-1], 6, 80)]
    return (ip_keys([f[0] for f in flows]), ip_keys([f[1] for f in flows]),
            np.array([f[2] for f in flows], np.uint8), np.array([f[3] for f in flows], np.uint16), flows)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_pod_changes_match_a_full_compile(seed):
    rng = random.Random(seed)
    cset = random_world(seed, clusters=3, pods_per_cluster=60, policies_per_cluster=15)

    def local(p):
        return p.cluster == "cluster-1" or p.node == "cluster-2-node-0"

    compiler = Compiler(cset, local)
    for step in range(8):
        refs = mutate(cset, rng, rng.choice((1, 1, 3)))
        compiler.pods_changed(cset, refs)
        got = compiler.tables(step)
        want = compile_tables(cset, local, step)
        same_answers(got, want, random_packets(cset, 400, seed=step))
        same_answers(got, want, packets_touching(cset, refs, rng))
        assert got.local_endpoint_ips() == want.local_endpoint_ips()
    assert compiler.full_compiles >= 1


def test_a_label_change_is_incremental():
    import dataclasses

    cset = random_world(9, clusters=2, pods_per_cluster=80, policies_per_cluster=20)
    compiler = Compiler(cset, everything)
    state = cset.clusters["cluster-1"]
    key, pod = sorted(state.pods.items())[3]
    state.pods[key] = dataclasses.replace(pod, labels={"app": "zz-new"})
    compiler.pods_changed(cset, [pod.ref])
    assert compiler.full_compiles == 1 and compiler.incremental_changes == 1
    same_answers(compiler.tables(2), compile_tables(cset, everything, 2), random_packets(cset, 500, seed=3))
    same_answers(compiler.tables(2), compile_tables(cset, everything, 2), packets_touching(cset, [pod.ref], random.Random(1)))


def test_address_hash_finds_every_key_and_only_those():
    from fastpath.tables import build_ip_hash, ip_hash

    rng = np.random.default_rng(1)
    keys = ip_keys([ipaddress.ip_address("198.18.0.0") + int(i) for i in rng.choice(1 << 17, 3000, replace=False)])
    keys = np.vstack([keys, ip_keys([ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("::")])])
    slots = np.arange(len(keys), dtype=np.int32) + 7
    hkeys, hslot = build_ip_hash(keys, slots)
    cap = len(hslot)
    assert cap & (cap - 1) == 0 and (hslot < 0).sum() >= cap // 2
    bits = cap.bit_length() - 1

    def lookup(key):
        h = int(ip_hash(key.reshape(1, 16), bits)[0])
        while hslot[h] >= 0:
            if (hkeys[h] == key).all():
                return int(hslot[h])
            h = (h + 1) & (cap - 1)
        return None

    assert [lookup(k) for k in keys] == slots.tolist()
    assert lookup(ip_keys(["198.19.255.255"])[0]) is None


# --------------------------------------------------------------------------- incremental policy changes


def mutate_policies(cset, rng, count: int, namespaces_too: bool = True) -> tuple[set, set]:
    """Random policy and namespace changes: policies added, removed, rewritten (same
    name, new rules, maybe new types), namespaces relabelled. Returns (policy refs,
    namespace keys) that changed."""
    import dataclasses

    from tests.worlds import NS_LABELS, Shape, _Gen

    gen = _Gen(rng.randrange(2**32), Shape(clusters=len(cset.clusters)), cset.options)
    policies, namespaces = set(), set()
    for _ in range(count):
        cname = rng.choice(sorted(cset.clusters))
        state = cset.clusters[cname]
        what = rng.choice(("add", "add", "remove", "rewrite", "rewrite") + (("namespace",) if namespaces_too else ()))
        if what == "namespace" and state.namespaces:
            ns = state.namespaces[rng.choice(sorted(state.namespaces))]
            labels = {k: v for k, v in ns.labels.items() if k == "kubernetes.io/metadata.name"}
            labels.update({k: rng.choice(v) for k, v in NS_LABELS.items() if rng.random() < 0.6})
            state.namespaces[ns.name] = dataclasses.replace(ns, labels=labels)
            namespaces.add((cname, ns.name))
        elif what == "remove" and state.policies:
            key = rng.choice(sorted(state.policies))
            policies.add(state.policies.pop(key).ref)
        elif what == "rewrite" and state.policies:
            key = rng.choice(sorted(state.policies))
            fresh = gen.policy(cname, 0)
            state.policies[key] = dataclasses.replace(fresh, namespace=key[0], name=key[1])
            policies.add(state.policies[key].ref)
        else:
            fresh = gen.policy(cname, 0)
            fresh = dataclasses.replace(fresh, name=f"new-{rng.randrange(10**6)}")
            state.policies[(fresh.namespace, fresh.name)] = fresh
            policies.add(fresh.ref)
    return policies, namespaces


class _Changes:
    """What ``control.node.store.Changes`` carries, for driving ``Compiler.update``."""

    def __init__(self, pods=(), namespaces=(), policies=(), everything=False):
        self.pods, self.namespaces, self.policies, self.everything = set(pods), set(namespaces), set(policies), everything


def _local(p) -> bool:
    return p.cluster == "cluster-1" and p.node in ("cluster-1-node-0", "cluster-1-node-1")


def _check_same(compiler, cset, clusters, step, rng, refs=()):
    got = compiler.tables(step)
    want = compile_tables(cset, _local, step, clusters=clusters)
    same_answers(got, want, random_packets(cset, 300, seed=step))
    if refs:
        same_answers(got, want, packets_touching(cset, refs, rng))
    assert got.local_endpoint_ips() == want.local_endpoint_ips()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.lists(st.sampled_from(("pods", "policies", "namespaces", "mixed")), min_size=1, max_size=6),
       enforce_local_only=st.booleans())
def test_incremental_changes_of_every_kind_match_a_full_compile(seed, steps, enforce_local_only):
    """Random sequences of pod, policy and namespace changes: after each, the
    incrementally followed tables judge random flows (and flows touching the changed
    pods) exactly as a fresh full compile does, naming the same rules."""
    rng = random.Random(seed)
    cset = random_world(seed, clusters=3, pods_per_cluster=25, policies_per_cluster=8,
                        shape=__import__("tests.worlds", fromlist=["Shape"]).Shape(nodes_per_cluster=2))
    clusters = {"cluster-1"} if enforce_local_only else None
    compiler = Compiler(cset, _local, clusters=clusters)
    for step, kind in enumerate(steps, start=2):
        pods = mutate(cset, rng, rng.choice((1, 2))) if kind in ("pods", "mixed") else []
        policies, namespaces = set(), set()
        if kind != "pods":
            policies, namespaces = mutate_policies(cset, rng, rng.choice((1, 2, 3)), namespaces_too=kind == "namespaces")
        path = compiler.update(cset, _Changes(pods, namespaces, policies))
        PATHS[path] = PATHS.get(path, 0) + 1
        _check_same(compiler, cset, clusters, step, rng, pods)


PATHS: dict[str, int] = {}


def test_a_policy_change_is_incremental():
    import dataclasses

    cset = random_world(4, clusters=2, pods_per_cluster=80, policies_per_cluster=20)
    compiler = Compiler(cset, _local, clusters={"cluster-1"})
    state = cset.clusters["cluster-1"]
    key, pol = sorted(state.policies.items())[2]
    # The same policy with its rules reversed and another name: new rule order, same blocks.
    added = dataclasses.replace(pol, name="added", ingress=tuple(reversed(pol.ingress)), egress=tuple(reversed(pol.egress)))
    state.policies[("x", "added")] = dataclasses.replace(added, namespace="x")
    del state.policies[key]
    path = compiler.update(cset, _Changes(policies={pol.ref, f"cluster-1/x/added"}))
    assert path == "incremental" and compiler.full_compiles == 1
    _check_same(compiler, cset, {"cluster-1"}, 2, random.Random(1))


def test_a_remote_policy_change_leaves_the_tables_alone():
    cset = random_world(6, clusters=2, pods_per_cluster=40, policies_per_cluster=10)
    compiler = Compiler(cset, _local, clusters={"cluster-1"})
    before = compiler.tables(1)
    state = cset.clusters["cluster-2"]
    gone = state.policies.pop(sorted(state.policies)[0])
    assert compiler.update(cset, _Changes(policies={gone.ref})) == "none"
    assert compiler.full_compiles == 1 and compiler.incremental_changes == 0
    after = compile_tables(cset, _local, 2, clusters={"cluster-1"})
    same_answers(before, after, random_packets(cset, 500, seed=2))


def test_policies_of_clusters_not_enforced_do_not_reach_the_tables():
    cset = random_world(8, clusters=3, pods_per_cluster=40, policies_per_cluster=10)
    tables = compile_tables(cset, _local, 1, clusters={"cluster-1"})
    assert tables.rules and {r["policy"].split("/")[0] for r in tables.rules} == {"cluster-1"}
    # Judged alike with or without them: only cluster-1's pods are local.
    same_answers(tables, compile_tables(cset, _local, 1), random_packets(cset, 800, seed=4))


def test_a_changed_policy_keeps_its_named_ports_when_tried_before_older_rules():
    """A policy changed incrementally is appended, so its rules get ids above those of
    policies tried after it (by name). A class trying the changed policy's named-port
    rule first must still resolve that named port on the destination."""
    import dataclasses

    from control.semantics import objects

    def policy_a(selector):
        return make_policy("x", "a", selector, egress=[{"ports": [{"protocol": "SCTP", "port": "metrics"}]}], types=["Egress"])

    cset = make_clusterset({"c1": [
        make_namespace("x"),
        make_pod("x", "client", "198.18.1.1", {"app": "c"}),
        make_pod("x", "server", "198.18.1.2", {"app": "s"}, [("metrics", 9090, "SCTP")]),
        policy_a({}),
        make_policy("x", "b", {}, egress=[{"ports": [{"protocol": "SCTP", "port": 80}]}], types=["Egress"]),
    ]})
    compiler = Compiler(cset, everything)
    assert judge_one(compiler.tables(1), "198.18.1.1", "198.18.1.2", proto=132, port=9090)[0] is True
    # The same meaning under another selector: "a" is removed and appended.
    changed = objects.network_policy(policy_a({"matchExpressions": [{"key": "app", "operator": "Exists"}]}), "c1", "test")
    cset.clusters["c1"].policies[("x", "a")] = changed
    assert compiler.update(cset, _Changes(policies={"c1/x/a"})) == "incremental"
    got, want = compiler.tables(2), compile_tables(cset, everything, 2)
    allowed, egress, _ = judge_one(got, "198.18.1.1", "198.18.1.2", proto=132, port=9090)
    assert allowed and got.rules[egress] == {"policy": "c1/x/a", "direction": "Egress", "rule": 0, "peer": None, "port": 0}
    assert judge_one(got, "198.18.1.1", "198.18.1.2", proto=132, port=80)[0] is True
    same_answers(got, want, packets_touching(cset, ["c1/x/client", "c1/x/server"], random.Random(2)))


def test_one_peer_column_evaluation_serves_every_compile_path():
    """``peer_column`` is the one evaluation of a peer: address intervals first, then
    pods. An ipBlock matches intervals and the pods whose address falls in it (rule
    M6); a selector peer matches pods only, within the policy's cluster (rule M4)."""
    from control.compile.selection import AddressSpace, PodIndex, peer_column, policy_ip_blocks

    cset = make_clusterset({
        "c1": [make_namespace("x"), make_pod("x", "a", "198.18.0.1", {"app": "a"}), make_pod("x", "b", "198.18.1.1", {"app": "b"}),
               make_policy("x", "p", {}, ingress=[{"from": [{"ipBlock": {"cidr": "198.18.1.0/24"}}, {"podSelector": {"matchLabels": {"app": "a"}}}]}])],
        "c2": [make_namespace("x"), make_pod("x", "a", "198.18.2.1", {"app": "a"})],
    })
    policy = cset.clusters["c1"].policies[("x", "p")]
    pods = list(cset.pods())
    index = PodIndex(cset, pods)
    space = AddressSpace(policy_ip_blocks(policy))
    has_ip = np.ones(len(pods), dtype=bool)
    pod_interval = space.interval_of(ip_keys([p.ip for p in pods]))
    block_peer, selector_peer = policy.ingress[0].peers
    by_block = peer_column(index, space, pod_interval, has_ip, policy, block_peer)
    by_selector = peer_column(index, space, pod_interval, has_ip, policy, selector_peer)
    assert len(by_block) == space.size + len(pods) == len(by_selector)
    assert by_block[: space.size].sum() == 1 and not by_selector[: space.size].any()
    refs = [p.ref for p in pods]
    assert [r for r, hit in zip(refs, by_block[space.size:]) if hit] == ["c1/x/b"]
    assert [r for r, hit in zip(refs, by_selector[space.size:]) if hit] == ["c1/x/a"]
