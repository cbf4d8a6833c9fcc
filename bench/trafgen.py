"""A bounded line-rate traffic generator and an XDP frame counter, for benchmarks.

:class:`Generator` pushes one crafted frame (:mod:`tests.frames`) out of an
interface many times with ``BPF_PROG_RUN`` and ``BPF_F_TEST_XDP_LIVE_FRAMES`` on a
two-instruction XDP program returning ``XDP_TX`` (csrc/trafgen.c): the kernel
transmits every repetition as a real frame, so one core produces millions of frames
per second with no userspace copy.  Every run is bounded in count and time.
:class:`Counter` counts (and drops) what arrives on an interface with a tiny XDP
program and a per-CPU counter map.  The node daemon never imports this module.
"""

from __future__ import annotations

import socket
import time

import numpy as np

from tests.frames import frame  # noqa: F401  (re-exported for the benchmarks)

# ---------------------------------------------------------------------------
# line-rate generator and counter (csrc/trafgen.c)

CLONE_NEWNET = 0x40000000


class TrafgenError(OSError):
    """A failed BPF operation of the generator or counter."""


def _lib():
    from bench._trafgen import ffi, lib
    return ffi, lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        import os
        raise TrafgenError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class _InNetns:
    """Switch this thread into a named network namespace and back (setns)."""

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self):
        if self.name is None:
            return self
        import ctypes
        import os
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if self._libc.setns(fd, CLONE_NEWNET) != 0:
                raise TrafgenError(ctypes.get_errno(), f"setns into {self.name}")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        if self.name is None:
            return
        import os
        try:
            self._libc.setns(self._own, CLONE_NEWNET)
        finally:
            os.close(self._own)


#: Frames in the generator's first BPF_PROG_RUN call, which measures the rate.
FIRST_CHUNK = 100_000
#: Seconds each later call lasts (see :meth:`Generator.run`).
CHUNK_S = 1.0


class Generator:
    """Transmit one frame over and over out of ``ifname`` (in ``netns``), bounded.

    The frames leave ``ifname`` as if an XDP program had bounced them
    (``XDP_TX``): on a veth they arrive at its peer.  The peer must be able
    to receive XDP frames (an XDP program attached, or GRO on).
    """

    def __init__(self, ifname: str, frame_bytes: bytes, netns: str | None = None,
                 batch_size: int = 64):
        import os
        self.ffi, self.lib = _lib()
        self.netns = netns
        with _InNetns(netns):
            self.ifindex = socket.if_nametoindex(ifname)
            self.fd = _check(self.lib.mcnp_tg_load_tx(), "loading the generator program")
        self.frame = self.ffi.from_buffer("uint8_t[]", frame_bytes)
        self.length = len(frame_bytes)
        self.batch_size = batch_size
        self._close = os.close

    def run(self, count: int, seconds: float, chunk: int | None = None) -> tuple[int, float]:
        """Send up to ``count`` frames, stopping after ``seconds``; returns (sent, elapsed).

        Calls are few and long: every BPF_PROG_RUN of an XDP program adds it to the
        kernel's XDP dispatcher and removes it afterwards, each change waiting for an
        RCU grace period — 15-35 ms while a busy AF_XDP worker holds the other CPU
        (``synchronize_rcu`` in ``bpf_dispatcher_change_prog``), long enough to starve
        what is measured. The first call (``FIRST_CHUNK`` frames) measures the rate,
        later ones last about ``CHUNK_S`` each; ``chunk`` fixes the frames per call."""
        sent = 0
        start = time.monotonic()
        k_next = chunk or FIRST_CHUNK
        with _InNetns(self.netns):  # the ingress ifindex is resolved in the caller's netns
            while sent < count:
                k = min(k_next, count - sent)
                _check(self.lib.mcnp_tg_run(self.fd, self.ifindex, self.frame, self.length, k,
                                            self.batch_size, self.ffi.NULL), "BPF_PROG_RUN")
                sent += k
                elapsed = time.monotonic() - start
                left = seconds - elapsed
                if left <= 0:
                    break
                if chunk is None:
                    k_next = max(FIRST_CHUNK, int(sent / elapsed * min(CHUNK_S, left)))
        return sent, time.monotonic() - start

    def close(self) -> None:
        if self.fd >= 0:
            self._close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Counter:
    """Count (and drop) every frame arriving on ``ifname`` with an XDP program."""

    def __init__(self, ifname: str, netns: str | None = None, generic: bool = False):
        import os
        self.ffi, self.lib = _lib()
        self.netns = netns
        self.generic = int(generic)
        self._close = os.close
        map_fd = self.ffi.new("int *")
        with _InNetns(netns):
            self.ifindex = socket.if_nametoindex(ifname)
            self.fd = _check(self.lib.mcnp_tg_counter_load(map_fd), "loading the counter program")
            self.map_fd = map_fd[0]
            try:
                _check(self.lib.mcnp_tg_attach(self.ifindex, self.fd, self.generic),
                       f"attaching the counter to {ifname}")
            except TrafgenError:
                self._close(self.fd)
                self._close(self.map_fd)
                raise
        self._p = self.ffi.new("uint64_t *")
        self._b = self.ffi.new("uint64_t *")

    def read(self) -> tuple[int, int]:
        """(frames, bytes) counted so far."""
        _check(self.lib.mcnp_tg_counter_read(self.map_fd, self._p, self._b), "reading the counter")
        return int(self._p[0]), int(self._b[0])

    def close(self) -> None:
        if self.fd >= 0:
            with _InNetns(self.netns):
                self.lib.mcnp_tg_detach(self.ifindex, self.generic)
            self._close(self.fd)
            self._close(self.map_fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _generate(ifname, frame_bytes, netns, count, seconds, cpu, conn):
    import os
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        t0 = os.times()
        with Generator(ifname, frame_bytes, netns) as gen:
            sent, elapsed = gen.run(count, seconds)
        t1 = os.times()
        conn.send({"sent": sent, "elapsed": elapsed,
                   "cpu_s": (t1.user + t1.system) - (t0.user + t0.system)})
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})


def generate_in_process(ifname: str, frame_bytes: bytes, netns: str | None, count: int,
                        seconds: float, cpu: int | None = None):
    """Start the generator in a process of its own (pinned to ``cpu``).

    Returns ``(process, connection)``; ``connection.recv()`` yields
    ``{"sent", "elapsed", "cpu_s"}`` (or ``{"error"}``) when it is done.
    """
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_generate, args=(ifname, frame_bytes, netns, count, seconds, cpu, child),
                       daemon=True)
    proc.start()
    child.close()
    return proc, parent
