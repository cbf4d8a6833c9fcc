"""The soak run (``bench/soak.py``) kept from rotting: its manifest writer against the
loader, its memory arithmetic, and — privileged — three churn rounds through real
daemons, with zero disagreements and nothing left behind."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from bench import soak
from control.semantics.manifests import load_clusterset
from tests.worlds import Shape, random_world


def _strip(objs: dict) -> dict:
    return {k: dataclasses.replace(v, source="") for k, v in objs.items()}


def test_written_manifests_load_back_as_the_world(tmp_path):
    """The YAML the soak writes is read by the loader as exactly the random world it
    came from: the daemons and the reference see what the soak means."""
    cfg = soak.SoakConfig(clusters=2, pods_per_cluster=8, policies_per_cluster=12, seed=7)
    world = soak.World(cfg, str(tmp_path / "w"))
    shape = Shape(nodes_per_cluster=cfg.nodes_per_cluster, ineligible=0.0, conflicts=0.0, rejected=0.0)
    want = random_world(cfg.seed, clusters=cfg.clusters, pods_per_cluster=cfg.pods_per_cluster,
                        policies_per_cluster=cfg.policies_per_cluster, shape=shape)
    got, _ = load_clusterset(world.specs, strict=True)
    assert set(got.clusters) == set(want.clusters)
    for name, state in want.clusters.items():
        assert _strip(got.clusters[name].pods) == _strip(state.pods)
        assert _strip(got.clusters[name].policies) == _strip(state.policies)
        assert _strip(got.clusters[name].namespaces) == _strip(state.namespaces)


def test_every_change_changes_what_the_daemons_read(tmp_path):
    """A change that rewrote a file with the same contents would leave the daemons
    nothing to act on, and the soak waiting for a revision that never comes."""
    world = soak.World(soak.SoakConfig(clusters=2, policies_per_cluster=3, seed=5), str(tmp_path / "w"))
    for _ in range(200):
        before = {c: [world._docs(c, k) for k in soak.FILES] for c in world.dirs}
        world.change()
        assert any(before[c] != [world._docs(c, k) for k in soak.FILES] for c in world.dirs)


def test_changes_touch_the_files_and_invalid_policies_fail_closed(tmp_path):
    world = soak.World(soak.SoakConfig(clusters=2, seed=3), str(tmp_path / "w"))
    before = {path: os.stat(path).st_ino for _, d in world.specs for path in (os.path.join(d, f) for f in soak.FILES.values())}
    kinds = set()
    for _ in range(40):
        kinds.add(world.change()[0])
    assert kinds == set(soak.CHANGES)
    after = {path: os.stat(path).st_ino for path in before}
    assert any(before[p] != after[p] for p in before)  # replaced by rename, not rewritten in place
    ref = world.reference()
    stand_ins = {(p.cluster, p.namespace, p.name) for p in ref.policies() if p.rejected}
    assert stand_ins == world.invalid
    assert all(not p.ingress and not p.egress for p in ref.policies() if p.rejected)


def test_memory_growth_compares_first_and_last_third():
    samples = [{"n:daemon": 100, "n:worker": 50}] * 3 + [{"n:daemon": 110, "n:worker": 50}] * 3 + [{"n:daemon": 130, "n:worker": 60}] * 3
    growth = soak.memory_growth(samples)
    assert growth["processes"]["n:daemon"] == {"first_kb": 100, "middle_kb": 110, "last_kb": 130, "growth_kb": 30, "growth_pct": 30.0}
    assert growth["processes"]["n:worker"]["growth_kb"] == 10
    assert growth["total"]["growth_kb"] == 40
    assert growth["max_growth_kb_by_role"] == {"daemon": 30, "worker": 10}
    assert soak.memory_growth(samples[:2])["total"] is None


def test_a_fail_open_is_never_retried():
    """Expected denied, observed allowed: final at once, and nothing is re-probed (a
    retry that happened to be denied must not be able to hide it)."""
    calls = []
    found = soak.compare([False, True, False], [True, False, False], lambda idx: calls.append(idx) or [True] * len(idx))
    assert found.fail_open == [0] and not found.retried and not found.denied
    assert calls == []


def test_only_expected_allow_denied_is_retried_and_counted():
    calls = []
    found = soak.compare([True, True, True, False], [False, False, True, False],
                         lambda idx: calls.append(list(idx)) or [True, False])
    assert calls == [[0, 1]]
    assert (found.fail_open, found.retried, found.denied) == ([], [0], [1])
    with pytest.raises(ValueError, match="2 expected verdicts but 1 observed"):
        soak.compare([True, False], [True], lambda idx: [])
    with pytest.raises(ValueError, match="2 probes retried but 1 verdicts"):
        soak.compare([True, True], [False, False], lambda idx: [True])


def _round_with(tmp_path, monkeypatch, observed):
    """One probe_round over a real World and the reference, with the connections
    replaced by ``observed(want, call)`` (the list of verdicts for that call)."""
    world = soak.World(soak.SoakConfig(clusters=2, pods_per_cluster=6, policies_per_cluster=6, seed=9), str(tmp_path / "w"))
    cset = world.reference()
    pods = sorted(cset.pods(), key=lambda p: p.ref)
    probes = [(a.ref, b.ref, port, proto) for a in pods for b in pods if a is not b for port, proto in ((80, "TCP"), (53, "UDP"))]
    want = [soak.ReferenceEvaluator(cset).allowed(cset.pod(s), cset.pod(d), port, pr) for s, d, port, pr in probes]
    assert any(want) and not all(want)  # both kinds are exercised
    calls: list = []

    def run(state, batch):
        calls.append(batch)
        return observed(want, len(calls), batch)

    monkeypatch.setattr(soak, "run_probes", run)
    monkeypatch.setattr(soak, "explain_on", lambda *a: {"explained": True})
    tally = soak.Tally(rounds=1)
    return world, probes, want, tally, calls


def test_probe_round_fails_the_run_at_once_on_a_fail_open(tmp_path, monkeypatch):
    world, probes, want, tally, calls = _round_with(tmp_path, monkeypatch, lambda want, n, batch: [True] * len(batch))
    with pytest.raises(soak.FailOpen, match="expected denied were allowed"):
        soak.probe_round(world, {}, "", probes, tally, "a change")
    assert len(calls) == 1  # no retry
    assert len(tally.fail_open) == want.count(False) == len(tally.disagreements)
    assert all(r["expected"] is False and r["observed"] is True and r["daemon_explain"] for r in tally.fail_open)
    assert tally.probes["TCP"] + tally.probes["UDP"] == len(probes) and not tally.transient
    assert tally.figures()["fail_open"] == want.count(False)


def test_probe_round_retries_expected_allow_only(tmp_path, monkeypatch):
    # First try: every probe denied; the retry allows every one.
    world, probes, want, tally, calls = _round_with(
        tmp_path, monkeypatch, lambda want, n, batch: [n > 1] * len(batch))
    found = soak.probe_round(world, {}, "", probes, tally, "a change")
    assert len(calls) == 2 and calls[1] == [p for p, w in zip(probes, want) if w]
    assert len(found.retried) == want.count(True) == len(tally.transient)
    assert not tally.disagreements and not tally.fail_open


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, XDP, AF_XDP")
def test_three_churn_rounds_agree_with_the_reference(tmp_path):
    prefix = f"mcnpt-{os.getpid()}-soak-"
    cfg = soak.SoakConfig(minutes=2.0, rounds=3, clusters=2, pods_per_cluster=6, probes_per_round=30, seed=11,
                          prefix=prefix, state_dir=str(tmp_path / "testbed"))
    lines: list[str] = []
    try:
        result = soak.soak(cfg, log=lines.append)
    finally:
        leftover = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                    if n.startswith(prefix)]
    assert not leftover, f"the soak left network namespaces behind: {leftover}"
    report = "\n".join(lines) + "\n" + soak.summary(result)
    assert result["rounds"] == 3 and result["changes"]["total"] == 3, report
    assert result["probes"]["total"] == 90 and result["probes"]["TCP"] and result["probes"]["UDP"], report
    assert result["disagreements"] == 0 and result["fail_open"] == 0, report
    assert not result["changes"]["not_applied"], report
    assert result["memory"]["samples"] == 4 and result["memory"]["total"] is not None, report
    assert result["teardown_ok"] and result["ok"], report
