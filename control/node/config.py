"""Settings of the node daemon (``mcnp run``), documented in one place.

Every setting can come from a command-line flag or from a YAML config file
(``--config FILE``) under the same name, flags winning. :meth:`Settings.validate`
reports every problem at once, before anything starts, so an operator fixes a
configuration in one round instead of one error per restart.

Config file example::

    node-name: node-1
    local-cluster: cluster-1
    clusters:                    # or a list of "NAME=SOURCE" strings
      cluster-1: dir:/etc/mcnp/cluster-1
      cluster-2: kubeconfig:/etc/mcnp/cluster-2.kubeconfig#admin@cluster-2
    cni-socket: /run/mcnp/cni.sock
    state-dir: /var/lib/mcnp
    bpf-dir: /sys/fs/bpf/mcnp
    api-listen: unix:/run/mcnp.sock
    metrics-listen: 0.0.0.0:9902
    log-format: json
    default-peer-scope: local
    stale-after: 5m
    multicluster: true
    audit:                       # audit mode (also: the policy annotation mcnp.io/audit: "true")
      clusters: [cluster-2]
      namespaces: [cluster-1/staging]
      policies: [cluster-1/shop/api-from-frontends]
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import yaml

from control.semantics.audit import NO_SETTING, AuditScope
from control.semantics.objects import DNS_LABEL

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SettingsError(ValueError):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def parse_duration(text: Any) -> float:
    """``30s``, ``5m``, ``1h``, ``250ms``, ``1m30s`` or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: negative")
        return float(text)
    s = str(text).strip()
    try:
        value = float(s)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 30s, 5m, 1h)") from None
        return total
    if value < 0:
        raise ValueError(f"invalid duration {text!r}: negative")
    return value


@dataclass(frozen=True)
class ClusterSource:
    """Where one cluster's objects come from.

    ``kind`` is ``dir`` (a manifest directory, watched for changes), ``kubeconfig``
    (``path`` and an optional ``context``) or ``in-cluster`` (the service account of the
    pod the daemon runs in)."""

    name: str
    kind: str
    path: Optional[str] = None
    context: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "ClusterSource":
        """``NAME=dir:PATH``, ``NAME=kubeconfig:PATH[#CONTEXT]``, ``NAME=in-cluster``."""
        name, sep, source = text.partition("=")
        if not sep:
            raise ValueError(f"--cluster {text!r}: expected NAME=SOURCE")
        if source == "in-cluster":
            return cls(name, "in-cluster")
        kind, sep, rest = source.partition(":")
        if not sep or kind not in ("dir", "kubeconfig") or not rest:
            raise ValueError(f"--cluster {text!r}: SOURCE must be dir:PATH, kubeconfig:PATH[#CONTEXT] or in-cluster")
        if kind == "kubeconfig":
            path, _, context = rest.partition("#")
            return cls(name, kind, path, context or None)
        return cls(name, kind, rest)

    def describe(self) -> str:
        """For status output. Names the file, never its contents (credentials)."""
        if self.kind == "in-cluster":
            return "in-cluster"
        if self.context:
            return f"{self.kind}:{self.path}#{self.context}"
        return f"{self.kind}:{self.path}"


@dataclass
class Settings:
    """Everything ``mcnp run`` can be told. Defaults are those of the flags."""

    #: This node's name: local pods are the local cluster's pods with this ``spec.nodeName``.
    node_name: str = ""
    #: The cluster this node belongs to; its policies are the ones enforced here.
    local_cluster: str = ""
    #: Every cluster of the clusterset, the local one included.
    clusters: list[ClusterSource] = field(default_factory=list)
    #: Whether this daemon runs the packet loop and hooks its node's pods (``mcnp
    #: run`` does unless ``--no-dataplane``: then it only watches, explains and serves
    #: its page, and enforces nothing).
    dataplane: bool = False
    #: Unix socket where the chained CNI plugin ``mcnp-cni`` reaches this daemon.
    cni_socket: str = "/run/mcnp/cni.sock"
    #: Directory of the sandbox records (must survive a daemon restart: a host directory).
    state_dir: str = "/var/lib/mcnp"
    #: Directory (on a bpffs, mounted there if none is) of the maps that outlive the
    #: daemon: the flow cache and its classes, the pods, the node's addresses, the tables revision.
    bpf_dir: str = "/sys/fs/bpf/mcnp"
    #: Flows the kernel's cache holds (a full cache evicts the least recently used:
    #: an evicted flow is judged again, never passed unjudged).
    flow_capacity: int = 131072
    #: The hooks admit a new TCP, UDP or SCTP flow by itself when userspace admitted
    #: another of its class (same pod end, addresses, protocol and destination port)
    #: under the tables in force; off: every new flow is judged in userspace.
    flow_classes: bool = True
    #: ``HOST:PORT`` or ``unix:PATH`` of the read-only REST endpoint.
    api_listen: str = "127.0.0.1:9901"
    #: ``HOST:PORT`` or ``unix:PATH`` of a listener serving only ``/metrics`` and
    #: ``/healthz``, for Prometheus (None: metrics only on ``api-listen``).
    metrics_listen: Optional[str] = None
    #: Log lines as ``text`` or as ``json`` (one object per line).
    log_format: str = "text"
    #: Rule M7: ``local`` (NPEP-308) or ``clusterset`` (NPEP-311 / Calico model).
    default_peer_scope: str = "local"
    #: Rule M9: seconds after which an unreachable remote cluster's state is revoked
    #: (None: it stays in force until the cluster is back).
    stale_after: Optional[float] = None
    #: Rule M7: False makes the multi-cluster label an ordinary one.
    multicluster: bool = True
    #: Audit mode (docs/operations.md): policies of these clusters, namespaces
    #: (``cluster/ns``) and names (``cluster/ns/name``), besides those annotated
    #: ``mcnp.io/audit: "true"``, are not enforced; what they would deny passes and is
    #: recorded as "would deny". Flag ``--audit SCOPE`` (repeatable, added to the file's).
    audit: AuditScope = NO_SETTING
    #: Network namespace the dataplane enters before attaching its ports.
    netns: Optional[str] = None
    # ---- tuning (config file only)
    #: How often a manifest directory is checked for changes where inotify cannot
    #: follow it, seconds. A check is one scandir and a stat per file (contents are
    #: read only when those change), so a short period is cheap.
    dir_poll_interval: float = 0.05
    #: Whether manifest directories are followed with inotify (Linux), checked on each
    #: change instead of every ``dir_poll_interval``.
    dir_watch: bool = True
    #: With inotify, how often a directory is checked anyway, seconds (a safety net for
    #: changes inotify cannot see, e.g. on network filesystems).
    dir_rescan_interval: float = 1.0
    #: How long a changed manifest file's size, mtime and inode must stay the same
    #: before it is read, seconds (with inotify, counted from its close or rename): a
    #: file still being written never takes effect half-written.
    dir_settle_interval: float = 0.1
    #: Changes arriving within this many seconds are folded into one recompile.
    coalesce_delay: float = 0.005
    #: Server-side timeout of one watch request, seconds (the watch is then resumed).
    watch_timeout: int = 300
    #: First and largest wait between reconnect attempts to an API server, seconds.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Page size of list requests (0: unpaged).
    list_page_size: int = 0

    # ------------------------------------------------------------------ building

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], problems: Optional[list[str]] = None) -> "Settings":
        """Settings from a config file's mapping; keys may use ``-`` or ``_``.
        Problems are appended to ``problems`` (raised at once when it is None)."""
        own = problems if problems is not None else []
        s = cls()
        names = {f.name for f in fields(cls)}
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key == "no_multicluster":
                key, value = "multicluster", not value
            if key not in names:
                own.append(f"config: unknown setting {raw_key!r}")
                continue
            try:
                setattr(s, key, _convert(key, value))
            except (ValueError, TypeError) as e:
                own.append(f"config: {raw_key}: {e}")
            s.explicit = getattr(s, "explicit", set()) | {key}
        if problems is None and own:
            raise SettingsError(own)
        return s

    @classmethod
    def from_file(cls, path: str, problems: Optional[list[str]] = None) -> "Settings":
        try:
            with open(path, "rb") as f:
                data = yaml.load(f, Loader=yaml.CSafeLoader) or {}
        except (OSError, yaml.YAMLError) as e:
            msg = f"config {path}: cannot be read: {str(e).splitlines()[0]}"
            if problems is None:
                raise SettingsError([msg]) from None
            problems.append(msg)
            return cls()
        if not isinstance(data, Mapping):
            msg = f"config {path}: must be a mapping of settings"
            if problems is None:
                raise SettingsError([msg])
            problems.append(msg)
            return cls()
        return cls.from_mapping(data, problems)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        """Merge ``--config FILE`` and the flags (flags win) and validate the result.
        Raises :class:`SettingsError` listing every problem."""
        problems: list[str] = []
        config = getattr(args, "config", None)
        s = cls.from_file(config, problems) if config else cls()
        flag_values = {
            "node_name": getattr(args, "node_name", None),
            "local_cluster": getattr(args, "local_cluster", None),
            "clusters": getattr(args, "cluster", None) or None,
            "cni_socket": getattr(args, "cni_socket", None),
            "state_dir": getattr(args, "state_dir", None),
            "bpf_dir": getattr(args, "bpf_dir", None),
            "api_listen": getattr(args, "api_listen", None),
            "metrics_listen": getattr(args, "metrics_listen", None),
            "log_format": getattr(args, "log_format", None),
            "default_peer_scope": getattr(args, "default_peer_scope", None),
            "stale_after": getattr(args, "stale_after", None),
            "netns": getattr(args, "netns", None),
        }
        for key, value in flag_values.items():
            if value is None:
                continue
            try:
                setattr(s, key, _convert(key, value))
            except (ValueError, TypeError) as e:
                problems.append(f"--{key.replace('_', '-')}: {e}")
        if getattr(args, "audit", None):
            try:
                s.audit = s.audit.merge(AuditScope.parse(args.audit))
            except ValueError as e:
                problems.append(f"--audit: {e}")
        if getattr(args, "no_multicluster", False):
            s.multicluster = False
        if getattr(args, "no_dataplane", False):
            s.dataplane = False
        elif hasattr(args, "no_dataplane") and "dataplane" not in getattr(s, "explicit", ()):
            s.dataplane = True  # mcnp run enforces unless told not to
        problems.extend(s.problems())
        if problems:
            raise SettingsError(problems)
        return s

    # ------------------------------------------------------------------ checking

    def problems(self) -> list[str]:
        """Every reason this configuration cannot run, in one list."""
        out: list[str] = []
        if not self.node_name:
            out.append("--node-name is required")
        if not self.local_cluster:
            out.append("--local-cluster is required")
        if not self.clusters:
            out.append("at least one --cluster NAME=SOURCE is required")
        seen: set[str] = set()
        for c in self.clusters:
            if not DNS_LABEL.match(c.name or ""):
                out.append(f"--cluster {c.name}: invalid cluster name {c.name!r} (must be an RFC 1123 label)")
            if c.name in seen:
                out.append(f"--cluster {c.name}: given twice")
            seen.add(c.name)
            if c.kind not in ("dir", "kubeconfig", "in-cluster"):
                out.append(f"--cluster {c.name}: unknown source kind {c.kind!r}")
        if self.local_cluster and self.clusters and self.local_cluster not in seen:
            out.append(f"--local-cluster {self.local_cluster}: not among the --cluster names ({', '.join(sorted(seen))})")
        for name in sorted(self.audit.cluster_names() - seen) if self.clusters else ():
            out.append(f"--audit: cluster {name!r} is not among the --cluster names ({', '.join(sorted(seen))})")
        if self.dataplane:
            for name, path in (("cni-socket", self.cni_socket), ("state-dir", self.state_dir),
                               ("bpf-dir", self.bpf_dir)):
                if not path.startswith("/"):
                    out.append(f"--{name} {path}: must be an absolute path")
        if self.flow_capacity < 64:
            out.append("flow-capacity: must be at least 64")
        try:
            parse_listen(self.api_listen)
        except ValueError as e:
            out.append(f"--api-listen: {e}")
        if self.metrics_listen is not None:
            try:
                parse_listen(self.metrics_listen)
            except ValueError as e:
                out.append(f"--metrics-listen: {e}")
            if self.metrics_listen == self.api_listen and not self.api_listen.endswith(":0"):
                out.append("--metrics-listen: the same address as --api-listen")
        if self.log_format not in ("text", "json"):
            out.append(f"--log-format: {self.log_format!r} is not text or json")
        if self.default_peer_scope not in ("local", "clusterset"):
            out.append(f"--default-peer-scope: {self.default_peer_scope!r} is not local or clusterset")
        if self.stale_after is not None and self.stale_after <= 0:
            out.append("--stale-after: must be positive")
        for name in ("dir_poll_interval", "dir_rescan_interval", "backoff_initial", "backoff_max"):
            if getattr(self, name) <= 0:
                out.append(f"{name.replace('_', '-')}: must be positive")
        for name in ("coalesce_delay", "dir_settle_interval"):
            if getattr(self, name) < 0:
                out.append(f"{name.replace('_', '-')}: must not be negative")
        if self.watch_timeout <= 0:
            out.append("watch-timeout: must be positive")
        return out

    def validate(self) -> "Settings":
        problems = self.problems()
        if problems:
            raise SettingsError(problems)
        return self

    @property
    def remote_clusters(self) -> list[str]:
        return [c.name for c in self.clusters if c.name != self.local_cluster]


def parse_listen(text: str) -> tuple[str, Any]:
    """``unix:PATH`` → ("unix", PATH); ``HOST:PORT`` → ("tcp", (HOST, PORT))."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return "unix", path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT or unix:PATH")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


def _convert(key: str, value: Any) -> Any:
    """One setting's value from a flag or a config-file entry, in its proper type."""
    if key == "clusters":
        if isinstance(value, Mapping):
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, list):
            raise TypeError("must be a list of NAME=SOURCE or a mapping NAME: SOURCE")
        return [v if isinstance(v, ClusterSource) else ClusterSource.parse(str(v)) for v in value]
    if key == "audit":
        return AuditScope.from_mapping(value)
    if key == "stale_after":
        return None if value in (None, "", "never") else parse_duration(value)
    if key in ("dir_poll_interval", "dir_rescan_interval", "dir_settle_interval", "coalesce_delay",
               "backoff_initial", "backoff_max"):
        return parse_duration(value)
    if key in ("watch_timeout", "list_page_size", "flow_capacity"):
        if isinstance(value, bool) or not isinstance(value, int):
            return int(parse_duration(value))
        return value
    if key in ("multicluster", "dir_watch", "dataplane", "flow_classes"):
        if not isinstance(value, bool):
            raise TypeError("must be true or false")
        return value
    if value is not None and not isinstance(value, str):
        raise TypeError(f"must be a string, not {type(value).__name__}")
    return value
