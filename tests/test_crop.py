"""Crop geometry: the face lies inside the crop, keeps its aspect ratio, and the size is exact."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemo.crop import clip_box, crop_region, crop_square, iou, primary_face, resize_whole

boxes = st.tuples(st.floats(-50, 900), st.floats(-50, 700), st.floats(4, 600), st.floats(4, 600)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=200, deadline=None)
@given(boxes, st.floats(0, 1))
def test_region_is_a_square_holding_the_box(box, margin):
    left, top, side = crop_region(box, margin)
    assert left <= box[0] and top <= box[1] and left + side >= box[2] and top + side >= box[3]
    assert side >= max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * margin) - 1e-6
    assert side <= max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * margin) + 3


@settings(max_examples=60, deadline=None)
@given(st.integers(20, 300), st.integers(20, 300), st.integers(-100, 700), st.integers(-100, 500),
       st.sampled_from([64, 224, 500]), st.floats(0.05, 0.6))
def test_crop_keeps_the_face_whole_undistorted_and_exact_size(fw, fh, x, y, size, margin):
    frame = np.full((600, 800, 3), 40, np.uint8)
    face = [x, y, x + fw, y + fh]
    cv2.rectangle(frame, (x, y), (x + fw - 1, y + fh - 1), (255, 255, 255), -1)
    visible = clip_box(face, 800, 600)
    region = crop_region(face, margin)
    out = crop_square(frame, region, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    if visible is None:
        return
    ys, xs = np.nonzero(out[:, :, 0] > 150)
    scale = size / region[2]
    vw, vh = visible[2] - visible[0], visible[3] - visible[1]
    if min(vw, vh) * scale < 6:  # too small to measure after resizing
        return
    # the visible face appears whole, with its own width/height ratio (uniform scaling)
    assert abs((xs.max() - xs.min() + 1) - vw * scale) <= 2.5
    assert abs((ys.max() - ys.min() + 1) - vh * scale) <= 2.5


def test_crop_from_a_reduced_frame_matches_the_full_frame():
    rng = np.random.default_rng(0)
    small = cv2.resize(rng.integers(0, 255, (15, 20, 3), dtype=np.uint8), (800, 600), interpolation=cv2.INTER_CUBIC)
    half = cv2.resize(small, (400, 300), interpolation=cv2.INTER_AREA)
    region = crop_region([300, 200, 500, 460], 0.25)
    full = crop_square(small, region, 128)
    reduced = crop_square(half, region, 128, factors=(2.0, 2.0))
    assert np.abs(full.astype(int) - reduced).mean() < 4


def test_region_beyond_the_photo_is_padded():
    frame = np.full((100, 100, 3), 200, np.uint8)
    out = crop_square(frame, crop_region([0, 0, 50, 50], 0.5), 100)
    assert out[:20, :20].max() == 0 and out[60:80, 60:80].min() == 200
    assert crop_square(frame, (500, 500, 40), 32).max() == 0  # entirely outside


def test_resize_whole_is_the_plain_baseline():
    assert resize_whole(np.zeros((1500, 2000, 3), np.uint8), 500).shape == (500, 500, 3)


@pytest.mark.parametrize("boxes, scores, expected", [
    ([[0, 0, 400, 500], [500, 0, 600, 125]], [0.6, 0.95], 0),  # selfie subject beats a sharper poster face
    ([[0, 0, 400, 500], [500, 0, 700, 250]], [0.1, 0.9], 1),  # a large doubtful box loses to a real face
    ([[10, 10, 20, 20]], [0.3], 0),
    ([], [], None),
])
def test_primary_face(boxes, scores, expected):
    assert primary_face(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores)) == expected


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0 and iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_clip_box():
    assert clip_box([-10, -5, 50, 700], 100, 600) == [0, 0, 50, 600]
    assert clip_box([120, 0, 150, 10], 100, 100) is None
