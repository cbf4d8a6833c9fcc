"""Addresses and links of the calling thread's network namespace, by rtnetlink dumps.

Rule S10: traffic between the node and its own pods always passes (kubelet
probes, hostNetwork pods).  The hooks know the node by its addresses, which the
CNI adds as pods come (a ptp gateway on each host-side veth, a bridge's
address), so the worker reads them again now and then; a dump costs one system
call, where running ``ip`` would cost a process.  Links tell which node-side
interface is the peer of a pod's eth0 (a veth's IFLA_LINK), whatever the CNI
named it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

RTM_GETLINK, RTM_GETADDR = 18, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK = 1, 3, 5
_NLMSG = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    peer_index: int  # IFLA_LINK: a veth's peer (in the peer's namespace), else 0
    mac: str


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(buf, off)
        if length < _RTA.size:
            break
        out[kind & 0x3fff] = buf[off + _RTA.size:off + length]
        off += _align(length)
    return out


def _dump(kind: int, header: bytes):
    """(message body offset, end, data) of every message of one dump."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.send(_NLMSG.pack(_NLMSG.size + len(header), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + header)
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _, _, _ = _NLMSG.unpack_from(data, off)
                if mtype in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSG.size:
                    return
                yield off + _NLMSG.size, off + length, data
                off += _align(length)


def addresses() -> list[tuple[str, int]]:
    """(address, interface index) of every unicast address but loopback's."""
    out = []
    for body, end, data in _dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        family, _, _, _, index = _IFADDR.unpack_from(data, body)
        attrs = _attrs(data, body + _IFADDR.size, end)
        # IFA_LOCAL is the interface's own; IFA_ADDRESS the peer's on a point-to-point
        # link, else the same address
        value = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
        if value is None or len(value) not in (4, 16) or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(value)
        if not ip.is_loopback:
            out.append((str(ip), index))
    return out


def local_addresses() -> set[str]:
    """Every unicast address of the namespace (loopback excluded: pods never see it)."""
    return {ip for ip, _ in addresses()}


def links() -> list[Link]:
    out = []
    for body, end, data in _dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        _, _, index, _, _ = _IFINFO.unpack_from(data, body)
        attrs = _attrs(data, body + _IFINFO.size, end)
        name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
        peer = struct.unpack("=i", attrs[IFLA_LINK])[0] if len(attrs.get(IFLA_LINK, b"")) == 4 else 0
        mac = ":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b""))
        out.append(Link(index, name, peer, mac))
    return out
