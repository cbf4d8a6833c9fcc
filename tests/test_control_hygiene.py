"""The control plane's tree keeps the shape its design promises: no dead helpers left
behind, functions short enough to read, runtime dependencies only what the daemon
imports (issue 12's clean-up, kept from coming back)."""

from __future__ import annotations

import ast
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["control/semantics", "control/compile", "control/node/sources"]
FILES = ["control/node/store.py", "control/node/config.py"]


def _sources() -> list[str]:
    out = [os.path.join(ROOT, f) for f in FILES]
    for package in PACKAGES:
        folder = os.path.join(ROOT, package)
        out += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    return out


@pytest.mark.parametrize("path", _sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_function_over_80_lines(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert long == []


def test_dead_helpers_are_gone():
    from control.compile import selection
    from control.node import store
    from control.semantics import model

    assert not hasattr(store, "ip_conflicts")  # the store follows conflicts per address
    assert not hasattr(model, "PROTO_NUMBERS")
    with open(selection.__file__) as f:
        assert "_primary_keys" not in f.read()


def test_the_kubernetes_client_is_a_test_dependency_only():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "kubernetes" not in names and "kubernetes_asyncio" in names
    assert any(d.startswith("kubernetes>") for d in project["optional-dependencies"]["test"])


def test_sources_stay_importable_from_their_package():
    from control.node.sources import DirSource, KubeSource, make_source
    from control.node.sources.directory import DirSource as directory_source
    from control.node.sources.kube import KubeSource as kube_source

    assert DirSource is directory_source and KubeSource is kube_source and callable(make_source)
