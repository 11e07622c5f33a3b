"""The benchmark job: the stages asked for, in pipeline order, on the same photos, and the report committed to its
output like every job's (benchmark.json, benchmark.md, scaling.png with the scaling stage)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from kemo import outputs, storage
from kemo.benchmark.config import BenchmarkConfig, parse_stages
from kemo.benchmark.decode import decode_benchmark
from kemo.benchmark.detect import detect_benchmark
from kemo.benchmark.label import label_benchmark
from kemo.benchmark.photos import photos
from kemo.benchmark.preprocess import preprocess_benchmark
from kemo.benchmark.probes import machine
from kemo.benchmark.report import markdown, scaling_png
from kemo.benchmark.scale import scale_benchmark
from kemo.benchmark.scaling import scaling_benchmark
from kemo.benchmark.train import train_benchmark
from kemo.benchmark.video import video_benchmark

log = logging.getLogger(__name__)
REPORT, NOTES, PLOT = "benchmark.json", "benchmark.md", "scaling.png"


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the stages asked for (the caller has started Ray) and commit the report to ``cfg.output`` like every
    job's output: benchmark.json, benchmark.md, scaling.png (with the scaling stage), config.json, _commit.json.
    The output's lease is held from the start, so a second run into the same output is refused before it works
    for minutes. Returns the report."""
    import ray

    cfg = cfg.smoke()
    stages = parse_stages(cfg.stages)
    out = outputs.Output(cfg.output, outputs.BENCHMARK)
    previous = out.manifest()  # an output of another kind is refused here, before any work
    cluster = ray.cluster_resources()
    cores = int(cluster.get("CPU", os.cpu_count() or 1))
    report: dict[str, Any] = {"machine": machine(cluster), "config": asdict(cfg), "stages": stages, "seconds": {}}
    with out.lease() as lease:
        work = tempfile.mkdtemp(prefix="kemo-bench-")
        t0 = time.perf_counter()
        try:
            rows, manifest = [], ""
            if set(stages) - {"train", "scale"}:  # every other stage works on the same photos
                table = photos(cfg.corpus, os.path.join(work, "corpus"), cfg.size, cfg.images, cfg.seed, cfg.texture)
                manifest = os.path.join(work, "manifest.parquet")
                storage.write_parquet(table, manifest)
                rows = table.to_pylist()
                report["seconds"]["photos"] = round(time.perf_counter() - t0, 1)
            steps: dict[str, Callable[[], None]] = {
                "decode": lambda: report.update(decode=decode_benchmark(cfg, rows, work, cores)),
                "detect": lambda: report.update(detect=detect_benchmark(cfg, rows, cluster)),
                "preprocess": lambda: report.update(preprocess_benchmark(cfg, cluster, work, rows, manifest)),
                "scaling": lambda: report.update(scaling=scaling_benchmark(cfg, cluster, work, manifest, len(rows))),
                "train": lambda: report.update(train=train_benchmark(cfg, cores, work)),
                "label": lambda: report.update(label=label_benchmark(cfg, cluster, work, rows)),
                "video": lambda: report.update(video=video_benchmark(cfg, cluster, work)),
                "scale": lambda: report.update(scale=scale_benchmark(cfg, work)),
            }
            for stage in stages:
                log.info("benchmark: %s", stage)
                started = time.perf_counter()
                steps[stage]()
                report["seconds"][stage] = round(time.perf_counter() - started, 1)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        out.uncommit()  # from here until the commit, no reader takes the previous report for this one
        files = []
        if "scaling" in report:
            report["scaling"]["plot"] = PLOT
            files.append(out.write_file(PLOT, scaling_png(report["scaling"])))
        files += [out.write_json(REPORT, report),
                  out.write_file(NOTES, markdown(report).encode("utf-8"))]
        lease.check()
        out.commit(files, asdict(cfg), fingerprint=None)
        named = {r.path for r in files} | {outputs.CONFIG}
        for f in (previous or {}).get("files", []):  # a plot from an earlier run with scaling is no longer current
            if f["path"] not in named:
                with contextlib.suppress(FileNotFoundError):
                    storage.delete(storage.join(cfg.output, f["path"]))
    return report
