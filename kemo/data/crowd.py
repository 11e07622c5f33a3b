"""Generated crowds (``python -m kemo.data.synth --crowd``): passers-by drawn behind the subject of a generated photo,
some partly hidden by the subject or by each other, some small, so the detector is measured where YOLO-FaceV2's
losses aim; and every face as a YOLO label of the detector's dataset (:func:`add_labels`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from kemo import storage
from kemo.classes import NUM_CLASSES

SMALL = (0.03, 0.075)  # small faces' height, share of the photo's longer side: 10-24 px at --imgsz 320 on 640x480
MID = (0.1, 0.2)  # the height of a pair of mid-sized faces that overlap each other
NEAR = (0.6, 0.9)  # a neighbour's height relative to the subject's
SHOWN = (0.15, 0.4)  # how much of a neighbour's width lies over the face it stands behind
ASPECT = (0.74, 0.84)  # face width / height, as synth's persons
TRIES = 30


def _inside(box: list[float], w: int, h: int, share: float = 0.8) -> bool:
    """At least ``share`` of the box lies in the frame."""
    iw = max(0.0, min(box[2], w) - max(box[0], 0.0))
    ih = max(0.0, min(box[3], h) - max(box[1], 0.0))
    return iw * ih >= share * (box[2] - box[0]) * (box[3] - box[1])


def _free(box: list[float], taken: list[list[float]]) -> bool:
    return all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken)


def _somewhere(rng: np.random.Generator, w: int, h: int, fh: float, taken: list[list[float]]) -> list[float] | None:
    """A face of height ``fh`` in the frame, clear of every taken box, or None after :data:`TRIES` tries."""
    fw = fh * rng.uniform(*ASPECT)
    for _ in range(TRIES):
        x, y = rng.uniform(0, max(1.0, w - fw)), rng.uniform(0, max(1.0, h - fh))
        box = [x, y, x + fw, y + fh]
        if _free(box, taken):
            return box
    return None


def _beside(rng: np.random.Generator, w: int, h: int, front: list[float], fh: float,
            taken: list[list[float]]) -> list[float] | None:
    """A face of height ``fh`` standing partly behind ``front``: a :data:`SHOWN` share of its width over it, on the
    side with more room first, mostly in the frame and clear of ``taken``; None where neither side has room."""
    fw = fh * rng.uniform(*ASPECT)
    y = (front[1] + front[3]) / 2 - fh / 2 + rng.uniform(-0.15, 0.15) * (front[3] - front[1])
    over = rng.uniform(*SHOWN) * fw
    right = w - front[2] > front[0]
    for side in (right, not right):
        x = front[2] - over if side else front[0] + over - fw
        box = [x, y, x + fw, y + fh]
        if _inside(box, w, h) and _free(box, taken):
            return box
    return None


def draw_crowd(img: np.ndarray, subject: list[float], taken: list[list[float]], seed: int,
               index: int) -> list[list[float]]:
    """Draw passers-by into ``img`` (RGB, upright) before the subject's face is drawn over them: 0-2 neighbours
    partly behind the subject, half the time a pair of mid-sized faces one partly behind the other, and 2-6 small
    faces, clear of ``taken`` (distractors). Returns their boxes, clipped to the frame. Its own generator
    (``[seed, 19, index]``): a photo without a crowd draws nothing from the photo's generator."""
    from kemo.data.synth import _person, draw_face  # synth imports this module only when it draws a crowd

    rng = np.random.default_rng([seed, 19, index])
    h, w = img.shape[:2]
    side = max(w, h)
    placed: list[tuple[list[float], int]] = []  # (box, depth): deeper is drawn first
    taken = [list(subject), *taken]
    for _ in range(int(rng.integers(2, 7))):
        box = _somewhere(rng, w, h, rng.uniform(*SMALL) * side, taken)
        if box is not None:
            taken.append(box)
            placed.append((box, 3))
    if rng.random() < 0.5:
        front = _somewhere(rng, w, h, rng.uniform(*MID) * side, taken)
        back = front and _beside(rng, w, h, front, (front[3] - front[1]) * rng.uniform(*NEAR), taken)
        if back:
            taken += [front, back]
            placed += [(back, 2), (front, 1)]
    for _ in range(int(rng.choice(3, p=[0.3, 0.5, 0.2]))):
        box = _beside(rng, w, h, subject, (subject[3] - subject[1]) * rng.uniform(*NEAR), taken[1:])
        if box is not None:
            taken.append(box)
            placed.append((box, 1))
    for box, _ in sorted(placed, key=lambda p: -p[1]):
        draw_face(img, tuple(box), int(rng.integers(0, NUM_CLASSES)), _person(seed + 2, int(rng.integers(0, 10**6))),
                  rng)
    return [[float(v) for v in np.clip(box, 0, [w, h, w, h])] for box, _ in placed]


# --------------------------------------------------------------------------------------------------- labels


def crowd_faces(root: str) -> dict[str, dict[str, Any]] | None:
    """For a corpus root generated with ``--crowd``: each photo's other faces (``boxes``, upright frame) and its upright
    ``width`` and ``height``, by image id; None for any other input (the real corpus, an index, a plain corpus)."""
    try:
        summary = storage.read_json(storage.join(root, "_synth", "summary.json"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    if not summary.get("config", {}).get("crowd"):
        return None
    truth = storage.read_parquet(storage.join(root, "_synth", "truth.parquet"))
    return {t["image_id"]: {"boxes": t["distractor_boxes"], "width": t["width"], "height": t["height"]}
            for t in truth.select(["image_id", "distractor_boxes", "width", "height"]).to_pylist()}


def add_labels(dataset: str, faces: dict[str, dict[str, Any]]) -> str:
    """One YOLO line per face for each photo of an exported dataset (``index.parquet``, ``labels/``): the export's own
    line (the subject, from the annotators' consensus) and one per other face in ``faces``. Rewrites the label files;
    a second call writes the same bytes. Returns the SHA-256 of the lines added, which identifies the labels."""
    from kemo.detector.export import yolo_line

    digest = hashlib.sha256()
    for row in storage.read_parquet(os.path.join(dataset, "index.parquet")).to_pylist():
        path = os.path.join(dataset, "labels", row["split"], f"{row['file']}.txt")
        with open(path) as f:
            subject = f.readline().strip()
        other = faces.get(row["image_id"], {"boxes": [], "width": 1, "height": 1})
        lines = [yolo_line(b, other["width"], other["height"]) for b in other["boxes"]]
        lines = [line for line in lines if line is not None]
        storage.write_bytes(path, "\n".join([subject, *lines, ""]).encode())
        digest.update(json.dumps([row["image_id"], lines]).encode())
    return digest.hexdigest()
