"""Network-namespace primitives for the test hosts (docs/architecture.md, Test hosts).

Everything here works on the namespaces `ip netns` lists (files under /var/run/netns).
Links are made with ``ip -batch`` — one process for hundreds of commands — because
building a testbed of thirty pods one ``ip`` call at a time takes many seconds.

Processes are started *inside* a namespace by switching the calling thread into it
(``setns``, through :mod:`fastpath.netns`, the one place that calls it) around ``Popen``:
the child inherits the thread's network namespace but keeps the mount namespace, which
matters because ``ip netns exec`` remounts /sys and hides bpffs from the daemon
(docs/dataplane.md, Kernel facts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from typing import Iterable, Iterator, Optional

from fastpath.netns import NETNS_DIR, Namespace

logger = logging.getLogger(__name__)

#: Longest name a file under /var/run/netns may have.
_NAME_MAX = 255


class NetError(RuntimeError):
    """An ``ip`` command or a namespace switch failed; the message says which."""


def open_netns(name: str) -> Namespace:
    """Open the namespace ``name`` that ``ip netns`` lists; a missing one is a NetError
    that names it."""
    try:
        return Namespace.from_name(name)
    except OSError as e:
        raise NetError(f"network namespace {name!r} does not exist ({e.strerror})") from None


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name``; sockets made
    and processes started in the body belong to it. Always switches back."""
    with open_netns(name) as space, space.entered():
        yield


def list_netns() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def ip_batch(commands: Iterable[str], netns: Optional[str] = None, force: bool = False) -> None:
    """Run ``ip`` commands in one process (in ``netns`` when given). Without ``force``
    the first failing command stops the batch and raises; with it every command is
    tried and failures are only logged (used for teardown)."""
    lines = [c for c in commands if c]
    if not lines:
        return
    argv = ["ip"]
    if netns:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip().replace("\n", "; ")
        where = f" in {netns}" if netns else ""
        if force:
            logger.debug("ip -batch%s reported errors: %s", where, detail)
            return
        raise NetError(f"ip -batch{where} failed: {detail}")


def write_sysctl(netns: str, settings: dict[str, str]) -> None:
    """Write ``net.*`` sysctls of one namespace (/proc/sys/net follows the writer's
    namespace)."""
    with in_netns(netns):
        for key, value in settings.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)


def popen_in(netns: str, argv: list[str], **kwargs) -> subprocess.Popen:
    """Start ``argv`` inside ``netns`` (see the module docstring for why not
    ``ip netns exec``)."""
    with in_netns(netns):
        return subprocess.Popen(argv, **kwargs)


def netns_name(prefix: str, *parts: str) -> str:
    """A namespace name from object names. Kubernetes names never contain ``_``, so
    joining with it is unambiguous; names too long for a file are shortened with a
    hash."""
    name = prefix + "_".join(parts)
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name[: _NAME_MAX - 13] + "-" + digest
    return name


def process_start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat: with the PID it identifies one process for good, so a
    reused PID is never mistaken for ours. None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``. A session's ID is its leader's
    PID, and the kernel does not hand that PID out again while any member lives, so
    these are exactly the processes a leader we started left behind."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members
