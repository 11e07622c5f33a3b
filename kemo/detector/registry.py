"""Detectors by name, as jobs select them (``--detector yolo``): the one place that knows every detector."""

from __future__ import annotations

from kemo.detector.annotations import AnnotationBoxes
from kemo.detector.base import Detector
from kemo.detector.haar import HaarDetector
from kemo.detector.whole_photo import WholePhoto
from kemo.detector.yolo import YoloDetector
from kemo.settings import DetectorSettings

DETECTORS = {"yolo": YoloDetector, "haar": HaarDetector, "none": WholePhoto, "annotations": AnnotationBoxes}
NEEDS_WEIGHTS = ("yolo",)


def check_detector(settings: DetectorSettings, choices: tuple[str, ...] = tuple(DETECTORS)) -> None:
    """Fail on the driver, before any actor starts: a detector not in ``choices``, or one without its weights."""
    if settings.detector not in choices:
        raise ValueError(f"unknown detector {settings.detector!r}; choose from {', '.join(choices)}")
    if settings.detector in NEEDS_WEIGHTS and not settings.weights:
        raise ValueError(f"--detector {settings.detector} needs --weights PATH_OR_URI (kemo downloads no weights)")


def create_detector(settings: DetectorSettings, threads: int = 1) -> Detector:
    """The detector ``settings`` names, built from the settings it uses; ``threads`` is its CPU share."""
    check_detector(settings)
    return DETECTORS[settings.detector].from_settings(settings, threads)
