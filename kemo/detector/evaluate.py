"""The detector's evaluation on a held-out split, as the paper's Table 4 reports it: mAP@0.5 and mAP@0.5:0.95 by kemo
(checked against ultralytics' matcher on the same predictions, and beside ultralytics' own ``val``), and primary-face
recall, with the detector class and settings that ``jobs/preprocess.py --detector yolo`` runs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import cv2
import numpy as np

from kemo import storage
from kemo.detector.metrics import Predictions, detection_map, primary_face_recall, ultralytics_map

log = logging.getLogger(__name__)
MAP_SETTINGS = {"conf": 0.001, "iou": 0.7, "max_det": 300}  # what ultralytics validates with


@dataclass
class Evaluation:
    """One set of weights on one split (``meta.json``'s ``metrics.before`` / ``metrics.after``)."""

    map50: float
    map50_95: float
    faces: int
    detections: int
    photos: int
    primary_face_recall: float
    ultralytics_same_predictions: dict[str, float]  # ultralytics' matcher and ap_per_class on our predictions
    max_abs_diff: float  # between ours and those
    ultralytics_val: dict[str, float]  # ultralytics' own val of the split (its letterboxing)
    seconds: float


def eval_device(device: str) -> str:
    """One torch device for evaluation from a resolved training device: ``0,1`` → ``cuda:0``, ``cuda:1`` stays."""
    first = device.split(",")[0].strip()
    if first in ("cpu", "mps") or first.startswith("cuda"):
        return first
    return f"cuda:{first}"


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
        for settings, out in ((MAP_SETTINGS, for_map), (pipeline, for_pipeline)):
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
             tag: str) -> Evaluation:
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
        conf=MAP_SETTINGS["conf"], iou=MAP_SETTINGS["iou"], quantize=None, plots=False, verbose=False, workers=0,
        project=os.path.join(work, "val"), name=tag, exist_ok=True)
    out = Evaluation(**ours, photos=len(photos), primary_face_recall=primary_face_recall(pipeline, conf),
                     ultralytics_same_predictions=check,
                     max_abs_diff=max(abs(ours[k] - check[k]) for k in ("map50", "map50_95")),
                     ultralytics_val={"map50": float(val.box.map50), "map50_95": float(val.box.map)},
                     seconds=round(time.perf_counter() - t0, 1))
    log.info("%s: mAP@0.5 %.4f, mAP@0.5:0.95 %.4f, primary-face recall %.4f on %d %s photos", tag, out.map50,
             out.map50_95, out.primary_face_recall, out.photos, split)
    return out


def table4(name: str, fine_tuned: bool, before: Evaluation | None, after: Evaluation, split: str, persons: int,
           conf: float) -> str:
    """The paper's Table 4 (percent), plus primary-face recall, and where the figures come from. ``fine_tuned``:
    training started from face weights (else from a model definition)."""
    def row(label: str, m: Evaluation | None) -> str:
        if m is None:
            return f"| {label} | — | — | — |"
        return f"| {label} | {100 * m.map50_95:.2f} | {100 * m.map50:.2f} | {100 * m.primary_face_recall:.2f} |"

    val = after.ultralytics_val
    start, end = ("before fine-tuning", "fine-tuned") if fine_tuned else ("untrained: built from the YAML", "trained")
    lines = ["| Model | mAP@0.5:0.95 | mAP@0.5 | primary-face recall |", "|---|---:|---:|---:|",
             row(f"{name} ({start})", before), row(f"{name} ({end})", after), "",
             f"Held-out `{split}` split: {after.photos} photos of {persons} person(s), none of them in training. "
             f"Primary-face recall: photos whose primary face (score ≥ {conf}) overlaps the annotated face with "
             "IoU ≥ 0.5. mAP computed by kemo and, on the same predictions, by ultralytics' matcher and "
             f"`ap_per_class`: largest difference {max(m.max_abs_diff for m in (before, after) if m):.1e}. "
             "ultralytics' own `val` of the split (its letterboxing): after training, mAP@0.5:0.95 "
             f"{100 * val['map50_95']:.2f}, mAP@0.5 {100 * val['map50']:.2f}."]
    return "\n".join(lines) + "\n"
