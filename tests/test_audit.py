"""Audit mode (docs/operations.md, "Audit mode") without a dataplane: the annotation and
the setting, the split compile (enforced tables without the audited policies, audit
tables with every policy), that audit never widens what it does not name (a property
over random worlds), explain and ``/v1/policies``, and the verdict records' names.

World: cluster c1, namespace x, pods a, b, c (app=a/b/c). ``b-in`` (enforced) admits
TCP 80 into b from app=a; ``c-in`` (annotated audit) admits TCP 80 into c from app=a;
``b-try`` (annotated audit) would admit TCP 80 into b from app=c.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.cli import main as cli_main
from control.compile.compiler import Compiler, compile_tables
from control.node.config import Settings, SettingsError
from control.node.daemon import IncrementalCompile
from control.node.store import Changes
from control.node.verdicts import Resolver
from control.semantics import audit, objects
from control.semantics.audit import AuditScope, enforced
from control.semantics.model import AUDIT_ANNOTATION, InvalidObject
from control.semantics.reference import ReferenceEvaluator
from fastpath import match
from fastpath.tables import DENIED, NOT_ENFORCED, ip_keys
from tests.builders import make_clusterset, make_pod, make_policy, peer_pods
from tests.daemon_harness import dir_settings, running
from tests.test_compiled_vs_reference import check_judge
from tests.worlds import random_packets, worlds

IPS = {"a": "198.18.40.1", "b": "198.18.40.2", "c": "198.18.40.3"}


def annotated(obj: dict, value="true") -> dict:
    obj["metadata"]["annotations"] = {AUDIT_ANNOTATION: value}
    return obj


def world_objects() -> list[dict]:
    objs = [make_pod("x", n, ip, {"app": n}, [("http", 80, "TCP")]) for n, ip in IPS.items()]
    port80 = [{"protocol": "TCP", "port": 80}]
    objs.append(make_policy("x", "b-in", {"matchLabels": {"app": "b"}}, ingress=[{"from": [peer_pods(app="a")], "ports": port80}]))
    objs.append(annotated(make_policy("x", "c-in", {"matchLabels": {"app": "c"}},
                                      ingress=[{"from": [peer_pods(app="a")], "ports": port80}])))
    objs.append(annotated(make_policy("x", "b-try", {"matchLabels": {"app": "b"}},
                                      ingress=[{"from": [peer_pods(app="c")], "ports": port80}])))
    return objs


def world():
    return make_clusterset({"c1": world_objects()})


def judge_pairs(tables, pairs):
    src = ip_keys([IPS[s] for s, _ in pairs])
    dst = ip_keys([IPS[d] for _, d in pairs])
    n = len(pairs)
    return match.judge(tables, src, dst, np.full(n, 6, np.uint8), np.full(n, 80, np.uint16))


PAIRS = [("a", "b"), ("c", "b"), ("a", "c"), ("b", "c")]


# --------------------------------------------------------------------------- parsing


def test_the_annotation_is_parsed_strictly():
    base = make_policy("x", "p", {}, ingress=[])
    assert objects.network_policy(base, "c1", "f").audit is False
    assert objects.network_policy(annotated(make_policy("x", "p", {})), "c1", "f").audit is True
    assert objects.network_policy(annotated(make_policy("x", "p", {}), "false"), "c1", "f").audit is False
    for bad in ("yes", "True", True, 1):
        with pytest.raises(InvalidObject) as e:
            objects.network_policy(annotated(make_policy("x", "p", {}), bad), "c1", "f")
        assert e.value.field == f"metadata.annotations[{AUDIT_ANNOTATION}]" and '"true" or "false"' in e.value.message


def test_a_fail_closed_stand_in_is_never_audited_by_its_own_annotation():
    bad = annotated(make_policy("x", "p", {"matchLabels": {"app": "b"}}, ingress=[{"from": [{}]}]))
    with pytest.raises(InvalidObject) as e:
        objects.network_policy(bad, "c1", "f")
    stand_in = dataclasses.replace(objects.fail_closed_policy(bad, "c1", "f", e.value), audit=True)
    assert AuditScope().by(stand_in) is None  # rule S9: an invalid object's word is not taken
    assert AuditScope.parse(["c1/x"]).by(stand_in) == "setting"  # the operator's setting is


def test_audit_scopes_from_flags_and_config_file():
    scope = AuditScope.parse(["c1", "c2/x", "c2/y/p"])
    assert scope.to_json() == {"clusters": ["c1"], "namespaces": ["c2/x"], "policies": ["c2/y/p"]}
    for bad in ("", "c1/", "c1/x/p/q", "C1", "/x"):
        with pytest.raises(ValueError):
            AuditScope.parse([bad])
    mapping = AuditScope.from_mapping({"clusters": ["c1"], "policies": ["c1/x/b-in"]})
    assert mapping.clusters == {"c1"} and mapping.policies == {"c1/x/b-in"} and not mapping.namespaces
    for bad in ({"cluster": ["c1"]}, {"namespaces": ["c1"]}, {"policies": "c1/x/p"}, "c1"):
        with pytest.raises((ValueError, TypeError)):
            AuditScope.from_mapping(bad)


def test_the_audit_setting_merges_file_and_flags_and_names_known_clusters(tmp_path):
    config = tmp_path / "mcnp.yaml"
    config.write_text("node-name: n1\nlocal-cluster: c1\nclusters: {c1: 'dir:/tmp/c1', c2: 'dir:/tmp/c2'}\n"
                      "audit: {namespaces: [c1/x]}\n")
    args = argparse.Namespace(config=str(config), audit=["c2/y/p"], no_dataplane=True)
    s = Settings.from_args(args)
    assert s.audit.namespaces == {"c1/x"} and s.audit.policies == {"c2/y/p"}
    with pytest.raises(SettingsError) as e:
        Settings.from_args(argparse.Namespace(config=str(config), audit=["c3"], no_dataplane=True))
    assert any("cluster 'c3' is not among the --cluster names" in p for p in e.value.problems)
    with pytest.raises(SettingsError) as e:
        Settings.from_args(argparse.Namespace(config=str(config), audit=["c1/x/p/q"], no_dataplane=True))
    assert any(p.startswith("--audit:") for p in e.value.problems)
    config.write_text("node-name: n1\nlocal-cluster: c1\nclusters: {c1: 'dir:/tmp/c1'}\naudit: {clusterz: [c1]}\n")
    with pytest.raises(SettingsError) as e:
        Settings.from_args(argparse.Namespace(config=str(config), audit=[], no_dataplane=True))
    assert any("audit" in p and "clusterz" in p for p in e.value.problems)


# --------------------------------------------------------------------------- compile


def test_enforced_tables_leave_audited_policies_out_and_audit_tables_hold_them():
    cset = world()
    scope = AuditScope()
    on = compile_tables(cset, lambda p: True, 1, audited=scope.covers)
    full = compile_tables(cset, lambda p: True, 1)
    got, whole = judge_pairs(on, PAIRS), judge_pairs(full, PAIRS)
    # a->b admitted by b-in; c->b denied: the audited b-try does not widen b-in
    assert got.allowed.tolist() == [True, False, True, True]
    assert got.ingress[2] == NOT_ENFORCED and got.ingress[3] == NOT_ENFORCED  # c is isolated only in audit
    assert whole.allowed.tolist() == [True, True, True, False]  # full enforcement: b->c denied by c-in
    assert {on.rules[r]["policy"] for r in got.ingress if r >= 0} == {"c1/x/b-in"}
    # the setting does the same for a policy without the annotation
    by_setting = compile_tables(cset, lambda p: True, 1, audited=AuditScope.parse(["c1/x/b-in"]).covers)
    got = judge_pairs(by_setting, [("c", "b"), ("a", "b")])  # b-try is audited too: b is isolated by nothing
    assert got.allowed.tolist() == [True, True] and got.ingress.tolist() == [NOT_ENFORCED, NOT_ENFORCED]
    everything = compile_tables(cset, lambda p: True, 1, audited=AuditScope.parse(["c1"]).covers)
    assert judge_pairs(everything, PAIRS).allowed.all() and not everything.rules


def test_incremental_compiles_follow_a_policy_into_and_out_of_audit():
    cset = world()
    follow = IncrementalCompile(lambda p: True, ["c1"])
    tables, path = follow.follow(cset, Changes(everything=True), 1)
    assert path == "full" and follow.audit_tables is not None and follow.audit_tables.revision == 1
    state = cset.clusters["c1"]
    for k in list(state.policies):  # every policy enforced: no audit compile any more
        state.policies[k] = dataclasses.replace(state.policies[k], audit=False)
    refs = {p.ref for p in state.policies.values()}
    tables, path = follow.follow(cset, Changes(policies=set(refs)), 2)
    assert path != "none" and follow.audit_tables is None and follow.audit_compiler is None
    assert judge_pairs(tables, PAIRS).allowed.tolist() == judge_pairs(compile_tables(cset, lambda p: True, 2), PAIRS).allowed.tolist()
    state.policies[("x", "b-in")] = dataclasses.replace(state.policies[("x", "b-in")], audit=True)
    tables, path = follow.follow(cset, Changes(policies={"c1/x/b-in"}), 3)
    assert follow.audit_tables is not None and tables.revision == follow.audit_tables.revision == 3
    fresh = compile_tables(cset, lambda p: True, 3, audited=AuditScope().covers)
    pairs = PAIRS + [("b", "a"), ("c", "a")]
    assert judge_pairs(tables, pairs).allowed.tolist() == judge_pairs(fresh, pairs).allowed.tolist()
    # b-in in audit, b-try enforced: b admits c, and no longer a
    assert judge_pairs(tables, [("c", "b"), ("a", "b")]).allowed.tolist() == [True, False]
    assert judge_pairs(follow.audit_tables, [("c", "b"), ("a", "b")]).allowed.tolist() == [True, True]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cset=worlds(), seed=st.integers(0, 2**16), share=st.sampled_from((0.3, 0.7)))
def test_audit_never_widens_what_it_does_not_name(cset, seed, share):
    """The enforced tables are exactly the reference evaluator on the world minus the
    audited policies: an enforced policy's verdict is never widened by an audited one,
    and a pod isolated only by audited policies is not isolated."""
    rng = random.Random(seed)
    for state in cset.clusters.values():
        for key, policy in list(state.policies.items()):
            if rng.random() < share:
                state.policies[key] = dataclasses.replace(policy, audit=True)
    scope = AuditScope.parse([f"{c}/{ns}" for c in cset.clusters for ns in ("x",) if rng.random() < 0.3])
    tables = compile_tables(cset, lambda p: True, revision=seed, audited=scope.covers)
    minus = enforced(cset, scope)
    assert not any(scope.covers(p) for p in minus.policies())
    assert len(list(minus.policies())) + sum(scope.covers(p) for p in cset.policies()) == len(list(cset.policies()))
    check_judge(minus, tables, lambda p: True, random_packets(cset, 200, seed), match.judge)


def test_an_incremental_compile_equals_a_fresh_one_with_audit():
    """Compiler.update with a policy put into audit gives what a fresh compile gives."""
    cset = world()
    scope = AuditScope()
    compiler = Compiler(cset, lambda p: True, audited=scope.covers)
    state = cset.clusters["c1"]
    state.policies[("x", "c-in")] = dataclasses.replace(state.policies[("x", "c-in")], audit=False)
    assert compiler.update(cset, Changes(policies={"c1/x/c-in"})) == "incremental"
    pairs = PAIRS + [("c", "a"), ("b", "a")]
    assert judge_pairs(compiler.tables(2), pairs).allowed.tolist() == \
        judge_pairs(compile_tables(cset, lambda p: True, 2, audited=scope.covers), pairs).allowed.tolist()
    assert judge_pairs(compiler.tables(2), [("b", "c")]).allowed.tolist() == [False]


# --------------------------------------------------------------------------- explain


def test_explain_names_the_audited_policies_and_what_enforcement_would_decide():
    cset = world()
    pod = cset.pod
    out = audit.explain(cset, AuditScope(), pod("c1/x/b"), pod("c1/x/c"), 80, "TCP")
    assert out["allowed"] is True and out["would_deny"] is True
    ing = out["ingress"]
    assert ing["isolated"] is False and ing["policies"] == [] and ing["would_deny"] is True
    assert ing["audit_policies"] == ["c1/x/c-in"] and "no rule admits" in ing["audit_reason"]
    assert out["egress"]["would_deny"] is False and out["egress"]["audit_policies"] == []
    denied = audit.explain(cset, AuditScope(), pod("c1/x/c"), pod("c1/x/b"), 80, "TCP")
    assert denied["allowed"] is False and denied["would_deny"] is False
    assert denied["ingress"]["policies"] == ["c1/x/b-in"] and denied["ingress"]["audit_policies"] == ["c1/x/b-try"]
    assert "allowed by c1/x/b-try" in denied["ingress"]["audit_reason"]  # audit would admit: nothing widened
    plain = audit.explain(cset, AuditScope(), pod("c1/x/a"), pod("c1/x/b"), 80, "TCP")
    assert plain == {**plain, "allowed": True, "would_deny": False}
    reference = ReferenceEvaluator(enforced(cset, AuditScope())).evaluate(pod("c1/x/a"), pod("c1/x/b"), 80, "TCP")
    assert plain["ingress"]["reason"] == reference.ingress.reason


@pytest.fixture
def world_dir(tmp_path):
    import yaml

    d = tmp_path / "c1"
    d.mkdir()
    (d / "objects.yaml").write_text(yaml.safe_dump_all(world_objects()))
    return str(d)


def test_mcnp_explain_reports_audit_mode_and_exits_by_the_enforced_verdict(world_dir, capsys):
    base = ["explain", "--cluster", f"c1={world_dir}", "--port", "80", "--protocol", "tcp"]
    assert cli_main(base + ["--from", "c1/x/b", "--to", "c1/x/c"]) == 0
    text = capsys.readouterr().out
    assert "ALLOWED (would be DENIED: policies in audit mode)" in text and "in audit mode: c1/x/c-in; fully enforced: WOULD DENY: " in text
    port81 = [a if a != "80" else "81" for a in base]  # nothing admits it, once b-in is in audit it passes
    assert cli_main(port81 + ["--from", "c1/x/a", "--to", "c1/x/b", "--json"]) == 1
    capsys.readouterr()
    assert cli_main(port81 + ["--from", "c1/x/a", "--to", "c1/x/b", "--json", "--audit", "c1/x/b-in"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["would_deny"] is True and out["ingress"]["audit_policies"] == ["c1/x/b-in", "c1/x/b-try"]
    assert cli_main(base + ["--from", "c1/x/a", "--to", "c1/x/b", "--audit", "c1/x/p/q"]) == 2
    assert "--audit" in capsys.readouterr().err


# --------------------------------------------------------------------------- the daemon


def test_v1_policies_and_v1_explain_say_which_policies_are_in_audit(world_dir):
    async def main():
        settings = dir_settings([("c1", world_dir)], audit=AuditScope.parse(["c1/x/b-in"]))
        async with running(settings) as (daemon, client):
            status, body = await client.get("/v1/policies")
            assert status == 200
            flags = {p["name"]: (p["audit"], p["audit_by"]) for p in body["policies"]}
            assert flags == {"b-in": (True, "setting"), "b-try": (True, "annotation"), "c-in": (True, "annotation")}
            assert body["audit_setting"]["policies"] == ["c1/x/b-in"]
            status, body = await client.get("/v1/explain", **{"from": "c1/x/a", "to": "c1/x/b", "port": 81, "protocol": "TCP"})
            assert status == 200 and body["allowed"] is True and body["would_deny"] is True
            assert body["ingress"]["audit_policies"] == ["c1/x/b-in", "c1/x/b-try"]
            assert daemon.tables.audit_tables is not None  # no dataplane here, but the second compile is made
            assert daemon.tables.audit_tables.revision == daemon.tables.tables.revision

    asyncio.run(main())


def test_a_would_deny_record_names_the_audited_policies_on_the_side_that_would_deny(world_dir):
    from fastpath.counters import REASON

    async def main():
        async with running(dir_settings([("c1", world_dir)])) as (daemon, _):
            row = {"seq": 0, "time_ns": 0, "zone": 1, "src": IPS["b"], "dst": IPS["c"], "sport": 40000, "dport": 80,
                   "proto": 6, "direction": "egress", "allowed": True, "reason": REASON["would_deny"],
                   "rule_egress": NOT_ENFORCED, "rule_ingress": DENIED, "revision": daemon.tables.revision}
            rec = Resolver(daemon.settings.audit).resolve(row, daemon.snapshot)
            assert rec["verdict"] == "would-deny" and rec["side"] == "ingress" and rec["pod"] == "c1/x/b"
            assert rec["policies"] == ["c1/x/c-in"] and rec["audit_policies"] == ["c1/x/c-in"]
            assert rec["policy"] is None
            denied = Resolver().resolve({**row, "src": IPS["c"], "dst": IPS["b"], "allowed": False,
                                         "reason": REASON["denied_ingress"]}, daemon.snapshot)
            # a denial names what enforcement isolates with: b-in, not the audited b-try
            assert denied["verdict"] == "denied" and denied["policies"] == ["c1/x/b-in"]
            assert denied["audit_policies"] == []

    asyncio.run(main())
