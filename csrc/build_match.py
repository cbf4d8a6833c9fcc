"""cffi (API mode) builder for ``fastpath._match``: the batch matcher kernel.

The cdef is the block of ``match.c`` between its CDEF markers and the module's
source is ``match.c`` itself, so the declarations exist exactly once.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "match.c")


def cdef_from_source(path: str) -> str:
    """Return the declarations between the ``CDEF BEGIN``/``CDEF END`` markers."""
    with open(path) as f:
        text = f.read()
    start = text.index("/* CDEF BEGIN */") + len("/* CDEF BEGIN */")
    return text[start:text.index("/* CDEF END */")]


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_source(SOURCE))
ffibuilder.set_source(
    "fastpath._match",
    '#include "match.c"',
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
