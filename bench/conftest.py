"""Shared set-up for the benchmarks under bench/.

* Files named ``bench_*.py`` are collected as test modules (``python_files`` in
  pyproject.toml; ``./dev bench`` runs ``pytest bench``).
* ``world_for(policies)`` builds, once per run, the benchmark world: 10,002 pods in 3
  clusters (``tests.worlds.random_world``, 30 nodes per cluster) with the given number
  of policies, and compiles it for one node of cluster-1 — the node's ~110 pods are
  the local endpoints, as in the daemon.
* ``report(...)`` prints one result line so ``-s`` output reads as a table.
"""

from __future__ import annotations

import functools
import time


from tests.worlds import Shape, random_world

PODS_PER_CLUSTER = 3334
CLUSTERS = 3
NODES_PER_CLUSTER = 30
LOCAL_NODE = ("cluster-1", "cluster-1-node-0")


def local_node(pod) -> bool:
    return (pod.cluster, pod.node) == LOCAL_NODE


@functools.lru_cache(maxsize=None)
def world(policies: int, seed: int = 2):
    per_cluster = -(-policies // CLUSTERS)
    return random_world(seed, clusters=CLUSTERS, pods_per_cluster=PODS_PER_CLUSTER, policies_per_cluster=per_cluster,
                        shape=Shape(nodes_per_cluster=NODES_PER_CLUSTER))


@functools.lru_cache(maxsize=None)
def world_for(policies: int):
    """``(cset, tables, compile_seconds)`` for the 10k-pod world with ``policies``."""
    from control.compile.compiler import compile_tables

    cset = world(policies)
    start = time.perf_counter()
    tables = compile_tables(cset, local_node, revision=1)
    return cset, tables, time.perf_counter() - start


def report(what: str, **figures) -> None:
    parts = []
    for k, v in figures.items():
        parts.append(f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}")
    print(f"\n[bench] {what}: " + "  ".join(parts))
