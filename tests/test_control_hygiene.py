"""The tree keeps the shape its design promises: no dead helpers left behind, functions
short enough to read (control plane, packet path and tests alike), runtime dependencies
only what the daemon imports (issue 12's clean-up, kept from coming back)."""

from __future__ import annotations

import ast
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Trees whose every Python file keeps functions short (the packet path's included).
TREES = ["control", "fastpath", "tests"]
MAX_FUNCTION_LINES = 80


def _sources() -> list[str]:
    out = []
    for tree in TREES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, tree)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _long_functions(source: str) -> list[tuple[str, int]]:
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_the_check_finds_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions("def long():\n" + body) == [("long", MAX_FUNCTION_LINES + 1)]
    assert _long_functions("def short():\n" + body[: body.rindex("    x")]) == []


def test_every_tree_is_checked():
    checked = {os.path.relpath(p, ROOT).split(os.sep)[0] for p in _sources()}
    assert checked == set(TREES)
    assert os.path.join(ROOT, "control", "node", "sources", "kube.py") in _sources()


@pytest.mark.parametrize("path", _sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_function_over_80_lines(path):
    with open(path) as f:
        assert _long_functions(f.read()) == []


def _imports(path: str) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def _under(paths: list[str], *folders: str) -> list[str]:
    return [p for p in paths if os.path.relpath(p, ROOT).startswith(folders)]


@pytest.mark.parametrize(("folders", "forbidden"), [
    (("fastpath",), "control"),  # the dataplane never imports the control plane
    (("control/semantics", "control/compile", "control/node"), "control.lab"),  # nor the runtime the lab
])
def test_the_packet_path_and_the_runtime_stay_apart_from_what_they_must_not_import(folders, forbidden):
    found = {os.path.relpath(p, ROOT): sorted(m for m in _imports(p) if m == forbidden or m.startswith(forbidden + "."))
             for p in _under(_sources(), *folders)}
    assert found and {p: m for p, m in found.items() if m} == {}


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\ndef f():\n    from control.lab import testbed\n")
    assert {"os", "control.lab", "control.lab.testbed"} == _imports(str(path))


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
