"""Dataclass configs become command-line flags."""

import re
from dataclasses import dataclass, field

import pytest

from kemo.config import code_version, parse


@dataclass
class Cfg:
    """A test config."""

    output: str = field(metadata={"help": "where"})
    per_class: int = 7000
    lr: float = 1e-3
    smoke_test: bool = False
    weights: str | None = None


def test_flags_from_fields():
    cfg = parse(Cfg, ["--output", "s3://b/x", "--per-class", "12", "--lr", "0.5", "--smoke-test"])
    assert cfg == Cfg(output="s3://b/x", per_class=12, lr=0.5, smoke_test=True, weights=None)
    assert parse(Cfg, ["--output", "o", "--weights", "w.pt", "--no-smoke-test"]).weights == "w.pt"


def test_required_field_and_bad_value_exit():
    with pytest.raises(SystemExit):
        parse(Cfg, [])
    with pytest.raises(SystemExit):
        parse(Cfg, ["--output", "o", "--per-class", "many"])


def test_unsupported_type_is_refused():
    @dataclass
    class Bad:
        items: list = field(default_factory=list)

    with pytest.raises(TypeError, match="unsupported flag type"):
        parse(Bad, [])


def test_code_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+g[0-9a-f]{12}(\.dirty)?)?", code_version())


def test_tuple_fields_take_comma_separated_lists():
    @dataclass
    class Lists:
        names: tuple[str, ...] = ("a", "b")
        sizes: tuple[int, ...] = (3, 4)
        shares: tuple[float, ...] = (0.8, 0.2)

    assert parse(Lists, []) == Lists()
    cfg = parse(Lists, ["--names", "x, y,,z", "--sizes", "1,2,3", "--shares", "0.5,0.5"])
    assert cfg == Lists(names=("x", "y", "z"), sizes=(1, 2, 3), shares=(0.5, 0.5))
    with pytest.raises(SystemExit):
        parse(Lists, ["--sizes", "1,two"])


def test_every_jobs_list_flags_parse():
    """Each job's list-valued flag, as its own parser reads it: no job splits strings by hand any more."""
    from kemo.classifier.experiment import TrainConfig
    from kemo.data.aihub import IndexConfig
    from kemo.detector.export import ExportConfig
    from kemo.label import LabelConfig

    train = parse(TrainConfig, ["--shards", "a,s3://b/c", "--output", "o", "--models", "resnet18,vgg19",
                                "--blocks", "1,2,3,4"])
    assert (train.shards, train.models, train.blocks) == (("a", "s3://b/c"), ("resnet18", "vgg19"), (1, 2, 3, 4))
    assert parse(IndexConfig, ["--root", "r", "--output", "o", "--split", "0.7,0.2,0.1"]).split == (0.7, 0.2, 0.1)
    assert parse(ExportConfig, ["--input", "i", "--output", "o", "--counts", "8,1,1"]).counts == (8, 1, 1)
    label = parse(LabelConfig, ["--input", "i", "--output", "o", "--checkpoint", "c", "--format", "parquet"])
    assert label.format == ("parquet",)
    assert parse(LabelConfig, ["--input", "i", "--output", "o", "--checkpoint", "c"]).format == ("parquet", "csv")


def test_shared_settings_are_declared_once_and_flags_stay_flat():
    """Preprocessing and labelling take the detector, crop and actor flags from the same dataclasses."""
    import dataclasses

    from kemo.label import LabelConfig
    from kemo.preprocess import PreprocessConfig
    from kemo.resources import ActorResources
    from kemo.settings import CropSettings, DetectorSettings

    for part in (DetectorSettings, CropSettings, ActorResources):
        assert issubclass(PreprocessConfig, part) and issubclass(LabelConfig, part)
        names = {f.name for f in dataclasses.fields(part)}
        help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(PreprocessConfig) if f.name in names}
        assert help_of == {f.name: f.metadata["help"] for f in dataclasses.fields(LabelConfig) if f.name in names}
    cfg = parse(PreprocessConfig, ["--input", "i", "--output", "o", "--detector", "haar", "--imgsz", "320",
                                   "--decoders", "2"])
    assert (cfg.detector, cfg.imgsz, cfg.decoders) == ("haar", 320, 2)
