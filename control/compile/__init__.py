"""The policy compiler: cluster state -> revisioned ``PolicyTables`` (compiler,
selection, direction) and the compiled reachability matrix (matrix)."""

from control.compile.compiler import Compiler, compile_tables

__all__ = ["Compiler", "compile_tables"]
