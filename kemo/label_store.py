"""The label output's rows: which rows of which parts are current, and the parts written and read.

Two folders of parts: ``parts/`` holds label rows (a photo's, or a video's sampled frames'), ``videos/`` a summary row
per video. A part is a Parquet file named after its rows' file versions (uri, size, mtime, ETag), faces and samples,
so rewriting the same rows gives the same file. A video's frame rows are written whole into one part, then its
summary into a ``videos/`` part: a video version counts only once its summary is there. Per uri, one version is
current: the version listed now, else the newest; a complete answer over a transient failure; among equals the first
part by name (duplicates left by a crash or a retry). Its rows are kept from one part (and, for a video, its summary
from one part); rows of files no longer listed are kept.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage
from kemo.label_photos import PHOTO
from kemo.schema import LABELS, TRANSIENT, VIDEOS

log = logging.getLogger(__name__)
KIND = outputs.LABELS
PARTS = "parts"
VIDEO_PARTS = "videos"
# what the skip rule and the tally read of the label rows (the summaries, one row a video, are read whole)
KEYS = ["uri", "size", "mtime_ns", "etag", "face", "sample", "status", "label_name", "abstained"]
ORDER = [("uri", "ascending"), ("sample", "ascending"), ("face", "ascending")]


def _versions(table: pa.Table, extra: list[str]) -> list[str]:
    """Each row's file version (and ``extra`` columns) as one key: what a part is named after."""
    return ["\0".join(str(v) for v in r.values()) for r in table.select(PHOTO.names + extra).to_pylist()]


def write_part(table: pa.Table, output: str) -> str:
    """Write one part of label rows (sorted by uri, sample and face) through the output store; returns its name."""
    table = table.sort_by(ORDER)
    return outputs.write_part(output, PARTS, table, _versions(table, ["sample", "face"])).path.rsplit("/", 1)[-1]


def write_videos(table: pa.Table, output: str) -> str:
    """Write one part of video summaries (sorted by uri); returns its name."""
    table = table.sort_by("uri")
    return outputs.write_part(output, VIDEO_PARTS, table, _versions(table, [])).path.rsplit("/", 1)[-1]


class PartWriter:
    """Buffers whole files' rows (a photo's, or a video's frames with its summary) and writes them as parts of at
    least ``rows_per_part`` rows, or sooner once a buffered video has waited ``seconds`` (a killed run keeps what was
    written): the label rows first, then the summaries, so no summary is on disk before its video's frames."""

    def __init__(self, output: str, rows_per_part: int, seconds: float):
        self.output, self.rows_per_part, self.seconds = output, rows_per_part, seconds
        self.rows: list[pa.Table] = []
        self.summaries: list[dict[str, Any]] = []
        self.since = time.monotonic()
        self.files = 0

    def add(self, rows: pa.Table, summaries: list[dict[str, Any]], files: int) -> None:
        """Rows of ``files`` whole files (``summaries``: those of the videos among them); written when due."""
        if not self.rows and not self.summaries:
            self.since = time.monotonic()
        self.rows.append(rows)
        self.summaries += summaries
        self.files += files
        due = sum(t.num_rows for t in self.rows) >= self.rows_per_part
        if due or (self.summaries and time.monotonic() - self.since >= self.seconds):
            self.flush()

    def flush(self) -> None:
        table = pa.concat_tables(self.rows) if self.rows else LABELS.empty_table()
        names = [write_part(table, self.output)] if table.num_rows else []
        if self.summaries:
            names.append(f"{VIDEO_PARTS}/{write_videos(pa.Table.from_pylist(self.summaries, VIDEOS), self.output)}")
        if names:
            log.info("%s: %d rows, %d videos — %d files so far", ", ".join(names), table.num_rows,
                     len(self.summaries), self.files)
        self.rows, self.summaries = [], []


class Parts:
    """The parts present in one folder (committed or not) with their ``columns`` (None: all of the folder's schema),
    each part read once: a part read before under the same receipt (name, size and SHA-256) is not read again, so the
    re-read under the lease reads only the parts written since."""

    def __init__(self, output: str, folder: str, columns: list[str] | None):
        self.output, self.folder, self.columns = output, folder, columns
        self.receipts: dict[str, outputs.Receipt] = {}
        self.read_by: dict[outputs.Receipt, pa.Table] = {}

    def read(self) -> dict[str, pa.Table]:
        """Every part present by name, as its columns."""
        self.receipts = outputs.parts(self.output, self.folder)
        schema = LABELS if self.folder == PARTS else VIDEOS
        self.read_by = {r: self.read_by[r] if r in self.read_by else
                        outputs.read_files([storage.join(self.output, r.path)], self.columns, schema)
                        for r in self.receipts.values()}
        return {name: self.read_by[r] for name, r in sorted(self.receipts.items())}


Candidate = tuple[tuple, str, str, list[int], tuple]  # (rank, folder, part, rows, version)


def _rank(version: tuple, transient: bool, current: dict[str, tuple], name: str) -> tuple:
    """The lower, the more current: the listed version, a complete answer, the newest, the first part by name."""
    return version[1:] != current.get(version[0]), transient, -(version[2] or 0), name


def _by_version(t: pa.Table) -> dict[tuple, list[int]]:
    cols = [t.column(c).to_pylist() for c in PHOTO.names]
    out: dict[tuple, list[int]] = {}
    for i, version in enumerate(zip(*cols)):
        out.setdefault(version, []).append(i)
    return out


def _candidates(tables: dict[str, pa.Table], videos: dict[str, pa.Table], current: dict[str, tuple]
                ) -> tuple[dict[str, list[Candidate]], dict[tuple, tuple[str, list[int]]]]:
    """(the candidates of each uri: a photo's rows in a label part, or a video's summary in a summary part; the
    frame rows of each video version, from the first label part by name that holds them)."""
    groups: dict[str, list[Candidate]] = {}
    frames: dict[tuple, tuple[str, list[int]]] = {}
    for name, t in sorted(tables.items()):
        status, face, sample = (t.column(c).to_pylist() for c in ("status", "face", "sample"))
        for version, idx in _by_version(t).items():
            first: dict[Any, int] = {}  # the same face (of the same sample) twice in one part: its first row
            for i in idx:
                first.setdefault((sample[i], face[i]), i)
            rows = list(first.values())
            if sample[idx[0]] is not None:  # a video's frames: current only with their summary
                frames.setdefault(version, (name, rows))
                continue
            rank = _rank(version, any(status[i] in TRANSIENT for i in idx), current, name)
            groups.setdefault(version[0], []).append((rank, PARTS, name, rows, version))
    for name, t in sorted(videos.items()):
        status = t.column("status").to_pylist()
        for version, idx in _by_version(t).items():
            rank = _rank(version, status[idx[0]] in TRANSIENT, current, name)
            groups.setdefault(version[0], []).append((rank, VIDEO_PARTS, name, idx[:1], version))
    return groups, frames


def choose(tables: dict[str, pa.Table], videos: dict[str, pa.Table], current: dict[str, tuple]
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], set[str]]:
    """Which rows of which parts are current: (keep mask per label part, keep mask per summary part, uris whose
    listed version is done)."""
    groups, frames = _candidates(tables, videos, current)
    keep = {name: np.zeros(t.num_rows, bool) for name, t in tables.items()}
    keep_videos = {name: np.zeros(t.num_rows, bool) for name, t in videos.items()}
    done = set()
    for uri, candidates in groups.items():
        rank, folder, name, idx, version = min(candidates, key=lambda c: c[0])
        (keep if folder == PARTS else keep_videos)[name][idx] = True
        if folder == VIDEO_PARTS and version in frames:
            part, rows = frames[version]
            keep[part][rows] = True
        if not rank[0] and not rank[1]:
            done.add(uri)
    return keep, keep_videos, done


def current_rows(tables: dict[str, pa.Table], keep: dict[str, np.ndarray]) -> pa.Table | None:
    """The current rows of ``tables`` (what the parts that hold exactly them hold: :func:`keep_current`); None when
    there is no part."""
    current = [t.filter(pa.array(keep[n])) for n, t in sorted(tables.items())]
    return pa.concat_tables(current) if current else None


def tally(tables: dict[str, pa.Table], keep: dict[str, np.ndarray], videos: dict[str, pa.Table],
          keep_videos: dict[str, np.ndarray]) -> dict[str, Any]:
    """Photos, rows (of photos and frames), frame rows, photos per status, rows (faces) per emotion and rows
    abstained over the current label rows; videos and videos per status over the current summaries."""
    out: dict[str, Any] = {"photos": 0, "rows": 0, "frames": 0, "statuses": {}, "emotions": {}, "abstained": 0}
    current = current_rows(tables, keep)
    if current is not None and current.num_rows:
        photo = pc.is_null(current.column("sample")).to_numpy(zero_copy_only=False)
        uris, statuses = np.asarray(current.column("uri").to_pylist(), object), current.column("status").to_pylist()
        per_photo = Counter(dict(zip(uris[photo], np.asarray(statuses, object)[photo])).values())
        emotions = Counter(n for n in current.column("label_name").to_pylist() if n is not None)
        out.update(photos=len(set(uris[photo])), rows=current.num_rows, frames=int((~photo).sum()),
                   statuses=dict(sorted(per_photo.items())), emotions=dict(sorted(emotions.items())),
                   abstained=int(pc.sum(current.column("abstained")).as_py() or 0))
    summaries = current_rows(videos, keep_videos)
    per_video = Counter(summaries.column("status").to_pylist()) if summaries is not None else Counter()
    return {**out, "videos": sum(per_video.values()), "video_statuses": dict(sorted(per_video.items()))}


def keep_current(output: str, folder: str, tables: dict[str, pa.Table], keep: dict[str, np.ndarray]) -> list[str]:
    """The names of the parts of ``folder`` that hold exactly the current rows: whole parts as they are, and the
    current rest of each part that lost rows to newer versions or duplicates, written again under its own name."""
    final = sorted(n for n, mask in keep.items() if mask.all())
    write = write_part if folder == PARTS else write_videos
    for name in sorted(n for n, mask in keep.items() if not mask.all()):
        kept = storage.read_parquet(storage.join(output, folder, name)).filter(pa.array(keep[name]))
        if kept.num_rows:
            final.append(write(kept, output))
    return sorted(set(final))


def rows_of(output: str, parts: list[str], columns: list[str] | None, folder: str = PARTS) -> pa.Table:
    """The rows of ``parts`` of ``folder`` (all of their schema's columns, or ``columns``)."""
    schema = LABELS if folder == PARTS else VIDEOS
    return outputs.read_files([storage.join(output, folder, n) for n in parts], columns, schema)


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every current label row (photos' and videos' frames) of a committed label output, from the parts its commit
    manifest names."""
    return outputs.Output(output, KIND).read_table(PARTS, columns, LABELS)


def read_videos(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every current video summary of a committed label output (none: an empty table)."""
    return outputs.Output(output, KIND).read_table(VIDEO_PARTS, columns, VIDEOS)


def unchanged(out: outputs.Output, parts: list[str], videos: list[str], tail: list[str]) -> bool:
    """Whether the output is committed, intact, and names exactly ``parts``, ``videos`` and ``tail``."""
    try:
        manifest = out.committed()
    except (FileNotFoundError, outputs.Damaged):
        return False
    wanted = sorted([f"{PARTS}/{n}" for n in parts] + [f"{VIDEO_PARTS}/{n}" for n in videos] + tail)
    return sorted(f["path"] for f in manifest["files"] if f["path"] != outputs.CONFIG) == wanted
