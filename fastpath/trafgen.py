"""Traffic generation: frame crafting, and a bounded line-rate generator.

Frame crafting (:func:`frame`, :func:`arp_request`, :class:`FrameBuffer`)
builds exact Ethernet frames with correct checksums for tests, fuzzing and
the generator.  :class:`Generator` pushes one crafted frame out of an
interface many times with ``BPF_PROG_RUN`` and ``BPF_F_TEST_XDP_LIVE_FRAMES``
on a two-instruction XDP program returning ``XDP_TX`` (csrc/trafgen.c): the
kernel transmits every repetition as a real frame, so one core produces
millions of frames per second with no userspace copy.  Every run is bounded
in count and time.  :class:`Counter` counts (and drops) what arrives on an
interface with a tiny XDP program and a per-CPU counter map.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

import numpy as np

# ---------------------------------------------------------------------------
# frame crafting


def mac_bytes(mac: str | int | bytes) -> bytes:
    if isinstance(mac, bytes):
        return mac
    if isinstance(mac, int):
        return mac.to_bytes(6, "big")
    return bytes(int(x, 16) for x in mac.split(":"))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return ~crc & 0xFFFFFFFF


def l4_header(proto: int, sport: int, dport: int, *, flags: int = 0x02, icmp_type: int | None = None,
              chunk: int = 1, payload: bytes = b"", v6: bool = False) -> bytes:
    """An L4 header plus payload with its checksum left zero (filled in by :func:`frame`)."""
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if proto == 132:
        body = payload or b"\0" * 16
        chunk_hdr = struct.pack("!BBH", chunk, 0, 4 + len(body))
        return struct.pack("!HHII", sport, dport, 1, 0) + chunk_hdr + body
    if proto in (1, 58):
        t = icmp_type if icmp_type is not None else (128 if v6 else 8)
        return struct.pack("!BBHHH", t, 0, 0, sport, 1) + payload
    return payload


def frame(src_ip: str, dst_ip: str, proto: int = 17, sport: int = 1234, dport: int = 80, *,
          src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02", flags: int = 0x02,
          icmp_type: int | None = None, chunk: int = 1, payload: bytes = b"",
          pad_to: int = 60, checksum: bool = True) -> bytes:
    """One Ethernet frame carrying IPv4 or IPv6 (by address family) with valid checksums.

    ``flags`` are TCP flags (default SYN); ``chunk`` the SCTP chunk type;
    ``icmp_type`` the ICMP type (default echo request; the echo id is ``sport``).
    """
    s, d = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
    v6 = s.version == 6
    l4 = bytearray(l4_header(proto, sport, dport, flags=flags, icmp_type=icmp_type,
                             chunk=chunk, payload=payload, v6=v6))
    if checksum:
        if proto in (6, 17) or (proto == 58 and v6):
            if v6:
                pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), proto)
            else:
                pseudo = s.packed + d.packed + struct.pack("!xBH", proto, len(l4))
            off = {6: 16, 17: 6, 58: 2}[proto]
            c = _csum(pseudo + bytes(l4))
            if proto == 17 and c == 0:
                c = 0xFFFF
            l4[off:off + 2] = struct.pack("!H", c)
        elif proto == 1:
            l4[2:4] = struct.pack("!H", _csum(bytes(l4)))
        elif proto == 132:
            l4[8:12] = struct.pack("<I", _crc32c(bytes(l4)))
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + s.packed + d.packed
        ethertype = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                          s.packed, d.packed)
        ip = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        ethertype = 0x0800
    f = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + ip + bytes(l4)
    return f + b"\0" * max(0, pad_to - len(f))


def arp_request(src_mac, src_ip: str, target_ip: str) -> bytes:
    """A broadcast ARP who-has."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac_bytes(src_mac),
                       socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(target_ip))
    f = b"\xff" * 6 + mac_bytes(src_mac) + b"\x08\x06" + body
    return f + b"\0" * (60 - len(f))


class FrameBuffer:
    """Frames laid out in one numpy buffer as (address, length) descriptors.

    The same shape the packet loop gets from the UMEM, so parse, conntrack,
    switch and loop logic can be driven without sockets.  ``frame_size``
    bounds each frame; ``spare`` extra frame slots are kept free for copies.
    """

    def __init__(self, frames: list[bytes], frame_size: int = 2048, spare: int = 0):
        total = len(frames) + spare
        self.frame_size = frame_size
        self.buf = np.zeros(max(total, 1) * frame_size, dtype=np.uint8)
        self.addrs = np.arange(len(frames), dtype=np.uint64) * np.uint64(frame_size)
        self.lens = np.zeros(len(frames), dtype=np.uint32)
        for i, f in enumerate(frames):
            f = f[:frame_size]
            a = int(self.addrs[i])
            self.buf[a:a + len(f)] = np.frombuffer(f, dtype=np.uint8)
            self.lens[i] = len(f)
        self.free = list(range(len(frames) * frame_size, total * frame_size, frame_size))

    def bytes_of(self, addr: int, length: int) -> bytes:
        return self.buf[int(addr):int(addr) + int(length)].tobytes()


# ---------------------------------------------------------------------------
# line-rate generator and counter (csrc/trafgen.c)

CLONE_NEWNET = 0x40000000


class TrafgenError(OSError):
    """A failed BPF operation of the generator or counter."""


def _lib():
    from fastpath._trafgen import ffi, lib
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
