"""What every cffi builder under csrc/ shares: the cdef is the block of a C file
between its ``/* CDEF BEGIN */`` and ``/* CDEF END */`` markers (so each binding is
declared exactly once, in C), and one set of compiler flags."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]


def cdef_between_markers(path: str) -> str:
    """The declarations between the CDEF markers of ``path``."""
    with open(path) as f:
        text = f.read()
    begin, end = "/* CDEF BEGIN */", "/* CDEF END */"
    return text[text.index(begin) + len(begin):text.index(end)]


def source(name: str) -> str:
    """A source file under csrc/, relative to the working directory (as setuptools wants)."""
    return os.path.relpath(os.path.join(HERE, name))
