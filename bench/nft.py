"""Configuration (c) of the node benchmarks: the same policies enforced by nftables
with kernel conntrack, with address-and-port sets built from the policies' allowed
pairs (the organisation of kube-network-policies and of Calico's iptables mode).

What a user runs instead of mcnp on a node of a routed or bridged CNI, so what mcnp is
compared with. For every local pod (given by its host-side interface), a node gets:

* in the ``forward`` hook, first ``ct state established,related accept`` and
  ``ct state invalid drop`` (established flows never meet a policy rule again), then a
  dispatch on the pod's host interface: packets *from* it (``iifname``) jump to its
  egress chain, packets *to* it (``oifname``) to its ingress chain, so a packet
  between two pods of one node meets the source's egress and the destination's
  ingress;
* per pod and direction where it is isolated (rule S1), a chain of two lookups and a
  drop: a set keyed by peer address, protocol and port (``ip daddr . meta l4proto .
  th dport``, intervals) holding the union of every isolating policy's rules, and a
  set of peer addresses for rules without ports (every port and protocol, rule S3).
  A rule with no peers contributes ``0.0.0.0/0``; a rule with neither leaves the
  direction open. The cost per first packet is therefore two set lookups whatever the
  number of policies: the strongest arrangement of this design, not a linear scan.

Peers are the pods the reference evaluator (``control.semantics.reference``) says a
peer selects, among the pods the caller passes, as /32s, and ipBlocks as their CIDR
minus every ``except``, so the sets are the policies' meaning for those pods, not a
second interpretation of the selectors. Named ports resolve against the destination
pod (rule S4): the subject itself on ingress, each peer pod on egress (none for an
ipBlock peer, S8). IPv4 only (the test hosts carry IPv4): an IPv6 peer adds no
element, so IPv6 traffic of an isolated pod is dropped, never admitted. Overlapping
intervals are refused by ``nft``, which :func:`load` reports as :class:`NftError`.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass

from control.semantics.model import ClusterSet, Peer, Pod, Policy, PortSpec, Rule
from control.semantics.reference import EGRESS, INGRESS, ReferenceEvaluator

logger = logging.getLogger(__name__)

TABLE = "mcnp_bench"
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
#: Seconds for ``nft -f`` of a large ruleset (10,000 policies) to load.
NFT_TIMEOUT = 120.0


class NftError(RuntimeError):
    """The ruleset could not be built or loaded (the message says why)."""


@dataclass(frozen=True)
class Endpoint:
    """A local pod and the host-side interface the CNI gave it."""
    pod: Pod
    ifname: str


def _peer_networks(ev: ReferenceEvaluator, policy: Policy, peer: Peer, pods: list[Pod]) -> list:
    """IPv4 networks a peer admits: the pods it selects (as /32), or its ipBlock minus
    the excepted ranges."""
    if peer.ip_block is not None:
        block = peer.ip_block
        if block.cidr.version != 4:
            return []
        nets = [block.cidr]
        for excluded in block.excepts:
            nets = [part for net in nets for part in
                    (net.address_exclude(excluded) if excluded.subnet_of(net) else
                     ([] if net.subnet_of(excluded) else [net]))]
        return nets
    return [ipaddress.ip_network(f"{p.ip}/32") for p in pods
            if p.ip is not None and p.ip.version == 4 and ev.peer_matches(policy, peer, p)]


def _port_ranges(spec: PortSpec, dst: Pod | None) -> list[tuple[str, int, int]]:
    """(protocol, first, last) of one port entry towards ``dst`` (None: not a pod)."""
    proto = PROTOCOLS.get(spec.protocol)
    if proto is None:
        raise NftError(f"protocol {spec.protocol!r} has no nftables name here")
    if spec.port is None:
        return [(proto, 0, 65535)]
    if isinstance(spec.port, str):
        number = dst.named_port(spec.port, spec.protocol) if dst is not None else None
        return [] if number is None else [(proto, number, number)]
    return [(proto, spec.port, spec.end_port if spec.end_port is not None else spec.port)]


def _port_text(proto: str, first: int, last: int) -> str:
    return f"{proto} . {first}" if first == last else f"{proto} . {first}-{last}"


def rule_elements(ev: ReferenceEvaluator, policy: Policy, rule: Rule, direction: str, subject: Pod,
                  pods: list[Pod]) -> tuple[list[str] | None, list[str] | None]:
    """(addresses, address+port elements) of one rule for ``subject``: ``None`` for a
    side the rule leaves open. With ports and peers, the elements are the pairs."""
    def dst_of(peer_pod: Pod | None) -> Pod | None:
        return subject if direction == INGRESS else peer_pod

    if not rule.peers:
        if not rule.ports:
            return None, None
        # egress to every peer: a named port resolves per destination, which an
        # address-free element cannot express; it resolves on the peer pods listed.
        ports = sorted({_port_text(*r) for s in rule.ports for r in _port_ranges(s, dst_of(None))
                        if not isinstance(s.port, str) or direction == INGRESS})
        named = [s for s in rule.ports if isinstance(s.port, str)] if direction == EGRESS else []
        if not named:
            return None, ports
        pairs = [f"{p.ip} . {_port_text(*r)}" for p in pods if p.ip is not None and p.ip.version == 4
                 for s in named for r in _port_ranges(s, p)]
        return [], [f"0.0.0.0/0 . {t}" for t in ports] + pairs
    nets: list[tuple[object, Pod | None]] = []
    for peer in rule.peers:
        for net in _peer_networks(ev, policy, peer, pods):
            owner = next((p for p in pods if peer.ip_block is None and p.ip is not None and
                          ipaddress.ip_network(f"{p.ip}/32") == net), None)
            nets.append((net, owner))
    if not rule.ports:
        return sorted({str(n) for n, _ in nets}), None
    pairs = sorted({f"{net} . {_port_text(*r)}" for net, owner in nets for s in rule.ports
                    for r in _port_ranges(s, dst_of(owner))})
    return [], pairs


def allowed_sets(ev: ReferenceEvaluator, subject: Pod, direction: str, pods: list[Pod]) -> tuple[set, set] | None:
    """The union over every policy isolating ``subject`` for ``direction``: (peer
    address . protocol . port elements, peer addresses admitted on every port).
    None when some rule admits everything."""
    pairs: set[str] = set()
    addrs: set[str] = set()
    for policy in ev.isolating(subject, direction):
        for rule in policy.rules(direction):
            a, p = rule_elements(ev, policy, rule, direction, subject, pods)
            if a is None and p is None:
                return None
            if p is None:
                addrs.update(a)
            elif a is None:
                pairs.update(f"0.0.0.0/0 . {t}" for t in p)
            else:
                pairs.update(p)
    return pairs, addrs


def endpoint_chain(name: str, direction: str, pairs: set, addrs: set) -> list[str]:
    """One pod's chain for one direction: two set lookups, then drop."""
    peer = "ip saddr" if direction == INGRESS else "ip daddr"
    lines = [f"  set {name}_pairs {{", "    type ipv4_addr . inet_proto . inet_service; flags interval;"]
    if pairs:
        lines.append(f"    elements = {{ {', '.join(sorted(pairs))} }}")
    lines += ["  }", f"  set {name}_addrs {{", "    type ipv4_addr; flags interval;"]
    if addrs:
        lines.append(f"    elements = {{ {', '.join(sorted(addrs))} }}")
    return lines + ["  }", f"  chain {name} {{",
                    f"    {peer} . meta l4proto . th dport @{name}_pairs return",
                    f"    {peer} @{name}_addrs return", "    drop", "  }"]


def ruleset(cset: ClusterSet, endpoints: list[Endpoint], pods: list[Pod] | None = None) -> str:
    """The whole table for a node whose local pods are ``endpoints``; peers are
    looked for among ``pods`` (default: every pod of ``cset`` that can take part)."""
    ev = ReferenceEvaluator(cset)
    pods = [p for p in (pods if pods is not None else cset.pods()) if p.can_take_part]
    forward = ["  chain forward {", "    type filter hook forward priority filter; policy accept;",
               "    ct state established,related accept", "    ct state invalid drop"]
    chains: list[str] = []
    for i, ep in enumerate(endpoints):
        if '"' in ep.ifname or not ep.ifname:
            raise NftError(f"interface name {ep.ifname!r} cannot be written into a ruleset")
        for direction, match in ((EGRESS, "iifname"), (INGRESS, "oifname")):
            if not ev.isolating(ep.pod, direction):
                continue
            allowed = allowed_sets(ev, ep.pod, direction, pods)
            if allowed is None:
                continue
            name = f"{direction.lower()}_{i}"
            forward.append(f'    {match} "{ep.ifname}" jump {name}')
            chains += endpoint_chain(name, direction, *allowed)
    return "\n".join([f"table inet {TABLE} {{"] + chains + forward + ["  }", "}"]) + "\n"


def load(netns: str, text: str, timeout: float = NFT_TIMEOUT) -> None:
    """Replace the table in ``netns`` by ``text`` (one ``nft -f`` transaction)."""
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n" + text
    proc = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script.encode(),
                          capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise NftError(f"nft -f in {netns}: {proc.stderr.decode(errors='replace').strip()[:500]}")


def unload(netns: str) -> None:
    """Remove the table from ``netns`` if it is there."""
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", TABLE],
                   capture_output=True, timeout=NFT_TIMEOUT, check=False)
