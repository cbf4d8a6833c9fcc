"""The flow cache's upkeep: re-checking flows and flow classes on new tables,
expiry, listing, the rule hits of flows admitted by class.

The hooks pass cached flows of the revision in force (``config.revision``) by
themselves.  When tables change, :func:`recheck` first moves the revision in
force, so from that instant every cached flow goes to userspace instead of
passing, then judges every cached flow's opening direction with the new
tables in one batch, removes those now denied and stamps the others with the
new revision (one batch update).  A denied flow therefore stops at the swap;
the others resume passing in the kernel once re-stamped.

Rule S6 (connections, not packets) is kept by judging the *opening* direction
of each flow, as the pod's end saw it: ``opener`` is the end its first packet
passed (egress: the pod opened it; ingress: the peer did).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fastpath import kernel as K
from fastpath.match import DENIED, NOT_ENFORCED, judge

logger = logging.getLogger(__name__)

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


def _pod_addresses(keys: np.ndarray, pods: dict[int, list[str]]) -> np.ndarray:
    """The address each flow is judged for on the pod's side: the key's, unless it is
    not one of the pod's (broadcast, multicast: rule S12), then the pod's first."""
    out = keys["pod_addr"].copy()
    for zone, ips in pods.items():
        if not ips:
            continue
        rows = np.nonzero(keys["zone"] == zone)[0]
        if not len(rows):
            continue
        own = np.stack([np.frombuffer(K.addr16(ip), dtype=np.uint8) for ip in ips])
        mine = (keys["pod_addr"][rows][:, None, :] == own[None, :, :]).all(axis=2).any(axis=1)
        out[rows[~mine]] = own[0]
    return out


def verdicts(tables, keys: np.ndarray, vals: np.ndarray, pods: dict[int, list[str]],
             services=None):
    """Judge the opening direction of flows: (ok, egress rule, ingress rule)."""
    pod = _pod_addresses(keys, pods)
    by_pod = vals["opener"] == K.EGRESS
    src = np.where(by_pod[:, None], pod, keys["peer_addr"])
    dst = np.where(by_pod[:, None], keys["peer_addr"], pod)
    dport = np.where(by_pod, keys["peer_port"], keys["pod_port"]).astype(np.uint16)
    proto = keys["proto"].astype(np.uint8)
    j = judge(tables, np.ascontiguousarray(src), np.ascontiguousarray(dst), proto, dport)
    eg = np.asarray(j.egress, dtype=np.int32).copy()
    ing = np.asarray(j.ingress, dtype=np.int32).copy()
    ok = np.where(by_pod, eg != DENIED, np.asarray(j.allowed))
    ing[by_pod] = NOT_ENFORCED
    if services is not None and services.n:
        for r in np.nonzero(by_pod)[0]:
            key = bytes(keys["peer_addr"][r]) + bytes([int(proto[r]), 0]) + \
                int(dport[r]).to_bytes(2, "big")
            svc = services.by_key.get(key)
            if svc is not None:
                ok[r] = bool(svc.get("defer"))  # endpoint lists are judged on new flows only
    return ok, eg, ing


def _recheck_map(kern: K.Kernel, which: int, tables, pods: dict[int, list[str]], services,
                 audit_tables=None) -> tuple[int, int]:
    keys, vals = kern.dump(which=which)
    known = np.isin(keys["zone"], np.fromiter(pods, dtype=np.uint64, count=len(pods)))
    ok = np.zeros(len(keys), dtype=bool)
    eg = np.full(len(keys), DENIED, dtype=np.int32)
    ing = np.full(len(keys), NOT_ENFORCED, dtype=np.int32)
    if known.any():
        rows = np.nonzero(known)[0]
        ok[rows], eg[rows], ing[rows] = verdicts(tables, keys[rows], vals[rows], pods, services)
        if audit_tables is not None:  # what the audit tables would deny must reach userspace
            ok[rows] &= verdicts(audit_tables, keys[rows], vals[rows], pods, services)[0]
    cut = kern.delete(keys[~ok], which)
    # Only entries whose stamp changes are written back.  Under a new revision the hooks
    # leave every entry alone until it is re-stamped (it is not fresh for them); under the
    # same one (a hand-over of pods or Services only) they go on counting and moving its
    # state, and writing the entry read above back would undo what they did since.
    stamp = ok & ((vals["revision"] != tables.revision) | (vals["rule_egress"] != eg) |
                  (vals["rule_ingress"] != ing))
    vals["revision"][stamp] = tables.revision
    vals["rule_egress"][stamp] = eg[stamp]
    vals["rule_ingress"][stamp] = ing[stamp]
    kern.update(keys[stamp], vals[stamp], which)
    return int(ok.sum()), int(cut)


def recheck(kern: K.Kernel, tables, timeouts: dict[str, float], pods: dict[int, list[str]],
            services=None, classes: bool = True, audit_tables=None, whole: bool = False) -> dict:
    """Move the kernel to ``tables``' revision and re-judge every cached flow and flow
    class (a class is judged as its flows are: its opening direction); ``classes``
    off leaves none.  With ``audit_tables`` (some policy in audit mode) a class whose
    flows they would deny goes too, so its next flows are judged and logged as
    ``would_deny``.  Entries of pods no longer attached go too.  ``whole``: see
    ``Kernel.set_config``.  Returns what it did."""
    t0 = time.monotonic_ns()
    kern.set_config(tables.revision, timeouts, classes, whole)
    flows, cut = _recheck_map(kern, K.FLOWS, tables, pods, services)
    if classes:
        n_classes, _ = _recheck_map(kern, K.CLASSES, tables, pods, services, audit_tables)
    else:
        n_classes = 0
        kern.clear(K.CLASSES)
    return {"flows": flows, "cut": cut, "classes": n_classes, "ns": time.monotonic_ns() - t0}


def expire_rows(kern: K.Kernel, which: int, keys: np.ndarray, vals: np.ndarray, timeouts: dict[str, float],
                pods: dict[int, list[str]] | None, now_ns: int | None = None) -> int:
    """Remove those of the entries ``keys``/``vals`` (read from map ``which``) idle past
    their state's timeout, or of pods not in ``pods``; returns how many went."""
    now = K.now_ns() if now_ns is None else now_ns
    limit = np.array([timeouts[s] * 1e9 for s in K.STATES], dtype=np.float64)
    state = np.minimum(vals["state"], len(K.STATES) - 1)
    idle = (now - vals["last_ns"].astype(np.int64)).astype(np.float64)
    old = idle > limit[state]
    if pods is not None:
        old |= ~np.isin(keys["zone"], np.fromiter(pods, dtype=np.uint64, count=len(pods)))
    return kern.delete(keys[old], which)


def expire(kern: K.Kernel, timeouts: dict[str, float], pods: dict[int, list[str]] | None,
           now_ns: int | None = None) -> tuple[int, dict[int, int]]:
    """Remove flows and classes idle past their state's timeout (and, given ``pods``,
    those of pods no longer attached).  Returns (flows removed, entries left per map:
    ``{K.FLOWS: n, K.CLASSES: n}``) — one read of each map."""
    gone, left = 0, {}
    for which in (K.FLOWS, K.CLASSES):
        keys, vals = kern.dump(which=which)
        n = expire_rows(kern, which, keys, vals, timeouts, pods, now_ns)
        left[which] = len(keys) - n
        gone += n if which == K.FLOWS else 0
    return gone, left


def expire_slice(kern: K.Kernel, walk: K.Walk, max_entries: int, timeouts: dict[str, float],
                 pods: dict[int, list[str]] | None, now_ns: int | None = None) -> tuple[int, int]:
    """:func:`expire` for the next ~``max_entries`` flows of ``walk`` through the flow
    cache: a full cache is swept a slice at a time instead of read whole at once.
    Returns (flows removed, flows read)."""
    keys, vals = kern.dump_slice(walk, max_entries)
    return expire_rows(kern, K.FLOWS, keys, vals, timeouts, pods, now_ns), len(keys)


def fold_class_hits(kern: K.Kernel, revision: int, hits: np.ndarray, seen: dict[bytes, int],
                    rows: tuple[np.ndarray, np.ndarray] | None = None) -> dict[bytes, int]:
    """Add the flows each class of ``revision`` admitted since ``seen`` (its count at the
    last fold, by key) to ``hits`` (the rule hits of that revision: one cell per rule id,
    the last one spare).  Returns the counts to pass as ``seen`` next time.  A class
    found with fewer than ``seen`` was made again since: all of its count is new.
    ``rows``: the classes as the caller read them (``kern.dump(which=K.CLASSES)``)."""
    keys, vals = rows if rows is not None else kern.dump(which=K.CLASSES)
    now: dict[bytes, int] = {}
    n_rules = len(hits) - 1
    for r in np.nonzero(vals["packets"][:, 0])[0]:
        key = keys[r].tobytes()
        count = int(vals["packets"][r, 0])
        last = seen.get(key, 0)
        now[key] = count
        delta = count - last if count >= last else count
        if not delta or int(vals["revision"][r]) != revision:
            continue
        for rule in (int(vals["rule_egress"][r]), int(vals["rule_ingress"][r])):
            if 0 <= rule < n_rules:
                hits[rule] += delta
    return now


def listing(kern: K.Kernel, limit: int, zone_refs: dict[int, str] | None = None) -> list[dict]:
    """Cached flows as ``/v1/flows`` shows them, newest activity first."""
    keys, vals = kern.dump()
    order = np.argsort(vals["last_ns"])[::-1][:limit]
    now = K.now_ns()
    out = []
    for r in order:
        k, v = keys[r], vals[r]
        row = _row(k, v, zone_refs, now)
        row.update(state=K.STATES[min(int(v["state"]), len(K.STATES) - 1)],
                   packets=[int(v["packets"][0]), int(v["packets"][1])],
                   bytes=[int(v["bytes"][0]), int(v["bytes"][1])])
        out.append(row)
    return out


def class_listing(kern: K.Kernel, limit: int, zone_refs: dict[int, str] | None = None) -> list[dict]:
    """Flow classes as ``/v1/classes`` shows them, newest activity first: the opener's
    source port is any (``sport`` null); ``admitted`` counts the flows the hooks admitted
    by the class (not the one userspace judged)."""
    keys, vals = kern.dump(which=K.CLASSES)
    order = np.argsort(vals["last_ns"])[::-1][:limit]
    now = K.now_ns()
    out = []
    for r in order:
        row = _row(keys[r], vals[r], zone_refs, now)
        row.update(sport=None, admitted=int(vals["packets"][r, 0]))
        out.append(row)
    return out


def _row(k, v, zone_refs: dict[int, str] | None, now: int) -> dict:
    by_pod = int(v["opener"]) == K.EGRESS
    pod, peer = K.addr_str(k["pod_addr"]), K.addr_str(k["peer_addr"])
    return {
        "pod": (zone_refs or {}).get(int(k["zone"])),
        "src": pod if by_pod else peer, "dst": peer if by_pod else pod,
        "sport": int(k["pod_port"] if by_pod else k["peer_port"]),
        "dport": int(k["peer_port"] if by_pod else k["pod_port"]),
        "protocol": PROTO_NAMES.get(int(k["proto"]), str(int(k["proto"]))),
        "direction": "egress" if by_pod else "ingress",
        "revision": int(v["revision"]),
        "rule_egress": int(v["rule_egress"]), "rule_ingress": int(v["rule_ingress"]),
        "age_s": round((now - int(v["created_ns"])) / 1e9, 3),
        "idle_s": round((now - int(v["last_ns"])) / 1e9, 3),
    }
