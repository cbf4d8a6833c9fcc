"""``mcnp``: the command line (docs/interfaces.md).

Subcommands: ``matrix``, ``explain`` and ``lint`` (offline, on manifest directories),
``run`` (the node daemon), ``observe`` (follow a node's verdicts), ``testbed up|down``
(test hosts in network namespaces), ``demo`` and ``completion``. Offline tools stop on
invalid input with one line per invalid object naming file, object and field, and exit
code 2 (rule S9); ``explain`` exits 1 when the verdict is denied, as ``kubectl auth
can-i`` does; ``lint`` exits 1 when it has findings. Warnings (a glob that matches no
pod, a selector naming a cluster that is not in the clusterset) go to stderr and do not
change the exit code of ``matrix`` and ``explain``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
from typing import Optional, Sequence

from control.semantics.manifests import load_clusterset, parse_cluster_arg
from control.semantics.model import PROTOCOLS, ClusterSet, InvalidObject, Options, Pod
from control.semantics.reference import resolve_endpoint

EXIT_DENIED = 1
EXIT_INVALID = 2


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


class InvalidObjects(Exception):
    """Every invalid object of the manifest directories (rule S9): one line each, exit 2."""

    def __init__(self, errors: list):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


def warn(message: str) -> None:
    print(f"mcnp: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- helpers


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} out of range 1-65535")
    return value


def _protocol(text: str) -> str:
    """TCP, UDP or SCTP in any case, as the REST endpoint accepts them."""
    value = text.upper()
    if value not in PROTOCOLS:
        raise argparse.ArgumentTypeError(f"invalid protocol {text!r} (choose from {', '.join(PROTOCOLS)})")
    return value


def _semantics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--default-peer-scope", choices=("local", "clusterset"), default=None,
                   help="scope of peers whose selectors do not mention the multi-cluster key (default: local)")
    p.add_argument("--no-multicluster", action="store_true",
                   help="turn NPEP-308 off: the key becomes an ordinary label, every peer is local")


def _options(args) -> Options:
    return Options(multicluster=not args.no_multicluster, default_peer_scope=args.default_peer_scope or "local")


def _cluster_specs(args) -> list[tuple[Optional[str], str]]:
    """``--cluster`` values as (name, directory), each checked for what is missing."""
    if not args.cluster:
        raise UsageError("at least one --cluster NAME=DIR is required")
    specs = []
    for text in args.cluster:
        name, path = parse_cluster_arg(text)
        if name is None and not os.path.isdir(path):
            raise UsageError(f"--cluster {text}: no directory {text!r}; give NAME=DIR (e.g. --cluster {text}=manifests/{text}), "
                             "or a bare DIR holding a ClusterProperty cluster.clusterset.k8s.io that names the cluster")
        if name == "" or not path:
            raise UsageError(f"--cluster {text}: expected NAME=DIR with both parts given")
        specs.append((name, path))
    return specs


def _load(args, warnings: bool = True) -> ClusterSet:
    """The clusterset of ``--cluster`` flags; every invalid object is reported at once.
    ``warnings``: print the selectors naming clusters not in the clusterset."""
    errors: list = []
    try:
        cset, notes = load_clusterset(_cluster_specs(args), _options(args), errors=errors)
    except InvalidObject as e:  # a directory-level problem stops the load
        raise InvalidObjects(errors + [e]) from None
    for note in notes:
        print(f"mcnp: note: {note}", file=sys.stderr)
    if errors:
        raise InvalidObjects(errors)
    from control.semantics.lint import unknown_clusters

    for policy in sorted(cset.policies(), key=lambda p: p.ref) if warnings else ():
        for finding in unknown_clusters(cset, policy):
            warn(str(finding))
    return cset


def _participants(cset: ClusterSet, pattern: Optional[str], flag: str) -> list[Pod]:
    pods = sorted((p for p in cset.pods() if p.can_take_part), key=lambda p: p.ref)
    if pattern is None:
        return pods
    found = [p for p in pods if fnmatch.fnmatchcase(p.ref, pattern)]
    if not found:
        some = ", ".join(p.ref for p in pods[:3]) + (", ..." if len(pods) > 3 else "")
        warn(f"{flag} {pattern!r} matches no pod (references are cluster/namespace/pod, e.g. {some or 'none loaded'})")
    return found


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


def _pairs(args) -> list[tuple[int, str]]:
    """The (port, protocol) pairs of a matrix run: ``--port``/``--protocol`` in order,
    or one protocol for every port, or one port for every protocol."""
    ports, protocols = list(args.port), list(args.protocol)
    if len(protocols) == 1:
        protocols *= len(ports)
    elif len(ports) == 1:
        ports *= len(protocols)
    if len(ports) != len(protocols):
        raise UsageError(f"{len(ports)} --port and {len(protocols)} --protocol given: give one --protocol for every "
                         "--port, or one of them once")
    return list(dict.fromkeys(zip(ports, protocols)))


def cmd_matrix(args) -> int:
    pairs = _pairs(args)
    cset = _load(args)
    sources = _participants(cset, args.from_, "--from")
    destinations = _participants(cset, args.to, "--to")
    results = [(port, protocol, matrix_values(cset, sources, destinations, port, protocol, args.engine))
               for port, protocol in pairs]
    if args.summary:
        allowed = sum(int(values.sum()) for _, _, values in results)
        denied = sum(values.size for _, _, values in results) - allowed
        if args.json:
            print(json.dumps({"allowed": allowed, "denied": denied}))
        else:
            print(f"allowed: {allowed}\ndenied: {denied}")
        return 0
    if args.json:
        probes = [
            {"from": s.ref, "to": d.ref, "port": port, "protocol": protocol, "allowed": bool(v)}
            for port, protocol, values in results
            for s, row in zip(sources, values.tolist())
            for d, v in zip(destinations, row)
        ]
        json.dump({"probes": probes}, sys.stdout)
        print()
        return 0
    print("\n\n".join(render_table(sources, destinations, values, port, protocol) for port, protocol, values in results))
    return 0


# --------------------------------------------------------------------------- explain


def render_explain(src: str, dst: str, port: int, protocol: str, verdict: dict) -> str:
    """``explain``'s answer (the JSON of :func:`control.semantics.audit.explain`) for people."""
    word = "ALLOWED" if verdict["allowed"] else "DENIED"
    if verdict.get("would_deny"):
        word += " (would be DENIED: policies in audit mode)"
    lines = [f"{src} -> {dst} {protocol}/{port}: {word}"]
    for name in ("egress", "ingress"):
        side = verdict[name]
        by = f"enforced by {side['cluster']}" if side["cluster"] else "not enforced"
        mark = "allow" if side["allowed"] else "deny "
        lines.append(f"  {name:<7} [{mark}] ({by}) {side['reason']}")
        if side.get("rejected"):
            lines.append(f"           rejected policies enforced fail-closed: {', '.join(side['rejected'])}")
        if side.get("audit_policies"):
            would = "WOULD DENY: " if side["would_deny"] else ""
            lines.append(f"           in audit mode: {', '.join(side['audit_policies'])}; "
                         f"fully enforced: {would}{side['audit_reason']}")
    return "\n".join(lines)


def cmd_explain(args) -> int:
    from control.semantics import audit

    cset = _load(args)
    dirs = dict(parse_cluster_arg(c) for c in args.cluster)
    try:
        scope = audit.AuditScope.parse(args.audit)
    except ValueError as e:
        raise UsageError(f"--audit: {e}") from None

    def endpoint(flag: str, text: str):
        try:
            return resolve_endpoint(cset, text)
        except LookupError as e:
            cluster = text.split("/")[0]
            where = f" (read from {dirs[cluster]})" if "/" in text and dirs.get(cluster) else ""
            raise UsageError(f"{flag}: {e}{where}") from None

    src, dst = endpoint("--from", args.from_), endpoint("--to", args.to)
    verdict = audit.explain(cset, scope, src, dst, args.port, args.protocol)
    if args.json:
        print(json.dumps(verdict))
    else:
        print(render_explain(args.from_, args.to, args.port, args.protocol, verdict))
    return 0 if verdict["allowed"] else EXIT_DENIED


# --------------------------------------------------------------------------- lint, observe, completion


def cmd_lint(args) -> int:
    from control.semantics.lint import lint

    findings = lint(_load(args, warnings=False))
    if args.json:
        print(json.dumps({"findings": [f.to_json() for f in findings]}))
    else:
        for finding in findings:
            print(f"warning: {finding}")
        print(f"{len(findings)} finding(s)", file=sys.stderr)
    return 1 if findings else 0


def cmd_observe(args) -> int:
    from control.node.observe import observe

    return observe(args)


# --------------------------------------------------------------------------- run, testbed, demo


def _detach_all(args) -> int:
    """``mcnp run --detach-all``: only where the node keeps mcnp's state matters."""
    from control.node.attach import detach_all
    from control.node.config import Settings

    settings = Settings.from_file(args.config, []) if args.config else Settings()
    for key in ("state_dir", "bpf_dir", "netns"):
        if getattr(args, key, None):
            setattr(settings, key, getattr(args, key))
    return detach_all(settings)


def cmd_run(args) -> int:
    from control.node.config import Settings, SettingsError
    from control.node.daemon import run

    if args.verbose == 0:  # a daemon reports what it does: INFO unless asked otherwise
        logging.getLogger().setLevel(logging.INFO)
    if args.detach_all:
        return _detach_all(args)
    try:
        settings = Settings.from_args(args)
    except SettingsError as e:
        for problem in e.problems:
            print(f"mcnp run: {problem}", file=sys.stderr)
        return EXIT_INVALID
    if settings.log_format == "json":
        from control.node.logfmt import use_json_logs

        use_json_logs()
    return run(settings)


def cmd_testbed(args) -> int:
    from control.lab import testbed

    if args.testbed_cmd == "up":
        # Progress and errors on stderr; stdout carries only the --json answer.
        return testbed.up([parse_cluster_arg(c) for c in args.cluster], mode=args.mode, cni=args.cni, json_out=args.json,
                          log=lambda m: print(m, file=sys.stderr))
    return testbed.down()


def cmd_cni(args) -> int:  # reached only through main(), which hands the arguments over
    from control.node.cni_install import main as install_main

    return install_main(args.args)


def cmd_demo(args) -> int:
    from control.lab.demo import main as demo_main

    return demo_main(args)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Every (sub)command takes ``-v`` after its name too, as kubectl's do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          help="more logging (-vv for debug); accepted before or after the subcommand")


CLUSTER_HELP = ("a cluster's manifest directory (repeatable); a bare DIR works when it holds a "
                "ClusterProperty cluster.clusterset.k8s.io naming the cluster")
PROTOCOL_HELP = "TCP, UDP or SCTP (any case)"


def build_parser() -> argparse.ArgumentParser:
    from control.node.metrics import build_version

    parser = _Parser(prog="mcnp", description="Multi-cluster NetworkPolicy dataplane (NPEP-308) on XDP/AF_XDP.")
    parser.set_defaults(verbose=0)
    parser.add_argument("--version", action="version", version=f"mcnp {build_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _offline_commands(sub)
    _observe_command(sub)

    r = sub.add_parser("run", help="the node daemon")
    r.add_argument("--config", metavar="FILE", help="YAML file with the same settings as the flags (flags win)")
    r.add_argument("--node-name", metavar="NODE", help="this node: local pods are the local cluster's pods scheduled here")
    r.add_argument("--local-cluster", metavar="NAME", help="the cluster this node belongs to (its policies are enforced here)")
    r.add_argument("--cluster", action="append", default=[], metavar="NAME=SOURCE",
                   help="SOURCE is dir:PATH, kubeconfig:PATH[#CONTEXT] or in-cluster (repeatable)")
    r.add_argument("--cni-socket", metavar="PATH", help="unix socket where mcnp-cni reaches the daemon (default /run/mcnp/cni.sock)")
    r.add_argument("--state-dir", metavar="DIR", help="sandbox records, kept across restarts (default /var/lib/mcnp)")
    r.add_argument("--bpf-dir", metavar="DIR", help="bpffs directory of the maps that outlive the daemon (default /sys/fs/bpf/mcnp)")
    r.add_argument("--no-dataplane", action="store_true", default=False,
                   help="watch, explain and serve the page only: hook no pod, enforce nothing")
    r.add_argument("--detach-all", action="store_true", default=False,
                   help="take mcnp off this node: detach its hooks from every pod interface, remove its "
                        "pinned maps, and exit (pods then flow on the CNI's path, unfiltered)")
    r.add_argument("--api-listen", metavar="HOST:PORT", help="REST endpoint (default 127.0.0.1:9901; unix:PATH also works)")
    r.add_argument("--default-peer-scope", choices=("local", "clusterset"), default=None,
                   help="scope of peers whose selectors do not mention the multi-cluster key (default: local)")
    r.add_argument("--no-multicluster", action="store_true", default=None,
                   help="turn NPEP-308 off: the key becomes an ordinary label, every peer is local")
    r.add_argument("--stale-after", metavar="DURATION", help="revoke a remote cluster's state after it has been unreachable this long (e.g. 5m)")
    r.add_argument("--netns", metavar="NAME", help="the node's network namespace (under /var/run/netns) when it is not this process's own; the packet loop enters it")
    _observability_flags(r)
    _audit_flag(r)
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("testbed", help="test hosts in network namespaces")
    tsub = t.add_subparsers(dest="testbed_cmd", required=True, metavar="up|down")
    tu = tsub.add_parser("up", help="build hosts, servers and daemons from manifest directories")
    tu.add_argument("--cluster", action="append", default=[], required=True, metavar="NAME=DIR", help=CLUSTER_HELP)
    tu.add_argument("--cni", choices=("ptp", "bridge"), default="ptp", help="the nodes' CNI: routed (ptp) or bridged (bridge)")
    tu.add_argument("--mode", default="mcnp", metavar="mcnp|none", help="mcnp: a daemon per node (default); none: the same hosts without mcnp")
    tu.add_argument("--json", action="store_true", help="print the pods and nodes made, as JSON")
    tsub.add_parser("down", help="remove everything `testbed up` made")
    t.set_defaults(func=cmd_testbed)

    d = sub.add_parser("demo", help="two clusters, a daemon per node, real connections, a live policy change")
    d.add_argument("--keep", action="store_true", help="leave the testbed up at the end (tear down with `mcnp testbed down`)")
    d.set_defaults(func=cmd_demo)

    n = sub.add_parser("cni", help="chain mcnp-cni into the node's CNI configuration, or take it out (the DaemonSet's installer)",
                       add_help=False)
    n.add_argument("args", nargs=argparse.REMAINDER, help="install [--watch] | uninstall [--hold] [--remove-binary] (see `mcnp cni --help`)")
    n.set_defaults(func=cmd_cni)

    c = sub.add_parser("completion", help="print a shell completion script (source <(mcnp completion bash))")
    c.add_argument("shell", choices=("bash",), help="the shell to complete for")
    c.set_defaults(func=cmd_completion)
    return parser


def _cluster_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", action="append", default=[], metavar="NAME=DIR", help=CLUSTER_HELP)


def _offline_commands(sub) -> None:
    """``matrix``, ``explain`` and ``lint``: manifest directories in, answers out."""
    m = sub.add_parser("matrix", help="reachability of every pod pair, from manifest directories")
    _cluster_flag(m)
    m.add_argument("--port", type=_port, action="append", required=True,
                   help="destination port (repeatable: one matrix per --port/--protocol pair)")
    m.add_argument("--protocol", type=_protocol, action="append", required=True,
                   help=PROTOCOL_HELP + "; once for every --port, or once per --port in order")
    m.add_argument("--from", dest="from_", metavar="GLOB", help="only sources whose reference matches, e.g. 'cluster-1/x/*'")
    m.add_argument("--to", metavar="GLOB", help="only destinations whose reference matches")
    m.add_argument("--engine", choices=("compiled", "reference"), default="compiled",
                   help="compiled (vectorised, default) or reference (the evaluator explain uses, pair by pair)")
    _semantics_flags(m)
    m.add_argument("--summary", action="store_true", help="print only the counts of allowed and denied pairs")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_matrix)

    e = sub.add_parser("explain", help="the verdict for one pair and why (exit 0 allowed, 1 denied, 2 invalid input)",
                       description="The verdict for one pair and why. Exit code: 0 when allowed, 1 when denied "
                                   "(as kubectl auth can-i), 2 for invalid input.")
    _cluster_flag(e)
    e.add_argument("--from", dest="from_", required=True, metavar="REF", help="cluster/namespace/pod or an IP")
    e.add_argument("--to", required=True, metavar="REF", help="cluster/namespace/pod or an IP")
    e.add_argument("--port", type=_port, required=True, help="destination port")
    e.add_argument("--protocol", type=_protocol, required=True, help=PROTOCOL_HELP)
    _semantics_flags(e)
    _audit_flag(e)
    e.add_argument("--json", action="store_true", help="machine-readable output (the JSON of /v1/explain)")
    e.set_defaults(func=cmd_explain)

    li = sub.add_parser("lint", help="policies that select nothing or name clusters not in the clusterset (exit 1 if any)",
                        description="Report policies that select no pod and selectors naming clusters that are not "
                                    "in the clusterset. Exit code: 0 none found, 1 findings, 2 invalid input.")
    _cluster_flag(li)
    _semantics_flags(li)
    li.add_argument("--json", action="store_true", help='machine-readable output: {"findings": [...]}')
    li.set_defaults(func=cmd_lint)


def _observe_command(sub) -> None:
    o = sub.add_parser("observe", help="follow a node's verdicts (allowed, denied) with their reasons",
                       description="Follow the verdicts of a node's packet loop, like hubble observe.")
    o.add_argument("--node", metavar="HOST:PORT", default="127.0.0.1:9901",
                   help="the node's REST endpoint (default 127.0.0.1:9901; unix:PATH also works)")
    o.add_argument("--verdict", action="append", default=[], choices=("allowed", "denied", "would-deny"),
                   help="only these verdicts (repeatable; would-deny: passed because a policy is in audit mode)")
    o.add_argument("--pod", metavar="GLOB", help="only records with an end matching this pod reference or glob")
    o.add_argument("--namespace", metavar="NS", help="only records with an end in this namespace")
    o.add_argument("--cluster", metavar="NAME", help="only records with an end in this cluster")
    o.add_argument("--since", metavar="DURATION", help="only records newer than this (e.g. 5m) or than an RFC 3339 time")
    o.add_argument("--last", type=int, default=20, metavar="N", help="records already kept to show first (default 20)")
    o.add_argument("--no-follow", dest="follow", action="store_false", help="print what is kept and exit")
    o.add_argument("--json", action="store_true", help="one JSON object per line")
    o.set_defaults(func=cmd_observe)


def _audit_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit", action="append", default=[], metavar="SCOPE",
                   help="audit mode for CLUSTER, CLUSTER/NAMESPACE or CLUSTER/NAMESPACE/POLICY (repeatable; "
                        'also the annotation mcnp.io/audit: "true"): what its policies would deny passes and is '
                        "recorded as would-deny")


def _observability_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="also serve /metrics (and /healthz) alone on this address, for Prometheus (unix:PATH also works)")
    r.add_argument("--log-format", choices=("text", "json"), default=None, help="log lines as text (default) or JSON objects")


def cmd_completion(args) -> int:
    print(bash_completion(build_parser()))
    return 0


def _flags(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(option strings, option -> its choices, subcommand names) of one parser."""
    options, choices, commands = [], {}, []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.extend(action.choices)
            continue
        options.extend(action.option_strings)
        if not action.option_strings and action.choices:  # a positional with fixed values
            options.extend(str(c) for c in action.choices)
        elif action.option_strings and action.choices:
            for opt in action.option_strings:
                choices[opt] = [str(c) for c in action.choices]
        elif action.option_strings and action.type is _protocol:
            for opt in action.option_strings:
                choices[opt] = list(PROTOCOLS)
    return options, choices, commands


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function generated from the parser: subcommands, their flags,
    and the values of flags with fixed choices; directories and files otherwise."""
    top_options, _, commands = _flags(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    cases, values = [], {}
    for name, sub in subparsers.items():
        options, choices, nested = _flags(sub)
        for sub_name in nested:  # testbed up|down: their flags as well
            more, more_choices, _ = _flags(sub._subparsers._group_actions[0].choices[sub_name])
            options += [o for o in more if o not in options]
            choices.update(more_choices)
        cases.append(f'    {name}) opts="{" ".join(nested + options)}" ;;')
        values.update(choices)
    value_cases = [f'    {opt}) COMPREPLY=($(compgen -W "{" ".join(vals)}" -- "$cur")); return ;;'
                   for opt, vals in sorted(values.items())]
    return "\n".join([
        "# bash completion for mcnp: source <(mcnp completion bash)",
        "_mcnp() {",
        '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" opts',
        "  if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f'    COMPREPLY=($(compgen -W "{" ".join(commands + top_options)}" -- "$cur")); return',
        "  fi",
        '  case "$prev" in',
        *value_cases,
        "  esac",
        '  case "${COMP_WORDS[1]}" in',
        *cases,
        '    *) opts="" ;;',
        "  esac",
        '  COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        "}",
        "complete -o default -F _mcnp mcnp",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cni"]:  # the installer has its own parser and flags
        from control.node.cni_install import main as install_main

        return install_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InvalidObjects as e:
        for err in e.errors:
            print(f"mcnp: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except (InvalidObject, UsageError) as e:
        print(f"mcnp: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # e.g. `mcnp matrix ... | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
