"""A wire-level fake of the Kubernetes API server's list/watch protocol, for the real
``kubernetes_asyncio`` client through a generated kubeconfig.

It serves Namespaces, Pods, NetworkPolicies, Services and EndpointSlices (cluster-wide
lists and watches) and the ClusterProperty ``cluster.clusterset.k8s.io``, and lets a
test misbehave like a real server does: resourceVersions, watch events as JSON lines,
bookmarks, history compaction (a watch from too old a version gets an ERROR event with
code 410, as the real server sends), dropped connections, slow responses and failing
requests. Requests need the bearer token of the kubeconfig, so a client that leaks or
loses it fails.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from typing import Any, Optional

from aiohttp import web

RESOURCES = {
    "/api/v1/namespaces": "Namespace",
    "/api/v1/pods": "Pod",
    "/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "/api/v1/services": "Service",
    "/apis/discovery.k8s.io/v1/endpointslices": "EndpointSlice",
}
API_VERSIONS = {"Namespace": "v1", "Pod": "v1", "NetworkPolicy": "networking.k8s.io/v1", "Service": "v1",
                "EndpointSlice": "discovery.k8s.io/v1"}
TOKEN = "fake-token-5ecret-d0-not-print"


def _key(obj: dict) -> tuple:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


class FakeApiServer:
    def __init__(self, token: str = TOKEN):
        self.token = token
        self.rv = 1000
        self.objects: dict[str, dict[tuple, dict]] = {k: {} for k in RESOURCES.values()}
        self.history: dict[str, list[tuple[int, str, dict]]] = {k: [] for k in RESOURCES.values()}
        self.oldest: dict[str, int] = {k: self.rv for k in RESOURCES.values()}
        self.watchers: dict[str, set] = {k: set() for k in RESOURCES.values()}
        self.cluster_property: Optional[str] = None
        #: Seconds to wait before answering any request.
        self.delay = 0.0
        #: The next N requests fail with HTTP 500.
        self.fail_next = 0
        #: While set, events are recorded but not sent to open watches (a partition).
        self.withhold = False
        #: Every request: (kind or path, query dict).
        self.requests: list[tuple[str, dict]] = []
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        for path in RESOURCES:
            app.router.add_get(path, self._collection)
        app.router.add_get("/apis/about.k8s.io/v1alpha1/clusterproperties/{name}", self._property)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port or 0, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Go away like a crashed server: open watches are cut, new connections refused."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_kubeconfig(self, path: str, context: str = "fake") -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake-user"}}],
        }
        with open(path, "w") as f:
            json.dump(config, f)
        os.chmod(path, 0o600)
        return path

    # ------------------------------------------------------------------ mutations

    def _emit(self, kind: str, etype: str, obj: dict) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        obj["kind"], obj["apiVersion"] = kind, API_VERSIONS[kind]
        if etype == "DELETED":
            self.objects[kind].pop(_key(obj), None)
        else:
            self.objects[kind][_key(obj)] = obj
        self.history[kind].append((self.rv, etype, obj))
        for queue in () if self.withhold else self.watchers[kind]:
            queue.put_nowait({"type": etype, "object": obj})

    def apply(self, obj: dict) -> None:
        kind = obj["kind"]
        etype = "MODIFIED" if _key(obj) in self.objects[kind] else "ADDED"
        self._emit(kind, etype, obj)

    def delete(self, obj: dict) -> None:
        self._emit(obj["kind"], "DELETED", self.objects[obj["kind"]][_key(obj)])

    def compact(self) -> None:
        """Forget the event history: watches from older versions get 410 Gone."""
        for kind in self.history:
            self.history[kind].clear()
            self.oldest[kind] = self.rv

    def bookmark(self) -> None:
        """Send every watcher that asked for bookmarks the current resourceVersion."""
        for kind, queues in self.watchers.items():
            for queue in queues:
                if queue.bookmarks:
                    queue.put_nowait({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": API_VERSIONS[kind],
                                                                       "metadata": {"resourceVersion": str(self.rv)}}})

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream."""
        for queues in self.watchers.values():
            for queue in queues:
                queue.put_nowait(None)

    @property
    def open_watches(self) -> int:
        return sum(len(q) for q in self.watchers.values())

    # ------------------------------------------------------------------ handlers

    async def _gate(self, request: web.Request, what: str) -> Optional[web.Response]:
        self.requests.append((what, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"kind": "Status", "code": 500, "reason": "InternalError"}, status=500)
        return None

    async def _property(self, request: web.Request) -> web.StreamResponse:
        denied = await self._gate(request, "ClusterProperty")
        if denied is not None:
            return denied
        if request.match_info["name"] != "cluster.clusterset.k8s.io" or self.cluster_property is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response({"apiVersion": "about.k8s.io/v1alpha1", "kind": "ClusterProperty",
                                  "metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": self.cluster_property}})

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        kind = RESOURCES[request.path]
        denied = await self._gate(request, kind)
        if denied is not None:
            return denied
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, kind)
        items = [self._list_item(o) for _, o in sorted(self.objects[kind].items())]
        limit = int(request.query.get("limit") or 0)
        start = int(request.query.get("continue") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if limit:
            if start + limit < len(items):
                meta["continue"] = str(start + limit)
            items = items[start:start + limit]
        return web.json_response({"kind": f"{kind}List", "apiVersion": API_VERSIONS[kind], "metadata": meta, "items": items})

    @staticmethod
    def _list_item(obj: dict) -> dict:
        item = dict(obj)  # list items carry no kind/apiVersion, as on a real server
        item.pop("kind", None)
        item.pop("apiVersion", None)
        return item

    async def _watch(self, request: web.Request, kind: str) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.rv)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if since < self.oldest[kind]:
            gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "Expired", "code": 410, "message": f"too old resource version: {since}"}}
            await resp.write(json.dumps(gone).encode() + b"\n")
            await resp.write_eof()
            return resp
        queue: asyncio.Queue = asyncio.Queue()
        queue.bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        for rv, etype, obj in self.history[kind]:
            if rv > since:
                queue.put_nowait({"type": etype, "object": obj})
        self.watchers[kind].add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if event is None:  # dropped: cut the connection without ending the stream
                    if request.transport is not None:
                        request.transport.close()
                    return resp
                await resp.write(json.dumps(event).encode() + b"\n")
            await resp.write_eof()
        finally:
            self.watchers[kind].discard(queue)
        return resp
