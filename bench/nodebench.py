"""Helpers of the node benchmarks (bench/bench_node.py), kept apart so they can be tested
offline (tests/test_nodebench.py).

The node benchmarks compare what a user could run instead of mcnp on the testbed of
docs/architecture.md ("Node model"): the CNI alone, the CNI with pass-only XDP programs,
the CNI with nftables enforcing the same policies, and mcnp. A comparison is only fair
when every configuration meets the same pods, the same policies, the same CPUs and the
same accounting, so those live here, in one place:

* ``world_manifests(policies)``: the benchmark's cluster (two pods on two nodes) and
  ``policies`` NetworkPolicies, all selecting both pods; exactly one admits the
  measured traffic, the others name peers and ports no measured packet has;
* ``CpuWindow``: busy CPU-seconds of *all* CPUs over a measurement, from /proc/stat
  (other work on the machine is counted too: the configurations alternate so that
  each meets the same background);
* ``udp_arrivals(pid)``: datagrams that reached the UDP layer of the namespace a
  process lives in (the receiving pod), from /proc/PID/net/snmp;
* ``record(...)``: one comparison record as bench/report.py reads it
  (docs/benchmarks-method.md), checked here so a bad figure fails the benchmark, not
  the report;
* ``order(round)``: the configurations of a round, alternating between rounds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- settings

CLUSTER = "bench"
NAMESPACE = "bench"
#: The measured pair: (name, node, address); the sender and the receiver sit on two
#: nodes, so every packet crosses both nodes' hooks (egress at one, ingress at the other).
SENDER = ("gen", "node-a", "198.18.0.10")
RECEIVER = ("recv", "node-b", "198.18.0.20")
#: Ports of the measured traffic, all admitted by the one admitting policy.
ECHO_PORT = 7          # UDP echo served by the receiving pod (round trips)
FLOOD_PORT = 9         # UDP, nobody listens: the receiver's kernel counts and drops
NEW_FLOW_SPORTS = (10000, 50000)   # source ports of the new-flow generator: base, span
NEW_FLOW_DPORTS = (20000, 1000)    # destination ports: base, span (one endPort range)
IPERF_PORT = 5201
#: The non-matching policies' peers: one /32 each, in a block no pod uses.
FILLER_BASE = (198, 18, 128, 0)
#: The configurations in docs/benchmarks-method.md's order.
CONFIGS = ("cni", "xdp-pass", "nftables", "mcnp")
POLICY_COUNTS = (10, 1000, 10000)

#: The admitting policy's name sorts after every filler's, so a filter that looks at
#: policies in name order (Calico's order for equal ``order`` fields) meets it last.
ADMITTING = "zz-admit-bench"
ADMITTED = [
    {"protocol": "UDP", "port": ECHO_PORT},
    {"protocol": "UDP", "port": FLOOD_PORT},
    {"protocol": "UDP", "port": NEW_FLOW_DPORTS[0], "endPort": NEW_FLOW_DPORTS[0] + NEW_FLOW_DPORTS[1] - 1},
    {"protocol": "TCP", "port": IPERF_PORT},
]


class BenchError(RuntimeError):
    """A measurement that cannot be taken or reported truthfully."""


# --------------------------------------------------------------------------- the world


def filler_address(i: int) -> str:
    """The peer of non-matching policy ``i`` (distinct for i < 16,384)."""
    if not 0 <= i < 64 * 256:
        raise BenchError(f"filler policy {i}: only 16,384 distinct peers are laid out")
    a, b, c, _ = FILLER_BASE
    return f"{a}.{b}.{c + i // 256}.{i % 256}"


def pod_doc(name: str, node: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [
                {"name": "main", "ports": [{"name": "echo", "containerPort": ECHO_PORT, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policy_doc(name: str, peers: list[dict], ports: list[dict]) -> dict:
    """A policy selecting every pod of the namespace for both directions, with one
    ingress rule from ``peers`` and one egress rule to them, on ``ports``."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": peers, "ports": ports}], "egress": [{"to": peers, "ports": ports}]}}


def world_manifests(policies: int) -> list[dict]:
    """The namespace, the two pods and ``policies`` policies (≥ 1): ``ADMITTING``
    admits the measured traffic between the pods; ``filler-i`` admits TCP 1000+i%1000
    from and to one address nobody has."""
    if isinstance(policies, bool) or not isinstance(policies, int) or policies < 1:
        raise BenchError(f"policies must be an integer ≥ 1 (one admits the measured pair), got {policies!r}")
    docs = [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}}},
            pod_doc(*SENDER), pod_doc(*RECEIVER),
            policy_doc(ADMITTING, [{"podSelector": {}}], ADMITTED)]
    for i in range(policies - 1):
        docs.append(policy_doc(f"filler-{i}", [{"ipBlock": {"cidr": f"{filler_address(i)}/32"}}],
                               [{"protocol": "TCP", "port": 1000 + i % 1000}]))
    return docs


def write_world(directory: str, policies: int) -> None:
    """The manifests of ``world_manifests`` in ``directory`` (pods and namespace in one
    file, policies in another; JSON is YAML)."""
    docs = world_manifests(policies)
    os.makedirs(directory, exist_ok=True)
    for name, items in (("pods.json", docs[:3]), ("policies.json", docs[3:])):
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
        os.replace(tmp, os.path.join(directory, name))


# --------------------------------------------------------------------------- accounting


def cpu_busy_jiffies(text: str | None = None) -> tuple[int, int]:
    """(busy, total) jiffies summed over every CPU line of /proc/stat (idle and
    iowait are not busy; guest time is already inside user)."""
    if text is None:
        with open("/proc/stat") as f:
            text = f.read()
    busy = total = 0
    seen = False
    for line in text.splitlines():
        if re.match(r"cpu\d+ ", line):
            v = [int(x) for x in line.split()[1:9]]  # user nice system idle iowait irq softirq steal
            busy += sum(v) - v[3] - v[4]
            total += sum(v)
            seen = True
    if not seen:
        raise BenchError("/proc/stat lists no CPU")
    return busy, total


class CpuWindow:
    """Busy CPU-seconds of all CPUs and wall seconds between ``__enter__`` and
    ``__exit__`` (``cpu_s``, ``seconds``)."""

    def __init__(self, clock=None, reader=cpu_busy_jiffies):
        import time
        self._clock = clock or time.monotonic
        self._read = reader
        self.cpu_s = self.seconds = None

    def __enter__(self) -> "CpuWindow":
        self._t0, self._j0 = self._clock(), self._read()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self._clock() - self._t0
        self.cpu_s = (self._read()[0] - self._j0) / os.sysconf("SC_CLK_TCK")


UDP_ARRIVED = ("InDatagrams", "NoPorts", "InErrors")


def udp_arrivals(pid: int | None = None, text: str | None = None) -> int:
    """Datagrams that reached the UDP layer of the network namespace process ``pid``
    lives in: delivered, sent to a port nobody listens on, or dropped for a full
    buffer or a bad checksum."""
    if text is None:
        with open(f"/proc/{pid}/net/snmp") as f:
            text = f.read()
    rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        raise BenchError("no Udp counters in the snmp table")
    values = dict(zip(rows[0][1:], rows[1][1:]))
    try:
        return sum(int(values[k]) for k in UDP_ARRIVED)
    except KeyError as e:
        raise BenchError(f"the snmp table has no Udp {e.args[0]}") from None


# --------------------------------------------------------------------------- records


def _figure(name: str, value, required: bool) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BenchError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def record(workload: str, config: str, policies: int, rnd: int, unit: str, received: float, *,
           offered: float | None = None, dropped: float | None = None, cpu_s: float | None = None,
           seconds: float | None = None) -> dict:
    """One comparison record (docs/benchmarks-method.md, "Record format")."""
    if config not in CONFIGS:
        raise BenchError(f"unknown configuration {config!r}")
    if unit not in ("pps", "flows/s", "Gbit/s", "ms"):
        raise BenchError(f"unknown unit {unit!r}")
    out = {"workload": workload, "config": config, "policies": int(policies), "round": int(rnd), "unit": unit,
           "received": _figure("received", received, True)}
    for name, value in (("offered", offered), ("dropped", dropped), ("cpu_s", cpu_s)):
        figure = _figure(name, value, False)
        if figure is not None:
            out[name] = figure
    if cpu_s is not None:
        if _figure("seconds", seconds, True) <= 0:
            raise BenchError("seconds must be > 0 with cpu_s")
        out["seconds"] = float(seconds)
    return out


def rate_record(workload: str, config: str, policies: int, rnd: int, unit: str, received: int, offered: int,
                window: CpuWindow, seconds: float) -> dict:
    """A rate from counts over ``seconds`` (received, offered) with the CPU of ``window``;
    dropped is what was offered and did not arrive."""
    if seconds <= 0:
        raise BenchError(f"{workload}: no time measured")
    return record(workload, config, policies, rnd, unit, received / seconds, offered=offered / seconds,
                  dropped=max(offered - received, 0) / seconds, cpu_s=window.cpu_s, seconds=window.seconds)


def order(rnd: int) -> list[str]:
    """The configurations of round ``rnd`` (1-based): forward in odd rounds, backward
    in even ones, so no configuration always runs first or last."""
    return list(CONFIGS) if rnd % 2 else list(reversed(CONFIGS))


def settle(read, quiet_s: float = 0.2, limit_s: float = 3.0) -> int:
    """Wait until ``read()`` stops changing for ``quiet_s`` (packets in flight have
    landed), at most ``limit_s``; returns the last value."""
    import time
    last, since = read(), time.monotonic()
    deadline = since + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; values must be given."""
    if not values:
        raise BenchError("no values to take a percentile of")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def iperf_gbps(report: dict) -> float:
    """Received Gbit/s of an ``iperf3 -J`` report (all streams)."""
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    try:
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (KeyError, TypeError, ValueError):
        raise BenchError("iperf3 report without end.sum_received.bits_per_second") from None
