"""The demo's stages against the library as it is, and the one Ray log line the demo's job keeps off its console."""

from __future__ import annotations

import ast
import inspect
import os
import runpy
import subprocess
import sys

from kemo.config import parse
from kemo.demo import DemoConfig

JOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "demo.py")


def _ray_warnings(module) -> list[str]:
    """The constant messages a Ray module passes to ``logger.warning``, as its source has them."""
    return [node.args[0].value for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "warning" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def test_flags():
    cfg = parse(DemoConfig, ["--out", "o", "--per-class", "3", "--size", "320x240", "--classifier-epochs", "2"])
    assert cfg == DemoConfig(out="o", per_class=3, size="320x240", classifier_epochs=2)


STAGES_ALONE = """
import os, sys
import ray
from kemo.demo import DemoConfig, index_corpus, make_corpus
out = sys.argv[1]
cfg, corpus = DemoConfig(out=out, per_class=2, size="320x240"), os.path.join(out, "corpus")
make_corpus(cfg, corpus)
report = index_corpus(cfg, corpus, os.path.join(out, "index"))
print("ROWS", report.rows, "RAY", ray.is_initialized())
"""


def test_corpus_and_index_stages_run_without_ray(tmp_path):
    """In a process of their own: the session's tests keep a Ray running in this one."""
    proc = subprocess.run([sys.executable, "-c", STAGES_ALONE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(JOB)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    corpus, index_dir = str(tmp_path / "corpus"), str(tmp_path / "index")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"[1] generating an AI-Hub-shaped corpus (14 photos of 320x240) in {corpus}"
    assert lines[1].endswith(" s") and " records, " in lines[1]
    assert lines[2] == f"[2] indexing {corpus} → {index_dir}"
    rows, started = lines[-1].split()[1], lines[-1].split()[3]
    assert int(rows) > 0 and os.path.exists(os.path.join(index_dir, "manifest.parquet"))
    assert started == "False"  # the library leaves starting Ray to the job


def test_job_skips_only_the_cleaners_warning_and_the_per_fit_and_per_epoch_ray_lines(monkeypatch):
    from ray._private.ray_logging import LogDeduplicator
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "a user's own pattern")  # restored after the test
    runpy.run_path(JOB, run_name="not_main")  # sets the filter, starts nothing
    skip = os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
    cleaner = _ray_warnings(placement_group_cleaner)
    unavailable = [m for m in cleaner if m.startswith("Failed to query Ray Train Controller actor state")]
    assert len(unavailable) == 1, cleaner  # Ray reworded it: the filter no longer matches
    others = [m for m in cleaner if m not in unavailable]
    assert others  # e.g. "Monitor thread did not exit within %.2f seconds": these still print
    dedup = LogDeduplicator(5, None, skip, _timesource=lambda: 0)
    start_up = [  # as a make demo run printed them, once per fit
        "Requesting resources: {'CPU': 2} * 1",
        "Attempting to start training worker group of size 1 with the following resources: [{'CPU': 2}] * 1",
        "Started training worker group of size 1: ",
        "- (ip=192.0.2.2, pid=20672) world_rank=0, local_rank=0, node_rank=0",
        "Setting up process group for: env:// [rank=0, world_size=1]", "Moving model to device: cpu",
        "[2026-12-01 22:49:57,481 E 20530 20563] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
        "ID: '0a1b' has constructor arguments in the object store and max_restarts > 0.",
        # and the training splits' coordinator, every epoch
        "Execution plan of Dataset dataset_0357X_0: InputDataBuffer[Input] -> OutputSplitter[split(1, equal=True)]",
        "Starting execution of Dataset dataset_0357X_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
        "✔️  Dataset dataset_0357X_0 execution finished in 0.04 seconds",
        "[dataset]: A new progress UI is available. To enable, set `ray.data.DataContext.get_current()`"]
    kept = ["resnet18 seed 0 epoch 1/15 | loss 2.109", "Training failed: worker group of size 1 died"]
    lines = [*unavailable, *others, *start_up, "a user's own pattern here", *kept]
    printed = [line for batch in dedup.deduplicate({"ip": "n", "pid": 1, "lines": lines}) for line in batch["lines"]]
    assert printed == [*others, *kept]
