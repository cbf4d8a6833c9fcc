"""AF_XDP sockets over one shared UMEM: the packet loop's view of the rings.

Model
-----
A :class:`Umem` is one block of frames (``frames`` x ``frame_size`` bytes)
shared by the sockets of every :class:`Port`, plus a pool of free frames.
Because all ports share it, a frame received on one end of a pod's veth is
sent on the other end by address, without a copy.  Frames are named by their
UMEM address (uint64); ``umem.buf`` is the whole UMEM as a writable uint8
numpy array, so ``buf[addr:addr+len]`` is a frame.

Ownership of a frame is explicit and moves, never shared:

* :meth:`Port.rx` / :meth:`Port.rx_into` hand received frames to the caller;
* the caller then passes each to exactly one of :meth:`Port.tx` (the port
  owns it until its completion returns it to the pool) or :meth:`Umem.free`
  (dropped).

Each method crosses the FFI once per batch.  Completions are reaped and fill
rings refilled inside ``rx``/``tx``; nothing needs a timer.  The pool has no
lock: one thread (the packet loop) uses a Umem and its ports.

Lifetime
--------
A Port is only a socket: the hook that hands it frames is attached apart
(:mod:`fastpath.kernel`), and the socket receives once its fd is registered
in the hooks' XSKMAP.  Closing a port returns every frame the kernel still
held for it to the pool and closes the socket; closing a Umem closes its
remaining ports first.  Every live Umem is also closed at interpreter exit.

Namespaces: a Port is opened while the calling thread is in the network
namespace of its interface (a pod's eth0 lives in the pod's); the socket
stays bound there.  The Umem's own socket is parked on a loopback device, in
a private namespace when allowed, so ports open and close in any order.

Errors: every C failure becomes :class:`XskError` (an ``OSError`` with the
errno) in :func:`_check`, the only place that interprets these return codes.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os

import numpy as np

from fastpath._dp import ffi, lib

logger = logging.getLogger(__name__)

#: Bytes of one slot: the longest packet userspace takes whole.
SLOT_BYTES = lib.MCNP_SLOT_BYTES


class XskError(OSError):
    """A failed AF_XDP/BPF operation; ``errno`` holds the kernel's error."""


def _check(rc: int, what: str) -> int:
    """Return rc if it is >= 0, else raise XskError naming the operation."""
    if rc < 0:
        code = -rc
        raise XskError(code, f"{what}: {os.strerror(code)}")
    return rc


def _u64(a: np.ndarray):
    if a.dtype != np.uint64 or not a.flags.c_contiguous:
        raise TypeError("frame addresses must be a C-contiguous uint64 array")
    return ffi.from_buffer("uint64_t[]", a)


def _u32(a: np.ndarray):
    if a.dtype != np.uint32 or not a.flags.c_contiguous:
        raise TypeError("frame lengths must be a C-contiguous uint32 array")
    return ffi.from_buffer("uint32_t[]", a)


# Strong references: a Umem or Port the caller forgot still gets closed at exit.
_live_umems: "set[Umem]" = set()


@atexit.register
def _close_all() -> None:
    for umem in list(_live_umems):
        umem.close()


class Umem:
    """One UMEM shared by all ports, with its pool of free frames.

    ``frames`` x ``frame_size`` bytes are mapped anonymously and registered
    with the kernel.  ``frame_size`` is a power of two in [2048, 4096]; a
    frame holds at most ``frame_size - 256`` bytes of packet in copy mode
    (the kernel keeps XDP headroom), so 2048 covers MTU 1500 and 4096 covers
    the veth XDP maximum (3506).  ``ring_size`` (power of two) sizes every
    ring of every port; the frames must cover all ports' fill targets plus
    frames in flight.

    ``slots`` (``SLOT_BYTES`` each, after the frames) take packets longer than a
    frame, which the kernel hands over in several descriptors (multi-buffer):
    :meth:`Port.rx` copies the pieces into a free slot and hands over the slot
    as one frame, transmitted and freed like any other.  With none, or on a
    kernel that refuses multi-buffer sockets (before 6.6), ``multi_buffer`` is
    false and such packets never reach userspace whole.
    """

    def __init__(self, frames: int = 4096, frame_size: int = 2048, ring_size: int = 2048,
                 slots: int = 0):
        self.frames = frames
        self.frame_size = frame_size
        self.ring_size = ring_size
        self.slots = slots
        self._ports: "set[Port]" = set()
        self._mem = mmap.mmap(-1, frames * frame_size + slots * SLOT_BYTES,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        #: the whole UMEM as uint8; frame at addr is buf[addr:addr+len]
        self.buf = np.frombuffer(self._mem, dtype=np.uint8)
        area = ffi.from_buffer(self._mem)
        out = ffi.new("struct mcnp_umem **")
        _check(lib.mcnp_umem_create(out, area, frames, frame_size, ring_size, slots),
               f"creating a UMEM of {frames} x {frame_size} B frames and {slots} slots")
        self._area = area
        self._c = out[0]
        _live_umems.add(self)

    def c_address(self) -> int:
        """Address of the C ``struct mcnp_umem``, for other cffi modules that drive the
        rings in their own batch loop (``fastpath.loop``); valid while the Umem is open."""
        if not self._c:
            _check(-errno.EBADF, "the UMEM is closed")
        return int(ffi.cast("uintptr_t", self._c))

    @property
    def free_frames(self) -> int:
        """Frames currently in the pool."""
        return lib.mcnp_umem_free_frames(self._c) if self._c else 0

    @property
    def free_slots(self) -> int:
        """Slots free for a packet in pieces (see the class)."""
        return lib.mcnp_umem_free_slots(self._c) if self._c else 0

    @property
    def multi_buffer(self) -> bool:
        """Whether the sockets take packets longer than a frame (slots, and a kernel that allows it)."""
        return bool(self._c) and bool(lib.mcnp_umem_multi_buffer(self._c))

    @property
    def bad_frees(self) -> int:
        """Frees refused because the frame was already free or out of range."""
        return lib.mcnp_umem_bad_frees(self._c) if self._c else 0

    def alloc(self, n: int) -> np.ndarray:
        """Take up to n frames from the pool (fewer if it runs dry); caller owns them."""
        out = np.empty(n, dtype=np.uint64)
        got = lib.mcnp_pool_alloc(self._c, ffi.from_buffer("uint64_t[]", out), n)
        return out[:got]

    def free(self, addrs: np.ndarray) -> None:
        """Return frames the caller owns to the pool (any address inside a frame)."""
        lib.mcnp_pool_free(self._c, _u64(addrs), len(addrs))

    def close(self) -> None:
        """Close every port of this UMEM, then unregister it.  Idempotent."""
        if not self._c:
            return
        for port in list(self._ports):
            port.close()
        _check(lib.mcnp_umem_destroy(self._c), "destroying the UMEM")
        self._c = None
        self._area = None
        _live_umems.discard(self)
        # numpy views may still reference the mapping; it goes when they do.

    def __enter__(self) -> "Umem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Port:
    """One AF_XDP socket on queue ``queue`` of ``ifname``, sharing ``umem``.

    Made in copy mode with need-wakeup (bind retried on EBUSY for up to 2 s),
    its fill ring kept at ``fill`` frames (default 32).  ``fd`` is the socket's
    file descriptor (register it in the XSKMAP; poll it for frames).
    """

    def __init__(self, umem: Umem, ifname: str, *, queue: int = 0, fill: int = 32):
        self.umem = umem
        self.ifname = ifname
        self.queue = queue
        out = ffi.new("struct mcnp_port **")
        _check(lib.mcnp_port_open(out, umem._c, ifname.encode(), queue, fill),
               f"opening an AF_XDP socket on {ifname} queue {queue}")
        self._c = out[0]
        self.fd = lib.mcnp_port_fd(self._c)
        self._stats = ffi.new("struct mcnp_port_stats *")
        umem._ports.add(self)

    def c_address(self) -> int:
        """Address of the C ``struct mcnp_port`` (see :meth:`Umem.c_address`)."""
        if not self._c:
            _check(-errno.EBADF, f"port {self.ifname} is closed")
        return int(ffi.cast("uintptr_t", self._c))
    def rx_into(self, addrs: np.ndarray, lens: np.ndarray, offset: int = 0,
                max: int | None = None) -> int:
        """Receive into ``addrs[offset:]``/``lens[offset:]``; returns the count.

        Takes at most ``max`` (default: the room left) frames, which the caller
        then owns.  Use offsets to gather several ports into one batch.
        """
        room = min(len(addrs), len(lens)) - offset
        if room < 0:
            raise ValueError("offset beyond the arrays")
        want = room if max is None else min(max, room)
        return _check(lib.mcnp_port_rx(self._c, _u64(addrs) + offset, _u32(lens) + offset,
                                        want), f"receiving on {self.ifname}")

    def rx(self, max: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Receive up to ``max`` frames; returns new (addrs, lens) arrays the caller owns."""
        addrs = np.empty(max, dtype=np.uint64)
        lens = np.empty(max, dtype=np.uint32)
        n = self.rx_into(addrs, lens)
        return addrs[:n], lens[:n]

    def tx(self, addrs: np.ndarray, lens: np.ndarray) -> int:
        """Transmit frames; takes ownership of all of them.  Returns frames queued.

        Frames that find the TX ring full, or whose descriptor lies outside
        the UMEM, are returned to the pool and counted (``tx_ring_full``,
        ``tx_invalid``).  Kicks the kernel until the copy-mode TX drained
        (bounded), then reaps completions.
        """
        n = len(addrs)
        if len(lens) != n:
            raise ValueError("addrs and lens differ in length")
        if n == 0:
            return 0
        return _check(lib.mcnp_port_tx(self._c, _u64(addrs), _u32(lens), n),
                      f"transmitting on {self.ifname}")

    def reap(self) -> int:
        """Return completed TX frames to the pool (rx and tx also do this)."""
        return lib.mcnp_port_reap(self._c)

    def stats(self) -> dict[str, int]:
        """Ring counters: rx_frames, tx_frames, tx_queued, tx_ring_full, ..."""
        lib.mcnp_port_get_stats(self._c, self._stats)
        return {name: int(getattr(self._stats, name))
                for name, _ in ffi.typeof("struct mcnp_port_stats").fields}

    @property
    def closed(self) -> bool:
        return self._c is None

    def close(self) -> None:
        """Close the socket and give its frames back.  Idempotent."""
        if getattr(self, "_c", None) is None:
            return
        lib.mcnp_port_close(self._c)
        self._c = None
        self.umem._ports.discard(self)

    def __enter__(self) -> "Port":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Port", "Umem", "XskError"]
