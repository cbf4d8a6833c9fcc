"""The CNI installer (control/node/cni_install.py) against real nodes' configurations.

Offline: each test lays out a node's /etc/cni/net.d and /opt/cni/bin in tmp_path from
the configurations real CNIs write (tests/data/cni/), installs, checks that mcnp-cni is
the last plugin of the chain the runtime uses and that nothing else changed, installs
again (no change), uninstalls and checks the original chain is back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.node import cni_install
from control.node.cni_install import InstallError, add_to_chain, install, main, remove_from_chain

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "cni"

#: (fixture, name on the node) for every conflist shape a supported CNI writes.
CONFLISTS = [
    ("containerd-bridge.conflist", "10-containerd-net.conflist"),
    ("flannel.conflist", "10-flannel.conflist"),
    ("calico.conflist", "10-calico.conflist"),
    ("kindnet.conflist", "10-kindnet.conflist"),
]


@pytest.fixture
def node(tmp_path):
    conf, bin_ = tmp_path / "etc-cni-net.d", tmp_path / "opt-cni-bin"
    conf.mkdir()
    bin_.mkdir()
    plugin = tmp_path / "mcnp-cni.build"
    plugin.write_bytes(b"\x7fELF stand-in for the built plugin\n")
    return conf, bin_, plugin


def place(conf: Path, fixture: str, name: str, mode: int = 0o644) -> Path:
    path = conf / name
    shutil.copy(DATA / fixture, path)
    os.chmod(path, mode)
    return path


def loaded(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("fixture, name", CONFLISTS)
def test_install_appends_to_the_chain_and_uninstall_restores_it(node, fixture, name):
    conf, bin_, plugin = node
    path = place(conf, fixture, name, mode=0o600)
    other = place(conf, "loopback.conf", "99-loopback.conf")
    original, other_bytes = loaded(path), other.read_bytes()

    outcomes = install(conf, bin_, source=plugin)
    assert [o.changed for o in outcomes] == [True, True]
    chain = loaded(path)
    assert chain["plugins"][:-1] == original["plugins"], "the CNI's own plugins are untouched"
    assert chain["plugins"][-1] == {"type": "mcnp-cni"}
    assert {k: v for k, v in chain.items() if k != "plugins"} == {k: v for k, v in original.items() if k != "plugins"}
    assert oct(path.stat().st_mode & 0o777) == oct(0o600), "the file keeps its mode"
    assert other.read_bytes() == other_bytes, "only the configuration the runtime uses is edited"
    binary = bin_ / "mcnp-cni"
    assert binary.read_bytes() == plugin.read_bytes() and os.access(binary, os.X_OK)

    # Idempotent: nothing is rewritten on a second pass.
    before = path.stat().st_mtime_ns, binary.stat().st_mtime_ns
    assert [o.changed for o in install(conf, bin_, source=plugin)] == [False, False]
    assert (path.stat().st_mtime_ns, binary.stat().st_mtime_ns) == before
    assert [p["type"] for p in loaded(path)["plugins"]].count("mcnp-cni") == 1

    [removed] = remove_from_chain(conf)
    assert removed.changed and loaded(path) == original
    assert remove_from_chain(conf) == [], "a second removal has nothing to do"
    assert sorted(p.name for p in conf.iterdir()) == sorted([name, "99-loopback.conf"]), "no temp file left"


def test_a_lone_conf_is_converted_and_restored(node):
    conf, bin_, plugin = node
    path = place(conf, "ptp.conf", "10-ptp.conf")
    original = loaded(path)
    add_to_chain(conf)
    assert not path.exists()
    chain = loaded(conf / "10-ptp.conflist")
    assert chain["cniVersion"] == "0.4.0" and chain["name"] == "ptp-net"
    plugin_conf = {k: v for k, v in original.items() if k not in ("cniVersion", "name")}
    assert chain["plugins"][0] == plugin_conf
    assert chain["plugins"][1]["type"] == "mcnp-cni" and chain["plugins"][1][cni_install.CONVERTED_FROM] == "10-ptp.conf"
    assert not add_to_chain(conf).changed, "the converted chain is recognised as installed"
    remove_from_chain(conf)
    assert sorted(p.name for p in conf.iterdir()) == ["10-ptp.conf"]
    assert loaded(path) == original


def test_the_runtimes_first_file_is_the_one_edited(node):
    conf, _, _ = node
    first = place(conf, "calico.conflist", "05-calico.conflist")
    second = place(conf, "flannel.conflist", "10-flannel.conflist")
    (conf / "00-notes.txt").write_text("not a configuration")
    (conf / ".01-hidden.conflist").write_text("{}")
    second_bytes = second.read_bytes()
    outcome = add_to_chain(conf)
    assert outcome.path == first and loaded(first)["plugins"][-1]["type"] == "mcnp-cni"
    assert second.read_bytes() == second_bytes


def test_a_node_without_a_configuration_waits_and_says_so(node, caplog):
    conf, bin_, plugin = node
    caplog.set_level("INFO")
    assert main(["install", "--conf-dir", str(conf), "--bin-dir", str(bin_), "--plugin", str(plugin)]) == 0
    assert "no CNI configuration" in caplog.text
    assert list(conf.iterdir()) == [], "nothing is written into an empty configuration directory"
    assert (bin_ / "mcnp-cni").exists()
    assert not add_to_chain(conf / "missing").changed


def test_watch_waits_for_the_configuration_and_puts_mcnp_back_when_the_cni_rewrites_it(node):
    conf, bin_, plugin = node
    cmd = [sys.executable, "-m", "control.node.cni_install", "install", "--watch", "--interval", "0.05",
           "--conf-dir", str(conf), "--bin-dir", str(bin_), "--plugin", str(plugin)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)

    def chained(path: Path) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if loaded(path)["plugins"][-1]["type"] == "mcnp-cni":
                    return True
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        return False

    try:
        time.sleep(0.3)
        assert list(conf.iterdir()) == []
        path = place(conf, "flannel.conflist", "10-flannel.conflist")  # the CNI comes up
        assert chained(path)
        place(conf, "flannel.conflist", "10-flannel.conflist")  # flannel restarts, rewrites it
        assert chained(path)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "no CNI configuration" in err and err.count("no CNI configuration") == 1, "said once, not every pass"


@pytest.mark.parametrize("text", ["{not json", '{"name": "x", "plugins": []}', '{"cniVersion": "1.0.0", "plugins": []}',
                                  '{"cniVersion": "1.0.0", "plugins": [{"no": "type"}]}', "[]"])
def test_an_invalid_configuration_is_never_touched(node, text):
    conf, bin_, plugin = node
    path = conf / "10-broken.conflist"
    path.write_text(text)
    with pytest.raises(InstallError, match="left as it is"):
        add_to_chain(conf)
    assert path.read_text() == text
    assert main(["install", "--conf-dir", str(conf), "--bin-dir", str(bin_), "--plugin", str(plugin)]) == 1
    assert path.read_text() == text


def test_a_file_changed_while_being_edited_is_not_overwritten(node, monkeypatch):
    conf, _, _ = node
    path = place(conf, "calico.conflist", "10-calico.conflist")
    real_read = cni_install._read

    def read_then_cni_rewrites(p):
        result = real_read(p)
        time.sleep(0.01)
        p.write_text(p.read_text().replace('"info"', '"debug"'))  # the CNI's installer, meanwhile
        return result
    monkeypatch.setattr(cni_install, "_read", read_then_cni_rewrites)
    with pytest.raises(InstallError, match="changed while being edited"):
        add_to_chain(conf)
    assert '"debug"' in path.read_text() and "mcnp-cni" not in path.read_text()


def test_uninstall_keeps_the_binary_unless_asked(node):
    conf, bin_, plugin = node
    place(conf, "kindnet.conflist", "10-kindnet.conflist")
    install(conf, bin_, source=plugin)
    assert main(["uninstall", "--conf-dir", str(conf), "--bin-dir", str(bin_)]) == 0
    assert (bin_ / "mcnp-cni").exists(), "a pod added while mcnp-cni was chained may still need it for DEL"
    assert "mcnp-cni" not in (conf / "10-kindnet.conflist").read_text()
    assert main(["uninstall", "--conf-dir", str(conf), "--bin-dir", str(bin_), "--remove-binary"]) == 0
    assert not (bin_ / "mcnp-cni").exists()


def test_a_hold_keeps_the_watcher_from_putting_mcnp_back_until_an_operator_installs(node, caplog):
    conf, bin_, plugin = node
    path = place(conf, "calico.conflist", "10-calico.conflist")
    original = loaded(path)
    install(conf, bin_, source=plugin)
    assert main(["uninstall", "--hold", "--conf-dir", str(conf), "--bin-dir", str(bin_)]) == 0
    assert loaded(path) == original and (conf / cni_install.HOLD_FILE).exists()
    caplog.set_level("INFO")
    cni_install.watch(conf, bin_, cni_install.DEFAULT_SOCKET, plugin, interval=0, passes=2)
    assert loaded(path) == original, "the watcher respects the hold"
    assert "held by" in caplog.text
    assert cni_install.runtime_config(conf) == path, "the hold file is not a configuration"
    assert main(["install", "--conf-dir", str(conf), "--bin-dir", str(bin_), "--plugin", str(plugin)]) == 0
    assert not (conf / cni_install.HOLD_FILE).exists()
    assert loaded(path)["plugins"][-1] == {"type": "mcnp-cni"}


def test_a_socket_other_than_the_default_is_written_into_the_entry(node):
    conf, bin_, plugin = node
    path = place(conf, "flannel.conflist", "10-flannel.conflist")
    add_to_chain(conf, socket="/var/run/mcnp/other.sock")
    assert loaded(path)["plugins"][-1] == {"type": "mcnp-cni", "socket": "/var/run/mcnp/other.sock"}
    add_to_chain(conf)  # back to the default: the entry is replaced, not duplicated
    assert [p for p in loaded(path)["plugins"] if p["type"] == "mcnp-cni"] == [{"type": "mcnp-cni"}]


def test_the_bundled_plugin_is_the_built_one():
    assert cni_install.BUNDLED_PLUGIN == ROOT / "control" / "node" / "mcnp-cni"
    if not cni_install.BUNDLED_PLUGIN.exists():
        pytest.fail("control/node/mcnp-cni is not built: run `python setup.py build_ext --inplace`")
    out = subprocess.run([str(cni_install.BUNDLED_PLUGIN)], env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and "1.0.0" in json.loads(out.stdout)["supportedVersions"]
