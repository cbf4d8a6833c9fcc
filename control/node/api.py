"""The read-only REST endpoint (aiohttp): health, sync state, policies, tables, explain,
flows, stats and Prometheus metrics.

It listens on ``HOST:PORT`` or ``unix:PATH`` — the testbed runs daemons inside node
network namespaces, where a unix socket is the simple way in. Every answer is JSON
except ``/metrics``; bad parameters get a 400 with ``{"error": ...}``. Nothing here
echoes a kubeconfig or a token: sources are described by file name only.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import web

from control.node.config import parse_listen
from control.node.metrics import CONTENT_TYPE
from control.semantics.model import PROTOCOLS
from control.semantics.reference import ReferenceEvaluator, resolve_endpoint

if TYPE_CHECKING:  # pragma: no cover
    from control.node.daemon import Daemon

logger = logging.getLogger(__name__)

DAEMON = web.AppKey("daemon", object)


def _iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _daemon(request: web.Request) -> "Daemon":
    return request.app[DAEMON]


# --------------------------------------------------------------------------- health


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    d = _daemon(request)
    if d.dataplane_failure is not None:
        return web.json_response({"ready": False, "dataplane": d.dataplane_failure}, status=503)
    waiting = d.store.not_ready
    if waiting:
        return web.json_response({"ready": False, "not_listed": waiting}, status=503)
    return web.json_response({"ready": True})


# --------------------------------------------------------------------------- state


def cluster_json(d: "Daemon", name: str) -> dict[str, Any]:
    sink = d.store.sinks[name]
    st = sink.status
    now = d.clock()
    return {
        "name": name,
        "local": st.local,
        "source": st.source,
        "synced": st.ready,
        "listed": sorted(st.listed),
        "connected": st.connected,
        "stale": st.stale,
        "unreachable_for": None if st.disconnected_since is None else round(now - st.disconnected_since, 3),
        "last_event": _iso(st.last_event),
        "events": st.events,
        "last_error": st.last_error,
        "declared_name": st.declared_name,
        "counts": {"namespaces": len(sink.namespaces), "pods": len(sink.pods), "policies": len(sink.policies)},
        "rejected": len(sink.errors) + len(sink.file_errors),
        "file_errors": dict(sink.file_errors),
    }


async def clusters(request: web.Request) -> web.Response:
    d = _daemon(request)
    snap = d.snapshot
    return web.json_response({
        "local_cluster": d.settings.local_cluster,
        "node": d.settings.node_name,
        "stale_after": d.settings.stale_after,
        "clusters": [cluster_json(d, name) for name in d.store.sinks],
        "ip_conflicts": snap.conflicts if snap else {},
    })


async def policies(request: web.Request) -> web.Response:
    """Every policy in force with whether it was accepted as written; every rejected
    object (policies, pods, namespaces, files) with why and what stands in for it."""
    d = _daemon(request)
    out = []
    for name, sink in d.store.sinks.items():
        for key, policy in sorted(sink.policies.items()):
            err = sink.errors.get(("NetworkPolicy", key, None))
            out.append({
                "cluster": name,
                "namespace": policy.namespace,
                "name": policy.name,
                "source": policy.source,
                "enforced_here": name == d.settings.local_cluster,
                "status": "rejected" if err else "accepted",
                "in_force": err.in_force if err else "as-written",
                "error": f"{err.field}: {err.message}" if err else None,
            })
    rejected = [e.to_json() for e in d.store.errors()]
    for name, sink in d.store.sinks.items():
        for path, msg in sink.file_errors.items():
            rejected.append({"cluster": name, "kind": "File", "object": path, "source": path, "field": "-",
                             "error": msg, "in_force": "last-valid"})
    return web.json_response({"policies": out, "rejected": rejected})


async def tables(request: web.Request) -> web.Response:
    d = _daemon(request)
    t = d.tables
    body: dict[str, Any] = {
        "revision": t.revision,
        "compiled_revision": t.compiled_revision,
        "compile_seconds": t.compile_seconds,
        "compiled_at": _iso(t.compiled_at),
        "compiles": t.compiles,
        "published": t.published,
        "compiler": d.compiler is not None,
        "error": t.error,
    }
    if t.tables is not None:
        body["summary"] = t.tables.summary()
        body["sizes"] = {name: list(arr.shape) for name, arr in t.tables.arrays.items()}
    return web.json_response(body)


# --------------------------------------------------------------------------- explain


def explain_params(query) -> tuple[str, str, int, str]:
    """``from``, ``to``, ``port`` and ``protocol``, checked. Raises ValueError."""
    missing = [k for k in ("from", "to", "port", "protocol") if not query.get(k)]
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(missing)} (need from, to, port, protocol)")
    try:
        port = int(query["port"])
    except ValueError:
        raise ValueError(f"port {query['port']!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    protocol = query["protocol"].upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {query['protocol']!r} is not one of {', '.join(PROTOCOLS)}")
    return query["from"], query["to"], port, protocol


async def explain(request: web.Request) -> web.Response:
    d = _daemon(request)
    try:
        src_text, dst_text, port, protocol = explain_params(request.query)
    except ValueError as e:
        return _error(400, str(e))
    snap = d.snapshot
    if snap is None:
        return _error(503, "no cluster state yet: waiting for the first list")
    try:
        src = resolve_endpoint(snap.cset, src_text)
        dst = resolve_endpoint(snap.cset, dst_text)
    except LookupError as e:
        return _error(400, str(e))
    verdict = ReferenceEvaluator(snap.cset).evaluate(src, dst, port, protocol)
    return web.json_response(verdict.to_json())


# --------------------------------------------------------------------------- dataplane


async def flows(request: web.Request) -> web.Response:
    d = _daemon(request)
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return _error(400, f"limit {request.query['limit']!r} is not a number")
    if limit < 0:
        return _error(400, "limit must not be negative")
    if d.dataplane is None:
        return web.json_response({"dataplane": False, "flows": []})
    # The dataplane answers over a pipe: ask from a thread, not on the event loop.
    found = await asyncio.get_running_loop().run_in_executor(None, d.dataplane.flows, limit)
    return web.json_response({"dataplane": True, "flows": found})


async def stats(request: web.Request) -> web.Response:
    d = _daemon(request)
    snap = d.snapshot
    body: dict[str, Any] = {
        "node": d.settings.node_name,
        "uptime": round(d.clock() - d.started_monotonic, 3),
        "revision": d.tables.revision,
        "compiled_revision": d.tables.compiled_revision,
        "compiles": d.tables.compiles,
        "pods": sum(len(s.pods) for s in d.store.sinks.values()),
        "policies": sum(len(s.policies) for s in d.store.sinks.values()),
        "rejected": len(d.store.errors()),
        "ip_conflicts": len(snap.conflicts) if snap else 0,
        "local_endpoints": sum(1 for p in snap.cset.pods() if d.local(p)) if snap else 0,
        "dataplane": None,
    }
    if d.dataplane is not None:
        body["dataplane"] = await asyncio.get_running_loop().run_in_executor(None, d.dataplane.stats)
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.get_running_loop().run_in_executor(None, _daemon(request).metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --------------------------------------------------------------------------- server


def make_app(daemon: "Daemon") -> web.Application:
    app = web.Application()
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/clusters", clusters)
    app.router.add_get("/v1/policies", policies)
    app.router.add_get("/v1/tables", tables)
    app.router.add_get("/v1/explain", explain)
    app.router.add_get("/v1/flows", flows)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/metrics", metrics)
    return app


async def start_api(daemon: "Daemon", listen: str) -> web.AppRunner:
    """Serve on ``HOST:PORT`` or ``unix:PATH``; returns the runner (``cleanup()`` stops)."""
    kind, where = parse_listen(listen)
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    if kind == "unix":
        if os.path.exists(where) and stat.S_ISSOCK(os.stat(where).st_mode):
            os.unlink(where)  # a socket left by a daemon that died
        site = web.UnixSite(runner, where)
    else:
        site = web.TCPSite(runner, where[0], where[1])
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    daemon.api_addresses = list(runner.addresses)
    logger.info("REST endpoint listening on %s", listen)
    return runner
