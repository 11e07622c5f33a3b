"""The benchmark job's config: which stages run, on which photos, and what ``--smoke-test`` shrinks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kemo.settings import CropSettings

STAGES = ("decode", "detect", "preprocess", "scaling", "train", "label", "video", "scale")
DEFAULT_STAGES = STAGES[:-1]  # scale runs every job three times over 4,000 photos: asked for by name
# --smoke-test: the least work that still goes through every requested stage: 14 photos (two per emotion) of
# 320x240, one decode size, small crops and classifier inputs, two short epochs (the first is warm-up, so two is the
# fewest that leave one to count). The scaling stage then runs at one worker and at all of them only.
SMOKE = {"images": 14, "size": "320x240", "decode_sizes": (), "crop_size": 64, "decode_min_side": 100,
         "train_images": 32, "train_image_size": 32, "train_epochs": 2, "train_batch": 16, "label_image_size": 32,
         "scale_photos": 28, "scale_size": "320x240", "scale_image_size": 32}
LISTS = ("stages", "decode_sizes", "detectors")  # the tuple fields: a bare str would be read letter by letter


def parse_stages(stages: tuple[str, ...]) -> list[str]:
    """The stages asked for, in the order they run; unknown names (or none at all) are refused before anything runs."""
    asked = set(stages)
    unknown = asked - set(STAGES)
    if unknown or not asked:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in asked]


@dataclass(kw_only=True)
class BenchmarkConfig(CropSettings):
    """Measure kemo's stages against plain per-image loops on generated photos."""

    stages: tuple[str, ...] = field(default=DEFAULT_STAGES, metadata={
        "help": f"stages to run, of {', '.join(STAGES)}"})
    images: int = field(default=300, metadata={"help": "photos to process"})
    size: str = field(default="2000x1500", metadata={"help": "generated photo size WxH"})
    decode_sizes: tuple[str, ...] = field(default=(), metadata={
        "help": "decode: photo sizes WxH to time (none = --size); 2000x1500,4000x3000 are 3 and 12 MP phone photos"})
    detectors: tuple[str, ...] = field(default=("annotations", "none", "haar"), metadata={"help": "detectors to run"})
    weights: str | None = field(default=None, metadata={"help": "YOLO weights, needed for the yolo detector"})
    texture: bool = field(default=True, metadata={
        "help": "generated photos with sensor grain and textured surfaces, so they weigh and decode like real ones "
                "(--no-texture: the plain generator's, ~0.29 MB at 2000x1500 instead of ~0.66 MB)"})
    corpus: str | None = field(default=None, metadata={"help": "use this AI-Hub-shaped root instead of generating"})
    output: str = field(default="out/benchmark", metadata={
        "help": "benchmark output (local or s3://): benchmark.json, benchmark.md, scaling.png, committed"})
    seed: int = 0
    scaling_detector: str = field(default="annotations", metadata={
        "help": "scaling: detector of the CPU runs (1 … all cores, one decoder each); the GPU runs use yolo"})
    train_model: str = field(default="kemotionnet", metadata={"help": "train: the classifier"})
    train_images: int = field(default=0, metadata={
        "help": "train: generated training images; 0 = 8192 on GPU (epochs long enough to time), 512 on CPU"})
    train_image_size: int = field(default=0, metadata={"help": "train: input side; 0 = 224 on GPU, 64 on CPU"})
    train_epochs: int = field(default=4, metadata={"help": "train: epochs (the first is warm-up, not counted)"})
    train_batch: int = field(default=64, metadata={"help": "train: batch size"})
    label_detector: str = field(default="", metadata={"help": "label: detector; '' = yolo with --weights, else haar"})
    label_image_size: int = field(default=0, metadata={
        "help": "label: the classifier's input side; 0 = 224 on GPU, 64 on CPU (random weights: speed is the same)"})
    scale_photos: int = field(default=420, metadata={
        "help": "scale: N; every job runs at a handful of photos (its fixed cost), N and 10×N"})
    scale_size: str = field(default="640x480", metadata={"help": "scale: generated photo size WxH"})
    scale_image_size: int = field(default=224, metadata={"help": "scale: crop and training input side"})
    sample_every: float = field(default=0.2, metadata={"help": "seconds between samples of worker memory and GPUs"})
    smoke_test: bool = field(default=False, metadata={
        "help": "the smallest run through every requested stage (14 small photos, two short epochs, scaling at 1 "
                "and all workers): checks that it works; its numbers are not worth quoting"})

    def __post_init__(self) -> None:
        for name in LISTS:
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"BenchmarkConfig.{name} takes a tuple of str, not the str {value!r}")
            setattr(self, name, tuple(value))
        parse_stages(self.stages)

    def smoke(self) -> BenchmarkConfig:
        """The config a run uses: with ``smoke_test``, :data:`SMOKE`'s sizes in place of the ones asked for."""
        return dataclasses.replace(self, **SMOKE) if self.smoke_test else self


def crop_settings(cfg: BenchmarkConfig) -> dict[str, object]:
    """The crop settings as keyword arguments, so kemo's jobs crop exactly as the plain loops do."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CropSettings)}
