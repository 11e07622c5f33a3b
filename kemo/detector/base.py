"""What every face detector is: ``Faces``, the ``Detector`` interface the photo front end calls, and its helpers.

``decode_hint(row, crop)`` says how far a photo may be DCT-reduced before decoding; ``prepare(frame, factors)`` runs in
decoder threads and turns one upright RGB frame into the detector's input plus the full-resolution pixels per input
pixel; ``detect(inputs, rows)`` runs once per batch in the actor and returns boxes and scores in input pixels.
Weights load once, in the constructor (the actor's constructor under Ray Data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np

from kemo.settings import CropSettings, DetectorSettings


@dataclass
class Faces:
    boxes: np.ndarray  # (N, 4) float32 xyxy in the detector input's pixels
    scores: np.ndarray  # (N,) float32


NO_FACES = Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


@dataclass(frozen=True)
class DecodeHint:
    """How far a photo may be reduced while decoding: keep the short side >= ``min_side``, reduce at most
    ``max_scale`` (1, 2, 4, 8)."""

    min_side: int
    max_scale: int = 8


class Detector(Protocol):
    """A face detector. Its traits say what it is, so no stage ever tests a detector's name."""

    name: ClassVar[str]  # what `--detector` and the crop shards' `detector` column say
    needs_weights: ClassVar[bool]  # True: `--weights` names its weights; the driver fetches and hashes them once
    needs_annotations: ClassVar[bool]  # True: it reads the annotators' box of a manifest row (new photos have none)
    whole_photo: ClassVar[bool]  # True: no face search, the crop is the whole photo

    @classmethod
    def from_settings(cls, s: DetectorSettings, threads: int) -> Detector:
        """Built from settings the driver resolved (weights pinned by hash); ``threads`` is its CPU share."""
        ...

    @classmethod
    def check_weights(cls, path: str) -> None:
        """Load the weights at ``path`` (a local, hash-checked copy) once on CPU; raise when they do not load."""
        ...

    def decode_hint(self, row: dict[str, Any], crop: CropSettings) -> DecodeHint: ...

    def prepare(self, image: np.ndarray, factors: tuple[float, float]) -> tuple[Any, tuple[float, float]]: ...

    def detect(self, inputs: list[Any], rows: list[dict[str, Any]]) -> list[Faces]: ...


class WeightlessDetector:
    """The traits and weights check of a detector that loads no weights file (OpenCV's own cascade, or nothing)."""

    needs_weights: ClassVar[bool] = False
    needs_annotations: ClassVar[bool] = False
    whole_photo: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, s: DetectorSettings, threads: int) -> Any:
        return cls()  # nothing to load, nothing to set

    @classmethod
    def check_weights(cls, path: str) -> None:
        raise TypeError(f"{cls.__name__} loads no weights")


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """Shrink so that the longer side is at most ``side`` (never enlarge)."""
    h, w = image.shape[:2]
    r = side / max(h, w)
    if r >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA)


def factors_after(image: np.ndarray, small: np.ndarray, factors: tuple[float, float]) -> tuple[float, float]:
    """Full-resolution pixels per pixel of ``small``, a resized ``image`` that had ``factors``."""
    return factors[0] * image.shape[1] / small.shape[1], factors[1] * image.shape[0] / small.shape[0]
