"""Truth-table cases (tests/data/**.json) turned into manifest directories.

Schema: ``clusters.{name}.namespaces[{name,labels}]``,
``clusters.{name}.pods[{namespace,name,labels,ip,ports[{name,containerPort,protocol}]}]``,
``policies.{cluster}[NetworkPolicy]``, ``probes[{from,to,port,protocol,expect}]``.
Each cluster becomes one directory holding the objects as ``kubectl get -o yaml`` would
print them, so the cases run through the same reader as a user's manifests.
"""

from __future__ import annotations

import glob
import json
import os

import yaml

DATA = os.path.join(os.path.dirname(__file__), "data")


def case_files(subdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(DATA, subdir, "*.json")))


def load_case(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def pod_manifest(cluster: str, pod: dict, node: str | None = None) -> dict:
    ports = [{"name": p["name"], "containerPort": p["containerPort"], "protocol": p.get("protocol", "TCP")} for p in pod.get("ports", [])]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod["name"], "namespace": pod["namespace"], "labels": dict(pod.get("labels", {}))},
        "spec": {"nodeName": node or f"{cluster}-node", "containers": [{"name": "serve", "image": "agnhost", "ports": ports}]},
        "status": {"phase": "Running", "podIP": pod["ip"], "podIPs": [{"ip": pod["ip"]}]},
    }


def namespace_manifest(ns: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns["name"], "labels": dict(ns.get("labels", {}))}}


def write_case(case: dict, root: str) -> list[tuple[str, str]]:
    """Write one directory per cluster under ``root``; returns ``[(name, dir)]``."""
    specs = []
    for cname, cluster in case["clusters"].items():
        d = os.path.join(root, cname)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "namespaces.yaml"), "w") as f:
            yaml.safe_dump_all([namespace_manifest(n) for n in cluster["namespaces"]], f)
        with open(os.path.join(d, "pods.yaml"), "w") as f:
            yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [pod_manifest(cname, p) for p in cluster["pods"]]}, f)
        policies = case.get("policies", {}).get(cname, [])
        if policies:
            with open(os.path.join(d, "policies.yaml"), "w") as f:
                yaml.safe_dump_all(policies, f)
        specs.append((cname, d))
    return specs


def cluster_args(specs: list[tuple[str, str]]) -> list[str]:
    args = []
    for name, d in specs:
        args += ["--cluster", f"{name}={d}"]
    return args


def probe_groups(case: dict) -> dict[tuple[int, str], dict[tuple[str, str], bool]]:
    """Expected verdicts grouped by (port, protocol)."""
    groups: dict = {}
    for p in case["probes"]:
        groups.setdefault((p["port"], p["protocol"]), {})[(p["from"], p["to"])] = p["expect"]
    return groups
