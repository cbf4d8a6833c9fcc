"""Local pods found as they come and go: the CNI handler and the reconciler.

The daemon learns a pod sandbox three ways, and hooks each exactly once:

1. ``mcnp-cni`` ADD (:mod:`control.node.cni`): the runtime made a sandbox; its
   veth is hooked before ADD is answered, so the pod never carries traffic
   unjudged (until the tables know the pod it carries none at all);
2. at start, the sandbox records left on disk by earlier ADDs: a restarted
   daemon takes over every pod of its node before it publishes tables;
3. on every change of the local cluster's pods, pods of this node that no
   record names (they came before mcnp was installed) are looked for among the
   node's network namespaces by their address, and hooked too.

DEL detaches; it never fails.  What each hooked pod *is* (its reference, its
addresses as the API reports them) is handed to the packet loop with every
tables revision (:meth:`Attacher.pods_for`): a pod is judged only once its
addresses are in the tables in force, and fail-closed before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Optional

from control.node.cni import CniError, Sandbox, load_sandboxes, remove_sandbox, save_sandbox

if TYPE_CHECKING:  # pragma: no cover
    from control.node.daemon import Daemon

logger = logging.getLogger(__name__)

#: CNI error codes (spec 1.0.0).
TRY_AGAIN_LATER = 11
INVALID_ENV = 7
#: Where container runtimes keep sandbox namespaces (the reconciler looks there).
NETNS_DIRS = ("/var/run/netns", "/run/netns")
#: How long before a pod not found among the namespaces is looked for again, seconds.
RESEARCH_S = 10.0


def sandbox_payload(sb: Sandbox) -> dict:
    """What the packet loop needs to hook a sandbox."""
    return {"id": sb.container_id, "netns": sb.netns, "ifname": sb.ifname,
            "host_ifname": sb.host_ifname, "ips": list(sb.ips), "mac": sb.mac}


class Attacher:
    """The CNI handler of :class:`control.node.cni.CniServer`, and the reconciler."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.sandboxes: dict[str, Sandbox] = {}
        self.failures: dict[str, str] = {}
        self._lock = asyncio.Lock()
        #: address -> when it was last looked for (a search scans every namespace)
        self._searched: dict[str, float] = {}

    @property
    def local_cluster(self) -> str:
        return self.daemon.settings.local_cluster

    def ref_of(self, sb: Sandbox) -> Optional[str]:
        if not sb.namespace or not sb.pod_name:
            return None
        return f"{self.local_cluster}/{sb.namespace}/{sb.pod_name}"

    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args))

    # -- the CNI handler ---------------------------------------------------------------

    async def add(self, sandbox: Sandbox) -> None:
        dp = self.daemon.dataplane
        if dp is None or not dp.ready():
            raise CniError(TRY_AGAIN_LATER, "mcnp cannot take pods yet",
                           self.daemon.dataplane_failure or "the packet loop is not running")
        if not sandbox.namespace or not sandbox.pod_name:
            raise CniError(INVALID_ENV, "K8S_POD_NAMESPACE and K8S_POD_NAME are required",
                           "mcnp enforces policy per pod: it must know which pod this is")
        async with self._lock:
            try:
                await self._call(dp.attach, sandbox_payload(sandbox))
            except Exception as e:  # noqa: BLE001 - the runtime retries; the pod does not start
                self.failures[sandbox.container_id] = str(e)
                raise CniError(TRY_AGAIN_LATER, "mcnp could not hook the pod's interfaces", str(e))
            self.sandboxes[sandbox.container_id] = sandbox
            self.failures.pop(sandbox.container_id, None)
        logger.info("Pod %s (sandbox %s) hooked on %s/%s.", self.ref_of(sandbox),
                    sandbox.container_id[:12], sandbox.host_ifname or "?", sandbox.ifname)
        self.daemon.republish()

    async def check(self, sandbox: Sandbox) -> None:
        dp = self.daemon.dataplane
        if dp is None or not dp.ready():
            raise CniError(TRY_AGAIN_LATER, "mcnp is not running on this node")
        hooked = await self._call(dp.pods)
        if sandbox.container_id not in hooked:
            raise CniError(999, "the pod is not hooked", sandbox.container_id)

    async def delete(self, container_id: str, sandbox: Optional[Sandbox]) -> None:
        self.sandboxes.pop(container_id, None)
        self.failures.pop(container_id, None)
        dp = self.daemon.dataplane
        if dp is None:
            return
        try:
            async with self._lock:
                await self._call(dp.detach, container_id)
        except Exception as e:  # noqa: BLE001 - DEL never fails; the sweep removes leftovers
            logger.warning("Detaching sandbox %s: %s", container_id[:12], e)
        self.daemon.republish()

    # -- start and reconcile ---------------------------------------------------------------

    async def restore(self, state_dir: str) -> None:
        """Hook again every sandbox recorded on disk whose namespace still exists;
        forget the records of those that are gone."""
        problems: list[str] = []
        for sb in load_sandboxes(state_dir, problems):
            if not os.path.exists(sb.netns):
                remove_sandbox(state_dir, sb.container_id)
                logger.info("Sandbox %s is gone (its namespace %s is); record removed.",
                            sb.container_id[:12], sb.netns)
                continue
            try:
                await self._call(self.daemon.dataplane.attach, sandbox_payload(sb))
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                self.failures[sb.container_id] = str(e)
                logger.error("Sandbox %s (%s) could not be hooked again: %s", sb.container_id[:12],
                             self.ref_of(sb), e)
                continue
            self.sandboxes[sb.container_id] = sb
        for p in problems:
            logger.warning("Sandbox records: %s", p)
        logger.info("Took over %d pod sandbox(es) recorded on this node.", len(self.sandboxes))

    async def reconcile(self, snapshot) -> None:
        """Hook pods of this node that no sandbox record names, found by address."""
        if self.daemon.dataplane is None or snapshot is None:
            return
        known = {ip for sb in self.sandboxes.values() for ip in sb.ips}
        missing = {}
        for pod in snapshot.cset.pods():
            if pod.cluster == self.local_cluster and pod.node == self.daemon.settings.node_name \
                    and pod.can_take_part and not any(str(ip) in known for ip in pod.ips):
                missing[str(pod.ips[0])] = pod
        now = asyncio.get_running_loop().time()
        missing = {ip: pod for ip, pod in missing.items() if now - self._searched.get(ip, -1e9) >= RESEARCH_S}
        if not missing:
            return
        self._searched.update({ip: now for ip in missing})
        async with self._lock:
            try:
                found = await self._call(self.daemon.dataplane.discover, sorted(missing), list(NETNS_DIRS))
            except Exception as e:  # noqa: BLE001 - the next change or RESEARCH_S tries again
                logger.warning("Looking for pods of this node among its namespaces failed: %s", e)
                return
            for ip, payload in found.items():
                pod = missing[ip]
                sb = Sandbox(container_id=payload["id"], netns=payload["netns"],
                             ifname=payload["ifname"], namespace=pod.namespace, pod_name=pod.name,
                             ips=tuple(str(a) for a in pod.ips), mac=payload.get("mac", ""),
                             host_ifname=payload["host_ifname"])
                try:
                    await self._call(self.daemon.dataplane.attach, sandbox_payload(sb))
                except Exception as e:  # noqa: BLE001
                    self.failures[sb.container_id] = str(e)
                    logger.error("Pod %s found at %s could not be hooked: %s", pod.ref, sb.netns, e)
                    continue
                self.sandboxes[sb.container_id] = sb
                save_sandbox(self.daemon.settings.state_dir, sb)  # a restart or --detach-all finds it
                logger.info("Pod %s found without a sandbox record (at %s) and hooked.", pod.ref, sb.netns)

    # -- what the packet loop is told ------------------------------------------------------

    def with_addresses(self, snapshot, changes) -> object:
        """The snapshot with the sandbox's addresses (prevResult) on pods the API
        knows but has no IP for yet: the kubelet reports a pod's IP only after ADD
        returned, and until then the pod is judged by its labels at these addresses
        instead of staying cut off.  Pods so patched are added to ``changes``."""
        local = snapshot.cset.clusters.get(self.local_cluster)
        if local is None:
            return snapshot
        patched = {}
        for sb in self.sandboxes.values():
            key = (sb.namespace, sb.pod_name)
            pod = local.pods.get(key)
            if pod is not None and not pod.ips and sb.ips and not pod.host_network:
                patched[key] = dataclasses.replace(pod, ips=tuple(ipaddress.ip_address(ip) for ip in sb.ips))
        if not patched:
            return snapshot
        state = dataclasses.replace(local, pods={**local.pods, **patched})
        cset = dataclasses.replace(snapshot.cset, clusters={**snapshot.cset.clusters, self.local_cluster: state})
        changes.pods |= {pod.ref for pod in patched.values()}
        return dataclasses.replace(snapshot, cset=cset)

    def pods_for(self, snapshot) -> dict[str, dict]:
        """Per hooked sandbox: its pod's reference, its addresses as the tables know
        them, and whether it is ready (known to the tables: judged; else fail closed)."""
        out = {}
        for cid, sb in self.sandboxes.items():
            ref = self.ref_of(sb)
            pod = snapshot.cset.pod(ref) if (snapshot is not None and ref) else None
            ready = pod is not None and pod.can_take_part and \
                pod.node in (None, self.daemon.settings.node_name)
            ips = [str(ip) for ip in pod.ips] if ready else list(sb.ips)
            out[cid] = {"ref": ref, "ips": ips, "ready": bool(ready)}
        return out

    def status(self) -> dict:
        return {"pods": {cid: self.ref_of(sb) for cid, sb in self.sandboxes.items()},
                "failures": dict(self.failures)}


def detach_all(settings, out=print) -> int:
    """``mcnp run --detach-all``: take mcnp's hooks off every pod interface of this node
    (node-side ends in the node's namespace, pod ends in every recorded or findable pod
    namespace) and remove its pinned maps. The pods' traffic then flows on the CNI's
    path, unfiltered; connections are not cut. Exit code 0, or 1 if any hook stayed."""
    from fastpath.kernel import Kernel
    from fastpath.netlink import links
    from fastpath.netns import Namespace

    def sweep(ns: Optional[Namespace], where: str) -> tuple[int, int]:
        done = failed = 0
        try:
            ctx = ns.entered() if ns is not None else contextlib.nullcontext()
            with ctx:
                for link in links():
                    if Kernel.hooked(link.name):
                        try:
                            done += Kernel.detach(link.name)
                        except OSError as e:
                            failed += 1
                            out(f"{where} {link.name}: {e}")
        except OSError as e:
            out(f"{where}: cannot enter ({e})")
        return done, failed

    node = Namespace.from_name(settings.netns) if settings.netns else None
    done, failed = sweep(node, "node")
    # The pods' own ends: only the sandboxes this node recorded (found pods are recorded
    # too). Never every namespace of the machine: another node's pods may live there.
    paths = {sb.netns for sb in load_sandboxes(settings.state_dir)}
    for path in sorted(paths):
        with contextlib.suppress(OSError), Namespace.from_path(path) as ns:
            d, f = sweep(ns, path)
            done, failed = done + d, failed + f
    if node is not None:
        node.close()
    removed = []
    for name in ("flows_v1", "classes_v1", "pods_v1", "node_addrs_v1", "config_v1"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(settings.bpf_dir, name))
            removed.append(name)
    out(f"detached {done} hook(s){f', {failed} could not be' if failed else ''}; "
        f"removed {len(removed)} pinned map(s) from {settings.bpf_dir}")
    return 1 if failed else 0
