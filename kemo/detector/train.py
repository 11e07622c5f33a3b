"""Fine-tune and evaluate the face detector (the paper's Table 4).

    from kemo.detector.train import TrainDetectorConfig, run
    run(TrainDetectorConfig(input="out/index", output="out/detector", weights="face.pt"))

Steps: the corpus manifest (indexing a root when given one) → a person-disjoint YOLO dataset in a local work
directory (:mod:`kemo.detector.export`, resumable) → evaluation of the starting weights on the held-out test split →
ultralytics training (offline; resumes an interrupted run from its ``last.pt``) → evaluation of ``best.pt`` → output:
``best.pt``, ``best.pt.sha256``, ``meta.json``, ``table4.md``, ``config.json`` and, last, ``_commit.json``.

Evaluation runs the detector the way ``jobs/preprocess.py --detector yolo`` does
(:class:`kemo.detector.yolo.YoloDetector`) on the exported upright test photos and reports mAP@0.5, mAP@0.5:0.95
(:mod:`kemo.detector.metrics`, checked against ultralytics' matcher and ``ap_per_class`` on the same predictions, and
beside ultralytics' own ``val`` of the split) and primary-face recall: the share of photos where the face the pipeline
would crop overlaps the annotated one with IoU ≥ 0.5.

Multi-GPU: ultralytics' own DDP on one machine (``--device 0,1,...``; ``auto`` takes every visible GPU). Its trainer
owns the mosaic data loader, EMA, per-epoch validation and best-checkpoint choice, which Ray Train would make us
rewrite, and 3,500 photos train in minutes on one node. On a cluster, ``jobs/train_detector.py --gpus N`` runs this
whole function as one Ray task holding N GPUs of one node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kemo import outputs, storage
from kemo.config import code_version
from kemo.crop import valid_box
from kemo.detector import modules
from kemo.detector.export import STAMP, ExportConfig
from kemo.detector.export import run as export
from kemo.detector.metrics import Predictions, detection_map, primary_face_recall, ultralytics_map
from kemo.settings import InputSettings

log = logging.getLogger(__name__)
KIND = outputs.DETECTOR
SMOKE = {"images": 40, "epochs": 1, "imgsz": 160}
# ultralytics arguments that kemo sets itself (flags, or where its output goes)
RESERVED = ("data", "epochs", "imgsz", "batch", "device", "workers", "seed", "project", "name", "exist_ok", "resume",
            "model", "mode", "task", "save", "save_dir", "cfg")


@dataclass
class TrainDetectorConfig(InputSettings):
    """Fine-tune a face detector on the corpus' annotated faces and report Table 4 (before/after)."""

    input: str = field(metadata={"help": "AI-Hub root, index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    weights: str | None = field(default=None, metadata={"help": "face weights to fine-tune (path or s3:// URI)"})
    weights_sha256: str | None = field(default=None, metadata={"help": "expected SHA-256 of --weights"})
    model: str | None = field(default=None, metadata={
        "help": "train from a model YAML instead: a path, yolo-face-v2.yaml (ours) or an ultralytics name"})
    images: int = field(default=3500, metadata={"help": "photos exported, split 8:1:1 by person (2,800/350/350)"})
    epochs: int = field(default=50, metadata={"help": "training epochs"})
    imgsz: int = field(default=640, metadata={"help": "training and evaluation input size"})
    batch: int = field(default=16, metadata={"help": "batch size (over all GPUs)"})
    device: str = field(default="auto", metadata={"help": "auto (every visible GPU, else cpu), cpu, 0 or 0,1,2,3"})
    workers: int = field(default=8, metadata={"help": "data-loader workers per GPU"})
    max_side: int = field(default=0, metadata={"help": "longer side of exported photos; 0 = 2 × imgsz"})
    seed: int = field(default=0, metadata={"help": "seed of the person split and of training"})
    conf: float = field(default=0.25, metadata={"help": "preprocess' detection threshold, for primary-face recall"})
    train_args: str = field(default="", metadata={"help": "JSON of further ultralytics train arguments"})
    work: str = field(default="", metadata={"help": "local work directory (dataset, ultralytics run); default: "
                                                    "OUTPUT/work for a local output, else ~/.cache/kemo/detector/…"})
    gpus: int = field(default=0, metadata={"help": "jobs/train_detector.py: run as one Ray task holding N GPUs"})
    cpus: int = field(default=4, metadata={"help": "jobs/train_detector.py: CPUs of that Ray task"})
    smoke_test: bool = field(default=False, metadata={"help": f"a quick check: {SMOKE}"})


def split_counts(images: int) -> tuple[int, int, int]:
    """8:1:1, as the paper's 2,800/350/350."""
    train, val = round(images * 0.8), round(images * 0.1)
    return train, val, images - train - val


def photos_to_use(requested: int, boxes: list[Any]) -> int:
    """``--images``, or every photo with a usable face box when there are fewer: a smaller index is split 8:1:1 as
    a whole instead of filling the training split and leaving validation and test empty."""
    return min(requested, sum(valid_box(b) for b in boxes))


def resolve_device(device: str) -> str:
    """ultralytics' device string: ``auto`` (or empty) is every visible GPU (DDP when several), else the CPU."""
    device = device.strip().lower()
    if device not in ("auto", ""):
        return device
    import torch

    n = torch.cuda.device_count()
    return ",".join(str(i) for i in range(n)) if n else "cpu"


def eval_device(device: str) -> str:
    """One torch device for evaluation from a resolved training device: ``0,1`` → ``cuda:0``, ``cuda:1`` stays."""
    first = device.split(",")[0].strip()
    if first in ("cpu", "mps") or first.startswith("cuda"):
        return first
    return f"cuda:{first}"


def work_dir(cfg: TrainDetectorConfig) -> str:
    if cfg.work:
        return os.path.abspath(cfg.work)
    if not storage.is_s3(cfg.output):
        return os.path.abspath(os.path.join(cfg.output, "work"))
    key = hashlib.sha256(cfg.output.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "kemo", "detector", key)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_source(cfg: TrainDetectorConfig) -> dict[str, Any]:
    """Where training starts: face weights (fetched, hash-checked) or a model YAML (resolved offline)."""
    if bool(cfg.weights) == bool(cfg.model):
        raise ValueError("give exactly one of --weights PATH_OR_URI (face weights to fine-tune) "
                         "or --model YAML (train from a model definition)")
    if cfg.weights:
        from kemo.detector.weights import fetch_weights

        path, sha = fetch_weights(cfg.weights, cfg.weights_sha256)
        return {"kind": "weights", "uri": cfg.weights, "path": path, "sha256": sha,
                "name": os.path.basename(cfg.weights)}
    from ultralytics.nn.tasks import yaml_model_load

    yaml = modules.resolve_yaml(cfg.model)
    try:
        definition = yaml_model_load(yaml)
    except FileNotFoundError:
        raise ValueError(f"model YAML {cfg.model!r} is neither a file, one of ours "
                         f"({', '.join(sorted(os.listdir(modules.CFG_DIR)))}) nor one of ultralytics'") from None
    definition.pop("yaml_file", None)  # the definition itself (with its scale) is what identifies the model
    sha = _sha256(json.dumps(definition, sort_keys=True, default=str).encode())
    return {"kind": "model", "uri": cfg.model, "path": yaml, "sha256": sha, "name": os.path.basename(cfg.model)}


def _trainer_class():
    from kemo.detector import trainer

    return trainer.FaceTrainer


def _read_json(path: str) -> Any:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return None


def train_args(cfg: TrainDetectorConfig) -> dict[str, Any]:
    """``--train-args`` parsed and checked: a JSON object that leaves kemo's own arguments alone."""
    extra = json.loads(cfg.train_args) if cfg.train_args else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--train-args must be a JSON object of ultralytics arguments, got {cfg.train_args!r}")
    reserved = set(RESERVED) & set(extra)
    if reserved:
        raise ValueError(f"--train-args may not set {sorted(reserved)}: they have their own flags or belong to kemo")
    return extra


def train(cfg: TrainDetectorConfig, source: dict[str, Any], data_yaml: str, work: str, device: str,
          dataset_sha: str, callbacks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with ultralytics into ``work/runs/train``; resume an interrupted run of the same settings, skip a
    finished one. Returns where best.pt is and how training went."""
    from ultralytics import YOLO

    run_dir = os.path.join(work, "runs", "train")
    last = os.path.join(run_dir, "weights", "last.pt")
    state_path, done_path = os.path.join(work, "train.json"), os.path.join(work, "trained.json")
    extra = train_args(cfg)
    wanted = {"source_sha256": source["sha256"], "dataset_sha256": dataset_sha, "epochs": cfg.epochs,
              "imgsz": cfg.imgsz, "batch": cfg.batch, "seed": cfg.seed, "train_args": extra}
    state, done = _read_json(state_path), _read_json(done_path)
    t0 = time.perf_counter()
    resumed = None
    if state == wanted and done and done.get("train") == wanted and os.path.isfile(done["best"]):
        log.info("training already finished in %s", run_dir)
        return done
    if state == wanted and os.path.isfile(last):
        import torch
        from ultralytics.utils.torch_utils import strip_optimizer

        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=False)
        except Exception as e:  # killed while ultralytics wrote it: start over
            log.warning("%s does not load (%s): training again from the start", last, e)
            ckpt = None
        if ckpt is not None and (ckpt.get("epoch", -1) == -1 or ckpt.get("optimizer") is None
                                 or ckpt["epoch"] + 1 >= ckpt.get("train_args", {}).get("epochs", cfg.epochs)):
            # the last epoch ran: killed before (or while) ultralytics stripped its checkpoints, or before
            # trained.json; finish what it would have done instead of asking it to resume a finished run
            try:
                for path in (os.path.join(run_dir, "weights", "best.pt"), last):
                    strip_optimizer(path)
                log.info("training in %s had finished; keeping its best.pt", run_dir)
                return _finish(done_path, wanted, run_dir, t0, None, device, reused=True)
            except Exception as e:  # killed while ultralytics rewrote best.pt
                log.warning("the finished run in %s is damaged (%s): training again from the start", run_dir, e)
                ckpt = None
    else:
        ckpt = None
    if ckpt is not None:
        resumed = int(ckpt["epoch"]) + 1
        log.info("resuming the interrupted training from %s (epoch %d of %d)", last, resumed + 1, cfg.epochs)
        model = YOLO(last)
        for event, fn in (callbacks or {}).items():
            model.add_callback(event, fn)
        # device and workers may differ on this machine; every other setting comes from the checkpoint
        model.train(resume=True, device=device, workers=cfg.workers, trainer=_trainer_class())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(work, exist_ok=True)
        storage.write_json(state_path, wanted)
        if os.path.exists(done_path):
            os.remove(done_path)
        model = YOLO(source["path"], task="detect")
        for event, fn in (callbacks or {}).items():
            model.add_callback(event, fn)
        args = {"data": data_yaml, "epochs": cfg.epochs, "imgsz": cfg.imgsz, "batch": cfg.batch, "device": device,
                "workers": cfg.workers, "seed": cfg.seed, "project": os.path.join(work, "runs"), "name": "train",
                "exist_ok": True, "plots": False, "verbose": False}
        model.train(**{**args, **extra}, trainer=_trainer_class())
    return _finish(done_path, wanted, run_dir, t0, resumed, device)


def _finish(done_path: str, wanted: dict[str, Any], run_dir: str, t0: float, resumed: int | None,
            device: str, reused: bool = False) -> dict[str, Any]:
    import torch

    best = os.path.join(run_dir, "weights", "best.pt")
    if not os.path.isfile(best):
        raise RuntimeError(f"ultralytics finished without {best}")
    torch.load(best, map_location="cpu", weights_only=False)  # a truncated best.pt fails here, not after trained.json
    done = {"train": wanted, "best": best, "seconds": round(time.perf_counter() - t0, 1), "resumed_at_epoch": resumed,
            "reused_finished_run": reused, "device": device}
    storage.write_json(done_path, done)
    return done


def _labels(path: str, width: int, height: int) -> np.ndarray:
    boxes = []
    with open(path) as f:
        for line in f:
            if line.strip():
                _, cx, cy, w, h = map(float, line.split())
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def predict(weights: str, dataset: str, split: str, imgsz: int, device: str, conf: float,
            batch: int = 16) -> tuple[list[Predictions], list[Predictions]]:
    """Two sets of detections on a split's photos, with the annotated faces, in each exported photo's pixels, by the
    pipeline's detector class in fp32: as ultralytics validates (score ≥ 0.001, NMS IoU 0.7, up to 300) for mAP, and
    as ``jobs/preprocess.py`` detects (score ≥ ``conf``, NMS IoU 0.5, up to 30) for primary-face recall."""
    from kemo.detector.yolo import YoloDetector

    index = storage.read_parquet(os.path.join(dataset, "index.parquet")).to_pylist()
    files = [r["file"] for r in index if r["split"] == split]
    detector = YoloDetector(weights=weights, imgsz=imgsz, device=device)
    pipeline = {"conf": conf, "iou": detector.iou, "max_det": detector.max_det}
    detector.half = False  # fp16 scores tie, and ultralytics' AP orders tied scores arbitrarily
    for_map, for_pipeline = [], []
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        images = [cv2.imread(os.path.join(dataset, "images", split, f"{name}.jpg"), cv2.IMREAD_COLOR_RGB)
                  for name in chunk]
        prepared = [detector.prepare(image, (1.0, 1.0)) for image in images]
        inputs = [p[0] for p in prepared]
        runs = []
        for settings, out in (({"conf": 0.001, "iou": 0.7, "max_det": 300}, for_map), (pipeline, for_pipeline)):
            detector.conf, detector.iou, detector.max_det = settings["conf"], settings["iou"], settings["max_det"]
            runs.append((detector.detect(inputs, []), out))
        for i, (name, image) in enumerate(zip(chunk, images)):
            truth = _labels(os.path.join(dataset, "labels", split, f"{name}.txt"), image.shape[1], image.shape[0])
            fx, fy = prepared[i][1]
            for faces, out in runs:
                out.append(Predictions(faces[i].boxes.astype(np.float64) * [fx, fy, fx, fy],
                                       faces[i].scores.astype(np.float64), truth))
    return for_map, for_pipeline


def evaluate(weights: str, dataset: str, split: str, imgsz: int, device: str, conf: float, work: str,
             tag: str) -> dict[str, Any]:
    """mAP, its check against ultralytics on the same predictions, ultralytics' own ``val``, primary-face recall."""
    from ultralytics import YOLO

    from kemo.detector.trainer import offline

    offline()
    t0 = time.perf_counter()
    photos, pipeline = predict(weights, dataset, split, imgsz, eval_device(device), conf)
    ours = detection_map(photos)
    check = ultralytics_map(photos)
    val = YOLO(weights, task="detect").val(
        data=os.path.join(dataset, "data.yaml"), split=split, imgsz=imgsz, batch=16, device=eval_device(device),
        conf=0.001, iou=0.7, quantize=None, plots=False, verbose=False, workers=0, project=os.path.join(work, "val"),
        name=tag, exist_ok=True)
    out = {**ours, "photos": len(photos), "primary_face_recall": primary_face_recall(pipeline, conf),
           "ultralytics_same_predictions": check,
           "max_abs_diff": max(abs(ours[k] - check[k]) for k in ("map50", "map50_95")),
           "ultralytics_val": {"map50": float(val.box.map50), "map50_95": float(val.box.map)},
           "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%s: mAP@0.5 %.4f, mAP@0.5:0.95 %.4f, primary-face recall %.4f on %d %s photos", tag, out["map50"],
             out["map50_95"], out["primary_face_recall"], out["photos"], split)
    return out


def table4(source: dict[str, Any], before: dict[str, Any] | None, after: dict[str, Any], split: str,
           persons: int, conf: float) -> str:
    """The paper's Table 4 (percent), plus primary-face recall, and where the figures come from."""
    def row(name: str, m: dict[str, Any] | None) -> str:
        if m is None:
            return f"| {name} | — | — | — |"
        return (f"| {name} | {100 * m['map50_95']:.2f} | {100 * m['map50']:.2f} | "
                f"{100 * m['primary_face_recall']:.2f} |")

    val = after["ultralytics_val"]
    start, end = (("before fine-tuning", "fine-tuned") if source["kind"] == "weights"
                  else ("untrained: built from the YAML", "trained"))
    lines = ["| Model | mAP@0.5:0.95 | mAP@0.5 | primary-face recall |", "|---|---:|---:|---:|",
             row(f"{source['name']} ({start})", before), row(f"{source['name']} ({end})", after), "",
             f"Held-out `{split}` split: {after['photos']} photos of {persons} person(s), none of them in training. "
             f"Primary-face recall: photos whose primary face (score ≥ {conf}) overlaps the annotated face with "
             "IoU ≥ 0.5. mAP computed by kemo and, on the same predictions, by ultralytics' matcher and "
             f"`ap_per_class`: largest difference {max(m['max_abs_diff'] for m in (before, after) if m):.1e}. "
             "ultralytics' own `val` of the split (its letterboxing): after training, mAP@0.5:0.95 "
             f"{100 * val['map50_95']:.2f}, mAP@0.5 {100 * val['map50']:.2f}."]
    return "\n".join(lines) + "\n"


def _fingerprint(cfg: TrainDetectorConfig, source: dict[str, Any], manifest: Any) -> dict[str, Any]:
    # the input settings change the manifest (hashed below) or only which broken photos are left out of the export
    ignored = ("input", "output", "weights", "weights_sha256", "model", "work", "gpus", "cpus", "workers", "device",
               "max_bytes", "links")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    settings["train_args"] = train_args(cfg)
    return {"settings": settings, "source_sha256": source["sha256"],
            # the photos and their boxes (what the detector learns from), whatever the row order
            "manifest_sha256": outputs.table_sha256(manifest.select(["image_id", "uri", "split", "box"]),
                                                    sort_by="image_id")}


def run(cfg: TrainDetectorConfig, callbacks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export, evaluate, fine-tune, evaluate and commit; returns ``meta.json``'s content. ``callbacks`` are
    ultralytics trainer callbacks ({event: fn}), e.g. for progress reporting."""
    from kemo.data import aihub

    t0 = time.perf_counter()
    if cfg.smoke_test:
        cfg = dataclasses.replace(cfg, images=min(cfg.images, SMOKE["images"]), epochs=SMOKE["epochs"],
                                  imgsz=min(cfg.imgsz, SMOKE["imgsz"]))
    train_args(cfg)  # fail now, not after the export
    source = resolve_source(cfg)
    manifest = aihub.load_or_index(cfg.input, storage.join(cfg.output, "index"), seed=cfg.seed, inputs=cfg)
    fingerprint = _fingerprint(cfg, source, manifest)
    out = outputs.Output(cfg.output, KIND)
    manifest_before = out.manifest()
    if manifest_before is not None:
        if out.current(fingerprint) is None:
            raise ValueError(f"{cfg.output} holds a detector trained with other inputs or settings; "
                             "use a new --output")
        log.info("%s already holds this detector: nothing to do", cfg.output)
        return out.read_json("meta.json")
    with out.lease() as lease:
        return _train_and_commit(cfg, out, lease, source, manifest, fingerprint, callbacks, t0)


def _train_and_commit(cfg: TrainDetectorConfig, out: outputs.Output, lease: outputs.Lease, source: dict[str, Any],
                      manifest: Any, fingerprint: dict[str, Any], callbacks: dict[str, Any] | None, t0: float
                      ) -> dict[str, Any]:

    work, device = work_dir(cfg), resolve_device(cfg.device)
    dataset = os.path.join(work, "dataset")
    images = photos_to_use(cfg.images, manifest.column("box").to_pylist())
    if images < cfg.images:
        log.warning("%s: %d photos have a face box, fewer than --images %d: splitting those 8:1:1", cfg.input, images,
                    cfg.images)
    exported = export(ExportConfig(input=cfg.input, output=dataset, counts=split_counts(images),
                                   max_side=cfg.max_side or 2 * cfg.imgsz, seed=cfg.seed, max_bytes=cfg.max_bytes),
                      manifest=manifest)
    counts = exported["counts"]
    if counts["train"] == 0 or counts["val"] == 0 or counts["test"] == 0:
        raise ValueError(f"too few photos with a face box for a train/val/test split: {counts}")
    # the selection, its boxes (index.parquet) and the photos' size (the export stamp)
    dataset_sha = _sha256(b"".join(Path(dataset, name).read_bytes() for name in ("index.parquet", STAMP)))
    data_yaml = os.path.join(dataset, "data.yaml")

    before = None
    if source["kind"] == "weights":
        before = evaluate(source["path"], dataset, "test", cfg.imgsz, device, cfg.conf, work, "before")
    trained = train(cfg, source, data_yaml, work, device, dataset_sha, callbacks)
    after = evaluate(trained["best"], dataset, "test", cfg.imgsz, device, cfg.conf, work, "after")

    with open(trained["best"], "rb") as f:
        best = f.read()
    sha = _sha256(best)
    import torch
    import ultralytics

    meta = {
        "weights": {"file": "best.pt", "sha256": sha, "bytes": len(best)},
        "source": {k: v for k, v in source.items() if k != "path"},
        "data": {"input": cfg.input, "dataset": dataset, "counts": counts, "persons": exported["persons"],
                 "export_statuses": exported["statuses"], "dataset_sha256": dataset_sha},
        "train": {k: v for k, v in trained.items() if k != "best"},
        "metrics": {"split": "test", "before": before, "after": after},
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(cfg),
        "versions": {"kemo": code_version(), "ultralytics": ultralytics.__version__, "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t0, 1),
        "use": f"jobs/preprocess.py --detector yolo --weights {storage.join(cfg.output, 'best.pt')} "
               f"--weights-sha256 {sha}",
    }
    out.uncommit()
    files = [out.write_file("best.pt", best),
             out.write_file("best.pt.sha256", f"{sha}  best.pt\n".encode()),
             out.write_json("meta.json", meta),
             out.write_file("table4.md",
                                table4(source, before, after, "test", exported["persons"]["test"], cfg.conf).encode())]
    lease.check()
    out.commit(files, dataclasses.asdict(cfg), fingerprint)
    log.info("detector committed to %s (best.pt sha256 %s) in %.0f s", cfg.output, sha[:12], meta["seconds"])
    return meta

