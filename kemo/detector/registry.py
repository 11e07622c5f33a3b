"""Detectors by name, as jobs select them (``--detector yolo``): the one place that knows every detector."""

from __future__ import annotations

import dataclasses

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


def verify_detector(settings: DetectorSettings) -> None:
    """Load a detector's weights once, on CPU, in the driver: weights that do not load fail here in one line, before
    any output file is written, not in every actor's constructor after the run has claimed its output."""
    check_detector(settings)
    if settings.detector not in NEEDS_WEIGHTS:  # OpenCV's own cascade, or nothing to load
        return
    try:
        create_detector(dataclasses.replace(settings, device="cpu"), 1)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"--weights {settings.weights} do not load as {settings.detector} face weights "
                         f"({type(e).__name__}: {first})") from None


def create_detector(settings: DetectorSettings, threads: int = 1) -> Detector:
    """The detector ``settings`` names, built from the settings it uses; ``threads`` is its CPU share."""
    check_detector(settings)
    return DETECTORS[settings.detector].from_settings(settings, threads)
