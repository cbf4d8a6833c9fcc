"""Prometheus metrics of the daemon, all ``mcnp_``-prefixed, in a registry of its own.

Most series are read from the daemon's state at scrape time (a custom collector) rather
than updated as things happen: the state is already there, and a scrape is rare next to
the events that change it. Compile durations are a real histogram, observed per compile.
Dataplane counters come from ``Dataplane.stats()`` on each scrape: monotonic counts as
counters (``_total``), levels as gauges, times in seconds — the Prometheus naming
conventions. The standard ``process_*`` and ``python_info`` series and
``mcnp_build_info`` come with every scrape.
"""

from __future__ import annotations

import logging
import platform
import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prometheus_client import (CollectorRegistry, Counter, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
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
        stale = GaugeMetricFamily("mcnp_cluster_stale", "1 when the cluster's state was revoked by stale-after (rule M9)", labels=["cluster"])
        events = CounterMetricFamily("mcnp_cluster_events", "Lists and watch events received from the cluster's source", labels=["cluster"])
        objects = GaugeMetricFamily("mcnp_cluster_objects", "Objects of the cluster in force, by kind", labels=["cluster", "kind"])
        rejected = GaugeMetricFamily("mcnp_rejected_objects", "Invalid objects (rule S9), by what stands in for them "
                                     "(last-valid, fail-closed, none)", labels=["cluster", "kind", "in_force"])
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
        feed = getattr(d, "verdict_feed", None)
        if feed is not None:
            yield from feed_metrics(feed)
        if d.dataplane is not None:
            try:
                stats = d.dataplane.stats()
            except Exception as e:  # noqa: BLE001 - a scrape must not fail on the dataplane
                logger.debug("Dataplane stats unavailable: %s", e)
                stats = None
            if stats:
                yield from dataplane_metrics(stats, d.tables.tables)


#: Monotonic counts of the packet loop (``Counters.gauges``): exported as counters.
LOOP_COUNTERS = {
    "batches": "Batches the packet loop has processed",
    "frames": "Frames the packet loop has received",
    "judged": "Frames judged against the tables (first packets of connections and untracked packets)",
    "rechecks": "Tracked flows judged again after a tables change",
    "flows_cut": "Tracked flows ended because new tables no longer admit them",
    "rx_empty_polls": "Polls of the ports that found no frame",
    "cache_errors": "Admitted flows the kernel's flow cache refused (the frame is dropped, not looped)",
    "expired": "Cached flows removed after their idle timeout",
}
#: Per-port ring counters (``ports`` of ``Dataplane.stats()``), all monotonic.
PORT_COUNTERS = {
    "rx_frames": "Frames received on the port's AF_XDP socket",
    "tx_frames": "Frames transmitted on the port (completion seen)",
    "tx_queued": "Frames queued for transmission on the port",
    "tx_ring_full": "Frames dropped because the port's TX ring was full",
    "tx_invalid": "TX descriptors outside the UMEM, dropped",
    "fill_short": "Refills of the port's fill ring that found no free frame",
    "kicks": "sendto() wake-ups of the port's TX ring",
    "kick_errors": "sendto() wake-ups of the port's TX ring that failed",
    "rx_multi": "Packets longer than a frame received in pieces and handed on whole",
    "rx_multi_dropped": "Packets received in pieces and dropped: no free slot, or too long for one",
}
PORT_GAUGES = {
    "fill_outstanding": "Frames on the port's fill ring now",
    "tx_outstanding": "Frames queued for TX on the port whose completion has not come back",
}
_DATAPLANE_SPECIAL = {"verdicts", "rule_hits", "flows", "ports", "revision", "heartbeat_ns", "ready", "error",
                      "published_generation", "generation_in_force", "hooks", "pods", "recheck_ns", "flow_capacity",
                      "flow_classes", "class_capacity"}


def dataplane_metrics(stats: Mapping[str, Any], tables: Any = None) -> Iterator[Metric]:
    """``Dataplane.stats()`` as series: packets by verdict and reason, per-policy hits,
    the loop's monotonic counts as counters, its levels as gauges, and per-port ring
    counters."""
    packets = CounterMetricFamily("mcnp_packets", "Frames received by the packet loop, each counted once, "
                                  "by verdict (pass, drop) and reason", labels=["verdict", "reason"])
    for verdict, reasons in (stats.get("verdicts") or {}).items():
        if isinstance(reasons, Mapping):
            for reason, n in reasons.items():
                packets.add_metric([str(verdict), str(reason)], float(n))
        else:
            packets.add_metric([str(verdict), ""], float(reasons))
    yield packets
    hits = CounterMetricFamily("mcnp_policy_hits", "New flows (and untracked packets) admitted, per policy and "
                               "direction (the most-hit rules)", labels=["policy", "direction"])
    for (policy, direction), n in policy_hits(stats.get("rule_hits") or [], tables).items():
        hits.add_metric([policy, direction], n)
    yield hits
    if isinstance(stats.get("flows"), (int, float)):
        yield GaugeMetricFamily("mcnp_tracked_flows", "Connections tracked by the dataplane now", value=float(stats["flows"]))
    if _number(stats.get("flow_classes")):
        yield GaugeMetricFamily("mcnp_tracked_flow_classes", "Flow classes the hooks admit new flows by now "
                                "(addresses, protocol and destination port admitted under the tables in force)",
                                value=float(stats["flow_classes"]))
    levels = {
        "pods": ("mcnp_dataplane_pods", "Pods of this node hooked by the dataplane now"),
        "flow_capacity": ("mcnp_dataplane_flow_capacity", "Flows the kernel's flow cache can hold"),
        "class_capacity": ("mcnp_dataplane_class_capacity", "Flow classes the kernel can hold"),
        "revision": ("mcnp_dataplane_tables_revision", "Tables revision the packet loop judges with"),
        "published_generation": ("mcnp_dataplane_published_generation", "Tables hand-overs made to the packet loop"),
        "generation_in_force": ("mcnp_dataplane_generation_in_force", "Tables hand-over the packet loop has taken"),
    }
    for key, (name, text) in levels.items():
        if _number(stats.get(key)):
            yield GaugeMetricFamily(name, text, value=float(stats[key]))
    if _number(stats.get("heartbeat_ns")):
        yield GaugeMetricFamily("mcnp_dataplane_heartbeat_seconds", "CLOCK_MONOTONIC of the packet loop's last "
                                "heartbeat, seconds (a value that stops moving means the loop is gone)",
                                value=stats["heartbeat_ns"] / 1e9)
    if _number(stats.get("recheck_ns")):
        yield GaugeMetricFamily("mcnp_dataplane_recheck_seconds", "Time the last check of cached flows against "
                                "new tables took, seconds", value=stats["recheck_ns"] / 1e9)
    hooks = stats.get("hooks")
    if isinstance(hooks, Mapping):
        yield _counter_of("mcnp_hook_frames", "Frames the in-kernel hooks decided themselves, by action "
                          "(pass_* passed, drop_* dropped, redirect sent to the packet loop)", ["action"],
                          {(str(k),): v for k, v in hooks.items() if _number(v)})
    if "ready" in stats:
        yield GaugeMetricFamily("mcnp_dataplane_ready", "1 while the packet loop runs with every port open",
                                value=1.0 if stats["ready"] else 0.0)
    for key, value in stats.items():
        if key in _DATAPLANE_SPECIAL or not _number(value):
            continue
        name = f"mcnp_dataplane_{_NAME_OK.sub('_', key)}"
        if key in LOOP_COUNTERS:
            yield CounterMetricFamily(name, LOOP_COUNTERS[key], value=float(value))
        else:  # a count this version does not know: a level, the conservative type
            yield GaugeMetricFamily(name, f"Dataplane value {key} (not documented by this version)", value=float(value))
    yield from port_metrics(stats.get("ports") or {})
    if isinstance(stats.get("umem"), Mapping):
        yield from umem_metrics(stats["umem"])


def umem_metrics(umem: Mapping[str, Any]) -> Iterator[Metric]:
    """The packet loop's UMEM: its frame pool and its slots for packets longer than a frame."""
    levels = {
        "frames": "Frames of the packet loop's UMEM",
        "free": "Frames in the UMEM's free pool now (a pool that stays near 0 starves the fill rings)",
        "slots": "Slots of the UMEM for packets longer than a frame, handed on whole",
        "free_slots": "Slots free now",
        "multi_buffer": "1 when the sockets take packets longer than a frame in pieces (Linux 6.6 and later)",
    }
    names = {"free": "mcnp_umem_free_frames"}
    for key, text in levels.items():
        if _number(umem.get(key)) or isinstance(umem.get(key), bool):
            yield GaugeMetricFamily(names.get(key, f"mcnp_umem_{key}"), text, value=float(umem[key]))
    if _number(umem.get("bad_frees")):
        yield CounterMetricFamily("mcnp_umem_bad_frees", "Frees of a frame or slot refused because it was free "
                                  "already or outside the UMEM (an ownership bug; the pool stays sane)",
                                  value=float(umem["bad_frees"]))


def port_metrics(ports: Mapping[str, Any]) -> Iterator[Metric]:
    """Per-port ring counters and levels, labelled ``port`` (the interface name)."""
    families = {k: CounterMetricFamily(f"mcnp_port_{k}", text, labels=["port"]) for k, text in PORT_COUNTERS.items()}
    families.update({k: GaugeMetricFamily(f"mcnp_port_{k}", text, labels=["port"]) for k, text in PORT_GAUGES.items()})
    info = GaugeMetricFamily("mcnp_port_info", "Always 1: the port's interface and XDP attach mode (empty when not "
                             "reported)", labels=["port", "ifname", "xdp_mode"])
    for port, values in sorted(ports.items()):
        if not isinstance(values, Mapping):
            continue
        for key, family in families.items():
            if _number(values.get(key)):
                family.add_metric([str(port)], float(values[key]))
        if values.get("xdp_mode") is not None or values.get("ifname") is not None:
            info.add_metric([str(port), str(values.get("ifname") or ""), str(values.get("xdp_mode") or "")], 1.0)
    yield from families.values()
    yield info


def _counter_of(name: str, text: str, labels: list[str], counts: Mapping[tuple, int]) -> Metric:
    """A labelled counter family from ``{label values: count}``."""
    family = CounterMetricFamily(name, text, labels=labels)
    for values, n in sorted(counts.items()):
        family.add_metric(list(values), float(n))
    return family


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def feed_metrics(feed: Any) -> Iterator[Metric]:
    """Counts of the verdict records the control side has read (``/v1/verdicts``)."""
    yield _counter_of("mcnp_verdicts", "Verdict records read from the packet loop, by verdict (allowed, denied, "
                      "would-deny), direction and reason", ["verdict", "direction", "reason"], feed.by_reason)
    yield _counter_of("mcnp_policy_verdicts", "Verdict records per deciding policy: the admitting policy of an "
                      "allowed one, each isolating policy of a denied one", ["policy", "direction", "verdict"],
                      feed.by_policy)
    yield CounterMetricFamily("mcnp_verdicts_lost", "Verdict records the packet loop overwrote before they were read",
                              value=float(feed.lost))


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


def build_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare tree)."""
    from importlib import metadata

    try:
        return metadata.version("mcnp")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Constant:
    """Families that never change (build information)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Metrics:
    """The daemon's registry: state read at scrape time plus compile histograms."""

    def __init__(self, daemon: "Daemon"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(daemon))
        self.compile_seconds = Histogram(
            "mcnp_compile_duration_seconds", "Time to compile one revision of the tables",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.compile_errors = Counter("mcnp_compile_errors", "Compiles that failed (the previous tables stayed)", registry=self.registry)
        info = GaugeMetricFamily("mcnp_build_info", "Always 1: the version of mcnp and of Python serving these metrics",
                                 labels=["version", "python"])
        info.add_metric([build_version(), platform.python_version()], 1.0)
        self.registry.register(_Constant([info]))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
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
