"""The paper's resize baseline: no detection, the whole photo is the crop."""

from __future__ import annotations

from typing import Any

from kemo.detector.base import NO_FACES, DecodeHint, Faces, WeightlessDetector
from kemo.settings import CropSettings


class WholePhoto(WeightlessDetector):
    """No detection: the whole photo resized to the crop size."""

    name = "none"
    whole_photo = True

    def decode_hint(self, row: dict[str, Any], crop: CropSettings) -> DecodeHint:
        return DecodeHint(crop.crop_size)  # decode just large enough for the crop

    def prepare(self, image: Any, factors: tuple[float, float]) -> tuple[None, tuple[float, float]]:
        return None, factors

    def detect(self, inputs: list[Any], rows: list[dict[str, Any]]) -> list[Faces]:
        return [NO_FACES for _ in inputs]
