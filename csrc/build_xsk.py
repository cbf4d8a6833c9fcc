"""cffi (API mode) builder for ``fastpath._xsk``: AF_XDP plumbing and the frame parser.

API mode is required: the ring operations in ``<xdp/xsk.h>`` are ``static
inline``, so they must be compiled into our own C helpers, not called through
an ABI-level binding.  The cdef is the block of ``mcnp_xsk.h`` between its
CDEF markers, so the binding is declared exactly once.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "mcnp_xsk.h")
SOURCES = ["xsk_helpers.c", "parse.c"]


def cdef_from_header(path: str) -> str:
    """Return the declarations between the ``CDEF BEGIN``/``CDEF END`` markers."""
    with open(path) as f:
        text = f.read()
    start = text.index("/* CDEF BEGIN */") + len("/* CDEF BEGIN */")
    return text[start:text.index("/* CDEF END */")]


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER))
ffibuilder.set_source(
    "fastpath._xsk",
    '#include "mcnp_xsk.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[HERE],
    libraries=["xdp", "bpf"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
