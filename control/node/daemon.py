"""The node daemon (``mcnp run``): sources → store → compile → dataplane, plus REST.

One asyncio loop (uvloop) runs every source, the recompile task and the REST server.
Changes are coalesced: a change wakes the recompile task, which waits
``coalesce_delay`` for more (not after a directory reload: that is a whole batch
already), takes one snapshot and compiles it in a worker thread —
at most one compile in flight, so a burst of events costs one or two compiles, never
one each. The packet loop runs in a process of its own (``fastpath.worker``), so a
compile never slows it; the event loop stays responsive because compiling happens off
it (a long full compile holds the GIL in slices of ``sys.getswitchinterval()``, so
the loop still answers within a few milliseconds).

Compiles are incremental (:class:`IncrementalCompile`): the store says what changed
since the last compile, and ``control.compile.compiler.Compiler.update`` follows it — pod
changes pod by pod, policy changes policy by policy, a full compile only for
namespace, cluster or option changes. Only the local cluster's policies are compiled
(rule M3: remote policies are never enforced here), so a remote policy change leaves
the tables as they are.

Tables are published only once the local cluster has been listed: before that an empty
policy set would leave every local pod unisolated, and the dataplane drops all IP
traffic until its first table (never fail open).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from control.node.config import Settings, SettingsError
from control.node.metrics import Metrics
from control.node.services import services_for
from control.semantics.audit import NO_SETTING, AuditScope, any_audited
from control.semantics.model import Options, Pod
from control.node.sources import make_source
from control.node.store import Changes, Snapshot, Store

logger = logging.getLogger(__name__)

#: At start, the first compile waits this long after the local cluster is listed for
#: the remote clusters' first lists, so that a cold start costs one full compile, not
#: one per cluster (the dataplane admits nothing until its first tables either way).
FIRST_COMPILE_GRACE = 2.0


@dataclass
class TablesInfo:
    """What is in force: the snapshot's revision and, when compiled, its tables."""

    revision: int = 0
    tables: Any = None  # fastpath.tables.PolicyTables
    #: Audit mode: the tables with every policy (what full enforcement would do), of
    #: the same revision; None while no policy is in audit.
    audit_tables: Any = None
    compiled_revision: Optional[int] = None
    compile_seconds: Optional[float] = None
    compiled_at: Optional[float] = None  # wall clock
    published: bool = False
    error: Optional[str] = None
    compiles: int = 0
    #: How revisions were compiled: "full", "incremental", "none" (tables unchanged).
    paths: dict = field(default_factory=dict)
    last_path: Optional[str] = None


class IncrementalCompile:
    """The daemon's compiler: a ``control.compile.compiler.Compiler`` kept between revisions
    and told what changed. Used from the compile thread only.

    Audit mode (``control.semantics.audit``): the enforced tables leave the audited
    policies out; while some local policy is in audit, a second compiler follows the
    same changes with every policy, for ``audit_tables`` (what full enforcement would
    do, at the same revision); otherwise there is no second compile at all."""

    def __init__(self, local: Callable[[Pod], bool], clusters, audit: AuditScope = NO_SETTING):
        self.local = local
        self.clusters = frozenset(clusters)
        self.audit = audit
        self.compiler = None
        self.audit_compiler = None
        self.tables = None
        self.audit_tables = None

    def follow(self, cset, changes: Changes, revision: int) -> tuple[Any, str]:
        """``(tables, path)``: the enforced tables for ``cset`` and how they were made;
        with path ``"none"`` they are the previous tables (nothing enforced here
        changed, nor anything in audit). ``audit_tables`` follow alongside."""
        from control.compile.compiler import Compiler

        if self.compiler is None:
            self.compiler = Compiler(cset, self.local, clusters=self.clusters, audited=self.audit.covers)
            path = "full"
        else:
            path = self.compiler.update(cset, changes)
        audit_path = self._follow_audit(cset, changes)
        if audit_path != "none" and path == "none":
            path = "incremental"  # the same revision for both tables: records name one
        if path != "none" or self.tables is None:
            self.tables = self.compiler.tables(revision)
            self.audit_tables = self.audit_compiler.tables(revision) if self.audit_compiler else None
        return self.tables, path

    def _follow_audit(self, cset, changes: Changes) -> str:
        """Keep the every-policy compiler while some local policy is in audit; its path
        (``"gone"`` when the last audited policy left)."""
        from control.compile.compiler import Compiler

        if not any_audited(cset, self.audit, self.clusters):
            gone = self.audit_compiler is not None
            self.audit_compiler = None
            return "gone" if gone else "none"
        if self.audit_compiler is None:
            self.audit_compiler = Compiler(cset, self.local, clusters=self.clusters)
            return "full"
        return self.audit_compiler.update(cset, changes)

    def reset(self) -> None:
        """Forget everything: the next revision is compiled in full (after a failure
        left the compiler's state in doubt)."""
        self.compiler = None
        self.audit_compiler = None
        self.tables = None
        self.audit_tables = None


def default_compiler(settings: Settings, local: Callable[[Pod], bool]) -> Optional[IncrementalCompile]:
    """An :class:`IncrementalCompile` when the compiler is installed."""
    try:
        from control.compile import compiler as _  # noqa: F401
    except ImportError as e:
        logger.warning("The policy compiler is not available (%s): serving explain only", e)
        return None
    return IncrementalCompile(local, [settings.local_cluster], getattr(settings, "audit", NO_SETTING))


def default_dataplane(settings: Settings):
    from fastpath.worker import Dataplane

    return Dataplane(settings.netns, pin_dir=settings.bpf_dir, flow_capacity=settings.flow_capacity,
                     flow_classes=settings.flow_classes)


class Daemon:
    """The control loop. ``start``/``stop`` are separate from :func:`run` so tests and
    benchmarks drive a daemon inside their own event loop."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic,
                 compiler: Optional[Callable] = None, dataplane_factory: Optional[Callable] = None,
                 serve_api: bool = True):
        self.settings = settings
        self.clock = clock
        options = Options(settings.multicluster, settings.default_peer_scope)
        self.store = Store(options, settings.stale_after, clock, on_change=self._wake)
        self.sources = {}
        for spec in settings.clusters:
            sink = self.store.add_cluster(spec.name, spec.describe(), spec.name == settings.local_cluster)
            self.sources[spec.name] = make_source(spec, sink, settings)
        # None: the installed, incremental compiler; False: none (explain-only, as
        # benchmarks use); a callable (cset, local, revision) -> tables: a full compile
        # per revision (tests stand in for the compiler so).
        self.compiler = default_compiler(settings, self.local) if compiler is None else (compiler or None)
        self._local_ready_at: Optional[float] = None
        self._grace_timer: Optional[asyncio.TimerHandle] = None
        #: Changes not compiled yet (kept while the local cluster is not listed).
        self._changes = Changes(everything=True)
        self._dataplane_factory = dataplane_factory or default_dataplane
        self.dataplane = None
        self.snapshot: Optional[Snapshot] = None
        self.tables = TablesInfo()
        self.metrics = Metrics(self)
        self.started = time.time()
        self.started_monotonic = clock()
        #: Where the REST endpoint listens (bound addresses; port 0 resolved).
        self.api_addresses: list = []
        self._serve_api = serve_api
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcnp-compile")
        self._api_runner = None
        self._start_gc = StartGc()
        self.attacher = None
        self.cni_server = None
        self._pods_changed = False
        #: Why the packet loop stopped, if it did; ``failed`` is set then.
        self.dataplane_failure: Optional[str] = None
        self.failed = asyncio.Event()
        #: Set after each rebuild; benchmarks and tests wait on it.
        self.rebuilt = asyncio.Condition()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._start_gc.hold()
        if self.settings.dataplane:
            if self.compiler is None:
                raise RuntimeError("the dataplane needs the policy compiler (control.compile.compiler)")
            await self._start_dataplane()
        if self._serve_api:
            from control.node.api import start_api

            self._api_runner = await start_api(self, self.settings.api_listen)
        for name, source in self.sources.items():
            self._tasks.append(asyncio.create_task(source.run(), name=f"source-{name}"))
        self._tasks.append(asyncio.create_task(self._recompile_loop(), name="recompile"))
        if self.dataplane is not None:
            self._tasks.append(asyncio.create_task(self._supervise_dataplane(), name="dataplane"))
        if self.settings.stale_after is not None:
            self._tasks.append(asyncio.create_task(self._stale_loop(), name="stale"))
        logger.info("Node %s of cluster %s: watching %d cluster(s), API on %s", self.settings.node_name,
                    self.settings.local_cluster, len(self.sources), self.settings.api_listen)

    async def _start_dataplane(self) -> None:
        """The packet loop, then every pod recorded on this node hooked again (before
        any tables are published: a restart judges their flows again, never drops
        them for want of a hook), then the CNI socket: ADDs are taken from now on."""
        from control.node.attach import Attacher
        from control.node.cni import CniServer

        loop = asyncio.get_running_loop()
        self.dataplane = self._dataplane_factory(self.settings)
        await loop.run_in_executor(None, self.dataplane.wait_ready, 15.0)
        self.attacher = Attacher(self)
        await self.attacher.restore(self.settings.state_dir)
        self.cni_server = CniServer(self.attacher, self.settings.state_dir)
        await self.cni_server.start(self.settings.cni_socket)

    def republish(self) -> None:
        """Hand the packet loop what changed about the hooked pods (a new revision)."""
        self._pods_changed = True
        self._wake()

    async def _supervise_dataplane(self, interval: float = 0.5) -> None:
        """A packet loop that died judges nothing new: its hooks stay and keep passing the
        flows already admitted, and drop everything else until a new loop takes them over
        (fail static). Report it (``/readyz`` 503, the log) and stop the daemon with a
        failure so that its supervisor (the DaemonSet) restarts it — rather than a daemon
        that looks healthy around a dead dataplane."""
        while True:
            await asyncio.sleep(interval)
            reason = self.dataplane.failure() if self.dataplane is not None else None
            if reason is not None:
                self.dataplane_failure = reason
                logger.error("Node %s: %s; stopping so the daemon is restarted", self.settings.node_name, reason)
                self.failed.set()
                return

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._api_runner is not None:
            await self._api_runner.cleanup()
            self._api_runner = None
        if self.cni_server is not None:
            await self.cni_server.close()
            self.cni_server = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._start_gc.release()
        # What this daemon froze may be garbage now (several daemons in one process:
        # tests, benchmarks): give it back to the collector.
        gc.unfreeze()
        gc.collect()

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Every cluster listed, and with a dataplane: the packet loop running and
        the CNI socket taking pods."""
        if self.store.not_ready:
            return False
        if self.settings.dataplane:
            return self.dataplane is not None and self.cni_server is not None and \
                self.dataplane_failure is None
        return True

    def local(self, pod: Pod) -> bool:
        """The endpoints the tables enforce: every pod of the local cluster. This
        node hooks only its own pods, but judges the egress of any pod of its cluster
        at its pods' ingress: a connection through a Service reaches the backend's
        node after the source node's NAT chose it (rule S11)."""
        return pod.cluster == self.settings.local_cluster

    # ------------------------------------------------------------------ recompiles

    def _wake(self) -> None:
        self._dirty.set()

    async def _stale_loop(self) -> None:
        """Revoke remote clusters at most a quarter of ``stale_after`` late."""
        period = min(1.0, self.settings.stale_after / 4)
        while True:
            due = self.store.check_stale()
            await asyncio.sleep(min(due, period) if due is not None else period)

    def coalesce_delay(self) -> float:
        """How long a recompile waits for more changes: ``coalesce_delay``, except after
        a whole batch (a directory reload), which holds everything its source read."""
        return 0.0 if self.store.last_change_whole else self.settings.coalesce_delay

    async def _recompile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            delay = self.coalesce_delay()
            if delay:
                await asyncio.sleep(delay)
            self._dirty.clear()
            try:
                await self.rebuild()
            except Exception:  # noqa: BLE001 - keep the last tables in force, report, go on
                logger.exception("Rebuilding the tables failed; the previous ones stay in force")

    async def rebuild(self) -> None:
        """One snapshot into force: explain answers from it at once; the compiled tables
        follow when the compiler is done."""
        revision = self.tables.revision + 1
        snapshot = self.store.snapshot(revision)
        self._changes.merge(self.store.take_changes())
        if self.attacher is not None:
            snapshot = self.attacher.with_addresses(snapshot, self._changes)
        self.snapshot = snapshot
        self.tables.revision = revision
        if snapshot.conflicts:
            self.metrics.conflicts(snapshot.conflicts)
        local_ready = self.settings.local_cluster not in self.store.not_ready
        if local_ready and self._local_ready_at is None:
            self._local_ready_at = time.monotonic()
        if local_ready and self.tables.compiled_revision is None and self.store.not_ready:
            wait = self._local_ready_at + FIRST_COMPILE_GRACE - time.monotonic()
            if wait > 0:  # remote clusters still listing: compile once they are
                if self._grace_timer is None:
                    self._grace_timer = asyncio.get_running_loop().call_later(wait, self._wake)
                local_ready = False
        if local_ready and self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.compiler is not None and local_ready:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            changes, self._changes = self._changes, Changes()
            pods_changed, self._pods_changed = self._pods_changed, False
            try:
                tables, path = await loop.run_in_executor(self._executor, self._compile_and_publish,
                                                          snapshot, changes, pods_changed)
            except Exception as e:  # noqa: BLE001 - a compiler bug must not stop enforcement
                self.tables.error = f"{type(e).__name__}: {e}"
                self.metrics.compile_failed()
                self._changes.everything = True
                if isinstance(self.compiler, IncrementalCompile):
                    self.compiler.reset()
                logger.exception("Compiling revision %d failed; revision %s stays in force", revision, self.tables.compiled_revision)
            else:
                elapsed = time.perf_counter() - started
                self.tables.tables, self.tables.compiled_revision = tables, revision
                self.tables.audit_tables = getattr(self.compiler, "audit_tables", None)
                self.tables.compile_seconds, self.tables.compiled_at = elapsed, time.time()
                self.tables.error = None
                self.tables.compiles += 1
                self.tables.last_path = path
                self.tables.paths[path] = self.tables.paths.get(path, 0) + 1
                self.metrics.compiled(elapsed)
        if self.ready and (self.tables.compiled_revision is not None or self.compiler is None):
            self._start_gc.release()
        if self.attacher is not None:
            await self.attacher.reconcile(snapshot)
        async with self.rebuilt:
            self.rebuilt.notify_all()

    def _compile_and_publish(self, snapshot: Snapshot, changes: Changes, pods_changed: bool = False):
        """In the compile thread: compile (incrementally when the compiler can), then
        hand the tables to the packet loop (a copy into shared memory; too long for the
        event loop at scale). Tables that did not change are not handed over again."""
        if isinstance(self.compiler, IncrementalCompile):
            tables, path = self.compiler.follow(snapshot.cset, changes, snapshot.revision)
        else:
            tables, path = self.compiler(snapshot.cset, self.local, snapshot.revision), "full"
        # Services and the hooked pods change what the packet loop is told besides the
        # tables: a Service's endpoints (rule S11), a pod's addresses as the tables know them.
        hand_over = path != "none" or not self.tables.published or pods_changed or \
            self.settings.local_cluster in changes.services or bool(changes.pods)
        if self.dataplane is not None and hand_over:
            audit = self.compiler.audit_tables if isinstance(self.compiler, IncrementalCompile) else None
            extra = {"audit_tables": audit} if audit is not None else {}
            self.dataplane.publish(tables, self.attacher.pods_for(snapshot),
                                   services_for(snapshot.cset, self.settings.local_cluster), **extra)
            self.tables.published = True
        return tables, path

    async def wait_revision(self, at_least: int, compiled: bool = False, timeout: float = 10.0) -> None:
        """Until revision ``at_least`` (compiled, if asked) is in force."""
        def done() -> bool:
            rev = self.tables.compiled_revision if compiled else self.tables.revision
            return rev is not None and rev >= at_least

        async with self.rebuilt:
            await asyncio.wait_for(self.rebuilt.wait_for(done), timeout)

    @property
    def settled(self) -> bool:
        """Every cluster listed and everything the store holds is in force."""
        return self.ready and self.snapshot is not None and self.snapshot.store_version == self.store.version

    async def wait_settled(self, timeout: float = 30.0) -> None:
        async with self.rebuilt:
            await asyncio.wait_for(self.rebuilt.wait_for(lambda: self.settled), timeout)


class StartGc:
    """The cyclic garbage collector held off while the daemon starts.

    A cold start makes millions of long-lived objects (the parsed lists, then the
    compiler's state) and almost no cyclic garbage (22-339 objects per start at 10k
    pods, measured). Left on, the collector walks the growing heap again and again:
    1.6-2.5 s of a 4-6 s cold start went to full collections (``gc.callbacks``). So
    :meth:`hold` freezes what exists (modules, configuration) and turns the collector
    off; :meth:`release` — once the first tables are in force, or after ``limit``
    seconds whatever happens, so a start that never completes cannot accumulate
    garbage forever — freezes everything made meanwhile (``gc.freeze``: later
    collections never walk it; the few cycles among it stay) and turns it back on."""

    def __init__(self, limit: float = 10.0):
        self.limit = limit
        self.held = False
        self._was_enabled = False
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None

    def hold(self) -> None:
        with self._lock:
            if self.held:
                return
            self.held, self._was_enabled = True, gc.isenabled()
            gc.freeze()
            gc.disable()
            self._timer = threading.Timer(self.limit, self.release)
            self._timer.daemon = True
            self._timer.start()

    def release(self) -> None:
        with self._lock:
            if not self.held:
                return
            self.held = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            gc.freeze()
            if self._was_enabled:
                gc.enable()


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(settings)
    try:
        await daemon.start()
    except (OSError, RuntimeError) as e:
        logger.error("mcnp run: cannot start: %s", e)
        await daemon.stop()
        return 1
    stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(daemon.failed.wait())
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, failed):
        task.cancel()
    logger.info("Shutting down")
    await daemon.stop()
    return 1 if daemon.failed.is_set() else 0


def run(settings: Settings) -> int:
    """Blocking entry point of ``mcnp run``: 0 after a clean shutdown on SIGTERM/SIGINT,
    1 when the daemon cannot start or its packet loop died, 2 for an invalid
    configuration."""
    try:
        settings.validate()
    except SettingsError as e:
        print(f"mcnp run: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(_serve(settings))
