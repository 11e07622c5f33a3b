"""The photos every stage works on: a generated AI-Hub-shaped corpus (or the one given), indexed, and the same photos
as the flat folder that the label job takes."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pyarrow as pa


def generate(root: str, n: int, size: str, seed: int, texture: bool) -> int:
    """A generated corpus of at least ``n`` photos (whole emotions: 7 × ⌈n / 7⌉) at ``size``; how many it holds."""
    from kemo.data import synth

    per_class = max(1, -(-n // 7))
    synth.generate(synth.SynthConfig(out=root, per_class=per_class, size=size, seed=seed, texture=texture))
    return 7 * per_class


def photos(corpus: str | None, root: str, size: str, n: int, seed: int, texture: bool) -> pa.Table:
    """Manifest rows of the first ``n`` photos with an annotated face: of ``corpus``, or generated at ``size`` under
    ``root``."""
    import pyarrow.compute as pc

    from kemo.data import aihub

    if corpus is None:
        corpus = root
        generate(root, n, size, seed, texture)
    table, _ = aihub.index(corpus)
    return table.filter(pc.is_valid(table.column("box"))).slice(0, n)


def photo_folder(rows: list[dict[str, Any]], folder: str) -> str:
    """The photos as one flat folder, which is what the label job takes (hard links where the file system allows)."""
    os.makedirs(folder)
    for i, r in enumerate(rows):
        dst = os.path.join(folder, f"{i:05d}{os.path.splitext(r['uri'])[1]}")
        try:
            os.link(r["uri"], dst)
        except OSError:  # another file system
            shutil.copyfile(r["uri"], dst)
    return folder
