"""Settings, the recompile loop and the dataplane hand-over of the node daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from typing import Callable

import pytest
import yaml

from control.node import daemon as daemon_mod
from control.node.config import ClusterSource, Settings, SettingsError, parse_duration, parse_listen
from control.node.store import KINDS

from .builders import make_namespace, make_pod, make_policy
from .daemon_harness import dir_settings, eventually, running, write_yaml


# --------------------------------------------------------------------------- settings


def args(**kw) -> argparse.Namespace:
    base = dict(config=None, node_name=None, local_cluster=None, cluster=[], cni_socket=None, state_dir=None,
                bpf_dir=None, no_dataplane=False, api_listen=None, default_peer_scope=None, stale_after=None,
                no_multicluster=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25), ("1m30s", 90), ("2", 2)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-1", "1h 2m", "s30"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_cluster_sources():
    assert ClusterSource.parse("c1=dir:/a/b") == ClusterSource("c1", "dir", "/a/b")
    assert ClusterSource.parse("c2=kubeconfig:/k#ctx") == ClusterSource("c2", "kubeconfig", "/k", "ctx")
    assert ClusterSource.parse("c3=kubeconfig:/k") == ClusterSource("c3", "kubeconfig", "/k", None)
    assert ClusterSource.parse("c4=in-cluster") == ClusterSource("c4", "in-cluster")
    for bad in ("c1", "c1=ftp:/x", "c1=dir:"):
        with pytest.raises(ValueError):
            ClusterSource.parse(bad)


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9901") == ("tcp", ("127.0.0.1", 9901))
    assert parse_listen("[::1]:80") == ("tcp", ("::1", 80))
    assert parse_listen("unix:/run/mcnp.sock") == ("unix", "/run/mcnp.sock")
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_flags_win_over_the_config_file(tmp_path):
    cfg = tmp_path / "mcnp.yaml"
    cfg.write_text(yaml.safe_dump({
        "node-name": "from-file", "local-cluster": "c1",
        "clusters": {"c1": "dir:/tmp/c1", "c2": "kubeconfig:/tmp/k#ctx"},
        "stale-after": "5m", "api-listen": "unix:/tmp/x.sock", "state-dir": "/var/lib/x",
        "multicluster": True,
    }))
    s = Settings.from_args(args(config=str(cfg), node_name="from-flag", no_multicluster=True))
    assert s.node_name == "from-flag" and s.local_cluster == "c1"
    assert [c.name for c in s.clusters] == ["c1", "c2"] and s.clusters[1].context == "ctx"
    assert s.stale_after == 300 and s.api_listen == "unix:/tmp/x.sock" and s.state_dir == "/var/lib/x"
    assert s.multicluster is False and s.remote_clusters == ["c2"]
    assert s.dataplane is True  # mcnp run enforces unless told not to
    assert Settings.from_args(args(config=str(cfg), no_dataplane=True)).dataplane is False


def test_validate_reports_every_problem_at_once(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"colour": "blue", "stale-after": "soon"}))
    with pytest.raises(SettingsError) as e:
        Settings.from_args(args(config=str(cfg), local_cluster="c9", cluster=["Bad_Name=dir:/x", "c1=dir:/y", "c1=dir:/z"],
                                cni_socket="relative.sock", state_dir="var/lib", api_listen="nowhere",
                                default_peer_scope="galaxy"))
    text = "\n".join(e.value.problems)
    for needle in ("colour", "stale-after", "--node-name", "Bad_Name", "given twice", "--local-cluster c9",
                   "--cni-socket relative.sock", "--state-dir var/lib", "--api-listen", "galaxy"):
        assert needle in text, needle
    assert len(e.value.problems) >= 10


def test_run_returns_2_on_an_invalid_configuration(capsys):
    assert daemon_mod.run(Settings()) == 2
    assert "--node-name is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- recompiles


def write_world(root: str) -> list[tuple[str, str]]:
    specs = []
    for name in ("c1", "c2"):
        d = os.path.join(root, name)
        os.makedirs(d)
        pods = [make_namespace("x")] + [make_pod("x", f"p{i}", f"198.18.{name[-1]}.{i + 1}", {"app": f"p{i}"}) for i in range(4)]
        write_yaml(os.path.join(d, "objects.yaml"), yaml.safe_dump_all(pods))
        specs.append((name, d))
    return specs


class RecordingCompiler:
    """Stands in for control.compile.compiler: records what it was asked, from which thread."""

    def __init__(self, delay: float = 0.0):
        self.calls = []
        self.threads = set()
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, cset, local, revision):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.threads.add(threading.current_thread().name)
        if self.delay:
            threading.Event().wait(self.delay)
        local_refs = sorted(p.ref for p in cset.pods() if local(p))
        self.calls.append((revision, local_refs, sorted(p.ref for c in cset.clusters.values() for p in c.policies.values())))
        with self.lock:
            self.in_flight -= 1
        return FakeTables(revision)


class FakeTables:
    def __init__(self, revision):
        self.revision = revision
        self.arrays = {}

    def summary(self):
        return {"revision": self.revision}


class FakeDataplane:
    def __init__(self, settings):
        self.settings = settings
        self.published = []
        self.closed = False

    def wait_ready(self, timeout):
        pass

    def ready(self):
        return not self.closed

    def publish(self, tables, pods, services=None):
        self.published.append((tables.revision, pods))

    def discover(self, ips, dirs):
        return {}

    def stats(self):
        return {"verdicts": {"allowed": {"rule": 5}, "denied": {"no-rule": 2}}, "flows": 3, "rx_batches": 7,
                "rule_hits": [{"rule": 0, "hits": 4, "name": {"policy": "c1/x/allow", "direction": "Ingress"}},
                              {"rule": 1, "hits": 1, "name": {"policy": "c1/x/allow", "direction": "Ingress"}}]}

    def flows(self, limit):
        return [{"src": "198.18.1.1", "dst": "198.18.2.1"}][:limit]

    def close(self):
        self.closed = True

    def failure(self):
        return getattr(self, "dead", None)


def with_fake_dataplane(tmp_path) -> tuple[Settings, list[FakeDataplane], Callable]:
    """Settings of a daemon that enforces, on the test world, and a factory that makes
    its dataplanes fakes (listed in the order they were made)."""
    planes: list[FakeDataplane] = []

    def factory(settings):
        planes.append(FakeDataplane(settings))
        return planes[-1]

    settings = dir_settings(write_world(str(tmp_path)), dataplane=True, state_dir=str(tmp_path / "state"),
                            cni_socket=str(tmp_path / "cni.sock"))
    return settings, planes, factory


def test_a_dead_packet_loop_makes_the_daemon_unready_and_fail(tmp_path):
    settings, planes, factory = with_fake_dataplane(tmp_path)

    async def main():
        async with running(settings, compiler=RecordingCompiler(), dataplane_factory=factory) as (daemon, client):
            await daemon.wait_revision(daemon.tables.revision, compiled=True)
            status, body = await client.get("/readyz")
            assert status == 200 and not daemon.failed.is_set()
            planes[0].dead = "dataplane worker exited (exit code -9)"
            await asyncio.wait_for(daemon.failed.wait(), 5)
            status, body = await client.get("/readyz")
            assert status == 503 and body == {"ready": False, "dataplane": "dataplane worker exited (exit code -9)"}

    asyncio.run(main())


def test_compile_runs_off_the_event_loop_and_publishes_to_the_dataplane(tmp_path):
    settings, planes, factory = with_fake_dataplane(tmp_path)
    compiler = RecordingCompiler()

    async def main():
        async with running(settings, compiler=compiler, dataplane_factory=factory) as (daemon, client):
            await daemon.wait_revision(daemon.tables.revision, compiled=True)
            [plane] = planes
            rev, pods = plane.published[-1]
            assert rev == daemon.tables.compiled_revision
            assert pods == {}  # no sandbox hooked yet
            assert compiler.threads == {t for t in compiler.threads if t.startswith("mcnp-compile")}
            # every pod of the local cluster is enforced (egress judged at the backend, S11)
            assert compiler.calls[-1][1] == [f"c1/x/p{i}" for i in range(4)]
            status, body = await client.get("/v1/stats")
            assert body["dataplane"]["flows"] == 3 and body["local_endpoints"] == 4
            status, text = await client.get("/metrics")
            assert 'mcnp_packets_total{reason="no-rule",verdict="denied"} 2.0' in text
            assert 'mcnp_policy_hits_total{direction="Ingress",policy="c1/x/allow"} 5.0' in text
            assert "mcnp_tracked_flows 3.0" in text and "mcnp_dataplane_rx_batches 7.0" in text
            status, body = await client.get("/v1/flows", limit=1)
            assert body == {"dataplane": True, "flows": [{"src": "198.18.1.1", "dst": "198.18.2.1"}]}
        assert planes[0].closed

    asyncio.run(main())


def test_a_burst_of_changes_is_coalesced_with_one_compile_in_flight(tmp_path):
    specs = write_world(str(tmp_path))
    compiler = RecordingCompiler(delay=0.05)

    async def main():
        async with running(dir_settings(specs), compiler=compiler) as (daemon, _):
            before = len(compiler.calls)
            sink = daemon.store.sinks["c1"]
            for i in range(200):
                sink.upsert("NetworkPolicy", make_policy("x", f"p{i}", {"matchLabels": {"app": "p0"}}, ingress=[]), f"burst:{i}")
                if i % 20 == 0:
                    await asyncio.sleep(0)

            async def all_in():
                return len(compiler.calls[-1][2]) == 200 if len(compiler.calls) > before else False

            await eventually(all_in)
            assert len(compiler.calls) - before <= 5
            assert compiler.max_in_flight == 1

    asyncio.run(main())


def test_tables_are_not_compiled_before_the_local_cluster_is_listed(tmp_path):
    specs = write_world(str(tmp_path))
    missing = str(tmp_path / "not-yet")
    compiler = RecordingCompiler()

    async def main():
        async with running(dir_settings([("c1", missing)] + specs[1:]), compiler=compiler, settle=False) as (daemon, _):
            async def remote_listed():
                return daemon.snapshot is not None and not daemon.store.sinks["c2"].status.listed ^ set(KINDS)

            await eventually(remote_listed)
            assert compiler.calls == []
            os.rename(specs[0][1], missing)
            await daemon.wait_settled(5)
            await daemon.wait_revision(daemon.tables.revision, compiled=True)
            assert compiler.calls

    asyncio.run(main())


def test_compiler_failure_keeps_the_previous_tables(tmp_path):
    specs = write_world(str(tmp_path))
    good = RecordingCompiler()
    state = {"fail": False}

    def flaky(cset, local, revision):
        if state["fail"]:
            raise RuntimeError("compiler bug")
        return good(cset, local, revision)

    async def main():
        async with running(dir_settings(specs), compiler=flaky) as (daemon, client):
            await daemon.wait_revision(daemon.tables.revision, compiled=True)
            kept = daemon.tables.compiled_revision
            state["fail"] = True
            daemon.store.sinks["c1"].upsert("NetworkPolicy", make_policy("x", "new", {}, ingress=[]), "x")

            async def failed():
                return daemon.tables.error is not None

            await eventually(failed)
            assert daemon.tables.compiled_revision == kept and "compiler bug" in daemon.tables.error
            _, text = await client.get("/metrics")
            assert "mcnp_compile_errors_total 1.0" in text

    asyncio.run(main())


# --------------------------------------------------------------------------- remote clusters


def test_remote_outage_is_fail_static_then_revoked_by_stale_after_then_recovered(tmp_path):
    from control.semantics.model import MC_KEY

    from .fake_apiserver import FakeApiServer

    local = tmp_path / "c1"
    local.mkdir()
    objs = [make_namespace("x"), make_pod("x", "a", "198.18.1.1", {"app": "a"}),
            make_policy("x", "from-c2", {}, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {MC_KEY: "c2"}}}]}])]
    write_yaml(str(local / "objects.yaml"), yaml.safe_dump_all(objs))
    server = FakeApiServer()
    server.apply(make_namespace("x"))
    server.apply(make_pod("x", "r", "198.18.2.1", {"app": "r"}))

    async def main():
        await server.start()
        kubeconfig = server.write_kubeconfig(str(tmp_path / "c2.kubeconfig"))
        settings = dir_settings([("c1", str(local))], stale_after=0.3, backoff_initial=0.01, backoff_max=0.05)
        settings.clusters.append(ClusterSource("c2", "kubeconfig", kubeconfig, "fake"))
        probe = {"from": "198.18.2.1", "to": "c1/x/a", "port": 80, "protocol": "TCP"}
        try:
            async with running(settings) as (daemon, client):
                assert (await client.get("/v1/explain", **probe))[1]["allowed"] is True
                await server.stop()

                async def unreachable():
                    _, body = await client.get("/v1/clusters")
                    return next(c for c in body["clusters"] if c["name"] == "c2")["connected"] is False

                await eventually(unreachable)
                assert (await client.get("/v1/explain", **probe))[1]["allowed"] is True  # fail-static

                async def revoked():
                    _, body = await client.get("/v1/explain", **probe)
                    return body["allowed"] is False

                await eventually(revoked)
                _, body = await client.get("/v1/clusters")
                c2 = next(c for c in body["clusters"] if c["name"] == "c2")
                assert c2["stale"] is True and c2["unreachable_for"] >= 0.3
                assert 'mcnp_cluster_stale{cluster="c2"} 1.0' in (await client.get("/metrics"))[1]
                assert (await client.get("/readyz"))[0] == 200  # listed once: still ready

                await server.start()

                async def recovered():
                    _, body = await client.get("/v1/explain", **probe)
                    return body["allowed"] is True

                await eventually(recovered, timeout=3.0)
                assert server.token not in str(await client.get("/v1/clusters"))
        finally:
            await server.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- incremental compiles


def test_the_daemon_compiles_incrementally_and_as_a_full_compile_would(tmp_path):
    """Pod and local policy changes are followed incrementally, a remote policy change
    leaves the tables alone, a namespace change compiles in full — and after each the
    tables judge as a fresh full compile of the snapshot does."""
    import numpy as np

    from control.compile.compiler import compile_tables
    from fastpath import match
    from fastpath.tables import ip_keys

    specs = write_world(str(tmp_path))

    async def main():
        async with running(dir_settings(specs)) as (daemon, _):
            async def settled_on(path):
                await daemon.wait_settled(5)
                await daemon.wait_revision(daemon.snapshot.revision, compiled=True)
                assert daemon.tables.last_path == path, (daemon.tables.last_path, path)
                snap = daemon.snapshot
                want = compile_tables(snap.cset, daemon.local, snap.revision, clusters={"c1"})
                got = daemon.tables.tables
                ips = [str(ip) for p in snap.cset.pods() for ip in p.ips] + ["203.0.113.9"]
                pairs = [(a, b) for a in ips for b in ips]
                args = (ip_keys([a for a, _ in pairs]), ip_keys([b for _, b in pairs]),
                        np.full(len(pairs), 6, np.uint8), np.full(len(pairs), 80, np.uint16))
                jg, jw = match.judge(got, *args), match.judge(want, *args)
                assert (jg.allowed == jw.allowed).all()
                assert [got.rule(int(r)) for r in jg.ingress] == [want.rule(int(r)) for r in jw.ingress]
                return jg.allowed

            await settled_on("full")  # the first lists: as many full compiles as it took
            fulls = daemon.tables.paths["full"]
            c1, c2 = daemon.store.sinks["c1"], daemon.store.sinks["c2"]
            c1.upsert("NetworkPolicy", make_policy("x", "only-p1", {"matchLabels": {"app": "p0"}},
                                                   ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "p1"}}}]}]), "t")
            allowed = await settled_on("incremental")
            assert not allowed.all()
            c1.upsert("Pod", make_pod("x", "p2", "198.18.1.3", {"app": "p1"}), "t")
            await settled_on("incremental")
            c2.upsert("NetworkPolicy", make_policy("x", "remote", {}, ingress=[]), "t")
            await settled_on("none")
            c2.upsert("Namespace", make_namespace("x", team="blue"), "t")
            await settled_on("full")
            assert daemon.tables.paths == {"full": fulls + 1, "incremental": 2, "none": 1}

    asyncio.run(main())


def test_the_collector_is_held_off_during_the_start_and_back_after_at_most_the_limit():
    import gc
    import time as _time

    from control.node.daemon import StartGc

    assert gc.isenabled()
    hold = StartGc(limit=0.2)
    try:
        hold.hold()
        assert not gc.isenabled() and hold.held
        frozen = gc.get_freeze_count()
        junk = [[] for _ in range(1000)]  # made while held: frozen on release
        deadline = _time.monotonic() + 5
        while hold.held and _time.monotonic() < deadline:  # the limit releases it by itself
            _time.sleep(0.02)
        assert not hold.held and gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(junk)
        hold.release()  # a second release changes nothing
        assert gc.isenabled()
    finally:
        hold.release()
        gc.unfreeze()
        gc.enable()


def test_a_whole_batch_is_compiled_without_the_coalescing_wait(tmp_path):
    """A directory reload arrives as one batch (everything its source read): nothing
    more is worth waiting for. Single watch events still wait ``coalesce_delay``."""
    specs = write_world(str(tmp_path))
    settings = dir_settings(specs)
    settings.coalesce_delay = 0.25
    daemon = daemon_mod.Daemon(settings, compiler=False, serve_api=False)
    sink = daemon.store.sinks["c1"]
    sink.replace_all([("f", make_namespace("x")), ("f", make_pod("x", "a", "198.18.1.1"))])
    assert daemon.coalesce_delay() == 0.0
    sink.upsert("Pod", make_pod("x", "b", "198.18.1.2"), "watch")
    assert daemon.coalesce_delay() == 0.25
    sink.replace_all([("f", make_namespace("x"))])
    assert daemon.coalesce_delay() == 0.0


def test_directory_watch_settings():
    s = Settings.from_mapping({"dir-watch": False, "dir-rescan-interval": "2s"})
    assert s.dir_watch is False and s.dir_rescan_interval == 2.0
    problems: list = []
    Settings.from_mapping({"dir-watch": "no", "dir-rescan-interval": "soon"}, problems)
    assert len(problems) == 2 and any("dir-watch" in p for p in problems) and any("dir-rescan-interval" in p for p in problems)
    bad = Settings(node_name="n", local_cluster="c1", clusters=[ClusterSource("c1", "dir", "/x")], dir_rescan_interval=0)
    assert "dir-rescan-interval: must be positive" in bad.problems()
