"""Face detectors behind one interface (DESIGN §3): ``yolo``, ``haar``, ``none`` and ``annotations``.

``prepare(frame, factors)`` runs in decoder threads and turns one upright RGB frame into the detector's input plus the
full-resolution pixels per input pixel; ``detect(inputs, rows)`` runs once per batch in the actor and returns boxes
and scores in input pixels. Weights load once, in ``__init__`` (the actor's constructor under Ray Data).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from kemo import storage
from kemo.crop import valid_box

log = logging.getLogger(__name__)


@dataclass
class Faces:
    boxes: np.ndarray  # (N, 4) float32 xyxy in the detector input's pixels
    scores: np.ndarray  # (N,) float32


NO_FACES = Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """Shrink so that the longer side is at most ``side`` (never enlarge)."""
    h, w = image.shape[:2]
    r = side / max(h, w)
    if r >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA)


def _factors(image: np.ndarray, small: np.ndarray, factors: tuple[float, float]) -> tuple[float, float]:
    return factors[0] * image.shape[1] / small.shape[1], factors[1] * image.shape[0] / small.shape[0]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(uri: str, sha256: str | None = None, cache_dir: str | None = None) -> tuple[str, str]:
    """(local path, SHA-256) of a weights file given as a path or an ``s3://`` URI; checked against ``sha256``.

    S3 weights are cached under their content hash; given ``sha256``, a cached copy is used without downloading.
    """
    if storage.is_s3(uri):
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "kemo", "weights")
        cached = os.path.join(cache_dir, f"{(sha256 or '').lower()[:16]}-{os.path.basename(uri)}")
        if sha256 and os.path.isfile(cached) and sha256_file(cached) == sha256.lower():
            return cached, sha256.lower()  # known by hash: no download
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(cache_dir, f"{digest[:16]}-{os.path.basename(uri)}")
        if not os.path.exists(path):
            storage.write_bytes(path, data)
    else:
        path = os.path.abspath(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {uri}")
        digest = sha256_file(path)
    if sha256 and digest != sha256.lower():
        raise ValueError(f"weights {uri} have SHA-256 {digest}, expected {sha256}: refusing to load them")
    return path, digest


class YoloDetector:
    """Ultralytics YOLO face weights, batched, letterboxed to ``imgsz``, half precision on GPU."""

    name = "yolo"
    whole_photo = False

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None, imgsz: int = 640,
                 device: str = "auto", conf: float = 0.25, iou: float = 0.5, max_det: int = 30, **_: Any):
        if not weights:
            raise ValueError("--detector yolo needs --weights PATH_OR_URI (no weights are downloaded)")
        from ultralytics import YOLO

        import kemo.detector.modules  # noqa: F401  (registers MultiSEAM/C3RFEM: YOLO-Face-v2-style checkpoints load)

        path, self.sha256 = fetch_weights(weights, weights_sha256)
        self.device = torch_device(device)
        self.half = self.device.startswith("cuda")
        self.model = YOLO(path, task="detect")
        self.imgsz, self.conf, self.iou, self.max_det = imgsz, conf, iou, max_det
        log.info("yolo weights %s (sha256 %s) on %s%s", weights, self.sha256[:12], self.device,
                 " fp16" if self.half else "")

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
        small = _fit(image, self.imgsz)
        return cv2.cvtColor(small, cv2.COLOR_RGB2BGR), _factors(image, small, factors)  # ultralytics takes BGR

    def detect(self, inputs: list[np.ndarray], rows: list[dict]) -> list[Faces]:
        # quantize=16 is fp16 in ultralytics 8.4 (its `half` flag is deprecated); None keeps fp32
        results = self.model.predict(inputs, imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                     quantize=16 if self.half else None, device=self.device, verbose=False,
                                     max_det=self.max_det)
        return [Faces(r.boxes.xyxy.cpu().numpy().astype(np.float32), r.boxes.conf.cpu().numpy().astype(np.float32))
                for r in results]


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (the paper's OpenCV baseline), on a gray frame of ``input_side``."""

    name = "haar"
    whole_photo = False
    CASCADE = "haarcascade_frontalface_default.xml"

    def __init__(self, input_side: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face: float = 0.08, **_: Any):
        self.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, self.CASCADE))
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load {self.CASCADE}")
        self.input_side, self.scale_factor, self.min_neighbors, self.min_face = (
            input_side, scale_factor, min_neighbors, min_face)

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
        small = _fit(image, self.input_side)
        return cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)), _factors(image, small, factors)

    def detect(self, inputs: list[np.ndarray], rows: list[dict]) -> list[Faces]:
        out = []
        for gray in inputs:
            m = max(8, int(self.min_face * min(gray.shape)))
            rects, _, weights = self.cascade.detectMultiScale3(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(m, m),
                outputRejectLevels=True)
            if len(rects) == 0:
                out.append(NO_FACES)
                continue
            r = np.asarray(rects, np.float32).reshape(-1, 4)
            boxes = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)
            # stage-sum weights, not probabilities: squash to (0, 1) so they rank like scores
            scores = 1 / (1 + np.exp(-np.asarray(weights, np.float32).reshape(-1)))
            out.append(Faces(boxes, scores))
        return out


class WholePhoto:
    """No detection: the whole photo resized to the crop size (the paper's resize baseline)."""

    name = "none"
    whole_photo = True

    def __init__(self, **_: Any):
        pass

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[None, tuple[float, float]]:
        return None, factors

    def detect(self, inputs: list[Any], rows: list[dict]) -> list[Faces]:
        return [NO_FACES for _ in inputs]


class AnnotationBoxes:
    """The annotators' consensus box from the manifest: an oracle upper bound and the detector's training labels."""

    name = "annotations"
    whole_photo = False

    def __init__(self, **_: Any):
        pass

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[None, tuple[float, float]]:
        return None, (1.0, 1.0)  # manifest boxes are already in full-resolution upright pixels

    def detect(self, inputs: list[Any], rows: list[dict]) -> list[Faces]:
        out = []
        for row in rows:
            box = row.get("box")
            if not valid_box(box):
                out.append(NO_FACES)
            else:
                out.append(Faces(np.asarray([box], np.float32), np.ones(1, np.float32)))
        return out


DETECTORS = {"yolo": YoloDetector, "haar": HaarDetector, "none": WholePhoto, "annotations": AnnotationBoxes}


def check_detector(name: str, weights: str | None, choices: tuple[str, ...] = tuple(DETECTORS)) -> None:
    """Fail on the driver, before any actor starts: a detector not in ``choices``, or yolo without weights."""
    if name not in choices:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(choices)}")
    if name == "yolo" and not weights:
        raise ValueError("--detector yolo needs --weights PATH_OR_URI (kemo downloads no weights)")


def torch_device(device: str) -> str:
    """``auto`` is the first CUDA GPU when there is one, else the CPU; anything else is taken as given."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def create_detector(name: str, **kwargs: Any):
    """A detector by name; unknown keyword arguments are ignored by detectors that do not use them."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}") from None
    return cls(**kwargs)
