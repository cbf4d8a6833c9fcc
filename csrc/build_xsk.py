"""cffi (API mode) builder for ``fastpath._xsk``: AF_XDP plumbing and the frame parser.

API mode is required: the ring operations in ``<xdp/xsk.h>`` are ``static
inline``, so they must be compiled into our own C helpers, not called through
an ABI-level binding.  The cdef is the block of ``mcnp_xsk.h`` between its
CDEF markers, so the binding is declared exactly once.
"""

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_build import CFLAGS, HERE, cdef_between_markers, source  # noqa: E402

ffibuilder = FFI()
ffibuilder.cdef(cdef_between_markers(os.path.join(HERE, "mcnp_xsk.h")))
ffibuilder.set_source(
    "fastpath._xsk",
    '#include "mcnp_xsk.h"',
    sources=[source(name) for name in ("xsk_helpers.c", "parse.c")],
    include_dirs=[HERE],
    libraries=["xdp", "bpf"],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
