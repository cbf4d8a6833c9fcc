"""A private copy of the bundled demo's manifest directories, for tests that change them."""

from __future__ import annotations

import os
import shutil

DEMO = os.path.join(os.path.dirname(__file__), "..", "control", "lab", "examples", "demo")


def copy_demo(root) -> dict[str, str]:
    """``{"east": DIR, "west": DIR}``: the demo's two clusters copied under ``root``."""
    dirs = {}
    for name in ("east", "west"):
        dirs[name] = os.path.join(str(root), name)
        shutil.copytree(os.path.join(DEMO, name), dirs[name])
    return dirs
