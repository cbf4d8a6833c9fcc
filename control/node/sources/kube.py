"""The Kubernetes source: ``kubeconfig:PATH[#CONTEXT]`` or ``in-cluster``.

Per kind, list then watch from the list's resourceVersion with bookmarks, relist on
410 Gone, exponential backoff with jitter on errors. Responses are read as raw JSON
(``_preload_content=False``): ten thousand pods through the generated model classes
take seconds. Errors name the kubeconfig file, never its contents, and pass through
:func:`~control.node.store.redact` before they are shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import aiohttp

from control.node.config import ClusterSource, Settings
from control.node.sources.supervise import Backoff, describe_error, supervise
from control.node.store import KINDS, ClusterSink

logger = logging.getLogger(__name__)


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


#: kind -> its cluster-wide collection path (list items lack ``kind``: it is stamped on).
RESOURCES = {
    "Namespace": "/api/v1/namespaces",
    "Pod": "/api/v1/pods",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/networkpolicies",
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
}
CLUSTER_PROPERTY = "/apis/about.k8s.io/v1alpha1/clusterproperties/cluster.clusterset.k8s.io"


class KubeSource:
    """List+watch Namespaces, Pods, NetworkPolicies, Services and EndpointSlices of one
    cluster (every kind the store reads)."""

    def __init__(self, spec: ClusterSource, sink: ClusterSink, settings: Settings):
        self.spec = spec
        self.sink = sink
        self.settings = settings
        self._api = None
        self.relists = {k: 0 for k in KINDS}
        self.watches = {k: 0 for k in KINDS}
        #: Where each kind's watch would resume (the last event's or bookmark's version).
        self.resource_versions: dict[str, Optional[str]] = {k: None for k in KINDS}
        self._streaming = {k: False for k in KINDS}

    async def _client(self):
        """An ApiClient from the kubeconfig or the service account. Errors name the
        file, never its contents."""
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        if self.spec.kind == "in-cluster":
            config.load_incluster_config(client_configuration=cfg)
        else:
            await config.load_kube_config(config_file=self.spec.path, context=self.spec.context,
                                          client_configuration=cfg, persist_config=False)
        return client.ApiClient(configuration=cfg)

    async def _get(self, path: str, query: dict, timeout: aiohttp.ClientTimeout):
        """A raw GET through the client's auth and TLS settings."""
        return await self._api.call_api(
            path, "GET", query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
        )

    async def run(self) -> None:
        """Follow the cluster until cancelled; a crash of this source is reported and
        the source restarted (:func:`supervise`), relisting everything."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        await supervise(self.sink, self._run_once, backoff, self._forget_versions)

    def _forget_versions(self) -> None:
        """After a crash, start over from lists: an event that broke the source is not
        replayed from the watch's resume point."""
        self.resource_versions = {k: None for k in KINDS}

    async def _run_once(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while self._api is None:
            try:
                self._api = await self._client()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any loader failure: report and retry
                self.sink.down(f"cannot load {self.spec.describe()}: {describe_error(e)}")
                await asyncio.sleep(backoff.next())
        try:
            async with asyncio.TaskGroup() as group:  # one kind failing stops the others
                for kind in KINDS:
                    group.create_task(self._list_watch(kind))
        finally:
            api, self._api = self._api, None
            await api.close()

    async def _cluster_property(self) -> None:
        """Rule M1: the ClusterProperty, when its CRD exists, must name this cluster."""
        try:
            resp = await self._get(CLUSTER_PROPERTY, {}, aiohttp.ClientTimeout(total=10))
            async with resp:
                if resp.status == 200:
                    obj = json.loads(await resp.read())
                    self.sink.set_declared_name(_property_value(obj))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.debug("Cluster %s: no ClusterProperty: %s", self.sink.name, describe_error(e))

    async def _list(self, kind: str) -> tuple[list, str]:
        items: list = []
        query: dict[str, Any] = {}
        if self.settings.list_page_size:
            query["limit"] = self.settings.list_page_size
        while True:
            resp = await self._get(RESOURCES[kind], query, aiohttp.ClientTimeout(sock_connect=10, sock_read=60))
            async with resp:
                if resp.status == 410:
                    raise Gone()
                if resp.status != 200:
                    raise RuntimeError(f"list {kind}: HTTP {resp.status} {resp.reason}")
                body = json.loads(await resp.read())
            meta = body.get("metadata") or {}
            for obj in body.get("items") or []:
                obj["kind"] = kind
                items.append((f"{self.sink.name}:{kind}", obj))
            if not meta.get("continue"):
                return items, meta.get("resourceVersion", "")
            query["continue"] = meta["continue"]

    async def _watch(self, kind: str, rv: str) -> str:
        """Follow one watch request; returns the resourceVersion to resume from."""
        timeout = self.settings.watch_timeout
        query = {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": timeout}
        resp = await self._get(RESOURCES[kind], query, aiohttp.ClientTimeout(sock_connect=10, sock_read=timeout + 30))
        async with resp:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise RuntimeError(f"watch {kind}: HTTP {resp.status} {resp.reason}")
            self.sink.up()
            self.watches[kind] += 1
            self._streaming[kind] = True
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        rv = self.resource_versions[kind] = self._event(kind, json.loads(line), rv)
        return rv

    def _event(self, kind: str, event: dict, rv: str) -> str:
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch {kind}: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        new_rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
        if etype == "BOOKMARK":
            return new_rv
        obj["kind"] = kind
        if etype == "DELETED":
            self.sink.delete(kind, obj)
        elif etype in ("ADDED", "MODIFIED"):
            self.sink.upsert(kind, obj, f"{self.sink.name}:{kind}")
        return new_rv

    async def _list_watch(self, kind: str) -> None:
        """List, then watch from the list's version for as long as it is valid.

        ``resource_versions[kind]`` is the resume point (advanced by every event and
        bookmark, None after 410 Gone: relist). A watch cut mid-stream is resumed at
        once; a request that fails waits a jittered, growing backoff and reports the
        cluster unreachable (its state stays in force)."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while True:
            self._streaming[kind] = False
            try:
                if self.resource_versions[kind] is None:
                    if kind == "Namespace":
                        await self._cluster_property()
                    items, rv = await self._list(kind)
                    self.relists[kind] += 1
                    self.sink.up()
                    self.sink.replace_kind(kind, items)
                    self.resource_versions[kind] = rv
                self.resource_versions[kind] = await self._watch(kind, self.resource_versions[kind])
                backoff.reset()
            except Gone:
                logger.info("Cluster %s: %s watch expired (410 Gone), relisting", self.sink.name, kind)
                self.resource_versions[kind] = None
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError, ValueError) as e:
                reason = f"{kind}: {describe_error(e)}"
                if self._streaming[kind] and isinstance(e, aiohttp.ClientPayloadError):
                    logger.info("Cluster %s: watch cut, resuming at %s: %s", self.sink.name, self.resource_versions[kind], reason)
                    continue  # the server was there a moment ago: resume at once
                self.sink.down(reason)
                await asyncio.sleep(backoff.next())


def _property_value(obj: dict) -> Optional[str]:
    spec = obj.get("spec") if isinstance(obj, dict) else None
    value = spec.get("value") if isinstance(spec, dict) else None
    return value if isinstance(value, str) else None
