"""Stream a manifest's photos through face-detection actor pools into Parquet crop shards (DESIGN §3, §4).

    python jobs/preprocess.py --input ROOT_OR_MANIFEST --output DIR_OR_S3 --detector yolo --weights face.pt

One actor boundary per photo: read bytes → decode (EXIF-upright, DCT-reduced when large) → detector input, in a pool
of decoder threads; the detector runs batched on the actor's device; the primary face is cropped square with a margin
and JPEG-encoded. Only crops and boxes leave the actor. A downstream task writes ``rows_per_shard`` rows per shard
file, each written whole or not at all and named after its rows, so a killed run resumes from the shards it left and
a rerun adds nothing. ``_commit.json`` is written last, after checking that every input has exactly one row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import storage
from kemo.crop import clip_box, crop_region, crop_square, encode_jpeg, iou, primary_face, resize_whole, valid_box
from kemo.detect import check_detector, create_detector
from kemo.image import MAX_PIXELS, Decoded, DecodeError, decode, largest_reduction
from kemo.schema import CROP, IDENTITY

log = logging.getLogger(__name__)
KIND = "crops"
RETRY = ("read_error", "error")  # transient (throttling, a network blip, a GPU out of memory): redone on a rerun
RUN = "_run.json"  # fingerprint of the run that owns the shards; a resume must match it
SMOKE_ROWS = 16
C = TypeVar("C")


@dataclass
class PreprocessConfig:
    """Detect and crop the face of every photo into Parquet crop shards."""

    input: str = field(metadata={"help": "AI-Hub root, index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    detector: str = field(default="yolo", metadata={"help": "yolo, haar, none (whole photo) or annotations"})
    weights: str | None = field(default=None, metadata={"help": "YOLO face weights: path or s3:// URI"})
    weights_sha256: str | None = field(default=None, metadata={"help": "refuse weights with another SHA-256"})
    per_class: int = field(default=0, metadata={"help": "when indexing a root: balanced sample per class (0 = all)"})
    seed: int = field(default=0, metadata={"help": "when indexing a root: split and sample seed"})
    crop_size: int = field(default=500, metadata={"help": "crop side in pixels"})
    margin: float = field(default=0.25, metadata={"help": "background kept on each side, as a share of the face"})
    imgsz: int = field(default=640, metadata={"help": "detector input side"})
    conf: float = field(default=0.25, metadata={"help": "yolo: minimum face confidence"})
    batch_size: int = field(default=0, metadata={"help": "photos per actor call = detector batch; 0 = 16 CPU, 64 GPU"})
    actors: int = field(default=0, metadata={"help": "actor pool size; 0 = one per GPU, else CPUs / decoders"})
    decoders: int = field(default=0, metadata={"help": "CPU decoder threads (and CPUs) per actor; 0 = 1 CPU, 8 GPU"})
    gpus_per_actor: float = field(default=-1, metadata={"help": "GPUs per actor; -1 = 1 when the cluster has GPUs"})
    calls_per_actor: int = field(default=0, metadata={
        "help": "batches in flight per actor, so decoding overlaps the detector; 0 = 2 with GPUs, else 1"})
    device: str = field(default="auto", metadata={"help": "detector device: auto, cpu, cuda:0"})
    decode_min_side: int = field(default=1000, metadata={"help": "DCT-reduce JPEGs while the short side stays >= this"})
    jpeg_quality: int = field(default=95, metadata={"help": "crop JPEG quality"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per Parquet shard (~75 MB at 500² crops)"})
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": "refuse larger photos as too_large"})
    smoke_test: bool = field(default=False, metadata={"help": f"only the first {SMOKE_ROWS} photos"})


def resolve_resources(cfg: C, cluster: dict[str, float]) -> C:
    """Fill the automatic resource knobs from the cluster's resources (the nodes up now: on an autoscaling cluster
    that has not scaled up yet, give --gpus-per-actor and --decoders explicitly). Any config dataclass with
    PreprocessConfig's resource fields (kemo.label.LabelConfig too)."""
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if gpus else 0.0)
    # up to 8 decoders per GPU, but never more CPUs than a GPU's share of the node (g5.xlarge: 4 vCPUs, 1 GPU)
    decoders = cfg.decoders or (max(1, min(8, cpus // max(gpus, 1) - 1)) if gpa else 1)
    if cfg.actors:
        actors = cfg.actors
    elif gpa:
        actors = max(1, int(gpus / gpa))
    else:
        actors = max(1, int(cluster.get("CPU", 1)) // decoders)
    batch = cfg.batch_size or (64 if gpa else 16)
    calls = cfg.calls_per_actor or (2 if gpa else 1)
    return dataclasses.replace(cfg, gpus_per_actor=gpa, decoders=decoders, actors=actors, batch_size=batch,
                               calls_per_actor=calls)


# --------------------------------------------------------------------------------------------------- the actor


@dataclass
class Prepared:
    """One photo after read, decode and the detector's preparation; ``status`` set when it went no further."""

    status: str | None = None
    error: str | None = None
    decoded: Decoded | None = None
    det_input: Any = None
    det_factors: tuple[float, float] = (1.0, 1.0)
    header: tuple[int | None, int | None, int | None] = (None, None, None)


class CropPhotos:
    """Ray Data class UDF: a batch of manifest rows → the same rows as crop-shard rows (``CROP``), one each."""

    config = PreprocessConfig  # kemo.label.LabelPhotos shares this whole front end with its own config class

    def __init__(self, cfg: dict[str, Any]):
        """Detector, decoder threads and lock from ``cfg`` (``self.config``'s fields as a dict)."""
        self.cfg = self.config(**cfg)
        cv2.setNumThreads(max(1, self.cfg.decoders))  # the actor's CPU share, not every core of the node
        if self.cfg.detector == "yolo":
            import torch

            torch.set_num_threads(max(1, self.cfg.decoders))  # the actor's CPU share, not the whole node
        self.detector = create_detector(self.cfg.detector, weights=self.cfg.weights,
                                        weights_sha256=self.cfg.weights_sha256, imgsz=self.cfg.imgsz,
                                        device=self.cfg.device, conf=self.cfg.conf)
        self.pool = ThreadPoolExecutor(max(1, self.cfg.decoders), thread_name_prefix="decode")
        self.detect_lock = threading.Lock()  # with calls_per_actor > 1, batches share one (not thread-safe) model
        # `none` crops the whole photo and `annotations` knows the face: decode just large enough for the crop
        # (1 = no short-side limit: the box caps the reduction per photo)
        self.min_side = {"none": self.cfg.crop_size, "annotations": 1}.get(self.cfg.detector, self.cfg.decode_min_side)

    def _load(self, row: dict[str, Any]) -> Prepared:
        try:
            data = storage.read_bytes(row["uri"])
        except Exception as e:  # missing object, permissions, network: the photo still gets its row
            return Prepared("read_error", f"{type(e).__name__}: {e}")
        max_scale = 8
        box = row.get("box")
        if self.detector.name == "annotations" and valid_box(box):
            # the face is known before decoding: reduce only as far as the crop keeps crop_size pixels
            max_scale = largest_reduction(crop_region(box, self.cfg.margin)[2], self.cfg.crop_size)
        try:
            dec = decode(data, min_side=self.min_side, max_pixels=self.cfg.max_pixels, max_scale=max_scale)
        except DecodeError as e:
            return Prepared(e.status, str(e))
        except Exception as e:
            return Prepared("decode_error", f"{type(e).__name__}: {e}")
        det_input, det_factors = self.detector.prepare(dec.image, dec.factors)
        return Prepared(decoded=dec, det_input=det_input, det_factors=det_factors,
                         header=(dec.width, dec.height, dec.orientation))

    def _faces(self, prep: Prepared, faces: Any) -> tuple[list[list[float]], list[float]]:
        """The detector's faces as boxes of the full-resolution upright frame, clipped to it, with their scores."""
        dec = prep.decoded
        fx, fy = prep.det_factors
        boxes, scores = [], []
        for b, s in zip(faces.boxes, faces.scores):
            clipped = clip_box([b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy], dec.width, dec.height)
            if clipped is not None:
                boxes.append(clipped)
                scores.append(float(s))
        return boxes, scores

    def _crop(self, dec: Decoded, box: list[float] | None) -> np.ndarray:
        """(crop_size, crop_size, 3) uint8: the square around ``box`` with its margin, or the whole photo (None)."""
        if box is None:
            return resize_whole(dec.image, self.cfg.crop_size)
        return crop_square(dec.image, crop_region(box, self.cfg.margin), self.cfg.crop_size, dec.factors)

    def _finish(self, row: dict[str, Any], prep: Prepared, faces) -> dict[str, Any]:
        out = {k: row.get(k) for k in IDENTITY}
        out.update(detector=self.detector.name, status=prep.status or "ok", error=prep.error, crop=None,
                   face_box=None, face_score=None, n_faces=None)
        out["orig_width"], out["orig_height"], out["exif_orientation"] = prep.header
        dec = prep.decoded
        if dec is None:
            return out
        try:
            if self.detector.whole_photo:
                crop = self._crop(dec, None)
                out["face_box"] = [0.0, 0.0, float(dec.width), float(dec.height)]
            else:
                boxes, scores = self._faces(prep, faces)
                out["n_faces"] = len(boxes)
                best = primary_face(np.asarray(boxes).reshape(-1, 4), np.asarray(scores))
                if best is None:
                    out.update(status="no_face", error=f"{self.detector.name} found no face")
                    return out
                crop = self._crop(dec, boxes[best])
                out["face_box"], out["face_score"] = boxes[best], scores[best]
            out["crop"] = encode_jpeg(crop, self.cfg.jpeg_quality)
        except Exception as e:
            log.exception("cropping %s failed", row.get("image_id"))
            out.update(status="error", error=f"{type(e).__name__}: {e}", crop=None)
        return out

    def _detect(self, rows: list[dict[str, Any]]) -> tuple[list[Prepared], list[Any]]:
        """Read and decode ``rows`` in the decoder threads, then run the detector once on the decodable ones."""
        # With calls_per_actor > 1 another batch decodes in the shared thread pool while this one holds the detector.
        prepared = list(self.pool.map(self._load, rows))
        faces: list[Any] = [None] * len(rows)
        good = [i for i, p in enumerate(prepared) if p.decoded is not None]
        if good:
            try:
                with self.detect_lock:
                    found = self.detector.detect([prepared[i].det_input for i in good], [rows[i] for i in good])
                for i, f in zip(good, found):
                    faces[i] = f
            except Exception as e:
                log.exception("detector failed on a batch of %d", len(good))
                for i in good:
                    prepared[i] = Prepared("error", f"detector: {type(e).__name__}: {e}", header=prepared[i].header)
        return prepared, faces

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prepared, faces = self._detect(rows)
        out = list(self.pool.map(self._finish, rows, prepared, faces))
        return pa.Table.from_pylist(out, schema=CROP)


# --------------------------------------------------------------------------------------------------- shards


def shard_name(image_ids: list[str]) -> str:
    """Named after its rows: a retried batch overwrites its own file instead of adding a copy."""
    return f"part-{hashlib.sha1(chr(0).join(sorted(image_ids)).encode()).hexdigest()[:20]}.parquet"


def write_shard(batch: pa.Table, shards_dir: str) -> pa.Table:
    """Write one shard file whole; return a one-row receipt."""
    ids = batch.column("image_id").to_pylist()
    name = shard_name(ids)
    storage.write_parquet(batch, storage.join(shards_dir, name))
    counts = Counter(batch.column("status").to_pylist())
    return pa.table({"file": [name], "rows": [len(ids)], "ok": [counts.get("ok", 0)]})


class ShardWriter:
    """Ray Data class UDF around ``write_shard``: a few long-lived writer processes, not a new task per shard."""

    def __init__(self, shards_dir: str):
        self.shards_dir = shards_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_shard(batch, self.shards_dir)


def read_shards(shards_dir: str, columns: list[str]) -> dict[str, pa.Table]:
    """The named columns of every shard file present, one read each (a file is only ever present whole)."""
    try:
        entries = storage.list_files(shards_dir)
    except FileNotFoundError:
        return {}
    return {e.rel: storage.read_parquet_columns(e.uri, columns)
            for e in entries if e.rel.endswith(".parquet") and "/" not in e.rel}


def _rewrite_without(shards_dir: str, name: str, drop: pa.Array) -> pa.Table:
    """Replace a shard by one without the rows ``drop`` marks; the new file is written before the old one goes,
    so a crash in between leaves duplicates (which ``_finalize`` removes), never a loss."""
    uri = storage.join(shards_dir, name)
    keep = storage.read_parquet(uri).filter(pc.invert(drop))
    if keep.num_rows:
        storage.write_parquet(keep, storage.join(shards_dir, shard_name(keep.column("image_id").to_pylist())))
    storage.delete(uri)
    return keep


def resume(shards_dir: str) -> tuple[set[str], int]:
    """(photos already done, photos to do again): shards lose their transient-failure rows, so a rerun processes
    those photos again."""
    done, dropped = set(), 0
    for name, t in read_shards(shards_dir, ["image_id", "status"]).items():
        retry = pc.is_in(t.column("status"), pa.array(RETRY))
        n = pc.sum(retry).as_py() or 0
        if n:
            _rewrite_without(shards_dir, name, retry)
            dropped += n
        done.update(t.filter(pc.invert(retry)).column("image_id").to_pylist())
    return done, dropped


def check_output_reachable(output: str, alive_nodes: int) -> None:
    """Every shard must land where the driver commits it: a local path is one machine's disk."""
    if not storage.is_s3(output) and alive_nodes > 1:
        raise ValueError(f"--output {output} is a local path but the cluster has {alive_nodes} nodes: shards would "
                         "land on whichever node wrote them; give an s3:// output")


# --------------------------------------------------------------------------------------------------- the job


def load_input(cfg: PreprocessConfig) -> pa.Table:
    """The manifest to preprocess: from a manifest file, an index output, or by indexing an AI-Hub root."""
    from kemo.data import aihub

    return aihub.load_or_index(cfg.input, storage.join(cfg.output, "index"), per_class=cfg.per_class, seed=cfg.seed)


def _fingerprint(cfg: PreprocessConfig, manifest: pa.Table) -> dict[str, Any]:
    ids = sorted(manifest.column("image_id").to_pylist())
    weights_sha = None
    if cfg.detector == "yolo" and cfg.weights:
        from kemo.detect import fetch_weights

        weights_sha = fetch_weights(cfg.weights, cfg.weights_sha256)[1]
    # everything that changes a row; resource knobs and the code version do not (a bug-fix release may resume)
    return {"detector": cfg.detector, "weights_sha256": weights_sha, "crop_size": cfg.crop_size,
            "margin": cfg.margin, "imgsz": cfg.imgsz, "conf": cfg.conf, "jpeg_quality": cfg.jpeg_quality,
            "decode_min_side": cfg.decode_min_side, "max_pixels": cfg.max_pixels,
            "inputs": len(ids), "inputs_sha256": hashlib.sha256("\0".join(ids).encode()).hexdigest()}


def _claim(cfg: PreprocessConfig, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix shards of a different run into this output; otherwise record this run's fingerprint."""
    path = storage.join(cfg.output, RUN)
    try:
        previous = storage.read_json(path)
    except FileNotFoundError:
        previous = None
    if previous is not None and previous != fingerprint:
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        raise ValueError(f"{cfg.output} holds crops of another run (differs in {', '.join(changed)}); "
                         "use a new --output")
    storage.write_json(path, fingerprint)


def _finalize(cfg: PreprocessConfig, manifest: pa.Table, shards_dir: str) -> tuple[list[str], Counter, float | None]:
    """Check exactly one row per input across the shards (dropping a retried batch's duplicate file)."""
    expected = set(manifest.column("image_id").to_pylist())
    columns = ["image_id", "status", "box", "face_box"]
    seen: set[str] = set()
    files, tables = [], []
    for name, t in sorted(read_shards(shards_dir, columns).items()):
        ids = t.column("image_id").to_pylist()
        overlap = seen.intersection(ids)
        if overlap:
            # Only a retried batch regrouped differently can overlap; its rows are already committed elsewhere.
            rest = _rewrite_without(shards_dir, name, pc.is_in(t.column("image_id"), pa.array(sorted(overlap))))
            if rest.num_rows == 0:
                continue
            name, t = shard_name(rest.column("image_id").to_pylist()), rest.select(columns)
            ids = t.column("image_id").to_pylist()
        unknown = set(ids) - expected
        if unknown:
            raise ValueError(f"shard {name} holds {len(unknown)} photos not in this run's input")
        seen.update(ids)
        files.append(name)
        tables.append(t)
    missing = expected - seen
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(expected)} photos have no row yet (e.g. {sorted(missing)[0]}); "
                           "run the same command again to finish them")
    statuses: Counter = Counter()
    hits = []  # does the crop hold the annotated face? (IoU >= 0.5), where the manifest has a box
    for t in tables:
        statuses.update(t.column("status").to_pylist())
        for box, face in zip(t.column("box").to_pylist(), t.column("face_box").to_pylist()):
            if box is not None:
                hits.append(face is not None and iou(box, face) >= 0.5)
    return files, statuses, (round(sum(hits) / len(hits), 4) if hits else None)


def _steady(receipts: list[tuple[float, int]]) -> float | None:
    if len(receipts) < 3 or receipts[-1][0] <= receipts[0][0]:
        return None
    (t0, n0), (t1, n1) = receipts[0], receipts[-1]
    return round((n1 - n0) / (t1 - t0), 2)


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Preprocess ``cfg.input`` into committed crop shards under ``cfg.output``; returns the summary."""
    import ray

    t0 = time.perf_counter()
    check_detector(cfg.detector, cfg.weights)  # here, not later inside every actor's constructor
    manifest = load_input(cfg)
    if cfg.smoke_test:
        manifest = manifest.slice(0, SMOKE_ROWS)
    cfg = resolve_resources(cfg, ray.cluster_resources())
    check_output_reachable(cfg.output, sum(1 for n in ray.nodes() if n.get("Alive")))
    shards_dir = storage.join(cfg.output, "shards")
    fingerprint = _fingerprint(cfg, manifest)
    _claim(cfg, fingerprint)
    if fingerprint["weights_sha256"]:  # actors load exactly the weights fingerprinted here, from fetch_weights' cache
        cfg = dataclasses.replace(cfg, weights_sha256=fingerprint["weights_sha256"])
    storage.uncommit(cfg.output)
    done, retried = resume(shards_dir)
    if retried:
        log.info("%d photos failed transiently (%s) last time: processing them again", retried, ", ".join(RETRY))

    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa.array(sorted(done), pa.string()))))
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
            compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                               enable_true_multi_threading=cfg.calls_per_actor > 1),
            num_cpus=cfg.decoders, num_gpus=cfg.gpus_per_actor or None)
        # Writers are light I/O and must never wait for a CPU that the actors hold (shards are what a killed run
        # resumes from); as a fixed actor pool they also never spawn a worker process per shard.
        ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"shards_dir": shards_dir},
                            batch_size=cfg.rows_per_shard, batch_format="pyarrow", num_cpus=0,
                            compute=ray.data.ActorPoolStrategy(size=max(1, min(4, cfg.actors // 2))))
        for receipt in ds.iter_rows():
            processed += receipt["rows"]
            receipts.append((time.perf_counter(), processed))
            log.info("shard %s: %d rows (%d ok) — %d/%d", receipt["file"], receipt["rows"], receipt["ok"],
                     processed, pending.num_rows)
    files, statuses, on_face = _finalize(cfg, manifest, shards_dir)
    seconds = time.perf_counter() - t0
    summary = {"inputs": manifest.num_rows, "processed": processed, "skipped": manifest.num_rows - pending.num_rows,
               "statuses": dict(sorted(statuses.items())), "shards": len(files), "seconds": round(seconds, 2),
               "crop_on_annotated_face": on_face,
               "photos_per_s": round(processed / seconds, 2) if seconds else None,
               # between the first and the last shard: throughput without Ray Data's start-up
               "steady_photos_per_s": _steady(receipts)}
    storage.write_json(storage.join(cfg.output, "summary.json"), summary)
    storage.commit(cfg.output, [f"shards/{f}" for f in files] + ["summary.json", RUN], dataclasses.asdict(cfg), KIND)
    log.info("committed %d rows in %d shards to %s: %s", manifest.num_rows, len(files), cfg.output,
             summary["statuses"])
    return summary


def read_crops(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of a committed crop output, from the files its commit manifest names."""
    manifest = storage.committed(output, KIND)
    parts = [storage.read_parquet_columns(storage.join(output, f["path"]), columns)
             for f in manifest["files"] if f["path"].startswith("shards/")]
    return pa.concat_tables(parts) if parts else CROP.empty_table()

