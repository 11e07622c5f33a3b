"""Stream a manifest's photos through face-detection actor pools into Parquet crop shards.

    python jobs/preprocess.py --input ROOT_OR_MANIFEST --output DIR_OR_S3 --detector yolo --weights face.pt

One actor boundary per photo: read bytes → decode (EXIF-upright, DCT-reduced when large) → detector input, in a pool
of decoder threads; the detector runs batched on the actor's device; the primary face is cropped square with a margin
and JPEG-encoded (:mod:`kemo.frontend`). Only crops and boxes leave the actor. Writer actors write ``rows_per_shard``
rows per shard through the output store (:mod:`kemo.outputs`): each shard whole, named after its rows, with its
receipt, so a killed run resumes from the shards it left and a rerun adds nothing. The commit comes last, after
checking that every input has exactly one row; a rerun of a committed output with nothing to redo writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage
from kemo.crop import encode_jpeg, ious, primary_face
from kemo.detector.base import Faces
from kemo.detector.registry import check_detector, verify_detector
from kemo.frontend import FrontEnd, Prepared
from kemo.resources import ActorResources, check_shared, connect, resolve_resources
from kemo.schema import CARRIED, CROP, IDENTITY, TRANSIENT
from kemo.settings import CropSettings, DetectorSettings, InputSettings, crop_fingerprint, input_defaults

log = logging.getLogger(__name__)
KIND = outputs.CROPS
SHARDS = "shards"
SMOKE_ROWS = 16


@dataclass(kw_only=True)
class PreprocessConfig(DetectorSettings, CropSettings, InputSettings, ActorResources):
    """Detect and crop the face of every photo into Parquet crop shards."""

    input: str = field(metadata={"help": "AI-Hub root, index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    per_class: int = field(default=0, metadata={"help": "when indexing a root: balanced sample per class (0 = all)"})
    seed: int = field(default=0, metadata={"help": "when indexing a root: split and sample seed"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per Parquet shard (~75 MB at 500² crops)"})
    gallery: int = field(default=48, metadata={
        "help": "gallery.html: at most this many crops per status (and of crops away from the annotators' box); "
                "0 for none"})
    smoke_test: bool = field(default=False, metadata={"help": f"only the first {SMOKE_ROWS} photos"})


# --------------------------------------------------------------------------------------------------- the actor


class CropPhotos:
    """Ray Data class UDF: a batch of manifest rows → the same rows as crop-shard rows (``CROP``), one each."""

    def __init__(self, cfg: dict[str, Any]):
        """The front end (detector, decoder threads) from ``cfg``, a ``PreprocessConfig`` as a dict."""
        self.cfg = PreprocessConfig(**cfg)
        self.front = FrontEnd(self.cfg, self.cfg, self.cfg.decoders, self.cfg.max_bytes, self.cfg.decode_pixels)

    def finish(self, row: dict[str, Any], prep: Prepared, faces: Faces | None) -> dict[str, Any]:
        """One photo's crop-shard row from what the front end made of it."""
        front = self.front
        out = {k: row.get(k) for k in CARRIED}
        out.update(detector=front.detector.name, status=prep.status or "ok", error=prep.error, crop=None,
                   face_box=None, face_score=None, n_faces=None)
        out["orig_width"], out["orig_height"], out["exif_orientation"] = prep.header
        dec = prep.decoded
        if dec is None:
            return out
        try:
            if front.detector.whole_photo:
                crop = front.crop(dec, None)
                out["face_box"] = [0.0, 0.0, float(dec.width), float(dec.height)]
            else:
                boxes, scores = front.faces(prep, faces)
                out["n_faces"] = len(boxes)
                best = primary_face(np.asarray(boxes).reshape(-1, 4), np.asarray(scores))
                if best is None:
                    out.update(status="no_face", error=f"{front.detector.name} found no face")
                    return out
                crop = front.crop(dec, boxes[best])
                out["face_box"], out["face_score"] = boxes[best], scores[best]
            out["crop"] = encode_jpeg(crop, self.cfg.jpeg_quality)
        except Exception as e:
            log.exception("cropping %s failed", row.get("image_id"))
            out.update(status="error", error=f"{type(e).__name__}: {e}", crop=None)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prepared, faces = self.front.detect(rows)
        out = list(self.front.pool.map(self.finish, rows, prepared, faces))
        return pa.Table.from_pylist(out, schema=CROP)


# --------------------------------------------------------------------------------------------------- shards


class ShardWriter:
    """Ray Data class UDF: writes each batch as one shard through the output store; a few long-lived writer
    processes, not a new task per shard. Returns a one-row receipt per shard."""

    def __init__(self, output: str):
        self.output = output

    def __call__(self, batch: pa.Table) -> pa.Table:
        receipt = outputs.write_part(self.output, SHARDS, batch, batch.column("image_id").to_pylist())
        counts = Counter(batch.column("status").to_pylist())
        return pa.table({"file": [receipt.path], "rows": [batch.num_rows], "ok": [counts.get("ok", 0)]})


def _rewrite_without(output: str, name: str, drop: pa.Array) -> tuple[pa.Table, outputs.Receipt | None]:
    """Replace a shard by one without the rows ``drop`` marks (and its receipt, None when no row is left); the new
    part is written before the old one goes, so a crash in between leaves duplicates (which ``_finalize`` removes),
    never a loss."""
    keep = storage.read_parquet(storage.join(output, SHARDS, name)).filter(pc.invert(drop))
    receipt = outputs.write_part(output, SHARDS, keep, keep.column("image_id").to_pylist()) if keep.num_rows else None
    outputs.delete_part(output, SHARDS, name)
    return keep, receipt


def resume(output: str) -> tuple[set[str], int]:
    """(photos already done, photos to do again): shards lose their transient-failure rows, so a rerun processes
    those photos again."""
    done, dropped = set(), 0
    for name, t in outputs.read_parts(output, SHARDS, ["image_id", "status"]).items():
        retry = pc.is_in(t.column("status"), pa.array(TRANSIENT))
        n = pc.sum(retry).as_py() or 0
        if n:
            _rewrite_without(output, name, retry)  # its remaining rows, under their own name
        dropped += n
        done.update(t.filter(pc.invert(retry)).column("image_id").to_pylist())
    return done, dropped


# --------------------------------------------------------------------------------------------------- the job


def load_input(cfg: PreprocessConfig, index: bool = True) -> pa.Table | None:
    """The manifest to preprocess: from a manifest file, an index output, or by indexing an AI-Hub root into
    ``OUTPUT/index`` (``index=False``: None instead, so nothing is written)."""
    from kemo.data import aihub

    return aihub.load_or_index(cfg.input, storage.join(cfg.output, "index"), per_class=cfg.per_class, seed=cfg.seed,
                               index=index, inputs=cfg)


def fingerprint(cfg: PreprocessConfig, manifest: pa.Table) -> dict[str, Any]:
    """Everything that changes a row: the settings, and every input column a row copies or crops by (the manifest's
    identity columns: a re-made index with other splits, labels or boxes is another run); resource knobs and the code
    version do not (a bug-fix release may resume)."""
    weights_sha = None
    if cfg.detector == "yolo" and cfg.weights:
        from kemo.detector.weights import fetch_weights

        weights_sha = fetch_weights(cfg.weights, cfg.weights_sha256)[1]
    return {**crop_fingerprint(cfg, cfg), "weights_sha256": weights_sha, "max_bytes": cfg.max_bytes,
            "inputs": manifest.num_rows,
            "inputs_sha256": outputs.table_sha256(manifest.select(list(IDENTITY)), sort_by="image_id")}


CHECKED = ["image_id", "status", "box", "face_box"]  # what the commit reads of every shard
GALLERY_COLUMNS = [*CHECKED, "uri", "error", "label"]  # and what the gallery reads, in the same pass


def _four(column: pa.ChunkedArray) -> np.ndarray:
    """Which rows hold a box of 4 numbers."""
    return pc.equal(pc.fill_null(pc.list_value_length(column), 0), 4).to_numpy(zero_copy_only=False)


def face_iou(table: pa.Table) -> pa.Array:
    """Per row, the IoU of the crop's face box with the annotators' consensus box, in one vectorised pass: null where
    the manifest has no box, 0 where no face was cropped."""
    has_box, has_face = _four(table.column("box")), _four(table.column("face_box"))
    both = has_box & has_face
    values = np.zeros(table.num_rows)
    if both.any():
        rows = table.filter(pa.array(both))

        def boxes(name: str) -> np.ndarray:
            return rows.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)

        values[both] = ious(boxes("box"), boxes("face_box"))
    return pa.array(values, mask=~has_box)


def _finalize(output: str, manifest: pa.Table, columns: list[str]
              ) -> tuple[list[outputs.Receipt], list[pa.Table], Counter, float | None]:
    """Check exactly one row per input across the shards (dropping a retried batch's duplicate file); return the
    shards (by path), their ``columns`` (a superset of :data:`CHECKED`) with each row's :func:`face_iou` as ``iou``,
    the status counts and the share of annotated faces the crops hold (IoU >= 0.5)."""
    expected = set(manifest.column("image_id").to_pylist())
    seen: set[str] = set()
    kept, tables = [], []
    handled: set[str] = set()  # parts this loop deleted or wrote: a later entry of the listing may name one of them
    for name, receipt in sorted(outputs.sweep(output, SHARDS).items()):  # strays gone: the folder is the commit
        if name in handled:
            continue
        handled.add(name)
        t = storage.read_parquet_columns(storage.join(output, receipt.path), columns)
        ids = t.column("image_id").to_pylist()
        overlap = seen.intersection(ids)
        if overlap:
            # Only a retried batch regrouped differently can overlap; its rows are already committed elsewhere.
            rest, receipt = _rewrite_without(output, name, pc.is_in(t.column("image_id"), pa.array(sorted(overlap))))
            if receipt is None:
                continue
            name, t = receipt.path.rsplit("/", 1)[-1], rest.select(columns)
            handled.add(name)
            ids = t.column("image_id").to_pylist()
        unknown = set(ids) - expected
        if unknown:
            raise ValueError(f"shard {name} holds {len(unknown)} photos not in this run's input")
        seen.update(ids)
        kept.append(receipt)
        tables.append(t)
    missing = expected - seen
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(expected)} photos have no row yet (e.g. {sorted(missing)[0]}); "
                           "run the same command again to finish them")
    statuses: Counter = Counter()
    tables = [t.append_column("iou", face_iou(t)) for t in tables]
    hits = boxed = 0  # does the crop hold the annotated face? (IoU >= 0.5), where the manifest has a box
    for t in tables:
        statuses.update(t.column("status").to_pylist())
        boxed += t.num_rows - t.column("iou").null_count
        hits += pc.sum(pc.greater_equal(t.column("iou"), 0.5)).as_py() or 0
    shards = sorted(zip(kept, tables), key=lambda pair: pair[0].path)
    return [r for r, _ in shards], [t for _, t in shards], statuses, round(hits / boxed, 4) if boxed else None


def steady_rate(receipts: list[tuple[float, int]]) -> float | None:
    """Photos per second between the first and the last of (time, photos so far): without Ray Data's start-up."""
    if len(receipts) < 3 or receipts[-1][0] <= receipts[0][0]:
        return None
    (t0, n0), (t1, n1) = receipts[0], receipts[-1]
    return round((n1 - n0) / (t1 - t0), 2)


def _current(out: outputs.Output, cfg: PreprocessConfig) -> dict[str, Any] | None:
    """The committed summary when this exact run is done and nothing is left to retry; reads only."""
    manifest = load_input(cfg, index=False)
    if manifest is None:
        return None
    if cfg.smoke_test:
        manifest = manifest.slice(0, SMOKE_ROWS)
    if out.current(fingerprint(cfg, manifest)) is None:
        return None
    summary = out.read_json(outputs.SUMMARY)
    if any(summary["statuses"].get(s) for s in TRANSIENT):
        return None
    # what this run did (nothing), over the committed output's tallies
    return {**summary, "processed": 0, "skipped": summary["inputs"], "photos_per_s": None,
            "steady_photos_per_s": None}


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Preprocess ``cfg.input`` into committed crop shards under ``cfg.output``; returns the summary."""
    t0 = time.perf_counter()
    check_detector(cfg)  # here, not later inside every actor's constructor
    if cfg.gallery < 0:
        raise ValueError(f"--gallery takes crops per group (0 for no gallery), not {cfg.gallery}")
    out = outputs.Output(cfg.output, KIND, older={"max_bytes": input_defaults()["max_bytes"]})
    done_before = _current(out, cfg)
    if done_before is not None:
        log.info("%s already holds these crops, committed: nothing to do, nothing written", cfg.output)
        return {**done_before, "seconds": round(time.perf_counter() - t0, 2)}
    verify_detector(cfg)  # weights that do not load fail here, before the lease or any file is written
    # Ray, and actors sized for its nodes, before anything is written: a request that no node can hold, or a cluster
    # that cannot take this output, is refused with the output unchanged
    import ray

    nodes = connect()
    cfg = resolve_resources(cfg, nodes)
    # node types the autoscaler can start count: actors may go there
    check_shared({"--output": cfg.output}, len(nodes), "shards would land on whichever node wrote them")
    with out.lease() as lease:
        manifest = load_input(cfg)
        if cfg.smoke_test:
            manifest = manifest.slice(0, SMOKE_ROWS)
        claim = fingerprint(cfg, manifest)
        out.claim(claim)
        if claim["weights_sha256"]:  # actors load exactly the weights fingerprinted here, from fetch_weights' cache
            cfg = dataclasses.replace(cfg, weights_sha256=claim["weights_sha256"])
        out.uncommit()
        done, retried = resume(cfg.output)
        if retried:
            log.info("%d photos failed transiently (%s) last time: processing them again", retried,
                     ", ".join(TRANSIENT))
        pending = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"),
                                                     pa.array(sorted(done), pa.string()))))
        log.info("%d photos: %d already in shards, %d to process with %s (%d actors × %d decoders, %g GPU each, "
                 "batch %d, %d in flight per actor)", manifest.num_rows, manifest.num_rows - pending.num_rows,
                 pending.num_rows, cfg.detector, cfg.actors, cfg.decoders, cfg.gpus_per_actor, cfg.batch_size,
                 cfg.calls_per_actor)
        processed, receipts = 0, []  # (time, rows so far) per shard written
        if pending.num_rows:
            blocks = [pending.slice(i, cfg.batch_size) for i in range(0, pending.num_rows, cfg.batch_size)]
            ds = ray.data.from_arrow(blocks)
            ds = ds.map_batches(
                CropPhotos, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg)}, batch_size=cfg.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=cfg.actors,
                                                   max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                                   enable_true_multi_threading=cfg.calls_per_actor > 1),
                num_cpus=cfg.decoders, num_gpus=cfg.gpus_per_actor or None)
            # Writers are light I/O and must never wait for a CPU that the actors hold (shards are what a killed run
            # resumes from); as a fixed actor pool they also never spawn a worker process per shard.
            ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"output": cfg.output},
                                batch_size=cfg.rows_per_shard, batch_format="pyarrow", num_cpus=0,
                                compute=ray.data.ActorPoolStrategy(size=max(1, min(4, cfg.actors // 2))))
            for receipt in ds.iter_rows():
                processed += receipt["rows"]
                receipts.append((time.perf_counter(), processed))
                log.info("shard %s: %d rows (%d ok) — %d/%d", receipt["file"], receipt["rows"], receipt["ok"],
                         processed, pending.num_rows)
        shards, small, statuses, on_face = _finalize(cfg.output, manifest,
                                                     GALLERY_COLUMNS if cfg.gallery else CHECKED)
        seconds = time.perf_counter() - t0
        summary = {"inputs": manifest.num_rows, "processed": processed,
                   "skipped": manifest.num_rows - pending.num_rows, "statuses": dict(sorted(statuses.items())),
                   "shards": len(shards), "seconds": round(seconds, 2), "crop_on_annotated_face": on_face,
                   "photos_per_s": round(processed / seconds, 2) if seconds else None,
                   "steady_photos_per_s": steady_rate(receipts)}
        files = [*shards, out.write_json(outputs.SUMMARY, summary), out.claim_receipt()]
        if cfg.gallery:
            try:
                files.append(out.write_file(outputs.GALLERY, gallery_page(cfg, shards, small, summary)))
            except Exception:  # a view: the crops commit without it
                log.exception("gallery.html could not be made; committing the crops without it")
        lease.check()
        out.commit(files, dataclasses.asdict(cfg), claim)
        if outputs.GALLERY not in {r.path for r in files}:  # --gallery 0 or a page that failed: none of older rows
            storage.delete(out.path(outputs.GALLERY), missing_ok=True)
    log.info("committed %d rows in %d shards to %s: %s", manifest.num_rows, len(shards), cfg.output,
             summary["statuses"])
    return summary


def gallery_page(cfg: PreprocessConfig, shards: list[outputs.Receipt], small: list[pa.Table],
                 summary: dict[str, Any]) -> bytes:
    """gallery.html of a crop output: the ok crops (the first shard's first: their crops are read from a shard or
    two), the other statuses (by image_id; a photo with no face shown whole, read again; the others listed with
    their error), and the crops whose face lies away from the annotators' box (IoU < 0.5, the least overlap first),
    at most ``cfg.gallery`` each. ``small`` is each shard's :data:`GALLERY_COLUMNS` and ``iou``, as the commit read
    them (rows are chosen in Arrow); the driver reads the crops column of only the shards that hold a shown crop:
    at most ``cfg.gallery`` + 1 of them."""
    from kemo import gallery
    from kemo.classes import CLASS_NAMES

    cap = cfg.gallery
    columns = [*GALLERY_COLUMNS, "iou"]
    tables = [t.select(columns).append_column("shard", pa.array(np.full(t.num_rows, k, np.int32)))
              .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))) for k, t in enumerate(small)]
    table = pa.concat_tables(tables) if tables else CROP.empty_table().select(GALLERY_COLUMNS).append_column(
        "iou", pa.array([], pa.float64()))
    by_id = [("image_id", "ascending")]

    def name(r: dict[str, Any]) -> str:
        label = CLASS_NAMES[r["label"]] if r["label"] is not None and r["label"] >= 0 else "no label"
        return f"{label} · {r['image_id'].rsplit('/', 1)[-1]}"

    crops_of: dict[tuple[int, int], list[gallery.Tile]] = {}  # a shown crop → its tiles (it may be in two sections)

    def crop_tile(r: dict[str, Any], caption: str) -> gallery.Tile:
        tile = gallery.Tile(caption=caption, title=r["image_id"])
        crops_of.setdefault((r["shard"], r["row"]), []).append(tile)
        return tile

    sections = []
    statuses = sorted(summary["statuses"], key=lambda x: (x != "ok", x))
    for status in statuses:
        total, group = gallery.top(table, pc.equal(table.column("status"), status), cap,
                                   [("shard", "ascending"), ("row", "ascending")] if status == "ok" else by_id)
        if status == "ok":
            sections.append(gallery.Section("ok", [crop_tile(r, name(r)) for r in group], total,
                                            "the crops as training reads them"))
        elif status == "no_face":
            sections.append(gallery.no_face(group, total, name, "image_id", cfg.max_bytes))
        else:
            sections.append(gallery.Section(status, [
                gallery.Tile(caption=r["image_id"], title=r["uri"] or r["image_id"], note=r["error"])
                for r in group], total, "nothing to show: each with its error", pictures=False))
    if cfg.detector != "none":  # the whole photo is never the annotators' box
        away = pc.and_(pc.and_(pc.equal(table.column("status"), "ok"), pc.less(table.column("iou"), 0.5)),
                       pa.array(_four(table.column("face_box"))))
        total, group = gallery.top(table, away, cap, [("iou", "ascending"), *by_id])
        sections.append(gallery.Section(
            "face away from the annotators' box", [crop_tile(r, f"IoU {r['iou']:.2f} · {name(r)}") for r in group],
            total, "the crop's face box overlaps the annotators' consensus box by IoU < 0.5"))
    for k in sorted({shard for shard, _ in crops_of}):  # the crops column of the shards that hold shown crops only
        crops = storage.read_parquet_columns(storage.join(cfg.output, shards[k].path), ["crop"]).column("crop")
        for (shard, row), tiles in crops_of.items():
            if shard == k:
                thumb = gallery.crop_thumbnail(crops[row].as_py())
                for tile in tiles:
                    tile.thumb, tile.note = thumb, None if thumb else "no picture: the crop does not decode"
    gallery.thumbnails(sections)
    lines = [f"{cfg.input} → {cfg.output} ({cfg.detector}): {summary['inputs']} photos, statuses "
             f"{summary['statuses']}; crop on the annotated face {summary['crop_on_annotated_face']}",
             f"at most {cap} per group"]
    return gallery.page(f"kemo crops · {cfg.detector}", lines, sections)


def read_crops(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of a committed crop output, from the files its commit manifest names."""
    return outputs.Output(output, KIND).read_table(SHARDS, columns, CROP, ("votes",))
