"""The REST endpoint of a daemon on manifest directories of three clusters."""

from __future__ import annotations

import asyncio
import os

import pytest
import yaml

from control.semantics.manifests import load_clusterset
from control.semantics.model import Options
from control.semantics.reference import ReferenceEvaluator, resolve_endpoint

from .builders import make_policy
from .cases import case_files, load_case, write_case
from .daemon_harness import dir_settings, eventually, running, write_yaml

CASE = next(p for p in case_files("multicluster") if "frontend-backend" in p)


@pytest.fixture
def three_clusters(tmp_path):
    case = load_case(CASE)
    specs = write_case(case, str(tmp_path))
    assert len(specs) == 3
    return case, specs


def without_audit(verdict) -> dict:
    """The reference's JSON with the audit fields explain adds when no policy is in audit mode."""
    want, none = verdict.to_json(), {"audit_policies": [], "would_deny": False, "audit_reason": None}
    return {**want, "would_deny": False, "egress": {**want["egress"], **none}, "ingress": {**want["ingress"], **none}}


def test_explain_agrees_with_the_reference_evaluator_for_every_probe(three_clusters):
    case, specs = three_clusters
    cset, _ = load_clusterset(specs, Options())
    evaluator = ReferenceEvaluator(cset)

    async def main():
        async with running(dir_settings(specs)) as (daemon, client):
            for probe in case["probes"]:
                status, body = await client.get("/v1/explain", **{"from": probe["from"], "to": probe["to"], "port": probe["port"], "protocol": probe["protocol"]})
                assert status == 200
                want = evaluator.evaluate(cset.pod(probe["from"]), cset.pod(probe["to"]), probe["port"], probe["protocol"])
                assert body == without_audit(want)
                assert body["allowed"] is probe["expect"], probe
            # by IP as well: the same answer as for the references
            p = case["probes"][-1]
            src_ip, dst_ip = str(cset.pod(p["from"]).ip), str(cset.pod(p["to"]).ip)
            status, body = await client.get("/v1/explain", **{"from": src_ip, "to": dst_ip, "port": p["port"], "protocol": p["protocol"]})
            src, dst = resolve_endpoint(cset, src_ip), resolve_endpoint(cset, dst_ip)
            assert status == 200 and body == without_audit(evaluator.evaluate(src, dst, p["port"], p["protocol"]))

    asyncio.run(main())


def test_explain_rejects_bad_parameters_with_a_json_error(three_clusters):
    _, specs = three_clusters
    bad = [
        {"to": "cluster-1/x/a", "port": 80, "protocol": "TCP"},
        {"from": "cluster-1/x/a", "to": "cluster-1/x/b", "port": "http", "protocol": "TCP"},
        {"from": "cluster-1/x/a", "to": "cluster-1/x/b", "port": 70000, "protocol": "TCP"},
        {"from": "cluster-1/x/a", "to": "cluster-1/x/b", "port": 80, "protocol": "ICMPX"},
        {"from": "cluster-9/x/a", "to": "cluster-1/x/b", "port": 80, "protocol": "TCP"},
        {"from": "not an address", "to": "cluster-1/x/b", "port": 80, "protocol": "TCP"},
    ]

    async def main():
        async with running(dir_settings(specs)) as (daemon, client):
            for params in bad:
                status, body = await client.get("/v1/explain", **params)
                assert status == 400, params
                assert isinstance(body["error"], str) and body["error"]

    asyncio.run(main())


def test_policy_file_added_is_reflected_in_explain_within_two_seconds(three_clusters):
    _, specs = three_clusters
    local_dir = specs[0][1]
    probe = {"from": "cluster-2/x/a", "to": "cluster-1/x/a", "port": 80, "protocol": "TCP"}

    async def main():
        async with running(dir_settings(specs)) as (daemon, client):
            status, before = await client.get("/v1/explain", **probe)
            assert status == 200 and before["ingress"]["isolated"] is False
            deny = make_policy("x", "deny-all-ingress", {}, ingress=[])
            write_yaml(os.path.join(local_dir, "deny.yaml"), yaml.safe_dump(deny))

            async def denied():
                _, body = await client.get("/v1/explain", **probe)
                return body["allowed"] is False and body["ingress"]["policies"] == ["cluster-1/x/deny-all-ingress"]

            await eventually(denied, timeout=2.0)
            os.unlink(os.path.join(local_dir, "deny.yaml"))

            async def allowed_again():
                _, body = await client.get("/v1/explain", **probe)
                return body["ingress"]["isolated"] is False

            await eventually(allowed_again, timeout=2.0)

    asyncio.run(main())


def test_readyz_is_503_naming_unlisted_clusters_then_200(three_clusters, tmp_path):
    _, specs = three_clusters
    late = str(tmp_path / "late")
    specs = specs + [("cluster-4", late)]

    async def main():
        async with running(dir_settings(specs), settle=False) as (daemon, client):
            async def listed_three():
                return len(daemon.store.not_ready) == 1

            await eventually(listed_three)
            status, body = await client.get("/readyz")
            assert status == 503 and body["not_listed"] == ["cluster-4"]
            status, body = await client.get("/v1/clusters")
            c4 = next(c for c in body["clusters"] if c["name"] == "cluster-4")
            assert c4["synced"] is False and c4["connected"] is False and "late" in c4["last_error"]
            os.makedirs(late)

            async def ready():
                status, _ = await client.get("/readyz")
                return status == 200

            await eventually(ready)
            assert (await client.get("/healthz"))[0] == 200

    asyncio.run(main())


def test_invalid_policy_shows_in_policies_and_metrics(three_clusters):
    _, specs = three_clusters
    local_dir = specs[0][1]
    bad = make_policy("x", "broken", {}, ingress=[{"from": [{}]}])
    write_yaml(os.path.join(local_dir, "broken.yaml"), yaml.safe_dump(bad))
    write_yaml(os.path.join(local_dir, "garbage.yaml"), "kind: [unclosed\n")

    async def main():
        async with running(dir_settings(specs)) as (daemon, client):
            status, body = await client.get("/v1/policies")
            assert status == 200
            entry = next(p for p in body["policies"] if p["name"] == "broken")
            assert entry["status"] == "rejected" and entry["in_force"] == "fail-closed"
            assert "from[0]" in entry["error"]
            kinds = {(r["kind"], r["in_force"]) for r in body["rejected"]}
            assert ("NetworkPolicy", "fail-closed") in kinds and ("File", "last-valid") in kinds
            status, text = await client.get("/metrics")
            assert status == 200
            assert 'mcnp_rejected_objects{cluster="cluster-1",in_force="fail-closed",kind="NetworkPolicy"} 1.0' in text

    asyncio.run(main())


def test_metrics_clusters_tables_stats_and_flows(three_clusters):
    _, specs = three_clusters

    async def main():
        async with running(dir_settings(specs)) as (daemon, client):
            status, text = await client.get("/metrics")
            assert status == 200
            for series in ("mcnp_cluster_synced", "mcnp_table_revision", "mcnp_compile_duration_seconds", "mcnp_rejected_objects", "mcnp_ip_conflicts"):
                assert series in text
            assert 'mcnp_cluster_synced{cluster="cluster-3"} 1.0' in text
            status, body = await client.get("/v1/clusters")
            assert [c["name"] for c in body["clusters"]] == ["cluster-1", "cluster-2", "cluster-3"]
            assert all(c["synced"] and c["counts"]["pods"] == 9 for c in body["clusters"])
            await daemon.wait_revision(daemon.tables.revision, compiled=True)
            status, body = await client.get("/v1/tables")
            assert status == 200 and body["compiled_revision"] == body["revision"] >= 1
            assert body["summary"]["identities"] == 27 and body["sizes"]["ip_keys"][1] == 16
            assert body["compile_seconds"] > 0 and body["error"] is None
            status, body = await client.get("/v1/stats")
            assert status == 200 and body["pods"] == 27 and body["dataplane"] is None
            status, body = await client.get("/v1/flows")
            assert status == 200 and body == {"dataplane": False, "flows": []}
            assert (await client.get("/v1/flows", limit="x"))[0] == 400
            status, body = await client.get("/v1/classes")
            assert status == 200 and body == {"dataplane": False, "classes": []}
            assert (await client.get("/v1/classes", limit="-1"))[0] == 400

    asyncio.run(main())


def test_api_on_a_unix_socket(three_clusters, tmp_path):
    _, specs = three_clusters
    sock = str(tmp_path / "mcnp.sock")

    async def main():
        for _ in range(2):  # the second start finds the first one's socket file and replaces it
            async with running(dir_settings(specs, api_listen=f"unix:{sock}")) as (daemon, client):
                status, body = await client.get("/readyz")
                assert status == 200 and body == {"ready": True}

    asyncio.run(main())
