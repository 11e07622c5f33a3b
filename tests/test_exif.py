"""EXIF orientation transforms against Pillow's exif_transpose, and the orientation segment we write."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from kemo.exif import ORIENTATION_TAG, ORIENTATIONS, SWAPS_AXES, apply_orientation, undo_orientation, with_orientation


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_apply_orientation_matches_pillow(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(stored)
    im.getexif()[ORIENTATION_TAG] = orientation
    expected = np.asarray(ImageOps.exif_transpose(im))
    got = apply_orientation(stored, orientation)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert (got.shape[:2] != stored.shape[:2]) == (orientation in SWAPS_AXES)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_undo_is_the_inverse(orientation):
    upright = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert np.array_equal(apply_orientation(undo_orientation(upright, orientation), orientation), upright)


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_written_jpeg_shows_upright_in_pillow_and_opencv(orientation):
    upright = np.zeros((60, 90, 3), np.uint8)
    upright[:20, :30] = 255  # a white block in the upright top-left corner
    ok, enc = cv2.imencode(".jpg", undo_orientation(upright, orientation).copy())
    data = with_orientation(enc.tobytes(), orientation)
    im = Image.open(io.BytesIO(data))
    assert im.getexif()[ORIENTATION_TAG] == orientation
    for shown in (np.asarray(ImageOps.exif_transpose(im)), cv2.imdecode(np.frombuffer(data, np.uint8), 1)):
        assert shown.shape == (60, 90, 3)
        assert shown[:20, :30].mean() > 200 and shown[40:, 60:].mean() < 50


def test_with_orientation_refuses_non_jpeg():
    with pytest.raises(ValueError):
        with_orientation(b"\x89PNG....", 3)
