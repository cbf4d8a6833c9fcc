"""cffi (API mode) builders of mcnp's C modules, one pattern for both.

Each module's declarations are the blocks between ``/* CDEF BEGIN */`` and
``/* CDEF END */`` of its headers (or of its single source), so every binding
is declared exactly once, in C.  API mode is required: the ring operations in
``<xdp/xsk.h>`` are ``static inline``.  ``setup.py`` names ``dataplane``,
``matcher`` as its ``cffi_modules``.

- ``fastpath._dp``: the packet path — frame parser, AF_XDP rings, the kernel
  side (maps, hooks, flow cache) and the per-batch pipeline, one module so a
  batch never crosses between extension modules.
- ``fastpath._match``: the batch matcher (also used offline).
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]


def cdef_between_markers(path: str) -> str:
    """The declarations between the CDEF markers of ``path``."""
    with open(path) as f:
        text = f.read()
    begin, end = "/* CDEF BEGIN */", "/* CDEF END */"
    return text[text.index(begin) + len(begin):text.index(end)]


def source(name: str) -> str:
    """A file under csrc/, relative to the working directory (as setuptools wants)."""
    return os.path.relpath(os.path.join(HERE, name))


def builder(module: str, headers: list[str], sources: list[str], libraries=(),
            inline: bool = False) -> FFI:
    """One module: the CDEF blocks of ``headers`` are its cdef; ``inline``
    modules include their single source instead of compiling it apart."""
    ffi = FFI()
    declarations = "\n".join(cdef_between_markers(os.path.join(HERE, h)) for h in headers)
    ffi.cdef(declarations)
    if inline:
        preamble = "".join(f'#include "{s}"\n' for s in sources)
        sources = []
    else:
        preamble = "".join(f'#include "{h}"\n' for h in headers)
    ffi.set_source(module, preamble, sources=[source(s) for s in sources],
                   include_dirs=[HERE], libraries=list(libraries), extra_compile_args=CFLAGS)
    return ffi


dataplane = builder(
    "fastpath._dp",
    ["mcnp_proto.h", "mcnp_parse.h", "mcnp_rings.h", "mcnp_kernel.h", "mcnp_pipeline.h"],
    ["parse.c", "rings.c", "kernel.c", "pipeline.c"],
    libraries=["xdp", "bpf"],
)
matcher = builder("fastpath._match", ["match.c"], ["match.c"], inline=True)

if __name__ == "__main__":
    for ffi in (dataplane, matcher):
        ffi.compile(verbose=True)
