"""Rule S9 for the offline tools: invalid input stops with ONE line naming the file, the
object and the field, and exit code 2 — never a partial, silently wrong answer."""

import os

import pytest
import yaml

from control.cli import main
from tests.builders import make_namespace, make_pod, make_policy


def write(dirpath, name, docs):
    os.makedirs(dirpath, exist_ok=True)
    path = os.path.join(dirpath, name)
    with open(path, "w") as f:
        if isinstance(docs, str):
            f.write(docs)
        else:
            yaml.safe_dump_all(docs, f)
    return path


@pytest.fixture
def cluster_dir(tmp_path):
    d = tmp_path / "c1"
    write(str(d), "base.yaml", [make_namespace("x"), make_pod("x", "a", "198.18.1.1", {"app": "a"}, [("http", 80, "TCP")])])
    return d


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def matrix(capsys, d, *extra):
    return run(capsys, "matrix", "--cluster", f"c1={d}", "--port", "80", "--protocol", "TCP", *extra)


def policy_with(spec_tweak):
    p = make_policy("x", "bad", {})
    spec_tweak(p["spec"])
    return p


BAD_POLICIES = {
    "operator": (lambda s: s.update(podSelector={"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]}), "spec.podSelector.matchExpressions[0].operator"),
    "in-without-values": (lambda s: s.update(podSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}), "spec.podSelector.matchExpressions[0].values"),
    "cidr": (lambda s: s.update(ingress=[{"from": [{"ipBlock": {"cidr": "198.18.0.0/33"}}]}]), "spec.ingress[0].from[0].ipBlock.cidr"),
    "except-outside": (lambda s: s.update(ingress=[{"from": [{"ipBlock": {"cidr": "198.18.0.0/16", "except": ["10.0.0.0/8"]}}]}]), "spec.ingress[0].from[0].ipBlock.except[0]"),
    "endport-below-port": (lambda s: s.update(ingress=[{"ports": [{"port": 90, "endPort": 80}]}]), "spec.ingress[0].ports[0].endPort"),
    "endport-named": (lambda s: s.update(ingress=[{"ports": [{"port": "http", "endPort": 80}]}]), "spec.ingress[0].ports[0].endPort"),
    "empty-peer": (lambda s: s.update(egress=[{"to": [{}]}]), "spec.egress[0].to[0]"),
    "ipblock-and-selector": (lambda s: s.update(ingress=[{"from": [{"ipBlock": {"cidr": "198.18.0.0/16"}, "podSelector": {}}]}]), "spec.ingress[0].from[0]"),
    "protocol": (lambda s: s.update(ingress=[{"ports": [{"protocol": "ICMP"}]}]), "spec.ingress[0].ports[0].protocol"),
    "policy-type": (lambda s: s.update(policyTypes=["Sideways"]), "spec.policyTypes[0]"),
    "port-range": (lambda s: s.update(ingress=[{"ports": [{"port": 70000}]}]), "spec.ingress[0].ports[0].port"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_invalid_policy_names_file_object_field(capsys, cluster_dir, case):
    tweak, field = BAD_POLICIES[case]
    path = write(str(cluster_dir), "policy.yaml", [policy_with(tweak)])
    code, out, err = matrix(capsys, cluster_dir)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert path in lines[0] and "NetworkPolicy x/bad" in lines[0] and field in lines[0]


def test_malformed_yaml(capsys, cluster_dir):
    path = write(str(cluster_dir), "broken.yaml", "kind: Pod\nmetadata: [unclosed\n")
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and path in err and "cannot be parsed" in err and len(err.strip().splitlines()) == 1


def test_invalid_pod_ip(capsys, cluster_dir):
    write(str(cluster_dir), "pod.yaml", [make_pod("x", "b", "not-an-ip")])
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and "Pod x/b" in err and "status.podIP" in err


def test_duplicate_cluster_names(capsys, cluster_dir):
    code, _, err = run(capsys, "matrix", "--cluster", f"c1={cluster_dir}", "--cluster", f"c1={cluster_dir}", "--port", "80", "--protocol", "TCP")
    assert code == 2 and "duplicate cluster name 'c1'" in err


def test_duplicate_object(capsys, cluster_dir):
    write(str(cluster_dir), "again.yaml", [make_pod("x", "a", "198.18.1.9")])
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and "Pod x/a" in err and "duplicate" in err


def cluster_property(value):
    return {"apiVersion": "about.k8s.io/v1alpha1", "kind": "ClusterProperty", "metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": value}}


def test_cluster_property_contradicting_command_line(capsys, cluster_dir):
    path = write(str(cluster_dir), "id.yaml", [cluster_property("other")])
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and path in err and "ClusterProperty cluster.clusterset.k8s.io" in err and "spec.value" in err


def test_cluster_name_from_cluster_property(capsys, cluster_dir):
    write(str(cluster_dir), "id.yaml", [cluster_property("east")])
    code, out, _ = run(capsys, "matrix", "--cluster", str(cluster_dir), "--port", "80", "--protocol", "TCP", "--json", "--engine", "reference")
    assert code == 0 and '"from": "east/x/a"' in out


def test_unknown_pod_reference(capsys, cluster_dir):
    code, _, err = run(capsys, "explain", "--cluster", f"c1={cluster_dir}", "--from", "c1/x/nope", "--to", "c1/x/a", "--port", "80", "--protocol", "TCP")
    assert code == 2 and "c1/x/nope" in err and "--from" in err and str(cluster_dir) in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "explain", "--cluster", f"c1={cluster_dir}", "--from", "c1/x/a", "--to", "c9/x/a", "--port", "80", "--protocol", "TCP")
    assert code == 2 and "--to" in err and "no cluster 'c9'" in err


def test_unknown_kinds_are_ignored_with_a_note(capsys, cluster_dir):
    write(str(cluster_dir), "cm.yaml", [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s", "namespace": "x"}}])
    code, out, err = matrix(capsys, cluster_dir, "--summary", "--json", "--engine", "reference")
    assert code == 0 and '"allowed": 1' in out and "ConfigMap x/s" in err and "ignored" in err


def test_kind_list_and_json_files(capsys, tmp_path):
    d = tmp_path / "c"
    import json

    os.makedirs(d)
    (d / "all.json").write_text(json.dumps({"kind": "List", "items": [make_namespace("x"), make_pod("x", "a", "198.18.1.1"), make_pod("x", "b", "198.18.1.2")]}))
    write(str(d), "pol.yml", [make_policy("x", "deny", {}, ingress=[])])
    code, out, _ = run(capsys, "matrix", "--cluster", f"c={d}", "--port", "80", "--protocol", "TCP", "--summary", "--json", "--engine", "reference")
    assert code == 0 and out.strip() == '{"allowed": 0, "denied": 4}'


# Nine levels of nine aliases each: a few hundred bytes that expand to 9**9 (~387
# million) nodes.
ALIAS_BOMB = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bomb, namespace: x}
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
spec: {podSelector: {matchLabels: {app: *i}}}
"""


def test_alias_expansion_is_bounded(capsys, cluster_dir):
    path = write(str(cluster_dir), "bomb.yaml", ALIAS_BOMB)
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and err.count("\n") == 1 and len(err) < 400
    assert f"{path}: " in err and "aliases expand" in err.split(path)[1]


def test_recursive_alias_is_an_error_not_a_crash(capsys, cluster_dir):
    path = write(str(cluster_dir), "loop.yaml", "kind: Namespace\nmetadata: &m {name: y, labels: *m}\n")
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and err.count("\n") == 1 and f"{path}: " in err and "refers to itself" in err


def test_deep_nesting_is_an_error_not_a_crash(capsys, cluster_dir):
    path = write(str(cluster_dir), "deep.json", "[" * 100000 + "]" * 100000)
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and err.count("\n") == 1 and path in err


def test_oversized_file_is_an_error_naming_it(capsys, cluster_dir, monkeypatch):
    from control.semantics import manifests

    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1000)
    path = write(str(cluster_dir), "big.yaml", [make_namespace(f"n{i}") for i in range(40)])
    code, _, err = matrix(capsys, cluster_dir)
    assert code == 2 and err.count("\n") == 1 and path in err and "1000 bytes" in err
