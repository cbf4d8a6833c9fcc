"""Shared set-up for the benchmarks under bench/.

* Files named ``bench_*.py`` are collected as test modules (``python_files`` in
  pyproject.toml; ``./dev bench`` runs ``pytest bench``).
* ``world_for(policies)`` builds, once per run, the benchmark world: 10,002 pods in 3
  clusters (``tests.worlds.random_world``, 30 nodes per cluster) with the given number
  of policies, and compiles it for one node of cluster-1 — the node's ~110 pods are
  the local endpoints, as in the daemon.
* ``flow_batches(policies, batch)`` cuts one pool of distinct flows drawn from that
  world (``FLOW_POOL`` flows) into batches, so a benchmark can cycle through many
  different batches instead of repeating one whose working set stays in cache.
* ``cache_evictor()`` returns a function that reads twice the largest CPU cache, run
  before a round (untimed) that must find every cache cold.
* ``report(...)`` prints one result line so ``-s`` output reads as a table.
"""

from __future__ import annotations

import functools
import glob
import time

import numpy as np

from tests.worlds import Shape, random_world

PODS_PER_CLUSTER = 3334
CLUSTERS = 3
NODES_PER_CLUSTER = 30
LOCAL_NODE = ("cluster-1", "cluster-1-node-0")
#: Distinct flows per world for the varied and cold matcher batches: 128 batches of
#: 1,024 or 2,048 of 64, and ~4.5 MiB of packet fields — more than any L2 cache holds.
FLOW_POOL = 1 << 17
#: Used when the cache sizes cannot be read from sysfs.
DEFAULT_CACHE_BYTES = 32 << 20


def local_node(pod) -> bool:
    return (pod.cluster, pod.node) == LOCAL_NODE


def private_world(policies: int, seed: int = 2):
    """A new copy of the benchmark world, for a benchmark that changes it."""
    per_cluster = -(-policies // CLUSTERS)
    return random_world(seed, clusters=CLUSTERS, pods_per_cluster=PODS_PER_CLUSTER, policies_per_cluster=per_cluster,
                        shape=Shape(nodes_per_cluster=NODES_PER_CLUSTER))


@functools.lru_cache(maxsize=None)
def world(policies: int, seed: int = 2):
    """The benchmark world, shared by every benchmark of the run: never change it."""
    return private_world(policies, seed)


@functools.lru_cache(maxsize=None)
def world_for(policies: int):
    """``(cset, tables, compile_seconds)`` for the 10k-pod world with ``policies``."""
    from control.compile.compiler import compile_tables

    cset = world(policies)
    start = time.perf_counter()
    tables = compile_tables(cset, local_node, revision=1)
    return cset, tables, time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _flow_pool(policies: int):
    from tests.worlds import random_packets

    cset, _, _ = world_for(policies)
    return random_packets(cset, FLOW_POOL, seed=7)[:4]


def flow_batches(policies: int, batch: int) -> list[tuple]:
    """``FLOW_POOL // batch`` distinct batches ``(src, dst, proto, dport)`` (contiguous
    views of one pool) drawn from the world's addresses and ports."""
    if batch <= 0 or FLOW_POOL % batch:
        raise ValueError(f"batch {batch} does not divide the flow pool of {FLOW_POOL}")
    src, dst, proto, dport = _flow_pool(policies)
    return [(src[i:i + batch], dst[i:i + batch], proto[i:i + batch], dport[i:i + batch])
            for i in range(0, FLOW_POOL, batch)]


def largest_cache_bytes() -> int:
    """The largest cache of CPU 0, from sysfs (``32768K``)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def cache_evictor():
    """A function that reads a buffer twice the size of the largest cache, leaving
    nothing of what was used before in any cache level (victim caches included)."""
    buf = np.ones(2 * largest_cache_bytes() // 8, dtype=np.int64)
    return lambda: int(buf.sum())


def report(what: str, **figures) -> None:
    parts = []
    for k, v in figures.items():
        parts.append(f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}")
    print(f"\n[bench] {what}: " + "  ".join(parts))
