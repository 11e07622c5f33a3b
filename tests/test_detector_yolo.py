"""kemo.detector.yolo: a real YOLO trained on generated photos, batched over frames of mixed sizes."""

from __future__ import annotations

import numpy as np
import pytest

from kemo.detector.registry import create_detector
from kemo.settings import DetectorSettings


def test_yolo_detects_in_batches_of_mixed_sizes(yolo_weights):
    det = create_detector(DetectorSettings(detector="yolo", weights=yolo_weights, imgsz=320, device="cpu"))
    frames = [np.zeros((300, 500, 3), np.uint8), np.full((640, 480, 3), 90, np.uint8), np.zeros((50, 60, 3), np.uint8)]
    prepared = [det.prepare(f, (2.0, 2.0)) for f in frames]
    assert [max(p[0].shape[:2]) for p in prepared] == [320, 320, 60]
    assert prepared[0][1] == pytest.approx((2 * 500 / 320, 2 * 300 / 192))
    faces = det.detect([p[0] for p in prepared], [{}] * 3)
    assert len(faces) == 3 and all(f.boxes.shape[1] == 4 and len(f.boxes) == len(f.scores) for f in faces)
