"""What a directory holds, to check that a rerun wrote nothing."""

from __future__ import annotations

import os


def snapshot(root: str) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: (mtime in ns, bytes)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, f.read())
    return out
