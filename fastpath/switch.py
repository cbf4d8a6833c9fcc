"""The node's L2 switch (DESIGN §4): ports, anti-spoofing, a learned MAC table.

Ports are numbered 0..P-1 in the order given; each is a *pod port* bound to
its pod's IP addresses, or the *uplink*.  Three questions are asked of every
frame:

* which IP frames from pod ports carry a source address that is not their
  pod's (dropped and counted: no workload can borrow another's identity);
* which port each source MAC lives behind (learning);
* the output port of each frame, or ``FLOOD`` for broadcast, multicast and
  unknown unicast (the loop copies those to every other port).

The packet loop answers them in C (``csrc/pipeline.c``) straight from this
object's arrays: ``bound``, ``is_pod`` and the MAC table's sorted ``macs``,
``ports`` and ``seen``.  Those arrays are replaced, never resized in place,
when they change (:meth:`Switch.bind`, :meth:`MacTable.update`,
:meth:`MacTable.expire`), which is how the pipeline notices.  The numpy
methods :meth:`Switch.spoofed`, :meth:`Switch.learn` and
:meth:`Switch.forward` give the same answers for a batch; tests and the
reference pipeline use them.

The MAC table is kept as sorted arrays, so a lookup is a binary search; it
changes only when a MAC is new or moves, which is rare, and then the slow
path rebuilds it.  A MAC learned on a pod port does not move to another port
until it ages out: a pod cannot pull a neighbour's traffic to itself by
sending frames with the neighbour's MAC.
"""

from __future__ import annotations

import ipaddress

import numpy as np

FLOOD = -1
MAX_IPS_PER_PORT = 4
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _key(ip: str) -> bytes:
    a = ipaddress.ip_address(ip)
    return _V4_PREFIX + a.packed if a.version == 4 else a.packed


class MacTable:
    """MAC -> port, sorted for vectorised lookup, bounded, with ageing."""

    def __init__(self, capacity: int = 8192, ageing_ns: int = 300 * 10**9):
        self.capacity = capacity
        self.ageing_ns = ageing_ns
        self.macs = np.zeros(0, dtype=np.uint64)
        self.ports = np.zeros(0, dtype=np.int16)
        self.seen = np.zeros(0, dtype=np.int64)
        self.full_drops = 0

    def __len__(self) -> int:
        return len(self.macs)

    def find(self, macs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, hit) for each MAC; index is only meaningful where hit."""
        if not len(self.macs):
            return np.zeros(len(macs), dtype=np.intp), np.zeros(len(macs), dtype=bool)
        idx = np.searchsorted(self.macs, macs)
        np.minimum(idx, len(self.macs) - 1, out=idx)
        return idx, self.macs[idx] == macs

    def lookup(self, macs: np.ndarray) -> np.ndarray:
        """Port of each MAC, FLOOD where unknown."""
        idx, hit = self.find(macs)
        return np.where(hit, self.ports[idx] if len(self.ports) else FLOOD, FLOOD).astype(np.int16)

    def update(self, entries: dict[int, int], now: int) -> None:
        """Insert or move MACs (slow path); entries beyond capacity are not learned."""
        table = dict(zip(self.macs.tolist(), zip(self.ports.tolist(), self.seen.tolist())))
        for mac, port in entries.items():
            if mac not in table and len(table) >= self.capacity:
                self.full_drops += 1
                continue
            table[mac] = (port, now)
        self._load(table)

    def expire(self, now: int) -> int:
        """Forget MACs not seen for ``ageing_ns``; returns how many."""
        old = self.seen < now - self.ageing_ns
        if not old.any():
            return 0
        keep = ~old
        self.macs, self.ports, self.seen = self.macs[keep], self.ports[keep], self.seen[keep]
        return int(old.sum())

    def _load(self, table: dict) -> None:
        macs = np.fromiter(table.keys(), dtype=np.uint64, count=len(table))
        order = np.argsort(macs)
        vals = list(table.values())
        self.macs = macs[order]
        self.ports = np.array([vals[i][0] for i in order], dtype=np.int16)
        self.seen = np.array([vals[i][1] for i in order], dtype=np.int64)

    def entries(self) -> list[tuple[int, int]]:
        return list(zip(self.macs.tolist(), self.ports.tolist()))


class Switch:
    """Ports, their bindings, and the MAC table.

    ``ports`` are interface names; ``uplink`` is the index of the uplink
    port, or None.  Every other port is a pod port and drops all IP traffic
    until :meth:`bind` gives it addresses.
    """

    def __init__(self, ports: list[str], uplink: int | None = None,
                 mac_capacity: int = 8192, mac_ageing_s: float = 300.0):
        self.names = list(ports)
        self.n_ports = len(ports)
        self.uplink = uplink
        self.is_pod = np.ones(self.n_ports, dtype=bool)
        if uplink is not None:
            self.is_pod[uplink] = False
        # Bound addresses per port as pairs of uint64 (the 16-byte key); an
        # all-ones pair is an impossible address and marks an empty cell.
        self._empty = np.array([~np.uint64(0), ~np.uint64(0)], dtype=np.uint64)
        self.bound = np.tile(self._empty, (self.n_ports, MAX_IPS_PER_PORT, 1))
        self.macs = MacTable(mac_capacity, int(mac_ageing_s * 1e9))

    def index(self, ifname: str) -> int:
        return self.names.index(ifname)

    def bind(self, bindings: dict[str, list[str]]) -> None:
        """Set each named pod port's addresses (ports not named lose theirs)."""
        bound = np.tile(self._empty, (self.n_ports, MAX_IPS_PER_PORT, 1))
        for ifname, ips in bindings.items():
            if ifname not in self.names:
                continue
            keys = [_key(ip) for ip in ips][:MAX_IPS_PER_PORT]
            for j, k in enumerate(keys):
                bound[self.names.index(ifname), j] = np.frombuffer(k, dtype=np.uint64)
        self.bound = bound

    def bindings(self) -> dict[str, list[str]]:
        out = {}
        for p, name in enumerate(self.names):
            ips = []
            for cell in self.bound[p]:
                if (cell == self._empty).all():
                    continue
                raw = cell.tobytes()
                ip = ipaddress.IPv6Address(raw)
                ips.append(str(ip.ipv4_mapped or ip))
            if self.is_pod[p]:
                out[name] = ips
        return out

    def spoofed(self, in_port: np.ndarray, src: np.ndarray) -> np.ndarray:
        """bool[n]: frames from a pod port whose source address is not bound to it.

        ``src`` is uint8[n, 16]; only meaningful for IP frames (the caller masks).
        """
        n = len(in_port)
        src64 = src[:n].view(np.uint64)
        # Most pods have one address: check the first bound address of every
        # port for the whole batch, and the others only for what is left.
        bad = (self.bound[:, 0][in_port] != src64).any(axis=1)
        bad &= self.is_pod[in_port]
        if bad.any():
            idx = np.nonzero(bad)[0]
            own = (self.bound[in_port[idx]] == src64[idx, None, :]).all(axis=2).any(axis=1)
            bad[idx[own]] = False
        return bad

    def learn(self, in_port: np.ndarray, eth_src: np.ndarray, now: int) -> np.ndarray:
        """Learn source MACs; returns bool[n], True where the frame must be dropped
        because its source MAC is already bound to another pod port."""
        idx, hit = self.macs.find(eth_src)
        same = hit & (self.macs.ports[idx] == in_port) if len(self.macs) else hit
        if same.all():
            self.macs.seen[idx] = now
            return np.zeros(len(in_port), dtype=bool)
        conflict = np.zeros(len(in_port), dtype=bool)
        if len(self.macs):
            self.macs.seen[idx[same]] = now
            moved = hit & ~same
            # A MAC held by a pod port stays there until it ages out.
            conflict = moved & self.is_pod[self.macs.ports[idx]]
        new = ~same & ~conflict
        entries = dict(zip(eth_src[new].tolist(), in_port[new].tolist()))
        if entries:
            self.macs.update(entries, now)
        return conflict

    def forward(self, eth_dst: np.ndarray) -> np.ndarray:
        """Output port per frame, FLOOD for multicast/broadcast/unknown."""
        out = self.macs.lookup(eth_dst)
        group = eth_dst & np.uint64(1 << 40)
        if group.any():
            out[group.astype(bool)] = FLOOD
        return out
