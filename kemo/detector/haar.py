"""The paper's OpenCV baseline: the frontal-face Haar cascade that ships with opencv-python."""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

from kemo.detector.base import NO_FACES, DecodeHint, Faces, WeightlessDetector, factors_after, fit
from kemo.settings import CropSettings, DetectorSettings


class HaarDetector(WeightlessDetector):
    """OpenCV's frontal-face Haar cascade on a gray, histogram-equalised frame whose longer side is ``input_side``."""

    name = "haar"
    CASCADE = "haarcascade_frontalface_default.xml"

    def __init__(self, input_side: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face: float = 0.08):
        self.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, self.CASCADE))
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load {self.CASCADE}")
        self.input_side, self.scale_factor, self.min_neighbors, self.min_face = (
            input_side, scale_factor, min_neighbors, min_face)

    @classmethod
    def from_settings(cls, s: DetectorSettings, threads: int) -> HaarDetector:
        return cls(input_side=s.imgsz)  # cv2's threads are the front end's (cv2.setNumThreads), set per actor

    def decode_hint(self, row: dict[str, Any], crop: CropSettings) -> DecodeHint:
        return DecodeHint(crop.decode_min_side)

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
        small = fit(image, self.input_side)
        return cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)), factors_after(image, small, factors)

    def detect(self, inputs: list[np.ndarray], rows: list[dict[str, Any]]) -> list[Faces]:
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
