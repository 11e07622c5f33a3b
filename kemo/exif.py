"""EXIF orientation (tag 0x0112) as array transforms, matching ``PIL.ImageOps.exif_transpose`` exactly.

A stored frame shown with orientation ``o`` is ``apply_orientation(stored, o)``: the upright frame the annotators saw
and drew their boxes in. ``undo_orientation`` is its inverse (used to write photos whose EXIF says how to turn them).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
ORIENTATIONS = (1, 2, 3, 4, 5, 6, 7, 8)
SWAPS_AXES = frozenset({5, 6, 7, 8})  # these turn a W×H stored frame into an H×W upright one


def apply_orientation(stored: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W[, C]) uint8 stored frame → upright frame, as a viewer honouring EXIF shows it.

    OpenCV's flips and rotations return contiguous arrays (a numpy view would make every later cv2 call copy).
    Orientation 1 and unknown values return the input itself.
    """
    if orientation == 2:
        return cv2.flip(stored, 1)
    if orientation == 3:
        return cv2.rotate(stored, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(stored, 0)
    if orientation == 5:
        return cv2.transpose(stored)
    if orientation == 6:
        return cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(stored), -1)
    if orientation == 8:
        return cv2.rotate(stored, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return stored


def undo_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """Inverse of ``apply_orientation``: the frame to store so that EXIF ``orientation`` shows ``upright``."""
    if orientation == 6:
        return cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if orientation == 8:
        return cv2.rotate(upright, cv2.ROTATE_90_CLOCKWISE)
    return apply_orientation(upright, orientation)  # the other six are their own inverses


def app1_segment(orientation: int) -> bytes:
    """A JPEG APP1 segment carrying only an EXIF orientation tag."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = int(orientation)
    payload = exif.tobytes()  # b"Exif\0\0" + TIFF header + IFD0
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF orientation segment right after a JPEG's SOI marker."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return jpeg[:2] + app1_segment(orientation) + jpeg[2:]
