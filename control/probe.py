"""Real connection probes between test hosts (DESIGN.md section 4).

A probe opens a real connection from inside a pod's network namespace to another pod's
IP: TCP succeeds when the handshake completes, UDP when the pod server's echo comes back.
Whatever lies between — a kernel bridge or mcnp daemons — decides.

``probe_many`` runs one helper process per source namespace (this file, run as a script
under ``python -I -S``, so standard-library only at the top level) that handles all of
that source's probes concurrently with asyncio; every probe is bounded in time, so a
whole matrix of pods costs about one timeout per source, run in parallel.
Self pairs are not probed here: callers skip them (rule S7).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Iterable, Sequence

PROTOCOLS = ("TCP", "UDP")
TCP_TIMEOUT = 1.0
UDP_TIMEOUT = 1.0
UDP_TRIES = 3
#: Probes in flight per source; enough for a full matrix row, gentle on the daemon.
CONCURRENCY = 128

Probe = tuple  # (src_netns, dst_ip, port, protocol)


def probe(src_netns: str, dst_ip: str, port: int, protocol: str, timeout: float = TCP_TIMEOUT) -> bool:
    """One probe: does a ``protocol`` connection from ``src_netns`` to ``dst_ip:port``
    work?"""
    return probe_many([(src_netns, dst_ip, port, protocol)], tcp_timeout=timeout, udp_timeout=timeout)[0]


def probe_many(probes: Iterable[Probe], tcp_timeout: float = TCP_TIMEOUT, udp_timeout: float = UDP_TIMEOUT,
               udp_tries: int = UDP_TRIES, concurrency: int = CONCURRENCY) -> list[bool]:
    """Run many probes in parallel (one helper per source namespace); results in the
    order given. Protocols other than TCP and UDP raise ValueError (this kernel has no
    SCTP sockets)."""
    from .testbed_net import popen_in  # here, not at the top: the helper runs stdlib-only

    probes = list(probes)
    groups: dict[str, list[int]] = {}
    for i, (src, dst, port, proto) in enumerate(probes):
        if proto not in PROTOCOLS:
            raise ValueError(f"cannot probe {proto} (only {', '.join(PROTOCOLS)})")
        groups.setdefault(src, []).append(i)
    settings = {"tcp_timeout": tcp_timeout, "udp_timeout": udp_timeout, "udp_tries": udp_tries, "concurrency": concurrency}
    helpers = {}
    for src, idx in groups.items():
        job = dict(settings, probes=[[str(probes[i][1]), int(probes[i][2]), probes[i][3]] for i in idx])
        proc = popen_in(src, [sys.executable, "-I", "-S", os.path.abspath(__file__)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The helper reads its whole job before probing, so this write cannot stall.
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        helpers[src] = proc
    results: list[bool] = [False] * len(probes)
    failed = []
    for src, proc in helpers.items():  # all are probing by now; collect in turn
        out = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait()
        if proc.returncode != 0:
            failed.append(f"{src}: {err.decode(errors='replace').strip()}")
            continue
        for i, ok in zip(groups[src], json.loads(out)):
            results[i] = bool(ok)
    if failed:
        raise RuntimeError("probe helper failed in " + "; ".join(failed))
    return results


# --------------------------------------------------------------------------- the helper


async def _tcp(ip: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def _udp(ip: str, port: int, timeout: float, tries: int) -> bool:
    loop = asyncio.get_running_loop()
    payload = b"mcnp-probe " + os.urandom(8).hex().encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect((ip, port))  # only the probed peer's answers reach this socket
        except OSError:
            return False
        for _ in range(max(1, tries)):
            try:
                await loop.sock_sendall(sock, payload)
                while True:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout / max(1, tries))
                    if data == payload:
                        return True
            except asyncio.TimeoutError:
                continue
            except ConnectionRefusedError:  # ICMP port unreachable: nobody listens
                return False
            except OSError:
                return False
    return False


async def _run(job: dict) -> list[bool]:
    limit = asyncio.Semaphore(max(1, int(job["concurrency"])))

    async def one(ip: str, port: int, proto: str) -> bool:
        async with limit:
            if proto == "TCP":
                return await _tcp(ip, port, job["tcp_timeout"])
            if proto == "UDP":
                return await _udp(ip, port, job["udp_timeout"], job["udp_tries"])
            return False

    return list(await asyncio.gather(*(one(ip, port, proto) for ip, port, proto in job["probes"])))


def _helper_main(stdin: Sequence[bytes]) -> int:
    job = json.loads(b"".join(stdin))
    print(json.dumps(asyncio.run(_run(job))))
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.stdin.buffer.readlines()))
