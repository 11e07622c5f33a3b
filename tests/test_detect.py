"""Detectors (kemo.detector.registry and its detectors): Haar on a real human face, YOLO trained on generated data, the
oracle and whole-photo baselines, and what each asks of the decoder."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from matplotlib import cbook

from kemo import storage
from kemo.crop import iou
from kemo.detector.annotations import AnnotationBoxes
from kemo.detector.base import DecodeHint
from kemo.detector.haar import HaarDetector
from kemo.detector.registry import create_detector
from kemo.detector.weights import fetch_weights
from kemo.detector.whole_photo import WholePhoto
from kemo.settings import CropSettings, DetectorSettings


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


def test_each_detector_says_how_far_a_photo_may_be_reduced():
    crop = CropSettings(crop_size=500, margin=0.25, decode_min_side=1000)
    assert create_detector(DetectorSettings(detector="haar")).decode_hint({}, crop) == DecodeHint(1000, 8)
    assert create_detector(DetectorSettings(detector="none")).decode_hint({}, crop) == DecodeHint(500, 8)
    oracle = create_detector(DetectorSettings(detector="annotations"))
    assert oracle.decode_hint({"box": None}, crop) == DecodeHint(1, 8)
    # a 1000-pixel face with its margin is a 1500-pixel square: halving keeps 750 >= 500 pixels, quartering does not
    assert oracle.decode_hint({"box": [0, 0, 1000, 1000]}, crop) == DecodeHint(1, 2)


def test_annotations_and_whole_photo():
    det = create_detector(DetectorSettings(detector="annotations"))
    assert det.prepare(np.zeros((10, 10, 3), np.uint8), (4.0, 4.0)) == (None, (1.0, 1.0))
    out = det.detect([None, None], [{"box": [1, 2, 3, 4]}, {"box": None}])
    assert out[0].boxes.tolist() == [[1, 2, 3, 4]] and len(out[1].boxes) == 0
    none = create_detector(DetectorSettings(detector="none"))
    assert isinstance(det, AnnotationBoxes) and isinstance(none, WholePhoto) and none.whole_photo
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector(DetectorSettings(detector="mtcnn"))
    with pytest.raises(ValueError, match="needs --weights"):
        create_detector(DetectorSettings(detector="yolo"))


def test_yolo_detects_in_batches_of_mixed_sizes(yolo_weights):
    det = create_detector(DetectorSettings(detector="yolo", weights=yolo_weights, imgsz=320, device="cpu"))
    frames = [np.zeros((300, 500, 3), np.uint8), np.full((640, 480, 3), 90, np.uint8), np.zeros((50, 60, 3), np.uint8)]
    prepared = [det.prepare(f, (2.0, 2.0)) for f in frames]
    assert [max(p[0].shape[:2]) for p in prepared] == [320, 320, 60]
    assert prepared[0][1] == pytest.approx((2 * 500 / 320, 2 * 300 / 192))
    faces = det.detect([p[0] for p in prepared], [{}] * 3)
    assert len(faces) == 3 and all(f.boxes.shape[1] == 4 and len(f.boxes) == len(f.scores) for f in faces)


def test_weights_are_checked_by_hash(yolo_weights, tmp_path):
    path, digest = fetch_weights(yolo_weights)
    assert digest == hashlib.sha256(open(yolo_weights, "rb").read()).hexdigest() and path == yolo_weights
    assert fetch_weights(yolo_weights, digest.upper())[1] == digest
    with pytest.raises(ValueError, match="refusing"):
        fetch_weights(yolo_weights, "0" * 64)
    with pytest.raises(FileNotFoundError):
        fetch_weights(str(tmp_path / "none.pt"))


def test_weights_from_s3_are_cached_by_content(yolo_weights, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/weights/face.pt"
    storage.write_bytes(uri, open(yolo_weights, "rb").read())
    path, digest = fetch_weights(uri, cache_dir=str(tmp_path))
    assert open(path, "rb").read() == open(yolo_weights, "rb").read() and path.startswith(str(tmp_path))
    storage.delete(uri)  # known by hash, the cached copy serves without any download
    assert fetch_weights(uri, digest, cache_dir=str(tmp_path)) == (path, digest)
