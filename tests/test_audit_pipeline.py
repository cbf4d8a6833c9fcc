"""Audit mode in the packet loop (``Pipeline.process``, no sockets): frames judged by
the enforced tables and again by the audit tables in the same batch, one C call.

World of tests/test_audit.py: ``b-in`` (enforced) admits TCP 80 into b from a;
``c-in`` (audit) admits TCP 80 into c from a; ``b-try`` (audit) would admit TCP 80
into b from c. Hooks: pod a ports 0 (egress) and 1 (ingress), b 2 and 3, c 4 and 5.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastpath.kernel import addr_str
from tests import netns_util as nu
from tests.frames import frame
from tests.test_audit import IPS, world

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not nu.is_root(), reason="BPF maps need root")]

SLOT = 256
INGRESS_PORT = {"a": 1, "b": 3, "c": 5}


def compiled(revision: int):
    from control.compile.compiler import compile_tables
    from control.semantics.audit import AuditScope

    cset = world()
    return (compile_tables(cset, lambda p: True, revision, audited=AuditScope().covers),
            compile_tables(cset, lambda p: True, revision))


@pytest.fixture
def pipeline():
    from fastpath import kernel as K
    from fastpath.counters import Counters
    from fastpath.loop import Pipeline

    kern = K.Kernel(None, flow_capacity=1024)
    pipe = Pipeline(kern, Counters(), 16, max_ports=6)
    for i, (name, ip) in enumerate(IPS.items()):
        pipe.set_hook(2 * i, zone=i + 1, peer=2 * i + 1, role=K.EGRESS, ips=[ip], ready=True)
        pipe.set_hook(2 * i + 1, zone=i + 1, peer=2 * i, role=K.INGRESS, ips=[ip], ready=True)
    pipe.ensure_ports(6)
    try:
        yield kern, pipe
    finally:
        kern.close()


def use(kern, pipe, tables, audit_tables) -> None:
    from fastpath import kernel as K

    kern.set_config(tables.revision, K.DEFAULT_TIMEOUTS)
    pipe.set_tables(tables, K.DEFAULT_TIMEOUTS, audit_tables)
    pipe.set_rule_hits(np.zeros(len(tables.rules) + 1, dtype=np.int64))


def run(pipe, flows: list[tuple[str, str, int]]):
    """Each (source pod, destination pod, sport) as a TCP SYN to port 80 arriving at the
    destination's ingress hook. Returns (reason names, sent addresses, new log rows)."""
    from fastpath.counters import REASONS

    n = len(flows)
    buf = np.zeros(n * SLOT, dtype=np.uint8)
    lens = np.zeros(n, dtype=np.uint32)
    for i, (src, dst, sport) in enumerate(flows):
        f = frame(IPS[src], IPS[dst], 6, sport, 80)
        buf[i * SLOT:i * SLOT + len(f)] = np.frombuffer(f, dtype=np.uint8)
        lens[i] = len(f)
    addrs = np.arange(n, dtype=np.uint64) * np.uint64(SLOT)
    in_port = np.array([INGRESS_PORT[dst] for _, dst, _ in flows], dtype=np.int16)
    before = int(pipe.counters.log_seq[0])
    sends, drops = pipe.process(buf, addrs, lens, in_port, n)
    sent = sorted(int(a) // SLOT for _, out in sends for a in out)
    rows = pipe.counters.recent(before - 1, 100)
    return [REASONS[r] for r in pipe.reasons(n)], sent, rows


def test_would_be_drops_pass_and_are_recorded_while_enforced_denials_stay(pipeline):
    from fastpath.counters import REASON
    from fastpath.tables import DENIED, NOT_ENFORCED

    kern, pipe = pipeline
    tables, audit_tables = compiled(1)
    use(kern, pipe, tables, audit_tables)
    flows = [("b", "c", 41000), ("a", "c", 41001), ("c", "b", 41002), ("a", "b", 41003)]
    reasons, sent, rows = run(pipe, flows)
    assert reasons == ["would_deny", "allowed", "denied_ingress", "allowed"]
    assert sent == [0, 1, 3]  # the would-be drop passes; c->b stays denied (b-try does not widen b-in)
    by_src = {(addr_str(r["src"]), addr_str(r["dst"])): r for r in rows}
    would = by_src[(IPS["b"], IPS["c"])]
    assert would["allowed"] == 1 and would["reason"] == REASON["would_deny"] and would["rule_ingress"] == DENIED
    assert would["revision"] == tables.revision
    admitted = by_src[(IPS["a"], IPS["c"])]  # c-in would admit it: recorded as the enforced tables saw it
    assert admitted["reason"] == REASON["allowed"] and admitted["rule_ingress"] == NOT_ENFORCED
    assert by_src[(IPS["c"], IPS["b"])]["allowed"] == 0
    v = pipe.counters.verdicts
    assert v[0, REASON["would_deny"]] == 1 and v[1, REASON["denied_ingress"]] == 1 and v.sum() == 4


def test_without_audit_tables_nothing_is_judged_twice(pipeline):
    kern, pipe = pipeline
    tables, _ = compiled(1)
    use(kern, pipe, tables, None)
    reasons, sent, _ = run(pipe, [("b", "c", 42000), ("c", "b", 42001)])
    assert reasons == ["allowed", "denied_ingress"] and sent == [0]
    assert pipe.audit_verdicts(1) is None


def test_a_recheck_on_new_tables_uses_the_enforced_tables_and_records_no_would_deny(pipeline):
    kern, pipe = pipeline
    tables, audit_tables = compiled(1)
    use(kern, pipe, tables, audit_tables)
    assert run(pipe, [("b", "c", 43000)])[0] == ["would_deny"]
    assert run(pipe, [("b", "c", 43000)])[0] == ["established"]  # the cached flow: no second record
    tables2, audit2 = compiled(2)
    use(kern, pipe, tables2, audit2)
    reasons, sent, rows = run(pipe, [("b", "c", 43000)])
    assert reasons == ["rechecked"] and sent == [0] and [int(r["revision"]) for r in rows] == [2]
