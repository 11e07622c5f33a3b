"""The loss ablation of ``table4.md`` (``jobs/train_detector.py --ablation``): the same model, data, seed and epochs
trained with the stock loss and with each of YOLO-FaceV2's terms added (:data:`VARIANTS`), each row with Table 4's
mAP, recall on small faces and on overlapping pairs of faces (:func:`crowd_recall`), and the time per epoch.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from kemo import storage
from kemo.detector.evaluate import Evaluation
from kemo.detector.loss import FACE_V2, STOCK, LossWeights
from kemo.detector.metrics import Predictions, box_iou

VARIANTS = {
    "stock": STOCK,
    "nwd": LossWeights(nwd=FACE_V2.nwd),
    "slide": LossWeights(slide=True),
    "repulsion": LossWeights(rep_gt=FACE_V2.rep_gt, rep_box=FACE_V2.rep_box),
    "faceV2": FACE_V2,
}
SMALL_PX = 32  # a small face: under 32² px at the detector's input (COCO's "small")
MIN_IOU = 0.5  # a face is found by a detection overlapping it this much (one detection per face)


def variants(names: str) -> dict[str, LossWeights]:
    """``--ablation``'s comma-separated names (``all`` for every one) as losses, in :data:`VARIANTS`' order."""
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    wanted = set(VARIANTS) if "all" in wanted else wanted
    unknown = wanted - set(VARIANTS)
    if unknown:
        raise ValueError(f"--ablation {','.join(sorted(unknown))}: choose from all, {', '.join(VARIANTS)}")
    return {name: weights for name, weights in VARIANTS.items() if name in wanted}


def describe(weights: LossWeights) -> str:
    """``stock`` or the terms added to it, e.g. ``NWD 0.2 + slide + RepGT 0.5 + RepBox 0.5``."""
    terms = [f"NWD {weights.nwd:g}" if weights.nwd else "", "slide" if weights.slide else "",
             f"RepGT {weights.rep_gt:g}" if weights.rep_gt else "",
             f"RepBox {weights.rep_box:g}" if weights.rep_box else ""]
    return " + ".join(t for t in terms if t) or "stock"


@dataclass
class CrowdRecall:
    """Recall at the pipeline's settings on the faces YOLO-FaceV2's losses aim at. None where the split has none."""

    small_faces: int  # annotated faces under SMALL_PX² at the detector's input
    small_recall: float | None
    pairs: int  # pairs of annotated faces of one photo whose boxes overlap (IoU > 0)
    pair_recall: float | None  # share of those pairs with both faces found


@dataclass
class AblationRow:
    """One loss trained and evaluated: ``meta.json``'s ``ablation``."""

    name: str
    loss: LossWeights
    after: Evaluation
    crowd: CrowdRecall
    seconds_per_epoch: float  # ultralytics' wall time per epoch, its validation included
    cpu_seconds_per_epoch: float | None  # the training process's CPU time per epoch (Training's), validation included
    main: bool  # the loss of the committed best.pt


def found(photo: Predictions, conf: float) -> np.ndarray:
    """Which annotated faces of a photo a detection (score ≥ ``conf``) finds: detections in descending score each
    claim the unclaimed face they overlap most, if by ≥ :data:`MIN_IOU`."""
    keep = np.asarray(photo.scores) >= conf
    boxes = np.asarray(photo.boxes, np.float64).reshape(-1, 4)[keep]
    order = np.argsort(-np.asarray(photo.scores)[keep], kind="stable")
    claimed = np.zeros(len(photo.truth), bool)
    if len(boxes) == 0 or len(photo.truth) == 0:
        return claimed
    overlaps = box_iou(photo.truth, boxes[order])  # (faces, detections)
    for d in range(overlaps.shape[1]):
        candidates = np.where(claimed, -1.0, overlaps[:, d])
        best = int(np.argmax(candidates))
        if candidates[best] >= MIN_IOU:
            claimed[best] = True
    return claimed


def crowd_recall(photos: list[Predictions], scales: list[float], conf: float) -> CrowdRecall:
    """Recall on small faces and on overlapping pairs; ``scales[i]`` takes photo i's pixels to the detector's input."""
    small_hits, pair_hits = [], []
    for photo, scale in zip(photos, scales):
        truth = np.asarray(photo.truth, np.float64).reshape(-1, 4)
        hit = found(photo, conf)
        side = np.sqrt(np.clip(truth[:, 2] - truth[:, 0], 0, None) * np.clip(truth[:, 3] - truth[:, 1], 0, None))
        small_hits += list(hit[side * scale < SMALL_PX])
        i, j = np.nonzero(np.triu(box_iou(truth, truth) > 0, 1))
        pair_hits += list(hit[i] & hit[j])
    return CrowdRecall(len(small_hits), float(np.mean(small_hits)) if small_hits else None,
                       len(pair_hits), float(np.mean(pair_hits)) if pair_hits else None)


def input_scales(dataset: str, split: str, imgsz: int) -> list[float]:
    """Each photo's scale to the detector's letterboxed input, in the order :func:`kemo.detector.evaluate.predict`
    reads the split."""
    from kemo.image import probe

    rows = storage.read_parquet(os.path.join(dataset, "index.parquet")).to_pylist()
    sizes = [probe(storage.read_bytes(os.path.join(dataset, "images", split, f"{r['file']}.jpg")))[0]
             for r in rows if r["split"] == split]
    return [imgsz / max(s.width, s.height) for s in sizes]


def seconds_per_epoch(run_dir: str) -> float:
    """Mean wall time per epoch from ultralytics' ``results.csv`` (its ``time`` restarts when a run resumes)."""
    with open(os.path.join(run_dir, "results.csv")) as f:
        times = [float(r["time"]) for r in csv.DictReader(f)]
    steps = [t - prev if t >= prev else t for prev, t in zip([0.0, *times], times)]
    return float(np.mean(steps)) if steps else 0.0


def table(rows: list[AblationRow], split: str, imgsz: int, conf: float) -> str:
    """The ablation section of ``table4.md`` (percent)."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}"

    lines = ["| Loss | terms | mAP@0.5:0.95 | mAP@0.5 | small-face recall | overlapping-pair recall | s/epoch | "
             "CPU s/epoch |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = "—" if r.cpu_seconds_per_epoch is None else f"{r.cpu_seconds_per_epoch:.1f}"
        lines.append(f"| {r.name}{' (best.pt)' if r.main else ''} | {describe(r.loss)} | {pct(r.after.map50_95)} | "
                     f"{pct(r.after.map50)} | {pct(r.crowd.small_recall)} | {pct(r.crowd.pair_recall)} | "
                     f"{r.seconds_per_epoch:.1f} | {cpu} |")
    c = rows[0].crowd
    lines += ["", f"Same model, data, seed and epochs for every row; held-out `{split}` split. Recall at the "
              f"pipeline's settings (score ≥ {conf}, NMS IoU 0.5), a face found by one detection with IoU ≥ "
              f"{MIN_IOU}: {c.small_faces} small faces (under {SMALL_PX}² px at --imgsz {imgsz}) and {c.pairs} "
              "overlapping pairs (both faces found). s/epoch: ultralytics' wall time per epoch; CPU s/epoch: the "
              "training process's CPU time per epoch (on a shared machine the steadier of the two); both with "
              "validation."]
    return "\n".join(lines) + "\n"
