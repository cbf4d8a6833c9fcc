"""Build of mcnp's native parts.

Everything declarative lives in pyproject.toml; this file only declares the cffi
modules (API mode, declared in csrc/build.py) and compiles the
XDP program with clang and the mcnp-cni plugin with the C compiler as part of
``build_ext``, so one ``pip install`` builds
everything the dataplane loads.
"""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# (source under csrc/, object placed in the fastpath package)
BPF_OBJECTS = [("csrc/xdp_filter.bpf.c", "fastpath/xdp_filter.bpf.o")]

# The chained CNI plugin: a standalone executable the DaemonSet copies to the host, so
# it ships as package data of control.node (source under csrc/, executable).
CNI_PLUGIN = ("csrc/mcnp_cni.c", "control/node/mcnp-cni")

# One builder module, csrc/build.py, declares every cffi module.
CFFI_MODULES = ["csrc/build.py:dataplane", "csrc/build.py:matcher"]


def compile_bpf(src: str, dst: str) -> None:
    """Compile one XDP program to a BPF object with clang (-O2, BTF for libbpf)."""
    arch = os.uname().machine.replace("x86_64", "x86").replace("aarch64", "arm64")
    cmd = [
        "clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
        f"-D__TARGET_ARCH_{arch}", "-I", os.path.join(HERE, "csrc"),
        "-c", os.path.join(HERE, src), "-o", os.path.join(HERE, dst),
    ]
    subprocess.run(cmd, check=True)


def compile_all_bpf() -> None:
    for src, dst in BPF_OBJECTS:
        if os.path.exists(os.path.join(HERE, src)):
            compile_bpf(src, dst)


def compile_cni_plugin() -> None:
    """Compile mcnp-cni with the C compiler, statically when the C library allows it
    (hosts run it outside any Python environment, with whatever libc they have)."""
    src, dst = (os.path.join(HERE, p) for p in CNI_PLUGIN)
    if not os.path.exists(src):
        return
    cc = os.environ.get("CC", "cc")
    base = [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-s", src, "-o", dst]
    if subprocess.run(base + ["-static"], capture_output=True).returncode != 0:
        subprocess.run(base, check=True)


class BuildExt(build_ext):
    def run(self):
        compile_all_bpf()
        compile_cni_plugin()
        super().run()


class BuildPy(build_py):
    """build_py copies package data before build_ext runs: compile the XDP object
    first so a wheel carries it."""

    def run(self):
        compile_all_bpf()
        compile_cni_plugin()
        super().run()


setup(cmdclass={"build_ext": BuildExt, "build_py": BuildPy}, cffi_modules=CFFI_MODULES)
