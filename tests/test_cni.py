"""mcnp-cni, the real built plugin, against a real CniServer with a fake handler.

What a container runtime sees: VERSION, ADD passing prevResult through, CNI error JSON
with the spec's codes when the daemon is away, refuses, hangs or answers garbage, DEL
that never fails; and what the daemon keeps: a record per sandbox written before ADD is
answered and removed after DEL, read back after a restart with corrupt files skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Optional

import pytest

from control.node import cni
from control.node.cni import CniError, CniServer, Sandbox, load_sandboxes

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "control" / "node" / "mcnp-cni"
SOURCE = ROOT / "csrc" / "mcnp_cni.c"

PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:00:00:00:00:01"},
        {"name": "veth1a2b3c4d", "mac": "aa:00:00:00:00:02"},
        {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/var/run/netns/cni-1234"},
    ],
    "ips": [{"interface": 2, "address": "198.18.7.9/16", "gateway": "198.18.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=api-7d9c;K8S_POD_INFRA_CONTAINER_ID=c0ffee"


@pytest.fixture(scope="module")
def plugin() -> Path:
    assert PLUGIN.is_file() and os.access(PLUGIN, os.X_OK), \
        "control/node/mcnp-cni is not built: run `python setup.py build_ext --inplace`"
    assert PLUGIN.stat().st_mtime >= SOURCE.stat().st_mtime, \
        "control/node/mcnp-cni is older than csrc/mcnp_cni.c: rebuild with `python setup.py build_ext --inplace`"
    return PLUGIN


class FakeHandler:
    """Records every call; refuses, raises or hangs when told to."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.calls: list[tuple] = []
        self.refuse: Optional[CniError] = None
        self.explode = False
        self.record_seen_during_add: Optional[bool] = None

    async def _maybe_fail(self):
        if self.refuse:
            raise self.refuse
        if self.explode:
            raise RuntimeError("boom")

    async def add(self, sandbox: Sandbox) -> None:
        self.record_seen_during_add = (self.state_dir / "sandboxes" / f"{sandbox.container_id}.json").exists()
        self.calls.append(("add", sandbox))
        await self._maybe_fail()

    async def check(self, sandbox: Sandbox) -> None:
        self.calls.append(("check", sandbox))
        await self._maybe_fail()

    async def delete(self, container_id: str, sandbox: Optional[Sandbox]) -> None:
        self.calls.append(("delete", container_id, sandbox))
        await self._maybe_fail()


def config(socket_path: str, *, prev: Optional[dict] = PREV_RESULT, version: str = "1.0.0", **extra) -> dict:
    c = {"cniVersion": version, "name": "k8s-pod-network", "type": "mcnp-cni", "socket": socket_path, **extra}
    if prev is not None:
        c["prevResult"] = prev
    return c


def env(command: str, container_id: str = "c0ffee", **over) -> dict:
    e = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
         "CNI_NETNS": "/var/run/netns/cni-1234", "CNI_IFNAME": "eth0", "CNI_ARGS": ARGS,
         "CNI_PATH": "/opt/cni/bin"}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


async def run_plugin(plugin: Path, environ: dict, stdin: bytes | dict, timeout: float = 30) -> tuple[int, dict | None, bytes]:
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    proc = await asyncio.create_subprocess_exec(str(plugin), env=environ, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(data), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"mcnp-cni did not exit within {timeout} s")
    parsed = json.loads(out) if out.strip() else None
    return proc.returncode, parsed, out


class Daemon:
    """A CniServer with a FakeHandler on a socket in tmp_path, for one test."""

    def __init__(self, tmp_path: Path):
        self.state = tmp_path / "state"
        self.path = str(tmp_path / "run" / "cni.sock")
        self.handler = FakeHandler(self.state)
        self.server = CniServer(self.handler, self.state, io_timeout=2.0)

    async def __aenter__(self):
        await self.server.start(self.path)
        return self

    async def __aexit__(self, *exc):
        await self.server.close()


def records(state: Path) -> list[str]:
    d = state / "sandboxes"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --------------------------------------------------------------------------- VERSION, ADD


def test_version_is_answered_by_the_plugin(plugin):
    async def go():
        return await run_plugin(plugin, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}')
    rc, out, _ = asyncio.run(go())
    assert rc == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_add_prints_prev_result_unchanged_and_records_the_sandbox(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            # prevResult in an older version, with member order and number spelling
            # that a re-serialiser would change: the output keeps them byte for byte.
            prev = dict(PREV_RESULT, cniVersion="0.4.0", mtu=1.50e3)
            cfg = config(d.path, prev=prev, bridge="cni0")
            rc, out, raw = await run_plugin(plugin, env("ADD"), cfg)
            return d, rc, out, raw
    d, rc, out, raw = asyncio.run(go())
    assert rc == 0, raw
    assert out == dict(PREV_RESULT, cniVersion="1.0.0", mtu=1500.0)
    assert b'"mtu": 1500.0' in raw and raw.index(b'"interfaces"') < raw.index(b'"ips"') < raw.index(b'"routes"')
    [(kind, sandbox)] = d.handler.calls
    assert kind == "add"
    assert sandbox == Sandbox(container_id="c0ffee", netns="/var/run/netns/cni-1234", ifname="eth0",
                              namespace="shop", pod_name="api-7d9c", ips=("198.18.7.9",),
                              mac="aa:00:00:00:00:03", host_ifname="veth1a2b3c4d")
    assert d.handler.record_seen_during_add, "the record must be on disk before ADD is answered"
    assert load_sandboxes(d.state) == [sandbox]


def test_ptp_shape_without_a_bridge_names_the_host_veth(plugin, tmp_path):
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "veth9f8e7d6c", "mac": "aa:00:00:00:00:09"},
                                                  {"name": "eth0", "mac": "aa:00:00:00:00:0a", "sandbox": "/x"}],
            "ips": [{"interface": 1, "address": "198.18.1.5/32"}, {"interface": 1, "address": "2001:db8::5/128"}]}

    async def go():
        async with Daemon(tmp_path) as d:
            rc, _, raw = await run_plugin(plugin, env("ADD"), config(d.path, prev=prev, version="0.3.1"))
            return d, rc, raw
    d, rc, raw = asyncio.run(go())
    assert rc == 0, raw
    sandbox = d.handler.calls[0][1]
    assert (sandbox.host_ifname, sandbox.mac, sandbox.ips) == ("veth9f8e7d6c", "aa:00:00:00:00:0a",
                                                               ("198.18.1.5", "2001:db8::5"))


def test_add_fails_with_code_11_when_no_daemon_listens(plugin, tmp_path):
    async def go():
        return await run_plugin(plugin, env("ADD"), config(str(tmp_path / "nobody.sock")))
    rc, out, _ = asyncio.run(go())
    assert rc == 1
    assert out["code"] == 11 and out["cniVersion"] == "1.0.0" and "not reachable" in out["msg"]
    assert "nobody.sock" in out["details"]


def test_add_refused_by_the_handler_fails_with_its_code_and_leaves_no_record(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            d.handler.refuse = CniError(11, "dataplane not ready", 'tables not compiled yet "quoted"')
            rc, out, _ = await run_plugin(plugin, env("ADD"), config(d.path, version="0.4.0"))
            return d, rc, out
    d, rc, out = asyncio.run(go())
    assert rc == 1
    assert out == {"cniVersion": "0.4.0", "code": 11, "msg": "dataplane not ready",
                   "details": 'tables not compiled yet "quoted"'}
    assert records(d.state) == []


def test_a_handler_that_crashes_is_an_error_reply_and_the_server_goes_on(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            d.handler.explode = True
            first = await run_plugin(plugin, env("ADD"), config(d.path))
            d.handler.explode = False
            second = await run_plugin(plugin, env("ADD"), config(d.path))
            return first, second
    (rc1, out1, _), (rc2, _, raw2) = asyncio.run(go())
    assert rc1 == 1 and out1["code"] == 999 and "boom" in out1["details"]
    assert rc2 == 0, raw2


# --------------------------------------------------------------------------- DEL, CHECK


def test_del_removes_the_record_and_hands_the_stored_sandbox_over(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            assert (await run_plugin(plugin, env("ADD"), config(d.path)))[0] == 0
            assert records(d.state) == ["c0ffee.json"]
            # DEL carries no prevResult and may come without a netns.
            rc, out, _ = await run_plugin(plugin, env("DEL", CNI_NETNS=None), config(d.path, prev=None))
            unknown = await run_plugin(plugin, env("DEL", container_id="never-added"), config(d.path, prev=None))
            return d, rc, out, unknown
    d, rc, out, unknown = asyncio.run(go())
    assert (rc, out) == (0, None)
    assert records(d.state) == []
    added = d.handler.calls[0][1]
    assert d.handler.calls[1] == ("delete", "c0ffee", added)
    assert unknown[0] == 0 and d.handler.calls[2] == ("delete", "never-added", None)


def test_del_never_fails(plugin, tmp_path):
    async def go():
        results = [await run_plugin(plugin, env("DEL"), config(str(tmp_path / "nobody.sock"), prev=None)),
                   await run_plugin(plugin, env("DEL"), b"not json at all"),
                   await run_plugin(plugin, env("DEL", CNI_CONTAINERID=None), b"{}")]
        async with Daemon(tmp_path) as d:
            d.handler.refuse = CniError(999, "cannot detach")
            results.append(await run_plugin(plugin, env("DEL"), config(d.path, prev=None)))
        return results
    for rc, out, raw in asyncio.run(go()):
        assert (rc, out) == (0, None), raw


def test_check_after_add_and_refused_check(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            unknown = await run_plugin(plugin, env("CHECK"), config(d.path))
            await run_plugin(plugin, env("ADD"), config(d.path))
            ok = await run_plugin(plugin, env("CHECK"), config(d.path))
            d.handler.refuse = CniError(999, "not attached", "no program on veth1a2b3c4d")
            refused = await run_plugin(plugin, env("CHECK"), config(d.path))
            old = await run_plugin(plugin, env("CHECK"), config(d.path, version="0.3.1"))
            return d, unknown, ok, refused, old
    d, unknown, ok, refused, old = asyncio.run(go())
    assert unknown[0] == 1 and unknown[1]["code"] == 999 and "unknown sandbox" in unknown[1]["msg"]
    assert ok[:2] == (0, None)
    assert refused[0] == 1 and refused[1]["msg"] == "not attached"
    # CHECK does not exist before CNI 0.4.0: the plugin answers that itself.
    assert old[0] == 1 and old[1]["code"] == 1
    assert [c[0] for c in d.handler.calls] == ["add", "check", "check"]


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("stdin, code", [
    (b"", 4),
    (b"not json", 4),
    (b'{"cniVersion": "1.0.0", "prevResult": {}} trailing', 4),
    (b'{"name": "x", "prevResult": {}}', 4),  # no cniVersion
    (b'{"cniVersion": "1.0.0", "name": "x"}', 4),  # ADD without prevResult
    (b'{"cniVersion": "1.0.0", "prevResult": []}', 4),
    (b'{"cniVersion": "1.0.0", "prevResult": {}, "socket": "relative.sock"}', 4),
    (b'{"cniVersion": "1.0.0", "prevResult": {}, "timeout": 0}', 4),
    (b'{"cniVersion": "2.0.0", "prevResult": {}}', 1),
    (b'{"cniVersion": "1.0.0", "prevResult": {"a": "\x01"}}', 4),  # raw control character
    (b'{"cniVersion": "1.0.0", "prevResult": {"a": "\\ud800"}}', 4),  # lone surrogate
])
def test_malformed_configuration_is_a_cni_error(plugin, tmp_path, stdin, code):
    rc, out, raw = asyncio.run(run_plugin(plugin, env("ADD"), stdin))
    assert rc == 1, raw
    assert out["code"] == code and out["msg"], out


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_COMMAND"])
def test_missing_environment_is_code_7(plugin, tmp_path, missing):
    rc, out, _ = asyncio.run(run_plugin(plugin, env("ADD", **{missing: None}), config(str(tmp_path / "s"))))
    assert rc == 1 and out["code"] == 7 and missing in out["details"]


def test_invalid_environment_reaching_the_daemon_is_refused(plugin, tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            return d, [await run_plugin(plugin, env("ADD", **over), config(d.path)) for over in (
                {"CNI_CONTAINERID": "../../etc/passwd"}, {"CNI_NETNS": "relative"},
                {"CNI_IFNAME": "much-too-long-interface"}, {"CNI_ARGS": "K8S_POD_NAME"})]
    d, results = asyncio.run(go())
    for rc, out, raw in results:
        assert rc == 1 and out["code"] == 7, raw
    assert d.handler.calls == [] and records(d.state) == []


def test_hostile_input_is_bounded(plugin, tmp_path):
    huge = b'{"cniVersion": "1.0.0", "prevResult": {}, "pad": "' + b"x" * (4 << 20) + b'"}'
    deep = b'{"cniVersion": "1.0.0", "prevResult": ' + b'{"a":' * 10000 + b"1" + b"}" * 10001
    started = time.monotonic()
    for stdin in (huge, deep):
        rc, out, raw = asyncio.run(run_plugin(plugin, env("ADD"), stdin))
        assert rc == 1 and out["code"] == 4, raw[:300]
    assert time.monotonic() - started < 10


def test_server_bounds_requests_and_survives_garbage(plugin, tmp_path):
    async def send(path: str, data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed before taking all of an oversized request
        reply = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return reply

    async def go():
        async with Daemon(tmp_path) as d:
            replies = [await send(d.path, payload) for payload in (
                b"\xff\xfe garbage\n", b"[1, 2]\n", b'{"command": "REBOOT"}\n',
                b'{"command": "ADD", "containerID": "a", "config": {"cniVersion": "1.0.0"}, "netns": "/n", "ifname": "eth0"}\n',
                b"x" * (cni.MAX_REQUEST + 10))]
            after = await run_plugin(plugin, env("ADD"), config(d.path))
            return d, replies, after
    d, replies, after = asyncio.run(go())
    parsed = [json.loads(r) for r in replies]
    assert [p["code"] for p in parsed] == [4, 4, 7, 4, 4]
    assert all(p["ok"] is False for p in parsed)
    assert "prevResult" in parsed[3]["details"] and "too large" in parsed[4]["msg"]
    assert after[0] == 0, "the server still answers after hostile clients"


def test_a_daemon_that_never_answers_makes_add_fail_in_time(plugin, tmp_path):
    path = str(tmp_path / "silent.sock")

    async def go():
        held: list = []

        async def hold(reader, writer):
            held.append(writer)  # read nothing, answer nothing
        server = await asyncio.start_unix_server(hold, path=path)
        try:
            t0 = time.monotonic()
            add = await run_plugin(plugin, env("ADD"), config(path, timeout=1))
            add_s = time.monotonic() - t0
            t0 = time.monotonic()
            delete = await run_plugin(plugin, env("DEL"), config(path, prev=None, timeout=1))
            return add, add_s, delete, time.monotonic() - t0
        finally:
            for w in held:
                w.close()
            server.close()
            await server.wait_closed()
    (rc, out, _), add_s, (drc, dout, _), del_s = asyncio.run(go())
    assert rc == 1 and out["code"] == 11 and "in time" in out["msg"]
    assert (drc, dout) == (0, None)
    assert 0.9 < add_s < 5 and del_s < 5


def test_a_malformed_reply_fails_add(plugin, tmp_path):
    path = str(tmp_path / "liar.sock")

    async def go():
        async def answer(reader, writer):
            await reader.readline()
            writer.write(b'{"ok": "yes"}\n')
            await writer.drain()
            writer.close()
        server = await asyncio.start_unix_server(answer, path=path)
        try:
            return await run_plugin(plugin, env("ADD"), config(path))
        finally:
            server.close()
            await server.wait_closed()
    rc, out, _ = asyncio.run(go())
    assert rc == 1 and out["code"] == 999 and "malformed" in out["msg"]


# --------------------------------------------------------------------------- the socket and the records


def test_socket_is_private_and_a_live_one_is_not_stolen(tmp_path):
    async def go():
        async with Daemon(tmp_path) as d:
            mode = stat.S_IMODE(os.stat(d.path).st_mode)
            second = CniServer(FakeHandler(d.state), d.state)
            with pytest.raises(OSError, match="another process"):
                await second.start(d.path)
        return d, mode
    d, mode = asyncio.run(go())
    assert mode == 0o600
    assert not os.path.exists(d.path), "close() removes its socket"


def test_a_stale_socket_file_is_replaced(tmp_path):
    import socket as socketlib
    path = tmp_path / "run" / "cni.sock"
    path.parent.mkdir()
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, never listening: what a killed daemon leaves

    async def go():
        async with Daemon(tmp_path) as d:
            reader, writer = await asyncio.open_unix_connection(d.path)
            writer.write(b'{"command": "DEL", "containerID": "x"}\n')
            reply = json.loads(await reader.readline())
            writer.close()
            return reply
    assert asyncio.run(go()) == {"ok": True}


def test_corrupt_records_are_skipped_and_reported(tmp_path):
    good = Sandbox("good-1", "/var/run/netns/a", "eth0", "ns", "p", ("198.18.0.4",), "aa:bb:cc:dd:ee:ff", "veth0")
    cni.save_sandbox(tmp_path, good)
    d = tmp_path / "sandboxes"
    (d / "truncated.json").write_text('{"container_id": "truncated", "ne')
    (d / "wrong-shape.json").write_text(json.dumps({"container_id": "wrong-shape"}))
    (d / "renamed.json").write_text(json.dumps(good.to_json()))  # holds another container
    (d / "bad-ip.json").write_text(json.dumps(dict(good.to_json(), container_id="bad-ip", ips=["300.1.1.1"])))
    (d / ".good-2.json.123.tmp").write_text("{")  # a crash's leftover temp file
    problems: list[str] = []
    assert load_sandboxes(tmp_path, problems) == [good]
    assert sorted(Path(p.split(":")[0]).name for p in problems) == \
        ["bad-ip.json", "renamed.json", "truncated.json", "wrong-shape.json"]
    assert load_sandboxes(tmp_path / "nothing-here") == []


def test_records_are_written_atomically(tmp_path, monkeypatch):
    sandbox = Sandbox("c1", "/n", "eth0", "", "", (), "", "")
    cni.save_sandbox(tmp_path, sandbox)
    first = (tmp_path / "sandboxes" / "c1.json").read_text()

    def crash(*a, **k):
        raise OSError("disk gone")
    monkeypatch.setattr(cni.os, "replace", crash)
    with pytest.raises(OSError):
        cni.save_sandbox(tmp_path, Sandbox("c1", "/m", "eth0", "", "", ("198.18.0.9",), "", ""))
    # The old record is intact and the temp file is gone.
    assert (tmp_path / "sandboxes" / "c1.json").read_text() == first
    assert records(tmp_path) == ["c1.json"]
    assert load_sandboxes(tmp_path) == [sandbox]


def test_requests_about_one_container_run_one_at_a_time(tmp_path):
    """A DEL that arrives while the ADD of the same sandbox is still being handled waits
    for it (the runtime may give up on a slow ADD and send DEL at once)."""
    events: list[str] = []

    class Slow(FakeHandler):
        async def add(self, sandbox):
            events.append("add-start")
            await asyncio.sleep(0.2)
            events.append("add-end")

        async def delete(self, container_id, sandbox):
            events.append(f"delete:{sandbox is not None}")

    async def go():
        server = CniServer(Slow(tmp_path), tmp_path)
        add = {"command": "ADD", "containerID": "c1", "netns": "/n", "ifname": "eth0", "args": "",
               "config": config("/unused")}
        first = asyncio.create_task(server.dispatch(add))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(server.dispatch({"command": "DEL", "containerID": "c1"}))
        third = asyncio.create_task(server.dispatch({"command": "DEL", "containerID": "c1"}))
        results = await asyncio.gather(first, second, third)
        return results, server._locks
    results, locks = asyncio.run(go())
    assert results == [{"ok": True}] * 3
    assert events == ["add-start", "add-end", "delete:True", "delete:False"]
    assert locks == {}, "no lock is kept for a container nobody asks about"
    assert records(tmp_path) == []
