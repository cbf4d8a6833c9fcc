"""The read-only REST endpoint (aiohttp): health, sync state, policies, tables, explain,
flows, verdicts, the reachability matrix, Prometheus metrics and the live page.

It listens on ``HOST:PORT`` or ``unix:PATH`` — the testbed runs daemons inside node
network namespaces, where a unix socket is the simple way in. Every answer is JSON
except ``/metrics`` and the page's assets, errors included: unknown paths get a JSON
404, unknown query parameters a 400 naming them, bad values a 400 with
``{"error": ...}``. Nothing here echoes a kubeconfig or a token: sources are described
by file name only.

The endpoint answers ``explain`` for any pair, so it belongs on loopback or a unix
socket; a listener beyond loopback is logged as a warning. Prometheus can scrape a
separate metrics-only listener (setting ``metrics-listen``) that serves nothing else.
A client must send its request headers within ``HEADER_TIMEOUT`` seconds of
connecting (or of its previous answer): half-sent requests cannot hold connections.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import stat
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Optional

from aiohttp import web

from control.node.config import parse_listen
from control.compile.matrix import compiled_matrix
from control.node.metrics import CONTENT_TYPE
from control.node.verdicts import CAPACITY, Filters, FilterError, VerdictFeed
from control.semantics.model import PROTOCOLS
from control.semantics import audit
from control.semantics.reference import resolve_endpoint

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
    scope = d.settings.audit
    out = []
    for name, sink in d.store.sinks.items():
        for key, policy in sorted(sink.policies.items()):
            err = sink.errors.get(("NetworkPolicy", key, None))
            audit_by = scope.by(policy)
            out.append({
                "cluster": name,
                "namespace": policy.namespace,
                "name": policy.name,
                "source": policy.source,
                "enforced_here": name == d.settings.local_cluster,
                "status": "rejected" if err else "accepted",
                "in_force": err.in_force if err else "as-written",
                "error": f"{err.field}: {err.message}" if err else None,
                "audit": audit_by is not None,
                "audit_by": audit_by,
            })
    rejected = [e.to_json() for e in d.store.errors()]
    for name, sink in d.store.sinks.items():
        for path, msg in sink.file_errors.items():
            rejected.append({"cluster": name, "kind": "File", "object": path, "source": path, "field": "-",
                             "error": msg, "in_force": "last-valid"})
    return web.json_response({"policies": out, "rejected": rejected, "audit_setting": scope.to_json()})


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
    # audit mode: the second tables (every policy) the packet loop judges new flows with
    body["audit"] = t.audit_tables.summary() if t.audit_tables is not None else None
    return web.json_response(body)


# --------------------------------------------------------------------------- explain


def explain_params(query) -> tuple[str, str, int, str]:
    """``from``, ``to``, ``port`` and ``protocol``, checked. Raises ValueError."""
    missing = [k for k in ("from", "to", "port", "protocol") if not query.get(k)]
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(missing)} (need from, to, port, protocol)")
    port, protocol = _port_param(query["port"]), _protocol_param(query["protocol"])
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
    return web.json_response(audit.explain(snap.cset, d.settings.audit, src, dst, port, protocol))


# --------------------------------------------------------------------------- dataplane


def _limit(query, default: int, most: int) -> int:
    """``limit``, checked: a number in 0..``most``. Raises ValueError."""
    text = query.get("limit", str(default))
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(f"limit {text!r} is not a number") from None
    if not 0 <= limit <= most:
        raise ValueError(f"limit must be between 0 and {most}")
    return limit


async def _listing(request: web.Request, field: str) -> web.Response:
    d = _daemon(request)
    try:
        limit = _limit(request.query, 1000, 1_000_000)
    except ValueError as e:
        return _error(400, str(e))
    if d.dataplane is None:
        return web.json_response({"dataplane": False, field: []})
    # The dataplane answers over a pipe: ask from a thread, not on the event loop.
    found = await asyncio.get_running_loop().run_in_executor(None, getattr(d.dataplane, field), limit)
    return web.json_response({"dataplane": True, field: found})


async def flows(request: web.Request) -> web.Response:
    return await _listing(request, "flows")


async def classes(request: web.Request) -> web.Response:
    return await _listing(request, "classes")


def _feed(request: web.Request) -> VerdictFeed:
    return request.app[FEED]


async def verdicts(request: web.Request) -> web.StreamResponse:
    """Recent verdicts (allowed, denied, would-deny) with pods, reason and deciding
    policy, filtered; with ``follow=true`` a stream of JSON lines that stays open."""
    d, feed = _daemon(request), _feed(request)
    try:
        filters = Filters.parse(request.query, time.time())
        limit = _limit(request.query, 100, feed.records.maxlen or CAPACITY)
        follow = _flag(request.query, "follow")
    except (FilterError, ValueError) as e:
        return _error(400, str(e))
    found = feed.query(filters, limit)
    if not follow:
        return web.json_response({
            "dataplane": d.dataplane is not None, "recording": feed.recording, "last_seq": feed.last_seq,
            "lost": feed.lost, "error": feed.error, "verdicts": found})
    return await _follow(request, feed, filters, found)


async def _follow(request: web.Request, feed: VerdictFeed, filters: Filters, backlog: list) -> web.StreamResponse:
    """Chunked JSON lines: the backlog, then each new matching record as it is read.
    An empty line every ``FOLLOW_HEARTBEAT`` seconds tells the client the node is there."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    after = feed.last_seq
    try:
        for rec in backlog:
            await resp.write(json.dumps(rec).encode() + b"\n")
        while True:
            if not await feed.wait(after, FOLLOW_HEARTBEAT):
                await resp.write(b"\n")
                continue
            news = feed.query(replace(filters, after=after), feed.records.maxlen or CAPACITY)
            after = feed.last_seq
            if news:
                await resp.write(b"".join(json.dumps(r).encode() + b"\n" for r in news))
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client went away, or the daemon stops
    return resp


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


# --------------------------------------------------------------------------- matrix


async def matrix(request: web.Request) -> web.Response:
    """The reachability matrix of the pods of chosen namespaces of chosen clusters, as
    ``mcnp matrix`` computes it (the compiled engine), over the state in force."""
    d = _daemon(request)
    snap = d.snapshot
    if snap is None:
        return _error(503, "no cluster state yet: waiting for the first list")
    try:
        port = _port_param(request.query.get("port", "80"))
        protocol = _protocol_param(request.query.get("protocol", "TCP"))
        pods = _matrix_pods(snap.cset, _csv(request.query.get("cluster")), _csv(request.query.get("namespace")))
    except ValueError as e:
        return _error(400, str(e))
    values = await asyncio.get_running_loop().run_in_executor(
        None, compiled_matrix, snap.cset, pods, pods, port, protocol)
    return web.json_response({
        "revision": snap.revision, "port": port, "protocol": protocol,
        "namespaces": sorted({f"{p.cluster}/{p.namespace}" for p in snap.cset.pods() if p.can_take_part}),
        "pods": [p.ref for p in pods], "allowed": values.tolist(),
    })


def _csv(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _matrix_pods(cset, clusters: list[str], namespaces: list[str]) -> list:
    """Pods of ``clusters`` (all when empty) in ``namespaces`` (``ns`` or ``cluster/ns``;
    all when empty). Raises ValueError for unknown names or too many pods."""
    unknown = [c for c in clusters if c not in cset.clusters]
    if unknown:
        raise ValueError(f"no cluster {', '.join(unknown)} is loaded (clusters: {', '.join(sorted(cset.clusters))})")

    def wanted(p) -> bool:
        if clusters and p.cluster not in clusters:
            return False
        return not namespaces or p.namespace in namespaces or f"{p.cluster}/{p.namespace}" in namespaces

    pods = sorted((p for p in cset.pods() if p.can_take_part and wanted(p)), key=lambda p: p.ref)
    if len(pods) > MATRIX_MAX_PODS:
        raise ValueError(f"{len(pods)} pods selected; choose clusters or namespaces to show at most {MATRIX_MAX_PODS}")
    return pods


def _port_param(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def _protocol_param(text: str) -> str:
    protocol = text.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {text!r} is not one of {', '.join(PROTOCOLS)}")
    return protocol


def _flag(query, name: str) -> bool:
    text = query.get(name, "false").lower()
    if text not in ("1", "true", "yes", "0", "false", "no", ""):
        raise ValueError(f"{name} {query[name]!r} is not true or false")
    return text in ("1", "true", "yes")


# --------------------------------------------------------------------------- the page


async def page(request: web.Request) -> web.StreamResponse:
    """The live page's assets, served from the package (no build step, nothing from the
    network)."""
    name = request.match_info.get("name") or "index.html"
    kind = PAGE_ASSETS.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    return web.FileResponse(os.path.join(PAGE_DIR, name), headers={"Content-Type": kind, "Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- server

#: Seconds a client has to send its request headers (after connecting, or after its
#: previous answer on a kept-alive connection) before the connection is closed.
HEADER_TIMEOUT = 5.0
#: Seconds between the empty lines that keep a followed verdict stream alive.
FOLLOW_HEARTBEAT = 10.0
#: Most pods the page's matrix shows at once.
MATRIX_MAX_PODS = 400
PAGE_DIR = os.path.join(os.path.dirname(__file__), "page")
PAGE_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
               "style.css": "text/css; charset=utf-8"}
FEED = web.AppKey("feed", VerdictFeed)

#: path -> (handler, accepted query parameters)
ROUTES: dict[str, tuple[Any, frozenset]] = {
    "/healthz": (healthz, frozenset()),
    "/readyz": (readyz, frozenset()),
    "/v1/clusters": (clusters, frozenset()),
    "/v1/policies": (policies, frozenset()),
    "/v1/tables": (tables, frozenset()),
    "/v1/explain": (explain, frozenset({"from", "to", "port", "protocol"})),
    "/v1/flows": (flows, frozenset({"limit"})),
    "/v1/classes": (classes, frozenset({"limit"})),
    "/v1/verdicts": (verdicts, frozenset({"verdict", "pod", "namespace", "cluster", "since", "after", "limit", "follow"})),
    "/v1/matrix": (matrix, frozenset({"cluster", "namespace", "port", "protocol"})),
    "/v1/stats": (stats, frozenset()),
    "/metrics": (metrics, frozenset()),
    "/": (page, frozenset()),
    "/ui/{name}": (page, frozenset()),
}
METRICS_ROUTES = ("/healthz", "/metrics")


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """JSON everywhere: unknown parameters are a 400 naming them; 404, 405 and any
    other HTTP error become ``{"error": ...}``."""
    route = request.match_info.route.resource
    accepted = request.app[ACCEPTED].get(route.canonical if route is not None else "", frozenset())
    unknown = sorted(set(request.query) - accepted)
    if route is not None and unknown:
        return _error(400, f"unknown query parameter(s) {', '.join(unknown)}; {request.path} accepts "
                           f"{', '.join(sorted(accepted)) or 'none'}")
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        what = f"no such endpoint: {request.path}" if e.status == 404 else e.reason
        return _error(e.status, what)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 - a bug answers JSON too, and is logged
        logger.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(e).__name__}")


ACCEPTED = web.AppKey("accepted", dict)


def make_app(daemon: "Daemon", paths: Optional[Iterable[str]] = None) -> web.Application:
    """The REST application; ``paths`` limits it to some routes (the metrics listener)."""
    app = web.Application(middlewares=[json_errors])
    app[DAEMON] = daemon
    app[FEED] = VerdictFeed(daemon)
    chosen = {p: ROUTES[p] for p in (paths or ROUTES)}
    app[ACCEPTED] = {p: accepted for p, (_, accepted) in chosen.items()}
    for path, (handler, _) in chosen.items():
        app.router.add_get(path, handler)
    return app


class ApiServer:
    """The running listeners (REST, and metrics when configured) and the verdict feed.
    ``cleanup()`` stops all of them."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.tasks: list[asyncio.Task] = []

    async def add(self, app: web.Application, listen: str) -> list:
        kind, where = parse_listen(listen)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=HEADER_TIMEOUT, shutdown_timeout=1.0)
        await runner.setup()
        self.runners.append(runner)
        if kind == "unix":
            if os.path.exists(where) and stat.S_ISSOCK(os.stat(where).st_mode):
                os.unlink(where)  # a socket left by a daemon that died
            site = web.UnixSite(runner, where)
        else:
            site = web.TCPSite(runner, where[0], where[1])
            if not _loopback(where[0]):
                logger.warning("%s listens on %s, beyond loopback: anyone who reaches it can read the "
                               "cluster state", "The metrics endpoint" if app[ACCEPTED].keys() <= set(METRICS_ROUTES)
                               else "The REST endpoint (explain, policies, verdicts)", listen)
        await site.start()
        return list(runner.addresses)

    async def cleanup(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


async def start_api(daemon: "Daemon", listen: str) -> ApiServer:
    """Serve on ``HOST:PORT`` or ``unix:PATH`` (and the metrics-only listener when
    ``metrics-listen`` is set); returns the server (``cleanup()`` stops it)."""
    server = ApiServer()
    app = make_app(daemon)
    try:
        daemon.api_addresses = await server.add(app, listen)
        metrics_listen = getattr(daemon.settings, "metrics_listen", None)
        if metrics_listen:
            daemon.metrics_addresses = await server.add(make_app(daemon, METRICS_ROUTES), metrics_listen)
            logger.info("Metrics endpoint listening on %s", metrics_listen)
    except OSError:
        await server.cleanup()
        raise
    feed = app[FEED]
    daemon.verdict_feed = feed
    server.tasks.append(asyncio.create_task(feed.run(), name="verdict-feed"))
    logger.info("REST endpoint listening on %s", listen)
    return server
