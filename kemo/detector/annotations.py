"""The annotators' consensus box from the manifest: an oracle upper bound and the detector's training labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from kemo.crop import crop_region, valid_box
from kemo.detector.base import NO_FACES, DecodeHint, Faces, WeightlessDetector
from kemo.image import largest_reduction
from kemo.settings import CropSettings


class AnnotationBoxes(WeightlessDetector):
    """The manifest row's ``box`` as the one face, score 1; no box, no face."""

    name = "annotations"
    needs_annotations = True

    def decode_hint(self, row: dict[str, Any], crop: CropSettings) -> DecodeHint:
        # the face is known before decoding: reduce only as far as the crop keeps crop_size pixels
        # (min_side 1 = no short-side limit: the box caps the reduction per photo)
        box = row.get("box")
        if valid_box(box):
            return DecodeHint(1, largest_reduction(crop_region(box, crop.margin)[2], crop.crop_size))
        return DecodeHint(1)

    def prepare(self, image: Any, factors: tuple[float, float]) -> tuple[None, tuple[float, float]]:
        return None, (1.0, 1.0)  # manifest boxes are already in full-resolution upright pixels

    def detect(self, inputs: list[Any], rows: list[dict[str, Any]]) -> list[Faces]:
        out = []
        for row in rows:
            box = row.get("box")
            out.append(Faces(np.asarray([box], np.float32), np.ones(1, np.float32)) if valid_box(box) else NO_FACES)
        return out
