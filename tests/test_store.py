"""The cluster state store: rule S9 for invalid objects, M8 conflicts, M9 fail-static and
stale-after revocation (with a fake clock: nothing here sleeps)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from control.semantics.model import Options
from control.semantics.reference import ReferenceEvaluator
from control.node.services import services_for
from control.node.store import KINDS, Store

from .builders import make_namespace, make_pod, make_policy
from .service_builders import make_service, make_slice


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def deny_all(name: str = "deny", ns: str = "x") -> dict:
    return make_policy(ns, name, {}, ingress=[])


def allow_from_b(name: str = "allow-b", ns: str = "x") -> dict:
    return make_policy(ns, name, {"matchLabels": {"app": "a"}}, ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}])


def broken(policy: dict) -> dict:
    bad = dict(policy)
    bad["spec"] = dict(policy["spec"], ingress=[{"from": [{}]}])  # a peer with no field set
    return bad


def listed(store: Store, name: str, objs: list[dict]):
    sink = store.sinks.get(name) or store.add_cluster(name)
    by_kind = {kind: [] for kind in KINDS}
    for o in objs:
        by_kind[o["kind"]].append((f"test:{o['metadata']['name']}", o))
    for kind, items in by_kind.items():
        sink.replace_kind(kind, items)
    return sink


def world():
    return [
        make_namespace("x"),
        make_pod("x", "a", "198.18.0.1", {"app": "a"}),
        make_pod("x", "b", "198.18.0.2", {"app": "b"}),
        make_pod("x", "c", "198.18.0.3", {"app": "c"}),
    ]


def duplicates(store: Store) -> list:
    """The objects ignored or failed closed because another source claims their name."""
    return [e for e in store.errors() if e.reason == "duplicate"]


def allowed(store: Store, src: str, dst: str) -> bool:
    cset = store.snapshot(1).cset
    return ReferenceEvaluator(cset).allowed(cset.pod(src), cset.pod(dst), 80, "TCP")


def test_readiness_needs_every_kind_listed():
    store = Store()
    sink = store.add_cluster("c1", local=True)
    assert store.not_ready == ["c1"]
    sink.replace_kind("Namespace", [])
    sink.replace_kind("Pod", [])
    assert store.not_ready == ["c1"]
    sink.replace_kind("NetworkPolicy", [])
    sink.replace_kind("Service", [])
    assert store.not_ready == ["c1"]
    sink.replace_kind("EndpointSlice", [])
    assert store.not_ready == []


def test_changed_policy_that_becomes_invalid_keeps_last_valid_version():
    store = Store()
    sink = listed(store, "c1", world() + [allow_from_b()])
    assert allowed(store, "c1/x/b", "c1/x/a") and not allowed(store, "c1/x/c", "c1/x/a")

    sink.upsert("NetworkPolicy", broken(allow_from_b()), "edit")

    assert allowed(store, "c1/x/b", "c1/x/a") and not allowed(store, "c1/x/c", "c1/x/a")
    [err] = store.errors()
    assert (err.kind, err.key, err.in_force) == ("NetworkPolicy", "x/allow-b", "last-valid")
    assert "ingress[0].from[0]" in err.field
    # Fixing it clears the error and the fixed version is in force.
    sink.upsert("NetworkPolicy", allow_from_b(), "fix")
    assert store.errors() == []


def test_new_invalid_policy_fails_closed_for_the_pods_it_selects():
    store = Store()
    sink = listed(store, "c1", world())
    assert allowed(store, "c1/x/b", "c1/x/a")

    sink.upsert("NetworkPolicy", broken(allow_from_b()), "new")

    assert not allowed(store, "c1/x/b", "c1/x/a")  # a is isolated, nothing admitted
    assert allowed(store, "c1/x/a", "c1/x/b")  # b is not selected by it
    [err] = store.errors()
    assert err.in_force == "fail-closed"
    policy = store.sinks["c1"].policies[("x", "allow-b")]
    assert policy.rejected and not policy.ingress


def test_invalid_pod_keeps_last_valid_version_and_new_invalid_pod_takes_no_part():
    store = Store()
    sink = listed(store, "c1", world())
    bad = make_pod("x", "a", "not-an-ip", {"app": "a"})
    sink.upsert("Pod", bad, "edit")
    assert sink.pods[("x", "a")].ip == ipaddress.ip_address("198.18.0.1")
    sink.upsert("Pod", make_pod("x", "d", "also-bad"), "new")
    assert ("x", "d") not in sink.pods
    assert {(e.key, e.in_force) for e in store.errors()} == {("x/a", "last-valid"), ("x/d", "none")}


def test_relist_deletes_what_is_gone_and_reports_duplicates():
    store = Store()
    sink = listed(store, "c1", world() + [deny_all()])
    sink.replace_kind("NetworkPolicy", [("f1", allow_from_b()), ("f2", allow_from_b())])
    assert list(sink.policies) == [("x", "allow-b")]
    assert sink.policies[("x", "allow-b")].rejected  # two claimants at once: fail closed
    assert sorted(e.source for e in store.errors()) == ["f1", "f2"]
    assert all(e.reason == "duplicate" and e.in_force == "fail-closed" for e in store.errors())
    sink.replace_kind("NetworkPolicy", [("f1", allow_from_b())])
    assert store.errors() == [] and not sink.policies[("x", "allow-b")].rejected


def test_identical_object_is_not_parsed_again_and_changes_nothing():
    changes = []
    store = Store(on_change=lambda: changes.append(1))
    objs = world()
    sink = listed(store, "c1", objs)
    before = len(changes)
    sink.replace_kind("Pod", [(f"test:{o['metadata']['name']}", o) for o in objs if o["kind"] == "Pod"])
    assert len(changes) == before
    sink.upsert("Pod", make_pod("x", "a", "198.18.0.9", {"app": "a"}), "test:a")
    assert len(changes) == before + 1


def test_watch_events_upsert_and_delete():
    store = Store()
    sink = listed(store, "c1", world())
    sink.upsert("NetworkPolicy", deny_all(), "w")
    assert not allowed(store, "c1/x/b", "c1/x/a")
    sink.delete("NetworkPolicy", deny_all())
    assert allowed(store, "c1/x/b", "c1/x/a")


def test_ip_claimed_by_two_clusters_is_a_conflict():
    store = Store()
    listed(store, "c1", world())
    listed(store, "c2", [make_namespace("x"), make_pod("x", "z", "198.18.0.1"), make_pod("x", "y", "198.18.1.1")])
    snap = store.snapshot(1)
    assert snap.conflicts == {"198.18.0.1": ["c1/x/a", "c2/x/z"]}


def test_remote_outage_is_fail_static_until_stale_after():
    clock = FakeClock()
    store = Store(Options(), stale_after=60.0, clock=clock)
    listed(store, "c1", world()).status.local = True
    remote = listed(store, "c2", [make_namespace("x"), make_pod("x", "r", "198.18.1.1", {"app": "b"})])
    remote.up()
    remote.down("connection refused")
    clock.now += 59
    assert store.check_stale() == 1.0
    assert store.snapshot(1).cset.pod("c2/x/r") is not None  # fail-static
    clock.now += 1
    assert store.check_stale() is None
    assert remote.status.stale
    assert store.snapshot(2).cset.pod("c2/x/r") is None  # revoked
    assert "c2" in store.snapshot(2).cset.clusters  # still a cluster: selectors may name it
    remote.up()
    assert not remote.status.stale and store.snapshot(3).cset.pod("c2/x/r") is not None


def test_local_cluster_is_never_revoked_and_no_stale_after_means_forever():
    clock = FakeClock()
    store = Store(stale_after=10.0, clock=clock)
    local = store.add_cluster("c1", local=True)
    local.down("apiserver down")
    clock.now += 3600
    store.check_stale()
    assert not local.status.stale

    forever = Store(stale_after=None, clock=clock)
    remote = forever.add_cluster("c2")
    remote.down("gone")
    clock.now += 10**6
    assert forever.check_stale() is None and not remote.status.stale


def test_unnamed_object_is_reported_not_crashing():
    store = Store()
    sink = store.add_cluster("c1")
    sink.upsert("Pod", {"kind": "Pod", "metadata": {}}, "somewhere.yaml")
    [err] = store.errors()
    assert err.source == "somewhere.yaml" and err.field == "metadata.name"


def test_changes_name_what_changed_between_two_takes():
    store = Store()
    sink = listed(store, "c1", world() + [deny_all()])
    assert store.take_changes().everything  # the first lists
    assert not store.take_changes()
    sink.upsert("Pod", make_pod("x", "a", "198.18.0.1", {"app": "zz"}), "w")
    sink.upsert("NetworkPolicy", allow_from_b(), "w")
    sink.delete("NetworkPolicy", deny_all())
    sink.upsert("Namespace", make_namespace("x", team="blue"), "w")
    sink.upsert("Pod", make_pod("x", "b", "198.18.0.2", {"app": "b"}), "test:b")  # as in force: no change
    changes = store.take_changes()
    assert not changes.everything
    assert changes.pods == {"c1/x/a"} and changes.namespaces == {("c1", "x")}
    assert changes.policies == {"c1/x/allow-b", "c1/x/deny"}
    assert not store.take_changes()


def test_a_revoked_cluster_is_a_change_of_everything():
    clock = FakeClock()
    store = Store(Options(), stale_after=1.0, clock=clock)
    listed(store, "c1", world()).status.local = True
    remote = listed(store, "c2", [make_namespace("x")])
    store.take_changes()
    remote.down("gone")
    clock.now += 2
    store.check_stale()
    assert store.take_changes().everything


def test_conflicts_follow_pod_changes():
    store = Store()
    listed(store, "c1", world())
    remote = listed(store, "c2", [make_namespace("x"), make_pod("x", "z", "198.18.0.1")])
    assert store.snapshot(1).conflicts == {"198.18.0.1": ["c1/x/a", "c2/x/z"]}
    remote.upsert("Pod", make_pod("x", "z", "198.18.0.2"), "w")
    assert store.snapshot(2).conflicts == {"198.18.0.2": ["c1/x/b", "c2/x/z"]}
    remote.delete("Pod", make_pod("x", "z", "198.18.0.2"))
    assert store.snapshot(3).conflicts == {}


def test_a_reload_with_few_differences_ends_as_a_full_reload_would():
    """Reloads hand back unchanged objects as the very same dicts; only the others are
    looked at — with the same outcome as reloading everything."""
    base = [(f"f:{o['metadata']['name']}", o) for o in world() + [deny_all(), allow_from_b()]]
    steps = [
        base,
        base[:1] + [("f:a", make_pod("x", "a", "198.18.0.1", {"app": "zz"}))] + base[2:],  # a changed
        base[:1] + base[2:-1],  # a and allow-b gone
        base[:1] + base[2:-1] + [("f:new", make_policy("x", "new", {}, ingress=[]))],  # added
        base[:1] + base[2:-1] + [("f:new", make_policy("x", "new", {}, ingress=[])), ("f:dup", base[2][1])],  # a duplicate
        base[:1] + base[2:-1] + [("f:new", broken(make_policy("x", "new", {}, ingress=[])))],  # new one broken
    ]
    store, fresh = Store(), Store()
    sink, full = store.add_cluster("c1"), fresh.add_cluster("c1")
    full._reload_by_difference = lambda *args: False  # always the full path
    for docs in steps:
        sink.replace_all(docs)
        full.replace_all(list(docs))
        a, b = store.snapshot(1).cset.clusters["c1"], fresh.snapshot(1).cset.clusters["c1"]
        assert (a.pods, a.policies, a.namespaces) == (b.pods, b.policies, b.namespaces)
        assert sorted(e.to_json()["object"] for e in store.errors()) == sorted(e.to_json()["object"] for e in fresh.errors())


def test_labels_seen_valid_before_do_not_let_an_invalid_one_through():
    """The parser remembers valid label keys and values (the first lists repeat them
    thousands of times); an invalid label is rejected the same way before and after."""
    from control.semantics import objects
    from control.semantics.model import InvalidObject

    good = make_pod("x", "a", "198.18.0.1", {"app": "a", "tier": "web"})
    assert objects.pod(good, "c1", "t").labels == {"app": "a", "tier": "web"}
    assert objects.pod(good, "c1", "t").labels == {"app": "a", "tier": "web"}  # from what was remembered
    for labels, field in (({"app": "a b"}, "metadata.labels.app"), ({"app": "a", "-bad": "a"}, "metadata.labels.-bad")):
        try:
            objects.pod(make_pod("x", "b", "198.18.0.2", labels), "c1", "t")
        except InvalidObject as err:
            assert err.field == field and "Pod x/b" in str(err)
        else:
            raise AssertionError(f"{labels} accepted")
    numeric = make_pod("x", "c", "198.18.0.3", {"app": 5})
    assert objects.pod(numeric, "c1", "t").labels == {"app": "5"}
    # podIP repeated in podIPs is one address; a bad one is named as before.
    assert objects.pod(good, "c1", "t").ips == (ipaddress.ip_address("198.18.0.1"),)
    bad_ip = make_pod("x", "d", "198.18.0.999", {})
    try:
        objects.pod(bad_ip, "c1", "t")
    except InvalidObject as err:
        assert err.field == "status.podIP" and "198.18.0.999" in err.message
    else:
        raise AssertionError("bad IP accepted")


def reload(sink, files: dict[str, list[dict]]) -> None:
    """A directory reload as the directory source hands it over: documents by file name."""
    sink.replace_all([(f"{path}#{i}", obj) for path in sorted(files) for i, obj in enumerate(files[path])])


def allow_all(name: str = "allow-b", ns: str = "x") -> dict:
    return make_policy(ns, name, {"matchLabels": {"app": "a"}}, ingress=[{}])


@pytest.mark.parametrize("newcomer", ["00-shadow.yaml", "zz-shadow.yaml"])
def test_a_duplicate_never_displaces_the_object_in_force_whatever_its_file_name(newcomer, caplog):
    store = Store()
    sink = store.add_cluster("c1")
    files = {"base.yaml": world(), "policy.yaml": [allow_from_b()]}
    reload(sink, files)
    assert not allowed(store, "c1/x/c", "c1/x/a")
    files[newcomer] = [allow_all()]  # same namespace and name, admits everyone
    with caplog.at_level(logging.WARNING, logger="control.node.store"):
        reload(sink, files)
        reload(sink, dict(files))  # still there: not logged again
    assert not allowed(store, "c1/x/c", "c1/x/a") and allowed(store, "c1/x/b", "c1/x/a")
    [dup] = duplicates(store)
    assert dup.source == f"{newcomer}#0" and dup.in_force == "existing" and "policy.yaml#0" in dup.message
    assert [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()] == [
        f"Cluster c1: NetworkPolicy x/allow-b from {newcomer}#0: {dup.message}"]
    # The one in force is edited: its new version applies, the newcomer is still ignored.
    files["policy.yaml"] = [deny_all("allow-b")]
    reload(sink, files)
    assert not allowed(store, "c1/x/b", "c1/x/a") and len(duplicates(store)) == 1
    # The one in force goes: the other is no longer a duplicate and takes over.
    del files["policy.yaml"]
    reload(sink, files)
    assert allowed(store, "c1/x/c", "c1/x/a") and duplicates(store) == []


def test_duplicates_at_a_cold_start_fail_closed_until_one_is_left():
    store = Store()
    sink = store.add_cluster("c1")
    files = {"base.yaml": world(), "a.yaml": [allow_from_b()], "b.yaml": [allow_all()]}
    reload(sink, files)
    # Neither copy is in force: the pods either one selects admit nothing.
    assert not allowed(store, "c1/x/b", "c1/x/a") and not allowed(store, "c1/x/c", "c1/x/a")
    assert allowed(store, "c1/x/a", "c1/x/b")  # pods neither selects are untouched
    assert {e.in_force for e in duplicates(store)} == {"fail-closed"} and len(duplicates(store)) == 2
    # Different pod selectors: the whole namespace is isolated.
    files["b.yaml"] = [make_policy("x", "allow-b", {"matchLabels": {"app": "b"}}, ingress=[{}])]
    reload(sink, files)
    assert not allowed(store, "c1/x/a", "c1/x/b") and not allowed(store, "c1/x/a", "c1/x/c")
    del files["b.yaml"]
    reload(sink, files)
    assert allowed(store, "c1/x/b", "c1/x/a") and not allowed(store, "c1/x/c", "c1/x/a")
    assert duplicates(store) == []


def test_a_duplicate_pod_never_displaces_the_pod_in_force():
    store = Store()
    sink = store.add_cluster("c1")
    files = {"base.yaml": world() + [deny_all()]}
    reload(sink, files)
    files["00-copy.yaml"] = [make_pod("x", "a", "198.18.0.99", {"app": "a"})]
    reload(sink, files)
    assert str(sink.pods[("x", "a")].ip) == "198.18.0.1"
    [dup] = duplicates(store)
    assert dup.kind == "Pod" and dup.source == "00-copy.yaml#0"


def test_unreachable_at_start_does_not_claim_a_last_known_state(caplog):
    store = Store()
    sink = store.add_cluster("c2")
    with caplog.at_level(logging.WARNING, logger="control.node.store"):
        sink.down("connection refused")
    assert "last-known" not in caplog.text and "nothing known of it yet" in caplog.text
    caplog.clear()
    listed(store, "c2", world())
    with caplog.at_level(logging.WARNING, logger="control.node.store"):
        sink.down("connection refused again")
    assert "keeping its last-known state" in caplog.text


def test_credentials_in_errors_are_redacted(caplog):
    store = Store()
    sink = store.add_cluster("c2")
    with caplog.at_level(logging.INFO, logger="control.node.store"):
        sink.down("ValueError: invalid server URL https://admin:hunter2@198.18.0.1:6443 (token=abc123, Authorization: Bearer eyJx.y)")
        sink.failed("RuntimeError: password: 'sw0rdfish' rejected")
    for secret in ("hunter2", "abc123", "eyJx.y", "sw0rdfish"):
        assert secret not in caplog.text and secret not in str(sink.status.last_error)
    assert "https://***@198.18.0.1:6443" in caplog.text


def test_a_failed_source_makes_its_cluster_not_ready_until_it_runs_again():
    store = Store()
    sink = listed(store, "c1", world())
    assert store.not_ready == []
    sink.failed("MemoryError: ")
    assert store.not_ready == ["c1"] and sink.status.source_failure and sink.status.source_restarts == 1
    assert len(sink.pods) == 3  # the last-known state stays
    sink.up()
    assert store.not_ready == [] and sink.status.source_failure is None


# --------------------------------------------------------------------------- Services (rule S11)


def api_service(port: int = 80) -> dict:
    return make_service("x", "api", "198.19.254.10", [("http", port, "TCP")])


def api_slice(*addresses: str, name: str = "api-1") -> dict:
    return make_slice("x", name, "api", [("http", 8080, "TCP")], list(addresses))


def service_entries(store: Store, cluster: str = "c1") -> list[tuple]:
    entries = services_for(store.snapshot(1).cset, cluster)
    return [(e["ip"], e["port"], [tuple(ep) for ep in e["endpoints"]], e["defer"]) for e in entries]


def test_services_and_slices_are_added_changed_and_deleted_as_changes_of_their_cluster():
    store = Store()
    sink = listed(store, "c1", world() + [api_service(), api_slice("198.18.0.1")])
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)]
    store.take_changes()
    sink.upsert("Service", api_service(81), "w")
    sink.upsert("EndpointSlice", api_slice("198.18.0.1", "198.18.9.9"), "w")
    changes = store.take_changes()
    assert changes.services == {"c1"} and not changes.policies and not changes.pods and changes
    assert service_entries(store) == [("198.19.254.10", 81, [("198.18.0.1", 8080), ("198.18.9.9", 8080)], False)]
    sink.upsert("EndpointSlice", api_slice("198.18.0.1", "198.18.9.9"), "w")  # as in force: no change
    assert not store.take_changes()
    sink.delete("EndpointSlice", api_slice())
    assert service_entries(store) == [("198.19.254.10", 81, [], False)]
    sink.delete("Service", api_service())
    assert service_entries(store) == [] and store.take_changes().services == {"c1"}


def test_a_relist_of_services_deletes_what_is_gone():
    store = Store()
    sink = listed(store, "c1", world() + [api_service(), api_slice("198.18.0.1"),
                                          make_service("x", "web", "198.19.254.11", [("http", 80, "TCP")])])
    sink.replace_kind("Service", [("l", make_service("x", "web", "198.19.254.11", [("http", 80, "TCP")]))])
    sink.replace_kind("EndpointSlice", [])
    assert list(sink.services) == [("x", "web")] and sink.endpoint_slices == {}
    assert service_entries(store) == [("198.19.254.11", 80, [], False)]


def test_a_changed_service_that_becomes_invalid_keeps_its_last_valid_version():
    store = Store()
    sink = listed(store, "c1", world() + [api_service(), api_slice("198.18.0.1")])
    bad = api_service()
    bad["spec"]["ports"][0]["protocol"] = "tcp"
    sink.upsert("Service", bad, "edit")
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)]
    [err] = store.errors()
    assert (err.kind, err.field, err.in_force) == ("Service", "spec.ports[0].protocol", "last-valid")
    bad_slice = api_slice("198.18.0.1", "198.18.0.300")
    sink.upsert("EndpointSlice", bad_slice, "edit")
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)]
    sink.upsert("Service", api_service(), "edit")
    assert [(e.kind, e.field) for e in store.errors()] == [("EndpointSlice", "endpoints[1].addresses[0]")]


def test_a_new_invalid_service_or_slice_denies_instead_of_widening():
    store = Store()
    sink = listed(store, "c1", world())
    bad = api_service()
    bad["spec"]["ports"].append({"name": "dns", "port": "domain", "protocol": "UDP"})
    sink.upsert("Service", bad, "new")
    assert sink.services[("x", "api")].rejected and service_entries(store) == [("198.19.254.10", 80, [], False)]
    assert [e.in_force for e in store.errors()] == ["fail-closed"]
    sink.upsert("Service", api_service(), "new")
    sink.upsert("EndpointSlice", api_slice("198.18.0.1"), "s1")
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)]
    sink.upsert("EndpointSlice", api_slice("198.18.0.256", name="api-2"), "s2")  # new and invalid
    assert service_entries(store) == [("198.19.254.10", 80, [], False)]
    sink.delete("EndpointSlice", api_slice(name="api-2"))
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)] and store.errors() == []


def test_duplicate_services_keep_the_one_in_force_or_fail_closed_at_a_cold_start():
    store = Store()
    sink = store.add_cluster("c1")
    files = {"base.yaml": world(), "svc.yaml": [api_service(), api_slice("198.18.0.1")]}
    reload(sink, files)
    files["00-shadow.yaml"] = [make_service("x", "api", "198.19.254.30", [("http", 80, "TCP")]), api_slice("198.18.9.9")]
    reload(sink, files)
    assert service_entries(store) == [("198.19.254.10", 80, [("198.18.0.1", 8080)], True)]
    assert sorted((d.kind, d.in_force) for d in duplicates(store)) == [("EndpointSlice", "existing"), ("Service", "existing")]

    cold = Store()
    sink = cold.add_cluster("c1")
    other = make_service("x", "api", "198.19.254.20", [("web", 8000, "TCP")])
    reload(sink, {"base.yaml": world(), "a.yaml": [api_service(), api_slice("198.18.0.1")],
                  "b.yaml": [other, make_slice("x", "api-1", "web", [("http", 8080, "TCP")], ["198.18.0.2"])]})
    # Neither copy is in force: every address either names, with every port, reaching nothing.
    assert service_entries(cold) == [(ip, port, [], False) for ip in ("198.19.254.10", "198.19.254.20") for port in (80, 8000)]
    assert {d.in_force for d in duplicates(cold)} == {"fail-closed"} and len(duplicates(cold)) == 4
    assert cold.snapshot(1).cset.clusters["c1"].endpoint_slices[("x", "api-1")].service is None  # two names: the namespace


def test_the_snapshot_holds_services_apart_per_cluster():
    store = Store()
    listed(store, "c1", world() + [api_service(), api_slice("198.18.0.1")])
    listed(store, "c2", [make_namespace("x"), make_service("x", "db", "198.19.254.20", [("sql", 5432, "TCP")])])
    cset = store.snapshot(1).cset
    assert list(cset.clusters["c1"].services) == [("x", "api")] and list(cset.clusters["c2"].services) == [("x", "db")]
    assert [e["service"] for e in services_for(cset, "c2")] == ["c2/x/db"]
    assert [e["service"] for e in services_for(cset, "c1")] == ["c1/x/api"]
