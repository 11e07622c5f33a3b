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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage, views
from kemo.actor_pool import map_photos, prepare
from kemo.crop import encode_jpeg, ious
from kemo.detector.registry import detector_class, resolve_detector
from kemo.frontend import FrontEnd, Photo
from kemo.record import from_dict
from kemo.schema import CARRIED, CROP, IDENTITY, TRANSIENT, has_box
from kemo.settings import PhotoSettings, crop_fingerprint

log = logging.getLogger(__name__)
KIND = outputs.CROPS
SHARDS = "shards"


@dataclass(kw_only=True)
class PreprocessConfig(PhotoSettings):
    """Detect and crop the face of every photo into Parquet crop shards."""

    input: str = field(metadata={"help": "AI-Hub root, index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    per_class: int = field(default=0, metadata={"help": "when indexing a root: balanced sample per class (0 = all)"})
    seed: int = field(default=0, metadata={"help": "when indexing a root: split and sample seed"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per Parquet shard (~75 MB at 500² crops)"})
    gallery: int = field(default=48, metadata={
        "help": "gallery.html: at most this many crops per status (and of crops away from the annotators' box); "
                "0 for none"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gallery < 0:
            raise ValueError(f"--gallery takes crops per group (0 for no gallery), not {self.gallery}")
        if self.rows_per_shard < 1:
            raise ValueError(f"--rows-per-shard {self.rows_per_shard}: give at least 1")


@dataclass
class PreprocessSummary:
    """What a preprocess run did and what its committed output holds (``summary.json``)."""

    inputs: int  # photos in the manifest
    processed: int  # photos this run cropped
    skipped: int  # photos already in shards
    statuses: dict[str, int]  # photos per status, over the whole output
    shards: int
    seconds: float
    crop_on_annotated_face: float | None  # share of annotated photos whose crop holds the annotators' box (IoU ≥ .5)
    photos_per_s: float | None
    steady_photos_per_s: float | None  # between the first and the last shard: without Ray Data's start-up

    @classmethod
    def read(cls, out: outputs.Output) -> PreprocessSummary:
        return from_dict(cls, out.read_json(outputs.SUMMARY), out.path(outputs.SUMMARY))


# --------------------------------------------------------------------------------------------------- the actor


class CropPhotos:
    """Ray Data class UDF: a batch of manifest rows → the same rows as crop-shard rows (``CROP``), one each."""

    def __init__(self, cfg: dict[str, object]):
        """The front end (detector, decoder threads) from ``cfg``, a resolved ``PreprocessConfig`` as a dict."""
        self.cfg = PreprocessConfig(**cfg)
        self.front = FrontEnd(self.cfg, self.cfg, self.cfg.decoders, self.cfg.max_bytes, self.cfg.decode_pixels)

    def row(self, listed: dict[str, object], photo: Photo) -> dict[str, object]:
        """One photo's crop-shard row: its manifest identity, what the front end made of it, its primary face's
        crop as JPEG."""
        face = photo.faces[0] if photo.faces else None
        out = {k: listed.get(k) for k in CARRIED}
        out.update(detector=self.cfg.detector, status=photo.status, error=photo.error, orig_width=photo.width,
                   orig_height=photo.height, exif_orientation=photo.orientation, n_faces=photo.n_faces,
                   face_box=face.box if face else None, face_score=face.score if face else None, crop=None)
        if face is not None:
            try:
                out["crop"] = encode_jpeg(face.crop, self.cfg.jpeg_quality)
            except Exception as e:
                log.exception("encoding the crop of %s failed", listed.get("image_id"))
                out.update(status="error", error=f"{type(e).__name__}: {e}", face_box=None, face_score=None)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = list(self.front.pool.map(self.row, rows, self.front(rows)))
        return pa.Table.from_pylist(out, schema=CROP)


# --------------------------------------------------------------------------------------------------- shards


WRITTEN = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("error", pa.string())])


class ShardWriter:
    """Ray Data class UDF: writes each batch as one shard through the output store; a few long-lived writer
    processes, not a new task per shard. Returns a one-row receipt per shard (``WRITTEN``)."""

    def __init__(self, output: str):
        self.output = output

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            receipt = outputs.write_part(self.output, SHARDS, batch, batch.column("image_id").to_pylist())
        except OSError as e:
            # a full disk, a quota, a read-only mount: the driver stops the run with this line. Raised here, it
            # would reach the driver as Ray Data's UDF error, its type and message lost in a 50-line traceback.
            return pa.Table.from_pylist([{"file": None, "rows": 0, "ok": 0, "error": f"writing a shard: {e}"}],
                                        schema=WRITTEN)
        counts = Counter(batch.column("status").to_pylist())
        return pa.Table.from_pylist([{"file": receipt.path, "rows": batch.num_rows, "ok": counts.get("ok", 0),
                                      "error": None}], schema=WRITTEN)


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
    """The manifest to preprocess (its ``--smoke-test`` share): from a manifest file, an index output, or by indexing
    an AI-Hub root into ``OUTPUT/index`` (``index=False``: None instead, so nothing is written)."""
    from kemo.data import aihub

    manifest = aihub.load_or_index(cfg.input, storage.join(cfg.output, "index"), per_class=cfg.per_class,
                                   seed=cfg.seed, index=index, inputs=cfg)
    return None if manifest is None else cfg.smoke(manifest)


def fingerprint(cfg: PreprocessConfig, manifest: pa.Table) -> dict[str, object]:
    """Everything that changes a row: the settings (the weights by the hash the driver pinned), and every input column
    a row copies or crops by (the manifest's identity columns: a re-made index with other splits, labels or boxes is
    another run); resource knobs and the code version do not (a bug-fix release may resume)."""
    return {**crop_fingerprint(cfg, cfg), "max_bytes": cfg.max_bytes, "inputs": manifest.num_rows,
            "inputs_sha256": outputs.table_sha256(manifest.select(list(IDENTITY)), sort_by="image_id")}


CHECKED = ["image_id", "status", "box", "face_box"]  # what the commit reads of every shard (with a page: CROP_SHOWN)


def face_iou(table: pa.Table) -> pa.Array:
    """Per row, the IoU of the crop's face box with the annotators' consensus box, in one vectorised pass: null where
    the manifest has no box, 0 where no face was cropped."""
    boxed, has_face = has_box(table.column("box")), has_box(table.column("face_box"))
    both = boxed & has_face
    values = np.zeros(table.num_rows)
    if both.any():
        rows = table.filter(pa.array(both))

        def boxes(name: str) -> np.ndarray:
            return rows.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)

        values[both] = ious(boxes("box"), boxes("face_box"))
    return pa.array(values, mask=~boxed)


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


def _done(out: outputs.Output, claim: dict[str, object] | None, t0: float) -> PreprocessSummary | None:
    """What this run did (nothing) over the committed output's tallies, when this exact run is committed and has
    nothing left to retry; else None. Reads only."""
    if claim is None or out.current(claim) is None:
        return None
    summary = PreprocessSummary.read(out)
    if any(summary.statuses.get(s) for s in TRANSIENT):
        return None
    return dataclasses.replace(summary, processed=0, skipped=summary.inputs, photos_per_s=None,
                               steady_photos_per_s=None, seconds=round(time.perf_counter() - t0, 2))


def _pending(cfg: PreprocessConfig, manifest: pa.Table) -> pa.Table:
    """The manifest rows that have no row in the shards yet (transient failures dropped from the shards first)."""
    done, retried = resume(cfg.output)
    if retried:
        log.info("%d photos failed transiently (%s) last time: processing them again", retried, ", ".join(TRANSIENT))
    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa.array(sorted(done), pa.string()))))
    log.info("%d photos: %d already in shards, %d to process with %s (%d actors × %d decoders, %g GPU each, "
             "batch %d, %d in flight per actor)", manifest.num_rows, manifest.num_rows - pending.num_rows,
             pending.num_rows, cfg.detector, cfg.actors, cfg.decoders, cfg.gpus_per_actor, cfg.batch_size,
             cfg.calls_per_actor)
    return pending


def _crop(cfg: PreprocessConfig, pending: pa.Table) -> tuple[int, list[tuple[float, int]]]:
    """Stream ``pending`` through the actor pool into shards; returns (photos written, (time, photos so far) per
    shard)."""
    import ray

    processed, receipts = 0, []
    if not pending.num_rows:
        return processed, receipts
    ds = map_photos(pending, CropPhotos, {"cfg": dataclasses.asdict(cfg)}, cfg)
    # Writers are light I/O and must never wait for a CPU that the actors hold (shards are what a killed run
    # resumes from); as a fixed actor pool they also never spawn a worker process per shard.
    ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"output": cfg.output}, batch_size=cfg.rows_per_shard,
                        batch_format="pyarrow", num_cpus=0,
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(4, cfg.actors // 2))))
    for receipt in ds.iter_rows():
        if receipt["error"]:
            raise OSError(receipt["error"])  # the shards written so far stay: a rerun resumes from them
        processed += receipt["rows"]
        receipts.append((time.perf_counter(), processed))
        log.info("shard %s: %d rows (%d ok) — %d/%d", receipt["file"], receipt["rows"], receipt["ok"], processed,
                 pending.num_rows)
    return processed, receipts


def _commit(out: outputs.Output, cfg: PreprocessConfig, claim: dict[str, object], shards: list[outputs.Receipt],
            small: list[pa.Table], summary: PreprocessSummary) -> None:
    """Commit the shards with the summary, the claim and (a view: the crops commit without it) the gallery."""
    files = [*shards, out.write_json(outputs.SUMMARY, dataclasses.asdict(summary)), out.claim_receipt()]
    if cfg.gallery:
        try:
            heading = [f"kemo crops · {cfg.detector}",
                       f"{cfg.input} → {cfg.output} ({cfg.detector}): {summary.inputs} photos, statuses "
                       f"{summary.statuses}; crop on the annotated face {summary.crop_on_annotated_face}",
                       f"at most {cfg.gallery} per group"]
            page = views.crop_gallery(cfg.output, shards, small, heading, list(summary.statuses), cfg.gallery,
                                      cfg.max_bytes, detector_class(cfg.detector).whole_photo)
            files.append(out.write_file(outputs.GALLERY, page))
        except Exception:
            log.exception("gallery.html could not be made; committing the crops without it")
    out.commit(files, dataclasses.asdict(cfg), claim)


def run(cfg: PreprocessConfig) -> PreprocessSummary:
    """Preprocess ``cfg.input`` into committed crop shards under ``cfg.output``; returns the summary.

    Plan (the detector resolved, the manifest and the fingerprint: a committed output of this exact run is left as
    it is, nothing started) → prepare the pool → under the lease: claim, resume, crop, reconcile (one row per input)
    → commit.
    """
    t0 = time.perf_counter()
    cfg = resolve_detector(cfg)  # checked, weights hashed and pinned: once, here
    out = outputs.Output(cfg.output, KIND)
    manifest = load_input(cfg, index=False)  # None: an AI-Hub root still to index, under the lease
    claim = fingerprint(cfg, manifest) if manifest is not None else None
    done = _done(out, claim, t0)
    if done is not None:
        log.info("%s already holds these crops, committed: nothing to do, nothing written", cfg.output)
        return done
    cfg = prepare(cfg, {"--output": cfg.output}, "shards would land on whichever node wrote them")
    with out.lease():
        if manifest is None or claim is None:
            manifest = load_input(cfg)
            claim = fingerprint(cfg, manifest)
        out.claim(claim)
        out.uncommit()
        pending = _pending(cfg, manifest)
        processed, receipts = _crop(cfg, pending)
        shards, small, statuses, on_face = _finalize(cfg.output, manifest, views.CROP_SHOWN if cfg.gallery else CHECKED)
        seconds = time.perf_counter() - t0
        summary = PreprocessSummary(
            inputs=manifest.num_rows, processed=processed, skipped=manifest.num_rows - pending.num_rows,
            statuses=dict(sorted(statuses.items())), shards=len(shards), seconds=round(seconds, 2),
            crop_on_annotated_face=on_face, photos_per_s=round(processed / seconds, 2) if seconds else None,
            steady_photos_per_s=steady_rate(receipts))
        _commit(out, cfg, claim, shards, small, summary)
    log.info("committed %d rows in %d shards to %s: %s", manifest.num_rows, len(shards), cfg.output, summary.statuses)
    return summary


def read_crops(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of a committed crop output, from the files its commit manifest names."""
    return outputs.Output(output, KIND).read_table(SHARDS, columns, CROP)
