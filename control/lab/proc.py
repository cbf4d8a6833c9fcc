"""Processes of the test hosts: started detached inside a namespace, recorded so that
they can be stopped for certain later, and the daemons' API (over TCP inside a node's
namespace, or a unix socket)."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Optional

from control.lab.net import in_netns, popen_in, process_start_time, session_members

logger = logging.getLogger(__name__)


def log_path(state: dict, name: str) -> str:
    d = os.path.join(state["dir"], "logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name + ".log")


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip() or "(empty log)"
    except OSError:
        return "(no log)"


def start_detached(state: dict, table: str, key: str, netns: str, argv: list[str], log_name: str, stdout=None) -> subprocess.Popen:
    """Start a process in ``netns`` in a session of its own, output to a log file, and
    record it (PID and start time) before anything else can fail."""
    log = log_path(state, log_name)
    with open(log, "ab") as logf:
        proc = popen_in(netns, argv, stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else logf,
                        stderr=logf, start_new_session=True, close_fds=True)
    state[table][key] = {"pid": proc.pid, "start": process_start_time(proc.pid), "log": log, "argv": argv}
    return proc


def _members(info: dict) -> list[int]:
    """The live processes of the session ``up`` started for ``info`` (its leader and
    whatever the leader spawned, e.g. a daemon's dataplane worker). A PID now held by a
    process with another start time means our session is gone for good."""
    start = process_start_time(info["pid"])
    if start is not None and start != info.get("start"):
        return []
    return session_members(info["pid"])


def stop(procs: list[dict], grace: float) -> list[int]:
    """SIGTERM to each leader we started, then, after ``grace`` seconds, SIGKILL to
    every process left in its session. Returns the PIDs that would not die."""
    def signal_all(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(deadline: float) -> list[int]:
        while True:
            for p in procs:
                try:  # reap our own children (up and down in one process)
                    os.waitpid(p["pid"], os.WNOHANG)
                except ChildProcessError:
                    pass
            left = [pid for p in procs for pid in _members(p)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    signal_all([p["pid"] for p in procs if process_start_time(p["pid"]) == p.get("start")], signal.SIGTERM)
    left = wait(time.monotonic() + grace)
    if left:
        signal_all(left, signal.SIGKILL)
        left = wait(time.monotonic() + 2.0)
    return left


class _HTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (``unix:PATH``) or over TCP to ``HOST:PORT`` from inside
    a network namespace (a socket belongs for good to the namespace it was made in)."""

    def __init__(self, address: str, netns: Optional[str], timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._address = address
        self._netns = netns

    def connect(self) -> None:
        if self._address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self._address[len("unix:"):]
        else:
            host, _, port = self._address.rpartition(":")
            with in_netns(self._netns) if self._netns else contextlib.nullcontext():
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        self.sock.settimeout(self.timeout)
        self.sock.connect(target)


def http_get(address: str, url: str, timeout: float = 5.0, netns: Optional[str] = None):
    """``GET url`` on a daemon's API at ``address`` (``unix:PATH`` or ``HOST:PORT``,
    the latter reached from ``netns``) → (status, parsed JSON or text)."""
    conn = _HTTPConnection(address, netns, timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        body = resp.read()
    except (http.client.HTTPException, socket.timeout) as e:
        raise OSError(f"GET {url} on {address}: {e}") from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, body.decode(errors="replace")
