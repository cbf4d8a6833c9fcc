"""Rule M8 without failing open: when a remote cluster reports the IP of one of this
node's pods, the address becomes unknown as a peer (only ipBlock matches it), but the
local pod is still judged for its own isolation — another cluster cannot lift a local
pod's policies by claiming its address."""

import ipaddress

import numpy as np
import pytest

from control.compile.compiler import compile_tables
from fastpath import match
from fastpath.tables import ip_key
from tests.builders import make_clusterset, make_pod, make_policy

pytestmark = pytest.mark.MultiClusterNetworkPolicyLabelExtensions

ENGINES = ["numpy"] + (["c"] if match.HAVE_C else [])


def world():
    deny_in = make_policy("x", "deny-in", {"matchLabels": {"app": "api"}}, ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "ok"}}}]}])
    deny_out = make_policy("x", "deny-out", {"matchLabels": {"app": "api"}}, egress=[{"to": [{"ipBlock": {"cidr": "198.18.9.0/24"}}]}], types=["Egress"])
    return make_clusterset({
        "c1": [make_pod("x", "api", "198.18.1.1", {"app": "api"}), make_pod("x", "ok", "198.18.1.2", {"app": "ok"}),
               make_pod("x", "other", "198.18.1.3", {"app": "other"}), deny_in, deny_out],
        "c2": [make_pod("x", "impostor", "198.18.1.1", {"app": "ok"})],
    })


def judge(engine, tables, pairs, port=80, proto=6):
    src = np.array([np.frombuffer(ip_key(ipaddress.ip_address(s)), np.uint8) for s, _ in pairs])
    dst = np.array([np.frombuffer(ip_key(ipaddress.ip_address(d)), np.uint8) for _, d in pairs])
    n = len(pairs)
    fn = match.judge_numpy if engine == "numpy" else match.judge_c
    return fn(tables, src, dst, np.full(n, proto, np.uint8), np.full(n, port, np.uint16))


@pytest.mark.parametrize("engine", ENGINES)
def test_local_pod_with_conflicted_ip_stays_isolated(engine):
    cset = world()
    tables = compile_tables(cset, lambda p: p.cluster == "c1" and p.name == "api", 1)
    assert tables.meta["conflicted_ips"] == 1
    assert "198.18.1.1" in tables.local_endpoint_ips()
    j = judge(engine, tables, [("198.18.1.3", "198.18.1.1"), ("198.18.1.2", "198.18.1.1"),
                               ("198.18.1.1", "198.18.1.3"), ("198.18.1.1", "198.18.9.9")])
    # ingress to the local api: still isolated; `other` is denied, `ok` admitted
    assert j.ingress[0] == match.DENIED and j.ingress[1] >= 0
    # egress from the local api: still isolated; only 198.18.9.0/24 admitted
    assert j.egress[2] == match.DENIED and j.egress[3] >= 0
    assert j.allowed.tolist() == [False, True, False, True]


@pytest.mark.parametrize("engine", ENGINES)
def test_conflicted_ip_as_a_peer_is_unknown(engine):
    cset = world()
    # compiled for the node of `ok`'s neighbour: api's address is only a peer here
    policy = make_policy("x", "from-ok", {"matchLabels": {"app": "other"}}, ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "ok"}}}]}])
    cset = make_clusterset({"c1": [make_pod("x", "other", "198.18.1.3", {"app": "other"}), make_pod("x", "ok", "198.18.1.2", {"app": "ok"}), policy],
                            "c2": [make_pod("x", "impostor", "198.18.1.2", {"app": "ok"})]})
    tables = compile_tables(cset, lambda p: p.name == "other", 1)
    j = judge(engine, tables, [("198.18.1.2", "198.18.1.3")])
    assert j.ingress[0] == match.DENIED  # the address two pods claim matches no podSelector
