"""Cluster sources: watched manifest directories, and Kubernetes list/watch through the
real kubernetes_asyncio client against a wire-level fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import yaml

from control.node.config import ClusterSource, Settings
from control.node.services import services_for
from control.node.sources import Backoff, DirSource, KubeSource
from control.node.store import KINDS, Store

from .builders import make_namespace, make_pod, make_policy
from .service_builders import make_service, make_slice
from .daemon_harness import eventually, write_yaml
from .fake_apiserver import TOKEN, FakeApiServer


# --------------------------------------------------------------------------- directories


def dir_source(path: str) -> tuple[DirSource, Store]:
    store = Store()
    sink = store.add_cluster("c1")
    return DirSource(ClusterSource("c1", "dir", path), sink, 0.05, settle=0), store


def test_dir_poll_reports_only_real_changes(tmp_path):
    d = str(tmp_path)
    write_yaml(os.path.join(d, "ns.yaml"), yaml.safe_dump(make_namespace("x")))
    source, _ = dir_source(d)
    first = source.poll()
    assert [obj["metadata"]["name"] for _, obj in first] == ["x"]
    assert source.poll() is None  # nothing changed
    # Same contents, new mtime: the hash says nothing changed.
    write_yaml(os.path.join(d, "ns.yaml"), yaml.safe_dump(make_namespace("x")))
    os.utime(os.path.join(d, "ns.yaml"), ns=(1, 1))
    assert source.poll() is None
    write_yaml(os.path.join(d, "pod.yaml"), yaml.safe_dump(make_pod("x", "a", "198.18.0.1")))
    second = source.poll()
    assert len(second) == 2
    assert second[0][1] is first[0][1]  # unchanged file: the very same parsed object
    write_yaml(os.path.join(d, ".hidden.yaml"), "junk: [")
    write_yaml(os.path.join(d, "notes.txt"), "ignored")
    assert source.poll() is None


def test_unparsable_file_keeps_its_last_contents(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "p.yaml")
    write_yaml(path, yaml.safe_dump(make_policy("x", "deny", {}, ingress=[])))
    source, _ = dir_source(d)
    source.poll()
    write_yaml(path, "kind: NetworkPolicy\nmetadata: {name: [broken\n")
    docs = source.poll()
    assert [obj["metadata"]["name"] for _, obj in docs] == ["deny"]
    assert list(source.file_errors) == [path] and "cannot be parsed" in source.file_errors[path]
    write_yaml(path, yaml.safe_dump(make_policy("x", "deny2", {}, ingress=[])))
    assert [obj["metadata"]["name"] for _, obj in source.poll()] == ["deny2"]
    assert source.file_errors == {}


def test_missing_directory_is_an_outage_not_a_crash(tmp_path):
    source, store = dir_source(str(tmp_path / "nope"))

    async def main():
        await source.step()
        st = store.sinks["c1"].status
        assert not st.connected and "nope" in st.last_error and not st.ready
        os.makedirs(tmp_path / "nope")
        await source.step()
        assert st.connected and st.ready

    asyncio.run(main())


def test_a_reload_applies_the_sources_difference_as_a_full_reload_would(tmp_path):
    """The source tells the sink which documents its reload changed (so a one-file
    change costs one file, not the directory); the outcome is that of reloading all."""
    import random

    rng = random.Random(5)
    d = str(tmp_path)
    source, store = dir_source(d)
    sink = source.sink
    fresh = Store()
    full = fresh.add_cluster("c1")
    used = []
    real = sink._reload_by_difference

    def spy(docs, current, previous, added, gone):
        used.append(added is not None)
        return real(docs, current, previous, added, gone)

    sink._reload_by_difference = spy
    write_yaml(os.path.join(d, "ns.yaml"), yaml.safe_dump(make_namespace("x")))
    for step in range(40):
        name = f"f{rng.randrange(6)}.yaml"
        path = os.path.join(d, name)
        action = rng.random()
        if action < 0.2 and os.path.exists(path):
            os.remove(path)
        elif action < 0.3:
            write_yaml(path, "kind: Pod\nmetadata: {name: [broken\n")  # S9: last contents stay
        elif action < 0.4:
            write_yaml(path, yaml.safe_dump(make_pod("x", "same", f"198.18.1.{step + 1}")))  # a name two files claim
        elif action < 0.5:
            svc = make_service("x", f"s-{name[:-5]}", f"198.19.254.{step + 1}", [("http", 80, "TCP")])
            endpoints = make_slice("x", "shared", f"s-{name[:-5]}", [("http", 8080, "TCP")], [f"198.18.0.{step + 1}"])
            write_yaml(path, yaml.safe_dump_all([svc, endpoints]))
        else:
            pod = make_pod("x", name[:-5], f"198.18.0.{step + 1}", {"app": str(rng.randrange(3))})
            policy = make_policy("x", f"p-{name[:-5]}", {"matchLabels": {"app": str(rng.randrange(3))}}, ingress=[])
            write_yaml(path, yaml.safe_dump_all([pod, policy]))
        docs = source.poll()
        if docs is None:
            continue
        sink.replace_all(docs, source.diff)
        full.replace_all(list(docs))
        a, b = store.snapshot(1).cset.clusters["c1"], fresh.snapshot(1).cset.clusters["c1"]
        assert (a.pods, a.policies, a.namespaces) == (b.pods, b.policies, b.namespaces), step
        assert (a.services, a.endpoint_slices) == (b.services, b.endpoint_slices), step
        assert sorted(map(str, sink.errors)) == sorted(map(str, full.errors)), step
    assert sum(used) >= 5, used  # the difference was used, not only the identity path


def test_inotify_wakes_a_check_long_before_the_timer(tmp_path):
    """With inotify each change is read at once; the timers are set far off, so a
    check they made would show in ``wakeups``."""
    d = tmp_path / "m"
    d.mkdir()
    store = Store()
    sink = store.add_cluster("c1")
    source = DirSource(ClusterSource("c1", "dir", str(d)), sink, interval=30, rescan=30)

    def names():
        return sorted(name for _, name in sink.pods)

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.ready)
            assert source.watched
            write_yaml(str(d / "a.yaml"), yaml.safe_dump(make_pod("x", "a", "198.18.0.1")))  # renamed in
            await until(lambda: names() == ["a"])
            with open(d / "b.yaml", "w") as f:  # written in place
                f.write(yaml.safe_dump(make_pod("x", "b", "198.18.0.2")))
            await until(lambda: names() == ["a", "b"])
            os.remove(d / "a.yaml")
            await until(lambda: names() == ["b"])
            # The directory replaced by another: followed again, still without the timer.
            os.rename(d, tmp_path / "old")
            d.mkdir()
            write_yaml(str(d / "c.yaml"), yaml.safe_dump(make_pod("x", "c", "198.18.0.3")))
            source.rescan = 0.2  # the old watch saw its directory go; the next check re-arms
            await until(lambda: names() == ["c"] and source.watched)
            source.rescan = 30
            write_yaml(str(d / "e.yaml"), yaml.safe_dump(make_pod("x", "e", "198.18.0.5")))
            await until(lambda: names() == ["c", "e"], timeout=2.0)
            assert source.wakeups["inotify"] >= 4
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not source.watched  # the descriptor is closed with the task

    asyncio.run(main())


def test_without_inotify_the_directory_is_polled(tmp_path):
    store = Store()
    sink = store.add_cluster("c1")
    source = DirSource(ClusterSource("c1", "dir", str(tmp_path)), sink, interval=0.02, rescan=30, watch=False)

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.ready)
            write_yaml(str(tmp_path / "a.yaml"), yaml.safe_dump(make_pod("x", "a", "198.18.0.1")))
            await until(lambda: ("x", "a") in sink.pods)
            assert not source.watched and source.wakeups["inotify"] == 0 and source.wakeups["timer"] >= 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_a_file_rewritten_in_place_never_takes_effect_half_written(tmp_path):
    """The first document written, a pause, then the rest: during the pause the file's
    previous contents stay in force (the rescan safety net included), and the new ones
    apply once the file is closed and has settled."""
    d = tmp_path / "m"
    d.mkdir()
    write_yaml(str(d / "base.yaml"), yaml.safe_dump_all([make_namespace("x"), make_pod("x", "a", "198.18.0.1")]))
    write_yaml(str(d / "p.yaml"), yaml.safe_dump_all([make_pod("x", "b", "198.18.0.2"), make_policy("x", "deny", {}, ingress=[])]))
    store = Store()
    sink = store.add_cluster("c1")
    source = DirSource(ClusterSource("c1", "dir", str(d)), sink, interval=0.05, rescan=0.1)

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: ("x", "deny") in sink.policies)
            with open(d / "p.yaml", "w") as f:  # truncated, written in place
                f.write(yaml.safe_dump(make_pod("x", "b2", "198.18.0.3")) + "---\n")
                f.flush()
                for _ in range(24):  # 1.2 s: many rescans and settle intervals
                    await asyncio.sleep(0.05)
                    assert ("x", "deny") in sink.policies and ("x", "b2") not in sink.pods
                assert source.unsettled == [str(d / "p.yaml")]
                f.write(yaml.safe_dump(make_policy("x", "deny", {}, ingress=[])))
            await until(lambda: ("x", "b2") in sink.pods)
            assert ("x", "deny") in sink.policies and ("x", "b") not in sink.pods and source.unsettled == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


class StepClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_inotify_a_changing_file_is_read_only_once_settled(tmp_path):
    path = tmp_path / "p.yaml"
    clock = StepClock()
    store = Store()
    source = DirSource(ClusterSource("c1", "dir", str(tmp_path)), store.add_cluster("c1"), watch=False,
                       settle=0.5, clock=clock)
    path.write_text(yaml.safe_dump_all([make_namespace("x"), make_policy("x", "deny", {}, ingress=[])]))
    assert source.poll() is None  # not settled yet: the first list waits for it
    clock.now += 0.6
    assert [obj["metadata"]["name"] for _, obj in source.poll()] == ["x", "deny"]
    path.write_text(yaml.safe_dump(make_namespace("x")))  # shrunk: half written
    clock.now += 0.1
    assert source.poll() is None and source.unsettled == [str(path)]
    clock.now += 0.3
    path.write_text(yaml.safe_dump(make_namespace("x")) + "---\nkind: NetworkPolicy\nmetadata: {name: de")
    clock.now += 0.3  # 0.7 s since the first change, 0.3 s since the last
    assert source.poll() is None and source.file_errors == {}
    path.write_text(yaml.safe_dump_all([make_namespace("x"), make_policy("x", "deny2", {}, ingress=[])]))
    clock.now += 0.1
    assert source.poll() is None
    clock.now += 0.5
    assert [obj["metadata"]["name"] for _, obj in source.poll()] == ["x", "deny2"]


def test_a_crashing_directory_source_is_reported_and_restarted(tmp_path):
    write_yaml(str(tmp_path / "ns.yaml"), yaml.safe_dump(make_namespace("x")))
    store = Store()
    sink = store.add_cluster("c1")
    source = DirSource(ClusterSource("c1", "dir", str(tmp_path)), sink, interval=0.02, rescan=0.05,
                       backoff=Backoff(0.3, 0.3))
    real_poll, failures = source.poll, []

    def poll(writing=frozenset()):
        if failures:
            raise failures.pop()
        return real_poll(writing)

    source.poll = poll

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.ready)
            failures.append(MemoryError("expanding a file"))
            await until(lambda: sink.status.source_failure is not None)
            assert "MemoryError: expanding a file" in sink.status.last_error
            assert store.not_ready == ["c1"] and ("x" in sink.namespaces)
            await until(lambda: sink.status.ready)
            assert sink.status.source_restarts == 1 and not task.done()
            write_yaml(str(tmp_path / "pod.yaml"), yaml.safe_dump(make_pod("x", "a", "198.18.0.1")))
            await until(lambda: ("x", "a") in sink.pods)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_a_directory_delivers_services_and_endpoint_slices(tmp_path):
    write_yaml(str(tmp_path / "ns.yaml"), yaml.safe_dump_all([make_namespace("x"), make_pod("x", "a", "198.18.0.1")]))
    path = str(tmp_path / "svc.yaml")
    svc = make_service("x", "api", "198.19.254.10", [("http", 80, "TCP")])
    write_yaml(path, yaml.safe_dump_all([svc, make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.0.1"])]))
    store = Store()
    sink = store.add_cluster("c1")
    source = DirSource(ClusterSource("c1", "dir", str(tmp_path)), sink, interval=0.02, rescan=0.05, settle=0)

    def endpoints():
        return [e["endpoints"] for e in services_for(store.snapshot(1).cset, "c1")]

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.ready and ("x", "api") in sink.services)
            assert endpoints() == [[["198.18.0.1", 8080]]]
            moved = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.0.1", "198.18.9.1"])
            write_yaml(path, yaml.safe_dump_all([svc, moved]))
            await until(lambda: len(endpoints()[0]) == 2)
            bad = make_service("x", "api", "198.19.254.10", [("http", 80, "tcp")])
            write_yaml(path, yaml.safe_dump_all([bad, moved]))  # S9: the last valid version stays
            await until(lambda: [e.field for e in store.errors()] == ["spec.ports[0].protocol"])
            assert endpoints() == [[["198.18.0.1", 8080], ["198.18.9.1", 8080]]]
            os.remove(path)
            await until(lambda: not sink.services and not sink.endpoint_slices)
            assert store.errors() == [] and endpoints() == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_backoff_grows_with_jitter_and_resets():
    import random

    b = Backoff(0.5, 4.0, random.Random(1))
    waits = [b.next() for _ in range(6)]
    ceilings = [0.5, 1, 2, 4, 4, 4]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings))
    assert len(set(waits)) == len(waits)
    b.reset()
    assert b.next() <= 0.5


# --------------------------------------------------------------------------- Kubernetes


def kube_settings(**kw) -> Settings:
    s = Settings(backoff_initial=0.01, backoff_max=0.05, watch_timeout=30)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@contextlib.asynccontextmanager
async def kube(tmp_path, server: FakeApiServer, context: str = "fake", **settings):
    await server.start()
    path = server.write_kubeconfig(str(tmp_path / "kubeconfig"), context)
    store = Store()
    sink = store.add_cluster("c2")
    source = KubeSource(ClusterSource("c2", "kubeconfig", path, context), sink, kube_settings(**settings))
    task = asyncio.create_task(source.run())
    try:
        yield source, sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


def seed(server: FakeApiServer, pods: int = 3) -> None:
    server.apply(make_namespace("x", team="blue"))
    for i in range(pods):
        server.apply(make_pod("x", f"p{i}", f"198.18.2.{i + 1}", {"app": f"p{i}"}))
    server.apply(make_policy("x", "deny", {}, ingress=[]))


def seeded() -> FakeApiServer:
    """A fake API server holding namespace x, pods p0..p2 and a deny-all policy."""
    server = FakeApiServer()
    seed(server)
    return server


async def until(predicate, timeout: float = 3.0):
    async def check():
        return predicate()
    return await eventually(check, timeout=timeout, interval=0.01)


async def until_watching(server: FakeApiServer, sink) -> None:
    """Until the source has listed every kind and watches each of them."""
    await until(lambda: sink.status.ready and server.open_watches == len(KINDS))


def test_list_then_watch_adds_modifies_and_deletes(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until(lambda: sink.status.ready)
            assert set(sink.pods) == {("x", "p0"), ("x", "p1"), ("x", "p2")}
            assert sink.namespaces["x"].labels["team"] == "blue" and ("x", "deny") in sink.policies
            await until(lambda: server.open_watches == len(KINDS))
            server.apply(make_pod("x", "p9", "198.18.2.9"))
            server.apply(make_pod("x", "p0", "198.18.2.100"))
            server.delete(make_pod("x", "p1", "-"))
            await until(lambda: ("x", "p9") in sink.pods and ("x", "p1") not in sink.pods)
            assert str(sink.pods[("x", "p0")].ip) == "198.18.2.100"
            assert source.relists == {kind: 1 for kind in KINDS}
            watch = [q for what, q in server.requests if what == "Pod" and q.get("watch") == "true"][0]
            assert watch["allowWatchBookmarks"] == "true" and int(watch["resourceVersion"]) >= 1000

    asyncio.run(main())


def test_bookmark_moves_the_resume_point(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until_watching(server, sink)
            server.apply(make_namespace("unrelated"))  # bumps the version; pods see nothing
            server.bookmark()
            bookmark_rv = str(server.rv)
            await until(lambda: source.resource_versions["Pod"] == bookmark_rv)
            before = len(server.requests)
            server.drop_watches()
            await until(lambda: any(w == "Pod" and q.get("watch") == "true" for w, q in server.requests[before:]))
            resumed = [q for what, q in server.requests if what == "Pod" and q.get("watch") == "true"][-1]
            assert resumed["resourceVersion"] == bookmark_rv
            assert source.relists["Pod"] == 1

    asyncio.run(main())


def test_gone_relists_and_sees_what_happened_meanwhile(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until_watching(server, sink)
            # Events happen while the client is cut off, then history is compacted.
            server.withhold = True
            server.apply(make_pod("x", "late", "198.18.2.50"))
            server.delete(make_pod("x", "p2", "-"))
            server.compact()
            server.withhold = False
            server.drop_watches()
            await until(lambda: source.relists["Pod"] == 2)
            await until(lambda: ("x", "late") in sink.pods and ("x", "p2") not in sink.pods)

    asyncio.run(main())


def test_dropped_connection_reconnects_without_relisting(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until_watching(server, sink)
            for _ in range(3):
                before = len(server.requests)
                server.drop_watches()
                await until(lambda: len(server.requests) >= before + len(KINDS) and server.open_watches == len(KINDS))
            server.apply(make_pod("x", "after", "198.18.2.60"))
            await until(lambda: ("x", "after") in sink.pods)
            assert source.relists == {kind: 1 for kind in KINDS}

    asyncio.run(main())


def test_slow_and_failing_responses_are_waited_out(tmp_path):
    server = FakeApiServer()
    seed(server, pods=50)
    server.delay = 0.2
    server.fail_next = 4

    async def main():
        async with kube(tmp_path, server, list_page_size=7) as (source, sink):
            await until(lambda: sink.status.last_error is not None)
            assert "500" in sink.status.last_error
            await until(lambda: sink.status.ready, timeout=10)
            assert len(sink.pods) == 50 and sink.status.connected
            pages = [q for what, q in server.requests if what == "Pod" and q.get("watch") != "true" and "continue" in q]
            assert len(pages) >= 7

    asyncio.run(main())


def test_outage_keeps_state_and_reconnects(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until_watching(server, sink)
            await server.stop()
            await until(lambda: not sink.status.connected)
            assert len(sink.pods) == 3  # fail-static
            assert sink.status.disconnected_since is not None
            server.apply(make_pod("x", "while-down", "198.18.2.70"))
            await server.start()
            await until(lambda: ("x", "while-down") in sink.pods and sink.status.connected)

    asyncio.run(main())


def test_cluster_property_must_name_the_cluster(tmp_path):
    server = seeded()
    server.cluster_property = "someone-else"

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until(lambda: sink.status.ready)
            assert sink.status.declared_name == "someone-else"
            assert "someone-else" in sink.status.last_error

    asyncio.run(main())


def test_credentials_are_never_logged(tmp_path, caplog):
    server = seeded()
    server.fail_next = 2

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until(lambda: sink.status.ready)
            await server.stop()
            await until(lambda: not sink.status.connected)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert TOKEN not in caplog.text
    assert caplog.text  # something was logged: the outage


def test_unreadable_kubeconfig_is_reported_by_name(tmp_path):
    store = Store()
    sink = store.add_cluster("c3")
    path = str(tmp_path / "missing.kubeconfig")
    source = KubeSource(ClusterSource("c3", "kubeconfig", path), sink, kube_settings())

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.last_error is not None)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert "missing.kubeconfig" in sink.status.last_error and not sink.status.ready

    asyncio.run(main())


def test_a_crashing_kube_source_is_reported_and_restarted(tmp_path):
    server = seeded()

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            await until_watching(server, sink)
            real = source._event

            def event(kind, ev, rv):
                if (ev.get("object") or {}).get("metadata", {}).get("name") == "poison":
                    raise KeyError("unexpected shape")
                return real(kind, ev, rv)

            source._event = event
            server.apply(make_pod("x", "poison", "198.18.2.90"))
            await until(lambda: sink.status.source_failure is not None)
            assert "KeyError" in sink.status.last_error and not sink.status.ready
            source._event = real
            relists = source.relists["Pod"]
            await until(lambda: sink.status.ready and ("x", "poison") in sink.pods)
            assert source.relists["Pod"] > relists and sink.status.source_restarts == 1

    asyncio.run(main())


def test_a_password_in_a_malformed_server_url_is_never_shown(tmp_path, caplog):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://admin:hunter2@198.18.0.1:port/"}}],
        "users": [{"name": "u", "user": {"token": "tok-secret-1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    store = Store()
    sink = store.add_cluster("c3")
    source = KubeSource(ClusterSource("c3", "kubeconfig", str(path)), sink, kube_settings())

    async def main():
        task = asyncio.create_task(source.run())
        try:
            await until(lambda: sink.status.last_error is not None)
            await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    shown = caplog.text + str(sink.status.last_error)
    assert "hunter2" not in shown and "tok-secret-1" not in shown
    assert "***@198.18.0.1" in shown


def test_services_and_endpoint_slices_are_listed_and_watched(tmp_path):
    server = seeded()
    server.apply(make_service("x", "api", "198.19.254.10", [("http", 80, "TCP")]))
    server.apply(make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.2.1"]))

    async def main():
        async with kube(tmp_path, server) as (source, sink):
            def entries():
                return [(e["service"], e["endpoints"], e["defer"]) for e in services_for(sink.store.snapshot(1).cset, "c2")]

            await until_watching(server, sink)
            assert entries() == [("c2/x/api", [["198.18.2.1", 8080]], True)]
            assert {"Service", "EndpointSlice"} <= {what for what, _ in server.requests}
            server.apply(make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.2.1", ("198.18.2.2", False)]))
            server.apply(make_slice("x", "api-2", "api", [("http", 8080, "TCP")], ["198.18.9.9"]))
            await until(lambda: len(sink.endpoint_slices) == 2)
            assert entries() == [("c2/x/api", [["198.18.2.1", 8080], ["198.18.9.9", 8080]], False)]
            server.delete(make_service("x", "api", None, []))
            await until(lambda: not sink.services)
            assert entries() == [] and source.relists["Service"] == source.relists["EndpointSlice"] == 1

    asyncio.run(main())
