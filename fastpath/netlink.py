"""The addresses of the node's own network namespace, read with one rtnetlink dump.

Rule S10: traffic between the node and its own pods always passes (kubelet
probes, hostNetwork pods).  The hooks know the node by its addresses, which the
CNI adds as pods come (a ptp gateway on each host-side veth, a bridge's
address), so the worker reads them again now and then; a dump costs one
system call, where running ``ip`` would cost a process.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

RTM_GETADDR = 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSG = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(buf: bytes, off: int, end: int):
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(buf, off)
        if length < _RTA.size:
            return
        yield kind, buf[off + _RTA.size:off + length]
        off += _align(length)


def local_addresses() -> set[str]:
    """Every unicast address of every interface of the calling thread's namespace
    (loopback excluded: pods never see it as a source)."""
    out: set[str] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        req = _NLMSG.pack(_NLMSG.size + _IFADDR.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + \
            _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        s.send(req)
        while True:
            data = s.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSG.size:
                    return out
                family = data[off + _NLMSG.size]
                body = off + _NLMSG.size + _IFADDR.size
                attrs = dict(_attrs(data, body, off + length))
                # IFA_LOCAL is the interface's own; IFA_ADDRESS the peer's on a
                # point-to-point link, else the same address
                value = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
                if value is not None and len(value) in (4, 16) and \
                        family in (socket.AF_INET, socket.AF_INET6):
                    ip = ipaddress.ip_address(value)
                    if not ip.is_loopback:
                        out.add(str(ip))
                off += _align(length)
