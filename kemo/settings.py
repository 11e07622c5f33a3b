"""The settings that several jobs share, each written once: which detector finds the face, how it is cropped, and how
a job's input files are listed and read.

Job configs inherit them (``class PreprocessConfig(PhotoSettings)``), so a flag, its default and its help text exist
in one place, and a function that needs only one part is typed on that part
(``create_detector(settings: DetectorSettings, threads)``). Keyword-only, so required job fields may come after.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import pyarrow as pa

from kemo.config import at_least, within
from kemo.image import MAX_PIXELS
from kemo.listing import LINKS
from kemo.resources import ActorResources


@dataclass(kw_only=True)
class DetectorSettings:
    """Which face detector runs, with which weights, at which input size."""

    detector: str = field(default="yolo", metadata={"help": "yolo, haar, none (whole photo) or annotations"})
    weights: str | None = field(default=None, metadata={"help": "YOLO face weights: path or s3:// URI"})
    weights_sha256: str | None = field(default=None, metadata={"help": "refuse weights with another SHA-256"})
    imgsz: int = field(default=640, metadata={"help": "detector input side (yolo's letterbox, haar's longer side)"})
    conf: float = field(default=0.25, metadata={"help": "yolo: minimum face confidence"})
    device: str = field(default="auto", metadata={"help": "model device: auto, cpu, cuda:0"})

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the other settings a job config inherits
        from kemo.detector.registry import detector_class  # the registry imports these settings

        detector_class(self.detector)
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.weights_sha256):
            raise ValueError(f"--weights-sha256 {self.weights_sha256!r}: give the 64 hex digits of a SHA-256")
        at_least("--imgsz", self.imgsz, 32)  # the detectors' coarsest stride
        within("--conf", self.conf, 0, 1)


@dataclass(kw_only=True)
class CropSettings:
    """How a photo is decoded and its face cut out: what makes a crop the same at training and at labelling."""

    crop_size: int = field(default=500, metadata={"help": "crop side in pixels"})
    margin: float = field(default=0.25, metadata={"help": "background kept on each side, as a share of the face"})
    jpeg_quality: int = field(default=95, metadata={
        "help": "crop JPEG quality; labelling passes crops through it before the classifier, as training crops were "
                "(0 = not)"})
    decode_min_side: int = field(default=1000, metadata={
        "help": "decode photos reduced (JPEG by DCT scaling) while the short side stays >= this"})
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": "refuse larger photos as too_large"})

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        at_least("--crop-size", self.crop_size, 8)
        within("--margin", self.margin, 0, 10)
        within("--jpeg-quality", self.jpeg_quality, 0, 100)
        at_least("--decode-min-side", self.decode_min_side, 1)
        at_least("--max-pixels", self.max_pixels, 1)


@dataclass(kw_only=True)
class InputSettings:
    """How a job treats the files it is given: one byte limit and one symlink policy for every job."""

    max_bytes: int = field(default=256 << 20, metadata={
        "help": "refuse larger files as too_large: no job reads more than this many bytes (+1) of any input file"})
    links: str = field(default="inside", metadata={
        "help": "symlinks: inside (followed only when the target stays inside the input) or anywhere"})

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the other settings a job config inherits
        if self.links not in LINKS:
            raise ValueError(f"--links {self.links!r}: choose from {', '.join(LINKS)}")
        at_least("--max-bytes", self.max_bytes, 1)


SMOKE_INPUTS = 16


@dataclass(kw_only=True)
class PhotoSettings(DetectorSettings, CropSettings, InputSettings, ActorResources):
    """What both photo jobs (preprocessing, labelling) share: the detector, the crop, the input rules and the pool."""

    smoke_test: bool = field(default=False, metadata={"help": f"only the first {SMOKE_INPUTS} inputs"})

    def smoke(self, inputs: pa.Table) -> pa.Table:
        """The inputs a run works on: the first few under ``--smoke-test``, else all."""
        return inputs.slice(0, SMOKE_INPUTS) if self.smoke_test else inputs


def crop_fingerprint(detector: DetectorSettings, crop: CropSettings) -> dict[str, object]:
    """The settings that change a crop, as a run's fingerprint records them (the weights by the hash the driver
    pinned; the device does not change a crop)."""
    return {"detector": detector.detector, "imgsz": detector.imgsz, "conf": detector.conf,
            "weights_sha256": detector.weights_sha256,
            **{f.name: getattr(crop, f.name) for f in dataclasses.fields(CropSettings)}}
