"""Batch matcher throughput: lookups per second on one core.

World: 10,002 pods in 3 clusters, 10 / 1,000 / 10,000 policies, compiled for one node
(bench/conftest.py). Flows: ``tests.worlds.random_packets`` — 80% pod addresses, the
rest addresses no pod owns, every protocol. Measured: ``fastpath.match.judge`` (the C
kernel; the numpy fallback at batch 256 for comparison) for batches of 64, 256 and
1,024, with three access patterns side by side:

* hot — one batch judged over and over (``test_lookups``): its few hundred table cells
  stay in L1/L2, the best case and what a single flood of one flow looks like;
* varied — the next of many distinct batches each call (``test_lookups_varied``, a
  pool of 131,072 flows cycled): lookups spread over the whole tables, as many flows
  from many pods do; the tables may stay in the last-level cache;
* cold — a distinct batch after reading twice the largest cache (untimed), at batch
  256 (``test_lookups_cold``): nothing of the tables or the batch is cached, the
  worst case for a first packet after idle time.

Baseline in the same run: the reference evaluator judging the same kind of flows one
by one (a small sample — it is slow), the ratio printed.

Targets: ≥ 5 M lookups/s at 1,000 policies and batch 256 (stretch 10 M); at 10,000
policies ≥ 0.8 × the rate at 10 (also timed in alternation, which a shared machine's
changing load disturbs less, with hot and with varied batches).

Run: ``.venv/bin/python -m pytest bench/bench_match.py --benchmark-only -s``.
"""

from __future__ import annotations

import functools
import itertools
import time

import pytest

from bench.conftest import cache_evictor, flow_batches, report, world_for
from control.semantics.reference import ReferenceEvaluator
from fastpath import match
from tests.worlds import PACKET_PROTOS, random_packets

POLICIES = (10, 1000, 10000)
BATCHES = (64, 256, 1024)
RATES: dict = {}  # (pattern, policies, batch) -> lookups/s, for ratios within the run
COLD_ROUNDS = 200


@functools.lru_cache(maxsize=None)
def reference_rate(policies: int, sample: int = 40) -> float:
    """Lookups/s of the reference evaluator on flows like the benchmark's."""
    cset, _, _ = world_for(policies)
    owners: dict = {}
    for p in cset.pods():
        if p.can_take_part:
            for ip in p.ips:
                owners.setdefault(ip, []).append(p)
    ev = ReferenceEvaluator(cset)
    *_, flows = random_packets(cset, sample, seed=99)
    endpoints = [(owners.get(s, [s, s])[0] if len(owners.get(s, ())) == 1 else s,
                  owners.get(d, [d, d])[0] if len(owners.get(d, ())) == 1 else d, pr, port) for s, d, pr, port in flows]
    start = time.perf_counter()
    for s, d, pr, port in endpoints:
        ev.evaluate(s, d, port, PACKET_PROTOS[pr])
    return sample / (time.perf_counter() - start)


def _record(benchmark, pattern: str, policies: int, batch: int) -> None:
    """Rate from the median (it resists a busy machine), compared with the hot rate and
    the reference evaluator of the same run."""
    rate = batch / benchmark.stats.stats.median
    RATES[(pattern, policies, batch)] = rate
    base = reference_rate(policies)
    info = dict(pattern=pattern, lookups_per_s=rate, reference_lookups_per_s=base, ratio=rate / base,
                engine="c" if match.HAVE_C else "numpy")
    figures = dict(policies=policies, batch=batch, mlookups_per_s=rate / 1e6, ratio=rate / base)
    hot = RATES.get(("hot", policies, batch))
    if pattern != "hot" and hot:
        info["vs_hot"] = figures["vs_hot"] = rate / hot
    ten = RATES.get((pattern, 10, batch))
    if ten and policies != 10:
        info["vs_10_policies"] = figures["vs_10_policies"] = rate / ten
    benchmark.extra_info.update(info)
    report(f"judge ({pattern})", **figures)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("policies", POLICIES)
def test_lookups(benchmark, policies, batch):
    """Hot: one batch, judged again and again."""
    cset, tables, _ = world_for(policies)
    src, dst, proto, dport, _ = random_packets(cset, batch, seed=batch)
    benchmark.group = f"judge batch {batch}"
    result = benchmark(match.judge, tables, src, dst, proto, dport)
    assert result.allowed.shape == (batch,)
    _record(benchmark, "hot", policies, batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("policies", POLICIES)
def test_lookups_varied(benchmark, policies, batch):
    """Varied: every call judges the next of many distinct batches."""
    _, tables, _ = world_for(policies)
    batches = flow_batches(policies, batch)
    cycle = itertools.cycle(batches)
    benchmark.group = f"judge batch {batch}"
    result = benchmark(lambda: match.judge(tables, *next(cycle)))
    assert result.allowed.shape == (batch,)
    benchmark.extra_info["distinct_batches"] = len(batches)
    _record(benchmark, "varied", policies, batch)


@pytest.mark.parametrize("policies", POLICIES)
def test_lookups_cold(benchmark, policies, batch=256):
    """Cold: a distinct batch after every cache was flushed by reading past it."""
    _, tables, _ = world_for(policies)
    batches = flow_batches(policies, batch)
    cycle = itertools.cycle(batches)
    evict = cache_evictor()

    def setup():
        evict()
        return next(cycle), {}

    benchmark.group = f"judge batch {batch}"
    result = benchmark.pedantic(lambda *b: match.judge(tables, *b), setup=setup, rounds=COLD_ROUNDS, warmup_rounds=2)
    assert result.allowed.shape == (batch,)
    benchmark.extra_info["distinct_batches"] = len(batches)
    _record(benchmark, "cold", policies, batch)


@pytest.mark.parametrize("policies", (1000,))
def test_lookups_numpy_fallback(benchmark, policies):
    cset, tables, _ = world_for(policies)
    src, dst, proto, dport, _ = random_packets(cset, 256, seed=256)
    benchmark.group = "judge batch 256"
    benchmark(match.judge_numpy, tables, src, dst, proto, dport)
    rate = 256 / benchmark.stats.stats.median
    base = reference_rate(policies)
    benchmark.extra_info.update(lookups_per_s=rate, ratio=rate / base, engine="numpy")
    report("judge (numpy fallback)", policies=policies, batch=256, mlookups_per_s=rate / 1e6, ratio=rate / base)


def test_policy_count_independence(benchmark):
    """The 10,000-vs-10-policies ratio from interleaved timing: both tables judged in
    alternation (each with its own world's flows, batch 256), so load that comes and
    goes on a shared machine hits both sides alike; once with one hot batch, once with
    varied batches. Target ≥ 0.8."""
    sides = {}
    for policies in (10, 10000):
        cset, tables, _ = world_for(policies)
        sides[policies] = (tables, random_packets(cset, 256, seed=256)[:4], itertools.cycle(flow_batches(policies, 256)))
    times: dict = {(p, pattern): [] for p in sides for pattern in ("hot", "varied")}

    def alternate():
        for policies, (tables, hot, cycle) in sides.items():
            start = time.perf_counter()
            for _ in range(20):
                match.judge(tables, *hot)
            middle = time.perf_counter()
            for _ in range(20):
                match.judge(tables, *next(cycle))
            times[(policies, "hot")].append((middle - start) / 20)
            times[(policies, "varied")].append((time.perf_counter() - middle) / 20)

    benchmark.pedantic(alternate, rounds=300, warmup_rounds=20)
    med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    ratio = {pattern: med[(10, pattern)] / med[(10000, pattern)] for pattern in ("hot", "varied")}  # rate ÷ rate
    benchmark.extra_info.update(ratio_10000_vs_10=ratio["hot"], ratio_10000_vs_10_varied=ratio["varied"],
                                lookups_per_s_10=256 / med[(10, "hot")], lookups_per_s_10000=256 / med[(10000, "hot")],
                                varied_lookups_per_s_10=256 / med[(10, "varied")],
                                varied_lookups_per_s_10000=256 / med[(10000, "varied")])
    report("judge 10,000 vs 10 policies (interleaved, batch 256)", ratio_hot=ratio["hot"], ratio_varied=ratio["varied"],
           mlookups_10=256 / med[(10, "hot")] / 1e6, mlookups_10000=256 / med[(10000, "hot")] / 1e6,
           varied_mlookups_10=256 / med[(10, "varied")] / 1e6, varied_mlookups_10000=256 / med[(10000, "varied")] / 1e6)
