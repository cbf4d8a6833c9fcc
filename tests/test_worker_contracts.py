"""Contracts of the packet loop's process and hand-over, each once broken (issue 11):
replies matched to their requests, rule hits that follow their rule across compiles,
``max_frames`` honoured under load, and tables the C matcher may trust."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from fastpath import shm
from fastpath.match import TablesError, check_tables
from tests import netns_util as nu


class FakeTables:
    def __init__(self, revision: int, rules: list[dict]):
        self.revision = revision
        self.rules = rules

    def pack(self):
        return {"revision": self.revision}, b"\0" * 8


def rule(policy: str, n: int = 0) -> dict:
    return {"policy": policy, "direction": "ingress", "rule": n, "peer": 0, "port": None}


def test_rule_hits_follow_their_rule_across_compiles():
    """A full compile numbers rules anew; hits counted under the old numbers stay with
    the rule they were counted for, and no total ever decreases."""
    pub = shm.TablesPublisher(shm.new_prefix(), 64)
    try:
        pub.publish(FakeTables(1, [rule("ns/a"), rule("ns/b")]), {})
        reader = shm.TablesReader(pub.prefix)
        gen, _, _, _, hits = reader.take()
        hits[0] += 5  # ns/a
        hits[1] += 2  # ns/b
        reader.in_force(gen)
        pub.publish(FakeTables(2, [rule("ns/b"), rule("ns/c"), rule("ns/a")]), {})  # renumbered
        gen, _, _, _, hits = reader.take()
        reader.in_force(gen)
        hits[0] += 1  # ns/b under its new number
        hits[2] += 1  # ns/a under its new number
        pub.publish(FakeTables(3, [rule("ns/c")]), {})  # reclaims revision 1's segment
        totals = {json.dumps(e["name"]["policy"]): e["hits"] for e in pub.rule_hits()}
        assert totals == {'"ns/a"': 6, '"ns/b"': 3}
    finally:
        pub.close()


def test_run_stops_at_max_frames_under_load():
    from fastpath.counters import Counters
    from fastpath.loop import DEFAULTS, Loop

    loop = object.__new__(Loop)
    loop.opt, loop.counters = dict(DEFAULTS), Counters()
    calls = []
    loop.step = lambda: calls.append(1) or 256  # never an idle batch
    assert loop.run(lambda: False, max_frames=1000) == 1024
    assert len(calls) == 4


def test_tables_whose_address_intervals_do_not_start_at_zero_are_refused():
    from control.compile.compiler import compile_tables
    from fastpath.tables import PolicyTables
    from tests.builders import make_clusterset, make_pod

    t = compile_tables(make_clusterset({"c1": [make_pod("default", "a", "198.18.0.1", {})]}),
                       lambda pod: True, 1)
    check_tables(t)
    arrays = {k: np.array(v) for k, v in t.arrays.items()}
    arrays["net_bounds"][0, 15] = 1
    with pytest.raises(TablesError, match="zero address"):
        check_tables(PolicyTables(2, arrays, list(t.rules)))


@pytest.mark.privileged
@pytest.mark.skipif(not nu.is_root(), reason="the worker opens BPF maps")
def test_a_late_reply_is_never_taken_for_another_request():
    from fastpath.worker import Dataplane, DataplaneError

    with Dataplane() as dp:
        dp.wait_ready(15)
        os.kill(dp._proc.pid, signal.SIGSTOP)  # the worker answers only once continued
        try:
            with pytest.raises(DataplaneError, match="did not answer"):
                dp._ask("stats", None, timeout=0.2)
        finally:
            os.kill(dp._proc.pid, signal.SIGCONT)
        assert dp.pods() == []  # the answer to this request, not the late stats
        assert isinstance(dp.stats(), dict)
