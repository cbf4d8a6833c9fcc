"""Audit mode with real daemons and real connections (``mcnp testbed``, reference CNI).

World of tests/test_audit.py: cluster c1, namespace x, one node; pods a, b, c
(app=a/b/c) serving TCP 80. ``b-in`` (enforced) admits TCP 80 into b from app=a;
``c-in`` (annotated ``mcnp.io/audit: "true"``) would admit TCP 80 into c from app=a
only; ``b-try`` (annotated too) would admit TCP 80 into b from app=c. So b -> c is a
would-be drop: it must connect and be recorded as would-deny (``/v1/verdicts``,
``mcnp observe``, ``/metrics``), while c -> b stays denied by the enforced policy in the
same namespace, which the audited ``b-try`` does not widen.

The testbed lives under a prefix and state directory of its own, with addresses in
198.18.0.0/15 only; every probe is bounded in time, and everything is torn down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import yaml

from control.lab import testbed
from control.lab.net import list_netns
from tests import netns_util as nu
from tests.test_audit import IPS, world_objects
from tests.test_node_netns import connects

pytestmark = [
    pytest.mark.privileged, pytest.mark.slow,
    pytest.mark.skipif(not nu.is_root(), reason="needs root, network namespaces and XDP"),
]

PREFIX = f"mcnpa-{os.getpid()}-"
MCNP = os.path.join(os.path.dirname(sys.executable), "mcnp")


@pytest.fixture
def bed(tmp_path):
    """The running testbed of tests/test_audit.py's world; yields (pod netns by name,
    node netns, node API address)."""
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "world.yaml").write_text(yaml.safe_dump_all(world_objects()))
    state_dir, lines = str(tmp_path / "state"), []
    try:
        assert testbed.up([("c1", str(tmp_path / "c1"))], prefix=PREFIX, state_dir=state_dir, log=lines.append) == 0, \
            "\n".join(lines)
        made = testbed.load_state(state_dir)
        node = next(iter(made["nodes"].values()))
        yield {ref.split("/")[-1]: pod["netns"] for ref, pod in made["pods"].items()}, node["netns"], node["api"]
    finally:
        if testbed.load_state(state_dir) is not None:
            testbed.down(state_dir, log=lambda m: None)
        assert not [ns for ns in list_netns() if ns.startswith(PREFIX)]


def in_node(node_ns: str, *argv: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", node_ns, *argv], capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_an_audited_policy_lets_its_would_be_drops_through_and_records_them(bed):
    pods, node_ns, api = bed
    assert connects(pods["b"], IPS["c"], 80), "a would-be drop of the audited c-in must pass"
    assert connects(pods["a"], IPS["c"], 80) and connects(pods["a"], IPS["b"], 80)
    assert not connects(pods["c"], IPS["b"], 80), "the enforced b-in in the same namespace must still deny"

    def get(path: str):
        return json.loads(in_node(node_ns, "curl", "-s", f"http://{api}{path}"))

    deadline = time.monotonic() + 10  # the daemon reads the packet loop's records every 0.25 s
    while True:
        body = get("/v1/verdicts?verdict=would-deny&limit=100")
        found = [r for r in body["verdicts"] if (r["src_pod"], r["dst_pod"]) == ("c1/x/b", "c1/x/c")]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert found, body
    rec = found[0]
    assert rec["dport"] == 80 and rec["protocol"] == "TCP" and rec["side"] == "ingress"
    assert rec["policies"] == ["c1/x/c-in"] and rec["audit_policies"] == ["c1/x/c-in"]
    denied = get("/v1/verdicts?verdict=denied&limit=100")["verdicts"]
    assert any((r["src_pod"], r["dst_pod"], r["policies"]) == ("c1/x/c", "c1/x/b", ["c1/x/b-in"]) for r in denied)
    allowed = get("/v1/verdicts?verdict=allowed&limit=100")["verdicts"]  # b's egress admits it; c's ingress would not
    assert {r["direction"] for r in allowed if (r["src_pod"], r["dst_pod"]) == ("c1/x/b", "c1/x/c")} == {"egress"}

    flags = {p["name"]: p["audit"] for p in get("/v1/policies")["policies"]}
    assert flags == {"b-in": False, "c-in": True, "b-try": True}
    explained = get("/v1/explain?from=c1/x/b&to=c1/x/c&port=80&protocol=TCP")
    assert explained["allowed"] is True and explained["ingress"]["would_deny"] is True

    shown = in_node(node_ns, MCNP, "observe", "--node", api, "--no-follow", "--verdict", "would-deny", "--last", "50")
    assert any("c1/x/b" in line and "-> c1/x/c TCP/80" in line and "WOULD-DENY" in line and "c1/x/c-in" in line
               for line in shown.splitlines()), shown
    metrics = in_node(node_ns, "curl", "-s", f"http://{api}/metrics")
    assert 'mcnp_policy_verdicts_total{direction="ingress",policy="c1/x/c-in",verdict="would-deny"}' in metrics
    assert any(line.startswith("mcnp_verdicts_total{") and 'verdict="would-deny"' in line and 'reason="would_deny"' in line
               for line in metrics.splitlines()), metrics
