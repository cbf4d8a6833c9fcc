"""The command line's habits: version, -v anywhere, help on every flag, protocols in any
case, explain's exit codes, warnings, every invalid object reported, several
port/protocol pairs in one matrix run, lint, and bash completion."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest
import yaml

from control.cli import build_parser, main
from control.semantics.model import MC_KEY

from .builders import make_namespace, make_pod, make_policy
from .demo_copy import copy_demo

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def demo(tmp_path):
    dirs = copy_demo(tmp_path)
    return ["--cluster", f"east={dirs['east']}", "--cluster", f"west={dirs['west']}"], dirs


def write(path, docs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mcnp ") and len(out.split()) == 2


def test_verbose_is_accepted_after_the_subcommand(capsys, demo):
    flags, _ = demo
    parser = build_parser()
    assert parser.parse_args(["matrix", *flags, "--port", "80", "--protocol", "TCP", "-vv"]).verbose == 2
    assert parser.parse_args(["-v", "matrix", *flags, "--port", "80", "--protocol", "TCP"]).verbose == 1
    assert parser.parse_args(["matrix", *flags, "--port", "80", "--protocol", "TCP"]).verbose == 0
    code, out, _ = run(capsys, "matrix", *flags, "--port", "80", "--protocol", "TCP", "--summary", "-v")
    assert code == 0 and out.startswith("allowed:")


def _parsers(parser: argparse.ArgumentParser, name: str = "mcnp"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_has_help():
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_protocol_is_case_insensitive_and_checked(capsys, demo):
    flags, _ = demo
    base = ["explain", *flags, "--from", "west/shop/web", "--to", "east/shop/api", "--port", "80", "--json"]
    code, lower, _ = run(capsys, *base, "--protocol", "tcp")
    assert code == 0
    code, upper, _ = run(capsys, *base, "--protocol", "TCP")
    assert lower == upper and json.loads(lower)["allowed"] is True
    with pytest.raises(SystemExit) as e:
        main([*base, "--protocol", "icmpx"])
    assert e.value.code == 2 and "invalid protocol 'icmpx'" in capsys.readouterr().err


def test_explain_exits_1_when_denied_0_when_allowed_2_when_invalid(capsys, demo):
    flags, _ = demo
    base = ["explain", *flags, "--port", "80", "--protocol", "TCP"]
    assert run(capsys, *base, "--from", "west/shop/web", "--to", "east/shop/api")[0] == 0
    code, out, _ = run(capsys, *base, "--from", "west/dev/tester", "--to", "east/shop/db", "--json")
    assert code == 1 and json.loads(out)["allowed"] is False  # the JSON is printed all the same
    assert run(capsys, *base, "--from", "west/dev/nobody", "--to", "east/shop/db")[0] == 2
    assert "exit" in build_parser()._subparsers._group_actions[0].choices["explain"].format_help()


def test_glob_matching_nothing_is_a_warning(capsys, demo):
    flags, _ = demo
    code, out, err = run(capsys, "matrix", *flags, "--port", "80", "--protocol", "TCP", "--from", "west/shop/*",
                         "--to", "south/*", "--summary", "--json")
    assert code == 0 and json.loads(out) == {"allowed": 0, "denied": 0}
    assert "mcnp: warning: --to 'south/*' matches no pod" in err and "--from" not in err


def test_selector_naming_a_cluster_outside_the_clusterset_is_a_warning(capsys, demo):
    flags, dirs = demo
    write(os.path.join(dirs["east"], "north.yaml"), [make_policy(
        "shop", "from-north", {"matchLabels": {"app": "db"}},
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {MC_KEY: "north"}}}]}])])
    code, _, err = run(capsys, "matrix", *flags, "--port", "80", "--protocol", "TCP", "--summary")
    assert code == 0
    [line] = [line for line in err.splitlines() if "north" in line]
    assert line.startswith("mcnp: warning: ") and "north.yaml" in line and "shop/from-north" in line
    assert "spec.ingress[0].from[0].namespaceSelector" in line and "not in the clusterset" in line


def test_cluster_without_a_directory_says_what_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "matrix", "--cluster", "east", "--port", "80", "--protocol", "TCP")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--cluster east" in err and "NAME=DIR" in err and "east=" in err


def test_every_invalid_object_is_reported(capsys, tmp_path):
    d = str(tmp_path / "c1")
    write(os.path.join(d, "a.yaml"), [make_namespace("x"), make_pod("x", "a", "not-an-ip")])
    write(os.path.join(d, "b.yaml"), [make_policy("x", "bad-1", {}, ingress=[{"from": [{}]}]),
                                      make_policy("x", "fine", {}, ingress=[])])
    write(os.path.join(d, "c.yaml"), [make_policy("x", "bad-2", {}, egress=[{"ports": [{"port": 70000}]}])])
    with open(os.path.join(d, "d.yaml"), "w") as f:
        f.write("kind: [unclosed\n")
    code, out, err = run(capsys, "matrix", "--cluster", f"c1={d}", "--port", "80", "--protocol", "TCP")
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 4 and all(line.startswith("mcnp: error: ") for line in lines)
    for needle in ("Pod x/a", "NetworkPolicy x/bad-1", "NetworkPolicy x/bad-2", "d.yaml"):
        assert sum(needle in line for line in lines) == 1, needle


def test_several_port_protocol_pairs_in_one_matrix_run(capsys, demo):
    flags, _ = demo
    code, out, _ = run(capsys, "matrix", *flags, "--port", "80", "--protocol", "TCP", "--port", "53", "--protocol", "udp", "--json")
    assert code == 0
    probes = json.loads(out)["probes"]
    assert set(probes[0]) == {"from", "to", "port", "protocol", "allowed"}
    for port, protocol in ((80, "TCP"), (53, "UDP")):
        _, single, _ = run(capsys, "matrix", *flags, "--port", str(port), "--protocol", protocol, "--json")
        assert [p for p in probes if (p["port"], p["protocol"]) == (port, protocol)] == json.loads(single)["probes"]
    # one protocol for several ports; summary counts every pair
    code, out, _ = run(capsys, "matrix", *flags, "--port", "80", "--port", "5432", "--protocol", "TCP", "--summary", "--json")
    counts = json.loads(out)
    assert code == 0 and counts["allowed"] + counts["denied"] == 2 * 36
    code, out, _ = run(capsys, "matrix", *flags, "--port", "80", "--port", "53", "--port", "1", "--protocol", "TCP",
                       "--protocol", "UDP")
    assert code == 2 and out == ""
    # the text output has one table per pair
    code, out, _ = run(capsys, "matrix", *flags, "--port", "80", "--port", "53", "--protocol", "TCP")
    assert code == 0 and "TCP/80" in out and "TCP/53" in out


def test_lint_reports_policies_selecting_nothing_and_unknown_clusters(capsys, demo):
    flags, dirs = demo
    code, out, _ = run(capsys, "lint", *flags)
    assert code == 0 and out == ""
    write(os.path.join(dirs["east"], "extra.yaml"), [
        make_policy("shop", "ghost", {"matchLabels": {"app": "nothing-has-this"}}, ingress=[]),
        make_policy("shop", "north", {"matchLabels": {"app": "db"}}, egress=[{"to": [{"podSelector": {
            "matchExpressions": [{"key": MC_KEY, "operator": "In", "values": ["west", "north"]}]}}]}]),
    ])
    code, out, _ = run(capsys, "lint", *flags)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert "shop/ghost" in lines[0] and "selects no pod" in lines[0] and "spec.podSelector" in lines[0]
    assert "shop/north" in lines[1] and "names cluster north" in lines[1] and "spec.egress[0].to[0].podSelector" in lines[1]
    code, out, _ = run(capsys, "lint", *flags, "--json")
    kinds = sorted(f["kind"] for f in json.loads(out)["findings"])
    assert code == 1 and kinds == ["selects-nothing", "unknown-cluster"]


def test_bash_completion_completes_subcommands_flags_and_values(capsys, tmp_path):
    code, script, _ = run(capsys, "completion", "bash")
    assert code == 0
    path = tmp_path / "mcnp.bash"
    path.write_text(script)

    def complete(*words):
        line = " ".join(("mcnp",) + words)
        cmd = (f"source {path}; COMP_WORDS=(mcnp {' '.join(repr(w) for w in words)}); "
               f"COMP_CWORD={len(words)}; COMP_LINE={line!r}; _mcnp; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("ob") == ["observe"]
    assert "--protocol" in complete("matrix", "--pro") and "--summary" in complete("matrix", "--su")
    assert complete("matrix", "--protocol", "") == ["TCP", "UDP", "SCTP"]
    assert complete("explain", "--protocol", "U") == ["UDP"]
    assert complete("testbed", "") [:2] == ["up", "down"]
    assert complete("run", "--metrics") == ["--metrics-listen"]
