"""Cluster sources: where the store's objects come from.

* :mod:`.directory` — ``dir:PATH``, a manifest directory followed with inotify (or
  polled), whose files take effect only once completely written;
* :mod:`.kube` — ``kubeconfig:PATH[#CONTEXT]`` or ``in-cluster``, list+watch of a
  Kubernetes API server;
* :mod:`.supervise` — backoff, and the supervisor under which each source runs: a
  source that crashes is reported on its cluster (not ready, ``last_error``) and
  restarted, never dead and silent.

What a source shows beyond the store's :class:`~control.node.store.ClusterStatus`:
``DirSource.file_errors`` (handed to its sink, so REST and metrics report them);
for tests and debugging, ``DirSource.unsettled`` (files changed on disk whose new
contents wait to be complete), ``DirSource.wakeups``; ``KubeSource.relists``,
``KubeSource.watches``, ``KubeSource.resource_versions``.
"""

from __future__ import annotations

from control.node.config import ClusterSource, Settings
from control.node.sources.directory import DirSource, DirWatch
from control.node.sources.kube import CLUSTER_PROPERTY, RESOURCES, Gone, KubeSource
from control.node.sources.supervise import Backoff, describe_error, supervise
from control.node.store import ClusterSink

__all__ = ["Backoff", "CLUSTER_PROPERTY", "DirSource", "DirWatch", "Gone", "KubeSource", "RESOURCES",
           "describe_error", "make_source", "supervise"]


def make_source(spec: ClusterSource, sink: ClusterSink, settings: Settings):
    """The source ``spec`` names, tuned by ``settings``."""
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    if spec.kind == "dir":
        return DirSource(spec, sink, settings.dir_poll_interval, settings.dir_rescan_interval, settings.dir_watch,
                         settings.dir_settle_interval, backoff)
    return KubeSource(spec, sink, settings)
