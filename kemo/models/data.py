"""Training data for the classifiers (issue 5): crop shards → uint8 arrays at the training size, decoded once.

150 epochs must not decode the same JPEGs 150 times (DESIGN §6): every usable crop is decoded and resized here, once,
into one (N, S, S, 3) uint8 array per split (49k crops at 224² are ~7.4 GB), which the trainer keeps in memory.
Usable = status ``ok``, a known label (not -1), and at least ``min_agree`` annotators behind it; what was left out
and why is counted in the returned report.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from kemo.classes import CLASS_NAMES

COLUMNS = ["image_id", "split", "label", "agree_n", "status", "crop"]


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64 class indices, kemo.classes order
    image_ids: list[str]


def decode_crop(data: bytes, size: int) -> np.ndarray | None:
    """A crop's JPEG → (size, size, 3) uint8 RGB (area-averaged when shrinking), or None when it does not decode."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        return None
    if image.shape[:2] != (size, size):
        shrink = size < min(image.shape[:2])
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image


def load_splits(shards: str, image_size: int = 224, min_agree: int = 2,
                jobs: int = 0) -> tuple[dict[str, Split], dict[str, Any]]:
    """The train/val/test arrays of one committed crop output, and a report of what was kept and left out."""
    from kemo.preprocess import read_crops

    rows = read_crops(shards, COLUMNS).to_pylist()
    left_out: Counter[str] = Counter()
    usable = []
    for r in rows:
        if r["status"] != "ok":
            left_out[f"status {r['status']}"] += 1
        elif r["label"] is None or r["label"] < 0:
            left_out["unknown label"] += 1
        elif (r["agree_n"] or 0) < min_agree:
            left_out[f"fewer than {min_agree} annotators agree"] += 1
        else:
            usable.append(r)
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:  # cv2 decodes and resizes without the GIL
        pixels = list(pool.map(lambda r: decode_crop(r["crop"], image_size), usable))
    splits: dict[str, Split] = {}
    for name in ("train", "val", "test"):
        picked = [(r, p) for r, p in zip(usable, pixels) if r["split"] == name and p is not None]
        images = (np.stack([p for _, p in picked]) if picked
                  else np.zeros((0, image_size, image_size, 3), np.uint8))
        splits[name] = Split(images, np.asarray([r["label"] for r, _ in picked], np.int64),
                             [r["image_id"] for r, _ in picked])
    undecodable = sum(p is None for p in pixels)
    if undecodable:
        left_out["crop does not decode"] += undecodable
    report = {"shards": shards, "rows": len(rows), "image_size": image_size, "min_agree": min_agree,
              "left_out": dict(sorted(left_out.items())),
              "splits": {name: {"photos": len(s.labels), "per_class": {CLASS_NAMES[c]: int((s.labels == c).sum())
                                                                       for c in range(len(CLASS_NAMES))}}
                         for name, s in splits.items()}}
    return splits, report
