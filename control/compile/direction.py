"""One direction (egress or ingress) of the compiled tables.

Words used here (see ``fastpath.tables`` for the arrays they become):

*slot*
    What an address resolves to: an ipBlock interval (slots ``0..M-1``) for an address
    no single pod owns, or an identity (slot ``M + i``) for pod ``i``.
*peer column*
    One distinct selector or ipBlock peer of this direction's rules. Peers that mean
    the same thing (same peer, same scope-relevant cluster/namespace of the policy)
    share a column.
*atom*
    Slots that every peer column treats alike — and, for egress, whose named ports
    resolve alike, since the peer is the destination there (rule S4).
*class*
    Local endpoints isolated by the same policies — and, for ingress, with the same
    named-port resolution, since the endpoint is the destination there. Class 0 is
    "not judged here": non-local, non-pod, or not isolated (rule S1).
*port set*
    For one (class, atom): the ordered rules whose peers match (with the first matching
    peer of each) and the destination's named ports. Its row over port atoms holds the
    first admitting rule id, or -1.
"""

from __future__ import annotations

import bisect

import numpy as np

from fastpath.tables import DENIED, NOT_ENFORCED, PORT_SPACE, PROTO_BY_NAME

from control.compile.selection import AddressSpace, PodIndex, peer_column, policies_for, selector_peer_matches
from control.semantics.model import Peer, Policy, Rule

ALL_PEERS = -3  # "first matching peer" of a rule without peers: it matches everything


def as_bytes(a: np.ndarray) -> np.ndarray:
    """A 2-D array's rows as ``uint8`` rows (for :func:`unique_rows`)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], a.shape[1] * a.itemsize)


_WEIGHTS = np.random.default_rng(308).integers(1, 2**62, size=4096, dtype=np.int64) | 1


def unique_int_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unique_rows` for an int32 matrix, by a 64-bit hash of each row (sorting
    integers beats sorting byte strings), checked exactly: on a collision it falls
    back to comparing the rows themselves."""
    n, width = rows.shape
    if n == 0 or width == 0 or width > len(_WEIGHTS):
        return unique_rows(as_bytes(rows))
    with np.errstate(over="ignore"):
        h = rows.astype(np.int64) @ _WEIGHTS[:width]
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(rows[first][inverse], rows):
        return unique_rows(as_bytes(rows))
    return first, inverse


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index of each distinct row, group of each row) for a 2-D uint8 array."""
    n = rows.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if rows.shape[1] == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    rows = np.ascontiguousarray(rows)
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


class PortSpace:
    """Port atoms: intervals of the key ``proto << 16 | port`` cut at every port,
    range end and resolved named port any rule can mean."""

    def __init__(self, rules: list[Rule], resolved: list[tuple[str, np.ndarray]]):
        cuts = {0, 1 << 16, 2 << 16, 3 << 16}
        self._rule_cuts(cuts, rules)
        self._named_cuts(cuts, resolved)
        self._cuts = sorted(cuts)
        self._cut_set = set(self._cuts)
        self.bounds = np.asarray(self._cuts, dtype=np.int32)

    @staticmethod
    def _rule_cuts(cuts: set, rules: list[Rule]) -> None:
        for rule in rules:
            for spec in rule.ports:
                if isinstance(spec.port, int):
                    base = PROTO_BY_NAME[spec.protocol] << 16
                    cuts.update((base | spec.port, base | ((spec.end_port or spec.port) + 1)))

    def add_rules(self, rules: list[Rule]) -> np.ndarray | None:
        """Cut at the numeric ports of ``rules`` too. Returns, when that made new
        atoms, the old atom each new one lies in (None: nothing changed)."""
        cuts = set(self._cuts)
        self._rule_cuts(cuts, rules)
        if len(cuts) == len(self._cuts):
            return None
        new = sorted(cuts)
        old_of_new = np.searchsorted(self.bounds, np.asarray(new, dtype=np.int64), side="right") - 1
        self._cuts, self._cut_set = new, set(new)
        self.bounds = np.asarray(new, dtype=np.int32)
        return old_of_new

    @staticmethod
    def _named_cuts(cuts: set, resolved: list[tuple[str, np.ndarray]]) -> None:
        for protocol, values in resolved:
            base = PROTO_BY_NAME[protocol] << 16
            for v in np.unique(values[values >= 0]).tolist():
                cuts.update((base | v, base | (v + 1)))

    @property
    def size(self) -> int:
        return len(self.bounds)

    def expresses(self, pod, named: list[tuple[str, str]]) -> bool:
        """Can every named port of ``named`` that ``pod`` resolves be told apart here?"""
        for name, protocol in named:
            v = pod.named_port(name, protocol)
            if v is not None:
                key = (PROTO_BY_NAME[protocol] << 16) | v
                if key not in self._cut_set or key + 1 not in self._cut_set:
                    return False
        return True

    def atoms(self, lo: int, hi: int) -> tuple[int, int]:
        """Port atoms covering key range ``[lo, hi)`` (both are cuts)."""
        a0 = bisect.bisect_left(self._cuts, lo)
        a1 = len(self._cuts) if hi >= PORT_SPACE else bisect.bisect_left(self._cuts, hi)
        return a0, a1


class RuleIds:
    """Rule id ↔ (policy, direction, rule, peer, port), shared by both directions."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.rules: list[dict] = []

    def get(self, policy: Policy, direction: str, rule: int, peer, port) -> int:
        key = (policy.ref, direction, rule, peer, port)
        rid = self.ids.get(key)
        if rid is None:
            rid = self.ids[key] = len(self.rules)
            self.rules.append({"policy": policy.ref, "direction": direction, "rule": rule, "peer": peer, "port": port})
        return rid


class Direction:
    """Classes, atoms, cells and port sets of one direction."""

    def __init__(self, direction: str, compiler):
        self.direction = direction
        self.egress = direction == "Egress"
        # Policies are append-only: a removed one stays (no class names it any more), a
        # changed one is removed and appended, so indices and rule numbers stay valid.
        self.policies: list[Policy] = [p for p in policies_for(compiler.cset, direction) if compiler.enforces(p)]
        #: Live policies: reference → index.
        self.alive: dict[str, int] = {p.ref: k for k, p in enumerate(self.policies)}
        # Rules in the order they are tried, each with its peer columns.
        self.rules: list[tuple[Policy, int, Rule]] = [(p, ri, r) for p in self.policies for ri, r in enumerate(p.rules(direction))]
        self.rule_start = np.cumsum([0] + [len(p.rules(direction)) for p in self.policies]).tolist()
        self.columns: list[tuple[Policy, Peer]] = []
        self.column_of: dict[tuple, int] = {}
        self.rule_columns: list[list[int] | None] = [self._columns_of(compiler, policy, rule) for policy, _, rule in self.rules]
        self.named = sorted({(s.port, s.protocol) for _, _, r in self.rules for s in r.ports if isinstance(s.port, str)})
        self.name_idx = {n: k for k, n in enumerate(self.named)}
        #: Per rule, (port entry, named-port column) of its named ports.
        self.named_specs = [self._named_specs_of(r) for _, _, r in self.rules]

    def _columns_of(self, compiler, policy: Policy, rule: Rule) -> list[int] | None:
        """The peer columns of one rule, adding the columns not seen yet."""
        if not rule.peers:
            return None
        cols = []
        for peer in rule.peers:
            key = self._column_key(compiler.index, policy, peer)
            if key not in self.column_of:
                self.column_of[key] = len(self.columns)
                self.columns.append((policy, peer))
            cols.append(self.column_of[key])
        return cols

    def _named_specs_of(self, rule: Rule) -> list[tuple[int, int]]:
        return [(q, self.name_idx[(s.port, s.protocol)]) for q, s in enumerate(rule.ports) if isinstance(s.port, str)]

    @staticmethod
    def order(policy: Policy) -> tuple:
        """The order policies are tried in (see ``policies_for``)."""
        return (policy.cluster, policy.namespace, policy.name)

    @staticmethod
    def _column_key(index: PodIndex, policy: Policy, peer: Peer) -> tuple:
        if peer.ip_block is not None:
            return ("ip", peer.ip_block)
        cluster = None if index.peer_clusters_unrestricted(peer) else policy.cluster
        namespace = policy.namespace if peer.namespace_selector is None else None
        return ("sel", peer.pod_selector, peer.namespace_selector, cluster, namespace)

    # ------------------------------------------------------------------ slot properties

    def peer_bits(self, index: PodIndex, space: AddressSpace, pod_interval: np.ndarray, has_ip: np.ndarray) -> np.ndarray:
        """``uint8[slots, ceil(columns/8)]``: packed peer-column matches of every slot,
        built in chunks so memory stays at one byte per (slot, 8 columns)."""
        first_pod_slot, n_pods = space.size, index.n
        ncol = len(self.columns)
        out = np.zeros((first_pod_slot + n_pods, (ncol + 7) // 8), dtype=np.uint8)
        chunk = 1024
        for start in range(0, ncol, chunk):
            cols = self.columns[start: start + chunk]
            block = np.zeros((len(cols), first_pod_slot + n_pods), dtype=bool)
            for column, (policy, peer) in enumerate(cols):
                block[column] = peer_column(index, space, pod_interval, has_ip, policy, peer)
            out[:, start // 8: start // 8 + (len(cols) + 7) // 8] = np.packbits(block, axis=0).T
        return out

    def named_values(self, index: PodIndex, first_pod_slot: int) -> np.ndarray:
        """``int32[slots, len(named)]``: each slot's resolution of every named port as
        a destination (-1: none; intervals are not pods and resolve nothing)."""
        out = np.full((first_pod_slot + index.n, len(self.named)), -1, dtype=np.int32)
        for column, (name, protocol) in enumerate(self.named):
            out[first_pod_slot:, column] = index.named_port(name, protocol)
        return out

    # ------------------------------------------------------------------ compile

    def build(self, compiler) -> None:
        first_pod_slot = compiler.space.size
        bits = self.peer_bits(compiler.index, compiler.space, compiler.pod_interval, compiler.has_ip)
        named = self.named_values(compiler.index, first_pod_slot)
        self.ctx_first, ctx_of_slot = unique_rows(as_bytes(named))
        self.ctx_values = named[self.ctx_first]
        key = bits
        if self.egress:
            key = np.hstack([bits, as_bytes(ctx_of_slot.astype(np.int32).reshape(-1, 1))])
        atom_first, self.atom_of_slot = unique_rows(key)
        self.atom_bits = bits[atom_first]
        self.atom_ctx = ctx_of_slot[atom_first]
        # Classes: local endpoints by isolating policies (and, for ingress, named ports).
        sel = np.zeros((compiler.index.n, len(self.policies)), dtype=bool)
        for column, policy in enumerate(self.policies):
            sel[:, column] = compiler.index.selected_by(policy)
        sel &= compiler.is_local.reshape(-1, 1)
        isolated = sel.any(axis=1)
        ckey = np.packbits(sel, axis=1)
        if not self.egress:
            ckey = np.hstack([ckey, as_bytes(ctx_of_slot[first_pod_slot:].astype(np.int32).reshape(-1, 1))])
        self.class_of_slot = np.zeros(first_pod_slot + compiler.index.n, dtype=np.int32)
        iso = np.flatnonzero(isolated)
        first, inverse = unique_rows(ckey[iso])
        self.class_of_slot[first_pod_slot + iso] = inverse + 1
        self.class_policies = [None] + [np.flatnonzero(sel[iso[representative]]) for representative in first]
        self.class_ctx = [None] + [int(ctx_of_slot[first_pod_slot + iso[representative]]) for representative in first]
        self.ctx_of_slot = ctx_of_slot.astype(np.int32)
        # Cells and port sets.
        self.portsets: dict[tuple, int] = {}
        self._segment_cache: dict[tuple, list] = {}
        self.port_rows: list[np.ndarray] = []
        self._portset_row(compiler, None)  # 0: not enforced
        self._portset_row(compiler, ((), ()))  # 1: isolated, nothing admits
        self.cells = np.zeros((len(self.class_policies), len(atom_first)), dtype=np.int32)
        self._first_cache: dict[int, np.ndarray] = {}
        for cls in range(1, len(self.class_policies)):
            self.cells[cls] = self.class_row(compiler, cls)
        self._first_cache = None  # per-build scratch: incremental changes add atoms
        # What incremental changes look up: atoms, classes and named-port contexts by key.
        self.atom_ids = {key[representative].tobytes(): a for a, representative in enumerate(atom_first)}
        self.class_ids = {self._class_key(self.class_policies[column + 1], self.class_ctx[column + 1]): column + 1 for column in range(len(first))}
        self.ctx_ids = {v.tobytes(): column for column, v in enumerate(self.ctx_values)}
        self.policies_at: dict[tuple[str, str], list[int]] = {}
        for column, policy in enumerate(self.policies):
            self.policies_at.setdefault((policy.cluster, policy.namespace), []).append(column)

    def _class_key(self, policy_idx, ctx: int) -> bytes:
        """Classes are keyed by their set of policies (and, for ingress, named ports)."""
        key = np.sort(np.asarray(policy_idx, dtype=np.int32)).tobytes()
        return key if self.egress else key + b"/" + np.int32(ctx).tobytes()

    # ------------------------------------------------------------------ incremental

    def update_slot(self, compiler, slot: int, pod, local: bool) -> None:
        """Re-derive one identity's atom and class after its pod changed (``pod`` None:
        gone or no longer eligible — it is judged by nobody)."""
        if pod is None:
            self.class_of_slot[slot] = 0
            return
        cset = compiler.cset
        labels = cset.effective_pod_labels(pod)
        interval = compiler.interval_of(pod)
        bits = np.zeros(len(self.columns), dtype=bool)
        ns_labels = None
        for column, (policy, peer) in enumerate(self.columns):
            if peer.ip_block is not None:
                bits[column] = interval >= 0 and bool(compiler.space.block_mask(peer.ip_block)[interval])
            else:
                if ns_labels is None:
                    ns_labels = cset.effective_namespace_labels(pod.cluster, pod.namespace)
                bits[column] = selector_peer_matches(cset, policy, peer, pod, labels, ns_labels)
        packed = np.packbits(bits)
        ctx = self._ctx_of(pod)
        self.ctx_of_slot[slot] = ctx
        key = packed.tobytes() + (np.int32(ctx).tobytes() if self.egress else b"")
        atom = self.atom_ids.get(key)
        if atom is None:
            atom = self._new_atom(compiler, packed, ctx, key)
        self.atom_of_slot[slot] = atom
        self.class_of_slot[slot] = self.class_of(compiler, pod, labels, ctx) if local else 0

    def _ctx_of(self, pod) -> int:
        """The named-port context of a pod (how it resolves every named port)."""
        named = np.asarray([-1 if (v := pod.named_port(n, p)) is None else v for n, p in self.named], dtype=np.int32)
        ctx = self.ctx_ids.get(named.tobytes())
        if ctx is None:
            ctx = self.ctx_ids[named.tobytes()] = len(self.ctx_values)
            self.ctx_values = np.vstack([self.ctx_values, named[None]])
        return ctx

    def class_of(self, compiler, pod, labels, ctx: int) -> int:
        """The class of a local endpoint: the policies selecting it (0: none)."""
        chosen = [k for k in self.policies_at.get((pod.cluster, pod.namespace), ()) if self.policies[k].pod_selector.matches(labels)]
        if not chosen:
            return 0
        key = self._class_key(chosen, ctx)
        cls = self.class_ids.get(key)
        if cls is None:
            chosen.sort(key=lambda k: self.order(self.policies[k]))
            cls = self._new_class(compiler, np.asarray(chosen), ctx, key)
        return cls

    def _new_atom(self, compiler, packed: np.ndarray, ctx: int, key: bytes) -> int:
        atom = len(self.atom_bits)
        self.atom_bits = np.vstack([self.atom_bits, packed.reshape(1, -1)])
        self.atom_ctx = np.append(self.atom_ctx, ctx)
        on = set(np.flatnonzero(np.unpackbits(packed)).tolist())
        column = np.zeros(len(self.class_policies), dtype=np.int32)
        for cls in range(1, len(self.class_policies)):
            column[cls] = self._cell(compiler, cls, on, ctx)
        self.cells = np.hstack([self.cells, column.reshape(-1, 1)])
        self.atom_ids[key] = atom
        return atom

    def _cell(self, compiler, cls: int, on: set, atom_ctx: int) -> int:
        """The port set of one atom (its set peer columns ``on``) for class ``cls``:
        :meth:`class_row` for a single atom, in plain Python (no per-rule numpy)."""
        matched = []
        for g in self._rules_of(self.class_policies[cls]):
            cols = self.rule_columns[g]
            if cols is None:
                matched.append((g, None))
            else:
                k = next((k for k, col in enumerate(cols) if col in on), -1)
                if k < 0:
                    continue
                matched.append((g, k))
            if not self.rules[g][2].ports:
                break
        if not matched:
            return 1
        values = self.ctx_values[atom_ctx if self.egress else self.class_ctx[cls]]
        named = tuple((g, q, int(values[n])) for g, _ in matched for q, n in self.named_specs[g])
        return self._portset_row(compiler, (tuple(matched), named))

    def _new_class(self, compiler, policies: np.ndarray, ctx: int, key: bytes) -> int:
        cls = len(self.class_policies)
        self.class_policies.append(policies)
        self.class_ctx.append(ctx)
        self.cells = np.vstack([self.cells, self.class_row(compiler, cls).reshape(1, -1)])
        self.class_ids[key] = cls
        return cls

    # ------------------------------------------------------------------ policy changes

    def remove_policy(self, ref: str) -> Policy | None:
        """Forget a policy: no class made from now on names it. Its rules and columns
        stay (unused) until the next full compile. Returns it, None if unknown."""
        k = self.alive.pop(ref, None)
        if k is None:
            return None
        policy = self.policies[k]
        self.policies_at[(policy.cluster, policy.namespace)].remove(k)
        return policy

    def add_policy(self, compiler, policy: Policy) -> None:
        """Append a policy, its rules and the peer columns not seen yet; the atoms the
        new columns split are split (existing classes never name the new columns, so a
        split atom keeps its cells). The caller re-derives the classes it touches.
        Its named ports must be known already (:meth:`knows_named_ports`)."""
        k = len(self.policies)
        self.policies.append(policy)
        self.alive[policy.ref] = k
        self.policies_at.setdefault((policy.cluster, policy.namespace), []).append(k)
        before = len(self.columns)
        for ri, rule in enumerate(policy.rules(self.direction)):
            self.rules.append((policy, ri, rule))
            self.rule_columns.append(self._columns_of(compiler, policy, rule))
            self.named_specs.append(self._named_specs_of(rule))
        self.rule_start.append(len(self.rules))
        if len(self.columns) > before:
            self._split_atoms(compiler, [compiler.column_values(pol, peer) for pol, peer in self.columns[before:]], before)

    def knows_named_ports(self, policy: Policy) -> bool:
        return all((s.port, s.protocol) in self.name_idx
                   for r in policy.rules(self.direction) for s in r.ports if isinstance(s.port, str))

    def _split_atoms(self, compiler, values: list[np.ndarray], first_col: int) -> None:
        """Add peer columns ``first_col..``, given each column's value per slot."""
        ncol = len(self.columns)
        width = (ncol + 7) // 8
        if width > self.atom_bits.shape[1]:
            pad = np.zeros((len(self.atom_bits), width - self.atom_bits.shape[1]), dtype=np.uint8)
            self.atom_bits = np.hstack([self.atom_bits, pad])
        new = np.stack(values, axis=1)
        key = np.hstack([as_bytes(self.atom_of_slot.astype(np.int32).reshape(-1, 1)), np.packbits(new, axis=1)])
        first, inverse = unique_rows(key)
        target = np.empty(len(first), dtype=np.int32)
        claimed: set[int] = set()
        added: list[int] = []  # parent atom of each new atom
        for unique, slot in enumerate(first.tolist()):
            atom = int(self.atom_of_slot[slot])
            if atom in claimed:
                target[unique] = len(self.atom_bits) + len(added)
                added.append(atom)
            else:
                claimed.add(atom)
                target[unique] = atom
        if added:
            parents = np.asarray(added)
            self.atom_bits = np.vstack([self.atom_bits, self.atom_bits[parents]])
            self.atom_ctx = np.append(self.atom_ctx, self.atom_ctx[parents])
            self.cells = np.hstack([self.cells, self.cells[:, parents]])
        for unique, slot in enumerate(first.tolist()):
            for col in (np.flatnonzero(new[slot]) + first_col).tolist():
                self.atom_bits[target[unique], col // 8] |= np.uint8(1 << (7 - col % 8))
        self.atom_of_slot = target[inverse]
        tail = (lambda atom: np.int32(self.atom_ctx[atom]).tobytes()) if self.egress else (lambda atom: b"")
        self.atom_ids = {self.atom_bits[atom].tobytes() + tail(atom): atom for atom in range(len(self.atom_bits))}

    def remap_port_atoms(self, old_of_new: np.ndarray) -> None:
        """The port atoms were cut finer: new atom ``j`` lies in old atom ``old_of_new[j]``."""
        self.port_rows = [row[old_of_new] for row in self.port_rows]
        self._segment_cache.clear()

    def grow(self, slots: int) -> None:
        """Make room for identities added since the build."""
        extra = slots - len(self.class_of_slot)
        if extra > 0:
            self.class_of_slot = np.concatenate([self.class_of_slot, np.zeros(extra, np.int32)])
            self.atom_of_slot = np.concatenate([self.atom_of_slot, np.zeros(extra, self.atom_of_slot.dtype)])
            self.ctx_of_slot = np.concatenate([self.ctx_of_slot, np.zeros(extra, np.int32)])

    def _rules_of(self, policy_idx: np.ndarray) -> list[int]:
        """Rule ids of the given policies, in the order they are tried."""
        return [rule for policy in policy_idx for rule in range(self.rule_start[policy], self.rule_start[policy + 1])]

    def class_row(self, compiler, cls: int, atoms: np.ndarray | None = None) -> np.ndarray:
        """Port set of every atom (or of ``atoms``) for class ``cls``.

        Per atom, the behaviour is fixed by the first matching peer of each of the
        class's rules and by how the destination resolves the named ports of the rules
        that matched; atoms alike in those share a port set. Only what can differ
        between atoms is compared: rules without peers match every atom (constant),
        and nothing after a rule without peers or ports can decide anything."""
        bits = self.atom_bits if atoms is None else self.atom_bits[atoms]
        n_atoms = len(bits)
        rules = self._rules_of(self.class_policies[cls])
        for position, rule in enumerate(rules):
            if self.rule_columns[rule] is None and not self.rules[rule][2].ports:
                rules = rules[: position + 1]
                break
        varying = [position for position, rule in enumerate(rules) if self.rule_columns[rule] is not None]
        extra = [(position, port_entry, named_column) for position, rule in enumerate(rules) for port_entry, named_column in self.named_specs[rule]]
        n_varying = len(varying)
        first = np.empty((n_atoms, n_varying + len(extra)), dtype=np.int32)
        for column, position in enumerate(varying):
            rule = rules[position]
            first[:, column] = self._first_peer(rule, bits) if atoms is not None else self._first_peer_cached(rule)
        if extra:
            if self.egress:
                actx = self.atom_ctx if atoms is None else self.atom_ctx[atoms]
                values = self.ctx_values[actx]
            else:
                values = np.broadcast_to(self.ctx_values[self.class_ctx[cls]], (n_atoms, len(self.named)))
            column_of = {position: column for column, position in enumerate(varying)}
            for extra_column, (position, _, named_column) in enumerate(extra):
                column = column_of.get(position)
                first[:, n_varying + extra_column] = values[:, named_column] if column is None else np.where(first[:, column] != -1, values[:, named_column], -2)
        # A matched rule without ports admits everything: forget the rules after it, so
        # atoms that differ only there share a port set.
        open_rules = np.fromiter((not self.rules[rules[position]][2].ports for position in varying), dtype=bool, count=n_varying)
        if open_rules.any():
            stops = (first[:, :n_varying] != -1) & open_rules
            stop = np.where(stops.any(axis=1), stops.argmax(axis=1), n_varying)
            first[:, :n_varying][np.arange(n_varying) > stop[:, None]] = -1
            if extra:
                # Rule index of each row's stop (len(rules): none) against each extra's rule.
                stop_rule = np.asarray(varying + [len(rules)])[stop]
                first[:, n_varying:][np.asarray([position for position, _, _ in extra]) > stop_rule[:, None]] = -2
        reps, inverse = unique_int_rows(first)
        ids = np.empty(len(reps), dtype=np.int32)
        peerless = [self.rule_columns[rule] is None for rule in rules]
        for unique, representative in enumerate(reps):
            row = first[representative].tolist()
            matched = []
            last = -1  # position in ``rules`` (the order tried) of the last matched rule
            column = 0
            for position, rule in enumerate(rules):
                if peerless[position]:
                    peer = None
                else:
                    peer = row[column]
                    column += 1
                    if peer == -1:
                        continue
                matched.append((rule, peer))
                last = position
                if not self.rules[rule][2].ports:
                    break  # admits every port: later rules cannot decide anything
            if not matched:
                ids[unique] = 1
                continue
            # Compared by position, not by rule id: a policy changed incrementally is
            # appended, so its rule ids need not follow the order the class tries them in.
            named = tuple((rules[position], port_entry, v) for (position, port_entry, _), v in zip(extra, row[n_varying:]) if v != -2 and position <= last)
            ids[unique] = self._portset_row(compiler, (tuple(matched), named))
        return ids[inverse]

    def _first_peer(self, rule: int, bits: np.ndarray) -> np.ndarray:
        """For each atom row of ``bits``, the first peer of rule ``rule`` it matches (-1:
        none, ``ALL_PEERS``: the rule has no peers)."""
        cols = self.rule_columns[rule]
        if cols is None:
            return np.full(len(bits), ALL_PEERS, dtype=np.int32)
        cols = np.asarray(cols)
        sub = (bits[:, cols // 8] >> (7 - cols % 8)) & 1
        return np.where(sub.any(axis=1), sub.argmax(axis=1), -1).astype(np.int32)

    def _first_peer_cached(self, rule: int) -> np.ndarray:
        if self._first_cache is None:
            return self._first_peer(rule, self.atom_bits)
        vec = self._first_cache.get(rule)
        if vec is None:
            vec = self._first_cache[rule] = self._first_peer(rule, self.atom_bits)
        return vec

    def _segments(self, compiler, rule_no: int, peer, named: dict) -> list[tuple[int, int, int]]:
        """``(first port atom, end, rule id)`` for each port entry of rule ``rule_no``."""
        policy, index_in_policy, rule = self.rules[rule_no]
        out = []
        for port_entry, spec in enumerate(rule.ports):
            base = PROTO_BY_NAME[spec.protocol] << 16
            if spec.port is None:
                lo, hi = base, base + (1 << 16)
            elif isinstance(spec.port, str):
                number = named.get((rule_no, port_entry), -1)
                if number < 0:
                    continue  # rule S8: no such port on the destination (or not a pod)
                lo, hi = base | number, (base | number) + 1
            else:
                lo, hi = base | spec.port, (base | (spec.end_port or spec.port)) + 1
            first_atom, end_atom = compiler.ports.atoms(lo, hi)
            out.append((first_atom, end_atom, compiler.rule_ids.get(policy, self.direction, index_in_policy, peer, port_entry)))
        return out

    def _portset_row(self, compiler, key) -> int:
        psid = self.portsets.get(key)
        if psid is not None:
            return psid
        if key is None:
            row = np.full(compiler.ports.size, NOT_ENFORCED, dtype=np.int32)
        else:
            matched, named = key
            named = {(rule_no, port_entry): number for rule_no, port_entry, number in named}
            row = np.full(compiler.ports.size, DENIED, dtype=np.int32)
            for rule_no, peer in matched:
                policy, index_in_policy, rule = self.rules[rule_no]
                if not rule.ports:
                    row[row == DENIED] = compiler.rule_ids.get(policy, self.direction, index_in_policy, peer, None)
                    break
                seg_key = (rule_no, peer, tuple(named.get((rule_no, port_entry), -1) for port_entry, _ in self.named_specs[rule_no]))
                segments = self._segment_cache.get(seg_key)
                if segments is None:
                    segments = self._segment_cache[seg_key] = self._segments(compiler, rule_no, peer, named)
                for first_atom, end_atom, rule_id in segments:
                    seg = row[first_atom:end_atom]
                    seg[seg == DENIED] = rule_id
        psid = self.portsets[key] = len(self.port_rows)
        self.port_rows.append(row)
        return psid

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_class": self.class_of_slot.astype(np.int32),
            f"{prefix}_atom": self.atom_of_slot.astype(np.int32),
            f"{prefix}_cell": np.ascontiguousarray(self.cells, dtype=np.int32),
            f"{prefix}_ports": np.vstack(self.port_rows).astype(np.int32),
        }
