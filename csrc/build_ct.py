"""cffi (API mode) builder for ``fastpath._ct``: connection tracking and the
fused per-batch pipeline in C.

The cdef is the block of ``mcnp_ct.h`` between its CDEF markers, and the same
header is what the C sources and the generated wrapper compile against, so
the binding is declared exactly once.  ``parse.c`` is compiled in as well:
the pipeline parses each batch itself instead of crossing the FFI again.
"""

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_build import CFLAGS, HERE, cdef_between_markers, source  # noqa: E402

DECLARATIONS = cdef_between_markers(os.path.join(HERE, "mcnp_ct.h"))

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fastpath._ct",
    '#include "mcnp_xsk.h"\n#include "mcnp_ct.h"\n',
    sources=[source(name) for name in ("conntrack.c", "pipeline.c", "parse.c")],
    include_dirs=[HERE],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
