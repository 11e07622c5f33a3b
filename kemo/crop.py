"""Face box → square crop with a margin of background, never distorting the face (the paper's stage 2). No Ray here.

Boxes are xyxy pixels of the full-resolution upright frame. The crop region is a square centred on the face whose side
is the face's longer side plus ``margin`` of it on each side; parts beyond the photo are padded, and the square is
resized to ``size``×``size``, so the face keeps its aspect ratio.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PAD_VALUE = (0, 0, 0)


def crop_region(box: list[float] | np.ndarray, margin: float) -> tuple[int, int, int]:
    """(x1, y1, side): the integer square around ``box``; it contains the box, side >= longer box side × (1 + 2m)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side = max(1, math.ceil(side))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # the integer square must still hold the box after rounding
    left, top = min(math.floor(cx - side / 2), math.floor(x1)), min(math.floor(cy - side / 2), math.floor(y1))
    side = max(side, math.ceil(x2) - left, math.ceil(y2) - top)
    return left, top, side


def crop_square(image: np.ndarray, region: tuple[int, int, int], size: int,
                factors: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Cut ``region`` (full-resolution coordinates) out of ``image`` (reduced by ``factors``), pad, resize to size².

    The output is exactly (size, size, C) uint8.
    """
    left, top, side = region
    fx, fy = factors
    h, w = image.shape[:2]
    # region in the coordinates of `image`; square in full resolution stays square after scaling by fx ≈ fy
    x1, y1 = left / fx, top / fy
    x2, y2 = (left + side) / fx, (top + side) / fy
    ix1, iy1, ix2, iy2 = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    sub = image[max(0, iy1):min(h, iy2), max(0, ix1):min(w, ix2)]
    pads = (max(0, -iy1), max(0, iy2 - h), max(0, -ix1), max(0, ix2 - w))
    if sub.size == 0:  # region entirely outside the photo
        return np.full((size, size, image.shape[2]), PAD_VALUE, np.uint8)
    if any(pads):
        sub = cv2.copyMakeBorder(sub, *pads, cv2.BORDER_CONSTANT, value=PAD_VALUE)
    interp = cv2.INTER_AREA if sub.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(sub, (size, size), interpolation=interp)


def resize_whole(image: np.ndarray, size: int) -> np.ndarray:
    """The paper's baseline: the whole photo squeezed to size×size (aspect not kept)."""
    interp = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def valid_box(box: object) -> bool:
    """Four finite numbers with positive width and height."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1


def clip_box(box: list[float] | np.ndarray, width: int, height: int) -> list[float] | None:
    """Box clipped to the frame; None if nothing is left."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return [x1, y1, x2, y2]


def ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of (N, 4) xyxy boxes, row by row (0 where a union is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iou(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Intersection over union of two xyxy boxes (0 when either is empty)."""
    return float(ious(np.asarray(a), np.asarray(b))[0])


def ranked_faces(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Face indices, the selfie subject first: by score × sqrt(area), the earlier detection first among equals.

    A poster or passer-by face half the subject's side needs twice its score to win; a large, low-score false
    positive loses to a real face. The one ranking rule: the primary face is the first, ``--all-faces`` rows follow it.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    key = np.asarray(scores, dtype=np.float64).reshape(-1) * np.sqrt(areas)
    return [int(i) for i in np.argsort(-key, kind="stable")]


def primary_face(boxes: np.ndarray, scores: np.ndarray) -> int | None:
    """Index of the selfie subject among detected faces (the first of :func:`ranked_faces`), None without faces."""
    order = ranked_faces(boxes, scores)
    return order[0] if order else None


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
