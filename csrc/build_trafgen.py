"""cffi (API mode) builder for ``fastpath._trafgen``: the benchmark traffic generator.

The cdef is the block of ``trafgen.c`` between its CDEF markers.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "trafgen.c")


def cdef_from_source(path: str) -> str:
    """Return the declarations between the ``CDEF BEGIN``/``CDEF END`` markers."""
    with open(path) as f:
        text = f.read()
    start = text.index("/* CDEF BEGIN */") + len("/* CDEF BEGIN */")
    return text[start:text.index("/* CDEF END */")]


DECLARATIONS = cdef_from_source(SOURCE)

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fastpath._trafgen",
    "#include <stdint.h>\n" + DECLARATIONS,
    sources=[os.path.relpath(SOURCE)],
    libraries=["bpf"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
