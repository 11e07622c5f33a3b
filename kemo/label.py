"""Label new photos with emotions: a folder or an S3 prefix → one row per photo (per face with --all-faces).

The input is listed once; photos whose version (uri, size, mtime, ETag) already has a label are skipped before any
model loads. The rest go through one actor pool (:mod:`kemo.label_photos`) that reads, decodes, detects and crops
through the photo front end preprocessing uses, then classifies the crops in the same actor, so crops never leave
it. The driver writes the rows as Parquet parts (:mod:`kemo.label_store`); ``_commit.json``, written last, names the
parts whose rows are current, with the views (``labels.csv``, ``gallery.html``: :mod:`kemo.views`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kemo import label_store, listing, outputs, storage, views
from kemo.actor_pool import map_photos, prepare
from kemo.detector.registry import detector_class, resolve_detector
from kemo.label_photos import LISTED, PRECISIONS, LabelPhotos
from kemo.record import from_dict
from kemo.settings import PhotoSettings, crop_fingerprint

log = logging.getLogger(__name__)
CSV = "labels.csv"
FORMATS = ("parquet", "csv")


def _contains(parent: str, child: str) -> bool:
    if storage.is_s3(parent) != storage.is_s3(child):
        return False
    if storage.is_s3(parent):
        return f"{child.rstrip('/')}/".startswith(f"{parent.rstrip('/')}/")
    parent, child = os.path.abspath(parent), os.path.abspath(child)
    return os.path.commonpath([parent, child]) == parent


@dataclass(kw_only=True)
class LabelConfig(PhotoSettings):
    """Label every photo of a folder or S3 prefix with the emotion of its face."""

    input: str = field(metadata={"help": "folder or s3:// prefix of photos (recursive; photos are known by content)"})
    output: str = field(metadata={"help": "label directory (local or s3://); earlier runs' labels are kept"})
    checkpoint: str = field(metadata={"help": "classifier checkpoint directory (model.pt + meta.json), or s3://"})
    all_faces: bool = field(default=False, metadata={"help": "one row per detected face, not only the primary one"})
    format: tuple[str, ...] = field(default=FORMATS, metadata={
        "help": "parquet (the label store, always written) and csv (labels.csv: every current row)"})
    precision: str = field(default="auto", metadata={
        "help": "classifier on GPU: auto (bf16 where supported, else fp16), bf16, fp16 or fp32; CPU runs fp32"})
    rows_per_part: int = field(default=20000, metadata={
        "help": "rows per Parquet part, at least: whole actor calls (a killed run keeps the parts it wrote)"})
    abstain: bool = field(default=False, metadata={
        "help": "mark labels below the checkpoint's threshold (fitted on validation for the training run's "
                "--target-accuracy) as abstained"})
    min_confidence: float | None = field(default=None, metadata={
        "help": "mark labels whose calibrated confidence is below this as abstained (instead of --abstain)"})
    gallery: int = field(default=48, metadata={
        "help": "gallery.html: at most this many faces per emotion (and per other group); 0 for none"})

    def __post_init__(self) -> None:
        super().__post_init__()
        detector_class(self.detector, annotated=False)  # new photos have no annotators' boxes
        if not set(self.format) <= set(FORMATS):
            raise ValueError(f"--format {','.join(self.format)}: choose from {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.abstain and self.min_confidence is not None:
            raise ValueError("--abstain uses the checkpoint's threshold and --min-confidence gives one: choose one")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"--min-confidence must lie in [0, 1], not {self.min_confidence:g}")
        if self.gallery < 0:
            raise ValueError(f"--gallery takes faces per group (0 for no gallery), not {self.gallery}")
        if self.rows_per_part < 1:
            raise ValueError(f"--rows-per-part {self.rows_per_part}: give at least 1")
        if _contains(self.input, self.output):
            raise ValueError(f"--output {self.output} lies inside --input {self.input}: its files would be listed "
                             "as photos on the next run; choose an output outside the input")




@dataclass
class LabelSummary:
    """What a labelling run did, and what its committed output holds (``summary.json``)."""

    input: str
    output: str
    model: str  # the checkpoint's model_sha256
    detector: str
    listed: int  # files listed under the input (OS metadata files left out)
    ignored: int  # OS metadata files left out
    skipped: int  # files whose listed version already had its rows
    processed: int  # photos labelled by this run
    processed_statuses: dict[str, int]  # their statuses
    temperature: float
    min_confidence: float | None  # the confidence below which a row is abstained (None: no abstention)
    photos: int  # photos with current rows in the output
    rows: int
    statuses: dict[str, int]  # photos per status, over the current rows
    emotions: dict[str, int]  # rows (faces) per emotion
    abstained: int
    parts: int
    seconds: float
    photos_per_s: float | None

    @classmethod
    def read(cls, out: outputs.Output) -> LabelSummary:
        return from_dict(cls, out.read_json(outputs.SUMMARY), out.path(outputs.SUMMARY))


def calibration(cfg: LabelConfig, meta: dict[str, Any]) -> tuple[float, float | None]:
    """(the temperature, the confidence below which a row is abstained) of a run with the checkpoint whose meta.json
    is ``meta``: its temperature, and --min-confidence, or with --abstain its threshold (refused where it has none),
    or None: no abstention."""
    from kemo.classifier.checkpoint import abstention_threshold, temperature

    if cfg.min_confidence is not None:
        return temperature(meta), float(cfg.min_confidence)
    return temperature(meta), abstention_threshold(meta, cfg.checkpoint) if cfg.abstain else None


def snapshot(cfg: LabelConfig) -> tuple[pa.Table, int]:
    """(every entry under the input as ``LISTED`` rows sorted by uri, the number of OS metadata files left out).
    Content decides what is a photo: every other file gets a row, a non-image one with status decode_error; an
    entry that is not a readable file (a broken or outside link, a FIFO, a device) its listing status, unread."""
    entries = listing.list_input(cfg.input, cfg.links, etags=True)
    kept = [e for e in entries if not listing.os_metadata(e.rel)]
    rows = [{"uri": e.uri, "size": e.size, "mtime_ns": e.mtime_ns, "etag": e.etag, "status": e.status,
             "error": e.error, "file_id": e.file_id} for e in kept]
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=LISTED)
    return cfg.smoke(table), len(entries) - len(kept)


def fingerprint(cfg: LabelConfig) -> dict[str, Any]:
    """Everything that changes a row (``cfg`` resolved: the weights by their pinned hash); resource knobs,
    precision and the code version do not."""
    from kemo.classifier.checkpoint import read_meta

    meta = read_meta(cfg.checkpoint)  # meta.json only, checked: no model is built here
    temperature, threshold = calibration(cfg, meta)
    return {"model": meta["model_sha256"], "architecture": meta["architecture"], "classes": meta["classes"],
            "image_size": meta["image_size"], **crop_fingerprint(cfg, cfg), "all_faces": cfg.all_faces,
            "max_bytes": cfg.max_bytes, "links": cfg.links, "temperature": temperature, "min_confidence": threshold}


def _label_pending(cfg: LabelConfig, claim: dict[str, Any], pending: pa.Table) -> tuple[int, Counter]:
    """Stream the pending photos through the actor pool, whose actors apply the claim's temperature and threshold;
    the driver writes whole photos' rows into parts as they come (rows are small: crops never leave the actors).
    Returns (photos labelled, their statuses)."""
    log.info("labelling with %s + %s: %d actors × %d decoders, %g GPU each, batch %d", cfg.detector,
             claim["architecture"], cfg.actors, cfg.decoders, cfg.gpus_per_actor, cfg.batch_size)
    ds = map_photos(pending, LabelPhotos, {"cfg": dataclasses.asdict(cfg), "temperature": claim["temperature"],
                                           "threshold": claim["min_confidence"]}, cfg)
    photos, statuses, buffered = 0, Counter(), []
    # batch_size=None: whole blocks, i.e. whole actor calls, so a photo's rows never straddle two parts
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        uris = batch.column("uri").to_pylist()
        first = [i == 0 or uris[i] != uris[i - 1] for i in range(len(uris))]
        photos += sum(first)
        statuses.update(s for s, f in zip(batch.column("status").to_pylist(), first) if f)
        buffered.append(batch)
        if sum(t.num_rows for t in buffered) >= cfg.rows_per_part:
            _flush(cfg.output, buffered, photos, pending.num_rows)
    if buffered:
        _flush(cfg.output, buffered, photos, pending.num_rows)
    return photos, statuses


def _flush(output: str, buffered: list[pa.Table], photos: int, pending: int) -> None:
    """Write the buffered rows as one part, and empty the buffer."""
    table = pa.concat_tables(buffered)
    name = label_store.write_part(table, output)
    log.info("%s: %d rows — %d/%d photos", name, table.num_rows, photos, pending)
    buffered.clear()


def _views(cfg: LabelConfig, final: list[str], photos: pa.Table, classes: list[str], summary: LabelSummary
           ) -> dict[str, bytes]:
    """The views of the current rows (``labels.csv``, ``gallery.html``), made before the old commit goes; a gallery
    that fails is logged and left out (the labels commit without it, and the next run tries again)."""
    made = {}
    if "csv" in cfg.format:
        table = label_store.rows_of(cfg.output, final, None).sort_by([("uri", "ascending"), ("face", "ascending")])
        made[CSV] = views.labels_csv(table, classes)
    if cfg.gallery:
        heading = [f"{cfg.input} → {cfg.output}: {summary.photos} photos, {summary.rows} rows, statuses "
                   f"{summary.statuses}", f"checkpoint {cfg.checkpoint} (temperature {summary.temperature:.3f}), "
                   f"detector {cfg.detector}; at most {cfg.gallery} per group"]
        try:
            rows = label_store.rows_of(cfg.output, final, views.LABEL_SHOWN)
            made[outputs.GALLERY] = views.label_gallery(rows, photos, classes, heading, cfg.gallery, cfg.max_bytes,
                                                        summary.min_confidence)
        except Exception:
            log.exception("gallery.html could not be made")
    return made


def _tail(cfg: LabelConfig) -> list[str]:
    """The files a commit names besides the parts."""
    return ([CSV] if "csv" in cfg.format else []) + ([outputs.GALLERY] if cfg.gallery else []) \
        + [outputs.SUMMARY, outputs.RUN]


def _commit(out: outputs.Output, cfg: LabelConfig, claim: dict[str, Any], final: list[str], made: dict[str, bytes],
            summary: LabelSummary) -> None:
    """Commit the current parts with the views and the summary, then delete the parts no longer current (only now:
    readers of the previous commit had them until here)."""
    out.uncommit()  # before the sweep: an older commit may name a file that the sweep takes for a stray
    present = outputs.sweep(cfg.output, label_store.PARTS)
    files = [present[n] for n in final]
    files += [out.write_file(name, data) for name, data in made.items()]
    files += [out.write_json(outputs.SUMMARY, dataclasses.asdict(summary)), out.claim_receipt()]
    out.commit(files, dataclasses.asdict(cfg), claim)
    for name in set(present) - set(final):
        outputs.delete_part(cfg.output, label_store.PARTS, name)


def _nothing_done(out: outputs.Output, photos: pa.Table, ignored: int, t0: float) -> LabelSummary:
    """What this run did (nothing), over the committed output's tallies."""
    return dataclasses.replace(LabelSummary.read(out), listed=photos.num_rows, ignored=ignored,
                               skipped=photos.num_rows, processed=0, processed_statuses={},
                               seconds=round(time.perf_counter() - t0, 2), photos_per_s=None)


def _prepare(cfg: LabelConfig) -> LabelConfig:
    """What every actor will load, loaded once here (bad files fail in one line, nothing written), then the pool."""
    from kemo.classifier.checkpoint import load_checkpoint

    load_checkpoint(cfg.checkpoint)
    # actors on any node read the photos, the checkpoint and the weights; the driver alone writes the output
    return prepare(cfg, {"--input": cfg.input, "--checkpoint": cfg.checkpoint, "--weights": cfg.weights},
                   "actors on other nodes cannot read it")


def run(cfg: LabelConfig) -> LabelSummary:
    """Label the photos under ``cfg.input`` that the output has no current label for; commit; return the summary.

    Plan (the detector resolved, the claim checked, the input listed, the done photos skipped: a rerun with nothing
    new writes nothing and loads no model) → prepare the pool → under the lease: label, reconcile the current rows
    (re-read: another run may have committed meanwhile), views → commit.
    """
    t0 = time.perf_counter()
    cfg = resolve_detector(cfg, annotated=False)  # checked, weights hashed and pinned: once, here
    claim = fingerprint(cfg)
    out = outputs.Output(cfg.output, label_store.KIND)
    out.check_claim(claim)  # another setup's labels are refused before anything is listed or written
    photos, ignored = snapshot(cfg)
    if photos.num_rows == 0:
        raise ValueError(f"no files under {cfg.input}")
    listed = {r["uri"]: (r["size"], r["mtime_ns"], r["etag"]) for r in photos.select(["uri", "size", "mtime_ns",
                                                                                     "etag"]).to_pylist()}
    tables = label_store.read_keys(cfg.output)
    keep, done = label_store.choose(tables, listed)
    pending = photos.filter(pc.invert(pc.is_in(photos.column("uri"), pa.array(sorted(done), pa.string()))))
    log.info("%d files under %s (%d OS metadata files left out): %d already labelled, %d to label",
             photos.num_rows, cfg.input, ignored, photos.num_rows - pending.num_rows, pending.num_rows)
    if not pending.num_rows and all(m.all() for m in keep.values()) and label_store.unchanged(
            out, sorted(tables), _tail(cfg)):
        log.info("nothing to label and the committed output is current: nothing written")
        return _nothing_done(out, photos, ignored, t0)
    if pending.num_rows:
        cfg = _prepare(cfg)
    with out.lease():
        out.claim(claim)
        labelled, run_statuses = _label_pending(cfg, claim, pending) if pending.num_rows else (0, Counter())
        tables = label_store.read_keys(cfg.output)  # again, under the lease
        keep, _ = label_store.choose(tables, listed)
        final = label_store.keep_current(cfg.output, tables, keep)
        seconds = time.perf_counter() - t0
        summary = LabelSummary(
            input=cfg.input, output=cfg.output, model=claim["model"], detector=cfg.detector, listed=photos.num_rows,
            ignored=ignored, skipped=photos.num_rows - pending.num_rows, processed=labelled,
            processed_statuses=dict(sorted(run_statuses.items())), temperature=claim["temperature"],
            min_confidence=claim["min_confidence"], **label_store.tally(tables, keep), parts=len(final),
            seconds=round(seconds, 2), photos_per_s=round(labelled / seconds, 2) if labelled and seconds else None)
        made = _views(cfg, final, photos, claim["classes"], summary)
        if cfg.gallery and outputs.GALLERY not in made and not labelled and all(m.all() for m in keep.values()) \
                and label_store.unchanged(out, final, [t for t in _tail(cfg) if t != outputs.GALLERY]):
            log.warning("the gallery was all this run had to add: the output is left as it was, without one")
            return _nothing_done(out, photos, ignored, t0)
        _commit(out, cfg, claim, final, made, summary)
    log.info("committed %d rows of %d photos in %d parts to %s: %s", summary.rows, summary.photos, len(final),
             cfg.output, summary.statuses)
    return summary
