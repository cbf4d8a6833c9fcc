"""Network namespace helpers for privileged tests: hosts built and always torn down.

Everything made here is named ``mcnpt-<pid>-<tag>`` so parallel runs do not collide
and leftovers are easy to attribute.  Namespaces are the ones ``ip netns`` lists
(under /var/run/netns).  Use the context managers; they clean up in ``finally``
even when the test fails.

* :func:`netns` - create a namespace (with ``lo`` up), delete it afterwards.
* :func:`veth_pair` - a veth pair with each end moved into a namespace.
* :func:`in_netns` - run Python code in another namespace (this thread only),
  via :mod:`fastpath.netns` (the one place that calls ``setns(2)``).  Sockets,
  AF_XDP sockets and XDP attachments made inside stay in that namespace after
  returning.  Unlike ``ip netns exec``, this does not remount /sys, so bpffs
  mounts stay visible.
* :func:`ip` / :func:`run_in` - run ``ip`` or any command inside a namespace
  (``nsenter --net=``, which keeps the mount namespace as is).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess

from fastpath.netns import NETNS_DIR, Namespace

PREFIX = f"mcnpt-{os.getpid()}-"
_counter = itertools.count()


def is_root() -> bool:
    """Whether this process can build namespaces (tests skip otherwise)."""
    return os.geteuid() == 0


def unique_name(tag: str) -> str:
    """A namespace name unique to this process: ``mcnpt-<pid>-<tag><n>``."""
    return f"{PREFIX}{tag}{next(_counter)}"


def unique_ifname(tag: str) -> str:
    """An interface name (<= 15 chars) unique within this process."""
    return f"{tag[:6]}{os.getpid() % 10000}x{next(_counter)}"[:15]


def _run(cmd: list[str], check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` in namespace ns (None: the current one)."""
    cmd = ["ip", *args] if ns is None else ["ip", "-n", ns, *args]
    return _run(cmd, check=check)


def run_in(ns: str, cmd: list[str], check: bool = True, timeout: float = 10):
    """Run a command inside namespace ns, keeping the mount namespace (bpffs)."""
    return _run(["nsenter", f"--net={NETNS_DIR}/{ns}", *cmd], check=check, timeout=timeout)


def popen_in(ns: str, cmd: list[str], **kw) -> subprocess.Popen:
    """Start a command inside namespace ns; the caller kills it by its PID."""
    return subprocess.Popen(["nsenter", f"--net={NETNS_DIR}/{ns}", *cmd], **kw)


def create_netns(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def delete_netns(name: str) -> None:
    """Delete a namespace; its interfaces (and veth peers elsewhere) go with it."""
    ip("netns", "del", name, check=False)


@contextlib.contextmanager
def netns(tag: str = "ns"):
    """Yield the name of a fresh namespace; delete it on exit, whatever happens."""
    name = unique_name(tag)
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


def veth_pair(name_a: str, ns_a: str, name_b: str, ns_b: str, mtu: int = 1500,
              up: bool = True) -> None:
    """Create veth name_a<->name_b with name_a in ns_a and name_b in ns_b.

    Deleting either namespace deletes the pair.  Keep mtu <= 3506 when XDP
    will run on either end.
    """
    tmp_a, tmp_b = unique_ifname("va"), unique_ifname("vb")
    ip("link", "add", tmp_a, "mtu", str(mtu), "type", "veth", "peer", "name", tmp_b,
       "mtu", str(mtu))
    try:
        ip("link", "set", tmp_a, "netns", ns_a)
        ip("link", "set", tmp_b, "netns", ns_b)
    except Exception:
        ip("link", "del", tmp_a, check=False)
        raise
    ip("link", "set", tmp_a, "name", name_a, ns=ns_a)
    ip("link", "set", tmp_b, "name", name_b, ns=ns_b)
    if up:
        ip("link", "set", name_a, "up", ns=ns_a)
        ip("link", "set", name_b, "up", ns=ns_b)


def add_address(ns: str, ifname: str, cidr: str) -> None:
    """Add an address; the tests use 198.18.0.0/15 only, on-link, no routes out."""
    ip("addr", "add", cidr, "dev", ifname, ns=ns)


@contextlib.contextmanager
def in_netns(name: str):
    """Switch this thread into namespace ``name``; always switch back."""
    with Namespace.from_name(name) as space, space.entered():
        yield


def echo_ok(conn, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
    """Send ``payload`` on a connected TCP socket and whether the same bytes came back
    within ``timeout`` (an echo server at the other end)."""
    conn.settimeout(timeout)
    try:
        conn.sendall(payload)
        return conn.recv(64) == payload
    except OSError:
        return False


@contextlib.contextmanager
def socket_in_slot(kern, slot: int = 0):
    """An AF_XDP socket of this process in ``kern``'s socket map at ``slot`` (a veth of
    its own, in a namespace of its own): a hook of that slot sees its daemon present."""
    from fastpath import rings

    with netns("xsk") as ns:
        veth_pair("x0", ns, "x1", ns)
        with rings.Umem(frames=128, ring_size=64) as umem:
            with in_netns(ns):
                port = rings.Port(umem, "x0", fill=16)
            try:
                kern.register(slot, port.fd)
                yield port
            finally:
                kern.unregister(slot)
                port.close()
