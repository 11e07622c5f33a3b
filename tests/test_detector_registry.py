"""kemo.detector.registry: detectors by name, the oracle and whole-photo baselines, and each decode hint."""

from __future__ import annotations

import numpy as np
import pytest

from kemo.detector.annotations import AnnotationBoxes
from kemo.detector.base import DecodeHint
from kemo.detector.registry import create_detector
from kemo.detector.whole_photo import WholePhoto
from kemo.settings import CropSettings, DetectorSettings


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
