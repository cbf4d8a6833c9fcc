"""``mcnp observe``: follow a node's verdicts, as ``hubble observe`` follows Cilium's.

A plain HTTP client of the node's REST endpoint (``HOST:PORT`` or ``unix:PATH``): it
asks ``/v1/verdicts`` with the chosen filters and ``follow=true`` and prints each JSON
line as it comes — as one line for people, or unchanged with ``--json``. The node
sends an empty line every few seconds, so a node that went away is noticed within
``READ_TIMEOUT`` seconds. Exit codes: 0 when the stream ends (or ``--no-follow``), 1
when the node cannot be reached or stops answering, 2 when it refuses the filters.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import sys
import urllib.parse
from typing import Any, Iterator

from control.node.config import parse_listen
from control.node.verdicts import describe

logger = logging.getLogger(__name__)

#: Seconds without a byte from the node (records or its heartbeat lines) before giving up.
READ_TIMEOUT = 30.0


class NodeError(Exception):
    """The node cannot be reached, or answered with an error (``status``)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def connection(node: str, timeout: float = READ_TIMEOUT) -> http.client.HTTPConnection:
    """An HTTP connection to ``HOST:PORT`` or ``unix:PATH``."""
    try:
        kind, where = parse_listen(node)
    except ValueError as e:
        raise NodeError(f"--node {e}", 400) from None
    if kind == "unix":
        return _UnixConnection(where, timeout)
    return http.client.HTTPConnection(where[0], where[1], timeout=timeout)


def stream(node: str, params: dict[str, Any]) -> Iterator[dict]:
    """Records from ``/v1/verdicts`` (followed when ``params`` say so), as dicts."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "", [])})
    conn = connection(node)
    try:
        try:
            conn.request("GET", f"/v1/verdicts?{query}", headers={"Accept": "application/x-ndjson, application/json"})
            resp = conn.getresponse()
        except OSError as e:
            raise NodeError(f"cannot reach the node's REST endpoint at {node}: {e}") from None
        if resp.status != 200:
            try:
                message = json.loads(resp.read()).get("error", resp.reason)
            except ValueError:
                message = resp.reason
            raise NodeError(f"{node}: {message}", resp.status)
        if not resp.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            body = json.loads(resp.read())
            if not body.get("dataplane"):
                logger.warning("%s runs no packet loop (--no-dataplane): it records no verdicts", node)
            yield from body.get("verdicts", [])
            return
        while True:
            try:
                line = resp.readline()
            except OSError as e:  # socket.timeout included
                raise NodeError(f"{node} stopped answering: {e}") from None
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    finally:
        conn.close()


def observe(args) -> int:
    params = {
        "verdict": ",".join(args.verdict), "pod": args.pod, "namespace": args.namespace, "cluster": args.cluster,
        "since": args.since, "limit": args.last, "follow": "true" if args.follow else None,
    }
    try:
        for rec in stream(args.node, params):
            print(json.dumps(rec) if args.json else describe(rec), flush=True)
    except NodeError as e:
        print(f"mcnp observe: {e}", file=sys.stderr)
        return 2 if e.status == 400 else 1
    return 0
