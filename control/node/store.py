"""The cluster state store: what every source has told us, validated, in force.

Sources (``control.node.sources``) feed raw Kubernetes objects into one
:class:`ClusterSink` per cluster — whole lists (a relist, a directory reload) or single
watch events. The store parses each object once (an object whose raw dict is the very
same as before is not parsed again), applies rule S9 to the invalid ones and keeps
per-cluster sync status. :meth:`Store.snapshot` hands the compiler and the explain
endpoint an immutable view: a :class:`~control.semantics.model.ClusterSet` of shallow copies.

Rule S9 here: a changed policy, Service or EndpointSlice that became invalid keeps its
last valid version; a new invalid one is replaced by its fail-closed stand-in
(``objects.STAND_INS``: a policy that isolates and admits nothing, a Service whose
addresses reach no endpoint, a slice that leaves its Service none); invalid pods and
namespaces keep their last valid version or, when new, take no part. Every rejected
object stays listed in ``errors`` until it is fixed or deleted.

Change tracking: between two snapshots the store records what changed (pods by
reference, namespaces, policies, and whether anything wider did: a cluster revoked or
back, see :class:`Changes`), so the compiler can follow with the cheapest correct
recompile instead of a full one (Services and EndpointSlices are not compiled: a change
of theirs is noted per cluster, for whoever derives the Service addresses). Rule M8 conflicts are kept per address as pods come
and go, not recomputed over every pod per snapshot.

Rule M9: a remote cluster that cannot be reached keeps its last-known state in force
(fail-static) until ``stale_after`` (when set) revokes it: its objects then vanish from
snapshots, so its pods are unknown addresses that only ipBlock peers can match. The
local cluster is never revoked: dropping its policies would fail open.
"""

from __future__ import annotations

import logging
import re
import time
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from control.semantics import objects
from control.semantics.model import ClusterSet, ClusterState, InvalidObject, Options

logger = logging.getLogger(__name__)

KINDS = tuple(objects.PARSERS)


@dataclass
class ObjectError:
    """An object the store rejected, and what is in force instead."""

    cluster: str
    kind: str
    key: str  # namespace/name, or name for namespaces
    source: str
    field: str
    message: str
    in_force: str  # "last-valid", "fail-closed", "existing" (a duplicate's) or "none"
    #: "invalid", or "duplicate": another source's object of that name is in force or,
    #: when none was yet, the name fails closed until only one source claims it.
    reason: str = "invalid"

    def to_json(self) -> dict:
        return {
            "cluster": self.cluster, "kind": self.kind, "object": self.key, "source": self.source,
            "field": self.field, "error": self.message, "in_force": self.in_force, "reason": self.reason,
        }


@dataclass
class Changes:
    """What changed in force between two :meth:`Store.take_changes` calls.

    ``pods`` are pod references (``cluster/namespace/name``), ``namespaces``
    ``(cluster, name)`` pairs, ``policies`` policy references, ``services`` the names of
    the clusters whose Services or EndpointSlices changed. ``everything`` says that
    something not listed per object changed (a cluster revoked by ``stale-after`` or
    back, the first lists): only a full recompile is correct then."""

    pods: set = field(default_factory=set)
    namespaces: set = field(default_factory=set)
    policies: set = field(default_factory=set)
    services: set = field(default_factory=set)
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(self.everything or self.pods or self.namespaces or self.policies or self.services)

    def merge(self, other: "Changes") -> None:
        self.pods |= other.pods
        self.namespaces |= other.namespaces
        self.policies |= other.policies
        self.services |= other.services
        self.everything |= other.everything

    def summary(self) -> dict:
        return {"pods": len(self.pods), "namespaces": len(self.namespaces), "policies": len(self.policies),
                "services": len(self.services), "everything": self.everything}


@dataclass
class DocDiff:
    """What a source's reload changed since its previous one: the documents that are
    new (``added``) and those no longer there (``gone``), as ``(source, object)``;
    ``since``/``until`` number the two reloads, so a sink can tell that the
    difference follows on what it saw last."""

    since: Optional[int]
    until: int
    added: list
    gone: list


@dataclass
class ClusterStatus:
    """Sync state of one cluster, for ``/v1/clusters``, ``/readyz`` and metrics."""

    name: str
    source: str
    local: bool
    listed: set = field(default_factory=set)  # kinds listed at least once
    connected: bool = False
    disconnected_since: Optional[float] = None  # store clock
    stale: bool = False
    last_event: Optional[float] = None  # wall clock
    last_error: Optional[str] = None
    events: int = 0
    declared_name: Optional[str] = None
    #: Why the source itself stopped (a watcher that crashed and is being restarted);
    #: None while it runs. A cluster whose source failed is not ready.
    source_failure: Optional[str] = None
    #: How many times the source was restarted after a failure.
    source_restarts: int = 0

    @property
    def ready(self) -> bool:
        """Every kind listed and the source running: ``/readyz`` is 503 otherwise."""
        return self.source_failure is None and all(k in self.listed for k in KINDS)


_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+")
_SECRET_VALUE = re.compile(
    r"(?i)\b([\w-]*(?:password|passwd|secret|token|api[_-]?key|credential|key-data)s?)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;&)}\]]+")


def redact(text: str) -> str:
    """``text`` with credentials masked: the userinfo of URLs (``https://user:pw@host``),
    ``Bearer``/``Basic`` values and ``password=``/``token: ``-like assignments. Every
    error the store shows (``last_error``, the log) passes through here: an error from a
    kubeconfig loader or an HTTP library may quote what it failed on."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _AUTH_SCHEME.sub(r"\1\2***", text)
    return _SECRET_VALUE.sub(r"\1\2***", text)


def _file_of(source: str) -> str:
    """The file part of a document's source (``path#index[item]`` → ``path``)."""
    return source.split("#", 1)[0]


def _is_mapping(value: Any) -> bool:
    # Parsed JSON and YAML are plain dicts; the ABC check is the slow path.
    return type(value) is dict or isinstance(value, Mapping)


def _key(kind: str, obj: Mapping[str, Any]) -> Optional[tuple]:
    meta = obj.get("metadata") if _is_mapping(obj) else None
    if not _is_mapping(meta) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    if kind == "Namespace":
        return (meta["name"],)
    ns = meta.get("namespace") or "default"
    return (ns if isinstance(ns, str) else str(ns), meta["name"])


def _in_force(kind: str) -> property:
    """A sink's objects of ``kind`` in force (a table of its :class:`ClusterState`)."""
    return property(lambda sink: sink.state.table(kind), doc=f"The {kind} objects in force, by key.")


class ClusterSink:
    """One cluster's objects and status; the interface sources write to."""

    def __init__(self, store: "Store", name: str, source: str, local: bool):
        self.store = store
        self.name = name
        self.status = ClusterStatus(name, source, local)
        self.raw: dict[str, dict[tuple, tuple[str, Any]]] = {k: {} for k in KINDS}
        #: The objects in force, per kind (namespaces keyed by name, the others by
        #: namespace and name), as a :class:`ClusterState` shows them.
        self.state = ClusterState(name)
        #: For the kinds with fail-closed stand-ins: the last valid version of each.
        self.last_valid: dict[str, dict[tuple[str, str], Any]] = {k: {} for k in objects.STAND_INS}
        self.errors: dict[tuple, ObjectError] = {}
        #: Manifest files that cannot be parsed (their last parsed contents stay in force).
        self.file_errors: dict[str, str] = {}
        #: The documents of the last directory reload: id of object → (source, object).
        self._last_docs: Optional[dict[int, tuple[str, Any]]] = None
        #: ``DocDiff.until`` of the last reload (None: it came without a difference).
        self._diff_token: Optional[int] = None
        #: Per kind, the objects of the last complete list: id → (source, key).
        self._listed: dict[str, dict[int, tuple[str, tuple]]] = {}

    # ------------------------------------------------------------------ objects

    namespaces = _in_force("Namespace")
    pods = _in_force("Pod")
    policies = _in_force("NetworkPolicy")
    services = _in_force("Service")
    endpoint_slices = _in_force("EndpointSlice")

    def _table(self, kind: str) -> dict:
        return self.state.table(kind)

    def _apply(self, kind: str, obj: Mapping[str, Any], source: str, key: Optional[tuple] = None) -> bool:
        """Parse and install one object. Returns whether anything in force changed."""
        key = key or _key(kind, obj)
        if key is None:
            err = InvalidObject(source, objects.describe(obj), "metadata.name", "is required")
            self.errors[(kind, None, source)] = ObjectError(self.name, kind, "?", source, err.field, err.message, "none")
            logger.warning("Cluster %s: rejected %s", self.name, err)
            return False
        prev = self.raw[kind].get(key)
        if prev is not None and prev[1] is obj and prev[0] == source:
            return False  # the very same object as before: nothing to parse
        self.raw[kind][key] = (source, obj)
        table = self._table(kind)
        tkey = key[0] if kind == "Namespace" else key
        try:
            value = objects.PARSERS[kind](obj, self.name, source)
        except InvalidObject as err:
            return self._reject(kind, key, tkey, obj, source, err)
        self.errors.pop((kind, key, None), None)
        if kind in self.last_valid:
            self.last_valid[kind][tkey] = value
        if table.get(tkey) == value:
            return False
        table[tkey] = value
        self._record(kind, tkey)
        return True

    def _reject(self, kind: str, key: tuple, tkey: Any, obj: Mapping, source: str, err: InvalidObject) -> bool:
        """Rule S9 for one invalid object."""
        logger.warning("Cluster %s: rejected %s", self.name, err)
        table = self._table(kind)
        changed = False
        last_valid = self.last_valid.get(kind, {})
        if tkey in last_valid:
            in_force = "last-valid"
            if table.get(tkey) is not last_valid[tkey]:
                table[tkey] = last_valid[tkey]
                self._record(kind, tkey)
                changed = True
        elif kind in objects.STAND_INS:
            stand_in = objects.STAND_INS[kind](obj, self.name, source, err)
            in_force = "fail-closed" if stand_in is not None else "none"
            if stand_in is not None and table.get(tkey) != stand_in:
                table[tkey] = stand_in
                self._record(kind, tkey)
                changed = True
        else:
            in_force = "last-valid" if tkey in table else "none"
        self.errors[(kind, key, None)] = ObjectError(self.name, kind, "/".join(key), source, err.field, err.message, in_force)
        return changed

    def _remove(self, kind: str, key: tuple) -> bool:
        self.raw[kind].pop(key, None)
        self.errors.pop((kind, key, None), None)
        tkey = key[0] if kind == "Namespace" else key
        if kind in self.last_valid:
            self.last_valid[kind].pop(tkey, None)
        if tkey not in self._table(kind):
            return False
        self._record(kind, tkey)
        del self._table(kind)[tkey]
        return True

    def _record(self, kind: str, tkey: Any) -> None:
        """Note a change in force (before it is made: a pod's old addresses are read)."""
        changes = self.store.pending
        if kind == "Pod":
            ref = f"{self.name}/{tkey[0]}/{tkey[1]}"
            changes.pods.add(ref)
            self.store.addresses.forget(ref)
        elif kind == "Namespace":
            changes.namespaces.add((self.name, tkey))
        elif kind == "NetworkPolicy":
            changes.policies.add(f"{self.name}/{tkey[0]}/{tkey[1]}")
        else:
            changes.services.add(self.name)

    def _touch(self, changed: bool) -> None:
        self.status.events += 1
        self.status.last_event = time.time()
        if changed:
            self.store.changed()

    # ------------------------------------------------------------------ source API

    def upsert(self, kind: str, obj: Mapping[str, Any], source: str = "") -> None:
        """A watch ADDED/MODIFIED event."""
        self._touch(self._apply(kind, obj, source or f"{self.name}:{kind}"))

    def delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        """A watch DELETED event."""
        key = _key(kind, obj)
        self._touch(key is not None and self._remove(kind, key))

    def replace_kind(self, kind: str, items: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """A complete list of one kind (a relist): objects absent from it are deleted.
        A name claimed by several objects (several files of a directory) is resolved by
        :meth:`_resolve_duplicates`, whatever order the objects come in."""
        changed = False
        # Errors of unnamed or duplicate objects are keyed by source: a full list
        # re-reports those still there (and logs only those that are new).
        before = {e: self.errors.pop(e) for e in [e for e in self.errors if e[0] == kind and e[1] is None]}
        known = self._listed.get(kind, {})
        listed: dict[int, tuple[str, tuple]] = {}
        raw = self.raw[kind]
        claims: dict[tuple, list[tuple[str, Any]]] = {}
        for source, obj in items:
            # The very object of the last list, still in force: no need to look at it (a
            # directory reload hands back every unchanged file's objects so).
            hit = known.get(id(obj))
            if hit is not None and hit[0] == source and raw.get(hit[1], (None, None))[1] is obj:
                key = hit[1]
            else:
                key = _key(kind, obj)
            if key is None:
                changed |= self._apply(kind, obj, source)  # reported as unnamed
            else:
                claims.setdefault(key, []).append((source, obj))
        for key, claimants in claims.items():
            if len(claimants) == 1:
                source, obj = claimants[0]
                listed[id(obj)] = (source, key)
                changed |= self._apply(kind, obj, source, key)
            else:
                changed |= self._resolve_duplicates(kind, key, claimants, listed)
        for ekey, err in self.errors.items():
            if ekey[0] == kind and ekey[1] is None and before.get(ekey) != err:
                logger.warning("Cluster %s: %s %s from %s: %s", self.name, kind, err.key, err.source, err.message)
        self._listed[kind] = listed
        for key in [k for k in raw if k not in claims]:
            changed |= self._remove(kind, key)
        if kind not in self.status.listed:
            self.status.listed.add(kind)
            self.store.pending.everything = True
            changed = True  # readiness changed: a snapshot must say so
        self._touch(changed)

    def _resolve_duplicates(self, kind: str, key: tuple, claimants: list, listed: dict) -> bool:
        """Several objects of one kind and name. The one already in force stays (its
        file's copy, or one equal to it) and the others are reported and ignored; when
        none was in force (a cold start), the name fails closed as rule S9 has a new
        invalid object do, until a single source claims it. Returns whether anything
        in force changed."""
        incumbent = self._incumbent(kind, key, claimants)
        name = "/".join(key)
        if incumbent is not None:
            source, obj = incumbent
            listed[id(obj)] = (source, key)
            changed = self._apply(kind, obj, source, key)
            message, in_force = f"duplicate of the object in force from {source}: ignored", "existing"
        else:
            sources = ", ".join(sorted(s for s, _ in claimants))
            message = f"claimed by {len(claimants)} objects ({sources}), none in force before: fails closed until one is left"
            changed, in_force = self._fail_closed_duplicates(kind, key, claimants, message)
        for source, obj in claimants:
            if incumbent is None or source != incumbent[0] or obj is not incumbent[1]:
                self.errors[(kind, None, source)] = ObjectError(self.name, kind, name, source, "metadata.name",
                                                                message, in_force, "duplicate")
        return changed

    def _incumbent(self, kind: str, key: tuple, claimants: list) -> Optional[tuple[str, Any]]:
        """Which of ``claimants`` is the object in force under ``key``, if any."""
        prev = self.raw[kind].get(key)
        if prev is None:
            return None
        same_file = [c for c in claimants if _file_of(c[0]) == _file_of(prev[0])]
        if len(same_file) == 1:
            return same_file[0]
        equal = sorted((c for c in claimants if c[1] == prev[1]), key=itemgetter(0))
        return equal[0] if equal else None

    def _fail_closed_duplicates(self, kind: str, key: tuple, claimants: list, message: str) -> tuple[bool, str]:
        """No claimant of ``key`` is in force: policies, Services and EndpointSlices get
        a stand-in that fails closed (``objects.DUPLICATE_STAND_INS``); pods and
        namespaces take no part."""
        tkey = key[0] if kind == "Namespace" else key
        changed = self._remove(kind, key)
        if kind not in objects.DUPLICATE_STAND_INS:
            return changed, "none"
        first_source = min(s for s, _ in claimants)
        stand_in = objects.DUPLICATE_STAND_INS[kind]([o for _, o in claimants], self.name, first_source, message)
        if stand_in is None:
            return changed, "none"
        self._record(kind, tkey)
        self._table(kind)[tkey] = stand_in
        return True, "fail-closed"

    def replace_all(self, docs: Iterable[tuple[str, Mapping[str, Any]]], diff: Optional["DocDiff"] = None) -> None:
        """A complete set of every kind (a manifest directory reload). Other kinds are
        ignored; a ClusterProperty is checked against the configured name (rule M1).

        ``diff``, when the source knows it, says which documents differ from those of
        its previous reload, so that a reload of a few changed files costs in
        proportion to them, not to the whole directory. It is used only when it
        follows on the reload this sink saw last (its ``since`` is that reload's
        ``until``); otherwise the difference is found by identity."""
        docs = docs if isinstance(docs, list) else list(docs)
        previous = self._last_docs
        if diff is not None and diff.since is not None and diff.since == self._diff_token and previous is not None:
            # The source's difference applied to the map of the last reload. The
            # objects it names are alive (the source holds the gone ones until this
            # call returns), so no id among them was reused.
            current = previous
            gone = [current.pop(id(obj)) for _, obj in diff.gone if id(obj) in current]
            added = [doc for doc in diff.added if id(doc[1]) not in current]
            current.update((id(doc[1]), doc) for doc in added)
        else:
            current = dict(zip(map(id, map(itemgetter(1), docs)), docs))
            added = gone = None
        self._diff_token = diff.until if diff is not None else None
        self._last_docs = current
        if previous is not None and self._reload_by_difference(docs, current, previous, added, gone):
            return
        by_kind: dict[str, list] = {k: [] for k in KINDS}
        declared = None
        for source, obj in docs:
            kind = obj.get("kind") if _is_mapping(obj) else None
            if kind in by_kind:
                by_kind[kind].append((source, obj))
            elif kind == "ClusterProperty":
                try:
                    declared = objects.cluster_property_value(obj, source) or declared
                except InvalidObject as err:
                    self.status.last_error = str(err)
        self.set_declared_name(declared)
        with self.store.batch():  # one change notification, one recompile per reload
            for kind in KINDS:
                self.replace_kind(kind, by_kind[kind])

    def _reload_by_difference(self, docs: list, current: dict, previous: dict,
                              added: Optional[list], gone: Optional[list]) -> bool:
        """A directory reload where few objects changed: apply just those (a reload
        hands back every unchanged file's very same objects, so identity tells them
        apart without looking at each). ``current`` maps the id of each object of
        ``docs`` to its document, ``previous`` the same for the last reload (it may be
        ``current`` itself, updated in place); ``added`` and ``gone``, when known, are
        the difference. Returns False, having done nothing, when the full path is
        needed: a ClusterProperty or unknown object among the differences, a name two
        objects claim, or pending duplicate errors."""
        if len(current) != len(docs) or not all(k in self.status.listed for k in KINDS):
            return False
        if added is None or gone is None:
            added = [current[i] for i in current.keys() - previous.keys()]
            gone = [previous[i] for i in previous.keys() - current.keys()]
        if len(added) + len(gone) > 64 or any(e[1] is None for e in self.errors):
            return False
        plan = []
        for source, obj in added + gone:
            kind = obj.get("kind") if _is_mapping(obj) else None
            key = _key(kind, obj) if kind in KINDS else None
            if key is None:
                return False
            plan.append((kind, key, source, obj))
        added_keys = {(kind, key) for kind, key, _, _ in plan[: len(added)]}
        if len(added_keys) != len(added):
            return False
        for kind, key, source, obj in plan[: len(added)]:
            prev = self.raw[kind].get(key)
            if prev is not None and id(prev[1]) in current:
                return False  # another object still listed has that name: a duplicate
        changed = False
        with self.store.batch():
            for kind, key, source, obj in plan[len(added):]:
                if (kind, key) not in added_keys:
                    changed |= self._remove(kind, key)
            for kind, key, source, obj in plan[: len(added)]:
                changed |= self._apply(kind, obj, source, key)
            self._touch(changed)
        return True

    def set_declared_name(self, value: Optional[str]) -> None:
        """Rule M1: a ClusterProperty naming another cluster is an error we report."""
        self.status.declared_name = value
        if value is not None and value != self.name:
            self.status.last_error = f"ClusterProperty cluster.clusterset.k8s.io declares {value!r} but the cluster is configured as {self.name!r}"
            logger.error("Cluster %s: %s", self.name, self.status.last_error)

    def up(self) -> None:
        """The source reached its cluster (a list or watch request succeeded)."""
        st = self.status
        if st.source_failure is not None:
            st.source_failure = None
            self.store.changed()  # ready again
        if not st.connected or st.stale:
            logger.info("Cluster %s: connected", self.name)
        was_stale = st.stale
        st.connected, st.disconnected_since, st.stale = True, None, False
        if was_stale:
            self.store.pending.everything = True
            self.store.changed()

    def failed(self, reason: str) -> None:
        """The source itself broke (not its cluster): it is restarted, the cluster is
        not ready until it runs again, and its last-known state stays in force."""
        reason = redact(reason)
        self.status.source_failure = self.status.last_error = reason
        self.status.source_restarts += 1
        logger.error("Cluster %s: source failed, restarting it (the last-known state stays in force): %s",
                     self.name, reason)
        self.store.changed()  # readiness changed

    def down(self, error: str) -> None:
        """The source lost its cluster; its state stays in force (fail-static)."""
        st = self.status
        error = redact(error)
        if st.connected or st.last_error != error:
            if st.listed:
                logger.warning("Cluster %s: unreachable, keeping its last-known state: %s", self.name, error)
            else:
                logger.warning("Cluster %s: unreachable, nothing known of it yet: %s", self.name, error)
        st.connected, st.last_error = False, error
        if st.disconnected_since is None:
            st.disconnected_since = self.store.clock()

    def error_list(self) -> list[ObjectError]:
        return list(self.errors.values())


@dataclass
class Snapshot:
    """An immutable view for one compile: the objects in force and what is wrong."""

    revision: int
    cset: ClusterSet
    conflicts: dict[str, list[str]]  # ip -> pod references of several clusters (rule M8)
    store_version: int = 0  # Store.version it was taken at


class Store:
    """Every cluster's sink, change notification and snapshots."""

    def __init__(self, options: Options = Options(), stale_after: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, on_change: Optional[Callable[[], None]] = None):
        self.options = options
        self.stale_after = stale_after
        self.clock = clock
        self.on_change = on_change
        self.sinks: dict[str, ClusterSink] = {}
        self.version = 0  # bumped on every change in force
        #: Changes since the last :meth:`take_changes`.
        self.pending = Changes(everything=True)
        #: Rule M8: which pods claim each address (kept as pods change).
        self.addresses = _Addresses(self.sinks)
        self._batch_depth = 0
        self._batch_dirty = False
        #: Whether the last change notification came from a whole batch (a directory
        #: reload: everything the source read is in), which needs no coalescing wait.
        self.last_change_whole = False

    def add_cluster(self, name: str, source: str = "", local: bool = False) -> ClusterSink:
        sink = ClusterSink(self, name, source, local)
        self.sinks[name] = sink
        return sink

    def changed(self) -> None:
        self.version += 1
        if self._batch_depth:
            self._batch_dirty = True
        else:
            self.last_change_whole = False
            if self.on_change is not None:
                self.on_change()

    def batch(self):
        """Context manager folding the change notifications inside it into one."""
        store = self

        class _Batch:
            def __enter__(self):
                store._batch_depth += 1

            def __exit__(self, *exc):
                store._batch_depth -= 1
                if not store._batch_depth and store._batch_dirty:
                    store._batch_dirty = False
                    store.last_change_whole = True
                    if store.on_change is not None:
                        store.on_change()

        return _Batch()

    # ------------------------------------------------------------------ status

    @property
    def not_ready(self) -> list[str]:
        return [name for name, s in self.sinks.items() if not s.status.ready]

    def check_stale(self) -> Optional[float]:
        """Revoke remote clusters unreachable for ``stale_after`` (rule M9). Returns the
        seconds until the next one would become stale, None when none is pending."""
        if self.stale_after is None:
            return None
        now = self.clock()
        next_due = None
        for sink in self.sinks.values():
            st = sink.status
            if st.local or st.stale or st.disconnected_since is None:
                continue
            left = st.disconnected_since + self.stale_after - now
            if left <= 0:
                st.stale = True
                self.pending.everything = True
                logger.warning("Cluster %s: unreachable for %.0fs, its state is revoked (stale-after)", sink.name, now - st.disconnected_since)
                self.changed()
            else:
                next_due = left if next_due is None else min(next_due, left)
        return next_due

    def take_changes(self) -> Changes:
        """The changes since the last call (the first call reports ``everything``)."""
        changes, self.pending = self.pending, Changes()
        return changes

    def snapshot(self, revision: int) -> Snapshot:
        cset = ClusterSet(options=self.options)
        for name, sink in self.sinks.items():
            if sink.status.stale:
                cset.clusters[name] = ClusterState(name)
            else:
                cset.clusters[name] = ClusterState(name, dict(sink.namespaces), dict(sink.pods), dict(sink.policies),
                                                   dict(sink.services), dict(sink.endpoint_slices))
        return Snapshot(revision, cset, self.addresses.conflicts(cset), self.version)

    def errors(self) -> list[ObjectError]:
        """Every rejected object (invalid or duplicate), for REST and metrics."""
        return [e for sink in self.sinks.values() for e in sink.error_list()]


class _Addresses:
    """Address → the pods claiming it, followed pod by pod, so that a snapshot finds
    the rule M8 conflicts without walking every pod: a pod that changes is forgotten
    and learnt again, from the store, at the next snapshot."""

    def __init__(self, sinks: dict[str, ClusterSink]):
        self.sinks = sinks
        self.owners: dict[Any, set[str]] = {}
        self.claims: dict[str, tuple] = {}  # ref -> the addresses it claims
        self.shared: set = set()  # addresses with more than one owner
        self.unlearned: set[str] = set()

    def forget(self, ref: str) -> None:
        self.unlearned.add(ref)
        for ip in self.claims.pop(ref, ()):
            owners = self.owners.get(ip)
            if owners is not None:
                owners.discard(ref)
                if len(owners) < 2:
                    self.shared.discard(ip)
                if not owners:
                    del self.owners[ip]

    def conflicts(self, cset: ClusterSet) -> dict[str, list[str]]:
        """Rule M8 over the pods in force in ``cset`` (revoked clusters have none)."""
        for ref in self.unlearned:
            cluster, ns, name = ref.split("/", 2)
            sink = self.sinks.get(cluster)
            pod = sink.pods.get((ns, name)) if sink is not None else None
            if pod is not None and pod.can_take_part and pod.ips:
                self.claims[ref] = tuple(pod.ips)
                for ip in pod.ips:
                    owners = self.owners.setdefault(ip, set())
                    owners.add(ref)
                    if len(owners) > 1:
                        self.shared.add(ip)
        self.unlearned.clear()
        out = {}
        for ip in self.shared:
            refs = sorted(r for r in self.owners[ip] if cset.pod(r) is not None)
            if len({r.split("/", 1)[0] for r in refs}) > 1:
                out[str(ip)] = refs
        return out

