"""cffi (API mode) builder for ``fastpath._ct``: connection tracking and the
fused per-batch pipeline in C.

The cdef is the block of ``mcnp_ct.h`` between its CDEF markers, and the same
header is what the C sources and the generated wrapper compile against, so
the binding is declared exactly once.  ``parse.c`` is compiled in as well:
the pipeline parses each batch itself instead of crossing the FFI again.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "mcnp_ct.h")
SOURCES = [os.path.join(HERE, name) for name in ("conntrack.c", "pipeline.c", "parse.c")]


def cdef_from_source(path: str) -> str:
    """Return the declarations between the ``CDEF BEGIN``/``CDEF END`` markers."""
    with open(path) as f:
        text = f.read()
    start = text.index("/* CDEF BEGIN */") + len("/* CDEF BEGIN */")
    return text[start:text.index("/* CDEF END */")]


DECLARATIONS = cdef_from_source(HEADER)

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fastpath._ct",
    '#include "mcnp_xsk.h"\n#include "mcnp_ct.h"\n',
    sources=[os.path.relpath(s) for s in SOURCES],
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
