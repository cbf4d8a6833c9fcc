"""Every shared truth table, through ``mcnp matrix`` as a user runs it.

The netpol-e2e cases are upstream's single-cluster e2e truth tables; the multicluster
cases exercise NPEP-308 and form the ``MultiClusterNetworkPolicyLabelExtensions``
conformance profile (``pytest -m MultiClusterNetworkPolicyLabelExtensions``).
"""

import io
import json
import os
from contextlib import redirect_stdout

import pytest

from control.cli import main
from tests.cases import case_files, cluster_args, load_case, probe_groups, write_case

E2E = case_files("netpol-e2e")
MULTICLUSTER = case_files("multicluster")
ENGINES = ["reference", "compiled"]


def run_matrix(argv: list[str]) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["matrix", *argv, "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def check_case(path: str, engine: str, tmp_path) -> None:
    case = load_case(path)
    specs = write_case(case, str(tmp_path))
    for (port, protocol), expected in probe_groups(case).items():
        result = run_matrix([*cluster_args(specs), "--port", str(port), "--protocol", protocol, "--engine", engine])
        got = {(p["from"], p["to"]): p["allowed"] for p in result["probes"]}
        wrong = [f"{src} -> {dst}: expected {'allowed' if want else 'denied'}" for (src, dst), want in expected.items() if got.get((src, dst)) != want]
        assert not wrong, f"{os.path.basename(path)} ({engine}, {protocol}/{port}): {len(wrong)} of {len(expected)} probes differ:\n" + "\n".join(wrong[:20])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", E2E, ids=[os.path.basename(p)[:-5] for p in E2E])
def test_netpol_e2e_truth_table(path, engine, tmp_path):
    check_case(path, engine, tmp_path)


@pytest.mark.MultiClusterNetworkPolicyLabelExtensions
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", MULTICLUSTER, ids=[os.path.basename(p)[:-5] for p in MULTICLUSTER])
def test_multicluster_truth_table(path, engine, tmp_path):
    check_case(path, engine, tmp_path)
