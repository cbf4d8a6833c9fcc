"""The testbed's saved state: what ``up`` made, so that ``down`` removes exactly that.

The state is written *before* anything it names is made and rewritten after every step,
so ``mcnp testbed down`` (no arguments) removes everything even after a failed or
interrupted ``up``. Pods added or removed later (``control.lab.kubelet``), possibly from
another process, change the same file: every change holds an exclusive ``flock`` on a
lock file beside it and replaces the file atomically.

Keys: ``version``, ``dir``, ``mode``, ``cni``, ``prefix``, ``core``, ``clusters`` ([name,
directory]), ``netns`` (every namespace made, pods' included), ``nodes`` (key
"cluster/node" → netns, cluster, name, address, core_port, cni_conf_dir, cni_bin_dir,
pod_prefix_len, cni_args, api, cni_socket), ``pods`` (ref → netns, ip, node, ports,
container_id), ``servers`` (ref → process record), ``daemons`` (node key → process
record).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from typing import Iterator, Optional

from control.lab.layout import state_dir_default

logger = logging.getLogger(__name__)

VERSION = 2


class TestbedError(Exception):
    """A testbed that cannot be built or changed; ``code`` 2 for invalid input, 1
    otherwise. Every failure of the lab modules reaches callers as this."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def load(state_dir: Optional[str] = None) -> Optional[dict]:
    """The saved state of the testbed that is up, or None."""
    path = state_path(os.path.abspath(state_dir or state_dir_default()))
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise TestbedError(f"the testbed state {path} is unreadable ({e}); remove what it made by hand") from None


def save(state: dict) -> None:
    path = state_path(state["dir"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(state_dir: Optional[str] = None) -> Iterator[None]:
    """Hold the testbed's lock for the body (one writer at a time, across processes)."""
    state_dir = os.path.abspath(state_dir or state_dir_default())
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def require(state_dir: Optional[str] = None) -> dict:
    """The state of the running testbed; TestbedError when none is up."""
    state = load(state_dir)
    if state is None:
        raise TestbedError(f"no testbed is up (no state in {os.path.abspath(state_dir or state_dir_default())})")
    if state.get("version") != VERSION:
        raise TestbedError(f"the testbed in {state['dir']} was made by another version of mcnp; run `mcnp testbed down`")
    return state


def node_key(state: dict, node: str) -> str:
    """A node key "cluster/node" from itself or from a node name unique in the testbed."""
    nodes = state["nodes"]
    keys = [node] if node in nodes else [k for k in nodes if k.split("/", 1)[1] == node]
    if len(keys) != 1:
        raise LookupError(f"no single node {node!r} in the testbed (have: {', '.join(sorted(nodes)) or 'none'})")
    return keys[0]
