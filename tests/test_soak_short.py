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
    assert result["disagreements"] == 0, report
    assert not result["changes"]["not_applied"], report
    assert result["memory"]["samples"] == 4 and result["memory"]["total"] is not None, report
    assert result["teardown_ok"] and result["ok"], report
