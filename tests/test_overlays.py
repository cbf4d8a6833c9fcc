"""The per-cluster kustomize overlays under deploy/overlays/, rendered offline.

A small renderer (the subset of kustomize the overlays use: resources, components with
JSON 6902 patches, a replacing configMapGenerator without name hashes) builds each
overlay; where ``kubectl`` is installed its ``kustomize`` must render the same objects.
The rendered result must be a configuration the daemon accepts, for the cluster the
overlay is named after, with the metrics-only listener wired to its Service and
ServiceMonitor, on Linux nodes only.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from control.cli import build_parser
from control.node.config import Settings

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p for p in (ROOT / "deploy" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer_add(doc: dict, path: str, value) -> None:
    """JSON patch ``add`` (RFC 6902): into a mapping, or into a list (``-`` appends)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    target = doc
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target.append(value) if last == "-" else target.insert(int(last), value)
    else:
        target[last] = value


def _patch(objects: list[dict], spec: dict, root: Path) -> None:
    ops = yaml.safe_load(spec["patch"]) if "patch" in spec else yaml.safe_load((root / spec["path"]).read_text())
    target = spec["target"]
    hits = [o for o in objects if o["kind"] == target.get("kind", o["kind"])
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
    assert hits, f"patch target {target} matches nothing"
    for obj in hits:
        for op in ops:
            assert op["op"] == "add", f"the renderer knows only add, not {op['op']}"
            _pointer_add(obj, op["path"], copy.deepcopy(op["value"]))


def render(root: Path) -> list[dict]:
    """The objects ``kustomize build root`` makes, for the features the overlays use."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "components", "patches", "configMapGenerator", "generatorOptions"}
    assert set(k) <= known, f"{root}: the renderer does not know {sorted(set(k) - known)}"
    objects: list[dict] = []
    for res in k.get("resources", []):
        path = (root / res).resolve()
        objects += render(path) if path.is_dir() else _load_all(path)
    for comp in k.get("components", []):
        croot = (root / comp).resolve()
        c = yaml.safe_load((croot / "kustomization.yaml").read_text())
        assert c["kind"] == "Component"
        objects += [o for r in c.get("resources", []) for o in _load_all(croot / r)]
        for spec in c.get("patches", []):
            _patch(objects, spec, croot)
    for spec in k.get("patches", []):
        _patch(objects, spec, root)
    for gen in k.get("configMapGenerator", []):
        assert gen["behavior"] == "replace" and k["generatorOptions"]["disableNameSuffixHash"] is True
        [cm] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        cm["data"] = {Path(f).name: (root / f).read_text() for f in gen["files"]}
    return objects


def by_kind(objects: list[dict], kind: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind]
    return obj


@pytest.fixture(params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request):
    return request.param


def test_there_is_an_overlay_per_cluster():
    assert [p.name for p in OVERLAYS] == ["cluster-1", "cluster-2"]


def test_overlay_configures_its_own_cluster_and_the_daemon_accepts_it(overlay, tmp_path):
    objects = render(overlay)
    config = yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["mcnp.yaml"])
    assert config["local-cluster"] == overlay.name and config["clusters"][overlay.name] == "in-cluster"
    container = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    (tmp_path / "mcnp.yaml").write_text(yaml.safe_dump(config))
    argv = []
    for arg in container["args"]:  # the kubelet expands $(VAR) from the container's env
        arg = arg.replace("$(NODE_NAME)", "node-a").replace("$(NODE_IP)", "198.18.0.5")
        argv.append(f"--config={tmp_path / 'mcnp.yaml'}" if arg.startswith("--config=") else arg)
    settings = Settings.from_args(build_parser().parse_args([*container["command"][1:], *argv]))
    assert settings.local_cluster == overlay.name and settings.metrics_listen == "198.18.0.5:9902"
    assert settings.api_listen.startswith("127.0.0.1:") and settings.log_format == "json"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_metrics_listener_service_and_servicemonitor_fit_together(overlay):
    objects = render(overlay)
    ds = by_kind(objects, "DaemonSet")
    pod = ds["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    [port] = [p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics"]
    svc, monitor = by_kind(objects, "Service"), by_kind(objects, "ServiceMonitor")
    assert svc["spec"]["clusterIP"] == "None"
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    [sport] = svc["spec"]["ports"]
    assert sport["targetPort"] == "metrics" and sport["port"] == port["containerPort"] == 9902
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [sport["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")} == {"mcnp-system"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: the offline renderer alone checks")
def test_kubectl_kustomize_renders_the_same_objects(overlay):
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=lambda o: (o["kind"], o["metadata"]["name"]))
    ours = sorted(render(overlay), key=lambda o: (o["kind"], o["metadata"]["name"]))
    assert theirs == ours
