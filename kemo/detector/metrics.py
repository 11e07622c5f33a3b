"""Detection metrics: mAP@0.5 and mAP@0.5:0.95 for one class, and primary-face recall. Pure numpy, no ultralytics.

The definitions are the ones ultralytics' validator reports (so our figures can be checked against it on the same
predictions): detections are taken in descending score; at each IoU threshold a detection is a true positive when its
best still-unclaimed annotated face overlaps it at least that much, and it then claims that face. AP is the area
under the precision envelope sampled at 101 recall points (trapezoids), after the sentinels (recall 0, precision 1)
and (recall 1, precision 0). mAP@0.5:0.95 averages the ten thresholds 0.50, 0.55 … 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kemo.crop import iou, primary_face

THRESHOLDS = np.linspace(0.5, 0.95, 10)


@dataclass
class Predictions:
    """One photo's detections (xyxy, any order) and its annotated faces (xyxy), in the same pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    truth: np.ndarray


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU matrix of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray,
          thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(scores sorted descending, (N, T) true-positive matrix) for one photo."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    boxes, scores = np.asarray(boxes, np.float64).reshape(-1, 4)[order], np.asarray(scores, np.float64)[order]
    tp = np.zeros((len(boxes), len(thresholds)), bool)
    if len(boxes) == 0 or len(truth) == 0:
        return scores, tp
    overlaps = box_iou(truth, boxes)  # (faces, detections)
    for t, threshold in enumerate(thresholds):
        claimed = np.zeros(len(truth), bool)
        for d in range(len(boxes)):
            candidates = np.where(claimed, -1.0, overlaps[:, d])
            best = int(np.argmax(candidates))
            if candidates[best] >= threshold:
                tp[d, t] = claimed[best] = True
    return scores, tp


def average_precision(tp: np.ndarray, scores: np.ndarray, n_truth: int) -> np.ndarray:
    """AP at each threshold (column of ``tp``) over all photos' detections pooled."""
    if n_truth == 0 or len(scores) == 0:
        return np.zeros(tp.shape[1])
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(tp[order], axis=0)
    recall = hits / n_truth
    precision = hits / np.arange(1, len(scores) + 1)[:, None]
    grid = np.linspace(0, 1, 101)
    out = np.zeros(tp.shape[1])
    for t in range(tp.shape[1]):
        r = np.concatenate(([0.0], recall[:, t], [recall[-1, t]], [1.0]))
        p = np.concatenate(([1.0], precision[:, t], [0.0], [0.0]))
        p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
        y = np.interp(grid, r, p)
        out[t] = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(grid)))
    return out


def detection_map(photos: list[Predictions]) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 of a single-class detector over photos."""
    scores, tps, n_truth = [], [], 0
    for p in photos:
        s, tp = match(p.boxes, p.scores, p.truth)
        scores.append(s)
        tps.append(tp)
        n_truth += len(p.truth)
    ap = average_precision(np.concatenate(tps) if tps else np.zeros((0, len(THRESHOLDS)), bool),
                           np.concatenate(scores) if scores else np.zeros(0), n_truth)
    return {"map50": float(ap[0]), "map50_95": float(ap.mean()), "faces": n_truth,
            "detections": int(sum(len(s) for s in scores))}


def primary_face_recall(photos: list[Predictions], conf: float, min_iou: float = 0.5) -> float:
    """Share of photos whose primary face (kemo.crop.primary_face, among detections scoring ≥ ``conf``) overlaps
    the annotated face by at least ``min_iou``. A photo without a detection is a miss."""
    if not photos:
        return 0.0
    hits = 0
    for p in photos:
        keep = np.asarray(p.scores) >= conf
        boxes, scores = np.asarray(p.boxes).reshape(-1, 4)[keep], np.asarray(p.scores)[keep]
        k = primary_face(boxes, scores)
        if k is not None and len(p.truth) and max(iou(boxes[k], t) for t in p.truth) >= min_iou:
            hits += 1
    return hits / len(photos)


def ultralytics_map(photos: list[Predictions]) -> dict[str, float]:
    """The same figures computed by ultralytics' own validator code (its matcher and ``ap_per_class``) on the same
    predictions: the check on :func:`detection_map`."""
    import torch
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import ap_per_class
    from ultralytics.utils.metrics import box_iou as ul_box_iou

    validator = DetectionValidator()
    tps, confs, n_truth = [], [], 0
    for p in photos:
        order = np.argsort(-np.asarray(p.scores), kind="stable")
        boxes = torch.as_tensor(np.asarray(p.boxes, np.float64).reshape(-1, 4)[order])
        conf = np.asarray(p.scores, np.float64)[order]
        truth = torch.as_tensor(np.asarray(p.truth, np.float64).reshape(-1, 4))
        n_truth += len(truth)
        if len(boxes) and len(truth):
            correct = validator.match_predictions(torch.zeros(len(boxes)), torch.zeros(len(truth)),
                                                  ul_box_iou(truth, boxes)).numpy()
        else:
            correct = np.zeros((len(boxes), 10), bool)
        tps.append(correct)
        confs.append(conf)
    tp, conf = np.concatenate(tps), np.concatenate(confs)
    ap = ap_per_class(tp, conf, np.zeros(len(conf)), np.zeros(n_truth))[5]
    if ap.size == 0:
        return {"map50": 0.0, "map50_95": 0.0}
    return {"map50": float(ap[0, 0]), "map50_95": float(ap[0].mean())}
