"""Network namespaces: the one place that calls setns(2).

A socket belongs to the namespace its thread was in when it was made, and XDP
attach and interface lookups work in the caller's namespace; so the packet loop
enters a pod's namespace around opening the pod's end and attaching its hook,
and always comes back.  Namespaces are named by path: ``/var/run/netns/NAME``
for those ``ip netns`` lists, or any ``/proc/PID/ns/net``-style path a
container runtime hands to CNI plugins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Namespace:
    """An open network namespace (a file descriptor on it)."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    @classmethod
    def from_path(cls, path: str) -> "Namespace":
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)

    @classmethod
    def from_name(cls, name: str) -> "Namespace":
        """A namespace ``ip netns`` lists."""
        return cls.from_path(os.path.join(NETNS_DIR, name))

    @classmethod
    def current(cls) -> "Namespace":
        return cls.from_path("/proc/thread-self/ns/net")

    def enter(self) -> None:
        """Move the calling thread here for good (a worker process's own namespace)."""
        setns(self.fd)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The body runs with the calling thread in this namespace; always comes back."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.fd)
            try:
                yield
            finally:
                setns(own)
        finally:
            os.close(own)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
