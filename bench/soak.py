"""Soak run: real daemons under policy and label churn, checked against the reference.

``python -m bench.soak --minutes 10`` (as root) builds a testbed in ``mcnp`` mode — a
random clusterset of three clusters, five pods each, a daemon per node — and then, until
the time is up, repeats one *round*:

1. **change** one thing in a watched manifest directory, atomically (rename), as a
   GitOps sync would: a pod's or a namespace's labels, a policy rewritten, added or
   deleted, or a new *invalid* policy (rule S9: it must isolate and admit nothing).
   Pods themselves cannot come or go: the testbed wires every pod's veth at ``up`` and
   the daemons attach ports statically (deploy/README.md), so the churn is of labels and
   policies, which is what changes the tables;
2. **wait** until every daemon has the change in force: its ``/v1/tables`` revision
   moved, the compiled revision caught up, and its dataplane runs the published
   generation (``/v1/stats``);
3. **probe** random ordered pairs of distinct pods with real TCP and UDP connections
   (``control.lab.probe.probe_many``, bounded in count and time) on ports the destination
   serves, and compare each verdict with ``ReferenceEvaluator`` over the manifests as
   the daemons must see them. A *fail-open* — expected denied, observed allowed — is
   never forgiven: it stops the run at once and fails it. Only an expected-allow that
   was observed denied is probed once more (a lost datagram or a slow handshake is not a
   verdict): if it is allowed then, it is counted and reported as retried; if it is
   denied again, it is a disagreement (the result must be zero);
4. **sample** the resident memory (``/proc/PID/status``) of every daemon and of the
   processes it started (its dataplane worker).

It prints a summary and writes a JSON result (``bench/results/soak-<date>.json`` by
default), and tears the testbed down on every exit path, Ctrl-C and SIGTERM included.
Exit code 0 when there was no disagreement (fail-open or persistent denial) and every
change came into force.
``tests/test_soak_short.py`` runs three rounds of the same code in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml

from control.lab import testbed
from control.semantics.manifests import load_clusterset
from control.semantics.model import MC_KEY, ClusterSet, Selector
from control.lab.probe import probe_many
from control.semantics.reference import ReferenceEvaluator
from tests.render import namespace_doc, pod_doc, policy_doc, selector_doc
from control.lab.net import session_members

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: Served by every pod besides its declared ports, so probes on them show the policy's
#: verdict rather than a closed port (the ports the random policies name most).
EXTRA_PORTS = (("TCP", 80), ("TCP", 443), ("UDP", 53), ("UDP", 8080))
#: Change kinds and their weights.
CHANGES = {"relabel-pod": 4, "relabel-namespace": 1, "rewrite-policy": 3, "add-policy": 1,
           "delete-policy": 1, "add-invalid-policy": 1}
FILES = {"Namespace": "namespaces.yaml", "Pod": "pods.yaml", "NetworkPolicy": "policies.yaml"}


@dataclass
class SoakConfig:
    """What one soak run does; the defaults are the 10-minute run's."""

    minutes: float = 10.0
    #: Stop after this many rounds even if time is left (None: only the clock stops it).
    rounds: Optional[int] = None
    clusters: int = 3
    pods_per_cluster: int = 5
    nodes_per_cluster: int = 2
    policies_per_cluster: int = 6
    probes_per_round: int = 40
    seed: int = 1
    #: Seconds every daemon gets to have one change in force.
    change_timeout: float = 30.0
    prefix: str = field(default_factory=lambda: f"mcnps-{os.getpid()}-")
    state_dir: Optional[str] = None  # default: a fresh temporary directory


# --------------------------------------------------------------------------- manifests
# The random world comes from tests.worlds as model values; the daemons read YAML, so
# these turn the values back into the objects `kubectl get -o yaml` would print.


def invalid_policy_doc(namespace: str, name: str, pod_selector: Selector) -> dict:
    """A policy the API server would reject: an ingress peer with no field set (rule S8)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": selector_doc(pod_selector), "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{}]}]}}


def write_docs(path: str, docs: list[dict]) -> None:
    """Replace a manifest file atomically; the temporary name starts with a dot, which
    the daemons' directory sources ignore."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the world


class World:
    """The clusterset as two views of manifest documents: ``written`` (what the watched
    directories hold) and ``meant`` (what the daemons must enforce — the same, except
    that a policy the soak made invalid stands for its fail-closed stand-in, which the
    lenient loader builds from it). Each change rewrites one file of one cluster."""

    def __init__(self, cfg: SoakConfig, workdir: str):
        from tests.worlds import Shape, random_world

        shape = Shape(nodes_per_cluster=cfg.nodes_per_cluster, ineligible=0.0, conflicts=0.0, rejected=0.0)
        cset = random_world(cfg.seed, clusters=cfg.clusters, pods_per_cluster=cfg.pods_per_cluster,
                            policies_per_cluster=cfg.policies_per_cluster, shape=shape)
        # Policies of a second world are the pool that rewrites and additions draw from.
        pool = random_world(cfg.seed + 1, clusters=cfg.clusters, pods_per_cluster=cfg.pods_per_cluster,
                            policies_per_cluster=8 * cfg.policies_per_cluster, shape=shape)
        self.rng = random.Random(cfg.seed)
        self.workdir = workdir
        self.dirs = {c: os.path.join(workdir, c) for c in cset.clusters}
        self.namespaces = {c: dict(s.namespaces) for c, s in cset.clusters.items()}
        self.pods = {c: dict(s.pods) for c, s in cset.clusters.items()}
        self.policies: dict[str, dict[tuple, dict]] = {
            c: {(p.namespace, p.name): policy_doc(p) for p in s.policies.values()} for c, s in cset.clusters.items()}
        self.pool = {c: list(s.policies.values()) for c, s in pool.clusters.items()}
        self.invalid: set[tuple] = set()  # (cluster, namespace, name)
        self.serial = 0
        for c, d in self.dirs.items():
            os.makedirs(d)
            for kind in FILES:
                self._write(c, kind)

    @property
    def specs(self) -> list[tuple[str, str]]:
        return list(self.dirs.items())

    def _docs(self, cluster: str, kind: str) -> list[dict]:
        if kind == "Namespace":
            return [namespace_doc(n) for _, n in sorted(self.namespaces[cluster].items())]
        if kind == "Pod":
            return [pod_doc(p) for _, p in sorted(self.pods[cluster].items())]
        return [d for _, d in sorted(self.policies[cluster].items())]

    def _write(self, cluster: str, kind: str) -> str:
        path = os.path.join(self.dirs[cluster], FILES[kind])
        write_docs(path, self._docs(cluster, kind))
        return path

    def reference(self) -> ClusterSet:
        """The clusterset the daemons must enforce, loaded as they load it (lenient:
        invalid policies become fail-closed stand-ins)."""
        ref_dir = os.path.join(self.workdir, ".reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        specs = []
        for c in self.dirs:
            d = os.path.join(ref_dir, c)
            os.makedirs(d)
            for kind in FILES:
                write_docs(os.path.join(d, FILES[kind]), self._docs(c, kind))
            specs.append((c, d))
        cset, _ = load_clusterset(specs, strict=False)
        return cset

    # ------------------------------------------------------------------ changes

    def change(self) -> tuple[str, str]:
        """Make one random change and write its file; returns (kind, description)."""
        kinds, weights = zip(*CHANGES.items())
        while True:
            kind = self.rng.choices(kinds, weights)[0]
            cluster = self.rng.choice(list(self.dirs))
            what = getattr(self, "_" + kind.replace("-", "_"))(cluster)
            if what is not None:
                return kind, what

    def _labels(self, vocab: dict, old: dict, keep: Optional[dict] = None) -> dict:
        while True:
            labels = {k: self.rng.choice(vs) for k, vs in vocab.items() if self.rng.random() < 0.6}
            if self.rng.random() < 0.05:  # a forged cluster label (rule M2 overrides it)
                labels[MC_KEY] = self.rng.choice(list(self.dirs) + ["elsewhere"])
            labels.update(keep or {})
            if labels != old:
                return labels

    def _relabel_pod(self, cluster: str) -> Optional[str]:
        from tests.worlds import LABELS

        key = self.rng.choice(sorted(self.pods[cluster]))
        pod = self.pods[cluster][key]
        labels = self._labels(LABELS, dict(pod.labels))
        self.pods[cluster][key] = dataclasses.replace(pod, labels=labels)
        self._write(cluster, "Pod")
        return f"{pod.ref} labels {labels}"

    def _relabel_namespace(self, cluster: str) -> Optional[str]:
        from control.semantics.model import NS_NAME_KEY
        from tests.worlds import NS_LABELS

        if not self.namespaces[cluster]:
            return None
        name = self.rng.choice(sorted(self.namespaces[cluster]))
        ns = self.namespaces[cluster][name]
        labels = self._labels(NS_LABELS, dict(ns.labels), {NS_NAME_KEY: name})
        self.namespaces[cluster][name] = dataclasses.replace(ns, labels=labels)
        self._write(cluster, "Namespace")
        return f"namespace {cluster}/{name} labels {labels}"

    def _pool_policy(self, cluster: str, namespace: Optional[str], name: str) -> dict:
        p = self.rng.choice(self.pool[cluster])
        return policy_doc(dataclasses.replace(p, cluster=cluster, namespace=namespace or p.namespace, name=name))

    def _rewrite_policy(self, cluster: str) -> Optional[str]:
        valid = sorted(k for k in self.policies[cluster] if (cluster, *k) not in self.invalid)
        if not valid:
            return None
        ns, name = self.rng.choice(valid)
        old = self.policies[cluster][(ns, name)]
        doc = old
        while doc == old:  # the same spec again would be no change to wait for
            doc = self._pool_policy(cluster, ns, name)
        self.policies[cluster][(ns, name)] = doc
        self._write(cluster, "NetworkPolicy")
        return f"policy {cluster}/{ns}/{name} rewritten"

    def _add_policy(self, cluster: str) -> Optional[str]:
        self.serial += 1
        doc = self._pool_policy(cluster, None, f"soak-{self.serial}")
        key = (doc["metadata"]["namespace"], doc["metadata"]["name"])
        self.policies[cluster][key] = doc
        self._write(cluster, "NetworkPolicy")
        return f"policy {cluster}/{key[0]}/{key[1]} added"

    def _delete_policy(self, cluster: str) -> Optional[str]:
        if len(self.policies[cluster]) <= 2:
            return None
        key = self.rng.choice(sorted(self.policies[cluster]))
        del self.policies[cluster][key]
        self.invalid.discard((cluster, *key))
        self._write(cluster, "NetworkPolicy")
        return f"policy {cluster}/{key[0]}/{key[1]} deleted"

    def _add_invalid_policy(self, cluster: str) -> Optional[str]:
        """A new invalid policy (rule S9): fail closed for the pods it selects. Under a
        fresh name, so no earlier valid version exists to stay in force."""
        from tests.worlds import LABELS

        if sum(1 for c, _, _ in self.invalid if c == cluster) >= 2:
            return None
        self.serial += 1
        pods = sorted(self.pods[cluster].values(), key=lambda p: p.ref)
        target = self.rng.choice(pods)
        app = {k: v for k, v in target.labels.items() if k in LABELS}
        sel = Selector(tuple(_match_labels(app)))
        key = (target.namespace, f"soak-invalid-{self.serial}")
        self.policies[cluster][key] = invalid_policy_doc(key[0], key[1], sel)
        self.invalid.add((cluster, *key))
        self._write(cluster, "NetworkPolicy")
        return f"invalid policy {cluster}/{key[0]}/{key[1]} added (selects {app or 'every pod'})"


def _match_labels(labels: dict):
    from control.semantics.model import Requirement

    return [Requirement(k, "In", frozenset([v])) for k, v in sorted(labels.items())]


# --------------------------------------------------------------------------- daemons


def node_keys(state: dict) -> list[str]:
    return sorted(state.get("daemons", {}))


def in_force(state_dir: str, node: str, before: int) -> Optional[int]:
    """The node's revision when a revision newer than ``before`` is compiled and running
    in its dataplane, else None."""
    try:
        status, t = testbed.api_get(node, "/v1/tables", timeout=2.0, state_dir=state_dir)
        if status != 200 or not isinstance(t, dict) or t.get("revision", -1) <= before:
            return None
        if t.get("compiled_revision") != t["revision"]:
            return None
        status, s = testbed.api_get(node, "/v1/stats", timeout=2.0, state_dir=state_dir)
    except OSError:
        return None
    dp = s.get("dataplane") if status == 200 and isinstance(s, dict) else None
    if isinstance(dp, dict) and not (dp.get("ready") and dp.get("generation_in_force") == dp.get("published_generation")):
        return None
    return t["revision"]


def revisions(state_dir: str, nodes: list[str]) -> dict[str, int]:
    out = {}
    for node in nodes:
        try:
            status, t = testbed.api_get(node, "/v1/tables", timeout=2.0, state_dir=state_dir)
        except OSError:
            status, t = 0, None
        out[node] = t.get("revision", -1) if status == 200 and isinstance(t, dict) else -1
    return out


def wait_in_force(state_dir: str, before: dict[str, int], timeout: float) -> list[str]:
    """Wait until every node has a revision newer than ``before`` in force; returns the
    nodes that did not within ``timeout`` (empty: all did)."""
    pending = set(before)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {n for n in pending if in_force(state_dir, n, before[n]) is None}
        if pending:
            time.sleep(0.05)
    return sorted(pending)


def dead_daemons(state: dict) -> list[str]:
    from control.lab.net import process_start_time

    return [k for k, info in state.get("daemons", {}).items() if process_start_time(info["pid"]) != info.get("start")]


def _rss_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _role(pid: int, leader: int) -> str:
    if pid == leader:
        return "daemon"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return f"child-{pid}"
    if b"resource_tracker" in cmd:
        return "resource-tracker"
    if b"spawn_main" in cmd:
        return "worker"
    return f"child-{pid}"


def sample_memory(state: dict) -> dict[str, int]:
    """RSS in kB of every daemon and every process of its session (the dataplane
    worker, multiprocessing's resource tracker), keyed ``node:role``."""
    out = {}
    for node, info in state.get("daemons", {}).items():
        for pid in session_members(info["pid"]):
            rss = _rss_kb(pid)
            if rss is not None:
                out[f"{node}:{_role(pid, info['pid'])}"] = rss
    return out


def memory_growth(samples: list[dict[str, int]]) -> dict:
    """Mean RSS of the first third of the samples against the last third, per process
    and in total (a process missing from a sample counts as absent there)."""
    if len(samples) < 3:
        return {"samples": len(samples), "processes": {}, "total": None}
    third = len(samples) // 3
    first, middle, last = samples[:third], samples[third:-third], samples[-third:]

    def mean(group, key=None):
        vals = [sum(s.values()) if key is None else s[key] for s in group if key is None or key in s]
        return statistics.fmean(vals) if vals else None

    def entry(a, m, b):
        # The middle third shows whether growth levels off (warm-up) or keeps on (a leak).
        return {"first_kb": round(a), "middle_kb": round(m) if m is not None else None, "last_kb": round(b),
                "growth_kb": round(b - a), "growth_pct": round(100.0 * (b - a) / a, 2) if a else None}

    procs = {}
    for key in sorted({k for s in samples for k in s}):
        a, m, b = mean(first, key), mean(middle, key), mean(last, key)
        if a is not None and b is not None:
            procs[key] = entry(a, m, b)
    by_role: dict[str, list] = {}
    for key, e in procs.items():
        by_role.setdefault(key.rsplit(":", 1)[1], []).append(e["growth_kb"])
    return {"samples": len(samples), "processes": procs, "total": entry(mean(first), mean(middle), mean(last)),
            "max_growth_kb_by_role": {r: max(v) for r, v in sorted(by_role.items())}}


# --------------------------------------------------------------------------- probing


def draw_probes(rng: random.Random, state: dict, refs: list[str], n: int) -> list[tuple[str, str, int, str]]:
    """``n`` random (source ref, destination ref, port, protocol): distinct pods (rule
    S7), a port the destination serves, TCP and UDP alike."""
    out = []
    for _ in range(n):
        src, dst = rng.sample(refs, 2)
        served = state["pods"][dst]["ports"]
        proto = rng.choice(sorted({p["protocol"] for p in served}))
        port = rng.choice([p["port"] for p in served if p["protocol"] == proto])
        out.append((src, dst, port, proto))
    return out


def run_probes(state: dict, probes: list) -> list[bool]:
    pods = state["pods"]
    return probe_many([(pods[s]["netns"], pods[d]["ip"], port, proto) for s, d, port, proto in probes])


class FailOpen(RuntimeError):
    """A probe the reference denies got through: the run stops at once."""


@dataclass
class Comparison:
    """Indices of one round's probes, by how their observed verdicts disagreed."""

    #: Expected denied, observed allowed: never retried, the run fails.
    fail_open: list[int] = field(default_factory=list)
    #: Expected allowed, observed denied on the first try and on the retry.
    denied: list[int] = field(default_factory=list)
    #: Expected allowed, denied on the first try, allowed on the retry.
    retried: list[int] = field(default_factory=list)


def compare(want: list[bool], seen: list[bool], reprobe: Callable[[list[int]], list[bool]]) -> Comparison:
    """Sort first-try disagreements. A fail-open is final (a packet that should have
    been dropped was delivered; no later success undoes that), so when there is one
    nothing is retried. Otherwise the probes expected allowed but observed denied are
    probed again through ``reprobe(indices)``, which returns their new verdicts."""
    if len(want) != len(seen):
        raise ValueError(f"{len(want)} expected verdicts but {len(seen)} observed")
    out = Comparison(fail_open=[i for i, (w, o) in enumerate(zip(want, seen)) if o and not w])
    missed = [i for i, (w, o) in enumerate(zip(want, seen)) if w and not o]
    if out.fail_open or not missed:
        return out
    again = reprobe(missed)
    if len(again) != len(missed):
        raise ValueError(f"{len(missed)} probes retried but {len(again)} verdicts returned")
    for i, o in zip(missed, again):
        (out.retried if o else out.denied).append(i)
    return out


def explain_on(state: dict, state_dir: str, probe: tuple) -> Optional[dict]:
    """The source node's own ``/v1/explain`` for a disagreement (for the report)."""
    src, dst, port, proto = probe
    try:
        _, body = testbed.api_get(state["pods"][src]["node"], f"/v1/explain?from={src}&to={dst}&port={port}&protocol={proto}",
                                  state_dir=state_dir)
    except (OSError, LookupError) as e:
        return {"error": str(e)}
    return body if isinstance(body, dict) else {"error": str(body)}


# --------------------------------------------------------------------------- the run


@dataclass
class Tally:
    """What a soak run counts, turned into the result's figures by :meth:`figures`."""

    rounds: int = 0
    changes: dict = field(default_factory=dict)
    apply_s: list = field(default_factory=list)
    not_applied: list = field(default_factory=list)
    probes: dict = field(default_factory=lambda: {"TCP": 0, "UDP": 0})
    expected_allowed: int = 0
    disagreements: list = field(default_factory=list)
    fail_open: list = field(default_factory=list)
    transient: list = field(default_factory=list)
    samples: list = field(default_factory=list)

    def figures(self) -> dict:
        total = sum(self.probes.values())
        a = self.apply_s
        return {
            "rounds": self.rounds,
            "changes": {"total": sum(self.changes.values()), "by_kind": self.changes, "not_applied": self.not_applied},
            "apply_ms": ({"median": round(1000 * statistics.median(a)), "max": round(1000 * max(a)),
                          "p95": round(1000 * sorted(a)[int(0.95 * (len(a) - 1))])} if a else None),
            "probes": {"total": total, **self.probes, "expected_allowed": self.expected_allowed,
                       "expected_denied": total - self.expected_allowed},
            "disagreements": len(self.disagreements),
            "disagreement_details": self.disagreements[:50],
            "fail_open": len(self.fail_open),
            "fail_open_details": self.fail_open[:50],
            "transient": len(self.transient),
            "transient_details": self.transient[:50],
            "memory": memory_growth(self.samples),
        }


def probe_round(world: World, state: dict, state_dir: str, probes: list, tally: Tally, what: str) -> Comparison:
    """Probe with real connections, compare with the reference, record what disagreed;
    raises :class:`FailOpen` when a probe expected denied got through."""
    cset = world.reference()
    ref = ReferenceEvaluator(cset)
    want = [ref.allowed(cset.pod(s), cset.pod(d), port, proto) for s, d, port, proto in probes]
    found = compare(want, run_probes(state, probes), lambda idx: run_probes(state, [probes[i] for i in idx]))
    for _, _, _, proto in probes:
        tally.probes[proto] += 1
    tally.expected_allowed += sum(want)

    def record(i: int, observed: bool, explain: bool) -> dict:
        rec = {"round": tally.rounds, "after": what, "probe": list(probes[i]), "expected": want[i], "observed": observed}
        if explain:
            rec["daemon_explain"] = explain_on(state, state_dir, probes[i])
        return rec

    tally.transient += [record(i, True, False) for i in found.retried]
    tally.disagreements += [record(i, False, True) for i in found.denied]
    if found.fail_open:
        recs = [record(i, True, True) for i in found.fail_open]
        tally.fail_open += recs
        tally.disagreements += recs
        raise FailOpen(f"round {tally.rounds}, after {what}: {len(recs)} probe(s) expected denied were allowed: "
                       + "; ".join(" ".join(map(str, r["probe"])) for r in recs[:5]))
    return found


def churn(cfg: SoakConfig, world: World, state: dict, state_dir: str, tally: Tally, log: Callable[[str], None]) -> None:
    """The rounds: change, wait until in force, probe, sample; until time or rounds run out."""
    rng = random.Random(cfg.seed)
    nodes, refs = node_keys(state), sorted(state["pods"])
    end = time.monotonic() + cfg.minutes * 60
    while time.monotonic() < end and (cfg.rounds is None or tally.rounds < cfg.rounds):
        tally.rounds += 1
        before = revisions(state_dir, nodes)
        kind, what = world.change()
        changed_at = time.monotonic()
        tally.changes[kind] = tally.changes.get(kind, 0) + 1
        late = wait_in_force(state_dir, before, cfg.change_timeout)
        dead = dead_daemons(state)
        if dead:
            raise RuntimeError(f"daemon(s) died: {', '.join(dead)}")
        if late:
            tally.not_applied.append({"round": tally.rounds, "change": what, "nodes": late})
            log(f"round {tally.rounds}: {what}: NOT in force on {', '.join(late)} within {cfg.change_timeout:g} s")
            continue
        tally.apply_s.append(time.monotonic() - changed_at)
        probes = draw_probes(rng, state, refs, cfg.probes_per_round)
        found = probe_round(world, state, state_dir, probes, tally, what)
        tally.samples.append(sample_memory(state))
        log(f"round {tally.rounds}: {kind}: {what}; in force in {tally.apply_s[-1] * 1000:.0f} ms; "
            f"{len(probes)} probes, {len(found.retried) + len(found.denied)} expected-allow denied at first "
            f"({len(found.retried)} allowed on retry)")


def soak(cfg: SoakConfig, log: Callable[[str], None] = print) -> dict:
    """Build, churn, probe, compare, sample; always tear down. Returns the result."""
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="mcnp-soak-")
    state_dir = cfg.state_dir or os.path.join(workdir, "testbed")
    result: dict = {"started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
                    "config": dataclasses.asdict(cfg), "ok": False}
    tally = Tally()
    try:
        world = World(cfg, workdir)
        t0 = time.monotonic()
        code = testbed.up(world.specs, mode="mcnp", log=lambda m: log(f"  {m}"), prefix=cfg.prefix,
                          state_dir=state_dir, extra_ports=EXTRA_PORTS)
        if code != 0:
            raise RuntimeError(f"testbed up failed (exit code {code})")
        state = testbed.load_state(state_dir)
        result["testbed"] = {"clusters": len(world.dirs), "pods": len(state["pods"]), "nodes": len(node_keys(state)),
                             "up_seconds": round(time.monotonic() - t0, 1)}
        log(f"testbed: {len(state['pods'])} pods, {len(node_keys(state))} daemons; soaking for {cfg.minutes:g} min"
            + (f" or {cfg.rounds} rounds" if cfg.rounds else ""))
        tally.samples.append(sample_memory(state))
        churn(cfg, world, state, state_dir, tally, log)
    except KeyboardInterrupt:
        result["interrupted"] = True
        log("interrupted")
    except Exception as e:  # noqa: BLE001 - reported in the result, teardown follows
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"soak failed: {result['error']}")
    finally:
        # A second Ctrl-C must not cut the teardown short.
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            code = testbed.down(state_dir, log=lambda m: log(f"  {m}"))
            result["teardown_ok"] = code == 0
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)

    result.update(duration_s=round(time.time() - started, 1), **tally.figures())
    result["ok"] = (not tally.disagreements and not tally.not_applied and "error" not in result
                    and not result.get("interrupted") and result["teardown_ok"] and tally.rounds > 0)
    return result


def summary(result: dict) -> str:
    lines = [f"soak: {result['rounds']} rounds in {result['duration_s']:.0f} s, {result['changes']['total']} changes "
             f"({', '.join(f'{k} {v}' for k, v in sorted(result['changes']['by_kind'].items()))})"]
    p = result["probes"]
    lines.append(f"probes: {p['total']} (TCP {p['TCP']}, UDP {p['UDP']}; {p['expected_allowed']} expected allowed, "
                 f"{p['expected_denied']} denied)")
    lines.append(f"disagreements with the reference: {result['disagreements']} (fail-open, never retried: "
                 f"{result['fail_open']}); expected-allow denied at first, allowed on retry: {result['transient']}")
    if result["apply_ms"]:
        a = result["apply_ms"]
        lines.append(f"change to in force on every daemon: median {a['median']} ms, p95 {a['p95']} ms, max {a['max']} ms; "
                     f"not applied: {len(result['changes']['not_applied'])}")
    mem = result["memory"]
    if mem.get("total"):
        t = mem["total"]
        lines.append(f"memory ({mem['samples']} samples, means of first, middle and last third): all processes "
                     f"{t['first_kb'] / 1024:.1f} -> {t['middle_kb'] / 1024:.1f} -> {t['last_kb'] / 1024:.1f} MiB "
                     f"({t['growth_kb']:+d} kB); largest growth by role: "
                     + ", ".join(f"{r} {g:+d} kB" for r, g in mem["max_growth_kb_by_role"].items()))
    for key in ("error", "interrupted"):
        if key in result:
            lines.append(f"{key}: {result[key]}")
    lines.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    ap.add_argument("--minutes", type=float, default=d.minutes)
    ap.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    ap.add_argument("--clusters", type=int, default=d.clusters)
    ap.add_argument("--pods-per-cluster", type=int, default=d.pods_per_cluster)
    ap.add_argument("--nodes-per-cluster", type=int, default=d.nodes_per_cluster)
    ap.add_argument("--policies-per-cluster", type=int, default=d.policies_per_cluster)
    ap.add_argument("--probes-per-round", type=int, default=d.probes_per_round)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", help="JSON result path (default bench/results/soak-<date>.json)")
    args = ap.parse_args(argv)
    # The reference loader warns about the invalid policies the soak writes on purpose.
    logging.getLogger("control.semantics.manifests").setLevel(logging.ERROR)
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, XDP, AF_XDP)", file=sys.stderr)
        return 1
    cfg = SoakConfig(minutes=args.minutes, rounds=args.rounds, clusters=args.clusters, pods_per_cluster=args.pods_per_cluster,
                     nodes_per_cluster=args.nodes_per_cluster, policies_per_cluster=args.policies_per_cluster,
                     probes_per_round=args.probes_per_round, seed=args.seed)
    # SIGTERM unwinds like Ctrl-C, so the testbed is always torn down. SIGINT is set
    # explicitly: a shell starts background jobs with it ignored, and Python keeps that.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(RESULTS_DIR, f"soak-{stamp}.json")
    result = soak(cfg, log=lambda m: print(m, flush=True))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(summary(result))
    print(f"result: {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
