"""Training data for the classifiers: crop shards → uint8 arrays at the training size, decoded once.

150 epochs must not decode the same JPEGs 150 times (decoding, not the GPU, would set the pace): every usable crop is
decoded and resized here, once, into one (N, S, S, 3) uint8 array per split (49k crops at 224² are ~7.4 GB), which
the trainer keeps in memory.
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

from kemo import outputs
from kemo.classes import CLASS_NAMES
from kemo.schema import CROP

COLUMNS = ["image_id", "split", "label", "agree_n", "status", "crop"]


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64 class indices, kemo.classes order
    image_ids: list[str]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB → (size, size, 3): area-averaged when shrinking. Training and labelling both resize here."""
    if image.shape[:2] == (size, size):
        return image
    shrink = size < min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def decode_crop(data: bytes | None, size: int) -> np.ndarray | None:
    """A crop's JPEG → (size, size, 3) uint8 RGB, or None when it does not decode."""
    image = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR_RGB) if data else None
    return None if image is None else resize_square(image, size)


def load_splits(shards: str, image_size: int = 224, min_agree: int = 2,
                jobs: int = 0) -> tuple[dict[str, Split], dict[str, Any]]:
    """The train/val/test arrays of one committed crop output, and a report of what was kept and left out."""
    table = outputs.Output(shards, outputs.CROPS).read_table("shards", COLUMNS, CROP)
    meta = table.drop_columns(["crop"]).to_pylist()  # small columns as Python; the JPEGs stay in Arrow
    crops = table.column("crop")
    left_out: Counter[str] = Counter()
    usable: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(meta):
        if r["status"] != "ok":
            left_out[f"status {r['status']}"] += 1
        elif r["label"] is None or r["label"] < 0:
            left_out["unknown label"] += 1
        elif (r["agree_n"] or 0) < min_agree:
            left_out[f"fewer than {min_agree} annotators agree"] += 1
        elif r["split"] in usable:
            usable[r["split"]].append(i)
        else:
            left_out[f"split {r['split']}"] += 1
    splits: dict[str, Split] = {}
    for name, rows in usable.items():
        rows.sort(key=lambda i: meta[i]["image_id"])  # the shards' row order varies between preprocessing runs
        images = np.empty((len(rows), image_size, image_size, 3), np.uint8)  # decoded straight into place

        def fill(k: int, rows: list[int] = rows, images: np.ndarray = images) -> bool:
            pixels = decode_crop(crops[rows[k]].as_py(), image_size)
            if pixels is None:
                return False
            images[k] = pixels
            return True

        with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:  # cv2 decodes and resizes without the GIL
            ok = np.fromiter(pool.map(fill, range(len(rows))), bool, count=len(rows))
        if not ok.all():
            left_out["crop does not decode"] += int((~ok).sum())
            images = images[ok]
        kept = [i for i, good in zip(rows, ok) if good]
        splits[name] = Split(images, np.asarray([meta[i]["label"] for i in kept], np.int64),
                             [meta[i]["image_id"] for i in kept])
    report = {"shards": shards, "rows": len(meta), "image_size": image_size, "min_agree": min_agree,
              "left_out": dict(sorted(left_out.items())),
              "splits": {name: {"photos": len(s.labels), "per_class": {CLASS_NAMES[c]: int((s.labels == c).sum())
                                                                       for c in range(len(CLASS_NAMES))}}
                         for name, s in splits.items()}}
    return splits, report
