"""Cluster sources: where the store's objects come from.

* :class:`DirSource` — ``dir:PATH``, a manifest directory checked for changes (stat
  signatures, content hash of changed files) when inotify says something happened in
  it, and every ``dir_rescan_interval`` anyway; where inotify is unavailable (not
  Linux, no instances left, a filesystem without it) every ``dir_poll_interval``.
  Files are parsed off the event loop; unchanged files keep their very same parsed
  dicts, so the store skips them. A file that cannot be parsed keeps its last parsed
  contents (rule S9) and is reported.
* :class:`KubeSource` — ``kubeconfig:PATH[#CONTEXT]`` or ``in-cluster``: per kind, list
  then watch from the list's resourceVersion with bookmarks, relist on 410 Gone,
  exponential backoff with jitter on errors. Responses are read as raw JSON
  (``_preload_content=False``): ten thousand pods through the generated model classes
  take seconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import json
import logging
import os
import random
import struct
import sys
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp

from control.semantics import manifests
from control.node.config import ClusterSource, Settings
from control.semantics.model import InvalidObject
from control.node.store import KINDS, ClusterSink, DocDiff

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- directories


@dataclass
class _File:
    signature: tuple
    digest: bytes
    docs: list  # [(source, obj)]
    error: Optional[str] = None


# inotify(7): what wakes a directory check. A file written in place wakes on close, a
# file renamed over another (how editors and kubectl-like tools write) on the move.
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x100, 0x200, 0x400, 0x800, 0x8000
_WATCH_MASK = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_libc = None


class DirWatch:
    """inotify on one directory (Linux, through ctypes): a file descriptor that turns
    readable when something in the directory changes. :meth:`open` returns None where
    inotify is unavailable; the caller then polls."""

    def __init__(self, fd: int):
        self.fd = fd
        #: False once the directory itself went away (deleted, moved, unmounted).
        self.alive = True

    @classmethod
    def open(cls, path: str) -> Optional["DirWatch"]:
        global _libc
        if not sys.platform.startswith("linux"):
            return None
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError) as e:
            logger.debug("inotify unavailable: %s", e)
            return None
        if fd < 0:
            logger.debug("inotify_init1: %s", os.strerror(ctypes.get_errno()))
            return None
        if _libc.inotify_add_watch(fd, os.fsencode(path), _WATCH_MASK) < 0:
            logger.debug("inotify_add_watch %s: %s", path, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> int:
        """Read every pending event; returns how many there were."""
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.alive = False
                return count
            if not data:
                return count
            pos = 0
            while pos + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size + length
                count += 1
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    self.alive = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirSource:
    """A manifest directory. :meth:`poll` is synchronous and may run in a thread;
    :meth:`run` checks the directory whenever inotify reports a change (at most
    ``rescan`` seconds apart; every ``interval`` seconds without inotify) and feeds
    the sink on the event loop."""

    def __init__(self, spec: ClusterSource, sink: ClusterSink, interval: float = 0.25,
                 rescan: Optional[float] = 1.0, watch: bool = True):
        self.spec = spec
        self.path = spec.path or ""
        self.sink = sink
        self.interval = interval
        self.rescan = rescan if rescan is not None else interval
        self.watch = watch
        self._files: dict[str, _File] = {}
        self._listing: Optional[tuple] = None
        self.reloads = 0
        self.diff: Optional[DocDiff] = None
        #: Directory checks by cause: inotify event, timer.
        self.wakeups = {"inotify": 0, "timer": 0}
        self._watch: Optional[DirWatch] = None
        self._woken: Optional[asyncio.Event] = None

    def _signatures(self) -> dict[str, tuple]:
        out = {}
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.endswith(manifests.SUFFIXES) and not entry.name.startswith(".") and entry.is_file():
                    st = entry.stat()
                    out[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def poll(self) -> Optional[list]:
        """Check the directory. Returns every document when something changed (for
        :meth:`ClusterSink.replace_all`), None when nothing did. Raises OSError when
        the directory cannot be read."""
        sigs = self._signatures()
        listing = tuple(sorted(sigs.items()))
        if listing == self._listing:
            return None
        self._listing = listing
        changed = set(self._files) - set(sigs)
        gone: list = []  # documents no longer there (kept alive until the sink saw them)
        for path in list(changed):
            gone.extend(self._files.pop(path).docs)
        added: list = []
        for path, sig in sigs.items():
            old = self._files.get(path)
            if old is not None and old.signature == sig:
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:  # vanished between scandir and open: next poll sees it
                logger.debug("Directory %s: %s", self.path, e)
                self._listing = None
                continue
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if old is not None and old.digest == digest:
                old.signature = sig
                continue
            changed.add(path)
            try:
                docs = [(d.source, d.obj) for d in manifests.read_file(path)]
                self._files[path] = _File(sig, digest, docs)
                added.extend(docs)
                gone.extend(old.docs if old else ())
            except InvalidObject as err:
                # Rule S9 at file level: what the file said last stays in force.
                logger.warning("Cluster %s: %s", self.sink.name, err)
                self._files[path] = _File(sig, digest, old.docs if old else [], str(err))
        if not changed and self.reloads:
            return None
        self.reloads += 1
        #: What this reload changed, for :meth:`ClusterSink.replace_all`.
        self.diff = DocDiff(self.reloads - 1 if self.reloads > 1 else None, self.reloads, added, gone)
        return [doc for path in sorted(self._files) for doc in self._files[path].docs]

    @property
    def file_errors(self) -> dict[str, str]:
        return {p: f.error for p, f in self._files.items() if f.error}

    async def step(self) -> None:
        """One poll, parsed in a worker thread, applied on the event loop."""
        loop = asyncio.get_running_loop()
        try:
            docs = await loop.run_in_executor(None, self.poll)
        except OSError as e:
            self.sink.down(f"directory {self.path}: {e.strerror or e}")
            self._listing = None
            return
        self.sink.up()
        self.sink.file_errors = self.file_errors
        if docs is not None:
            self.sink.replace_all(docs, self.diff)
            self.diff = None  # let the gone documents go

    @property
    def watched(self) -> bool:
        """Whether inotify is following the directory now."""
        return self._watch is not None and self._watch.alive

    def _ensure_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow the directory with inotify when possible (again after it was
        replaced): set up before a check, so nothing between the two is missed."""
        if not self.watch or self.watched:
            return
        self._drop_watch(loop)
        self._watch = DirWatch.open(self.path)
        if self._watch is not None:
            loop.add_reader(self._watch.fd, self._on_event)

    def _drop_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is not None:
            loop.remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None

    def _on_event(self) -> None:
        if self._watch is not None and self._watch.drain() and self._woken is not None:
            self._woken.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._woken = asyncio.Event()
        try:
            while True:
                self._ensure_watch(loop)
                self._woken.clear()
                await self.step()
                if self._woken.is_set():
                    self.wakeups["inotify"] += 1
                    continue  # changed again while it was read
                try:
                    await asyncio.wait_for(self._woken.wait(), self.rescan if self.watched else self.interval)
                    self.wakeups["inotify"] += 1
                except asyncio.TimeoutError:
                    self.wakeups["timer"] += 1
        finally:
            self._drop_watch(loop)


# --------------------------------------------------------------------------- Kubernetes


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


class Backoff:
    """Exponential backoff with full jitter, so many nodes do not reconnect in step."""

    def __init__(self, initial: float, maximum: float, rng: Optional[random.Random] = None):
        self.initial, self.maximum = initial, maximum
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


#: kind -> (collection path, ``kind`` to stamp on list items, which lack it).
RESOURCES = {
    "Namespace": "/api/v1/namespaces",
    "Pod": "/api/v1/pods",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/networkpolicies",
}
CLUSTER_PROPERTY = "/apis/about.k8s.io/v1alpha1/clusterproperties/cluster.clusterset.k8s.io"


class KubeSource:
    """List+watch Namespaces, Pods and NetworkPolicies of one cluster."""

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
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while self._api is None:
            try:
                self._api = await self._client()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any loader failure: report and retry
                self.sink.down(f"cannot load {self.spec.describe()}: {type(e).__name__}: {_first_line(e)}")
                await asyncio.sleep(backoff.next())
        try:
            await asyncio.gather(*(self._list_watch(kind) for kind in KINDS))
        finally:
            await self._api.close()

    async def _cluster_property(self) -> None:
        """Rule M1: the ClusterProperty, when its CRD exists, must name this cluster."""
        try:
            resp = await self._get(CLUSTER_PROPERTY, {}, aiohttp.ClientTimeout(total=10))
            async with resp:
                if resp.status == 200:
                    obj = json.loads(await resp.read())
                    self.sink.set_declared_name(_property_value(obj))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.debug("Cluster %s: no ClusterProperty: %s", self.sink.name, e)

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
                reason = f"{kind}: {type(e).__name__}: {_first_line(e)}"
                if self._streaming[kind] and isinstance(e, aiohttp.ClientPayloadError):
                    logger.info("Cluster %s: watch cut, resuming at %s: %s", self.sink.name, self.resource_versions[kind], reason)
                    continue  # the server was there a moment ago: resume at once
                self.sink.down(reason)
                await asyncio.sleep(backoff.next())


def _property_value(obj: dict) -> Optional[str]:
    spec = obj.get("spec") if isinstance(obj, dict) else None
    value = spec.get("value") if isinstance(spec, dict) else None
    return value if isinstance(value, str) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def make_source(spec: ClusterSource, sink: ClusterSink, settings: Settings):
    if spec.kind == "dir":
        return DirSource(spec, sink, settings.dir_poll_interval, settings.dir_rescan_interval, settings.dir_watch)
    return KubeSource(spec, sink, settings)
