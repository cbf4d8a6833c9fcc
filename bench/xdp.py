"""The pass-only hooks of configuration (b) of the node benchmarks.

csrc/xdp_pass.bpf.c only returns ``XDP_PASS``. The benchmark compiles it with clang
to a temporary directory (``build``; it is no part of the daemon's build) and iproute2
attaches it in generic (skb) mode on both ends of every pod veth, the hooks mcnp
uses, so (b) shows what any XDP design costs on veth before it does any work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS_SOURCE = os.path.join(ROOT, "csrc", "xdp_pass.bpf.c")
#: Seconds any one ``ip`` or clang call may take.
TOOL_TIMEOUT = 60.0


class XdpError(RuntimeError):
    """A program could not be built, loaded or attached (the message says which)."""


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, timeout=TOOL_TIMEOUT)
    if proc.returncode != 0:
        raise XdpError(f"{what}: {proc.stderr.decode(errors='replace').strip()[:400]}")
    return proc.stdout.decode()


def build(source: str, out_dir: str) -> str:
    """Compile ``source`` to a BPF object in ``out_dir``; returns its path."""
    arch = os.uname().machine.replace("x86_64", "x86").replace("aarch64", "arm64")
    out = os.path.join(out_dir, os.path.basename(source).replace(".c", ".o"))
    argv = ["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-D__TARGET_ARCH_{arch}"]
    _run(argv + ["-c", source, "-o", out], f"compiling {os.path.basename(source)}")
    return out


# --------------------------------------------------------------------------- hooks


def attach_pass(netns: str, ifname: str, obj: str) -> None:
    """The pass-only program on ``ifname`` in ``netns``, generic mode."""
    _run(["ip", "-n", netns, "link", "set", "dev", ifname, "xdpgeneric", "obj", obj, "sec", "xdp"],
         f"attaching the pass-only program to {ifname} in {netns}")


def detach(netns: str, ifname: str) -> None:
    _run(["ip", "-n", netns, "link", "set", "dev", ifname, "xdpgeneric", "off"],
         f"detaching the XDP program of {ifname} in {netns}")


@contextlib.contextmanager
def pass_hooks(obj: str, ends: list[tuple[str, str]]):
    """The pass-only program on every (netns, ifname) of ``ends`` for the body; every
    one attached is detached again, also when the body fails."""
    done: list[tuple[str, str]] = []
    try:
        for netns, ifname in ends:
            attach_pass(netns, ifname, obj)
            done.append((netns, ifname))
        yield
    finally:
        for netns, ifname in done:
            try:
                detach(netns, ifname)
            except XdpError as e:
                logger.warning("%s", e)
