"""The program that plays a pod's workload on the test hosts (docs/architecture.md, Test hosts).

One process per pod serves every declared container port: TCP connections are accepted
and closed at once (a completed handshake is what a probe looks for), UDP datagrams are
echoed to their sender. It runs inside the pod's network namespace, so binding the
wildcard address serves exactly the pod's IP.

Usage: ``python podserver.py TCP:80 UDP:53 ...``. Once every socket is bound it writes
``ready`` on stdout and closes it; errors go to stderr (the testbed's log file). It is
started with ``python -I -S`` and must stay standard-library only.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys

#: Datagrams larger than this are truncated on echo; probes send a few dozen bytes.
UDP_MAX = 65535


def parse(args: list[str]) -> list[tuple[str, int]]:
    ports = []
    for arg in args:
        proto, _, number = arg.partition(":")
        proto = proto.upper()
        if proto not in ("TCP", "UDP") or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise SystemExit(f"podserver: bad port {arg!r} (want TCP:N or UDP:N)")
        if (proto, int(number)) not in ports:
            ports.append((proto, int(number)))
    return ports


def bind(ports: list[tuple[str, int]]) -> selectors.BaseSelector:
    sel = selectors.DefaultSelector()
    for proto, number in ports:
        kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", number))
        if proto == "TCP":
            sock.listen(512)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, proto)
    return sel


def serve(sel: selectors.BaseSelector) -> None:
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            try:
                if key.data == "TCP":
                    conn, _ = sock.accept()
                    conn.close()
                else:
                    data, peer = sock.recvfrom(UDP_MAX)
                    sock.sendto(data, peer)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:  # e.g. ICMP errors surfacing on the UDP socket
                print(f"podserver: {key.data} port {sock.getsockname()[1]}: {e}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        sel = bind(parse(argv))
    except OSError as e:
        print(f"podserver: cannot bind: {e}", file=sys.stderr, flush=True)
        return 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    serve(sel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
