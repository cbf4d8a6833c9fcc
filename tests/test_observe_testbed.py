"""``mcnp observe`` on the demo's testbed: real pods, real daemons, real packet loops.
A denied and an admitted connection to east/shop/api show up on node east-1 with the
policy that decided them, and ``/metrics`` counts them per policy and reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .demo_copy import copy_demo

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
MCNP = os.path.join(os.path.dirname(sys.executable), "mcnp")

CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(1.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError:
    print("failed")
"""


def in_netns(netns: str, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and the dataplane")
def test_observe_shows_the_demos_denied_connection_and_its_policy(tmp_path):
    dirs = copy_demo(tmp_path)
    env = dict(os.environ, MCNP_TESTBED_DIR=str(tmp_path / "testbed"), MCNP_TESTBED_PREFIX=f"mcnpt-{os.getpid()}-obs-")
    up = subprocess.run([MCNP, "testbed", "up", "--cluster", f"east={dirs['east']}", "--cluster", f"west={dirs['west']}",
                         "--json"], capture_output=True, text=True, timeout=180, env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        bed = json.loads(up.stdout)
        pods, node = bed["pods"], bed["nodes"]["east/east-1"]
        api = pods["east/shop/api"]["ip"]
        denied = in_netns(pods["east/ops/monitor"]["netns"], sys.executable, "-c", CONNECT, api, "80")
        admitted = in_netns(pods["west/shop/web"]["netns"], sys.executable, "-c", CONNECT, api, "80")
        assert (denied.stdout.strip(), admitted.stdout.strip()) == ("failed", "connected")

        # lines name the source port too: "east/ops/monitor:51210 -> east/shop/api TCP/80 ..."
        denial = ("east/ops/monitor:", "-> east/shop/api TCP/80 ingress DENIED", "(east/shop/api-from-frontends)")
        admission = ("west/shop/web:", "-> east/shop/api TCP/80 ingress ALLOWED by east/shop/api-from-frontends ingress[0]")
        for _ in range(20):  # the daemon reads the packet loop's records every 0.25 s
            out = in_netns(node["netns"], MCNP, "observe", "--node", node["api"], "--no-follow", "--last", "50")
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            if any(all(part in line for part in denial) for line in lines) and \
                    any(all(part in line for part in admission) for line in lines):
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"observe did not show both connections: {lines}")

        metrics = in_netns(node["netns"], "curl", "-s", f"http://{node['api']}/metrics").stdout
        assert 'mcnp_policy_verdicts_total{direction="ingress",policy="east/shop/api-from-frontends",verdict="denied"}' in metrics
    finally:
        down = subprocess.run([MCNP, "testbed", "down"], capture_output=True, text=True, timeout=120, env=env)
        assert down.returncode == 0, down.stderr
