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

Run: ``.venv/bin/python -m pytest bench/bench_compile.py --benchmark-only -s``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time

import pytest

from bench.conftest import local_node, report, world, world_for
from control.compile.compiler import Compiler, compile_tables
from tests.worlds import LABELS


def _touch_labels(cset) -> float:
    start = time.perf_counter()
    for pod in cset.pods():
        dict(cset.effective_pod_labels(pod))
    return time.perf_counter() - start


@pytest.mark.parametrize("policies", (1000, 10000))
def test_cold_compile(benchmark, policies):
    cset = world(policies)
    rounds = 3 if policies <= 1000 else 1
    tables = benchmark.pedantic(compile_tables, args=(cset, local_node, 1), rounds=rounds, iterations=1)
    base = min(_touch_labels(cset) for _ in range(3))
    secs = benchmark.stats.stats.min
    benchmark.extra_info.update(seconds=secs, baseline_seconds=base, ratio=secs / base, **tables.meta)
    report("cold compile", policies=policies, seconds=secs, label_pass_seconds=base, ratio=secs / base,
           mib=tables.nbytes / 2**20)


def test_label_change(benchmark):
    cset = world(1000)
    compiler = Compiler(cset, local_node)
    rng = random.Random(5)
    state = cset.clusters["cluster-1"]
    local = [k for k, p in state.pods.items() if local_node(p) and p.can_take_part]
    remote = [k for k, p in state.pods.items() if not local_node(p) and p.can_take_part]
    turn = itertools.cycle((local, remote))
    revision = itertools.count(2)

    def change():
        key = rng.choice(next(turn))
        pod = state.pods[key]
        state.pods[key] = dataclasses.replace(pod, labels={k: rng.choice(v) for k, v in LABELS.items() if rng.random() < 0.6})
        return (pod.ref,), {}

    def apply(ref):
        compiler.pods_changed(cset, [ref])
        return compiler.tables(next(revision))

    benchmark.pedantic(apply, setup=change, rounds=40, iterations=1)
    full = world_for(1000)[2]
    secs = benchmark.stats.stats.mean
    benchmark.extra_info.update(seconds=secs, full_compile_seconds=full, full_compiles=compiler.full_compiles)
    report("pod label change", mean_ms=secs * 1e3, max_ms=benchmark.stats.stats.max * 1e3, full_compile_ms=full * 1e3,
           speedup=full / secs, full_compiles_during=compiler.full_compiles - 1)


@pytest.mark.parametrize("policies", (1000, 10000))
def test_table_memory(benchmark, policies):
    _, tables, _ = world_for(policies)
    header, buf = benchmark.pedantic(tables.pack, rounds=3, iterations=1)
    assert len(buf) >= tables.nbytes
    benchmark.extra_info.update(bytes=tables.nbytes, **tables.meta)
    report("table memory", policies=policies, mib=tables.nbytes / 2**20, pack_ms=benchmark.stats.stats.mean * 1e3,
           rules=len(tables.rules))


class _PolicyChange:
    """What ``control.node.store.Changes`` carries for one policy."""

    def __init__(self, ref: str):
        self.pods, self.namespaces, self.policies, self.everything = set(), set(), {ref}, False


def test_policy_change(benchmark):
    from tests.worlds import Shape, _Gen

    cset = world(1000)
    state = cset.clusters["cluster-1"]
    saved = dict(state.policies)
    compiler = Compiler(cset, local_node, clusters={"cluster-1"})
    rng = random.Random(11)
    gen = _Gen(12, Shape(clusters=3), cset.options)
    revision = itertools.count(2)
    paths = []

    def change():
        what = rng.choice(("add", "rewrite", "remove"))
        if what == "add":
            pol = dataclasses.replace(gen.policy("cluster-1", 0), name=f"bench-{rng.randrange(10**9)}")
            state.policies[(pol.namespace, pol.name)] = pol
        else:
            key = rng.choice(sorted(state.policies))
            pol = state.policies[key]
            if what == "remove":
                del state.policies[key]
            else:
                state.policies[key] = dataclasses.replace(gen.policy("cluster-1", 0), namespace=key[0], name=key[1])
        return (pol.ref,), {}

    def apply(ref):
        paths.append(compiler.update(cset, _PolicyChange(ref)))
        return compiler.tables(next(revision))

    try:
        benchmark.pedantic(apply, setup=change, rounds=40, iterations=1)
    finally:
        state.policies.clear()
        state.policies.update(saved)  # the world is shared with other benchmarks
    full = world_for(1000)[2]
    secs = benchmark.stats.stats
    benchmark.extra_info.update(seconds=secs.mean, median_seconds=secs.median, full_compile_seconds=full,
                                paths={p: paths.count(p) for p in set(paths)})
    report("policy change", median_ms=secs.median * 1e3, mean_ms=secs.mean * 1e3, max_ms=secs.max * 1e3,
           full_compile_ms=full * 1e3, incremental=paths.count("incremental"), full=paths.count("full"))
