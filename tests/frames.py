"""Frame crafting for tests: exact Ethernet frames with correct
checksums (:func:`frame`, :func:`arp_request`), so parser, hooks and pipeline can be
driven with frames whose every byte is known."""

from __future__ import annotations

import ipaddress
import socket
import struct


# ---------------------------------------------------------------------------
# frame crafting


def mac_bytes(mac: str | int | bytes) -> bytes:
    if isinstance(mac, bytes):
        return mac
    if isinstance(mac, int):
        return mac.to_bytes(6, "big")
    return bytes(int(x, 16) for x in mac.split(":"))


def inet_sum(data: bytes) -> int:
    """The folded one's-complement sum of 16-bit words (RFC 1071), odd length padded."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum(data: bytes) -> int:
    return ~inet_sum(data) & 0xFFFF


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
