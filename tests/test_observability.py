"""Verdict records, ``mcnp observe``, metrics conventions and the REST endpoint's manners.

A daemon on the demo's manifest directories, node east-1 (where east/shop/api runs),
with a stand-in dataplane that keeps verdict records in the shape the packet loop
records them (numbers only) — the control side must name the pods and policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.cli import main as cli_main
from control.node import api
from control.node.observe import stream
from control.node.verdicts import Filters, FilterError, Resolver, normalize, parse_since

from .daemon_harness import dir_settings, eventually, running
from .demo_copy import copy_demo

IP = {"east/shop/api": "198.18.1.10", "east/shop/db": "198.18.1.11", "east/ops/monitor": "198.18.1.20",
      "west/shop/web": "198.18.2.10", "west/dev/tester": "198.18.2.20"}


class RecordingDataplane:
    """Keeps verdict records like the packet loop's ring (numbers, a seq), plus stats."""

    def __init__(self, settings):
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.closed = False

    def add(self, verdict, direction, src, dst, dport, rule, revision, reason, protocol="TCP", skip=0):
        with self.lock:
            seq = (self.records[-1]["seq"] if self.records else 0) + 1 + skip
            self.records.append({"seq": seq, "time": time.time(), "verdict": verdict, "direction": direction,
                                 "src": IP[src], "dst": IP[dst], "sport": 40000 + seq, "dport": dport,
                                 "protocol": protocol, "reason": reason, "rule": rule, "revision": revision,
                                 "pod": "east/shop/api"})

    def verdicts(self, after_seq, limit):
        with self.lock:
            return [r for r in self.records if r["seq"] > after_seq][:limit]

    def publish(self, tables, pods, services=None):
        pass

    def wait_ready(self, timeout):
        pass

    def discover(self, ips, netns_dirs):
        return {}  # no pod of this node is behind a veth here: the records stand in

    def attach(self, sandbox):
        raise AssertionError("no sandbox to attach in these tests")

    def stats(self):
        return {"verdicts": {"pass": {"allowed": 3}, "drop": {"denied_ingress": 2}}, "flows": 1, "frames": 9,
                "batches": 4, "revision": 2, "heartbeat_ns": 5_000_000_000, "ready": True, "pods": 1,
                "recheck_ns": 2_500_000, "expired": 3, "flow_capacity": 65536,
                "hooks": {"pass_flow": 40, "redirect": 9, "drop_l2": 1},
                "published_generation": 1, "generation_in_force": 1,
                "rule_hits": [{"rule": 0, "hits": 3, "name": {"policy": "east/shop/api-from-frontends", "direction": "Ingress"}}],
                "ports": {"veth-api": {"rx_frames": 9, "tx_frames": 8, "tx_queued": 8, "tx_ring_full": 1, "tx_invalid": 0,
                                       "fill_short": 0, "kicks": 4, "kick_errors": 2, "fill_outstanding": 64,
                                       "tx_outstanding": 0, "xdp_mode": "native", "rx_multi": 2,
                                       "rx_multi_dropped": 1}},
                "umem": {"frames": 16384, "free": 16000, "bad_frees": 0, "slots": 256, "free_slots": 255,
                         "multi_buffer": True}}

    def flows(self, limit):
        return []

    def failure(self):
        return None

    def close(self):
        self.closed = True


@pytest.fixture
def demo_specs(tmp_path):
    return list(copy_demo(tmp_path).items())


def observed(specs, **overrides):
    planes = []

    def factory(settings):
        planes.append(RecordingDataplane(settings))
        return planes[-1]

    run_dir = os.path.join(os.path.dirname(specs[0][1]), "run")  # beside the manifest directories
    os.makedirs(os.path.join(run_dir, "state"), exist_ok=True)
    settings = dir_settings(specs, node_name="east-1", dataplane=True, state_dir=os.path.join(run_dir, "state"),
                            cni_socket=os.path.join(run_dir, "cni.sock"), **overrides)
    return running(settings, dataplane_factory=factory), planes


async def tables_with_rules(daemon):
    async def ready():
        t = daemon.tables.tables
        return t if t is not None and t.rules and daemon.tables.compiled_revision == daemon.tables.revision else None

    tables = await eventually(ready, timeout=5)
    rule = next(i for i, r in enumerate(tables.rules) if r["policy"] == "east/shop/api-from-frontends" and r["rule"] == 0)
    return tables.revision, rule


def fill(plane, revision, rule):
    plane.add("allowed", "ingress", "west/shop/web", "east/shop/api", 80, rule, revision, "policy")
    plane.add("denied", "ingress", "east/ops/monitor", "east/shop/api", 80, -1, revision, "isolated, no rule admits")
    plane.add("allowed", "egress", "east/shop/api", "east/shop/db", 5432, -2, revision, "not isolated")
    plane.add("denied", "ingress", "west/dev/tester", "east/shop/api", 8080, -1, revision, "isolated, no rule admits", skip=2)


@contextlib.asynccontextmanager
async def recorded(specs, **overrides):
    """A daemon whose dataplane holds the records of :func:`fill`, already read:
    yields (daemon, client, dataplane, tables revision, admitting rule id)."""
    ctx, planes = observed(specs, **overrides)
    async with ctx as (daemon, client):
        revision, rule = await tables_with_rules(daemon)
        fill(planes[0], revision, rule)
        await daemon.verdict_feed.poll_once()
        yield daemon, client, planes[0], revision, rule


def test_verdicts_name_pods_and_deciding_policies_and_filter(demo_specs):
    async def main():
        async with recorded(demo_specs) as (daemon, client, plane, revision, rule):
            status, body = await client.get("/v1/verdicts")
            assert status == 200 and body["recording"] is True and body["lost"] == 2 and body["last_seq"] == 6
            allowed, denied, egress, late = body["verdicts"]
            assert allowed["src_pod"] == "west/shop/web" and allowed["dst_pod"] == "east/shop/api"
            assert allowed["policy"] == "east/shop/api-from-frontends" and allowed["policy_rule"] == "ingress[0]"
            assert denied["policy"] is None and denied["reason"] == "isolated, no rule admits"
            assert denied["policies"] == ["east/shop/api-from-frontends"] and denied["cluster"] == "east"
            assert egress["policies"] == [] and egress["pod"] == "east/shop/api"
            assert late["seq"] == 6 and late["src_pod"] == "west/dev/tester"

            async def seqs(**params):
                status, body = await client.get("/v1/verdicts", **params)
                assert status == 200, body
                return [r["seq"] for r in body["verdicts"]]

            assert await seqs(verdict="denied") == [2, 6]
            assert await seqs(verdict="DENIED,allowed", limit=2) == [3, 6]
            assert await seqs(pod="west/*") == [1, 6]
            assert await seqs(namespace="ops") == [2]
            assert await seqs(namespace="shop", cluster="west") == [1]
            assert await seqs(cluster="west") == [1, 6]
            assert await seqs(after=3) == [6]
            assert await seqs(since="1h") == [1, 2, 3, 6] and await seqs(since=str(time.time() + 5)) == []
            for bad in ({"verdict": "maybe"}, {"since": "yesterday"}, {"after": "-2"}, {"after": "x"}, {"limit": "x"}, {"follow": "perhaps"}):
                status, body = await client.get("/v1/verdicts", **bad)
                assert status == 400 and body["error"], bad

    asyncio.run(main())


def test_observe_follows_a_node_and_prints_deciding_policies(demo_specs, capsys):
    async def main():
        async with recorded(demo_specs) as (daemon, client, plane, revision, rule):
            node = "%s:%d" % daemon.api_addresses[0][:2]
            loop = asyncio.get_running_loop()
            # --no-follow: what is kept, for people
            code = await loop.run_in_executor(None, cli_main, ["observe", "--node", node, "--no-follow", "--verdict", "denied"])
            out = capsys.readouterr().out.strip().splitlines()
            assert code == 0 and len(out) == 2
            assert "east/ops/monitor:40002 -> east/shop/api TCP/80 ingress DENIED isolated, no rule admits (east/shop/api-from-frontends)" in out[0]
            # following: the backlog, then records as the dataplane makes them
            got: list = []
            it = stream(node, {"follow": "true", "verdict": "denied,allowed", "limit": 1})

            def take(n):
                for rec in it:
                    got.append(rec)
                    if len(got) == n:
                        return

            reader = loop.run_in_executor(None, take, 3)
            await eventually(lambda: _true(len(got) == 1))
            assert got[0]["seq"] == 6
            plane.add("denied", "ingress", "west/shop/web", "east/shop/api", 443, -1, revision, "isolated, no rule admits")
            plane.add("allowed", "ingress", "west/shop/web", "east/shop/api", 80, rule, revision, "policy")
            await asyncio.wait_for(reader, 5)
            assert [r["seq"] for r in got] == [6, 7, 8] and got[2]["policy"] == "east/shop/api-from-frontends"
            it.close()
            code = await loop.run_in_executor(None, cli_main, ["observe", "--node", node, "--no-follow", "--since", "soon"])
            assert code == 2 and "since 'soon'" in capsys.readouterr().err

    asyncio.run(main())
    assert cli_main(["observe", "--node", f"127.0.0.1:{_closed_port()}", "--no-follow"]) == 1
    assert "cannot reach" in capsys.readouterr().err


async def _true(value):
    return value


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_follow_prometheus_conventions(demo_specs):
    async def main():
        async with recorded(demo_specs) as (daemon, client, plane, revision, rule):
            status, text = await client.get("/metrics")
            assert status == 200
            return text

    text = asyncio.run(main())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, family in families.items():
        assert family.documentation.strip(), f"{name} has no HELP text"
        assert family.type != "untyped", name
        for sample in family.samples:
            if family.type == "counter":  # the parser strips _total from counter families
                assert sample.name in (f"{name}_total", f"{name}_created"), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
    counters = {n for n, f in families.items() if f.type == "counter"}
    for name in ("mcnp_packets", "mcnp_policy_hits", "mcnp_dataplane_frames", "mcnp_dataplane_batches",
                 "mcnp_port_tx_ring_full", "mcnp_port_kick_errors", "mcnp_verdicts", "mcnp_policy_verdicts",
                 "mcnp_verdicts_lost", "mcnp_compile_errors", "mcnp_cluster_events", "process_cpu_seconds"):
        assert name in counters, name
    for name in ("mcnp_build_info", "mcnp_tracked_flows", "mcnp_dataplane_heartbeat_seconds",
                 "process_resident_memory_bytes", "mcnp_port_fill_outstanding"):
        assert families[name].type == "gauge", name

    def value(family, **labels):
        return next(s.value for s in families[family].samples if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("mcnp_dataplane_heartbeat_seconds") == 5.0
    assert value("mcnp_dataplane_recheck_seconds") == 0.0025 and value("mcnp_dataplane_pods") == 1
    assert value("mcnp_hook_frames", action="drop_l2") == 1 and "mcnp_dataplane_expired" in counters
    assert value("mcnp_port_kick_errors", port="veth-api") == 2 and value("mcnp_port_info", port="veth-api", ifname="", xdp_mode="native") == 1
    assert value("mcnp_verdicts", verdict="denied", direction="ingress", reason="isolated, no rule admits") == 2
    assert value("mcnp_policy_verdicts", policy="east/shop/api-from-frontends", direction="ingress", verdict="denied") == 2
    assert value("mcnp_policy_verdicts", policy="east/shop/api-from-frontends", direction="ingress", verdict="allowed") == 1
    assert value("mcnp_verdicts_lost") == 2
    assert value("mcnp_port_rx_multi_dropped", port="veth-api") == 1
    assert value("mcnp_umem_free_frames") == 16000 and value("mcnp_umem_free_slots") == 255
    assert value("mcnp_umem_multi_buffer") == 1 and "mcnp_umem_bad_frees" in counters
    assert value("mcnp_build_info")  == 1 and families["mcnp_build_info"].samples[0].labels["version"]


def test_rest_answers_json_everywhere_and_rejects_unknown_parameters(demo_specs):
    async def main():
        async with running(dir_settings(demo_specs)) as (daemon, client):
            status, body = await client.get("/v2/nothing")
            assert status == 404 and body == {"error": "no such endpoint: /v2/nothing"}
            status, body = await client.get("/ui/secrets.txt")
            assert status == 404 and "error" in body
            status, body = await client.get("/v1/explain", **{"from": "east/shop/api", "to": "east/shop/db", "port": 80,
                                                               "protocol": "TCP", "protcol": "UDP", "colour": "red"})
            assert status == 400 and "colour, protcol" in body["error"] and "protocol" in body["error"]
            status, body = await client.get("/healthz", verbose="1")
            assert status == 400 and "verbose" in body["error"]
            async with client.session.post(client.base + "/v1/clusters") as r:
                assert r.status == 405 and r.content_type == "application/json" and "error" in await r.json()
            status, text = await client.get("/")
            assert status == 200 and "<title>mcnp" in text
            daemon.store = None  # a bug in a handler: still a JSON answer
            status, body = await client.get("/v1/stats")
            assert status == 500 and body == {"error": "internal error: AttributeError"}

    asyncio.run(main())


def test_matrix_endpoint_agrees_with_mcnp_matrix(demo_specs, capsys):
    assert cli_main(["matrix", *sum((["--cluster", f"{n}={d}"] for n, d in demo_specs), []), "--port", "5432",
                     "--protocol", "TCP", "--json", "--from", "east/*", "--to", "east/*"]) == 0
    want = {(p["from"], p["to"]): p["allowed"] for p in json.loads(capsys.readouterr().out)["probes"]}

    async def main():
        async with running(dir_settings(demo_specs)) as (daemon, client):
            status, body = await client.get("/v1/matrix", cluster="east", port=5432, protocol="tcp")
            assert status == 200 and body["protocol"] == "TCP" and body["namespaces"] == ["east/ops", "east/shop", "west/dev", "west/shop"]
            got = {(s, d): body["allowed"][i][j] for i, s in enumerate(body["pods"]) for j, d in enumerate(body["pods"])}
            assert got == want
            status, body = await client.get("/v1/matrix", namespace="west/dev,east/shop")
            assert status == 200 and body["pods"] == ["east/shop/api", "east/shop/db", "west/dev/notebook", "west/dev/tester"]
            for bad in ({"cluster": "north"}, {"port": "0"}, {"protocol": "ICMPX"}):
                status, body = await client.get("/v1/matrix", **bad)
                assert status == 400 and body["error"], bad

    asyncio.run(main())


def test_half_sent_requests_are_dropped_within_the_header_timeout(demo_specs, monkeypatch):
    monkeypatch.setattr(api, "HEADER_TIMEOUT", 0.5)

    async def main():
        async with running(dir_settings(demo_specs)) as (daemon, client):
            host, port = daemon.api_addresses[0][:2]
            loop = asyncio.get_running_loop()

            def half_sent() -> float:
                with socket.create_connection((host, port), timeout=5) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers never end
                    started = time.monotonic()
                    assert s.recv(1) == b""  # closed by the server, nothing answered
                    return time.monotonic() - started

            waited = await asyncio.gather(*(loop.run_in_executor(None, half_sent) for _ in range(4)))
            assert all(w < 3.0 for w in waited), waited
            assert (await client.get("/healthz"))[0] == 200  # whole requests are still answered

    asyncio.run(main())


def test_metrics_only_listener_serves_metrics_and_nothing_else(demo_specs):
    async def main():
        async with running(dir_settings(demo_specs, metrics_listen="127.0.0.1:0")) as (daemon, client):
            host, port = daemon.metrics_addresses[0][:2]
            base = f"http://{host}:{port}"
            async with client.session.get(base + "/metrics") as r:
                assert r.status == 200 and "mcnp_cluster_synced" in await r.text()
            async with client.session.get(base + "/v1/explain", params={"from": "east/shop/api", "to": "east/shop/db",
                                                                         "port": "80", "protocol": "TCP"}) as r:
                assert r.status == 404 and "error" in await r.json()
            assert (await client.get("/v1/explain", **{"from": "east/shop/api", "to": "east/shop/db", "port": 80,
                                                       "protocol": "TCP"}))[0] == 200

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a network namespace")
def test_a_listener_beyond_loopback_is_a_warning_in_json_logs(demo_specs, tmp_path):
    """``mcnp run`` in a network namespace of its own (only its loopback, down), API
    on every address there: the warning is logged, as a JSON object."""
    mcnp = os.path.join(os.path.dirname(sys.executable), "mcnp")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["unshare", "--net", mcnp, "run", "--node-name", "east-1", "--local-cluster", "east",
                                 *sum((["--cluster", f"{n}=dir:{d}"] for n, d in demo_specs), []),
                                 "--api-listen", "0.0.0.0:19901", "--log-format", "json", "--no-dataplane"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "beyond loopback" not in log.read_text():
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    warning = next(e for e in lines if "beyond loopback" in e["message"])
    assert warning["level"] == "WARNING" and warning["logger"] == "control.node.api" and "0.0.0.0:19901" in warning["message"]
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in lines)


def test_filters_and_since_parse():
    now = 1_800_000_000.0
    assert parse_since("5m", now) == now - 300 and parse_since("30", now) == now - 30
    stamp = datetime.datetime(2027, 1, 15, 8, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_since("2027-01-15T08:00:00Z", now) == stamp == parse_since("2027-01-15T08:00:00", now)
    assert parse_since(str(now), 0) == now
    with pytest.raises(FilterError):
        Filters.parse({"verdict": "allowed,nope"}, now)
    f = Filters.parse({"pod": "east/*/api", "verdict": "Denied"}, now)
    rec = {"seq": 1, "time": now, "verdict": "denied", "src_pod": "west/x/a", "dst_pod": "east/shop/api"}
    assert f.match(rec) and not f.match({**rec, "verdict": "allowed"}) and not f.match({**rec, "dst_pod": "east/shop/db"})


def test_raw_log_rows_of_the_packet_loop_are_normalized():
    """The packet loop's log rows (``Dataplane.verdicts``) carry numbers: a protocol
    number, a reason index, both sides' rule ids, a CLOCK_MONOTONIC time."""
    from fastpath.counters import REASON

    row = {"seq": 0, "time_ns": time.monotonic_ns() - 2_000_000_000, "zone": 0, "src": "198.18.2.20",
           "dst": "198.18.1.10", "sport": 41000, "dport": 80, "proto": 6, "direction": "ingress", "allowed": False,
           "reason": REASON["denied_ingress"], "rule_egress": -2, "rule_ingress": -1, "revision": 3}
    rec = normalize(row)
    assert rec["verdict"] == "denied" and rec["protocol"] == "TCP" and rec["reason"] == "denied_ingress"
    assert rec["rule"] == -1 and abs(rec["time"] - (time.time() - 2.0)) < 0.5
    admitted = normalize({**row, "allowed": True, "rule_ingress": 4, "direction": "egress", "rule_egress": 7, "proto": 17})
    assert admitted["verdict"] == "allowed" and admitted["rule"] == 7 and admitted["protocol"] == "UDP"
    resolved = Resolver().resolve(row, None)  # no state yet: nothing is named, nothing guessed
    assert resolved["src_pod"] is None and resolved["policy"] is None and resolved["policies"] == []
