"""Prometheus metrics of the daemon, all ``mcnp_``-prefixed, in a registry of its own.

Most series are read from the daemon's state at scrape time (a custom collector) rather
than updated as things happen: the state is already there, and a scrape is rare next to
the events that change it. Compile durations are a real histogram, observed per compile.
Dataplane counters come from ``Dataplane.stats()`` on each scrape.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:  # pragma: no cover
    from control.node.daemon import Daemon

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class _StateCollector:
    """Series read from the daemon when scraped."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        synced = GaugeMetricFamily("mcnp_cluster_synced", "1 when every kind of the cluster has been listed", labels=["cluster"])
        connected = GaugeMetricFamily("mcnp_cluster_connected", "1 while the cluster's source is reachable", labels=["cluster"])
        stale = GaugeMetricFamily("mcnp_cluster_stale", "1 when the cluster's state was revoked by stale-after", labels=["cluster"])
        events = CounterMetricFamily("mcnp_cluster_events", "Lists and watch events received", labels=["cluster"])
        objects = GaugeMetricFamily("mcnp_cluster_objects", "Objects in force", labels=["cluster", "kind"])
        rejected = GaugeMetricFamily("mcnp_rejected_objects", "Invalid objects (rule S9)", labels=["cluster", "kind", "in_force"])
        for name, sink in d.store.sinks.items():
            st = sink.status
            synced.add_metric([name], 1.0 if st.ready else 0.0)
            connected.add_metric([name], 1.0 if st.connected else 0.0)
            stale.add_metric([name], 1.0 if st.stale else 0.0)
            events.add_metric([name], float(st.events))
            objects.add_metric([name, "Namespace"], float(len(sink.namespaces)))
            objects.add_metric([name, "Pod"], float(len(sink.pods)))
            objects.add_metric([name, "NetworkPolicy"], float(len(sink.policies)))
            counts: dict[tuple, int] = {}
            for err in sink.errors.values():
                counts[(err.kind, err.in_force)] = counts.get((err.kind, err.in_force), 0) + 1
            for path in sink.file_errors:
                counts[("File", "last-valid")] = counts.get(("File", "last-valid"), 0) + 1
            for (kind, in_force), n in counts.items():
                rejected.add_metric([name, kind, in_force], float(n))
        yield from (synced, connected, stale, events, objects, rejected)

        snap = d.snapshot
        yield GaugeMetricFamily("mcnp_ip_conflicts", "Addresses claimed by pods of several clusters (rule M8)",
                                value=float(len(snap.conflicts)) if snap else 0.0)
        yield GaugeMetricFamily("mcnp_table_revision", "Revision of the state in force", value=float(d.tables.revision))
        yield GaugeMetricFamily("mcnp_compiled_revision", "Revision of the compiled tables in force",
                                value=float(d.tables.compiled_revision or 0))
        yield GaugeMetricFamily("mcnp_ready", "1 when every cluster has been listed", value=1.0 if d.ready else 0.0)
        if d.dataplane is not None:
            try:
                stats = d.dataplane.stats()
            except Exception as e:  # noqa: BLE001 - a scrape must not fail on the dataplane
                logger.debug("Dataplane stats unavailable: %s", e)
                stats = None
            if stats:
                yield from dataplane_metrics(stats, d.tables.tables)


def dataplane_metrics(stats: Mapping[str, Any], tables: Any = None) -> Iterator[Metric]:
    """``Dataplane.stats()`` as series: packets by verdict and reason, per-policy hits,
    tracked flows, and every other plain counter as ``mcnp_dataplane_<name>``."""
    packets = CounterMetricFamily("mcnp_packets", "Packets judged, by verdict and reason", labels=["verdict", "reason"])
    for verdict, reasons in (stats.get("verdicts") or {}).items():
        if isinstance(reasons, Mapping):
            for reason, n in reasons.items():
                packets.add_metric([str(verdict), str(reason)], float(n))
        else:
            packets.add_metric([str(verdict), ""], float(reasons))
    yield packets
    hits = CounterMetricFamily("mcnp_policy_hits", "Packets admitted per policy and direction (most-hit rules)",
                               labels=["policy", "direction"])
    for (policy, direction), n in policy_hits(stats.get("rule_hits") or [], tables).items():
        hits.add_metric([policy, direction], n)
    yield hits
    if "flows" in stats and isinstance(stats["flows"], (int, float)):
        yield GaugeMetricFamily("mcnp_tracked_flows", "Connections tracked by the dataplane", value=float(stats["flows"]))
    for key, value in stats.items():
        if key in ("verdicts", "rule_hits", "flows") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield GaugeMetricFamily(f"mcnp_dataplane_{_NAME_OK.sub('_', key)}", f"Dataplane counter {key}", value=float(value))


def policy_hits(rule_hits: Any, tables: Any = None) -> dict[tuple, float]:
    """Rule hit counters → (policy, direction) totals. Entries are
    ``{"rule": id, "hits": n, "name": {"policy", "direction", ...}}`` (the dataplane's
    counters); an entry without a name is looked up in the tables in force."""
    out: dict[tuple, float] = {}
    for entry in rule_hits:
        if not isinstance(entry, Mapping):
            continue
        rule = entry.get("name")
        if not isinstance(rule, Mapping) and tables is not None and isinstance(entry.get("rule"), int):
            rule = tables.rule(entry["rule"])
        if not isinstance(rule, Mapping):
            continue
        key = (str(rule.get("policy")), str(rule.get("direction")))
        out[key] = out.get(key, 0.0) + float(entry.get("hits", 0))
    return out


class Metrics:
    """The daemon's registry: state read at scrape time plus compile histograms."""

    def __init__(self, daemon: "Daemon"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(daemon))
        self.compile_seconds = Histogram(
            "mcnp_compile_duration_seconds", "Time to compile one revision of the tables",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.compile_errors = Counter("mcnp_compile_errors", "Compiles that failed (the previous tables stayed)", registry=self.registry)
        self._conflicts_seen: set[str] = set()

    def compiled(self, seconds: float) -> None:
        self.compile_seconds.observe(seconds)

    def compile_failed(self) -> None:
        self.compile_errors.inc()

    def conflicts(self, conflicts: Mapping[str, list]) -> None:
        """Rule M8: warn once per conflicting address."""
        for ip, refs in conflicts.items():
            if ip not in self._conflicts_seen:
                logger.warning("Address %s is claimed by %s: treated as unknown until resolved", ip, ", ".join(refs))
        self._conflicts_seen = set(conflicts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
