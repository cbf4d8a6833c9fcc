"""The packet-rate generator of the node benchmarks: a pod sending UDP as fast as one
CPU lets it, bounded in count and time.

An ``AF_PACKET`` socket on the pod's ``eth0`` (``PACKET_QDISC_BYPASS``) hands batches
of 1,024 crafted frames to the kernel per ``sendmmsg`` call (ctypes; Python's socket
module has no ``sendmmsg``), from a process pinned to one CPU in the pod's network
namespace. The frames take the path any packet of the pod takes: out of ``eth0``,
into the host-side end of its veth, through whatever the configuration put there.
(``BPF_PROG_RUN`` with live frames would be faster, but this kernel refuses it with
EPERM.)

With ``new_flows`` the generator rewrites the UDP ports of every frame of a batch
before sending it — source port ``SPORT_BASE + n % SPORT_SPAN``, destination port
``DPORT_BASE + (n // SPORT_SPAN) % DPORT_SPAN`` for the ``n``-th frame — so no flow
repeats within ``SPORT_SPAN * DPORT_SPAN`` frames; the UDP checksum is zero ("none",
allowed for IPv4), so rewriting ports needs no checksum work.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time

import numpy as np

logger = logging.getLogger(__name__)

BATCH = 1024
STRIDE = 64  # bytes per frame slot (a 60-byte minimum frame, padded)
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20
#: Offsets in an untagged IPv4 frame without options.
SPORT_AT, DPORT_AT, UDP_CSUM_AT = 34, 36, 40


class SendError(RuntimeError):
    """The generator could not run (the message says why)."""


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_IoVec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


def port_columns(seq0: int, n: int, sports: tuple[int, int], dports: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination ports of frames ``seq0 .. seq0+n-1`` (see the module)."""
    seq = np.arange(seq0, seq0 + n, dtype=np.int64)
    return ((sports[0] + seq % sports[1]).astype(np.uint16),
            (dports[0] + (seq // sports[1]) % dports[1]).astype(np.uint16))


class Batch:
    """``BATCH`` copies of one frame and the ``mmsghdr`` array that sends them."""

    def __init__(self, frame_bytes: bytes):
        if not 14 + 28 <= len(frame_bytes) <= STRIDE:
            raise SendError(f"frames of {len(frame_bytes)} bytes: want 42 to {STRIDE}")
        self.buf = np.zeros((BATCH, STRIDE), dtype=np.uint8)
        self.buf[:, :len(frame_bytes)] = np.frombuffer(frame_bytes, dtype=np.uint8)
        base = self.buf.ctypes.data
        self.iov = (_IoVec * BATCH)(*[_IoVec(base + i * STRIDE, len(frame_bytes)) for i in range(BATCH)])
        self.msgs = (_MMsgHdr * BATCH)()
        for i in range(BATCH):
            self.msgs[i].hdr.iov = ctypes.pointer(self.iov[i])
            self.msgs[i].hdr.iovlen = 1

    def set_ports(self, sport: np.ndarray, dport: np.ndarray) -> None:
        self.buf[:, SPORT_AT:SPORT_AT + 2] = sport.astype(">u2").view(np.uint8).reshape(-1, 2)
        self.buf[:, DPORT_AT:DPORT_AT + 2] = dport.astype(">u2").view(np.uint8).reshape(-1, 2)
        self.buf[:, UDP_CSUM_AT:UDP_CSUM_AT + 2] = 0


def _open(netns: str, ifname: str) -> socket.socket:
    from control.lab.net import in_netns
    with in_netns(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    with in_netns(netns):
        s.bind((ifname, 0))
    return s


def send(netns: str, ifname: str, frame_bytes: bytes, count: int, seconds: float,
         new_flows: tuple[tuple[int, int], tuple[int, int]] | None = None) -> dict:
    """Send up to ``count`` frames for at most ``seconds`` (this process, this CPU);
    ``new_flows`` = (sports, dports) as (base, span) makes every frame a new flow.
    Returns ``{"sent", "elapsed", "cpu_s", "refused"}`` (refused: frames the kernel
    would not take at once, e.g. a full queue; they count as not sent)."""
    libc = ctypes.CDLL(None, use_errno=True)
    batch = Batch(frame_bytes)
    sock = _open(netns, ifname)
    sent = refused = 0
    seq = 0
    t_cpu, start = os.times(), time.monotonic()
    try:
        while sent < count and time.monotonic() - start < seconds:
            if new_flows is not None:
                batch.set_ports(*port_columns(seq, BATCH, *new_flows))
            n = libc.sendmmsg(sock.fileno(), batch.msgs, min(BATCH, count - sent), 0)
            if n < 0:
                err = ctypes.get_errno()
                if err not in (11, 105):  # EAGAIN, ENOBUFS: the device queue is full
                    raise SendError(f"sendmmsg on {ifname}: {os.strerror(err)}")
                refused += BATCH
                continue
            sent += n
            seq += n
    finally:
        sock.close()
    elapsed = time.monotonic() - start
    t1 = os.times()
    return {"sent": sent, "elapsed": elapsed, "cpu_s": (t1.user + t1.system) - (t_cpu.user + t_cpu.system),
            "refused": refused}


def _child(netns, ifname, frame_bytes, count, seconds, cpu, new_flows, conn):
    try:
        os.sched_setaffinity(0, {cpu})
        conn.send(send(netns, ifname, frame_bytes, count, seconds, new_flows))
    except Exception as e:  # reported to the parent, which raises it
        conn.send({"error": f"{type(e).__name__}: {e}"})


def send_in_process(netns: str, ifname: str, frame_bytes: bytes, count: int, seconds: float, cpu: int,
                    new_flows=None, timeout: float = 60.0) -> dict:
    """:func:`send` in a process of its own pinned to ``cpu``; raises SendError."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(netns, ifname, frame_bytes, count, seconds, cpu, new_flows, child),
                       daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise SendError(f"the generator on {ifname} did not finish within {timeout:.0f} s")
        res = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if "error" in res:
        raise SendError(f"generator on {ifname}: {res['error']}")
    return res
