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
