"""Detectors by name, as jobs select them (``--detector yolo``): the one place that knows every detector.

A job resolves its detector setting once, in the driver (:func:`resolve_detector`: a known detector, usable for the
job's input, its weights fetched and hashed, the hash pinned into the settings); :func:`verify_detector` loads those
weights once on CPU before any file is written; actors build from the resolved settings (:func:`create_detector`)
without checking again.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from kemo.detector.annotations import AnnotationBoxes
from kemo.detector.base import Detector
from kemo.detector.haar import HaarDetector
from kemo.detector.weights import fetch_weights, local_path
from kemo.detector.whole_photo import WholePhoto
from kemo.detector.yolo import YoloDetector
from kemo.settings import DetectorSettings

D = TypeVar("D", bound=DetectorSettings)
DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (YoloDetector, HaarDetector, WholePhoto, AnnotationBoxes)}


def detector_class(name: str, annotated: bool = True) -> type[Detector]:
    """The detector ``--detector name`` selects, with its traits; refused in one line when unknown, or when it needs
    the annotators' boxes and the job's photos have none (not ``annotated``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    cls = DETECTORS[name]
    if cls.needs_annotations and not annotated:
        usable = ", ".join(n for n, d in DETECTORS.items() if not d.needs_annotations)
        raise ValueError(f"--detector {name} needs the annotators' boxes from an AI-Hub manifest, which new photos "
                         f"do not have: use {usable}")
    return cls


def resolve_detector(settings: D, annotated: bool = True) -> D:
    """``settings`` checked for a job whose photos carry the annotators' boxes (``annotated``) or not, with the
    SHA-256 of the weights pinned: what the run fingerprints, and what every actor loads (and checks) exactly."""
    cls = detector_class(settings.detector, annotated)
    if not cls.needs_weights:
        return dataclasses.replace(settings, weights=None, weights_sha256=None)
    if not settings.weights:
        raise ValueError(f"--detector {cls.name} needs --weights PATH_OR_URI (kemo downloads no weights)")
    return dataclasses.replace(settings, weights_sha256=fetch_weights(settings.weights, settings.weights_sha256)[1])


def verify_detector(resolved: DetectorSettings) -> None:
    """Load resolved weights once, on CPU, in the driver (from the local or cached copy :func:`resolve_detector`
    hashed: not hashed again): weights that do not load fail here in one line, before any output file is written,
    not in every actor's constructor after the run has claimed its output."""
    cls = detector_class(resolved.detector)
    if not cls.needs_weights:
        return
    try:
        cls.check_weights(local_path(resolved.weights or "", resolved.weights_sha256 or ""))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"--weights {resolved.weights} do not load as {cls.name} face weights "
                         f"({type(e).__name__}: {first})") from None


def create_detector(settings: DetectorSettings, threads: int = 1) -> Detector:
    """The detector ``settings`` names, built from the settings it uses; ``threads`` is its CPU share."""
    return detector_class(settings.detector).from_settings(settings, threads)
