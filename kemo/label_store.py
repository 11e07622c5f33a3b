"""The label output's rows: which rows of which parts are current, and the parts written and read.

A part is a Parquet file of whole photos' rows, named after its rows' photo versions (uri, size, mtime, ETag) and
faces, so rewriting the same rows gives the same file. Per uri, one version's rows from one part are current: the
version listed now, else the newest; a complete answer over a transient failure; among equals the first part by name
(duplicates left by a crash or a retry). Rows of photos no longer listed are kept.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage
from kemo.label_photos import PHOTO
from kemo.schema import LABELS, TRANSIENT

KIND = outputs.LABELS
PARTS = "parts"
KEYS = ["uri", "size", "mtime_ns", "etag", "face", "status", "label_name", "abstained"]  # what the skip rule reads


def _versions(table: pa.Table) -> list[str]:
    """Each row's photo version and face as one key: what a part is named after."""
    return ["\0".join(str(v) for v in r.values()) for r in table.select(PHOTO.names + ["face"]).to_pylist()]


def write_part(table: pa.Table, output: str) -> str:
    """Write one part of label rows (sorted by uri and face) through the output store; returns its name."""
    table = table.sort_by([("uri", "ascending"), ("face", "ascending")])
    return outputs.write_part(output, PARTS, table, _versions(table)).path.rsplit("/", 1)[-1]


def read_keys(output: str) -> dict[str, pa.Table]:
    """The :data:`KEYS` columns of every part present (committed or not): what the skip rule and the tally read."""
    return outputs.read_parts(output, PARTS, KEYS)


def _candidates(name: str, t: pa.Table, current: dict[str, tuple]) -> list[tuple[str, tuple, list[int]]]:
    """(uri, rank, rows) of each photo version in part ``name``: the lower the rank, the more current."""
    cols = {c: t.column(c).to_pylist() for c in KEYS[:6]}
    by_version: dict[tuple, list[int]] = {}
    for i, version in enumerate(zip(cols["uri"], cols["size"], cols["mtime_ns"], cols["etag"])):
        by_version.setdefault(version, []).append(i)
    out = []
    for version, idx in by_version.items():
        transient = any(cols["status"][i] in TRANSIENT for i in idx)
        first: dict[Any, int] = {}  # the same face twice in one part (a retried block): its first row
        for i in idx:
            first.setdefault(cols["face"][i], i)
        rank = (version[1:] != current.get(version[0]), transient, -(version[2] or 0), name)
        out.append((version[0], rank, list(first.values())))
    return out


def choose(tables: dict[str, pa.Table], current: dict[str, tuple]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Which rows of which parts are current: (keep mask per part, uris whose listed version is done)."""
    groups: dict[str, list[tuple[tuple, str, list[int]]]] = {}
    for name, t in tables.items():
        for uri, rank, idx in _candidates(name, t, current):
            groups.setdefault(uri, []).append((rank, name, idx))
    keep = {name: np.zeros(t.num_rows, bool) for name, t in tables.items()}
    done = set()
    for uri, candidates in groups.items():
        rank, name, idx = min(candidates, key=lambda c: c[0])
        keep[name][idx] = True
        if not rank[0] and not rank[1]:
            done.add(uri)
    return keep, done


def tally(tables: dict[str, pa.Table], keep: dict[str, np.ndarray]) -> dict[str, Any]:
    """Photos and rows, photos per status, rows (faces) per emotion and rows abstained, over the current rows."""
    current = pa.concat_tables([t.filter(pa.array(keep[n])) for n, t in sorted(tables.items())]) if tables else None
    if current is None or current.num_rows == 0:
        return {"photos": 0, "rows": 0, "statuses": {}, "emotions": {}, "abstained": 0}
    uris, statuses = current.column("uri").to_pylist(), current.column("status").to_pylist()
    per_photo = Counter(dict(zip(uris, statuses)).values())
    emotions = Counter(n for n in current.column("label_name").to_pylist() if n is not None)
    return {"photos": len(set(uris)), "rows": current.num_rows, "statuses": dict(sorted(per_photo.items())),
            "emotions": dict(sorted(emotions.items())), "abstained": int(pc.sum(current.column("abstained")).as_py()
                                                                        or 0)}


def keep_current(output: str, tables: dict[str, pa.Table], keep: dict[str, np.ndarray]) -> list[str]:
    """The names of the parts that hold exactly the current rows: whole parts as they are, and the current rest of
    each part that lost rows to newer versions or duplicates, written again under its own name."""
    final = sorted(n for n, mask in keep.items() if mask.all())
    for name in sorted(n for n, mask in keep.items() if not mask.all()):
        kept = storage.read_parquet(storage.join(output, PARTS, name)).filter(pa.array(keep[name]))
        if kept.num_rows:
            final.append(write_part(kept, output))
    return sorted(set(final))


def rows_of(output: str, parts: list[str], columns: list[str] | None) -> pa.Table:
    """The rows of ``parts`` (all of LABELS' columns, or ``columns``)."""
    return outputs.read_files([storage.join(output, PARTS, n) for n in parts], columns, LABELS)


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every current row of a committed label output, from the parts its commit manifest names."""
    return outputs.Output(output, KIND).read_table(PARTS, columns, LABELS)


def unchanged(out: outputs.Output, parts: list[str], tail: list[str]) -> bool:
    """Whether the output is committed, intact, and names exactly ``parts`` and ``tail``."""
    try:
        manifest = out.committed()
    except (FileNotFoundError, outputs.Damaged):
        return False
    wanted = sorted([f"{PARTS}/{n}" for n in parts] + tail)
    return sorted(f["path"] for f in manifest["files"] if f["path"] != outputs.CONFIG) == wanted
