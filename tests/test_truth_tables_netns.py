"""Shared truth tables through the real dataplane: `mcnp testbed` hosts, a daemon per
node, real TCP and UDP connections for every probe — checked against both the case's
expectation and `mcnp matrix`. Self pairs are skipped (rule S7: a connection to a pod's
own IP never leaves it); SCTP cases are judged from crafted frames elsewhere
(tests/test_loop_netns.py), this kernel has no SCTP sockets."""

import os

import pytest

from control.lab import probe, testbed
from control.semantics.manifests import load_clusterset
from control.compile.matrix import compiled_matrix
from tests.cases import case_files, load_case, probe_groups, write_case

pytestmark = [pytest.mark.privileged, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, XDP, AF_XDP")]

E2E = [p for p in case_files("netpol-e2e") if any(k in os.path.basename(p) for k in (
    "deny-ingress-from-pods-on-other-namespaces",
    "enforce-egress-policy-allowing-traffic-to-a-server-in-a-different-namespace",
    "allow-ingress-access-on-one-named-port--step2",
    "udp-enforce-policy-to-allow-traffic-only-from-a-pod",
    "enforce-except-clause-while-egress-access",
))]
MULTICLUSTER = case_files("multicluster")


def run_case(path, tmp_path, cni="ptp"):
    case = load_case(path)
    specs = write_case(case, str(tmp_path / "clusters"))
    prefix = f"mcnpt-{os.getpid()}-tt-"
    state_dir = str(tmp_path / "testbed")
    log = []
    code = testbed.up(specs, mode="mcnp", cni=cni, log=log.append, prefix=prefix, state_dir=state_dir)
    try:
        assert code == 0, "\n".join(log)
        state = testbed.load_state(state_dir)
        cset, _ = load_clusterset(specs)
        pods = {p.ref: p for p in cset.pods() if p.can_take_part}
        refs = sorted(pods)
        for (port, protocol), expected in probe_groups(case).items():
            pairs = [(s, d) for (s, d) in expected if s != d]
            observed = probe.probe_many([(state["pods"][s]["netns"], str(pods[d].ip), port, protocol) for s, d in pairs])
            matrix = compiled_matrix(cset, [pods[r] for r in refs], [pods[r] for r in refs], port, protocol)
            index = {r: i for i, r in enumerate(refs)}
            wrong = [f"{s} -> {d} {protocol}/{port}: observed {'allowed' if o else 'denied'}, expected {'allowed' if expected[(s, d)] else 'denied'}"
                     for (s, d), o in zip(pairs, observed) if o != expected[(s, d)]]
            assert not wrong, f"{len(wrong)} of {len(pairs)} real connections differ:\n" + "\n".join(wrong[:20])
            assert all(matrix[index[s], index[d]] == expected[(s, d)] for s, d in pairs)
    finally:
        testbed.down(state_dir=state_dir, log=log.append)


@pytest.mark.parametrize("path", E2E, ids=[os.path.basename(p)[:40] for p in E2E])
def test_e2e_truth_table_with_real_connections(path, tmp_path):
    run_case(path, tmp_path)


@pytest.mark.MultiClusterNetworkPolicyLabelExtensions
@pytest.mark.parametrize("cni", ["ptp", "bridge"])
@pytest.mark.parametrize("path", MULTICLUSTER, ids=[os.path.basename(p)[:-5] for p in MULTICLUSTER])
def test_multicluster_truth_table_with_real_connections(path, tmp_path, cni):
    """Both kinds of CNI: routed (ptp) and one L2 segment (bridge), where broadcasts and
    ARP reach every pod of a node."""
    run_case(path, tmp_path, cni)
