"""The compiled engines agree with the reference evaluator (the oracle), on random
worlds (tests/worlds.py) and on every truth table in tests/data.

``judge`` works on addresses, so it is compared in the IP-identity world: an address
exactly one pod (that can take part) owns is that pod, any other address — including
one two pods claim (rule M8) — is a bare IP. ``compiled_matrix`` works on pods and is
compared pair by pair over every pod, eligible or not.
"""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compile.compiler import compile_tables
from control.semantics.manifests import load_clusterset
from control.compile.matrix import compiled_matrix, reference_matrix
from control.semantics.reference import EGRESS, INGRESS, ReferenceEvaluator
from fastpath import match
from fastpath.tables import DENIED, NOT_ENFORCED, PolicyTables
from tests.cases import case_files, load_case, write_case
from tests.worlds import PACKET_PROTOS, random_packets, random_world, worlds

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expected_side(side, judged: bool):
    """What a compiled side must say, from the reference's Side."""
    if not judged or not side.isolated:
        return NOT_ENFORCED, None
    if side.decision is None:
        return DENIED, None
    d = side.decision
    return "rule", {"policy": d.policy, "direction": d.direction, "rule": d.rule, "peer": d.peer, "port": d.port}


def check_judge(cset, tables: PolicyTables, local, packets, engine) -> None:
    """Compiled verdicts against the reference, in the world of addresses the dataplane
    sees (rule M8): an address exactly one pod claims is that pod; one several pods
    claim is a bare address as a peer, but when this node's pods claim it, the subject
    side is still judged as one of them (the first isolated one) — never failing open."""
    src, dst, proto, dport, flows = packets
    got = engine(tables, src, dst, proto, dport)
    ref = ReferenceEvaluator(cset)
    owners: dict = {}
    for p in cset.pods():
        if p.can_take_part:
            for ip in p.ips:
                owners.setdefault(ip, []).append(p)

    def peer(ip):
        o = owners.get(ip, [])
        return o[0] if len(o) == 1 else ip

    def subjects(ip, direction):
        mine = [p for p in owners.get(ip, []) if local(p)]
        if len(owners.get(ip, [])) == 1:
            return mine
        return [p for p in mine if ref.isolating(p, direction)] or mine

    for k, (s_ip, d_ip, pnum, port) in enumerate(flows):
        protocol = PACKET_PROTOS[pnum]
        verdicts = []
        for name, direction, subject_ip, other_ip, value in (
            ("egress", EGRESS, s_ip, d_ip, int(got.egress[k])),
            ("ingress", INGRESS, d_ip, s_ip, int(got.ingress[k])),
        ):
            other = peer(other_ip)
            candidates = subjects(subject_ip, direction) or [None]
            wanted = []
            for subject in candidates:
                if subject is None:
                    wanted.append((NOT_ENFORCED, None, "not judged here"))
                    continue
                side = ref.side(direction, subject, other, other if direction == EGRESS else subject, port, protocol)
                wanted.append((*expected_side(side, True), side.reason))
            where = f"{name} of {s_ip}->{d_ip} {protocol}/{port}: reference says {' or '.join(w[2] for w in wanted)}"
            assert any((value >= 0 and kind == "rule" and tables.rules[value] == rule) or value == kind for kind, rule, _ in wanted), \
                f"{where}; compiled says {value} ({tables.rule(value) if value >= 0 else ''})"
            verdicts.append(value != DENIED)
        assert bool(got.allowed[k]) == all(verdicts)


def everything(pod) -> bool:
    return True


ENGINES = [pytest.param(match.judge_numpy, id="numpy")]
if match.HAVE_C:
    ENGINES.append(pytest.param(match.judge_c, id="c"))


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(cset=worlds(), seed=st.integers(0, 2**16), local_share=st.sampled_from((1.0, 0.5)))
def test_judge_agrees_with_reference(engine, cset, seed, local_share):
    rng = random.Random(seed)
    if local_share == 1.0:
        local = everything
    else:
        chosen = {p.ref for p in cset.pods() if rng.random() < local_share}
        local = lambda p: p.ref in chosen  # noqa: E731
    tables = compile_tables(cset, local, revision=seed)
    check_judge(cset, tables, local, random_packets(cset, 300, seed), engine)


@SETTINGS
@given(cset=worlds(), port=st.sampled_from((80, 81, 53, 443, 9090, 8085)), protocol=st.sampled_from(("TCP", "UDP", "SCTP")))
def test_matrix_agrees_with_reference(cset, port, protocol):
    pods = list(cset.pods())
    got = compiled_matrix(cset, pods, pods, port, protocol)
    want = reference_matrix(cset, pods, pods, port, protocol)
    assert got.shape == (len(pods), len(pods))
    bad = np.argwhere(got != want)
    assert not len(bad), [(pods[i].ref, pods[j].ref, bool(want[i, j])) for i, j in bad[:5]]


def test_matrix_on_a_subset_of_sources_and_destinations():
    cset = random_world(7, clusters=2, pods_per_cluster=40, policies_per_cluster=15)
    pods = list(cset.pods())
    sources, destinations = pods[::3], pods[1::2]
    for protocol in ("TCP", "UDP"):
        got = compiled_matrix(cset, sources, destinations, 80, protocol)
        assert (got == reference_matrix(cset, sources, destinations, 80, protocol)).all()


def test_judge_on_a_medium_world_with_node_local_endpoints():
    cset = random_world(11, clusters=3, pods_per_cluster=150, policies_per_cluster=40)

    def local(p):
        return p.cluster == "cluster-1" and p.node in ("cluster-1-node-0", "cluster-1-node-1")

    tables = compile_tables(cset, local, revision=1)
    check_judge(cset, tables, local, random_packets(cset, 3000, 5), match.judge)


# --------------------------------------------------------------------------- truth tables

CASES = case_files("netpol-e2e") + case_files("multicluster")


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.rsplit("/", 1)[-1][:-5])
def test_truth_table(path):
    case = load_case(path)
    with tempfile.TemporaryDirectory() as d:
        cset, _ = load_clusterset(write_case(case, d))
    pods = list(cset.pods())
    at = {p.ref: i for i, p in enumerate(pods)}
    groups: dict = {}
    for probe in case["probes"]:
        groups.setdefault((probe["port"], probe["protocol"]), []).append(probe)
    tables = compile_tables(cset, everything, revision=1)
    for (port, protocol), probes in groups.items():
        got = compiled_matrix(cset, pods, pods, port, protocol)
        for probe in probes:
            assert got[at[probe["from"]], at[probe["to"]]] == probe["expect"], probe
        # The dataplane tables give the same answers (every pod IP is unique here).
        src = np.stack([np.frombuffer(_key(cset.pod(p["from"]).ip), np.uint8) for p in probes])
        dst = np.stack([np.frombuffer(_key(cset.pod(p["to"]).ip), np.uint8) for p in probes])
        proto = np.full(len(probes), {"TCP": 6, "UDP": 17, "SCTP": 132}[protocol], np.uint8)
        j = match.judge(tables, src, dst, proto, np.full(len(probes), port, np.uint16))
        assert j.allowed.tolist() == [p["expect"] for p in probes]


def _key(ip):
    from fastpath.tables import ip_key

    return ip_key(ip)


def test_truth_tables_are_present():
    assert len(CASES) >= 30
