"""Every kemo process exits with the status of its work: reading an output, or a job with nothing to do, exits 0 every
time (pyarrow 26 parsing Parquet from Python bytes with its threads aborted one process in ten at exit, SIGABRT).

``KEMO_EXIT_RUNS`` runs each, two at a time: 8 in the suite, for its time; ``KEMO_EXIT_RUNS=100`` for a full check
(100 + 100 runs, all 0, in 77 s on 2 cores, 2026-12-07)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from kemo import preprocess
from kemo.config import parse
from kemo.data import aihub, synth
from kemo.preprocess import PreprocessConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("KEMO_EXIT_RUNS", 8))


@pytest.fixture(scope="module")
def index_and_crops(ray_local, tmp_path_factory):
    """An index, and the command line of a preprocess job whose output is committed and current: written here, in
    the session's Ray, from the very config that command line parses to (a job of its own would start a Ray)."""
    d = tmp_path_factory.mktemp("exit")
    synth.generate(synth.SynthConfig(out=str(d / "corpus"), per_class=1, size="160x120"))
    aihub.run(aihub.IndexConfig(root=str(d / "corpus"), output=str(d / "index")))
    flags = ["--input", str(d / "index"), "--output", str(d / "crops"), "--detector", "annotations",
             "--crop-size", "32", "--gallery", "0"]
    assert preprocess.run(parse(PreprocessConfig, flags)).processed > 0
    return str(d / "index"), [sys.executable, "jobs/preprocess.py", *flags]


def statuses(command: list[str]) -> list[int]:
    # RAY_ADDRESS names no cluster: a job that found work after all would fail to start Ray, not pass slowly
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300,
                                                      env=env).returncode, range(RUNS)))


@pytest.mark.slow
def test_readers_and_a_job_with_nothing_to_do_exit_0_every_time(index_and_crops):
    index, job = index_and_crops
    reader = [sys.executable, "-c", f"from kemo.data.aihub import load_manifest; load_manifest({index!r})"]
    assert statuses(reader) == [0] * RUNS
    assert statuses(job) == [0] * RUNS  # committed, current: nothing to do, no Ray started
