"""``mcnp demo`` end to end, as a newcomer runs it: real daemons, real connections,
a live change; it must pass and leave no network namespace behind."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, XDP, AF_XDP")
def test_demo_passes_and_cleans_up(tmp_path):
    prefix = f"mcnpt-{os.getpid()}-demo-"
    env = dict(os.environ, MCNP_TESTBED_DIR=str(tmp_path / "testbed"), MCNP_TESTBED_PREFIX=prefix)
    mcnp = os.path.join(os.path.dirname(sys.executable), "mcnp")
    try:
        proc = subprocess.run([mcnp, "demo"], env=env, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "PASS" in proc.stdout and "allowed -> denied" in proc.stdout
    finally:
        leftover = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split() if n.startswith(prefix)]
        if leftover:  # clean up for the next test, then fail
            subprocess.run([mcnp, "testbed", "down"], env=env, capture_output=True, timeout=60)
        assert not leftover, f"demo left network namespaces behind: {leftover}"
