"""Rule S11 in the control plane: Services and EndpointSlices parsed and validated (rule
S9: errors name file, object and field), read from manifest directories, and turned by
``services_for`` into the dataplane's Service addresses — the local cluster's only,
with ready endpoints on the slice port matching each Service port, and ``defer`` only
when every endpoint is a local pod that takes part."""

from __future__ import annotations

import copy
import ipaddress
import os

import pytest
import yaml

from control.cli import main
from control.node.services import services_for
from control.semantics import objects
from control.semantics.manifests import Document, build_cluster, load_clusterset
from control.semantics.model import ClusterSet, InvalidObject
from control.semantics.reference import ReferenceEvaluator

from .builders import make_namespace, make_pod, make_policy
from .service_builders import make_service, make_slice

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "control", "lab", "examples", "demo")


def cluster_set(clusters: dict[str, list[dict]], strict: bool = True) -> ClusterSet:
    """``{cluster: [objects]}`` through the manifest reader (strict: the first invalid
    object raises; lenient: stand-ins, as the daemon's directory reading does)."""
    cset = ClusterSet()
    for name, objs in clusters.items():
        docs = [Document(f"{name}.yaml#{i}", obj) for i, obj in enumerate(objs)]
        cset.clusters[name] = build_cluster(name, docs, strict=strict).state
    return cset


def pods(*specs) -> list[dict]:
    """``(name, ip)`` pairs → namespace x and its running pods."""
    return [make_namespace("x")] + [make_pod("x", name, ip, {"app": name}) for name, ip in specs]


def parse_service(obj: dict):
    return objects.service(obj, "c1", "svc.yaml")


def parse_slice(obj: dict):
    return objects.endpoint_slice(obj, "c1", "svc.yaml")


def entry(entries: list[dict], ip: str, port: int, protocol: int = 6) -> dict:
    found = [e for e in entries if e["ip"] == ip and e["port"] == port and e["protocol"] == protocol]
    assert len(found) == 1, entries
    return found[0]


# --------------------------------------------------------------------------- parsing


def test_a_dual_stack_service_and_its_slice_parse_with_defaults():
    svc = parse_service(make_service("x", "api", ["198.19.254.10", "fd00::a"], [("http", 80, "TCP"), ("dns", 53, "UDP")]))
    assert svc.ref == "c1/x/api" and svc.type == "ClusterIP" and svc.rejected is None
    assert svc.cluster_ips == (ipaddress.ip_address("198.19.254.10"), ipaddress.ip_address("fd00::a"))
    assert [(p.name, p.port, p.protocol) for p in svc.ports] == [("http", 80, "TCP"), ("dns", 53, "UDP")]
    bare = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "one"},
            "spec": {"clusterIP": "198.19.254.11", "ports": [{"port": 443}]}}
    one = parse_service(bare)
    assert one.namespace == "default" and [(p.name, p.protocol) for p in one.ports] == [(None, "TCP")]

    sl = parse_slice(make_slice("x", "api-1", "api", [("http", 8080, "TCP"), (None, 53, "UDP")],
                                ["198.18.1.5", ("198.18.1.6", False), ("198.18.1.7", None)]))
    assert sl.service == "api" and sl.address_type == "IPv4"
    assert [(p.name, p.port, p.protocol) for p in sl.ports] == [("http", 8080, "TCP"), (None, 53, "UDP")]
    assert [e.ready for e in sl.endpoints] == [True, False, True]  # no condition counts as ready


def test_headless_and_external_name_services_have_no_address():
    headless = make_service("x", "h", "None", [])
    assert parse_service(headless).cluster_ips == ()
    external = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e", "namespace": "x"},
                "spec": {"type": "ExternalName", "externalName": "db.example"}}
    assert parse_service(external).cluster_ips == () and parse_service(external).type == "ExternalName"


def _tweak(obj: dict, path: str, value) -> dict:
    """A copy of ``obj`` with the dotted ``path`` set to ``value`` (deleted when value
    is ``...``); integers index lists."""
    obj = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = obj
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return obj


SERVICE = make_service("x", "api", "198.19.254.10", [("http", 80, "TCP")])
TWO_PORTS = make_service("x", "api", "198.19.254.10", [("http", 80, "TCP"), ("dns", 53, "UDP")])


@pytest.mark.parametrize("obj, field, words", [
    (_tweak(SERVICE, "spec", ...), "spec", "is required"),
    (_tweak(SERVICE, "spec.ports", []), "spec.ports", "is required"),
    (_tweak(SERVICE, "spec.clusterIP", "198.19.254.300"), "spec.clusterIPs[0]", "must equal"),
    (_tweak(_tweak(SERVICE, "spec.clusterIP", "198.19.254.300"), "spec.clusterIPs", ...), "spec.clusterIP", "invalid IP address"),
    (_tweak(SERVICE, "spec.clusterIPs", ["198.19.254.10", "198.19.254.11"]), "spec.clusterIPs[1]", "other family"),
    (_tweak(SERVICE, "spec.clusterIPs", ["198.19.254.10", "None"]), "spec.clusterIPs", "None (headless)"),
    (_tweak(SERVICE, "spec.type", "Magic"), "spec.type", "invalid type"),
    (_tweak(SERVICE, "spec.type", "ExternalName"), "spec.clusterIPs", "must be empty"),
    (_tweak(SERVICE, "spec.ports.0.port", 0), "spec.ports[0].port", "out of range"),
    (_tweak(SERVICE, "spec.ports.0.port", 70000), "spec.ports[0].port", "out of range"),
    (_tweak(SERVICE, "spec.ports.0.port", "http"), "spec.ports[0].port", "invalid port"),
    (_tweak(SERVICE, "spec.ports.0.port", True), "spec.ports[0].port", "invalid port"),
    (_tweak(SERVICE, "spec.ports.0.port", ...), "spec.ports[0].port", "is required"),
    (_tweak(SERVICE, "spec.ports.0.protocol", "tcp"), "spec.ports[0].protocol", "unsupported protocol 'tcp'"),
    (_tweak(SERVICE, "spec.ports.0.protocol", "ICMP"), "spec.ports[0].protocol", "unsupported protocol"),
    (_tweak(SERVICE, "spec.ports.0.name", "Not_A_Label"), "spec.ports[0].name", "invalid port name"),
    (_tweak(SERVICE, "spec.ports.0.targetPort", "no such name!"), "spec.ports[0].targetPort", "invalid named port"),
    (_tweak(TWO_PORTS, "spec.ports.1.name", ...), "spec.ports[1].name", "is required when"),
    (_tweak(TWO_PORTS, "spec.ports.1.name", "http"), "spec.ports[1].name", "duplicate port name"),
    (_tweak(_tweak(TWO_PORTS, "spec.ports.1.port", 80), "spec.ports.1.protocol", "TCP"), "spec.ports[1].port", "duplicate port TCP/80"),
    (_tweak(SERVICE, "metadata.name", "9lives"), "metadata.name", "RFC 1035"),
    (_tweak(SERVICE, "metadata.name", ...), "metadata.name", "is required"),
])
def test_invalid_services_name_the_field(obj, field, words):
    with pytest.raises(InvalidObject) as e:
        parse_service(obj)
    assert e.value.field == field and words in e.value.message
    assert str(e.value).startswith("svc.yaml: Service x/") or field == "metadata.name"


SLICE = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"])


@pytest.mark.parametrize("obj, field, words", [
    (_tweak(SLICE, "addressType", ...), "addressType", "is required"),
    (_tweak(SLICE, "addressType", "ipv4"), "addressType", "invalid addressType"),
    (_tweak(SLICE, "endpoints.0.addresses", []), "endpoints[0].addresses", "at least one"),
    (_tweak(SLICE, "endpoints.0.addresses", ["198.18.1.5"] * 101), "endpoints[0].addresses", "at most 100"),
    (_tweak(SLICE, "endpoints.0.addresses.0", "198.18.1.500"), "endpoints[0].addresses[0]", "invalid IP address"),
    (_tweak(SLICE, "endpoints.0.addresses.0", "fd00::5"), "endpoints[0].addresses[0]", "not an IPv4 address"),
    (_tweak(SLICE, "endpoints.0.conditions", {"ready": "yes"}), "endpoints[0].conditions.ready", "true or false"),
    (_tweak(SLICE, "ports.0.protocol", "udp"), "ports[0].protocol", "unsupported protocol 'udp'"),
    (_tweak(SLICE, "ports.0.port", 0), "ports[0].port", "out of range"),
    (_tweak(SLICE, "ports.0.name", "HTTP"), "ports[0].name", "invalid port name"),
    (_tweak(SLICE, "ports", [{"name": "a", "port": 1}, {"name": "a", "port": 2}]), "ports[1].name", "duplicate"),
    (_tweak(SLICE, "metadata.labels", {"kubernetes.io/service-name": "not a value"}),
     "metadata.labels.kubernetes.io/service-name", "invalid label value"),
])
def test_invalid_endpoint_slices_name_the_field(obj, field, words):
    with pytest.raises(InvalidObject) as e:
        parse_slice(obj)
    assert e.value.field == field and words in e.value.message
    assert str(e.value).startswith("svc.yaml: EndpointSlice x/api-1: ")


def test_the_offline_tools_stop_on_an_invalid_service(tmp_path, capsys):
    d = tmp_path / "c1"
    os.makedirs(d)
    (d / "base.yaml").write_text(yaml.safe_dump_all(pods(("a", "198.18.1.1"))))
    (d / "svc.yaml").write_text(yaml.safe_dump(_tweak(SERVICE, "spec.ports.0.protocol", "tcp")))
    code = main(["matrix", "--cluster", f"c1={d}", "--port", "80", "--protocol", "TCP", "--summary"])
    err = capsys.readouterr().err
    assert code == 2 and "svc.yaml: Service x/api: spec.ports[0].protocol: unsupported protocol 'tcp'" in err
    (d / "svc.yaml").write_text(yaml.safe_dump_all([SERVICE, SLICE]))
    assert main(["matrix", "--cluster", f"c1={d}", "--port", "80", "--protocol", "TCP", "--summary"]) == 0
    assert "ignored" not in capsys.readouterr().err  # both kinds are read, not noted as unknown


def test_lenient_reading_replaces_invalid_services_and_slices_with_stand_ins():
    bad_port = _tweak(TWO_PORTS, "spec.ports.1.port", "dns")  # the first port still reads
    cset = cluster_set({"c1": pods(("a", "198.18.1.5")) + [bad_port, SLICE]}, strict=False)
    svc = cset.clusters["c1"].services[("x", "api")]
    assert svc.rejected and "spec.ports[1].port" in svc.rejected
    assert [(p.port, p.protocol) for p in svc.ports] == [(80, "TCP")]
    assert services_for(cset, "c1") == [{"ip": "198.19.254.10", "protocol": 6, "port": 80, "service": "c1/x/api",
                                         "endpoints": [], "defer": False}]
    unreadable = _tweak(SERVICE, "spec.clusterIP", "nowhere")
    unreadable["spec"].pop("clusterIPs")
    cset = cluster_set({"c1": [unreadable]}, strict=False)
    assert cset.clusters["c1"].services == {} and services_for(cset, "c1") == []


# --------------------------------------------------------------------------- services_for


def test_pod_endpoints_are_deferred_to_the_backend():
    cset = cluster_set({"c1": pods(("a", "198.18.1.5"), ("b", "198.18.1.6")) + [
        SERVICE, make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.6", "198.18.1.5"])]})
    assert services_for(cset, "c1") == [{
        "ip": "198.19.254.10", "protocol": 6, "port": 80, "service": "c1/x/api",
        "endpoints": [["198.18.1.5", 8080], ["198.18.1.6", 8080]], "defer": True}]


def test_non_pod_and_mixed_endpoints_are_judged_at_the_source():
    only_nodes = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.9.1"])
    cset = cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE, only_nodes]})
    [e] = services_for(cset, "c1")
    assert e["endpoints"] == [["198.18.9.1", 8080]] and e["defer"] is False
    mixed = make_slice("x", "api-2", "api", [("http", 8080, "TCP")], ["198.18.1.5"])
    cset = cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE, only_nodes, mixed]})
    [e] = services_for(cset, "c1")
    assert e["endpoints"] == [["198.18.1.5", 8080], ["198.18.9.1", 8080]] and e["defer"] is False


def test_pods_that_cannot_take_part_are_not_deferred_to():
    def host_network(obj):
        obj["spec"]["hostNetwork"] = True

    def finished(obj):
        obj["status"]["phase"] = "Succeeded"

    for tweak in (host_network, finished):
        world = [make_namespace("x"), make_pod("x", "a", "198.18.1.5", {}, None, tweak), SERVICE,
                 make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"])]
        [e] = services_for(cluster_set({"c1": world}), "c1")
        assert e["endpoints"] == [["198.18.1.5", 8080]] and e["defer"] is False, tweak.__name__


def test_no_and_unready_endpoints_leave_an_entry_that_denies():
    cset = cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE]})
    assert services_for(cset, "c1") == [{"ip": "198.19.254.10", "protocol": 6, "port": 80, "service": "c1/x/api",
                                         "endpoints": [], "defer": False}]
    unready = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], [("198.18.1.5", False)])
    [e] = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE, unready]}), "c1")
    assert e["endpoints"] == [] and e["defer"] is False
    some = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], [("198.18.1.5", False), ("198.18.9.9", True)])
    [e] = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE, some]}), "c1")
    assert e["endpoints"] == [["198.18.9.9", 8080]] and e["defer"] is False


def test_named_ports_take_the_slice_port_of_their_name_and_protocol():
    svc = make_service("x", "api", "198.19.254.10", [("http", 80, "TCP"), ("dns", 53, "UDP"), ("sctp", 9, "SCTP")])
    sl = make_slice("x", "api-1", "api", [("dns", 5353, "UDP"), ("http", 8080, "TCP"), ("sctp", 99, "TCP")],
                    ["198.18.1.5"])
    entries = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [svc, sl]}), "c1")
    assert [(e["protocol"], e["port"]) for e in entries] == [(6, 80), (17, 53), (132, 9)]
    assert entry(entries, "198.19.254.10", 80)["endpoints"] == [["198.18.1.5", 8080]]
    assert entry(entries, "198.19.254.10", 53, 17)["endpoints"] == [["198.18.1.5", 5353]]
    assert entry(entries, "198.19.254.10", 9, 132)["endpoints"] == []  # the slice's "sctp" port is TCP
    unnamed = make_service("x", "one", "198.19.254.11", [(None, 80, "TCP")])
    slices = [make_slice("x", "one-1", "one", [(None, 8080, "TCP")], ["198.18.1.5"]),
              make_slice("x", "one-2", "one", [("http", 9090, "TCP")], ["198.18.1.6"])]
    [e] = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [unnamed] + slices}), "c1")
    assert e["endpoints"] == [["198.18.1.5", 8080]] and e["defer"] is True


def test_only_the_slices_labelled_for_the_service_count():
    others = [make_slice("x", "web-1", "web", [("http", 8080, "TCP")], ["198.18.9.1"]),
              make_slice("x", "loose", None, [("http", 8080, "TCP")], ["198.18.9.2"])]
    [e] = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE] + others}), "c1")
    assert e["endpoints"] == []


def test_only_the_local_clusters_services_appear_and_remote_pods_are_not_deferred_to():
    c1 = pods(("a", "198.18.1.5")) + [SERVICE, make_slice("x", "api-1", "api", [("http", 8080, "TCP")],
                                                          ["198.18.1.5", "198.18.2.5"])]
    c2 = pods(("b", "198.18.2.5")) + [make_service("x", "db", "198.19.254.20", [("sql", 5432, "TCP")]),
                                      make_slice("x", "db-1", "db", [("sql", 5432, "TCP")], ["198.18.2.5"])]
    cset = cluster_set({"c1": c1, "c2": c2})
    [e] = services_for(cset, "c1")
    assert e["service"] == "c1/x/api" and e["defer"] is False  # 198.18.2.5 is c2's pod
    [e] = services_for(cset, "c2")
    assert e["service"] == "c2/x/db" and e["defer"] is True
    assert services_for(cset, "c3") == []


def test_an_address_two_clusters_claim_is_not_deferred_to():
    c1 = pods(("a", "198.18.1.5")) + [SERVICE, make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"])]
    cset = cluster_set({"c1": c1, "c2": pods(("twin", "198.18.1.5"))})
    [e] = services_for(cset, "c1")
    assert e["endpoints"] == [["198.18.1.5", 8080]] and e["defer"] is False


def test_dual_stack_entries_take_the_endpoints_of_their_family():
    svc = make_service("x", "api", ["198.19.254.10", "fd00::a"], [("http", 80, "TCP")])
    v4 = make_slice("x", "api-4", "api", [("http", 8080, "TCP")], ["198.18.1.5"])
    v6 = make_slice("x", "api-6", "api", [("http", 8080, "TCP")], ["fd00:1::5"], "IPv6")
    world = [make_namespace("x"), make_pod("x", "a", "198.18.1.5"), svc, v4, v6]
    world[1]["status"]["podIPs"].append({"ip": "fd00:1::5"})
    entries = services_for(cluster_set({"c1": world}), "c1")
    assert [(e["ip"], e["endpoints"], e["defer"]) for e in entries] == [
        ("198.19.254.10", [["198.18.1.5", 8080]], True), ("fd00::a", [["fd00:1::5", 8080]], True)]


def test_service_types_headless_and_external_name():
    nodeport = make_service("x", "np", "198.19.254.11", [("http", 80, "TCP")], "NodePort")
    balancer = make_service("x", "lb", "198.19.254.12", [("http", 80, "TCP")], "LoadBalancer")
    headless = make_service("x", "h", "None", [("http", 80, "TCP")])
    external = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e", "namespace": "x"},
                "spec": {"type": "ExternalName", "externalName": "db.example"}}
    slices = [make_slice("x", f"{n}-1", n, [("http", 8080, "TCP")], ["198.18.1.5"]) for n in ("np", "lb", "h", "e")]
    entries = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [nodeport, balancer, headless, external] + slices}), "c1")
    assert [e["service"] for e in entries] == ["c1/x/np", "c1/x/lb"]


def test_two_services_on_one_address_are_judged_against_both():
    other = make_service("x", "other", "198.19.254.10", [("web", 80, "TCP")])
    slices = [make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"]),
              make_slice("x", "other-1", "other", [("web", 80, "TCP")], ["198.18.9.1"])]
    [e] = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [SERVICE, other] + slices}), "c1")
    assert e["service"] == "c1/x/api,c1/x/other"
    assert e["endpoints"] == [["198.18.1.5", 8080], ["198.18.9.1", 80]] and e["defer"] is False


def test_an_invalid_slice_leaves_its_service_no_endpoints():
    good = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"])
    bad = _tweak(make_slice("x", "api-2", "api", [("http", 8080, "TCP")], ["198.18.1.6"]),
                 "endpoints.0.addresses.0", "nowhere")
    world = pods(("a", "198.18.1.5")) + [SERVICE, make_service("x", "web", "198.19.254.11", [("http", 80, "TCP")]), good]
    cset = cluster_set({"c1": world + [bad]}, strict=False)
    assert [(e["service"], e["endpoints"]) for e in services_for(cset, "c1")] == [("c1/x/api", []), ("c1/x/web", [])]
    unlabelled = _tweak(bad, "metadata.labels", {"kubernetes.io/service-name": ["?"]})
    world.append(make_slice("x", "web-1", "web", [("http", 8080, "TCP")], ["198.18.1.5"]))
    cset = cluster_set({"c1": world + [unlabelled]}, strict=False)
    assert all(e["endpoints"] == [] for e in services_for(cset, "c1"))  # every Service of namespace x
    assert all(e["endpoints"] for e in services_for(cluster_set({"c1": world}), "c1"))


def test_the_demo_example_service_reaches_its_backend_on_the_backends_node():
    cset, _ = load_clusterset([("east", os.path.join(EXAMPLES, "east")), ("west", os.path.join(EXAMPLES, "west"))])
    assert services_for(cset, "east") == [{"ip": "198.19.254.10", "protocol": 6, "port": 80, "service": "east/shop/api",
                                           "endpoints": [["198.18.1.10", 80]], "defer": True}]
    assert services_for(cset, "west") == []


def _through_service(cset: ClusterSet, src: str, entry: dict, protocol: str) -> bool:
    """Rule S11 as the entry tells the dataplane to judge it: at the backend (as a
    connection to that pod, on its port) when deferred, else the source's egress
    against every endpoint; no endpoint denies."""
    ev = ReferenceEvaluator(cset)
    source = cset.pod(src)
    if not entry["endpoints"]:
        return False
    by_ip = {str(ip): p for p in cset.pods() for ip in p.ips}
    if entry["defer"]:
        return all(ev.allowed(source, by_ip[ip], port, protocol) for ip, port in entry["endpoints"])
    return all(ev.evaluate(source, ipaddress.ip_address(ip), port, protocol).egress.allowed
               for ip, port in entry["endpoints"])


def test_the_semantics_docs_example_of_a_connection_through_a_service():
    """docs/semantics.md, S11: under the S4 policy (egress only to ports named http),
    web reaches api through its Service on port 80 — judged as web → api on 8080 —
    but not when the slice also lists an address that is not a pod."""
    world = [make_namespace("shop"),
             make_pod("shop", "api", "198.18.1.10", {"app": "api"}, [("http", 8080, "TCP")]),
             make_pod("shop", "web", "198.18.1.11", {"app": "web"}),
             make_policy("shop", "named", {}, egress=[{"ports": [{"port": "http"}]}], types=["Egress"]),
             make_service("shop", "api", "198.19.254.10", [("http", 80, "TCP")])]
    sl = make_slice("shop", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.10"])
    cset = cluster_set({"east": world + [sl]})
    [e] = services_for(cset, "east")
    assert e["endpoints"] == [["198.18.1.10", 8080]] and e["defer"] is True
    assert _through_service(cset, "east/shop/web", e, "TCP")
    assert not ReferenceEvaluator(cset).allowed(cset.pod("east/shop/web"), cset.pod("east/shop/api"), 80, "TCP")
    sl = make_slice("shop", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.10", "198.18.9.9"])
    cset = cluster_set({"east": world + [sl]})
    [e] = services_for(cset, "east")
    assert e["defer"] is False and not _through_service(cset, "east/shop/web", e, "TCP")


def test_external_and_load_balancer_addresses_are_translated_like_the_cluster_ip():
    svc = make_service("x", "api", "198.19.254.10", [("http", 80, "TCP")], "LoadBalancer")
    svc["spec"]["externalIPs"] = ["198.18.200.1"]
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.200.2"}, {"ip": "198.18.200.3", "ipMode": "Proxy"},
                                                  {"hostname": "lb.example"}]}}
    sl = make_slice("x", "api-1", "api", [("http", 8080, "TCP")], ["198.18.1.5"])
    entries = services_for(cluster_set({"c1": pods(("a", "198.18.1.5")) + [svc, sl]}), "c1")
    assert [(e["ip"], e["endpoints"], e["defer"]) for e in entries] == [
        (ip, [["198.18.1.5", 8080]], True) for ip in ("198.18.200.1", "198.18.200.2", "198.19.254.10")]
    headless = make_service("x", "h", "None", [("http", 80, "TCP")])
    headless["spec"]["externalIPs"] = ["198.18.200.9"]
    assert services_for(cluster_set({"c1": [headless]}), "c1") == []
    bad = _tweak(svc, "spec.externalIPs", ["198.18.200.300"])
    with pytest.raises(InvalidObject, match=r"spec\.externalIPs\[0\]: invalid IP address"):
        parse_service(bad)
    with pytest.raises(InvalidObject, match=r"status\.loadBalancer\.ingress\[0\]\.ipMode"):
        parse_service(_tweak(svc, "status.loadBalancer.ingress.0.ipMode", "vip"))
    [stand_in] = cluster_set({"c1": [bad]}, strict=False).clusters["c1"].services.values()
    assert stand_in.rejected and [str(ip) for ip in stand_in.addresses] == ["198.19.254.10"]
