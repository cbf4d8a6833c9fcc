"""cffi (API mode) builder for ``fastpath._match``: the batch matcher kernel.

The cdef is the block of ``match.c`` between its CDEF markers and the module's
source is ``match.c`` itself, so the declarations exist exactly once.
"""

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffi_build import CFLAGS, HERE, cdef_between_markers  # noqa: E402

ffibuilder = FFI()
ffibuilder.cdef(cdef_between_markers(os.path.join(HERE, "match.c")))
ffibuilder.set_source(
    "fastpath._match",
    '#include "match.c"',
    include_dirs=[HERE],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
