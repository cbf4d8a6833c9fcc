"""The live page in a real headless browser: served by a real ``mcnp run`` on the demo's
manifest directories (no dataplane needed), it shows the same matrix as ``mcnp
matrix``, explains a pair, and follows a policy file change without a reload.

Set ``MCNP_PAGE_SCREENSHOT=PATH`` to keep the screenshot (docs/img/live-page.png is one).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml

from control.cli import main as cli_main

from .browser import Browser, find_chromium
from .daemon_harness import write_yaml
from .demo_copy import DEMO, copy_demo

MCNP = os.path.join(os.path.dirname(sys.executable), "mcnp")

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="needs chromium (./dev setup installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_dirs(tmp_path):
    return copy_demo(tmp_path)


@pytest.fixture
def daemon(demo_dirs, tmp_path):
    """``mcnp run`` on the demo's directories (relative to its working directory, so the
    page names them as an operator would), on a free loopback port; ended by PID."""
    port = free_port()
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([MCNP, "run", "--node-name", "east-1", "--local-cluster", "east",
                             "--cluster", "east=dir:east", "--cluster", "west=dir:west",
                             "--api-listen", f"127.0.0.1:{port}", "--no-dataplane"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"mcnp run exited: {(tmp_path / 'daemon.log').read_text()}")
            subprocess.run(["sleep", "0.05"])
        else:
            pytest.fail("mcnp run not ready within 10 s")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def expected_matrix(demo_dirs, capsys) -> dict:
    code = cli_main(["matrix", "--cluster", f"east={demo_dirs['east']}", "--cluster", f"west={demo_dirs['west']}",
                     "--port", "80", "--protocol", "TCP", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return {(p["from"], p["to"]): p["allowed"] for p in json.loads(out)["probes"]}


CELLS = "Object.fromEntries([...document.querySelectorAll('#matrix td.cell')].map(c => [c.dataset.from + ' ' + c.dataset.to, c.dataset.allowed === 'true']))"
TESTER_TO_API = "document.querySelector('#matrix td[data-from=\"west/dev/tester\"][data-to=\"east/shop/api\"]')"


def test_page_shows_the_matrix_explains_and_follows_a_policy_change(daemon, demo_dirs, tmp_path, capsys):
    want = expected_matrix(demo_dirs, capsys)
    assert want[("west/dev/tester", "east/shop/api")] is True

    async def main():
        async with Browser(str(tmp_path / "profile")) as b:
            await b.goto(daemon + "/")
            await b.wait_for(f"{TESTER_TO_API} !== null", timeout=15)
            cells = await b.evaluate(CELLS)
            assert {tuple(k.split(" ")): v for k, v in cells.items()} == want
            assert await b.evaluate("document.querySelector('#clusters tbody').rows.length") == 2
            assert await b.wait_for("document.getElementById('ready').textContent") == "yes"

            await b.evaluate(f"{TESTER_TO_API}.click()")
            verdict = await b.wait_for("document.getElementById('explain-verdict')?.textContent")
            assert verdict == "west/dev/tester → east/shop/api TCP/80: ALLOWED"
            shot = tmp_path / "page.png"
            await b.screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("MCNP_PAGE_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["MCNP_PAGE_SCREENSHOT"])

            # The demo's live change: production stops admitting west's dev namespace.
            revision = int(await b.evaluate("document.getElementById('revision').textContent"))
            path = os.path.join(demo_dirs["east"], "policies.yaml")
            with open(os.path.join(DEMO, "change", "api-from-frontends.yaml")) as f:
                changed = yaml.safe_load(f)
            with open(path) as f:
                docs = [changed if d["metadata"]["name"] == changed["metadata"]["name"] else d for d in yaml.safe_load_all(f)]
            write_yaml(path, yaml.safe_dump_all(docs))
            await b.wait_for(f"{TESTER_TO_API}.dataset.allowed === 'false'", timeout=10)
            assert int(await b.evaluate("document.getElementById('revision').textContent")) > revision
            after = await b.evaluate(CELLS)
            changed_cells = {k for k in after if after[k] != cells[k]}
            assert "west/dev/tester east/shop/api" in changed_cells
            assert all(not after[k] for k in changed_cells)  # the change only takes away
            base = daemon + "/"
            assert b.requests and all(u.startswith(base) for u in b.requests), b.requests

    asyncio.run(main())
