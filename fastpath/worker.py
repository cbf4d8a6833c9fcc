"""The dataplane worker: the packet loop in a process of its own.

The control loop compiles tables in Python; were the packet loop a thread of
the same process, every compile would take the GIL from it (this machine has
two cores: one for the loop, one for everything else).  So :class:`Dataplane`
starts the loop in a separate process (``spawn``: no inherited threads or
event loop), which enters the node's network namespace before it opens a
single socket, and talks to it through shared memory (tables, counters; see
:mod:`fastpath.shm`) and a pipe (flows, port statistics, errors).

Fail closed: until the first :meth:`Dataplane.publish`, the loop drops every
IP frame.  The XDP programs are attached through BPF links owned by the
worker: if it dies, the kernel detaches them and the ports' frames go to the
node's own stack, which (in the node model of DESIGN.md section 4) neither
bridges nor routes between pod ports — pods are cut off, not unfiltered.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time

from fastpath import shm
from fastpath.counters import GAUGE, Counters

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
NETNS_DIR = "/var/run/netns"


class DataplaneError(RuntimeError):
    """The worker could not start (its message names the cause)."""


def enter_netns(name: str) -> None:
    """setns(2) this process into the network namespace ``name`` (as ``ip netns`` names it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Dataplane:
    """The packet loop in its own process (docs/seams.md).

    ``ports`` maps pod-port interface names to pod references, ``uplink``
    names the uplink interface, ``netns`` the namespace holding them (None:
    the current one).  Keyword options: ``cpu`` pins the worker to one CPU;
    ``batch``, ``frames``, ``ct_capacity``, ``ct_timeouts`` (state name ->
    seconds), ``xdp_mode`` tune the loop; ``max_rules`` sizes per-rule hit
    counters.  Further keywords (``spin_us``, ``poll_ms``) go to
    :class:`fastpath.loop.Loop`.
    """

    def __init__(self, ports: dict[str, str], uplink: str | None = None,
                 netns: str | None = None, *, cpu: int | None = None, batch: int = 256,
                 frames: int = 8192, ct_capacity: int = 65536,
                 ct_timeouts: dict[str, float] | None = None, xdp_mode: str = "auto",
                 max_rules: int = 65536, **loop_options):
        self.ports = dict(ports)
        self.uplink = uplink
        self.netns = netns
        self.prefix = shm.new_prefix()
        self.max_rules = max_rules
        self._pub = shm.TablesPublisher(self.prefix, Counters.size_for(max_rules))
        self._counters = Counters(self._pub.counters_shm.buf, max_rules)
        self._tables = None
        self._lock = threading.Lock()
        self._error: str | None = None
        ifnames = list(self.ports) + ([uplink] if uplink else [])
        config = dict(prefix=self.prefix, ifnames=ifnames, uplink=uplink, netns=netns, cpu=cpu,
                      batch=batch, frames=frames, ct_capacity=ct_capacity,
                      ct_timeouts=ct_timeouts, xdp_mode=xdp_mode, max_rules=max_rules,
                      log_level=logging.getLogger().getEffectiveLevel(),
                      loop_options=loop_options)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(config, child),
                                 name="mcnp-dataplane", daemon=True)
        self._proc.start()
        child.close()
        logger.info("Dataplane worker %d started for ports %s (netns %s).",
                    self._proc.pid, ", ".join(ifnames), netns or "current")

    # -- control side ---------------------------------------------------------

    def publish(self, tables, bindings: dict[str, list[str]]) -> None:
        """Hand over a new tables revision and the pod ports' addresses."""
        self._pub.publish(tables, bindings)
        self._tables = tables

    def ready(self) -> bool:
        """True once every port is open and the loop runs."""
        self._drain_errors()
        return self._error is None and self._proc.is_alive() and \
            bool(self._pub.ctl[shm.CTL_READY])

    def failure(self) -> str | None:
        """Why the worker is gone (None while it runs): its last error, or its exit."""
        self._drain_errors()
        if self._proc.is_alive():
            return None
        return self._error or f"dataplane worker exited (exit code {self._proc.exitcode})"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until :meth:`ready`; raise DataplaneError if the worker failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self._error or not self._proc.is_alive():
                break
            time.sleep(0.02)
        self._drain_errors()
        raise DataplaneError(self._error or
                             f"dataplane worker not ready after {timeout:.0f} s "
                             f"(exit code {self._proc.exitcode})")

    def revision_in_force(self) -> int | None:
        """Tables revision the loop judges with now (None before the first)."""
        return int(self._counters.gauges[GAUGE["revision"]]) if self._pub.ctl[shm.CTL_IN_FORCE] else None

    def stats(self) -> dict:
        """Counters (from shared memory) plus port statistics (asked of the worker)."""
        rules = self._tables.rules if self._tables is not None else None
        out = self._counters.snapshot(rules)
        out["ready"] = self.ready()
        out["published_generation"] = self._pub.generation
        out["generation_in_force"] = int(self._pub.ctl[shm.CTL_IN_FORCE])
        reply = self._ask(("ports",))
        if reply is not None:
            out["ports"] = reply
        if self._error:
            out["error"] = self._error
        return out

    def flows(self, limit: int = 1000) -> list[dict]:
        """Tracked flows, most recent first (empty if the worker does not answer)."""
        return self._ask(("flows", limit)) or []

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (it detaches programs and closes sockets), free shared memory."""
        if self._proc is not None:
            self._pub.ctl[shm.CTL_STOP] = 1
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout)
            self._proc = None
            self._conn.close()
            del self._counters
            self._pub.close()

    def __enter__(self) -> "Dataplane":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, request: tuple, timeout: float = 1.0):
        if self._proc is None or not self._proc.is_alive():
            return None
        with self._lock:
            self._drain_errors()
            self._conn.send(request)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    break
                kind, payload = self._conn.recv()
                if kind == "error":
                    self._error = payload
                    continue
                return payload
        return None

    def _drain_errors(self) -> None:
        try:
            while self._proc is not None and self._conn.poll(0) and not self._lock.locked():
                kind, payload = self._conn.recv()
                if kind == "error":
                    self._error = payload
        except (EOFError, OSError):
            pass


# -- worker side ------------------------------------------------------------------


def _worker_main(config: dict, conn) -> None:
    """Entry of the worker process: namespace, ports, then the loop until stopped."""
    logging.basicConfig(level=config["log_level"],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if config["cpu"] is not None:
            os.sched_setaffinity(0, {config["cpu"]})
        if config["netns"]:
            enter_netns(config["netns"])
        _Worker(config, conn).run()
    except Exception as e:  # reported to the control process, which decides
        logger.exception("Dataplane worker failed.")
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise SystemExit(1)


class _Worker:
    """The loop plus its hand-over duties, run between batches."""

    SLOW_EVERY_S = 0.01

    def __init__(self, config: dict, conn):
        from fastpath.loop import Loop
        from fastpath.tables import PolicyTables
        self._unpack = PolicyTables.unpack
        self.conn = conn
        self.reader = shm.TablesReader(config["prefix"])
        self.counters = Counters(self.reader.counters_map, config["max_rules"])
        self.stop = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.loop = Loop(config["ifnames"], config["uplink"], batch=config["batch"],
                         frames=config["frames"], counters=self.counters,
                         ct_capacity=config["ct_capacity"], ct_timeouts=config["ct_timeouts"],
                         xdp_mode=config["xdp_mode"], **config.get("loop_options", {}))
        self._next_slow = 0.0
        self._next_sweep = 0.0

    def _on_signal(self, signum, frame) -> None:
        self.stop = True

    def _should_stop(self) -> bool:
        return self.stop or bool(self.reader.ctl[shm.CTL_STOP])

    def run(self) -> None:
        with self.loop:
            self.reader.ctl[shm.CTL_PID] = os.getpid()
            self.reader.ctl[shm.CTL_READY] = 1
            try:
                self.loop.run(self._should_stop, self._between_batches)
            finally:
                self.reader.ctl[shm.CTL_READY] = 0

    def _between_batches(self) -> None:
        if self.reader.changed():
            self._take_tables()
        now = time.monotonic()
        if now < self._next_slow:
            return
        self._next_slow = now + self.SLOW_EVERY_S
        self.counters.gauges[GAUGE["heartbeat_ns"]] = time.monotonic_ns()
        pipeline = self.loop.pipeline
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            pipeline.ct.sweep(slots=8192)
            pipeline.switch.macs.expire(time.monotonic_ns())
            self.counters.gauges[GAUGE["flows"]] = pipeline.ct.count()
        while self.conn.poll(0):
            request = self.conn.recv()
            if request[0] == "flows":
                self.conn.send(("flows", pipeline.ct.flows(int(request[1]))))
            elif request[0] == "ports":
                self.conn.send(("ports", {
                    p.ifname: {**p.stats(), "xdp_mode": p.xdp_mode} for p in self.loop.ports}))

    def _take_tables(self) -> None:
        gen, header, data, bindings = self.reader.take()
        tables = self._unpack(header, data)
        self.loop.pipeline.set_tables(tables, bindings)
        self.reader.in_force(gen)
