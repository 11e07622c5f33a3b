"""kemo.detector.haar: the OpenCV baseline on a real human face, and --imgsz as its input side."""

from __future__ import annotations

import cv2
import numpy as np
from matplotlib import cbook

from kemo.crop import iou
from kemo.detector.haar import HaarDetector
from kemo.detector.registry import create_detector
from kemo.settings import DetectorSettings


def grace_hopper() -> np.ndarray:
    """A real photograph of a human face that ships with matplotlib (OpenCV ships none)."""
    return cv2.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[:, :, ::-1].copy()


def test_haar_finds_a_real_face_composed_into_a_cluttered_scene():
    from kemo.data.synth import _background

    portrait = grace_hopper()  # 600×512; the face is at about (155, 105)-(377, 327)
    scene = _background(np.random.default_rng(0), 2000, 1500)
    big = cv2.resize(portrait, (1024, 1200))
    ox, oy = 700, 200
    scene[oy:oy + 1200, ox:ox + 1024] = big
    truth = [ox + 155 * 2, oy + 105 * 2, ox + 377 * 2, oy + 327 * 2]
    det = HaarDetector()
    inp, (fx, fy) = det.prepare(scene, (1.0, 1.0))
    assert max(inp.shape) == 640 and inp.ndim == 2
    (faces,) = det.detect([inp], [{}])
    assert len(faces.boxes) >= 1
    best = max(faces.boxes, key=lambda b: iou(b * [fx, fy, fx, fy], truth))
    assert iou(best * [fx, fy, fx, fy], truth) > 0.6
    assert ((faces.scores > 0) & (faces.scores < 1)).all()


def test_imgsz_is_haars_input_side():
    """--imgsz reaches Haar (it used to be swallowed by **kwargs, while it was part of the run fingerprint)."""
    frame = np.zeros((1200, 1600, 3), np.uint8)
    small = create_detector(DetectorSettings(detector="haar", imgsz=320))
    large = create_detector(DetectorSettings(detector="haar", imgsz=800))
    assert small.prepare(frame, (1.0, 1.0))[0].shape == (240, 320)
    assert large.prepare(frame, (1.0, 1.0))[0].shape == (600, 800)
