"""Batch frame parsing into numpy columns, and L4 checksum repair.

The packet loop receives frames as (UMEM address, length) pairs.  One call to
:func:`parse_batch` turns a whole batch into column arrays held by a
:class:`ParsedBatch` (status, addresses, ports, ...), so conntrack and the
matcher work on numpy views and the FFI is crossed once per batch.

Status codes (``ParsedBatch.status``):

=====================  ====  ==============================================
``OK_IP``                 0  IPv4/IPv6; L3 and L4 fields filled in
``NON_IP``                1  ARP and every other non-IP ethertype (LLDP,
                             802.3 length frames, unknown types): switched
                             at L2 without policy; ``ethertype`` tells which
``ND``                    2  IPv6 link control that IPv6 needs to work:
                             NDP (ICMPv6 133-137) and MLD (130-132, 143);
                             pass without policy
``FRAGMENT``              3  non-first IP fragment: addresses and protocol
                             known, ports are not (``frag`` == 2)
``TRUNCATED``            16  frame ends before a header it declares (also a
                             frame shorter than the IP length field says)
``BAD_LENGTH``           17  IPv4 total length smaller than its header
``BAD_IHL``              18  IPv4 IHL < 5
``BAD_VERSION``          19  IP version nibble disagrees with the ethertype
``BAD_EXT_HEADER``       20  IPv6: > 8 extension headers, hop-by-hop not
                             first, or two fragment headers
``TOO_MANY_TAGS``        21  more than two VLAN tags
``TINY_FRAGMENT``        22  first fragment too short for its L4 header
``BAD_DESCRIPTOR``       23  addr/len outside the buffer (or len > 65535)
``BAD_L4_HEADER``        24  TCP data offset < 5 or beyond the packet, UDP
                             length field inconsistent
=====================  ====  ==============================================

Every status >= ``MALFORMED_MIN`` is malformed: drop it and count it.  For a
malformed frame the IP and L4 fields are zero; MACs, VLANs, ethertype and
l3_off are kept when they were parsed.  The parser never reads outside
``buf[addr:addr+len]``.
"""

from __future__ import annotations

import numpy as np

from fastpath._dp import ffi, lib

OK_IP = lib.MCNP_OK_IP
NON_IP = lib.MCNP_NON_IP
ND = lib.MCNP_ND
FRAGMENT = lib.MCNP_FRAGMENT
MALFORMED_MIN = lib.MCNP_MALFORMED_MIN
TRUNCATED = lib.MCNP_TRUNCATED
BAD_LENGTH = lib.MCNP_BAD_LENGTH
BAD_IHL = lib.MCNP_BAD_IHL
BAD_VERSION = lib.MCNP_BAD_VERSION
BAD_EXT_HEADER = lib.MCNP_BAD_EXT_HEADER
TOO_MANY_TAGS = lib.MCNP_TOO_MANY_TAGS
TINY_FRAGMENT = lib.MCNP_TINY_FRAGMENT
BAD_DESCRIPTOR = lib.MCNP_BAD_DESCRIPTOR
BAD_L4_HEADER = lib.MCNP_BAD_L4_HEADER

#: status code -> name, for counters and logs
STATUS_NAMES = {
    OK_IP: "ok_ip", NON_IP: "non_ip", ND: "nd", FRAGMENT: "fragment",
    TRUNCATED: "truncated", BAD_LENGTH: "bad_length", BAD_IHL: "bad_ihl",
    BAD_VERSION: "bad_version", BAD_EXT_HEADER: "bad_ext_header",
    TOO_MANY_TAGS: "too_many_tags", TINY_FRAGMENT: "tiny_fragment",
    BAD_DESCRIPTOR: "bad_descriptor", BAD_L4_HEADER: "bad_l4_header",
}

#: frag column values
FRAG_NONE, FRAG_FIRST, FRAG_NONFIRST = 0, 1, 2

BROADCAST_MAC = 0xFFFF_FFFF_FFFF

# (field, dtype, per-frame shape) in the order of struct mcnp_parsed
_FIELDS = (
    ("status", np.uint8, ()), ("family", np.uint8, ()), ("proto", np.uint8, ()),
    ("frag", np.uint8, ()), ("tcp_flags", np.uint8, ()), ("icmp_type", np.uint8, ()),
    ("icmp_code", np.uint8, ()), ("src", np.uint8, (16,)), ("dst", np.uint8, (16,)),
    ("sport", np.uint16, ()), ("dport", np.uint16, ()), ("ethertype", np.uint16, ()),
    ("vlan", np.uint16, ()), ("vlan_inner", np.uint16, ()), ("l3_off", np.uint16, ()),
    ("l4_off", np.uint16, ()), ("l4_len", np.uint16, ()),
    ("eth_src", np.uint64, ()), ("eth_dst", np.uint64, ()),
)

_CTYPES = {np.uint8: "uint8_t *", np.uint16: "uint16_t *", np.uint64: "uint64_t *"}


class ParsedBatch:
    """Column arrays for up to ``capacity`` parsed frames, reused across batches.

    Allocate one per packet loop and pass it as ``out`` to :func:`parse_batch`;
    the arrays are filled in place, so views taken from them are only valid
    until the next parse.  ``n`` is the number of frames of the last parse;
    rows ``[n:]`` hold stale data.  The C side writes through pointers to
    these arrays: read and slice them, never rebind them.

    Columns (all length ``capacity``): ``status``, ``family`` (4, 6, or 0),
    ``proto``, ``frag`` (0/1/2), ``tcp_flags``, ``icmp_type``, ``icmp_code``
    (uint8); ``src``, ``dst`` (uint8[capacity, 16], network order, IPv4 as
    ``::ffff:a.b.c.d``; ``src_s16``/``dst_s16`` are the same bytes as 'S16'
    views, one value per frame); ``sport``, ``dport`` (uint16 host order; the
    echo identifier in both for ICMP echo), ``ethertype`` (innermost),
    ``vlan`` (outer VID), ``vlan_inner`` (QinQ inner VID), ``l3_off``,
    ``l4_off``, ``l4_len`` (uint16); ``eth_src``, ``eth_dst`` (uint64, the
    MAC as a 48-bit big-endian integer: broadcast is ``0xffffffffffff``, the
    multicast bit is ``(mac >> 40) & 1``).
    """

    def __init__(self, capacity: int = 256):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.n = 0
        self._c = ffi.new("struct mcnp_parsed *")
        self._c.capacity = capacity
        for name, dtype, shape in _FIELDS:
            arr = np.zeros((capacity, *shape), dtype=dtype)
            setattr(self, name, arr)
            setattr(self._c, name, ffi.cast(_CTYPES[dtype], arr.ctypes.data))
        self.src_s16 = self.src.view("S16").reshape(capacity)
        self.dst_s16 = self.dst.view("S16").reshape(capacity)

    def c_address(self) -> int:
        """Address of the C ``struct mcnp_parsed`` over these arrays, for other cffi
        modules that parse into them (``fastpath.loop``)."""
        return int(ffi.cast("uintptr_t", self._c))


def _u8_buffer(buf):
    """cdata over a contiguous byte buffer (numpy uint8 array, bytes, bytearray)."""
    return ffi.from_buffer("uint8_t[]", buf)


def _check_desc(addrs: np.ndarray, lens: np.ndarray, n: int, capacity: int) -> int:
    if addrs.dtype != np.uint64 or lens.dtype != np.uint32:
        raise TypeError("addrs must be uint64 and lens uint32 numpy arrays")
    if not (addrs.flags.c_contiguous and lens.flags.c_contiguous):
        raise ValueError("addrs and lens must be C-contiguous")
    if n < 0 or n > len(addrs) or n > len(lens):
        raise ValueError(f"n={n} exceeds the descriptor arrays")
    if n > capacity:
        raise ValueError(f"n={n} exceeds the batch capacity {capacity}")
    return n


def parse_batch(buf, addrs: np.ndarray, lens: np.ndarray, n: int,
                out: ParsedBatch | None = None) -> ParsedBatch:
    """Parse frames ``buf[addrs[i]:addrs[i]+lens[i]]`` for ``i < n`` in one C call.

    ``buf`` is the UMEM (``Umem.buf``) or any contiguous byte buffer;
    ``addrs`` is uint64, ``lens`` uint32.  Pass ``out`` to reuse its arrays
    (the normal case in the packet loop); without it a batch of capacity
    ``max(n, 1)`` is allocated.  Returns ``out`` with ``out.n = n``.
    """
    if out is None:
        out = ParsedBatch(max(n, 1))
    _check_desc(addrs, lens, n, out.capacity)
    cbuf = _u8_buffer(buf)
    lib.mcnp_parse_batch(cbuf, len(cbuf), ffi.from_buffer("uint64_t[]", addrs),
                         ffi.from_buffer("uint32_t[]", lens), n, out._c)
    out.n = n
    return out


def fix_l4_checksums(buf, addrs: np.ndarray, lens: np.ndarray, parsed: ParsedBatch,
                     mask: np.ndarray | None = None, *, only_partial: bool = False) -> int:
    """Recompute L4 checksums in place for frames of ``parsed`` (its first ``n``).

    Frames whose pod sent them with CHECKSUM_PARTIAL (veth does for TCP and
    UDP) carry only the pseudo-header sum in the checksum field; forwarded
    through AF_XDP, the receiver would drop them.  This rewrites the TCP and
    UDP checksum (IPv4 and IPv6) and the SCTP CRC32c of every selected frame
    that parsed as ``OK_IP`` and is not a fragment.  ``mask`` (bool or uint8,
    length >= n) selects frames; None selects all.

    With ``only_partial``, a frame is rewritten only when its checksum field
    holds the CHECKSUM_PARTIAL signature (the pseudo-header sum for TCP/UDP,
    zero for SCTP), so a frame corrupted on the wire keeps its bad checksum
    and is dropped by the receiver instead of being laundered.  ``buf``
    must be writable.  Returns the number of frames rewritten.

    The IPv6 pseudo-header uses the header's destination, not a routing
    header's final destination.
    """
    n = _check_desc(addrs, lens, parsed.n, parsed.capacity)
    cmask = ffi.NULL
    if mask is not None:
        if len(mask) < n:
            raise ValueError("mask is shorter than the batch")
        m = np.ascontiguousarray(mask)
        m = m.view(np.uint8) if m.dtype == np.bool_ else m.astype(np.uint8, copy=False)
        cmask = ffi.from_buffer("uint8_t[]", m)
    cbuf = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
    return lib.mcnp_fix_l4_checksums(cbuf, len(cbuf), ffi.from_buffer("uint64_t[]", addrs),
                                     ffi.from_buffer("uint32_t[]", lens), n, parsed._c,
                                     cmask, int(only_partial))
