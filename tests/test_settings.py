"""kemo.settings (and the pool's ActorResources): every flag of the photo jobs is checked when it is parsed, in one
line, before anything runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kemo.config import parse
from kemo.label import LabelConfig
from kemo.preprocess import PreprocessConfig

REQUIRED = ["--input", "i", "--output", "o"]
BAD = [
    (["--detector", "mtcnn"], "unknown detector 'mtcnn'"),
    (["--weights-sha256", "abc"], "64 hex digits"),
    (["--imgsz", "0"], "--imgsz 0: give at least 32"),
    (["--conf", "1.5"], "--conf 1.5: give a value in [0, 1]"),
    (["--crop-size", "0"], "--crop-size 0"),
    (["--margin", "nan"], "--margin nan"),
    (["--jpeg-quality", "101"], "--jpeg-quality 101"),
    (["--decode-min-side", "0"], "--decode-min-side 0"),
    (["--max-pixels", "0"], "--max-pixels 0"),
    (["--max-bytes", "0"], "--max-bytes 0"),
    (["--links", "never"], "--links 'never'"),
    (["--batch-size", "-1"], "--batch-size -1"),
    (["--actors", "-2"], "--actors -2"),
    (["--decoders", "-1"], "--decoders -1"),
    (["--gpus-per-actor", "-0.5"], "--gpus-per-actor -0.5"),
    (["--calls-per-actor", "-1"], "--calls-per-actor -1"),
    (["--decode-pixels", "0"], "--decode-pixels 0"),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_a_bad_photo_job_flag_is_refused_at_parse_time(flags, message, capsys):
    for cls, extra in ((PreprocessConfig, []), (LabelConfig, ["--checkpoint", "c"])):
        with pytest.raises(SystemExit) as refused:
            parse(cls, [*REQUIRED, *extra, *flags])
        assert refused.value.code == 2
        assert message in capsys.readouterr().err


def test_job_specific_flags_and_the_defaults():
    with pytest.raises(SystemExit):
        parse(PreprocessConfig, [*REQUIRED, "--rows-per-shard", "0"])
    with pytest.raises(SystemExit):
        parse(LabelConfig, [*REQUIRED, "--checkpoint", "c", "--detector", "annotations"])
    assert parse(PreprocessConfig, [*REQUIRED, "--gpus-per-actor", "-1", "--detector", "annotations"]).actors == 0


def test_a_job_refuses_a_bad_flag_in_one_line_without_starting_ray():
    proc = subprocess.run([sys.executable, "jobs/label.py", *REQUIRED, "--checkpoint", "c", "--conf", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "label.py: error: --conf 7.0: give a value in [0, 1]")
    assert "Ray" not in proc.stderr
