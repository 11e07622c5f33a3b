"""Label new photos with emotions: a folder or an S3 prefix → one row per photo (per face with --all-faces).

The input is listed once; photos whose version (uri, size, mtime, ETag) already has a label are skipped before any
model loads. The rest go through one actor pool that reads, decodes, detects and crops exactly as preprocessing does
(``CropPhotos``), then classifies the crops in the same actor, so crops never leave it. The driver writes the rows as
Parquet parts named after their rows; ``_commit.json``, written last, names the parts whose rows are current.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage
from kemo.crop import encode_jpeg, primary_face
from kemo.detector.base import Faces
from kemo.detector.registry import check_detector, verify_detector
from kemo.device import torch_device
from kemo.frontend import FrontEnd, Prepared
from kemo.resources import ActorResources, check_shared, connect, resolve_resources
from kemo.schema import LABELS, TRANSIENT
from kemo.settings import CropSettings, DetectorSettings, InputSettings, crop_fingerprint, input_defaults

log = logging.getLogger(__name__)
KIND = outputs.LABELS
PARTS = "parts"
CSV = "labels.csv"
FORMATS = ("parquet", "csv")
PHOTO = pa.schema([LABELS.field(n) for n in ("uri", "size", "mtime_ns", "etag")])  # a listed photo version
# … and what the listing found it to be; file_id ties a local read to the very file listed (storage.read_bounded)
LISTED = pa.schema([*PHOTO, LABELS.field("status"), LABELS.field("error"), ("file_id", pa.string())])
SMOKE_FILES = 16
KEYS = ["uri", "size", "mtime_ns", "etag", "face", "status", "label_name"]  # what the skip rule and summary read
ADDED = ("abstained",)  # columns of LABELS that parts of older kemo lack: read where present
# what the gallery reads of every current row (photos are read again only for the faces it shows)
SHOWN = ["uri", "status", "error", "face", "face_box", "label_name", "confidence", "abstained"]


@dataclass(kw_only=True)
class LabelConfig(DetectorSettings, CropSettings, InputSettings, ActorResources):
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
    smoke_test: bool = field(default=False, metadata={"help": f"only the first {SMOKE_FILES} files"})


def calibration(cfg: LabelConfig, meta: dict[str, Any]) -> tuple[float, float | None]:
    """(the temperature, the confidence below which a row is abstained) of a run with the checkpoint whose meta.json
    is ``meta``: its temperature (1 where it has none), and --min-confidence, or with --abstain its threshold
    (refused where it has none), or None: no abstention."""
    from kemo.classifier.checkpoint import abstention_threshold, temperature

    if cfg.min_confidence is not None:
        return temperature(meta), float(cfg.min_confidence)
    return temperature(meta), abstention_threshold(meta, cfg.checkpoint) if cfg.abstain else None


# --------------------------------------------------------------------------------------------------- the actor


def _ranked(boxes: list[list[float]], scores: list[float]) -> list[int]:
    """Face indices, the primary face (kemo.crop.primary_face's choice) first, then by the same rule among the rest."""
    left, order = list(range(len(boxes))), []
    while left:
        best = primary_face(np.asarray([boxes[i] for i in left]).reshape(-1, 4), np.asarray([scores[i] for i in left]))
        order.append(left.pop(best))
    return order


def _autocast_dtype(precision: str, device: str) -> Any:
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LabelPhotos:
    """Ray Data class UDF: a batch of listed photos (``LISTED`` columns) → their ``LABELS`` rows.

    ``LabelPhotos(dataclasses.asdict(cfg))`` loads the detector and the classifier once; calling it on a pyarrow
    table of photos reads, decodes and detects them as preprocessing does, crops, and classifies every crop in one
    batch. Each photo yields its rows together (one, or one per face with ``all_faces``).
    """

    def __init__(self, cfg: dict[str, Any], temperature: float, threshold: float | None):
        """``temperature`` and ``threshold`` (None: no abstention) are what the driver read from meta.json with the
        run's fingerprint (:func:`calibration`), not read here again: meta.json is rewritten when jobs/train.py
        calibrates a finished run, and an actor started after that must still write what the commit will say."""
        import torch

        from kemo.classifier.checkpoint import load_checkpoint

        self.cfg = LabelConfig(**cfg)
        self.front = FrontEnd(self.cfg, self.cfg, self.cfg.decoders, self.cfg.max_bytes, self.cfg.decode_pixels)
        torch.set_num_threads(max(1, self.cfg.decoders))  # the actor's CPU share, not the whole node
        self.device = torch_device(self.cfg.device)
        self.model, self.meta = load_checkpoint(self.cfg.checkpoint, self.device)
        self.temperature, self.threshold = temperature, threshold
        self.autocast = _autocast_dtype(self.cfg.precision, self.device)
        self.classify_lock = threading.Lock()  # with calls_per_actor > 1, batches share the model
        log.info("classifier %s (%s, %d² input) on %s%s", self.cfg.checkpoint, self.meta["architecture"],
                 self.meta["image_size"], self.device, f" {self.autocast}" if self.autocast else "")

    def _pixels(self, crop: np.ndarray) -> np.ndarray:
        """The classifier's input pixels for a crop, made as training made them from a crop shard's JPEG."""
        from kemo.classifier.data import decode_crop, resize_square

        size = self.meta["image_size"]
        if not self.cfg.jpeg_quality:
            return resize_square(crop, size)
        pixels = decode_crop(encode_jpeg(crop, self.cfg.jpeg_quality), size)
        if pixels is None:
            raise RuntimeError("the crop's JPEG does not decode")
        return pixels

    def _photo(self, row: dict[str, Any], prep: Prepared, faces: Faces | None
               ) -> tuple[list[dict[str, Any]], list[np.ndarray | None]]:
        """A photo's rows before classification, and each row's classifier input (None: nothing to classify)."""
        base = {k: row[k] for k in PHOTO.names}
        front = self.front
        base.update(status=prep.status or "ok", error=prep.error, detector=front.detector.name,
                    model=self.meta["model_sha256"], orig_width=prep.header[0], orig_height=prep.header[1])
        dec = prep.decoded
        if dec is None:
            return [base], [None]
        try:
            if front.detector.whole_photo:
                box = [0.0, 0.0, float(dec.width), float(dec.height)]
                return [{**base, "face": 0, "face_box": box}], [self._pixels(front.crop(dec, None))]
            boxes, scores = front.faces(prep, faces)
            base["n_faces"] = len(boxes)
            order = _ranked(boxes, scores)[:None if self.cfg.all_faces else 1]
            if not order:
                return [{**base, "status": "no_face", "error": f"{front.detector.name} found no face"}], [None]
            rows = [{**base, "face": k, "face_box": boxes[i], "face_score": scores[i]} for k, i in enumerate(order)]
            return rows, [self._pixels(front.crop(dec, boxes[i])) for i in order]
        except Exception as e:
            log.exception("cropping %s failed", row["uri"])
            return [{**base, "status": "error", "error": f"{type(e).__name__}: {e}"}], [None]

    def _classify(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, C) float32 class probabilities, calibrated (softmax of the fp32 logits over the checkpoint's
        temperature), in chunks of the batch size (with all_faces a batch holds more)."""
        import torch

        from kemo.classifier.checkpoint import input_batch

        chunk = max(1, self.cfg.batch_size or 16)
        out = []
        autocast = torch.autocast("cuda", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for i in range(0, len(images), chunk):
                x = input_batch(images[i:i + chunk], self.meta, self.device)  # (n, 3, S, S), already S²: no resize
                out.append(torch.softmax(self.model(x).float() / self.temperature, dim=1).cpu().numpy())
        return np.concatenate(out)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prepared, faces = self.front.detect(rows)
        out: list[dict[str, Any]] = []
        inputs: list[np.ndarray | None] = []
        for photo_rows, photo_inputs in self.front.pool.map(self._photo, rows, prepared, faces):
            out.extend(photo_rows)
            inputs.extend(photo_inputs)
        todo = [i for i, x in enumerate(inputs) if x is not None]
        if todo:
            try:
                with self.classify_lock:
                    probs = self._classify([inputs[i] for i in todo])
                classes = self.meta["classes"]
                for i, p in zip(todo, probs):
                    k = int(np.argmax(p))
                    # the stored float32 confidence, exactly, against the threshold as a double (what SQL, pyarrow
                    # and DuckDB compare): a row is abstained exactly when its confidence column is below it
                    out[i].update(label=k, label_name=classes[k], confidence=float(p[k]), probs=p.tolist(),
                                  abstained=self.threshold is not None and float(p[k]) < self.threshold)
            except Exception as e:
                log.exception("classifier failed on a batch of %d crops", len(todo))
                for i in todo:
                    out[i].update(status="error", error=f"classifier: {type(e).__name__}: {e}")
        return pa.Table.from_pylist(out, schema=LABELS)


# --------------------------------------------------------------------------------------------------- the input


def _contains(parent: str, child: str) -> bool:
    if storage.is_s3(parent) != storage.is_s3(child):
        return False
    if storage.is_s3(parent):
        return f"{child.rstrip('/')}/".startswith(f"{parent.rstrip('/')}/")
    parent, child = os.path.abspath(parent), os.path.abspath(child)
    return os.path.commonpath([parent, child]) == parent


def snapshot(cfg: LabelConfig) -> tuple[pa.Table, int]:
    """(every entry under the input as ``LISTED`` rows sorted by uri, the number of OS metadata files left out).
    Content decides what is a photo: every other file gets a row, a non-image one with status decode_error; an
    entry that is not a readable file (a broken or outside link, a FIFO, a device) its listing status, unread."""
    entries = storage.list_input(cfg.input, cfg.links, etags=True)
    kept = [e for e in entries if not storage.os_metadata(e.rel)]
    rows = [{"uri": e.uri, "size": e.size, "mtime_ns": e.mtime_ns, "etag": e.etag, "status": e.status,
             "error": e.error, "file_id": e.file_id} for e in kept]
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=LISTED)
    return (table.slice(0, SMOKE_FILES) if cfg.smoke_test else table), len(entries) - len(kept)


# --------------------------------------------------------------------------------------------------- the output


def _versions(table: pa.Table) -> list[str]:
    """Each row's photo version and face as one key: a part is named after these, never after a key alone, so
    rewriting the same rows gives the same file."""
    return ["\0".join(str(v) for v in r.values()) for r in table.select(PHOTO.names + ["face"]).to_pylist()]


def write_part(table: pa.Table, output: str) -> str:
    """Write one part of label rows (sorted by uri and face) through the output store; returns its name."""
    table = table.sort_by([("uri", "ascending"), ("face", "ascending")])
    return outputs.write_part(output, PARTS, table, _versions(table)).path.rsplit("/", 1)[-1]


def _choose(tables: dict[str, pa.Table], current: dict[str, tuple]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Which rows of which parts are current: (keep mask per part, uris whose snapshot version is done).

    Per uri, one photo version's rows from one part win: the version listed now, else the newest; a complete
    answer over a transient failure (read_error, error: done again on a rerun); among equals, the first part by
    name (duplicates left by a crash or a retry). Rows for photos no longer listed are kept.
    """
    groups: dict[str, list[tuple[tuple, str, list[int]]]] = {}
    for name, t in tables.items():
        cols = {c: t.column(c).to_pylist() for c in KEYS}
        by_version: dict[tuple, list[int]] = {}
        for i, version in enumerate(zip(cols["uri"], cols["size"], cols["mtime_ns"], cols["etag"])):
            by_version.setdefault(version, []).append(i)
        for version, idx in by_version.items():
            transient = any(cols["status"][i] in TRANSIENT for i in idx)
            first: dict[Any, int] = {}  # the same face twice in one part (a retried block): its first row
            for i in idx:
                first.setdefault(cols["face"][i], i)
            idx = list(first.values())
            rank = (version[1:] != current.get(version[0]), transient, -(version[2] or 0), name)
            groups.setdefault(version[0], []).append((rank, name, idx))
    keep = {name: np.zeros(t.num_rows, bool) for name, t in tables.items()}
    done = set()
    for uri, candidates in groups.items():
        rank, name, idx = min(candidates, key=lambda c: c[0])
        keep[name][idx] = True
        if not rank[0] and not rank[1]:
            done.add(uri)
    return keep, done


def _csv_bytes(table: pa.Table, classes: list[str]) -> bytes:
    """labels.csv: the list columns spread into scalar ones (face_x1 … face_y2, p_<class>) for spreadsheets."""
    import pyarrow.csv as pacsv

    cols: dict[str, Any] = {}
    for name in table.column_names:
        if name == "face_box":
            for k, axis in enumerate(("x1", "y1", "x2", "y2")):
                cols[f"face_{axis}"] = pc.list_element(table.column(name), k)
        elif name == "probs":
            for k, c in enumerate(classes):
                cols[f"p_{c}"] = pc.list_element(table.column(name), k)
        else:
            cols[name] = table.column(name)
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols), buf)
    return buf.getvalue()


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every current row of a committed label output, from the parts its commit manifest names."""
    return outputs.Output(output, KIND).read_table(PARTS, columns, LABELS, ADDED)


# --------------------------------------------------------------------------------------------------- the job


def _check(cfg: LabelConfig) -> list[str]:
    if cfg.detector == "annotations":
        raise ValueError("--detector annotations needs the annotators' boxes from an AI-Hub manifest, which new "
                         "photos do not have: use yolo, haar or none")
    check_detector(cfg, ("yolo", "haar", "none"))
    formats = list(cfg.format)
    if not set(formats) <= set(FORMATS):
        raise ValueError(f"--format {','.join(formats)}: choose from {', '.join(FORMATS)}")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"--precision {cfg.precision!r}: choose from auto, bf16, fp16, fp32")
    if cfg.abstain and cfg.min_confidence is not None:
        raise ValueError("--abstain uses the checkpoint's threshold and --min-confidence gives one: choose one")
    if cfg.min_confidence is not None and not 0 <= cfg.min_confidence <= 1:
        raise ValueError(f"--min-confidence must lie in [0, 1], not {cfg.min_confidence:g}")
    if cfg.gallery < 0:
        raise ValueError(f"--gallery takes faces per group (0 for no gallery), not {cfg.gallery}")
    if _contains(cfg.input, cfg.output):
        raise ValueError(f"--output {cfg.output} lies inside --input {cfg.input}: its files would be listed as "
                         "photos on the next run; choose an output outside the input")
    return formats


def _fingerprint(cfg: LabelConfig) -> dict[str, Any]:
    from kemo.classifier.checkpoint import read_meta

    meta = read_meta(cfg.checkpoint)  # meta.json only, checked: no model is built here
    temperature, threshold = calibration(cfg, meta)
    weights_sha = None
    if cfg.detector == "yolo":
        from kemo.detector.weights import fetch_weights

        weights_sha = fetch_weights(cfg.weights, cfg.weights_sha256)[1]
    # everything that changes a row; resource knobs, precision and the code version do not
    return {"model": meta["model_sha256"], "architecture": meta["architecture"], "classes": meta["classes"],
            "image_size": meta["image_size"], **crop_fingerprint(cfg, cfg), "weights_sha256": weights_sha,
            "all_faces": cfg.all_faces, "max_bytes": cfg.max_bytes, "links": cfg.links,
            # the probabilities and the abstained column (added since: see OLDER)
            "temperature": temperature, "min_confidence": threshold}


# fingerprint keys added since the first label outputs, with the value those had (no calibration, no abstention)
OLDER = {"temperature": 1.0, "min_confidence": None}


def _label_pending(cfg: LabelConfig, fingerprint: dict[str, Any], pending: pa.Table) -> tuple[int, Counter]:
    """Stream the pending photos through the actor pool, whose actors apply the ``fingerprint``'s temperature and
    threshold; the driver writes whole photos' rows into parts as they come (rows are small: crops never leave the
    actors). Returns (photos labelled, their statuses)."""
    import ray

    blocks = [pending.slice(i, cfg.batch_size) for i in range(0, pending.num_rows, cfg.batch_size)]
    actors = max(1, min(cfg.actors, len(blocks)))  # an incremental run of a few photos loads the models once
    ds = ray.data.from_arrow(blocks).map_batches(
        LabelPhotos, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "temperature": fingerprint["temperature"],
                                            "threshold": fingerprint["min_confidence"]}, batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                           enable_true_multi_threading=cfg.calls_per_actor > 1),
        num_cpus=cfg.decoders, num_gpus=cfg.gpus_per_actor or None)
    photos, statuses, buffered, rows = 0, Counter(), [], 0

    def flush() -> None:
        nonlocal buffered, rows
        table = pa.concat_tables(buffered)
        name = write_part(table, cfg.output)
        log.info("%s: %d rows — %d/%d photos", name, table.num_rows, photos, pending.num_rows)
        buffered, rows = [], 0

    # batch_size=None: whole blocks, i.e. whole actor calls, so a photo's rows never straddle two parts
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        uris = batch.column("uri").to_pylist()
        first = [i == 0 or uris[i] != uris[i - 1] for i in range(len(uris))]
        photos += sum(first)
        statuses.update(s for s, f in zip(batch.column("status").to_pylist(), first) if f)
        buffered.append(batch)
        rows += batch.num_rows
        if rows >= cfg.rows_per_part:
            flush()
    if buffered:
        flush()
    return photos, statuses


def _tally(tables: dict[str, pa.Table], keep: dict[str, np.ndarray]) -> dict[str, Any]:
    """Photos and rows, photos per status, rows (faces) per emotion and rows abstained, over the current rows."""
    current = pa.concat_tables([t.filter(pa.array(keep[n])) for n, t in sorted(tables.items())],
                               promote_options="default") if tables else None
    if current is None or current.num_rows == 0:
        return {"photos": 0, "rows": 0, "statuses": {}, "emotions": {}, "abstained": 0}
    uris, statuses = current.column("uri").to_pylist(), current.column("status").to_pylist()
    per_photo = Counter(dict(zip(uris, statuses)).values())
    emotions = Counter(n for n in current.column("label_name").to_pylist() if n is not None)
    abstained = pc.sum(current.column("abstained")).as_py() if "abstained" in current.column_names else 0
    return {"photos": len(set(uris)), "rows": current.num_rows, "statuses": dict(sorted(per_photo.items())),
            "emotions": dict(sorted(emotions.items())), "abstained": int(abstained or 0)}


def run(cfg: LabelConfig) -> dict[str, Any]:
    """Label the photos under ``cfg.input`` that the output has no current label for; commit; return the summary.

    A rerun with nothing new writes nothing and loads no model. Photos listed before keep their rows; a replaced
    photo's old rows are superseded by its new ones.
    """
    t0 = time.perf_counter()
    formats = _check(cfg)
    fingerprint = _fingerprint(cfg)
    out = outputs.Output(cfg.output, KIND, older={**input_defaults(), **OLDER})
    out.check_claim(fingerprint)  # another setup's labels are refused before anything is listed or written
    if fingerprint["weights_sha256"]:  # actors load exactly the weights fingerprinted here, from fetch_weights' cache
        cfg = dataclasses.replace(cfg, weights_sha256=fingerprint["weights_sha256"])
    photos, ignored = snapshot(cfg)
    if photos.num_rows == 0:
        raise ValueError(f"no files under {cfg.input}")
    current = {r["uri"]: (r["size"], r["mtime_ns"], r["etag"]) for r in photos.to_pylist()}
    tables = outputs.read_parts(cfg.output, PARTS, KEYS, ADDED)
    keep, done = _choose(tables, current)
    pending = photos.filter(pc.invert(pc.is_in(photos.column("uri"), pa.array(sorted(done), pa.string()))))
    log.info("%d files under %s (%d OS metadata files left out): %d already labelled, %d to label",
             photos.num_rows, cfg.input, ignored, photos.num_rows - pending.num_rows, pending.num_rows)
    tail = ([CSV] if "csv" in formats else []) + ([outputs.GALLERY] if cfg.gallery else []) \
        + [outputs.SUMMARY, outputs.RUN]
    def nothing_done() -> dict[str, Any]:  # what this run did (nothing), over the committed output's tallies
        return {**out.read_json(outputs.SUMMARY), "listed": photos.num_rows, "ignored": ignored,
                "skipped": photos.num_rows, "processed": 0, "processed_statuses": {},
                "seconds": round(time.perf_counter() - t0, 2), "photos_per_s": None}

    if not pending.num_rows and all(m.all() for m in keep.values()) and _unchanged(out, sorted(tables), tail):
        log.info("nothing to label and the committed output is current: nothing written")
        return nothing_done()

    if pending.num_rows:  # what every actor will load, loaded once here: bad files fail in one line, nothing written
        from kemo.classifier.checkpoint import load_checkpoint

        load_checkpoint(cfg.checkpoint)
        verify_detector(cfg)
        # then Ray, and actors sized for its nodes: a request no node can hold is refused before any file is written
        nodes = connect()
        cfg = resolve_resources(cfg, nodes)
        # actors on any node read the photos, the checkpoint and the weights (node types the autoscaler can start
        # count: actors may run there); the driver alone writes the output
        check_shared({"--input": cfg.input, "--checkpoint": cfg.checkpoint, "--weights": cfg.weights}, len(nodes),
                     "actors on other nodes cannot read it")
    labelled, run_statuses = 0, Counter()
    with out.lease() as lease:
        out.claim(fingerprint)
        if pending.num_rows:
            log.info("labelling with %s + %s: %d actors × %d decoders, %g GPU each, batch %d", cfg.detector,
                     fingerprint["architecture"], cfg.actors, cfg.decoders, cfg.gpus_per_actor, cfg.batch_size)
            labelled, run_statuses = _label_pending(cfg, fingerprint, pending)
        # read again under the lease: another run may have committed between the first read and the lease
        tables = outputs.read_parts(cfg.output, PARTS, KEYS, ADDED)
        keep, _ = _choose(tables, current)
        final = sorted(n for n, mask in keep.items() if mask.all())
        for name in sorted(n for n, mask in keep.items() if not mask.all()):
            # parts that lost rows to newer versions or duplicates: the rest of their rows, re-named
            kept = storage.read_parquet(storage.join(cfg.output, PARTS, name)).filter(pa.array(keep[name]))
            if kept.num_rows:
                final.append(write_part(kept, cfg.output))
        final = sorted(set(final))
        seconds = time.perf_counter() - t0
        summary = {"input": cfg.input, "output": cfg.output, "model": fingerprint["model"], "detector": cfg.detector,
                   "listed": photos.num_rows, "ignored": ignored, "skipped": photos.num_rows - pending.num_rows,
                   "processed": labelled, "processed_statuses": dict(sorted(run_statuses.items())),
                   "temperature": fingerprint["temperature"], "min_confidence": fingerprint["min_confidence"],
                   **_tally(tables, keep), "parts": len(final), "seconds": round(seconds, 2),
                   "photos_per_s": round(labelled / seconds, 2) if labelled and seconds else None}
        # the views of the rows, made before the old commit goes: a view that fails leaves the output committed
        views = {}
        if "csv" in formats:
            table = _current_rows(cfg.output, final, None).sort_by([("uri", "ascending"), ("face", "ascending")])
            views[CSV] = _csv_bytes(table, fingerprint["classes"])
        if cfg.gallery:
            try:
                views[outputs.GALLERY] = gallery_page(cfg, _current_rows(cfg.output, final, SHOWN), photos,
                                                      fingerprint["classes"], summary)
            except Exception:  # a view: the labels commit without it, and the next run tries again
                log.exception("gallery.html could not be made")
                if not labelled and all(m.all() for m in keep.values()) and _unchanged(
                        out, final, [t for t in tail if t != outputs.GALLERY]):
                    # the gallery was all this run had to add: the committed output stays exactly as it was
                    log.warning("nothing else to commit: the output is left as it was, without a gallery")
                    return nothing_done()
                log.warning("committing the labels without gallery.html")
        out.uncommit()  # before the sweep: an older commit may name a file that the sweep takes for a stray
        present = outputs.sweep(cfg.output, PARTS)
        files = [present[n] for n in final]
        files += [out.write_file(name, data) for name, data in views.items()]
        files += [out.write_json(outputs.SUMMARY, summary), out.claim_receipt()]
        lease.check()
        out.commit(files, dataclasses.asdict(cfg), fingerprint)
        for name in set(present) - set(final):  # only now: readers of the previous commit had them until here
            outputs.delete_part(cfg.output, PARTS, name)
        if outputs.GALLERY not in views:  # --gallery 0 or a page that failed: no page of older rows is left behind
            storage.delete(out.path(outputs.GALLERY), missing_ok=True)
    log.info("committed %d rows of %d photos in %d parts to %s: %s", summary["rows"], summary["photos"],
             len(final), cfg.output, summary["statuses"])
    return summary


def _current_rows(output: str, parts: list[str], columns: list[str] | None) -> pa.Table:
    """The rows of ``parts`` (all of LABELS' columns, or ``columns``), parts of an older kemo conformed to LABELS."""
    return outputs.read_files([storage.join(output, PARTS, n) for n in parts], columns, LABELS, ADDED)


def gallery_page(cfg: LabelConfig, rows: pa.Table, listed: pa.Table, classes: list[str], summary: dict[str, Any]
                 ) -> bytes:
    """gallery.html of the current rows: the faces by predicted emotion (most confident first), the abstained apart
    (most confident first: the nearest to being kept), then the photos with no face and those with another status,
    listed with their error; at most ``cfg.gallery`` in each. Thumbnails are cut from the photos again, here: a few
    hundred reads, whatever the size of the output, each of the very file this run ``listed`` (its ``file_id``); a
    row of a photo no longer listed is shown without its picture."""
    from kemo import gallery

    cap = cfg.gallery
    at = pc.index_in(rows.column("uri"), value_set=listed.column("uri"))
    rows = rows.append_column("listed", pc.is_valid(at)).append_column("file_id", listed.column("file_id").take(at))
    sections = []
    ok = pc.equal(rows.column("status"), "ok")
    abstained = rows.column("abstained").fill_null(False)  # null in parts of an older kemo: no abstention there
    by_confidence = [("confidence", "descending"), ("uri", "ascending"), ("face", "ascending")]

    def caption(r: dict[str, Any]) -> str:
        face = f" face {r['face']}" if r["face"] else ""
        return f"{r['label_name']} {r['confidence']:.2f} · {_short(r['uri'])}{face}"

    def faces(title: str, mask: pa.Array, note: str = "") -> None:
        total, shown = gallery.top(rows, mask, cap, by_confidence)
        sections.append(gallery.Section(title, gallery.photo_tiles(shown, caption, "uri", "face_box", cfg.max_bytes),
                                        total, note))

    for name in classes:
        faces(name, pc.and_(pc.and_(ok, pc.invert(abstained)), pc.equal(rows.column("label_name"), name)))
    threshold = summary["min_confidence"]
    faces("abstained", pc.and_(ok, abstained),
          f"confidence below {threshold:.3f}; the arg-max label is still given" if threshold is not None
          else "no abstention in this run (--abstain or --min-confidence)")
    by_uri = [("uri", "ascending"), ("face", "ascending")]
    total, shown = gallery.top(rows, pc.equal(rows.column("status"), "no_face"), cap, by_uri)
    sections.append(gallery.no_face(shown, total, lambda r: _short(r["uri"]), "uri", cfg.max_bytes))
    total, shown = gallery.top(rows, pc.invert(pc.is_in(rows.column("status"), pa.array(["ok", "no_face"]))), cap,
                               by_uri)
    sections.append(gallery.Section("other statuses", [
        gallery.Tile(caption=_short(r["uri"]), title=r["uri"], note=f"{r['status']}: {r['error'] or ''}")
        for r in shown], total, "nothing to show: each with its status and error", pictures=False))
    gallery.thumbnails(sections)
    lines = [f"{cfg.input} → {cfg.output}: {summary['photos']} photos, {summary['rows']} rows, statuses "
             f"{summary['statuses']}", f"checkpoint {cfg.checkpoint} (temperature {summary['temperature']:.3f}), "
             f"detector {cfg.detector}; at most {cap} per group"]
    return gallery.page("kemo labels", lines, sections)


def _short(uri: str) -> str:
    """The last two parts of a path or key, for a caption (the full one is on hover)."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def _unchanged(out: outputs.Output, parts: list[str], tail: list[str]) -> bool:
    """Whether the output is committed, intact, and names exactly ``parts`` and ``tail``."""
    try:
        manifest = out.committed()
    except (FileNotFoundError, outputs.Damaged):
        return False
    wanted = sorted([f"{PARTS}/{n}" for n in parts] + tail)
    return sorted(f["path"] for f in manifest["files"] if f["path"] != outputs.CONFIG) == wanted


def label_one_by_one(cfg: LabelConfig, photos: pa.Table) -> pa.Table:
    """The same models and code, one photo at a time in this process, no Ray, no batching, one decoder thread: what
    tests compare the Ray job's rows with (jobs/benchmark.py times its own cv2.imread loop instead)."""
    from kemo.classifier.checkpoint import read_meta

    udf = LabelPhotos(dataclasses.asdict(dataclasses.replace(cfg, decoders=1, batch_size=1)),
                      *calibration(cfg, read_meta(cfg.checkpoint)))
    return pa.concat_tables([udf(photos.slice(i, 1)) for i in range(photos.num_rows)]) if photos.num_rows \
        else LABELS.empty_table()
