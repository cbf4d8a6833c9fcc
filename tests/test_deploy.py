"""The deployment manifests under deploy/, checked offline against the code they run.

What a reviewer would check by hand before `kubectl apply`, made mechanical: every
document parses and is of a kind we mean to ship; the DaemonSet's arguments are flags
``mcnp run`` accepts and its ConfigMap passes the daemon's own settings validation; the
RBAC is exactly read-only on the four resources the sources watch; the capabilities
are the documented set; the probes hit the REST endpoint the config makes the daemon
listen on; the remote-kubeconfig Secret matches the clusters the config names; objects
that two files define (the Namespace, the ClusterRole) are the same object in both and
nothing else is defined twice; the CNI installer's container runs the installer with
the host directories it edits; the Containerfile installs what ./dev installs and names
no registry. With the
``kubernetes`` client installed, every object is also round-tripped through its model
class, which catches misspelled fields (the models drop what they do not know).

One privileged test shows that the documented capabilities are enough to open an AF_XDP
port and that each one is needed. A slow one builds the image from Debian packages
(deploy/build-image.sh: mmdebstrap, podman import, podman build; several minutes, so
marked slow) and shows that it starts ``mcnp run`` on a manifest directory and answers
/readyz, and that it carries the CNI plugin and its installer.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import types
import uuid
from pathlib import Path

import pytest
import yaml

from control.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACE = "mcnp-system"

#: What we ship, by file: (apiVersion, kind) of every document, in order.
EXPECTED_KINDS = {
    "namespace.yaml": [("v1", "Namespace")],
    "rbac.yaml": [("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                  ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")],
    "configmap.yaml": [("v1", "ConfigMap")],
    "daemonset.yaml": [("apps/v1", "DaemonSet")],
    "remote-kubeconfigs.example.yaml": [("v1", "Secret")],
    "remote-cluster-reader.yaml": [("v1", "Namespace"), ("v1", "ServiceAccount"), ("v1", "Secret"),
                                   ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                                   ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")],
    "kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "Kustomization"}

#: The read access the sources need (control/node/sources.py): list+watch of Namespaces, Pods,
#: NetworkPolicies, Services and EndpointSlices (rule S11), and the ClusterProperty of rule M1.
READ_ONLY = {(group, resource, verb)
             for group, resource in [("", "pods"), ("", "namespaces"), ("", "services"),
                                     ("networking.k8s.io", "networkpolicies"),
                                     ("discovery.k8s.io", "endpointslices"), ("about.k8s.io", "clusterproperties")]
             for verb in ("get", "list", "watch")}

#: Host directories the DaemonSet mounts: path -> the one container that mounts it.
HOST_PATHS = {"/etc/cni/net.d": "cni-install", "/opt/cni/bin": "cni-install",
              "/run/mcnp": "mcnp", "/var/lib/mcnp": "mcnp", "/run/netns": "mcnp", "/sys/fs/bpf": "mcnp"}

#: Debian packages of ./dev that only the tests and the testbed use, not the image build:
#: capsh (the capability test), the reference CNI plugins and kube-proxy's tools of the
#: testbed's nodes, iperf3 of the node benchmarks, a browser for the status page's test,
#: the image build's own tools.
TEST_ONLY_PACKAGES = {"ethtool", "iproute2", "libcap2-bin", "containernetworking-plugins", "iptables",
                      "nftables", "conntrack", "iperf3", "chromium", "mmdebstrap", "podman", "runc"}


# --------------------------------------------------------------------------- loading


def load(name: str) -> list[dict]:
    with open(DEPLOY / name, "rb") as f:
        return [d for d in yaml.load_all(f, Loader=yaml.CSafeLoader) if d is not None]


def one(name: str, kind: str) -> dict:
    found = [d for d in load(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def daemonset() -> dict:
    return one("daemonset.yaml", "DaemonSet")


def container(name: str = "mcnp") -> dict:
    containers = daemonset()["spec"]["template"]["spec"]["containers"]
    assert sorted(c["name"] for c in containers) == ["cni-install", "mcnp"]
    return next(c for c in containers if c["name"] == name)


def config_text() -> str:
    return one("configmap.yaml", "ConfigMap")["data"]["mcnp.yaml"]


def config_data() -> dict:
    return yaml.load(config_text(), Loader=yaml.CSafeLoader)


def env_values(c: dict) -> dict[str, str]:
    """Stand-in values for the container's env, as the kubelet would expand them."""
    return {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}


def expanded_args(c: dict) -> list[str]:
    """The container's args with ``$(VAR)`` expanded the way the kubelet does."""
    env = env_values(c)
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c["args"]]


def run_flags() -> set[str]:
    """Every option string ``mcnp run`` defines."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices["run"]._option_string_actions)


def parse_run_args(c: dict):
    """The container's command line through mcnp's own parser (fails on unknown flags)."""
    assert c["command"] == ["mcnp"], "the container must run the mcnp entry point"
    args = expanded_args(c)
    assert args[0] == "run"
    # Spelled out in full: argparse would also take a prefix, which a later flag can
    # make ambiguous.
    flags = run_flags()
    for a in args[1:]:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in flags, f"{a}: not a flag of mcnp run"
    try:
        return build_parser().parse_args(args)
    except SystemExit as e:  # argparse reports unknown flags by exiting
        pytest.fail(f"mcnp rejects the DaemonSet's arguments {args}: exit {e.code}")


def mount_for(c: dict, volume: str) -> dict:
    mounts = [m for m in c["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, f"volume {volume} must be mounted exactly once"
    return mounts[0]


def volume(name: str) -> dict:
    vols = [v for v in daemonset()["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    assert len(vols) == 1
    return vols[0]


def rbac_triples(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields {sorted(rule)}"
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out.add((g, r, v))
    return out


# --------------------------------------------------------------------------- documents


def test_every_manifest_parses_into_the_kinds_we_ship():
    shipped = sorted(p.name for p in DEPLOY.glob("*.yaml"))
    assert shipped == sorted(EXPECTED_KINDS), "a manifest was added or removed: update EXPECTED_KINDS"
    for name, kinds in EXPECTED_KINDS.items():
        docs = load(name)
        assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == kinds, name
        for d in docs:
            if d["kind"] == "Kustomization":
                continue
            meta = d["metadata"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), f"{name}: bad name {meta['name']!r}"
            if d["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in meta, f"{name}: {d['kind']} is cluster-scoped"
            else:
                assert meta.get("namespace") == NAMESPACE, f"{name}: {d['kind']} {meta['name']} outside {NAMESPACE}"


def test_kustomization_applies_the_local_cluster_manifests_only():
    resources = one("kustomization.yaml", "Kustomization")["resources"]
    for r in resources:
        assert (DEPLOY / r).is_file(), r
    # The Secret example holds placeholders, and the reader is for remote clusters.
    assert "remote-kubeconfigs.example.yaml" not in resources
    assert "remote-cluster-reader.yaml" not in resources
    assert {"namespace.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml"} <= set(resources)


def test_namespace_admits_a_privileged_pod():
    labels = one("namespace.yaml", "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_files_applied_to_one_cluster_never_redefine_an_object_differently():
    """A cluster that runs mcnp and is read by others gets every file but the example
    Secret: an object two files define must be the same object, or the second apply
    takes away what the first granted (labels, subjects)."""
    seen: dict[tuple, tuple[str, dict]] = {}
    for name in sorted(n for n in EXPECTED_KINDS if n not in ("kustomization.yaml", "remote-kubeconfigs.example.yaml")):
        for d in load(name):
            key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
            if key in seen:
                first, doc = seen[key]
                assert doc == d, f"{key} is defined differently in {first} and {name}"
            seen[key] = (name, d)
    # The two bindings are distinct objects naming distinct accounts.
    bindings = {one(n, "ClusterRoleBinding")["metadata"]["name"] for n in ("rbac.yaml", "remote-cluster-reader.yaml")}
    assert len(bindings) == 2
    # And the remote cluster's Namespace is the one with the Pod Security labels.
    assert one("remote-cluster-reader.yaml", "Namespace") == one("namespace.yaml", "Namespace")


# --------------------------------------------------------------------------- the daemon's command line and config


def test_daemonset_args_are_flags_mcnp_run_accepts():
    c = container()
    args = parse_run_args(c)
    assert args.func.__name__ == "cmd_run"
    assert args.node_name == "<NODE_NAME>", "--node-name must come from the NODE_NAME variable"
    node = [e for e in c["env"] if e["name"] == "NODE_NAME"]
    assert node and node[0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The config file the args name is the one the ConfigMap is mounted as.
    m = mount_for(c, "config")
    assert args.config == m["mountPath"] and m["subPath"] == "mcnp.yaml" and m["readOnly"]
    assert volume("config")["configMap"]["name"] == one("configmap.yaml", "ConfigMap")["metadata"]["name"]


def test_configmap_config_passes_the_daemons_validation(tmp_path):
    config = pytest.importorskip("control.node.config", reason="control.node.config (the settings loader) is not in the tree yet")
    path = tmp_path / "mcnp.yaml"
    path.write_text(config_text())
    c = container()
    argv = [a if not a.startswith("--config=") else f"--config={path}" for a in expanded_args(c)]
    settings = config.Settings.from_args(build_parser().parse_args(argv))  # raises listing every problem
    assert settings.node_name == "<NODE_NAME>"
    sources = {s.name: s for s in settings.clusters}
    assert sources[settings.local_cluster].kind == "in-cluster", "the local cluster is read with the service account"
    assert settings.remote_clusters, "the example names at least one remote cluster"
    remote_dir = mount_for(c, "remote-kubeconfigs")["mountPath"]
    for name in settings.remote_clusters:
        s = sources[name]
        assert s.kind == "kubeconfig" and s.path == f"{remote_dir}/{name}", f"{name}: expected kubeconfig:{remote_dir}/{name}"
    assert not getattr(settings, "attach", None) and getattr(settings, "uplink", None) is None, \
        "per-node settings do not belong in the shared ConfigMap"
    assert settings.default_peer_scope == "local" and settings.multicluster


def test_configmap_keys_are_settings_the_loader_knows():
    config = pytest.importorskip("control.node.config", reason="control.node.config (the settings loader) is not in the tree yet")
    problems: list[str] = []
    config.Settings.from_mapping(config_data(), problems)
    assert problems == []


def test_probes_hit_the_rest_endpoint_the_config_opens():
    config = pytest.importorskip("control.node.config", reason="control.node.config (the settings loader) is not in the tree yet")
    kind, (host, port) = config.parse_listen(config_data()["api-listen"])
    assert kind == "tcp" and host == "127.0.0.1"
    c = container()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        # hostNetwork: the pod IP is the node's, so the loopback must be named.
        assert (get["host"], get["port"], get["path"]) == (host, port, path), probe


def test_probe_paths_are_served_by_the_api():
    api = pytest.importorskip("control.node.api", reason="control.node.api (the REST endpoint) is not in the tree yet")
    source = inspect.getsource(api)
    for path in ("/healthz", "/readyz"):
        assert f'"{path}"' in source, f"control.node.api does not route {path}"


# --------------------------------------------------------------------------- privileges


def test_pod_runs_on_the_host_network_with_exactly_the_documented_capabilities():
    spec = daemonset()["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True, c["name"]
    assert "add" not in container("cni-install")["securityContext"]["capabilities"], "the installer needs none"
    sc = container()["securityContext"]
    added = {f"CAP_{c}" for c in sc["capabilities"]["add"]}
    documented = documented_capabilities()
    assert added == documented, f"manifest adds {sorted(added)}, README documents {sorted(documented)}"
    # And it is the list shown necessary and sufficient (deploy/README.md, Privileges).
    # CAP_SYS_ADMIN: the pod's end of its veth is hooked from inside its namespace; it
    # also grants what CAP_BPF would (the kernel's bpf_capable()), so that one is not added.
    assert documented == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_SYS_ADMIN"}
    # Nothing that would widen them through the back door.
    for key in ("hostPID", "hostIPC"):
        assert not spec.get(key)


def test_host_directories_are_the_documented_ones_each_mounted_where_it_is_needed():
    spec = daemonset()["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert sorted(host.values()) == sorted(HOST_PATHS)
    for c in spec["containers"]:
        for m in c["volumeMounts"]:
            if m["name"] in host:
                assert HOST_PATHS[host[m["name"]]] == c["name"], f"{c['name']} mounts {host[m['name']]}"
    section = (DEPLOY / "README.md").read_text().split("## Privileges", 1)[1].split("\n## ", 1)[0]
    for path in HOST_PATHS:
        assert f"`{path}`" in section, f"README.md, Privileges: the host directory {path} is not explained"
    # The daemon's socket and records are where mcnp-cni and a restarted daemon look.
    cni = pytest.importorskip("control.node.cni")
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert os.path.dirname(cni.DEFAULT_SOCKET) in mounts and cni.DEFAULT_STATE_DIR in mounts
    assert b'"' + cni.DEFAULT_SOCKET.encode() + b'"' in (ROOT / "csrc" / "mcnp_cni.c").read_bytes(), \
        "the plugin's default socket is the daemon's"


def test_cni_installer_container_runs_the_installer_on_the_mounted_host_directories():
    from control.node import cni_install
    c = container("cni-install")
    assert c["image"] == container()["image"], "one image for both containers"
    assert c["command"] == ["python3", "-m", "control.node.cni_install"]
    args = cni_install.build_parser().parse_args(c["args"])
    assert args.command == "install" and args.watch, "the chain entry is kept in place, not installed once"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in daemonset()["spec"]["template"]["spec"]["volumes"]
            if "hostPath" in v}
    assert host[mounts[str(args.conf_dir)]] == cni_install.DEFAULT_CONF_DIR
    assert host[mounts[str(args.bin_dir)]] == cni_install.DEFAULT_BIN_DIR
    assert "preStop" not in c.get("lifecycle", {}), "a restart must not take mcnp-cni out of the chain"


def documented_capabilities() -> set[str]:
    """The capabilities of deploy/README.md's table under "## Privileges"."""
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## Privileges", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(CAP_[A-Z_]+)` \|", section, flags=re.M))


def test_cluster_role_is_exactly_read_only_on_the_four_resources():
    local = one("rbac.yaml", "ClusterRole")
    remote = one("remote-cluster-reader.yaml", "ClusterRole")
    assert rbac_triples(local) == READ_ONLY
    assert rbac_triples(remote) == READ_ONLY, "remote clusters grant the same role"
    sa = one("rbac.yaml", "ServiceAccount")["metadata"]["name"]
    assert daemonset()["spec"]["template"]["spec"]["serviceAccountName"] == sa
    for name in ("rbac.yaml", "remote-cluster-reader.yaml"):
        binding = one(name, "ClusterRoleBinding")
        role = one(name, "ClusterRole")
        account = one(name, "ServiceAccount")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                        "namespace": account["metadata"]["namespace"]}]


def test_remote_kubeconfig_secret_has_one_key_per_remote_cluster():
    data = config_data()
    clusters = data["clusters"]
    remote = {name for name in clusters if name != data["local-cluster"]}
    secret = one("remote-kubeconfigs.example.yaml", "Secret")
    assert set(secret["stringData"]) == remote
    for name, text in secret["stringData"].items():
        kc = yaml.load(text, Loader=yaml.CSafeLoader)
        assert kc["kind"] == "Config" and kc["current-context"] in {c["name"] for c in kc["contexts"]}, name
    vol = volume("remote-kubeconfigs")["secret"]
    assert vol["secretName"] == secret["metadata"]["name"]
    assert vol["optional"] is True, "a single-cluster installation needs no Secret"
    assert vol["defaultMode"] == 0o400
    assert mount_for(container(), "remote-kubeconfigs")["readOnly"] is True
    token = one("remote-cluster-reader.yaml", "Secret")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == \
        one("remote-cluster-reader.yaml", "ServiceAccount")["metadata"]["name"]


# --------------------------------------------------------------------------- the image


def dev_apt_packages() -> set[str]:
    text = (ROOT / "dev").read_text()
    block = re.search(r"APT_PACKAGES=\((.*?)\)", text, flags=re.S).group(1)
    return set(block.split())


def containerfile_stages() -> list[tuple[str, set[str]]]:
    """(base image, apt packages installed) per stage of deploy/Containerfile, with
    ARG defaults substituted."""
    text = (DEPLOY / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, set[str]]] = []
    args: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.upper().startswith("ARG ") and "=" in line:
            name, value = line.split(None, 1)[1].split("=", 1)
            args[name] = value
        if line.upper().startswith("FROM "):
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
            stages.append((image, set()))
        m = re.search(r"apt-get install ((?:-\S+\s+)*)(.*?)(?:&&|$)", line)
        if m:
            stages[-1][1].update(w for w in m.group(2).split() if not w.startswith("-"))
    return stages


def test_containerfile_builds_on_debian_12_with_the_packages_dev_installs():
    stages = containerfile_stages()
    assert len(stages) == 2
    for image, _ in stages:
        # Plain names only (no registry host such as name.example/ or localhost:5000/).
        assert "/" not in image, f"{image}: name no registry"
        assert image in ("debian:12", "python:3.11-slim-bookworm"), f"{image}: Debian 12 is what is built and tested"
    (_, build), (_, runtime) = stages
    missing = dev_apt_packages() - TEST_ONLY_PACKAGES - build
    assert not missing, f"the build stage lacks packages ./dev installs: {sorted(missing)}"
    assert {"python3", "libbpf1", "libxdp1", "libelf1"} <= runtime
    text = (DEPLOY / "Containerfile").read_text()
    assert not re.search(r"https?://", text), "no URLs: packages come from the builder's configured sources"
    # The entry point the DaemonSet runs is the one the project declares.
    assert 'ENTRYPOINT ["mcnp"]' in text
    assert 'mcnp = "control.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_containerfile_copies_every_package_the_project_declares():
    text = (DEPLOY / "Containerfile").read_text()
    with open(ROOT / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = sorted({name.split(".")[0] for name in include})
    assert top_level == ["control", "fastpath"]
    for pkg in top_level + ["csrc"]:
        assert f"COPY {pkg}/ {pkg}/" in text, f"the image build does not copy {pkg}/"


# --------------------------------------------------------------------------- object shapes (optional)


MODELS = {
    "Namespace": "V1Namespace", "ServiceAccount": "V1ServiceAccount", "ConfigMap": "V1ConfigMap",
    "Secret": "V1Secret", "DaemonSet": "V1DaemonSet", "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding",
}


def _deserialize(api, doc: dict, klass: str):
    """``ApiClient.deserialize`` across client versions (a text or a response object)."""
    text = json.dumps(doc)
    if "response_text" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(text, klass, "application/json")
    return api.deserialize(types.SimpleNamespace(data=text), klass)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_KINDS if n != "kustomization.yaml"))
def test_objects_round_trip_through_the_kubernetes_models(name):
    client = pytest.importorskip("kubernetes.client", reason="the kubernetes Python client is not installed")
    api = client.ApiClient()
    for doc in load(name):
        obj = _deserialize(api, doc, MODELS[doc["kind"]])
        # The models keep only the fields they know: a misspelled or misplaced field
        # does not survive the round trip.
        assert api.sanitize_for_serialization(obj) == doc, f"{name}: {doc['kind']} has fields the API does not know"


# --------------------------------------------------------------------------- the capabilities, for real


PROBE = """
import ctypes, os, sys
from fastpath.rings import Umem, Port
with Umem(frames=1024, frame_size=2048, ring_size=512) as u:
    with Port(u, sys.argv[1]):
        print("opened")
# What attaching the hook needs: an XDP request on the interface over rtnetlink.
import subprocess
if subprocess.run(["ip", "link", "set", "dev", sys.argv[1], "xdp", "off"]).returncode != 0:
    raise OSError("an XDP request on the interface failed")
libc = ctypes.CDLL(None, use_errno=True)
# What hooking the pod end of a veth needs: entering the pod network namespace.
fd = os.open(sys.argv[2], os.O_RDONLY)
if libc.setns(fd, 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "setns into the pod namespace failed")
# What loading the hook program needs: a BPF map (an array of one u32), made by bpf(2).
attr = ctypes.create_string_buffer(bytes([2, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0]) + bytes(112))
nr = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
if libc.syscall(nr, 0, attr, len(attr)) < 0:
    raise OSError(ctypes.get_errno(), "creating a BPF map failed")
print("entered")
"""


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build a network namespace and drop capabilities")
@pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh (Debian package libcap2-bin) is not installed")
def test_documented_capabilities_open_an_af_xdp_port_and_each_is_needed():
    pytest.importorskip("fastpath._dp", reason="the dataplane extension is not built")
    from tests import netns_util as nu

    wanted = {c.lower() for c in documented_capabilities()}
    bounding = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    every = set(re.search(r"^Bounding set =(.*)$", bounding, flags=re.M).group(1).strip().split(","))
    assert wanted <= every

    def attempt(ns: str, pod_ns: str, drop: set[str]) -> subprocess.CompletedProcess:
        # A 64 KiB memlock limit, as a container may get: only CAP_IPC_LOCK lifts it.
        shell = f"ulimit -l 64 && exec {sys.executable} -c '{PROBE}' p0 {nu.NETNS_DIR}/{pod_ns}"
        cmd = ["nsenter", f"--net={nu.NETNS_DIR}/{ns}", "capsh", f"--drop={','.join(sorted(drop))}", "--", "-c", shell]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    with nu.netns("cap") as ns, nu.netns("cappod") as pod_ns:
        nu.veth_pair("p0", ns, "p1", ns)
        res = attempt(ns, pod_ns, every - wanted)
        assert res.returncode == 0 and "entered" in res.stdout, res.stderr[-2000:]
        for cap in sorted(wanted):
            res = attempt(ns, pod_ns, (every - wanted) | {cap})
            assert res.returncode != 0, f"the port opened and the pod's namespace was entered without {cap}"
            expected = {"cap_sys_admin": "setns into the pod namespace failed",
                        "cap_net_admin": "an XDP request on the interface failed"}.get(cap, "XskError")
            assert expected in res.stderr, res.stderr[-2000:]


# --------------------------------------------------------------------------- the image, built and run


BUILD_SCRIPT = DEPLOY / "build-image.sh"


def test_build_script_makes_the_base_from_debian_packages_without_a_registry():
    subprocess.run(["sh", "-n", str(BUILD_SCRIPT)], check=True)
    text = BUILD_SCRIPT.read_text()
    assert os.access(BUILD_SCRIPT, os.X_OK)
    assert "mmdebstrap" in text and re.search(r"podman \$MCNP_PODMAN_OPTS import", text)
    assert re.search(r'podman \$MCNP_PODMAN_OPTS build .*--build-arg "BASE=\$BASE_TAG"', text, flags=re.S), \
        "the Containerfile builds on the made base"
    opts = subprocess.run([str(BUILD_SCRIPT), "--podman-options"], capture_output=True, text=True, check=True,
                          timeout=10).stdout.split("\n")
    assert opts[1].startswith("--ulimit nofile="), opts
    assert "--network=host" in text, "no container network (and no address outside the test ranges) is created"
    assert not re.search(r"https?://", text), "packages come from the machine's configured sources"
    assert "ARG BASE=" in (DEPLOY / "Containerfile").read_text()


def _podman_options() -> tuple[list[str], list[str]]:
    """(global, per-container) podman options for this host, as build-image.sh uses them."""
    out = subprocess.run([str(BUILD_SCRIPT), "--podman-options"], capture_output=True, text=True, check=True,
                         timeout=10).stdout.split("\n")
    return out[0].split(), out[1].split()


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["podman", *_podman_options()[0], *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image():
    """The image, built by deploy/build-image.sh under a tag of its own; removed after."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root")
    for tool in ("mmdebstrap", "podman"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (Debian package {tool}) is not installed")
    tag = f"localhost/mcnp-test-{uuid.uuid4().hex[:8]}:dev"
    base = f"localhost/mcnp-test-base-{uuid.uuid4().hex[:8]}:12"
    res = subprocess.run([str(BUILD_SCRIPT), tag], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "MCNP_BASE_TAG": base})
    try:
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        yield tag
    finally:
        _podman("rmi", "--force", tag, base, check=False)


@pytest.mark.slow
@pytest.mark.privileged
def test_built_image_runs_mcnp_on_a_manifest_directory_and_answers_readyz(image, tmp_path):
    manifests = tmp_path / "west"
    shutil.copytree(ROOT / "control" / "lab" / "examples" / "demo" / "west", manifests)
    name = f"mcnp-test-{uuid.uuid4().hex[:8]}"
    # The DaemonSet mounts the host's bpffs at /sys/fs/bpf; here a bpffs of the test's own.
    bpffs = tmp_path / "bpf"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True, timeout=10)
    # As the DaemonSet runs it: read-only root, every capability dropped but the
    # documented ones; no network of its own but loopback (--network=none).
    caps = ",".join(c.removeprefix("CAP_") for c in sorted(documented_capabilities()))
    try:
        _podman("run", *_podman_options()[1], "--detach", "--name", name, "--network=none", "--read-only",
                "--cap-drop=all", f"--cap-add={caps}", "--tmpfs", "/tmp", "--tmpfs", "/run/mcnp",
                "--tmpfs", "/var/lib/mcnp", "--volume", f"{bpffs}:/sys/fs/bpf", "--volume", f"{manifests}:/manifests:ro",
                image, "run", "--node-name", "node-1", "--local-cluster", "west", "--cluster", "west=dir:/manifests",
                "--api-listen", "127.0.0.1:9901")
        ready = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9901/readyz', timeout=2).status)"
        deadline, last = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            last = _podman("exec", name, "python3", "-c", ready, check=False, timeout=30)
            if last.returncode == 0 and last.stdout.strip() == "200":
                break
            state = _podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
            assert state == "true", _podman("logs", name, check=False).stderr[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"/readyz never answered 200: {last.stdout} {last.stderr[-1000:]}\n"
                        + _podman("logs", name, check=False).stderr[-3000:])
        # The same image carries the CNI plugin and its installer (the DaemonSet's second container).
        plugin = _podman("exec", "--env", "CNI_COMMAND=VERSION", name, "python3", "-c",
                         "import subprocess, control.node.cni_install as c; "
                         "print(subprocess.run([str(c.BUNDLED_PLUGIN)], capture_output=True, text=True).stdout)")
        assert "1.0.0" in json.loads(plugin.stdout)["supportedVersions"]
        _podman("exec", name, "python3", "-m", "control.node.cni_install", "install", "--help")
    finally:
        _podman("rm", "--force", "--time", "5", name, check=False)
        subprocess.run(["umount", str(bpffs)], check=False, timeout=10)
