"""Compiler cost: cold compile, one pod's label change, and the size of the tables.

World: 10,002 pods in 3 clusters with 1,000 (and 10,000) policies, compiled for one
node of cluster-1 (bench/conftest.py).

* cold — ``compile_tables`` from a ClusterSet. Baseline in the same run: reading every
  pod's effective labels once (the least any compiler must do); ratio printed.
  Target ≤ 1 s at 1,000 policies.
* label change — ``Compiler.pods_changed`` for one pod whose labels changed, plus
  ``Compiler.tables`` (new tables in hand), alternating local and remote pods.
  Baseline: a full compile of the same world. Target ≤ 50 ms.
* policy change — ``Compiler.update`` for one local policy added, rewritten or removed
  (random rules, as the world's), plus ``Compiler.tables``, compiling only
  cluster-1's policies as the daemon does; the share that fell back to a full compile
  (a new ipBlock boundary or named port) is printed. Baseline: a full compile.
* memory — ``PolicyTables.nbytes``. Target ≤ 256 MiB.

Every timing is reported as mean and median with its spread (standard deviation,
interquartile range, minimum and maximum, number of rounds), never as the minimum
alone; ratios use the median. Rounds are independent: cold compiles only read their world; the change
benchmarks work on a private world (never the one other benchmarks share), and
each round's setup (untimed) undoes the previous round's change — in the world and
in the compiler — so every measured change starts from the same world. At the end the
compiler, with the last change undone, must judge the world's flows as a fresh compile
of the untouched world does, which proves the undo restored it.

Run: ``.venv/bin/python -m pytest bench/bench_compile.py --benchmark-only -s``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
import time

import numpy as np
import pytest

from bench.conftest import flow_batches, local_node, private_world, report, world, world_for
from control.compile.compiler import Compiler, compile_tables
from fastpath import match
from tests.worlds import LABELS

CLUSTER = "cluster-1"
CHANGE_ROUNDS = 30


def spread(benchmark) -> dict:
    """Mean, median and spread of the measured rounds, in seconds."""
    st = benchmark.stats.stats
    return {"mean_s": st.mean, "median_s": st.median, "stddev_s": st.stddev if st.rounds > 1 else 0.0,
            "iqr_s": st.iqr, "min_s": st.min, "max_s": st.max, "rounds": st.rounds}


def _ms(figures: dict) -> dict:
    """``spread`` in milliseconds, for the printed line."""
    return {k.replace("_s", "_ms"): v * 1e3 for k, v in figures.items() if k.endswith("_s")} | {"rounds": figures["rounds"]}


def _touch_labels(cset) -> float:
    start = time.perf_counter()
    for pod in cset.pods():
        dict(cset.effective_pod_labels(pod))
    return time.perf_counter() - start


def assert_same_verdicts(got, want, policies: int = 1000, batches: int = 64) -> None:
    """``got`` and ``want`` tables admit the same flows by the same rules (over
    ``batches`` batches of the world's flows): the undone changes left nothing behind."""
    for src, dst, proto, dport in flow_batches(policies, 1024)[:batches]:
        a, b = match.judge(got, src, dst, proto, dport), match.judge(want, src, dst, proto, dport)
        assert np.array_equal(a.allowed, b.allowed), "verdicts differ after undoing every change"
        for name in ("egress", "ingress"):
            ra, rb = getattr(a, name), getattr(b, name)
            assert [got.rule(int(i)) for i in ra] == [want.rule(int(i)) for i in rb], f"{name} rules differ"


@pytest.mark.parametrize("policies", (1000, 10000))
def test_cold_compile(benchmark, policies):
    cset = world(policies)  # only read: every round compiles the same world from nothing
    rounds = 5 if policies <= 1000 else 3
    tables = benchmark.pedantic(compile_tables, args=(cset, local_node, 1), rounds=rounds, iterations=1)
    base = statistics.median(_touch_labels(cset) for _ in range(3))
    figures = spread(benchmark)
    benchmark.extra_info.update(baseline_seconds=base, ratio=figures["median_s"] / base, **tables.meta)
    report("cold compile", policies=policies, **_ms(figures), label_pass_ms=base * 1e3,
           ratio=figures["median_s"] / base, mib=tables.nbytes / 2**20)


def test_label_change(benchmark):
    cset = private_world(1000)
    compiler = Compiler(cset, local_node)
    rng = random.Random(5)
    state = cset.clusters[CLUSTER]
    local = [k for k, p in state.pods.items() if local_node(p) and p.can_take_part]
    remote = [k for k, p in state.pods.items() if not local_node(p) and p.can_take_part]
    turn = itertools.cycle((local, remote))
    revision = itertools.count(2)
    last: list = []  # (key, pod before the change) of the round just measured

    def undo():
        if last:
            key, pod = last.pop()
            state.pods[key] = pod
            compiler.pods_changed(cset, [pod.ref])

    def change():
        undo()
        key = rng.choice(next(turn))
        pod = state.pods[key]
        last.append((key, pod))
        state.pods[key] = dataclasses.replace(pod, labels={k: rng.choice(v) for k, v in LABELS.items() if rng.random() < 0.6})
        return (pod.ref,), {}

    def apply(ref):
        compiler.pods_changed(cset, [ref])
        return compiler.tables(next(revision))

    benchmark.pedantic(apply, setup=change, rounds=CHANGE_ROUNDS, iterations=1)
    full_compiles = compiler.full_compiles - 1
    undo()
    assert_same_verdicts(compiler.tables(next(revision)), world_for(1000)[1])
    full = world_for(1000)[2]
    figures = spread(benchmark)
    benchmark.extra_info.update(full_compile_seconds=full, speedup=full / figures["median_s"],
                                full_compiles_during=full_compiles)
    report("pod label change", **_ms(figures), full_compile_ms=full * 1e3, speedup=full / figures["median_s"],
           full_compiles_during=full_compiles)


@pytest.mark.parametrize("policies", (1000, 10000))
def test_table_memory(benchmark, policies):
    _, tables, _ = world_for(policies)
    header, buf = benchmark.pedantic(tables.pack, rounds=3, iterations=1)
    assert len(buf) >= tables.nbytes
    figures = spread(benchmark)
    benchmark.extra_info.update(bytes=tables.nbytes, **tables.meta)
    report("table memory", policies=policies, mib=tables.nbytes / 2**20, pack_mean_ms=figures["mean_s"] * 1e3,
           pack_median_ms=figures["median_s"] * 1e3, rules=len(tables.rules))


class _PolicyChange:
    """What ``control.node.store.Changes`` carries for one policy."""

    def __init__(self, ref: str):
        self.pods, self.namespaces, self.policies, self.everything = set(), set(), {ref}, False


def test_policy_change(benchmark):
    from tests.worlds import Shape, _Gen

    cset = private_world(1000)
    state = cset.clusters[CLUSTER]
    compiler = Compiler(cset, local_node, clusters={CLUSTER})
    pristine = compile_tables(private_world(1000), local_node, 1, clusters={CLUSTER})
    rng = random.Random(11)
    gen = _Gen(12, Shape(clusters=3), cset.options)
    revision = itertools.count(2)
    paths: list[str] = []
    last: list = []  # (key, policy before the change or None when added)

    def undo():
        if last:
            key, pol = last.pop()
            ref = (pol or state.policies[key]).ref
            if pol is None:
                del state.policies[key]
            else:
                state.policies[key] = pol
            compiler.update(cset, _PolicyChange(ref))

    def change():
        undo()
        what = rng.choice(("add", "rewrite", "remove"))
        if what == "add":
            pol = dataclasses.replace(gen.policy(CLUSTER, 0), name=f"bench-{rng.randrange(10**9)}")
            key = (pol.namespace, pol.name)
            last.append((key, None))
            state.policies[key] = pol
        else:
            key = rng.choice(sorted(state.policies))
            pol = state.policies[key]
            last.append((key, pol))
            if what == "remove":
                del state.policies[key]
            else:
                state.policies[key] = dataclasses.replace(gen.policy(CLUSTER, 0), namespace=key[0], name=key[1])
        return (pol.ref,), {}

    def apply(ref):
        paths.append(compiler.update(cset, _PolicyChange(ref)))
        return compiler.tables(next(revision))

    benchmark.pedantic(apply, setup=change, rounds=CHANGE_ROUNDS, iterations=1)
    undo()
    assert_same_verdicts(compiler.tables(next(revision)), pristine)
    full = world_for(1000)[2]
    figures = spread(benchmark)
    benchmark.extra_info.update(full_compile_seconds=full, speedup=full / figures["median_s"],
                                incremental=paths.count("incremental"), full=paths.count("full"))
    report("policy change", **_ms(figures), full_compile_ms=full * 1e3,
           incremental=paths.count("incremental"), full=paths.count("full"))
