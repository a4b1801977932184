"""Hash of the CUDA sources, shared by setup.py (baked into the build) and the loader (stale-build check).

Imports nothing but the standard library so that setup.py can load it before torch is importable.
"""
from __future__ import annotations

import glob
import hashlib
import os

_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


def csrc_hash(root: str) -> str | None:
    """sha256 (16 hex digits) over the relative paths and contents of ``root/csrc``; None if absent."""
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        return None
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith(_SUFFIXES):
            digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:16]
