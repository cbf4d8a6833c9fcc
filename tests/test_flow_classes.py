"""Flow classes end to end without sockets: the pipeline records the class of a new
flow it admits, the hook (BPF_PROG_RUN) admits the class's next new flows by itself,
the worker folds what it admitted into the rule hits, and a re-check on new tables
keeps, re-stamps or removes classes as it does flows.

World of tests/test_audit.py, pipeline of tests/test_audit_pipeline.py: ``b-in``
admits TCP 80 into b from a; ``c-in`` admits TCP 80 into c from a and is left out
of the tables "with audit" (so c is not isolated there) — the tables of full
enforcement deny b -> c.  Pod a is zone 1, b zone 2, c zone 3.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import netns_util as nu
from tests.frames import frame
from tests.test_audit import IPS
from tests.test_audit_pipeline import compiled, pipeline, run, use  # noqa: F401 (fixture)

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not nu.is_root(), reason="BPF maps need root")]

from fastpath import flows as F  # noqa: E402
from fastpath import kernel as K  # noqa: E402

ZONE = {"a": 1, "b": 2, "c": 3}


def classes(kern) -> dict[tuple, dict]:
    keys, vals = kern.dump(which=K.CLASSES)
    return {(int(k["zone"]), int(k["kind"]), int(k["pod_port"]), int(k["peer_port"]), K.addr_str(k["peer_addr"])):
            {"revision": int(v["revision"]), "egress": int(v["rule_egress"]), "ingress": int(v["rule_ingress"]),
             "admitted": int(v["packets"][0]), "opener": int(v["opener"])}
            for k, v in zip(keys, vals)}


def into(kern, src: str, dst: str, sport: int, flags: int = 0x02) -> str:
    """A first packet from ``src`` to ``dst``:80 at the ingress hook of ``dst`` (its
    socket slot 0 holds a socket of this process: the daemon is there)."""
    kern.set_pod(ZONE[dst], [IPS[dst]], None, ready=True, isolated=False)
    return kern.test_run(frame(IPS[src], IPS[dst], 6, sport, 80, flags=flags), ZONE[dst], K.INGRESS)


@pytest.fixture(autouse=True)
def judge_present(pipeline):
    with nu.socket_in_slot(pipeline[0], 0):
        yield


def test_admitted_flows_leave_their_class_and_denied_or_audited_ones_none(pipeline):
    kern, pipe = pipeline
    tables, audit_tables = compiled(1)
    use(kern, pipe, tables, audit_tables)
    reasons, _, _ = run(pipe, [("a", "b", 41000), ("c", "b", 41001), ("b", "c", 41002)])
    assert reasons == ["allowed", "denied_ingress", "would_deny"]
    got = classes(kern)
    assert list(got) == [(ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]
    c = got[(ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]
    assert c["revision"] == 1 and c["opener"] == K.INGRESS and c["admitted"] == 0
    assert c["ingress"] >= 0 and tables.rules[c["ingress"]]  # the rule of b-in that admitted it


def test_the_hook_admits_the_next_flows_of_the_class_and_the_rule_hits_count_them(pipeline):
    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    assert run(pipe, [("a", "b", 41000)])[0] == ["allowed"]
    rule = classes(kern)[(ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]["ingress"]
    assert pipe.rule_hits[rule] == 1  # the flow userspace judged
    for sport in range(41001, 41011):
        assert into(kern, "a", "b", sport) == "pass"
    assert into(kern, "c", "b", 42000) == "redirect"  # no class of c: judged in userspace
    seen = F.fold_class_hits(kern, tables.revision, pipe.rule_hits, {})
    assert pipe.rule_hits[rule] == 11
    seen = F.fold_class_hits(kern, tables.revision, pipe.rule_hits, seen)
    assert pipe.rule_hits[rule] == 11  # folded once
    shown = F.class_listing(kern, 10, {ZONE["b"]: "c1/x/b"})
    assert len(shown) == 1 and {k: shown[0][k] for k in ("pod", "src", "dst", "sport", "dport", "protocol",
                                                          "direction", "admitted", "rule_ingress")} == \
        {"pod": "c1/x/b", "src": IPS["a"], "dst": IPS["b"], "sport": None, "dport": 80, "protocol": "TCP",
         "direction": "ingress", "admitted": 10, "rule_ingress": rule}
    # a flow of the class that reached userspace anyway (queued before the class was
    # written) neither resets the class nor its count
    assert run(pipe, [("a", "b", 41020)])[0] == ["allowed"]
    assert classes(kern)[(ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]["admitted"] == 10
    assert into(kern, "a", "b", 41021) == "pass"
    seen = F.fold_class_hits(kern, tables.revision, pipe.rule_hits, seen)
    assert pipe.rule_hits[rule] == 13  # 1 + 10 + the one judged again + 1
    # a class idle past its timeout is written again when one of its flows is judged,
    # and keeps its count
    ck = (ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])
    before = kern.dump(which=K.CLASSES)[1]["last_ns"][0]
    pipe.set_tables(tables, dict(K.DEFAULT_TIMEOUTS, tcp_opening=1e-9))
    assert run(pipe, [("a", "b", 41030)])[0] == ["allowed"]
    assert kern.dump(which=K.CLASSES)[1]["last_ns"][0] > before
    assert classes(kern)[ck]["admitted"] == 11
    F.fold_class_hits(kern, tables.revision, pipe.rule_hits, seen)
    assert pipe.rule_hits[rule] == 14


def test_a_recheck_removes_classes_the_new_tables_deny_and_restamps_the_rest(pipeline):
    kern, pipe = pipeline
    with_audit, full = compiled(1)[0], compiled(2)[1]
    use(kern, pipe, with_audit, None)  # c-in left out: c is not isolated
    assert run(pipe, [("b", "c", 41000), ("a", "c", 41001)])[0] == ["allowed", "allowed"]
    assert len(classes(kern)) == 2
    pods = {ZONE[n]: [ip] for n, ip in IPS.items()}
    done = F.recheck(kern, full, K.DEFAULT_TIMEOUTS, pods)
    got = classes(kern)
    assert done["classes"] == 1 and list(got) == [(ZONE["c"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]
    assert got[(ZONE["c"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])]["revision"] == 2
    assert into(kern, "b", "c", 41002) == "redirect"  # the denied class is gone: judged in userspace
    assert into(kern, "a", "c", 41003) == "pass"
    F.recheck(kern, full, K.DEFAULT_TIMEOUTS, {})  # c's pod gone: its classes go
    assert classes(kern) == {}


def test_a_hand_over_that_keeps_the_revision_leaves_what_the_hooks_counted(pipeline, monkeypatch):
    """A hand-over of pods or Services only (same tables revision) re-checks every entry,
    but the hooks go on admitting and counting meanwhile: an entry read before they did
    must not be written back over what they did (flows the class admitted, which the rule
    hits are folded from, and the flow's own counters)."""
    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    assert run(pipe, [("a", "b", 41000)])[0] == ["allowed"]
    for sport in range(41001, 41004):
        assert into(kern, "a", "b", sport) == "pass"
    ck = (ZONE["b"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])
    assert classes(kern)[ck]["admitted"] == 3
    dump = kern.dump

    def dump_then_the_hooks_go_on(*args, **kwargs):  # the hooks run between read and write
        got = dump(*args, **kwargs)
        assert into(kern, "a", "b", 41100 + len(calls)) == "pass"
        calls.append(1)
        return got
    calls: list[int] = []
    monkeypatch.setattr(kern, "dump", dump_then_the_hooks_go_on)
    pods = {ZONE[n]: [ip] for n, ip in IPS.items()}
    done = F.recheck(kern, tables, K.DEFAULT_TIMEOUTS, pods)
    monkeypatch.setattr(kern, "dump", dump)
    assert done["classes"] == 1 and len(calls) == 2  # flows, then classes
    assert classes(kern)[ck]["admitted"] == 3 + 2  # nothing the hooks admitted was lost
    keys, vals = kern.dump()
    first = [v for k, v in zip(keys, vals) if int(k["pod_port"]) == 80 and int(k["peer_port"]) == 41001]
    assert len(first) == 1 and int(first[0]["revision"]) == 1
    # a new revision re-stamps every entry (the hooks leave them alone until then)
    newer, _ = compiled(2)
    F.recheck(kern, newer, K.DEFAULT_TIMEOUTS, pods)
    assert classes(kern)[ck]["revision"] == 2 and classes(kern)[ck]["admitted"] == 5


def test_with_classes_off_every_new_flow_is_judged_in_userspace(pipeline):
    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    assert run(pipe, [("a", "b", 41000)])[0] == ["allowed"]
    F.recheck(kern, tables, K.DEFAULT_TIMEOUTS, {ZONE[n]: [ip] for n, ip in IPS.items()}, classes=False)
    assert classes(kern) == {}
    pipe.set_tables(tables, K.DEFAULT_TIMEOUTS, None, classes=False)
    assert run(pipe, [("a", "b", 41001)])[0] == ["allowed"]
    assert classes(kern) == {} and into(kern, "a", "b", 41002) == "redirect"
    assert np.count_nonzero(pipe.rule_hits) >= 1


def test_expiry_removes_idle_flows_and_classes_and_those_of_pods_gone(pipeline):
    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    assert run(pipe, [("a", "b", 41000), ("a", "b", 41001)])[0] == ["allowed", "allowed"]
    pods = {ZONE[n]: [ip] for n, ip in IPS.items()}
    assert F.expire(kern, K.DEFAULT_TIMEOUTS, pods) == (0, {K.FLOWS: 2, K.CLASSES: 1})
    later = K.now_ns() + int(K.DEFAULT_TIMEOUTS["tcp_opening"] * 1e9) + 1
    assert F.expire(kern, K.DEFAULT_TIMEOUTS, pods, now_ns=later) == (2, {K.FLOWS: 0, K.CLASSES: 0})
    assert run(pipe, [("a", "b", 41002)])[0] == ["allowed"]
    del pods[ZONE["b"]]  # b's sandbox is gone
    assert F.expire(kern, K.DEFAULT_TIMEOUTS, pods) == (1, {K.FLOWS: 0, K.CLASSES: 0})


def test_classes_to_service_addresses_last_until_the_next_hand_over_unless_deferred(pipeline):
    """A ClusterIP whose endpoints are all pods of the cluster (``defer``: the backend's
    end judges) keeps its class across a re-check; one judged here against its endpoint
    list loses it at the next hand-over, whose endpoints may differ."""
    from tests.frames import frame as mkframe
    from tests.test_audit_pipeline import SLOT

    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    vips = {"defer": "198.18.41.1", "judged": "198.18.41.2"}
    pipe.set_services([{"ip": vips["defer"], "protocol": 6, "port": 80, "defer": True, "endpoints": []},
                       {"ip": vips["judged"], "protocol": 6, "port": 80, "defer": False,
                        "endpoints": [(IPS["b"], 80)]}])
    buf = np.zeros(2 * SLOT, dtype=np.uint8)
    lens = np.zeros(2, dtype=np.uint32)
    for i, vip in enumerate(vips.values()):
        f = mkframe(IPS["a"], vip, 6, 41000 + i, 80)
        buf[i * SLOT:i * SLOT + len(f)] = np.frombuffer(f, dtype=np.uint8)
        lens[i] = len(f)
    pipe.process(buf, np.arange(2, dtype=np.uint64) * np.uint64(SLOT), lens, np.zeros(2, dtype=np.int16), 2)
    assert [pipe.reasons(2)[i] for i in range(2)] == [2, 2]  # allowed, both
    got = classes(kern)
    assert set(got) == {(ZONE["a"], K.CLASS_KINDS[K.EGRESS], 0, 80, vip) for vip in vips.values()}
    F.recheck(kern, tables, K.DEFAULT_TIMEOUTS, {ZONE[n]: [ip] for n, ip in IPS.items()}, pipe.services)
    assert set(classes(kern)) == {(ZONE["a"], K.CLASS_KINDS[K.EGRESS], 0, 80, vips["defer"])}


def test_a_policy_put_in_audit_mode_removes_the_classes_it_would_deny(pipeline):
    """b -> c is admitted while c-in is left out of the tables (c not isolated) and
    nothing is audited: its class is made. Once c-in is in audit mode, the re-check
    removes that class, so the next b -> c flow is judged — and logged would_deny."""
    kern, pipe = pipeline
    with_audit, full = compiled(1)
    use(kern, pipe, with_audit, None)
    assert run(pipe, [("b", "c", 41000), ("a", "c", 41001)])[0] == ["allowed", "allowed"]
    pods = {ZONE[n]: [ip] for n, ip in IPS.items()}
    F.recheck(kern, with_audit, K.DEFAULT_TIMEOUTS, pods, audit_tables=full)
    assert set(classes(kern)) == {(ZONE["c"], K.CLASS_KINDS[K.INGRESS], 80, 0, IPS["a"])}
    use(kern, pipe, with_audit, full)
    assert into(kern, "b", "c", 41002) == "redirect"
    assert run(pipe, [("b", "c", 41002)])[0] == ["would_deny"]


@pytest.fixture
def big_cache():
    kern = K.Kernel(None, flow_capacity=65536)
    try:
        yield kern
    finally:
        kern.close()


def test_the_sweep_reads_a_full_cache_a_slice_at_a_time_and_misses_nothing(big_cache):
    """40,000 flows, half idle, swept 16,384 at a time: three slices, the last one ends
    the walk, every idle flow is gone, and the next walk starts over."""
    kern = big_cache
    n = 40000
    keys = np.zeros(n, dtype=K.FLOW_KEY)
    keys["zone"], keys["proto"] = ZONE["a"], 17
    keys["pod_port"], keys["peer_port"] = np.arange(n) % 50000, 9
    vals = np.zeros(n, dtype=K.FLOW)
    vals["state"], vals["revision"] = K.STATES.index("udp"), 1
    vals["last_ns"][: n // 2] = K.now_ns()  # half of them fresh
    kern.update(keys, vals)
    walk, removed, read, slices = K.Walk(), 0, 0, 0
    pods = {ZONE[x]: [ip] for x, ip in IPS.items()}
    while True:
        gone, seen = F.expire_slice(kern, walk, 16384, K.DEFAULT_TIMEOUTS, pods)
        removed, read, slices = removed + gone, read + seen, slices + 1
        assert slices <= 4
        if walk.done:
            break
    assert (removed, read, slices) == (n // 2, n, 3)
    assert len(kern.dump()[0]) == n // 2
    assert F.expire_slice(kern, walk, 16384, K.DEFAULT_TIMEOUTS, pods)[1] > 0  # starts over
