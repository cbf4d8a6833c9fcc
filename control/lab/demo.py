"""``mcnp demo``: two clusters, a daemon per node, real connections, a live change.

The bundled example (``control/lab/examples/demo``) follows NPEP-308's user stories: the
backend ``api`` of production cluster ``east`` admits the frontend of cluster ``west``
(story 1), and the ``dev`` namespace of ``west`` may reach production only at that api
(story 2). The demo builds the testbed, probes every ordered pair of pods with real TCP
and UDP connections, prints what it observed beside what ``mcnp matrix`` expects, shows
per-policy counters from each daemon's REST endpoint. While the daemons run it adds a
pod as a kubelet would (CNI ADD through the node's conflist, ``mcnp-cni`` last) and
probes again, connects through the ClusterIP of east's ``shop/api`` Service (judged on
the backend it lands on, rule S11), then changes a policy in a watched directory and
shows the matrix change in the dataplane. It runs on the routed (ptp) CNI, tears
everything down on every exit path and exits 0 only when observation and expectation
agree.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from importlib import resources

from control.lab.state import TestbedError
from control.semantics.manifests import load_clusterset
from control.semantics.model import ClusterSet, Pod

EXAMPLE = "demo"
CLUSTERS = ("east", "west")
#: The services every pair is probed on (port, protocol).
SERVICES = ((80, "TCP"), (53, "UDP"), (5432, "TCP"))
CHANGE_WAIT_S = 20.0
#: The pod added while the daemons run: a second web frontend of west, on the node that
#: has none yet.
LATE_POD = {"cluster": "west", "namespace": "shop", "name": "web-2", "ip": "198.18.2.30", "node": "west-2",
            "labels": {"app": "web"}, "container_ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"},
                                                          {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}
#: east's Service (examples/demo/east/services.yaml): ClusterIP, port, backend pod.
SERVICE = ("198.19.254.10", 80, "east/shop/api")


def _example_dir() -> str:
    return str(resources.files("control").joinpath("lab", "examples", EXAMPLE))


class Screen:
    """Progress lines on stdout, flushed at once (the demo is watched live)."""

    def __init__(self):
        self.t0 = time.monotonic()

    def step(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def block(self, text: str) -> None:
        print(text, flush=True)


def expected(cset: ClusterSet, pods: list[Pod], port: int, protocol: str) -> dict[tuple[str, str], bool]:
    from control.compile.matrix import compiled_matrix

    values = compiled_matrix(cset, pods, pods, port, protocol)
    return {(s.ref, d.ref): bool(values[i, j]) for i, s in enumerate(pods) for j, d in enumerate(pods)}


def serves(pod: Pod, port: int, protocol: str) -> bool:
    return any(p.port == port and p.protocol == protocol for p in pod.ports)


def observe(state: dict, pods: list[Pod], port: int, protocol: str) -> dict[tuple[str, str], bool]:
    """Real connections for every ordered pair of distinct pods whose destination serves
    the port (self pairs skipped: a connection to a pod's own IP never leaves the pod,
    rule S7)."""
    from control.lab.probe import probe_many

    pairs = [(s, d) for s in pods for d in pods if s.ref != d.ref and serves(d, port, protocol)]
    netns = {ref: info["netns"] for ref, info in state["pods"].items()}
    results = probe_many([(netns[s.ref], str(d.ip), port, protocol) for s, d in pairs])
    return {(s.ref, d.ref): ok for (s, d), ok in zip(pairs, results)}


def side_by_side(pods: list[Pod], observed: dict, want: dict, port: int, protocol: str) -> tuple[str, int]:
    """Observed beside expected; each cell is observed/expected, `!` marks a difference."""
    names = [p.ref for p in pods]
    short = {n: n for n in names}
    width = max(len(n) for n in names)
    col = 4
    head = f"{protocol}/{port}".ljust(width) + " | " + " ".join(f"{i:>{col}}" for i in range(len(names)))
    lines = [head, "-" * len(head)]
    wrong = 0
    for i, s in enumerate(names):
        cells = []
        for d in names:
            if (s, d) not in observed:  # self pair, or nothing listens there
                cells.append(" " * (col - 1) + "-")
                continue
            o, e = observed[(s, d)], want[(s, d)]
            mark = "" if o == e else "!"
            wrong += o != e
            cells.append(f"{mark}{'.' if o else 'X'}/{'.' if e else 'X'}".rjust(col))
        lines.append(f"{short[s].ljust(width)} | " + " ".join(cells) + f"   {i}")
    legend = "cell = observed/expected ('.' allowed, 'X' denied, '!' disagreement, '-' not probed); columns numbered as rows"
    return "\n".join(lines + [legend]), wrong


def policy_counters(state: dict) -> list[str]:
    """Per-policy hit counters (``mcnp_policy_hits_total`` of each daemon's /metrics),
    summed over every node."""
    from prometheus_client.parser import text_string_to_metric_families

    from control.lab.testbed import api_get

    totals: dict[tuple[str, str], float] = {}
    for node in state.get("nodes", {}):
        status, body = api_get(node, "/metrics")
        if status != 200 or not isinstance(body, str):
            continue
        for family in text_string_to_metric_families(body):
            if family.name != "mcnp_policy_hits":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels.get("policy", "?"), sample.labels.get("direction", "?"))
                    totals[key] = totals.get(key, 0) + sample.value
    return [f"  {int(hits):8d}  {policy} ({direction})" for (policy, direction), hits in sorted(totals.items())]


def wait_for_revision(state: dict, before: dict[str, int], timeout: float) -> bool:
    from control.lab.testbed import api_get

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        revs = {}
        for node in state.get("nodes", {}):
            status, body = api_get(node, "/v1/tables")
            revs[node] = body.get("revision", -1) if status == 200 and isinstance(body, dict) else -1
        if all(revs[n] > before.get(n, -1) for n in revs):
            return True
        time.sleep(0.2)
    return False


def revisions(state: dict) -> dict[str, int]:
    from control.lab.testbed import api_get

    out = {}
    for node in state.get("nodes", {}):
        status, body = api_get(node, "/v1/tables")
        out[node] = body.get("revision", -1) if status == 200 and isinstance(body, dict) else -1
    return out


def run_round(screen: Screen, title: str, cset: ClusterSet, state: dict) -> tuple[int, dict]:
    """Probe every service; returns the number of disagreements and what was observed,
    keyed by (source, destination, service)."""
    pods = sorted((p for p in cset.pods() if p.can_take_part), key=lambda p: p.ref)
    screen.step(f"{title}: probing {len(pods) * (len(pods) - 1)} pairs on {', '.join(f'{pr}/{po}' for po, pr in SERVICES)}")
    wrong = 0
    seen = {}
    for port, protocol in SERVICES:
        obs = observe(state, pods, port, protocol)
        table, bad = side_by_side(pods, obs, expected(cset, pods, port, protocol), port, protocol)
        screen.block(table + "\n")
        wrong += bad
        seen.update({(s, d, f"{protocol}/{port}"): ok for (s, d), ok in obs.items()})
    screen.step(f"{title}: {'observed equals expected' if wrong == 0 else f'{wrong} disagreements'}")
    return wrong, seen


def changes(before: dict, after: dict) -> list[str]:
    word = {True: "allowed", False: "denied"}
    return [f"  {s} -> {d} {svc}: {word[before[k]]} -> {word[after[k]]}"
            for k in sorted(before) if k in after and before[k] != after[k] for s, d, svc in [k]]


def add_late_pod(screen: Screen, state: dict) -> None:
    """Add ``LATE_POD`` as a kubelet would, then wait until every daemon compiled it in."""
    from control.lab import kubelet

    p = LATE_POD
    screen.step(f"adding pod {p['cluster']}/{p['namespace']}/{p['name']} ({p['ip']}) on node {p['node']} while the daemons run")
    before = revisions(state)
    t0 = time.monotonic()
    kubelet.add_pod(p["cluster"], p["namespace"], p["name"], p["ip"], p["node"], p["container_ports"], p["labels"])
    screen.step(f"  CNI ADD (ptp, static IPAM, mcnp-cni) returned in {time.monotonic() - t0:.2f} s; status.podIP written")
    if not wait_for_revision(state, before, CHANGE_WAIT_S):
        screen.step(f"  the daemons did not pick the pod up within {CHANGE_WAIT_S:.0f}s")
    took = wait_enforced(state, f"{p['cluster']}/{p['namespace']}/{p['name']}", CHANGE_WAIT_S)
    screen.step(f"  in force on every node {time.monotonic() - t0:.2f} s after ADD" if took
                else f"  not in force on every node within {CHANGE_WAIT_S:.0f}s")


def wait_enforced(state: dict, ref: str, timeout: float) -> bool:
    """Until a connection the policy admits from the new pod gets through: every node
    that judges it has the pod's labels and address in force.  Until then its
    connections are denied (fail closed), never admitted against the policy."""
    from control.lab.probe import on_testbed, probe_many

    from control.lab.testbed import load_state

    state = load_state()
    cset, _ = load_clusterset([(name, path) for name, path in state["clusters"]])
    if cset.pod(ref) is None:
        return False
    pods = [p for p in cset.pods() if p.can_take_part and p.ref != ref]
    want = expected(cset, [cset.pod(ref)] + pods, 80, "TCP")
    targets = [d.ref for d in pods if want.get((ref, d.ref)) and serves(d, 80, "TCP")]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(probe_many(on_testbed(state, [(ref, d, 80, "TCP") for d in targets]))):
            return True
        time.sleep(0.1)
    return False


def through_service(screen: Screen, cset: ClusterSet, state: dict) -> int:
    """Connect through the Service's ClusterIP from the backend's cluster mates; each is
    judged as a connection to the backend (rule S11). Returns the disagreements."""
    from control.lab.probe import on_testbed, probe_many

    cip, port, backend = SERVICE
    cluster = backend.split("/")[0]
    pods = sorted((p for p in cset.pods() if p.can_take_part), key=lambda p: p.ref)
    sources = [p for p in pods if p.ref.startswith(cluster + "/") and p.ref != backend]
    want = expected(cset, pods, port, "TCP")
    seen = probe_many(on_testbed(state, [(s.ref, cip, port, "TCP") for s in sources]))
    lines, wrong = [], 0
    for src, ok in zip(sources, seen):
        exp = want[(src.ref, backend)]
        wrong += ok != exp
        word = {True: "allowed", False: "denied"}
        lines.append(f"  {src.ref} -> {cip}:{port} (kube-proxy: {backend}): observed {word[ok]}, expected {word[exp]}{'' if ok == exp else '  !'}")
    screen.block("connections through the Service:\n" + "\n".join(lines) + "\n")
    return wrong


def scenario(screen: Screen, specs: list, src: str, workdir: str) -> int:
    """Everything after the testbed is up; returns the number of disagreements."""
    from control.lab import testbed

    state = testbed.load_state()
    cset, _ = load_clusterset(specs)
    wrong, seen_before = run_round(screen, "before the change", cset, state)
    lines = policy_counters(state)
    screen.block("connections admitted per policy (all nodes, from /metrics):\n" + ("\n".join(lines) if lines else "  (none reported)") + "\n")

    add_late_pod(screen, state)
    state = testbed.load_state()
    cset, _ = load_clusterset(specs)
    bad, seen_before = run_round(screen, "with the added pod", cset, state)
    wrong += bad + through_service(screen, cset, state)

    screen.step("live change: east/shop/api-from-frontends no longer admits namespace dev of west")
    before = revisions(state)
    _replace_policy(os.path.join(workdir, "east", "policies.yaml"), os.path.join(src, "change", "api-from-frontends.yaml"))
    if not wait_for_revision(state, before, CHANGE_WAIT_S):
        screen.step(f"the daemons did not pick up the change within {CHANGE_WAIT_S:.0f}s")
        wrong += 1
    cset, _ = load_clusterset(specs)
    bad, seen_after = run_round(screen, "after the change", cset, state)
    wrong += bad
    diff = changes(seen_before, seen_after)
    screen.block("what the change did in the dataplane:\n" + ("\n".join(diff) if diff else "  (nothing changed)") + "\n")
    return wrong


def main(args) -> int:
    from control.lab import testbed

    if os.geteuid() != 0:
        print("mcnp demo: needs root (network namespaces, XDP, AF_XDP)", file=sys.stderr)
        return 1
    screen = Screen()
    workdir = tempfile.mkdtemp(prefix="mcnp-demo-")
    # SIGTERM unwinds like Ctrl-C, so teardown always runs.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        src = _example_dir()
        specs = []
        for name in CLUSTERS:
            shutil.copytree(os.path.join(src, name), os.path.join(workdir, name))
            specs.append((name, os.path.join(workdir, name)))
        cset, _ = load_clusterset(specs)
        screen.step(f"building the testbed: {sum(1 for _ in cset.pods())} pods in clusters {', '.join(CLUSTERS)}, "
                    "the ptp CNI on every node, a daemon per node")
        code = testbed.up(specs, mode="mcnp", cni="ptp", json_out=False, log=lambda m: screen.step(f"  {m}"))
        if code != 0:
            screen.step("testbed failed to come up")
            return code or 1
        wrong = scenario(screen, specs, src, workdir)
        screen.step("PASS: the dataplane enforced exactly what mcnp matrix expects" if wrong == 0 else f"FAIL: {wrong} disagreements")
        return 0 if wrong == 0 else 1
    except (TestbedError, OSError) as e:  # a lab failure: say what, then tear down
        screen.step(f"FAIL: {e}")
        return 1
    except KeyboardInterrupt:
        screen.step("interrupted")
        return 130
    finally:
        if not getattr(args, "keep", False):
            screen.step("tearing down")
            testbed.down()
        shutil.rmtree(workdir, ignore_errors=True)


def _replace_policy(policies_file: str, change_file: str) -> None:
    """Swap one policy document for its changed version, atomically (rename), as a
    GitOps sync would."""
    import yaml

    with open(change_file) as f:
        changed = [d for d in yaml.safe_load_all(f) if d]
    names = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in changed}
    with open(policies_file) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kept = [d for d in docs if (d["metadata"].get("namespace"), d["metadata"]["name"]) not in names]
    tmp = policies_file + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(kept + changed, f, sort_keys=False)
    os.replace(tmp, policies_file)
