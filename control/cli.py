"""``mcnp``: the command line (DESIGN.md section 5).

Subcommands: ``matrix`` and ``explain`` (offline, on manifest directories), ``run`` (the
node daemon), ``testbed up|down`` (test hosts in network namespaces) and ``demo``.
Offline tools stop on invalid input with one line naming file, object and field and
exit code 2 (rule S9).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
from typing import Optional, Sequence

from control.semantics.manifests import load_clusterset, parse_cluster_arg
from control.semantics.model import PROTOCOLS, ClusterSet, InvalidObject, Options, Pod
from control.semantics.reference import ReferenceEvaluator, resolve_endpoint

EXIT_INVALID = 2


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- helpers


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} out of range 1-65535")
    return value


def _semantics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--default-peer-scope", choices=("local", "clusterset"), default=None,
                   help="scope of peers whose selectors do not mention the multi-cluster key (default: local)")
    p.add_argument("--no-multicluster", action="store_true",
                   help="turn NPEP-308 off: the key becomes an ordinary label, every peer is local")


def _options(args) -> Options:
    return Options(multicluster=not args.no_multicluster, default_peer_scope=args.default_peer_scope or "local")


def _load(args) -> ClusterSet:
    if not args.cluster:
        raise UsageError("at least one --cluster NAME=DIR is required")
    cset, notes = load_clusterset([parse_cluster_arg(c) for c in args.cluster], _options(args))
    for note in notes:
        print(f"mcnp: note: {note}", file=sys.stderr)
    return cset


def _participants(cset: ClusterSet, pattern: Optional[str]) -> list[Pod]:
    pods = sorted((p for p in cset.pods() if p.can_take_part), key=lambda p: p.ref)
    if pattern is None:
        return pods
    return [p for p in pods if fnmatch.fnmatchcase(p.ref, pattern)]


# --------------------------------------------------------------------------- matrix


def matrix_values(cset: ClusterSet, sources: list[Pod], destinations: list[Pod], port: int, protocol: str, engine: str):
    """Verdicts for every (source, destination) pair: a boolean array, sources × destinations."""
    from control.compile import matrix

    fn = matrix.reference_matrix if engine == "reference" else matrix.compiled_matrix
    return fn(cset, sources, destinations, port, protocol)


def render_table(sources: list[Pod], destinations: list[Pod], values, port: int, protocol: str) -> str:
    """A truth table in the style of cyclonus: rows are sources, columns destinations,
    ``.`` allowed and ``X`` denied."""
    corner = f"{protocol}/{port}"
    col_names = [d.ref for d in destinations]
    first = max([len(corner)] + [len(s.ref) for s in sources])
    widths = [max(len(n), 1) for n in col_names]
    sep = "+" + "+".join("-" * (w + 2) for w in [first] + widths) + "+"

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, [first] + widths)) + " |"

    lines = [sep, row([corner] + col_names), sep]
    for s, vals in zip(sources, values.tolist()):
        lines.append(row([s.ref] + ["." if v else "X" for v in vals]))
    lines.append(sep)
    return "\n".join(lines)


def cmd_matrix(args) -> int:
    cset = _load(args)
    sources = _participants(cset, args.from_)
    destinations = _participants(cset, args.to)
    values = matrix_values(cset, sources, destinations, args.port, args.protocol, args.engine)
    if args.summary:
        allowed = int(values.sum())
        denied = values.size - allowed
        if args.json:
            print(json.dumps({"allowed": allowed, "denied": denied}))
        else:
            print(f"allowed: {allowed}\ndenied: {denied}")
        return 0
    if args.json:
        probes = [
            {"from": s.ref, "to": d.ref, "port": args.port, "protocol": args.protocol, "allowed": bool(v)}
            for s, row in zip(sources, values.tolist())
            for d, v in zip(destinations, row)
        ]
        json.dump({"probes": probes}, sys.stdout)
        print()
        return 0
    print(render_table(sources, destinations, values, args.port, args.protocol))
    return 0


# --------------------------------------------------------------------------- explain


def render_explain(src: str, dst: str, port: int, protocol: str, verdict) -> str:
    word = "ALLOWED" if verdict.allowed else "DENIED"
    lines = [f"{src} -> {dst} {protocol}/{port}: {word}"]
    for side in (verdict.egress, verdict.ingress):
        what = "egress " if side.direction == "Egress" else "ingress"
        by = f"enforced by {side.cluster}" if side.cluster else "not enforced"
        mark = "allow" if side.allowed else "deny "
        lines.append(f"  {what} [{mark}] ({by}) {side.reason}")
        if side.rejected:
            lines.append(f"           rejected policies enforced fail-closed: {', '.join(side.rejected)}")
    return "\n".join(lines)


def cmd_explain(args) -> int:
    cset = _load(args)
    dirs = dict(parse_cluster_arg(c) for c in args.cluster)

    def endpoint(flag: str, text: str):
        try:
            return resolve_endpoint(cset, text)
        except LookupError as e:
            cluster = text.split("/")[0]
            where = f" (read from {dirs[cluster]})" if "/" in text and dirs.get(cluster) else ""
            raise UsageError(f"{flag}: {e}{where}") from None

    src, dst = endpoint("--from", args.from_), endpoint("--to", args.to)
    verdict = ReferenceEvaluator(cset).evaluate(src, dst, args.port, args.protocol)
    if args.json:
        print(json.dumps(verdict.to_json()))
    else:
        print(render_explain(args.from_, args.to, args.port, args.protocol, verdict))
    return 0


# --------------------------------------------------------------------------- run, testbed, demo


def cmd_run(args) -> int:
    from control.node.config import Settings, SettingsError
    from control.node.daemon import run

    if args.verbose == 0:  # a daemon reports what it does: INFO unless asked otherwise
        logging.getLogger().setLevel(logging.INFO)
    try:
        settings = Settings.from_args(args)
    except SettingsError as e:
        for problem in e.problems:
            print(f"mcnp run: {problem}", file=sys.stderr)
        return EXIT_INVALID
    return run(settings)


def cmd_testbed(args) -> int:
    from control.lab import testbed

    if args.testbed_cmd == "up":
        return testbed.up([parse_cluster_arg(c) for c in args.cluster], mode=args.mode, cni=args.cni, json_out=args.json)
    return testbed.down()


def cmd_demo(args) -> int:
    from control.lab.demo import main as demo_main

    return demo_main(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcnp", description="Multi-cluster NetworkPolicy dataplane (NPEP-308) on XDP/AF_XDP.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("matrix", help="reachability of every pod pair, from manifest directories")
    m.add_argument("--cluster", action="append", default=[], metavar="NAME=DIR", help="a cluster's manifest directory (repeatable)")
    m.add_argument("--port", type=_port, required=True)
    m.add_argument("--protocol", choices=PROTOCOLS, required=True)
    m.add_argument("--from", dest="from_", metavar="GLOB", help="only sources whose reference matches, e.g. 'cluster-1/x/*'")
    m.add_argument("--to", metavar="GLOB", help="only destinations whose reference matches")
    m.add_argument("--engine", choices=("compiled", "reference"), default="compiled")
    _semantics_flags(m)
    m.add_argument("--summary", action="store_true", help="print only the counts of allowed and denied pairs")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_matrix)

    e = sub.add_parser("explain", help="the verdict for one pair and why")
    e.add_argument("--cluster", action="append", default=[], metavar="NAME=DIR")
    e.add_argument("--from", dest="from_", required=True, metavar="REF", help="cluster/namespace/pod or an IP")
    e.add_argument("--to", required=True, metavar="REF", help="cluster/namespace/pod or an IP")
    e.add_argument("--port", type=_port, required=True)
    e.add_argument("--protocol", choices=PROTOCOLS, required=True)
    _semantics_flags(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_explain)

    r = sub.add_parser("run", help="the node daemon")
    r.add_argument("--config", metavar="FILE", help="YAML file with the same settings as the flags (flags win)")
    r.add_argument("--node-name", metavar="NODE")
    r.add_argument("--local-cluster", metavar="NAME")
    r.add_argument("--cluster", action="append", default=[], metavar="NAME=SOURCE",
                   help="SOURCE is dir:PATH, kubeconfig:PATH[#CONTEXT] or in-cluster (repeatable)")
    r.add_argument("--attach", action="append", default=[], metavar="IFNAME=REF", help="bind a pod port to a pod (repeatable)")
    r.add_argument("--uplink", metavar="IFNAME")
    r.add_argument("--api-listen", metavar="HOST:PORT", help="REST endpoint (default 127.0.0.1:9901; unix:PATH also works)")
    r.add_argument("--default-peer-scope", choices=("local", "clusterset"), default=None)
    r.add_argument("--no-multicluster", action="store_true", default=None)
    r.add_argument("--stale-after", metavar="DURATION", help="revoke a remote cluster's state after it has been unreachable this long (e.g. 5m)")
    r.add_argument("--netns", metavar="NAME", help="network namespace (under /var/run/netns) of the pod ports and uplink; the packet loop enters it")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("testbed", help="test hosts in network namespaces")
    tsub = t.add_subparsers(dest="testbed_cmd", required=True, metavar="up|down")
    tu = tsub.add_parser("up", help="build hosts, servers and daemons from manifest directories")
    tu.add_argument("--cluster", action="append", default=[], required=True, metavar="NAME=DIR")
    tu.add_argument("--cni", choices=("ptp", "bridge"), default="ptp", help="the nodes' CNI: routed (ptp) or bridged (bridge)")
    tu.add_argument("--mode", default="mcnp", metavar="mcnp|none", help="mcnp: a daemon per node (default); none: the same hosts without mcnp")
    tu.add_argument("--json", action="store_true")
    tsub.add_parser("down", help="remove everything `testbed up` made")
    t.set_defaults(func=cmd_testbed)

    d = sub.add_parser("demo", help="two clusters, a daemon per node, real connections, a live policy change")
    d.add_argument("--keep", action="store_true", help="leave the testbed up at the end (tear down with `mcnp testbed down`)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (InvalidObject, UsageError) as e:
        print(f"mcnp: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # e.g. `mcnp matrix ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
