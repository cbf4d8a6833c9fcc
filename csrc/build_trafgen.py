"""cffi (API mode) builder for ``fastpath._trafgen``: the benchmark traffic generator.

The cdef is the block of ``trafgen.c`` between its CDEF markers.
"""

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_build import CFLAGS, HERE, cdef_between_markers, source  # noqa: E402

DECLARATIONS = cdef_between_markers(os.path.join(HERE, "trafgen.c"))

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fastpath._trafgen",
    "#include <stdint.h>\n" + DECLARATIONS,
    sources=[source("trafgen.c")],
    libraries=["bpf"],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
