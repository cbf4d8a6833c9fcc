"""The dataplane worker: the packet loop in a process of its own.

The control loop compiles tables in Python; were the packet loop a thread of
the same process, every compile would take the GIL from it (two cores: one for
the loop, one for everything else).  So :class:`Dataplane` starts the loop in a
separate process (``spawn``: no inherited threads or event loop), which enters
the node's network namespace before it opens anything, and talks to it through
shared memory (tables, counters, the verdict log; :mod:`fastpath.shm`) and a
pipe (attach and detach pods, flows, port statistics; every request carries an
id and its reply names it, so a late reply is never taken for another's).

Fail closed and fail static: until the first :meth:`Dataplane.publish` every IP
frame is dropped, and a pod's frames until its addresses are in the tables.
The hooks are attached by netlink and their state pinned (:mod:`fastpath.kernel`):
when the worker dies they stay, keep passing the flows already admitted, and
drop everything else, until a new worker takes them over.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time

from fastpath import flows as F
from fastpath import kernel as K
from fastpath import shm
from fastpath.counters import GAUGE, Counters
from fastpath.netlink import addresses, links
from fastpath.netns import Namespace

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class DataplaneError(RuntimeError):
    """The worker could not do what was asked (its message names the cause)."""


class Dataplane:
    """The packet loop in its own process (docs/seams.md).

    ``netns`` names the node's network namespace (None: the current one);
    ``pin_dir`` the bpffs directory of the maps that outlive the daemon (None:
    nothing pinned, for tests).  Keywords: ``cpu`` pins the worker;
    ``flow_capacity``; ``flow_classes`` (the hooks admit new flows of a class
    userspace admitted under the tables in force; docs/dataplane.md);
    ``timeouts`` (flow state -> idle seconds); further ones
    (``batch``, ``frames``, ``spin_us``, ``poll_ms``, ``xdp_mode``, ...) go to
    :class:`fastpath.loop.Loop`.
    """

    def __init__(self, netns: str | None = None, *, pin_dir: str | None = None,
                 cpu: int | None = None, flow_capacity: int = 131072, flow_classes: bool = True,
                 timeouts: dict[str, float] | None = None, **loop_options):
        self.netns = netns
        self.prefix = shm.new_prefix()
        self._pub = shm.TablesPublisher(self.prefix, Counters.size_for())
        self._counters = Counters(self._pub.counters_shm.buf)
        self._tables = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._error: str | None = None
        config = dict(prefix=self.prefix, netns=netns, pin_dir=pin_dir, cpu=cpu,
                      flow_capacity=flow_capacity, flow_classes=flow_classes,
                      timeouts={**K.DEFAULT_TIMEOUTS, **(timeouts or {})},
                      log_level=logging.getLogger().getEffectiveLevel(),
                      loop_options=loop_options)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(config, child),
                                 name="mcnp-dataplane", daemon=True)
        self._proc.start()
        child.close()
        logger.info("Dataplane worker %d started (netns %s).", self._proc.pid, netns or "current")

    # -- control side ---------------------------------------------------------

    def attach(self, sandbox: dict, timeout: float = 10.0) -> dict:
        """Hook a pod's veth (``sandbox``: id, netns, ifname, host_ifname, ips, mac).
        Returns what was attached; raises DataplaneError when it cannot be."""
        return self._ask("attach", sandbox, timeout=timeout)

    def detach(self, sandbox_id: str, timeout: float = 10.0) -> bool:
        return bool(self._ask("detach", sandbox_id, timeout=timeout))

    def pods(self) -> list[str]:
        """Sandbox ids the worker has hooked."""
        return list(self._ask("pods", None) or [])

    def discover(self, ips: list[str], netns_dirs: list[str], timeout: float = 10.0) -> dict:
        """Pods not known by a sandbox record, looked for by address among the network
        namespaces under ``netns_dirs``: ``{ip: {"id", "netns", "ifname", "host_ifname",
        "mac"}}`` for those found behind a veth of this node."""
        return self._ask("discover", {"ips": ips, "dirs": netns_dirs}, timeout=timeout)

    def publish(self, tables, pods: dict[str, dict], services: list[dict] | None = None,
                audit_tables=None) -> None:
        """Hand over a tables revision, what each attached pod is in it (``{sandbox:
        {"ref", "ips", "ready"}}``) and the Service addresses; in audit mode also
        ``audit_tables`` (every policy: what full enforcement would do), against which
        new flows ``tables`` admit are judged again and recorded as "would deny"."""
        self._pub.publish(tables, {"pods": pods, "services": services or []}, audit_tables)
        self._tables = tables

    def ready(self) -> bool:
        """True once the maps are open and the loop runs."""
        self._drain()
        return self._error is None and self._proc is not None and self._proc.is_alive() and \
            bool(self._pub.ctl[shm.CTL_READY])

    def failure(self) -> str | None:
        """Why the worker is gone (None while it runs)."""
        self._drain()
        if self._proc is not None and self._proc.is_alive():
            return None
        code = self._proc.exitcode if self._proc is not None else None
        return self._error or f"dataplane worker exited (exit code {code})"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.failure():
                raise DataplaneError(self.failure())
            time.sleep(0.02)
        raise DataplaneError(f"dataplane worker not ready after {timeout:.0f} s")

    def revision_in_force(self) -> int | None:
        if not self._pub.ctl[shm.CTL_IN_FORCE]:
            return None
        return int(self._counters.gauges[GAUGE["revision"]])

    def stats(self) -> dict:
        """Counters (shared memory), rule hits by rule, the hooks' and the ports' counters."""
        try:  # first: the worker folds what the hooks admitted by class into the rule hits
            asked = self._ask("stats", None, timeout=1.0)
        except DataplaneError as e:
            asked = {"error": str(e)}
        self._pub.reclaim()
        out = self._counters.snapshot()
        out["rule_hits"] = self._pub.rule_hits()
        out["ready"] = self.ready()
        out["published_generation"] = self._pub.generation
        out["generation_in_force"] = int(self._pub.ctl[shm.CTL_IN_FORCE])
        out.update(asked)
        if self._error:
            out["error"] = self._error
        return out

    def flows(self, limit: int = 1000) -> list[dict]:
        """Cached flows, most recently active first."""
        try:
            return self._ask("flows", limit, timeout=2.0)
        except DataplaneError:
            return []

    def classes(self, limit: int = 1000) -> list[dict]:
        """Flow classes the hooks admit new flows by, most recently active first."""
        try:
            return self._ask("classes", limit, timeout=2.0)
        except DataplaneError:
            return []

    def verdicts(self, after_seq: int = -1, limit: int = 1000) -> list[dict]:
        """Judged rows recorded by the loop after ``after_seq`` (numbers only)."""
        rows = self._counters.recent(after_seq, limit)
        return [{"seq": int(r["seq"]), "time_ns": int(r["time_ns"]), "zone": int(r["zone"]),
                 "src": K.addr_str(r["src"]), "dst": K.addr_str(r["dst"]),
                 "sport": int(r["sport"]), "dport": int(r["dport"]), "proto": int(r["proto"]),
                 "direction": K.ROLE_NAMES.get(int(r["role"]), "?"),
                 "allowed": bool(r["allowed"]), "reason": int(r["reason"]),
                 "rule_egress": int(r["rule_egress"]), "rule_ingress": int(r["rule_ingress"]),
                 "revision": int(r["revision"])} for r in rows]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (its sockets close; the hooks stay, fail static), free shared memory."""
        if self._proc is None:
            return
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

    def _ask(self, kind: str, payload, timeout: float = 1.0):
        if self._proc is None or not self._proc.is_alive():
            raise DataplaneError(self.failure() or "dataplane worker is not running")
        with self._lock:
            rid = next(self._ids)
            self._conn.send((rid, kind, payload))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._conn.poll(left):
                    raise DataplaneError(f"the dataplane worker did not answer {kind!r} in {timeout:.0f} s")
                reply_id, ok, value = self._conn.recv()
                if reply_id == 0:  # an error report of the worker's own
                    self._error = value
                    continue
                if reply_id != rid:
                    continue  # the late answer to an earlier request that timed out
                if not ok:
                    raise DataplaneError(value)
                return value

    def _drain(self) -> None:
        if self._proc is None or not self._lock.acquire(blocking=False):
            return
        try:
            while self._conn.poll(0):
                reply_id, _, value = self._conn.recv()
                if reply_id == 0:
                    self._error = value
        except (EOFError, OSError):
            pass
        finally:
            self._lock.release()


# -- worker side ------------------------------------------------------------------


def isolated(tables, ips: list[str]) -> bool:
    """Whether any policy in force isolates the pod with these addresses, in either
    direction (rule S12: then it exchanges no non-IP frames but ARP and ND)."""
    import numpy as np
    from fastpath.match import NOT_ENFORCED, judge
    if not ips:
        return True
    pod = np.stack([np.frombuffer(K.addr16(ip), dtype=np.uint8) for ip in ips])
    other = np.tile(np.frombuffer(K.addr16("0.0.0.0"), dtype=np.uint8), (len(ips), 1))
    proto, port = np.full(len(ips), 17, dtype=np.uint8), np.zeros(len(ips), dtype=np.uint16)
    out = judge(tables, pod, other, proto, port).egress
    into = judge(tables, other, pod, proto, port).ingress
    return bool(np.any(out != NOT_ENFORCED) or np.any(into != NOT_ENFORCED))


def veth_peer(netns_path: str, ifname: str) -> tuple[str, str]:
    """The node-side end of the veth whose pod end is ``ifname`` in ``netns_path``
    (the calling thread's namespace is the node's), and the pod end's MAC."""
    with Namespace.from_path(netns_path) as ns, ns.entered():
        pod_end = next((link for link in links() if link.name == ifname), None)
    if pod_end is None:
        raise DataplaneError(f"{ifname} does not exist in {netns_path}")
    node_end = next((link for link in links() if link.index == pod_end.peer_index), None)
    if not pod_end.peer_index or node_end is None or node_end.peer_index != pod_end.index:
        raise DataplaneError(f"{ifname} in {netns_path} is not a veth whose other end is on this node")
    return node_end.name, pod_end.mac



def _worker_main(config: dict, conn) -> None:
    """Entry of the worker process: namespace, maps, then the loop until stopped."""
    logging.basicConfig(level=config["log_level"],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if config["cpu"] is not None:
            os.sched_setaffinity(0, {config["cpu"]})
        if config["netns"]:
            Namespace.from_name(config["netns"]).enter()
        _Worker(config, conn).run()
    except Exception as e:  # reported to the control process, which decides
        logger.exception("Dataplane worker failed.")
        try:
            conn.send((0, False, f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise SystemExit(1)


class _Worker:
    """The loop plus its duties between batches."""

    SLOW_EVERY_S = 0.01
    SWEEP_EVERY_S = 2.0
    #: Flows the sweep reads per tick: a full cache (131,072) is swept in ~8 ticks, and
    #: never read whole at once on the CPU the worker shares with pods.
    SWEEP_SLICE = 16384

    def __init__(self, config: dict, conn):
        from fastpath.loop import Loop
        from fastpath.tables import PolicyTables
        self._unpack = PolicyTables.unpack
        self.conn = conn
        # one poll() system call per check; Connection.poll builds a selector each time,
        # which was most of an idle loop's cost (~70 of its ~100 µs per 10 ms tick)
        self._requests = select.poll()
        self._requests.register(conn.fileno(), select.POLLIN)
        self.timeouts = config["timeouts"]
        self.flow_classes = config.get("flow_classes", True)
        #: flows each class had admitted at the last fold, by key bytes
        self._class_seen: dict[bytes, int] = {}
        self._walk = K.Walk()   # the sweep's place in the flow cache
        self._walk_flows = 0    # flows kept so far in this walk
        self.reader = shm.TablesReader(config["prefix"])
        self.counters = Counters(self.reader.counters_map)
        self.stop = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        pin_dir = config["pin_dir"]
        if pin_dir:
            K.ensure_bpffs(pin_dir)
        self.kernel = K.Kernel(pin_dir, flow_capacity=config["flow_capacity"])
        if self.kernel.reused:
            logger.info("Found the flow cache of an earlier run: its flows wait for the first tables.")
        # Classes admit new flows: none may outlive the run that judged them, or the
        # hooks would admit new flows before this run's first tables.
        self.kernel.clear(K.CLASSES)
        self.loop = Loop(self.kernel, self.counters, **config.get("loop_options", {}))
        self.pods_extra: dict[str, dict] = {}
        self._next_slow = 0.0
        self._next_sweep = 0.0
        self._node_addrs: list[str] = []
        self._refresh_node_addrs()

    def _on_signal(self, signum, frame) -> None:
        self.stop = True

    def run(self) -> None:
        self.reader.ctl[shm.CTL_PID] = os.getpid()
        self.reader.ctl[shm.CTL_READY] = 1
        try:
            self.loop.run(lambda: self.stop, self._between_batches)
        finally:
            self.reader.ctl[shm.CTL_READY] = 0
            self.loop.close()
            self.kernel.close()

    def _between_batches(self) -> None:
        if self.reader.changed():
            self._take_tables()
        now = time.monotonic()
        if now < self._next_slow:
            return
        self._next_slow = now + self.SLOW_EVERY_S
        self.counters.gauges[GAUGE["heartbeat_ns"]] = time.monotonic_ns()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY_S
            self._sweep()
        while self._requests.poll(0):
            self._serve(self.conn.recv())

    def _sweep(self) -> None:
        self._refresh_node_addrs()
        pods = self._zones()
        g = self.counters.gauges
        if self.loop.pipeline.tables is None:  # before the first tables nothing is judged yet
            g[GAUGE["flows"]] = len(self.kernel.dump()[0])
            g[GAUGE["flow_classes"]] = len(self.kernel.dump(which=K.CLASSES)[0])
            return
        keys, vals = self.kernel.dump(which=K.CLASSES)  # read once: folded, then expired
        self._fold_class_hits((keys, vals))
        g[GAUGE["flow_classes"]] = len(keys) - F.expire_rows(self.kernel, K.CLASSES, keys, vals, self.timeouts, pods)
        gone, read = F.expire_slice(self.kernel, self._walk, self.SWEEP_SLICE, self.timeouts, pods)
        g[GAUGE["expired"]] += gone
        self._walk_flows += read - gone
        if self._walk.done:  # a whole walk: the count of the cache, as of this walk
            g[GAUGE["flows"]] = self._walk_flows
            self._walk_flows = 0

    def _fold_class_hits(self, rows=None) -> None:
        """Count the flows the hooks admitted by class since the last fold into the rule
        hits of the tables in force (a class counts them, the rules it names are those
        of its revision; classes of another revision count nothing here).  ``rows``: the
        classes if already read."""
        tables = self.loop.pipeline.tables
        if tables is None:
            return
        self._class_seen = F.fold_class_hits(self.kernel, tables.revision, self.loop.pipeline.rule_hits,
                                             self._class_seen, rows)

    def _refresh_node_addrs(self) -> None:
        from fastpath.netlink import local_addresses
        addrs = sorted(local_addresses())
        if addrs != self._node_addrs:
            self.kernel.set_node_addrs(addrs)
            self._node_addrs = addrs

    def _zones(self) -> dict[int, list[str]]:
        return {h.zone: h.ips for h in self.loop.pods.values()}

    def _serve(self, request) -> None:
        rid, kind, payload = request
        try:
            value = getattr(self, f"_do_{kind}")(payload)
            self.conn.send((rid, True, value))
        except Exception as e:  # one request's failure is its own, never the loop's
            logger.warning("Dataplane request %s failed: %s", kind, e)
            self.conn.send((rid, False, f"{type(e).__name__}: {e}"))

    def _do_attach(self, sb: dict) -> dict:
        extra = self.pods_extra.get(sb["id"], {})
        host_ifname, mac_text = veth_peer(sb["netns"], sb["ifname"])
        if sb.get("host_ifname") and sb["host_ifname"] != host_ifname:
            logger.warning("Sandbox %s: the CNI named %s, but the peer of %s is %s; hooking %s.",
                           sb["id"][:12], sb["host_ifname"], sb["ifname"], host_ifname, host_ifname)
        mac = bytes.fromhex(mac_text.replace(":", "")) if mac_text else None
        tables = self.loop.pipeline.tables
        ips = extra.get("ips") or sb.get("ips") or []
        ready = bool(extra.get("ready")) and tables is not None
        hooks = self.loop.add_pod(sb["id"], sb["netns"], sb["ifname"], host_ifname, ips, mac,
                                  ready=ready, isolated=not ready or isolated(tables, ips))
        self.counters.gauges[GAUGE["pods"]] = len(self.loop.pods)
        return {"zone": hooks.zone, "egress_socket": hooks.egress, "ingress_socket": hooks.ingress}

    def _do_discover(self, request: dict) -> dict:
        wanted, found = set(request["ips"]), {}
        node = {link.index: link for link in links()}
        for directory in request["dirs"]:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                try:
                    with Namespace.from_path(path) as ns, ns.entered():
                        addrs, pod_links = addresses(), {link.index: link for link in links()}
                except OSError:
                    continue
                for ip, index in addrs:
                    link = pod_links.get(index)
                    peer = node.get(link.peer_index) if link else None
                    # a veth whose two ends name each other: this node's end of that pod
                    if ip in wanted and ip not in found and peer and peer.peer_index == link.index:
                        found[ip] = {"id": f"netns-{name}", "netns": path, "ifname": link.name,
                                     "host_ifname": peer.name, "mac": link.mac}
        return found

    def _do_detach(self, sandbox_id: str) -> bool:
        done = self.loop.remove_pod(sandbox_id)
        self.counters.gauges[GAUGE["pods"]] = len(self.loop.pods)
        return done

    def _do_pods(self, _) -> list[str]:
        return list(self.loop.pods)

    def _zone_refs(self) -> dict[int, str | None]:
        return {h.zone: self.pods_extra.get(h.sandbox, {}).get("ref") for h in self.loop.pods.values()}

    def _do_flows(self, limit) -> list[dict]:
        return F.listing(self.kernel, int(limit), self._zone_refs())

    def _do_classes(self, limit) -> list[dict]:
        return F.class_listing(self.kernel, int(limit), self._zone_refs())

    def _do_stats(self, _) -> dict:
        self._fold_class_hits()
        umem = self.loop.umem
        return {"ports": self.loop.port_stats(), "hooks": self.kernel.kstats(),
                "umem": {"frames": umem.frames, "free": umem.free_frames, "bad_frees": umem.bad_frees,
                         "slots": umem.slots, "free_slots": umem.free_slots,
                         "multi_buffer": umem.multi_buffer},
                "hooked_pods": len(self.loop.pods), "kernel_pods": len(self.kernel.pod_zones()),
                "sockets": sum(p is not None for p in self.loop.ports),
                "flow_capacity": self.kernel.flow_capacity, "class_capacity": self.kernel.class_capacity,
                "node_addresses": self._node_addrs}

    def _take_tables(self) -> None:
        self._fold_class_hits()  # into the hits of the tables they were admitted under
        gen, header, data, extra, hits = self.reader.take()
        tables = self._unpack(header, data)
        audit = self._unpack(*self.reader.audit) if self.reader.audit is not None else None
        self.pods_extra = extra.get("pods", {})
        self.loop.pipeline.set_services(extra.get("services", []))
        self.loop.set_tables(tables, self.timeouts, hits, audit, classes=self.flow_classes)
        for sandbox, h in self.loop.pods.items():
            info = self.pods_extra.get(sandbox, {})
            ips = info.get("ips") or h.ips
            ready = bool(info.get("ready"))
            self.loop.set_pod(sandbox, ips, ready, not ready or isolated(tables, ips))
        done = F.recheck(self.kernel, tables, self.timeouts, self._zones(), self.loop.pipeline.services,
                         classes=self.flow_classes, audit_tables=audit, whole=self.loop.umem.multi_buffer)
        g = self.counters.gauges
        g[GAUGE["revision"]] = tables.revision
        g[GAUGE["rechecks"]] += 1
        g[GAUGE["flows_cut"]] += done["cut"]
        g[GAUGE["recheck_ns"]] = done["ns"]
        self.reader.in_force(gen)
