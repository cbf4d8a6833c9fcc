"""Real connection probes between test hosts (docs/architecture.md, Test hosts).

A probe opens a real connection from inside a pod's network namespace to another pod's
IP: TCP succeeds when the handshake completes, UDP when the pod server's echo comes back.
Whatever lies between — a kernel bridge or mcnp daemons — decides.

A socket belongs for good to the namespace it was created in, so one thread can probe
from every pod: it switches into the source namespace only for ``socket()``, then drives
all the connections from one asyncio loop. No helper processes: a matrix of thirty pods
(870 probes per protocol) costs about one timeout, not thirty interpreter start-ups
competing for the CPU while their timeouts run. The loop runs in a thread of its own,
so the caller's thread never changes namespace and callers inside an event loop work.
Self pairs are not probed here: callers skip them (rule S7).

Sources are pod namespaces or node namespaces (the node's own traffic to its pods,
rule S10); destinations are any address, a pod's or a Service's ClusterIP (kube-proxy's
translation in the source's node decides where it lands). ``on_testbed`` turns pod
references and node keys of a running testbed into such probes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ipaddress
import logging
import threading
from typing import Iterable, Mapping

from control.lab.net import open_netns
from fastpath.netns import Namespace

logger = logging.getLogger(__name__)

PROTOCOLS = ("TCP", "UDP")
TCP_TIMEOUT = 1.0
UDP_TIMEOUT = 1.0
UDP_TRIES = 3
#: Probes in flight at once: each holds a socket; enough for a matrix row per pod.
CONCURRENCY = 256

Probe = tuple  # (src_netns, dst_ip, port, protocol)


def on_testbed(state: Mapping, probes: Iterable[tuple]) -> list[Probe]:
    """Probes from (source, destination, port, protocol) where the source is a pod
    reference ("cluster/ns/pod") or a node key ("cluster/node") of the testbed and the
    destination a pod reference, a node key or an IP address (e.g. a ClusterIP).
    An unknown name raises LookupError."""
    def netns(name: str) -> str:
        rec = state["pods"].get(name) or state["nodes"].get(name)
        if rec is None:
            raise LookupError(f"no pod or node {name!r} on the testbed")
        return rec["netns"]

    def address(name: str) -> str:
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            pass
        if name in state["pods"]:
            return state["pods"][name]["ip"]
        if name in state["nodes"]:
            return state["nodes"][name]["address"]
        raise LookupError(f"no pod or node {name!r} on the testbed, and not an IP address")

    return [(netns(src), address(dst), int(port), str(proto)) for src, dst, port, proto in probes]


def probe(src_netns: str, dst_ip: str, port: int, protocol: str, timeout: float = TCP_TIMEOUT) -> bool:
    """One probe: does a ``protocol`` connection from ``src_netns`` to ``dst_ip:port``
    work within ``timeout`` seconds?"""
    return probe_many([(src_netns, dst_ip, port, protocol)], tcp_timeout=timeout, udp_timeout=timeout)[0]


def probe_many(probes: Iterable[Probe], tcp_timeout: float = TCP_TIMEOUT, udp_timeout: float = UDP_TIMEOUT,
               udp_tries: int = UDP_TRIES, concurrency: int = CONCURRENCY) -> list[bool]:
    """Run many probes concurrently; results in the order given. TCP waits up to
    ``tcp_timeout`` for the handshake; UDP sends up to ``udp_tries`` datagrams within
    ``udp_timeout``. Protocols other than TCP and UDP raise ValueError (this kernel has
    no SCTP sockets); a missing namespace raises NetError."""
    probes = [(str(src), str(dst), int(port), str(proto)) for src, dst, port, proto in probes]
    for _, _, _, proto in probes:
        if proto not in PROTOCOLS:
            raise ValueError(f"cannot probe {proto} (only {', '.join(PROTOCOLS)})")
    outcome: dict = {}

    def run() -> None:
        try:
            with _Namespaces() as spaces:
                outcome["results"] = asyncio.run(_run_all(spaces, probes, tcp_timeout, udp_timeout, udp_tries, concurrency))
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="mcnp-probe")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["results"]


class _Namespaces:
    """Makes sockets in named namespaces from the current thread (which must be one of
    probe_many's own: it is switched and switched back)."""

    def __init__(self):
        self._spaces: dict[str, Namespace] = {}

    def __enter__(self) -> "_Namespaces":
        return self

    def __exit__(self, *exc) -> None:
        for space in self._spaces.values():
            space.close()

    def socket(self, netns: str, kind: int) -> socket.socket:
        space = self._spaces.get(netns)
        if space is None:
            space = self._spaces[netns] = open_netns(netns)
        with space.entered():
            sock = socket.socket(socket.AF_INET, kind)
        sock.setblocking(False)
        return sock


async def _run_all(spaces: _Namespaces, probes: list, tcp_timeout: float, udp_timeout: float, udp_tries: int, concurrency: int) -> list[bool]:
    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(src: str, ip: str, port: int, proto: str) -> bool:
        async with limit:
            if proto == "TCP":
                return await _tcp(spaces.socket(src, socket.SOCK_STREAM), ip, port, tcp_timeout)
            return await _udp(spaces.socket(src, socket.SOCK_DGRAM), ip, port, udp_timeout, udp_tries)

    return list(await asyncio.gather(*(one(*p) for p in probes)))


async def _tcp(sock: socket.socket, ip: str, port: int, timeout: float) -> bool:
    with sock:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
        except (OSError, asyncio.TimeoutError):
            return False
        return True


async def _udp(sock: socket.socket, ip: str, port: int, timeout: float, tries: int) -> bool:
    loop = asyncio.get_running_loop()
    payload = b"mcnp-probe " + os.urandom(8).hex().encode()
    tries = max(1, tries)
    with sock:
        try:
            sock.connect((ip, port))  # only the probed peer's datagrams reach this socket
            for _ in range(tries):
                await loop.sock_sendall(sock, payload)
                try:
                    while await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout / tries) != payload:
                        pass
                    return True
                except asyncio.TimeoutError:
                    continue
        except OSError:  # ICMP port unreachable (ECONNREFUSED), no route, ...
            return False
    return False
