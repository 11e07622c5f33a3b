"""The scaling stage: kemo's preprocess throughput at 1, 2, 4 … all cores (one decoder per actor) and at 1 … all GPUs
(yolo, one actor per GPU)."""

from __future__ import annotations

import os
from typing import Any

from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.preprocess import kemo_job
from kemo.benchmark.probes import rate


def worker_counts(n: int) -> list[int]:
    """1, 2, 4 … below ``n``, then ``n``: every count on a small node, few runs on a large one."""
    counts = [1]
    while counts[-1] * 2 < n:
        counts.append(counts[-1] * 2)
    return counts + [n] if n > 1 else counts


def scaling_points(jobs: list[tuple[int, dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    points = []
    for workers, job in jobs:
        steady = job["summary"].steady_photos_per_s
        points.append({"workers": workers, "photos_per_s": steady or rate(n, job["seconds"]), "steady": bool(steady),
                       "photos_per_s_end_to_end": rate(n, job["seconds"]), "resources": job["resources"],
                       "sampled": job["sampled"]})
    for p in points:
        p["speedup"] = round(p["photos_per_s"] / points[0]["photos_per_s"], 2)
        p["efficiency"] = round(p["speedup"] / p["workers"], 2)
    return points


def scaling_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, manifest: str, n: int
                      ) -> dict[str, Any]:
    """kemo's preprocess throughput (steady where the run is long enough to tell) on 1 … all cores, one actor with
    one decoder per core and no GPU; then on 1 … all GPUs with yolo, one actor per GPU with its default decoders.
    A smoke test runs one worker and all of them only."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))

    def counts(k: int) -> list[int]:
        return sorted({1, k}) if cfg.smoke_test else worker_counts(k)

    name = cfg.scaling_detector
    cpu = [(k, kemo_job(manifest, name, cfg, os.path.join(work, f"scale-cpu-{k}"), actors=k, decoders=1,
                        gpus_per_actor=0)) for k in counts(cores)]
    gpu, note = None, None
    if not gpus:
        note = "no GPU"
    elif not cfg.weights:
        note = "needs --weights: the GPU runs use yolo"
    else:
        gpu = scaling_points([(k, kemo_job(manifest, "yolo", cfg, os.path.join(work, f"scale-gpu-{k}"), actors=k,
                                           gpus_per_actor=1)) for k in counts(gpus)], n)
    return {"photos": n, "cpu_detector": name, "cpu": scaling_points(cpu, n), "gpu_detector": "yolo", "gpu": gpu,
            "gpu_note": note}
