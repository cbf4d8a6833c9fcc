"""Recent verdicts of this node's packet loop, made readable for people.

The packet loop records each verdict as numbers only (addresses, ports, a rule id, the
tables revision): formatting text per packet would cost the hot path. This module is
the control side of that record. A :class:`VerdictFeed` asks the dataplane for new
records every ``poll_interval`` (``Dataplane.verdicts(after_seq, limit)``), resolves
addresses to pod references with the cluster state in force (rule M8: an address two
clusters claim stays unresolved) and rule ids to policy names with the tables of the
record's revision, keeps the last ``capacity`` records, counts them per reason and per
policy for ``/metrics``, and wakes the followers of ``/v1/verdicts?follow=true``.

Records that the dataplane's own ring overwrote before they were read show up as a gap
in ``seq``: they are counted as lost, never invented.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from control.node.config import parse_duration
from control.semantics.audit import NO_SETTING, AuditScope, enforced
from control.semantics.reference import EGRESS, INGRESS, ReferenceEvaluator

if TYPE_CHECKING:  # pragma: no cover
    from control.node.daemon import Daemon

logger = logging.getLogger(__name__)

VERDICTS = ("allowed", "denied", "would-deny")
#: How many resolved records the control side keeps.
CAPACITY = 10_000
#: How often the dataplane is asked for new records, seconds.
POLL_INTERVAL = 0.25
#: Most records taken from the dataplane in one poll.
POLL_LIMIT = 4096
#: Tables revisions whose rule names are kept to name the rules of older records.
REVISIONS_KEPT = 16


PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
#: The packet loop's reason for a flow admitted only because a policy is in audit.
WOULD_DENY_REASON = "would_deny"
#: A side's rule id when the tables deny it (``fastpath.tables.DENIED``).
DENIED_RULE = -1


def normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A record in the documented shape (``verdict``, ``protocol``, ``rule``, ``side``,
    ``time`` in unix seconds), also from the packet loop's raw log row (``allowed``,
    ``proto``, ``rule_egress``/``rule_ingress``, ``time_ns`` on CLOCK_MONOTONIC,
    ``reason`` as the index of ``fastpath.counters.REASONS``). ``side`` is the side that
    decided: the hook's for an admission, the side the tables denied for a denial and
    for a "would deny" (audit mode: the audit tables' rule ids)."""
    rec = dict(raw)
    if isinstance(rec.get("reason"), int):
        rec["reason"] = reason_name(rec["reason"])
    if "verdict" not in rec and "allowed" in rec:
        allowed = rec.pop("allowed")
        rec["verdict"] = "would-deny" if rec.get("reason") == WOULD_DENY_REASON else \
            "allowed" if allowed else "denied"
    if "protocol" not in rec and "proto" in rec:
        rec["protocol"] = PROTOCOL_NAMES.get(int(rec["proto"]), str(rec["proto"]))
    if "side" not in rec:
        rec["side"] = _deciding_side(rec)
    if "rule" not in rec:
        rec["rule"] = int(rec.get("rule_ingress" if rec["side"] == "ingress" else "rule_egress", -1))
    if "time" not in rec and "time_ns" in rec:
        rec["time"] = time.time() - (time.monotonic_ns() - int(rec["time_ns"])) / 1e9
    rec.setdefault("sport", None)
    rec.setdefault("pod", None)
    return rec


def _deciding_side(rec: Mapping[str, Any]) -> str:
    if rec.get("verdict") != "allowed":
        for side in ("egress", "ingress"):
            if rec.get(f"rule_{side}") == DENIED_RULE:
                return side
    return "egress" if rec.get("direction") == "egress" else "ingress"


def reason_name(index: int) -> str:
    try:
        from fastpath.counters import REASONS
    except ImportError:  # pragma: no cover - the dataplane's modules are not built
        return str(index)
    return REASONS[index] if 0 <= index < len(REASONS) else str(index)


class FilterError(ValueError):
    """A filter parameter that cannot be understood (the REST answer is a 400)."""


@dataclass(frozen=True)
class Filters:
    """Which records a query or a follower wants. Every field set must match."""

    verdicts: frozenset = frozenset()
    pod: Optional[str] = None  # glob on either end's pod reference
    namespace: Optional[str] = None  # either end's namespace
    cluster: Optional[str] = None  # either end's cluster
    since: Optional[float] = None  # unix seconds
    after: int = -1  # seq (the packet loop's first record is 0)

    @classmethod
    def parse(cls, query: Mapping[str, str], now: float) -> "Filters":
        """From REST parameters: ``verdict`` (comma-separated), ``pod`` (a reference or
        a glob), ``namespace``, ``cluster``, ``since`` (a duration ago such as ``5m``,
        an RFC 3339 time or unix seconds) and ``after`` (a ``seq``)."""
        verdicts = frozenset(v.strip().lower() for v in query.get("verdict", "").split(",") if v.strip())
        unknown = sorted(verdicts - set(VERDICTS))
        if unknown:
            raise FilterError(f"verdict {', '.join(unknown)} is not one of {', '.join(VERDICTS)}")
        after = query.get("after", "-1")
        if after != "-1" and not after.isdigit():
            raise FilterError(f"after {after!r} is not a sequence number")
        return cls(verdicts, query.get("pod") or None, query.get("namespace") or None,
                   query.get("cluster") or None, parse_since(query.get("since"), now), int(after))

    def match(self, record: Mapping[str, Any]) -> bool:
        if record["seq"] <= self.after:
            return False
        if self.verdicts and record["verdict"] not in self.verdicts:
            return False
        if self.since is not None and record["time"] < self.since:
            return False
        refs = [r for r in (record.get("src_pod"), record.get("dst_pod")) if r]
        parts = [r.split("/") for r in refs]
        if self.pod is not None and not any(fnmatch.fnmatchcase(r, self.pod) for r in refs):
            return False
        if self.cluster is not None and not any(p[0] == self.cluster for p in parts):
            return False
        if self.namespace is not None and not any(
                p[1] == self.namespace and (self.cluster is None or p[0] == self.cluster) for p in parts):
            return False
        return True


def parse_since(text: Optional[str], now: float) -> Optional[float]:
    """``since``: a duration ago (``30s``, ``5m``), an RFC 3339 time, or unix seconds."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value > 1e9:  # unix seconds, not a duration in seconds
            return value
        return now - value
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"since {text!r} is not a duration (30s, 5m), an RFC 3339 time or unix seconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


class Resolver:
    """Addresses → pod references and rule ids → policy names, cached per revision.
    ``audit`` is the node's audit setting: a denial names the policies enforcement
    isolates with, a "would deny" those full enforcement would (audit mode)."""

    def __init__(self, audit: AuditScope = NO_SETTING) -> None:
        self.audit = audit
        self._by_ip: dict[str, Optional[str]] = {}
        self._ip_revision: Optional[int] = None
        self._rules: "collections.OrderedDict[int, list]" = collections.OrderedDict()
        self._isolating: dict[tuple, list[tuple[str, bool]]] = {}
        self._enforced = None

    def remember_tables(self, tables: Any) -> None:
        """Keep the rule names of ``tables`` (a PolicyTables) for records of its revision."""
        if tables is None or getattr(tables, "revision", None) is None:
            return
        self._rules[tables.revision] = list(getattr(tables, "rules", []) or [])
        self._rules.move_to_end(tables.revision)
        while len(self._rules) > REVISIONS_KEPT:
            self._rules.popitem(last=False)

    def _pods_by_ip(self, snapshot: Any) -> dict[str, Optional[str]]:
        if snapshot is None:
            return {}
        if snapshot.revision != self._ip_revision:
            owners: dict[str, list[str]] = {}
            for pod in snapshot.cset.pods():
                if pod.can_take_part:
                    for ip in pod.ips:
                        owners.setdefault(str(ip), []).append(pod.ref)
            # Rule M8: an address claimed twice is no pod's; never guess.
            self._by_ip = {ip: refs[0] if len(refs) == 1 else None for ip, refs in owners.items()}
            self._ip_revision = snapshot.revision
            self._isolating.clear()
            self._enforced = None
        return self._by_ip

    def rule_name(self, revision: int, rule_id: int) -> Optional[Mapping[str, Any]]:
        rules = self._rules.get(revision)
        if rules is None or not isinstance(rule_id, int) or not 0 <= rule_id < len(rules):
            return None
        return rules[rule_id]

    def isolating(self, snapshot: Any, ref: Optional[str], direction: str, full: bool = False) -> list[tuple[str, bool]]:
        """The policies isolating pod ``ref`` for ``direction`` in the state in force, each
        with whether it is in audit: as enforced (audited policies left out), or with
        every policy (``full``: what full enforcement would do)."""
        if snapshot is None or ref is None:
            return []
        key = (ref, direction, full)
        if key not in self._isolating:
            if full:
                cset = snapshot.cset
            else:
                if self._enforced is None:
                    self._enforced = enforced(snapshot.cset, self.audit)
                cset = self._enforced
            pod = cset.pod(ref)
            found = ReferenceEvaluator(cset).isolating(pod, direction) if pod is not None else []
            self._isolating[key] = [(p.ref, self.audit.covers(p)) for p in found]
        return self._isolating[key]

    def resolve(self, raw: Mapping[str, Any], snapshot: Any) -> dict[str, Any]:
        """One dataplane record with pod references and the deciding policy added: the
        admitting rule of an admission; for a denial (or a "would deny") the policies
        isolating the pod on the side that denied, and which of them are in audit."""
        by_ip = self._pods_by_ip(snapshot)
        rec = normalize(raw)
        rec["src_pod"] = by_ip.get(str(raw.get("src")))
        rec["dst_pod"] = by_ip.get(str(raw.get("dst")))
        direction = EGRESS if raw.get("direction") == "egress" else INGRESS
        subject = rec.get("pod") or (rec["src_pod"] if direction == EGRESS else rec["dst_pod"])
        rec["pod"] = subject
        rec["cluster"] = subject.split("/")[0] if subject else None
        name = self.rule_name(int(rec.get("revision", -1)), int(rec["rule"])) if rec["verdict"] == "allowed" else None
        rec["policy"] = rec["policy_rule"] = None
        rec["policies"], rec["audit_policies"] = [], []
        if name is not None:
            side = "egress" if name.get("direction") == EGRESS else "ingress"
            rec["policy"] = name.get("policy")
            rec["policy_rule"] = f"{side}[{name.get('rule')}]"
            rec["policies"] = [name.get("policy")]
        elif rec["verdict"] != "allowed":
            side = EGRESS if rec["side"] == "egress" else INGRESS
            decider = subject if side == direction else rec["src_pod"] if side == EGRESS else rec["dst_pod"]
            found = self.isolating(snapshot, decider, side, full=rec["verdict"] == "would-deny")
            rec["policies"] = [ref for ref, _ in found]
            rec["audit_policies"] = [ref for ref, audited in found if audited]
        return rec


def describe(rec: Mapping[str, Any]) -> str:
    """One line for people (``mcnp observe`` and the log): time, pair, verdict, why."""
    stamp = datetime.datetime.fromtimestamp(rec["time"], datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    src = rec.get("src_pod") or rec.get("src")
    dst = rec.get("dst_pod") or rec.get("dst")
    port = f"{rec.get('protocol')}/{rec.get('dport')}"
    word = str(rec.get("verdict", "?")).upper()
    if rec.get("policy"):
        why = f"by {rec['policy']} {rec.get('policy_rule') or ''}".rstrip()
    elif rec.get("verdict") == "would-deny":
        side = f"{rec.get('side')} " if rec.get("side") != rec.get("direction") else ""
        why = f"{side}isolated by {', '.join(rec.get('audit_policies') or rec.get('policies') or ['?'])} (in audit)"
    elif rec.get("policies"):
        why = f"{rec.get('reason')} ({', '.join(rec['policies'])})"
    else:
        why = str(rec.get("reason") or "")
    if rec.get("sport") is not None:
        src = f"{src}:{rec['sport']}"
    return f"{stamp} {src} -> {dst} {port} {rec.get('direction')} {word} {why} [rev {rec.get('revision')}]"


class VerdictFeed:
    """The control side's bounded record of verdicts, fed from the dataplane."""

    def __init__(self, daemon: "Daemon", capacity: int = CAPACITY, poll_interval: float = POLL_INTERVAL):
        self.daemon = daemon
        self.records: collections.deque = collections.deque(maxlen=capacity)
        self.poll_interval = poll_interval
        self.resolver = Resolver(getattr(daemon.settings, "audit", NO_SETTING))
        self.last_seq = -1  # the packet loop's first record is 0
        self.lost = 0
        #: (verdict, direction, reason) -> records
        self.by_reason: collections.Counter = collections.Counter()
        #: (policy, direction, verdict) -> records (a denial counts for each isolating policy)
        self.by_policy: collections.Counter = collections.Counter()
        self.error: Optional[str] = None
        self._changed = asyncio.Condition()

    @property
    def recording(self) -> bool:
        """Whether this node's dataplane keeps verdict records at all."""
        return callable(getattr(self.daemon.dataplane, "verdicts", None))

    def take(self, raws: Iterable[Mapping[str, Any]]) -> int:
        """Resolve and keep dataplane records (in ``seq`` order); returns how many."""
        d = self.daemon
        self.resolver.remember_tables(d.tables.tables)
        n = 0
        for raw in raws:
            seq = int(raw["seq"])
            if seq <= self.last_seq:
                continue
            if self.last_seq >= 0 and seq > self.last_seq + 1:
                self.lost += seq - self.last_seq - 1
            self.last_seq = seq
            rec = self.resolver.resolve(raw, d.snapshot)
            self.records.append(rec)
            self.by_reason[(rec["verdict"], rec["direction"], rec["reason"])] += 1
            for policy in rec["policies"]:
                self.by_policy[(policy, rec["direction"], rec["verdict"])] += 1
            n += 1
        return n

    async def poll_once(self) -> int:
        if not self.recording:
            return 0
        dataplane = self.daemon.dataplane
        try:
            raws = await asyncio.get_running_loop().run_in_executor(None, dataplane.verdicts, self.last_seq, POLL_LIMIT)
        except Exception as e:  # noqa: BLE001 - the feed reports, the daemon goes on
            if self.error is None:
                logger.warning("Reading verdict records from the dataplane failed: %s", e)
            self.error = f"{type(e).__name__}: {e}"
            return 0
        self.error = None
        n = self.take(raws or [])
        if n:
            async with self._changed:
                self._changed.notify_all()
        return n

    async def run(self) -> None:
        while True:
            got = await self.poll_once()
            if got < POLL_LIMIT:  # more waiting: ask again at once
                await asyncio.sleep(self.poll_interval)

    def query(self, filters: Filters, limit: int) -> list[dict]:
        """The last ``limit`` records matching ``filters``, oldest first."""
        out: list[dict] = []
        for rec in reversed(self.records):
            if rec["seq"] <= filters.after or len(out) >= limit:
                break
            if filters.match(rec):
                out.append(rec)
        out.reverse()
        return out

    async def wait(self, after: int, timeout: float) -> bool:
        """Until a record newer than ``after`` is kept; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.last_seq > after), timeout)
            except asyncio.TimeoutError:
                return False
        return True
