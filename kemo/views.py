"""The views of a committed output, made by the driver at commit: ``gallery.html`` of crops and of labels, and
``labels.csv`` and ``videos.csv``. A view is volatile (never a content key) and never data: the rows commit without it
when it fails.

Rows are chosen in Arrow from the small columns the commit already read; only the pictures a page shows are read
again: the row groups of the shards that hold a shown crop, the photos of the faces it shows, or the frames of a
video's strip (decoded again at their times).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import gallery, storage
from kemo.classes import CLASS_NAMES
from kemo.outputs import Receipt
from kemo.schema import CROP, has_box

CROP_SHOWN = ["image_id", "status", "box", "face_box", "uri", "error", "label"]  # what the crop page reads of a shard
LABEL_SHOWN = ["uri", "size", "mtime_ns", "etag", "status", "error", "face", "face_box", "label", "label_name",
               "confidence", "abstained", "time", "sample"]
VIDEO_SHOWN = ["uri", "status", "error", "container", "codec", "width", "height", "rotation", "duration", "fps",
               "frames_sampled", "last_time", "face_frames", "abstained", "shares", "dominant"]
STRIP = 12  # faces in a video's strip, spread over its sampled frames
FRAMED = ("ok", "no_face", "truncated", "error")  # video statuses that may have sampled frames to show (if any)
BY_ID = [("image_id", "ascending")]


# --------------------------------------------------------------------------------------------------- crops


def _crop_table(small: list[pa.Table]) -> pa.Table:
    """The shards' shown columns and ``iou`` as one table, each row with its shard and row number."""
    columns = [*CROP_SHOWN, "iou"]
    tables = [t.select(columns).append_column("shard", pa.array(np.full(t.num_rows, k, np.int32)))
              .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))) for k, t in enumerate(small)]
    if tables:
        return pa.concat_tables(tables)
    empty = CROP.empty_table().select(CROP_SHOWN).append_column("iou", pa.array([], pa.float64()))
    return empty.append_column("shard", pa.array([], pa.int32())).append_column("row", pa.array([], pa.int64()))


def _crop_name(r: dict[str, Any]) -> str:
    label = CLASS_NAMES[r["label"]] if r["label"] is not None and r["label"] >= 0 else "no label"
    return f"{label} · {r['image_id'].rsplit('/', 1)[-1]}"


def _crop_sections(table: pa.Table, statuses: list[str], cap: int, max_bytes: int, whole_photo: bool
                   ) -> tuple[list[gallery.Section], dict[tuple[int, int], list[gallery.Tile]]]:
    """The page's sections, and the tiles of each shown crop (by shard and row: a crop may be in two sections)."""
    crops_of: dict[tuple[int, int], list[gallery.Tile]] = {}

    def crop_tile(r: dict[str, Any], caption: str) -> gallery.Tile:
        tile = gallery.Tile(caption=caption, title=r["image_id"])
        crops_of.setdefault((r["shard"], r["row"]), []).append(tile)
        return tile

    sections = []
    for status in sorted(statuses, key=lambda x: (x != "ok", x)):
        order = [("shard", "ascending"), ("row", "ascending")] if status == "ok" else BY_ID
        total, group = gallery.top(table, pc.equal(table.column("status"), status), cap, order)
        if status == "ok":  # the first shards' first crops: their crops are read from a shard or two
            sections.append(gallery.Section("ok", [crop_tile(r, _crop_name(r)) for r in group], total,
                                            "the crops as training reads them"))
        elif status == "no_face":
            sections.append(gallery.no_face(group, total, _crop_name, "image_id", max_bytes))
        else:
            sections.append(gallery.Section(status, [
                gallery.Tile(caption=r["image_id"], title=r["uri"] or r["image_id"], note=r["error"])
                for r in group], total, "nothing to show: each with its error", pictures=False))
    if not whole_photo:  # the whole photo is never the annotators' box
        away = pc.and_(pc.and_(pc.equal(table.column("status"), "ok"), pc.less(table.column("iou"), 0.5)),
                       pa.array(has_box(table.column("face_box"))))
        total, group = gallery.top(table, away, cap, [("iou", "ascending"), *BY_ID])
        tiles = [crop_tile(r, f"IoU {r['iou']:.2f} · {_crop_name(r)}") for r in group]
        sections.append(gallery.Section("face away from the annotators' box", tiles, total,
                                        "the crop's face box overlaps the annotators' consensus box by IoU < 0.5"))
    return sections, crops_of


def crops_at(uri: str, rows: list[int]) -> dict[int, bytes | None]:
    """The ``crop`` of the rows ``rows`` (numbers) of one shard, reading only the row groups that hold them (a shard's
    groups hold ~1 MiB of crops: :func:`kemo.outputs.parquet_bytes`)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        shard = pq.ParquetFile(f)
        starts = np.cumsum([0] + [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
        at = {r: int(np.searchsorted(starts, r, "right")) - 1 for r in rows}
        crops = {}
        for g in sorted(set(at.values())):
            column = shard.read_row_group(g, columns=["crop"]).column("crop")
            crops.update({r: column[r - int(starts[g])].as_py() for r in rows if at[r] == g})
    return crops


def crop_gallery(output: str, shards: list[Receipt], small: list[pa.Table], heading: list[str], statuses: list[str],
                 cap: int, max_bytes: int, whole_photo: bool) -> bytes:
    """gallery.html of a crop output: the ok crops, the other statuses (a photo with no face shown whole, read
    again; the others listed with their error), and the crops whose face lies away from the annotators' box (IoU <
    0.5, the least overlap first), at most ``cap`` each. ``small`` is each shard's :data:`CROP_SHOWN` and ``iou``
    as the commit read them; of the crops, only the row groups that hold a shown one are read (:func:`crops_at`)."""
    sections, crops_of = _crop_sections(_crop_table(small), statuses, cap, max_bytes, whole_photo)
    for k in sorted({shard for shard, _ in crops_of}):
        crops = crops_at(storage.join(output, shards[k].path), sorted(row for shard, row in crops_of if shard == k))
        for (shard, row), tiles in crops_of.items():
            if shard == k:
                thumb = gallery.crop_thumbnail(crops[row])
                for tile in tiles:
                    tile.thumb, tile.note = thumb, None if thumb else "no picture: the crop does not decode"
    gallery.thumbnails(sections)
    return gallery.page(heading[0], heading[1:], sections)


# --------------------------------------------------------------------------------------------------- labels


def short(uri: str) -> str:
    """The last two parts of a path or key, for a caption (the full one is on hover)."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def _face_caption(r: dict[str, Any]) -> str:
    face = f" face {r['face']}" if r["face"] else ""
    return f"{r['label_name']} {r['confidence']:.2f} · {short(r['uri'])}{face}"


def label_gallery(rows: pa.Table, videos: pa.Table, listed: pa.Table, classes: list[str], heading: list[str],
                  cap: int, max_bytes: int, max_pixels: int, threshold: float | None,
                  known: dict[str, bytes] | None = None) -> bytes:
    """gallery.html of the current label rows (:data:`LABEL_SHOWN`) and video summaries (:data:`VIDEO_SHOWN`): the
    photos' faces by predicted emotion (most confident first), the abstained apart (most confident first: the nearest
    to being kept), then the photos with no face and those with another status, listed with their error; at most
    ``cap`` in each; then a section per video (at most ``cap``: :func:`video_sections`). Thumbnails are cut from the
    photos and videos again: a few hundred reads, whatever the size of the output, each of the very file this run
    ``listed`` (its ``file_id``), except those ``known`` from the previous page (:func:`kemo.gallery.known_thumbs`:
    the same file version and box); a row of a file no longer listed is shown without its picture."""
    frames = rows.filter(pc.is_valid(rows.column("sample")))
    rows = rows.filter(pc.is_null(rows.column("sample")))
    at = pc.index_in(rows.column("uri"), value_set=listed.column("uri"))
    rows = rows.append_column("listed", pc.is_valid(at)).append_column("file_id", listed.column("file_id").take(at))
    ok = pc.equal(rows.column("status"), "ok")
    abstained = rows.column("abstained").fill_null(False)  # null where nothing was classified
    by_confidence = [("confidence", "descending"), ("uri", "ascending"), ("face", "ascending")]
    sections = []

    def faces(title: str, mask: pa.Array, note: str = "") -> None:
        total, shown = gallery.top(rows, mask, cap, by_confidence)
        tiles = gallery.photo_tiles(shown, _face_caption, "uri", "face_box", max_bytes)
        sections.append(gallery.Section(title, tiles, total, note))

    for name in classes:
        faces(name, pc.and_(pc.and_(ok, pc.invert(abstained)), pc.equal(rows.column("label_name"), name)))
    faces("abstained", pc.and_(ok, abstained),
          f"confidence below {threshold:.3f}; the arg-max label is still given" if threshold is not None
          else "no abstention in this run (--abstain or --min-confidence)")
    by_uri = [("uri", "ascending"), ("face", "ascending")]
    total, shown = gallery.top(rows, pc.equal(rows.column("status"), "no_face"), cap, by_uri)
    sections.append(gallery.no_face(shown, total, lambda r: short(r["uri"]), "uri", max_bytes))
    others = pc.invert(pc.is_in(rows.column("status"), pa.array(["ok", "no_face"])))
    total, shown = gallery.top(rows, others, cap, by_uri)
    sections.append(gallery.Section("other statuses", [
        gallery.Tile(caption=short(r["uri"]), title=r["uri"], note=f"{r['status']}: {r['error'] or ''}")
        for r in shown], total, "nothing to show: each with its status and error", pictures=False))
    sections += video_sections(frames, videos, listed, classes, cap, max_pixels)
    gallery.thumbnails(sections, known)
    return gallery.page("kemo labels", heading, sections)


def _strip_caption(r: dict[str, Any]) -> str:
    return f"{r['time']:.1f} s · {r['label_name']} {r['confidence']:.2f}" + (" (abstained)" if r["abstained"] else "")


def _video_note(v: dict[str, Any], classes: list[str]) -> str:
    shares = ", ".join(f"{c} {p:.2f}" for c, p in zip(classes, v["shares"]) if p) if v["shares"] else "none"
    return (f"{v['container']} {v['codec']} {v['width']}×{v['height']}, rotated {v['rotation'] or 0}°, "
            f"{v['duration'] or 0:.1f} s at {v['fps'] or 0:.2f} fps; {v['frames_sampled']} frames sampled, "
            f"{v['face_frames']} with a face ({v['abstained']} abstained); shares {shares}"
            + (f"; {v['error']}" if v["error"] else ""))


def video_section(v: dict[str, Any], frames: list[dict[str, Any]], listed: dict[str, Any] | None,
                  classes: list[str], max_pixels: int) -> gallery.Section:
    """One video's section: the timeline of its sampled frames' emotions, then a strip of at most :data:`STRIP` of
    its faces spread over its time, each cut from its frame decoded again (``listed``: the video as this run listed
    it; None: no longer listed, no pictures)."""
    primary = sorted((r for r in frames if r["face"] in (0, None)), key=lambda r: r["sample"])  # one a frame
    faces = [r for r in primary if r["status"] == "ok"]
    k = min(STRIP, len(faces))
    picked = sorted({round(i * (len(faces) - 1) / max(1, k - 1)) for i in range(k)})  # k of them, first to last
    strip = [faces[i] for i in picked]
    loader = gallery.VideoFrames(listed, max_pixels, [(r["time"], r["face_box"]) for r in strip]) if listed else None
    tiles = [gallery.Tile(caption=_strip_caption(r), title=f"{v['uri']} at {r['time']:.3f} s",
                          make=partial(loader.thumb, i) if loader else None,
                          note=None if loader else gallery.NOT_LISTED,
                          key=gallery.tile_key(listed, r["face_box"], r["time"]) if listed else None)
             for i, r in enumerate(strip)]
    labels = [r["label"] if r["status"] == "ok" and not r["abstained"] else None for r in primary]
    plot = gallery.timeline([r["time"] for r in primary], labels, classes,
                            max(v["duration"] or 0, v["last_time"] or 0))
    title = f"video {short(v['uri'])} · {v['dominant'] or 'no face'} · {v['status']}"
    return gallery.Section(title, tiles, len(faces), _video_note(v, classes), plot=plot)


def video_sections(frames: pa.Table, videos: pa.Table, listed: pa.Table, classes: list[str], cap: int,
                   max_pixels: int) -> list[gallery.Section]:
    """A section per video with sampled frames (the first ``cap`` by uri: :func:`video_section`), and the other
    videos, listed with their status and error."""
    if not videos.num_rows:
        return []
    by_uri = [("uri", "ascending")]
    framed = pc.and_(pc.is_in(videos.column("status"), pa.array(FRAMED)),
                     pc.greater(videos.column("frames_sampled"), 0))
    total, shown = gallery.top(videos, framed, cap, by_uri)
    uris = pa.array([v["uri"] for v in shown], pa.string())
    mine: dict[str, list[dict[str, Any]]] = {}
    for r in frames.filter(pc.is_in(frames.column("uri"), uris)).to_pylist():
        mine.setdefault(r["uri"], []).append(r)
    where = {r["uri"]: r for r in listed.filter(pc.is_in(listed.column("uri"), uris)).to_pylist()}
    sections = [video_section(v, mine.get(v["uri"], []), where.get(v["uri"]), classes, max_pixels) for v in shown]
    if total > len(shown):
        sections.append(gallery.Section(f"{total - len(shown)} more videos", [], total - len(shown),
                                        f"at most {cap} videos are shown (--gallery)", pictures=False))
    total, shown = gallery.top(videos, pc.invert(framed), cap, by_uri)
    sections.append(gallery.Section("videos: other statuses", [
        gallery.Tile(caption=short(v["uri"]), title=v["uri"], note=f"{v['status']}: {v['error'] or ''}")
        for v in shown], total, "no frame to show: each with its status and error", pictures=False))
    return sections


FORMULA = r"^[=+\-@\t\r]"  # a cell a spreadsheet would run as a formula (OWASP's CSV injection list)


def as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column whose cells a spreadsheet shows as text: those that start like a formula get a ``'`` first."""
    risky = pc.fill_null(pc.match_substring_regex(column, FORMULA), False)
    return pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)


def _csv(table: pa.Table, spread: dict[str, Callable[[pa.ChunkedArray], dict[str, Any]]], header: bool = True
         ) -> bytes:
    """A table as CSV for spreadsheets (``header``: with its header line; without, lines to append to a file that
    has it): the ``spread`` list columns as scalar ones, every text cell (file names, class names, errors: none of
    them kemo's own) escaped by :func:`as_text`."""
    import pyarrow.csv as pacsv

    cols: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        column = as_text(column) if pa.types.is_string(column.type) else column
        cols.update(spread[name](column) if name in spread else {name: column})
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols), buf, pacsv.WriteOptions(include_header=header))
    return buf.getvalue()


def _by_class(prefix: str, classes: list[str]) -> Callable[[pa.ChunkedArray], dict[str, Any]]:
    return lambda c: {f"{prefix}{name}": pc.list_element(c, k) for k, name in enumerate(classes)}


def labels_csv(table: pa.Table, classes: list[str], header: bool = True) -> bytes:
    """labels.csv: the label rows, boxes and probabilities spread into columns (face_x1 … face_y2, p_<class>); without
    ``header``, the lines to append to a labels.csv of the same classes."""
    return _csv(table, {
        "face_box": lambda c: {f"face_{a}": pc.list_element(c, k) for k, a in enumerate(("x1", "y1", "x2", "y2"))},
        "probs": _by_class("p_", classes)}, header)


def videos_csv(table: pa.Table, classes: list[str]) -> bytes:
    """videos.csv: the video summaries, the emotion shares spread into columns (share_<class>)."""
    return _csv(table, {"shares": _by_class("share_", classes)})
