"""The paper's detector stage: ultralytics YOLO face weights, batched, letterboxed, half precision on GPU."""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from kemo.detector.base import DecodeHint, Faces, factors_after, fit
from kemo.detector.weights import fetch_weights
from kemo.device import torch_device
from kemo.settings import CropSettings, DetectorSettings

log = logging.getLogger(__name__)


def _load(path: str) -> Any:
    """An ultralytics YOLO model from a local weights file (YOLO-Face-v2-style modules registered first)."""
    from ultralytics import YOLO

    import kemo.detector.modules  # noqa: F401  (registers MultiSEAM/C3RFEM: YOLO-Face-v2-style checkpoints load)

    return YOLO(path, task="detect")


class YoloDetector:
    """Ultralytics YOLO face weights, batched, letterboxed to ``imgsz``, half precision on GPU."""

    name = "yolo"
    needs_weights = True
    needs_annotations = False
    whole_photo = False

    def __init__(self, weights: str, imgsz: int = 640, device: str = "auto", conf: float = 0.25, iou: float = 0.5,
                 max_det: int = 30, threads: int = 1):
        """``weights``: a local weights file, already checked against its hash (:meth:`from_settings`)."""
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPU share, not every core of the node
        self.device = torch_device(device)
        self.half = self.device.startswith("cuda")
        self.model = _load(weights)
        self.imgsz, self.conf, self.iou, self.max_det = imgsz, conf, iou, max_det

    @classmethod
    def from_settings(cls, s: DetectorSettings, threads: int) -> YoloDetector:
        """Fetched (from S3: a cached copy) and hashed once per load, against the hash the driver pinned."""
        if not s.weights:
            raise ValueError("--detector yolo needs --weights PATH_OR_URI (no weights are downloaded)")
        path, sha256 = fetch_weights(s.weights, s.weights_sha256)
        log.info("yolo weights %s (sha256 %s) on %s", s.weights, sha256[:12], s.device)
        return cls(path, imgsz=s.imgsz, device=s.device, conf=s.conf, threads=threads)

    @classmethod
    def check_weights(cls, path: str) -> None:
        _load(path)

    def decode_hint(self, row: dict[str, Any], crop: CropSettings) -> DecodeHint:
        return DecodeHint(crop.decode_min_side)

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
        small = fit(image, self.imgsz)
        return cv2.cvtColor(small, cv2.COLOR_RGB2BGR), factors_after(image, small, factors)  # ultralytics takes BGR

    def detect(self, inputs: list[np.ndarray], rows: list[dict[str, Any]]) -> list[Faces]:
        # quantize=16 is fp16 in ultralytics 8.4 (its `half` flag is deprecated); None keeps fp32
        results = self.model.predict(inputs, imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                     quantize=16 if self.half else None, device=self.device, verbose=False,
                                     max_det=self.max_det)
        return [Faces(r.boxes.xyxy.cpu().numpy().astype(np.float32), r.boxes.conf.cpu().numpy().astype(np.float32))
                for r in results]
