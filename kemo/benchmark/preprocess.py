"""The preprocess stage: for each detector, kemo's preprocess job against the plain loop over the same photos, and
each of kemo's stages alone (read, decode, detect, crop + encode) scaled to all cores: the ceilings it runs under."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

from kemo import storage
from kemo.benchmark.config import BenchmarkConfig, crop_settings
from kemo.benchmark.detect import ALONE, LOOKS_AT_PIXELS, alone, detect_all
from kemo.benchmark.loops import plain_preprocess_loop
from kemo.benchmark.probes import Sampler, marginal, rate, time_each
from kemo.resources import cluster_nodes, resolve_resources

log = logging.getLogger(__name__)


def stage_ceilings(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig,
                   cluster: dict[str, float]) -> dict[str, float]:
    """Photos/s of each of kemo's stages alone, through the UDF's own methods: the CPU stages on one core scaled
    to all cores, the detector at the job's batch size (one per core on CPU, one per GPU on GPU)."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    with alone(detector_name, cfg) as (udf, pcfg):
        front = udf.front
        t_read = time_each(lambda r: storage.read_bytes(r["uri"]), rows)
        prepared: list[Any] = []
        t_load = time_each(lambda r: prepared.append(front.load(r)), rows)  # read + decode + detector input
        found, t_detect = detect_all(front.detector, prepared, rows, pcfg.batch_size)
        t_finish = time_each(lambda k: udf.row(rows[k], front.finish(prepared[k], found[k])), range(len(rows)))
    on_gpu = str(getattr(front.detector, "device", "cpu")).startswith("cuda")
    n = len(rows)
    ceilings = {"read bytes": rate(n, t_read / cores), "decode": rate(n, (t_load - t_read) / cores),
                "crop + encode": rate(n, t_finish / cores)}
    if detector_name in LOOKS_AT_PIXELS:
        ceilings["detect"] = rate(n, t_detect / (gpus if on_gpu else cores))
    # Every CPU stage shares the same cores, so together they cannot beat this (a GPU detector runs beside them):
    ceilings["all stages on all cores"] = rate(n, (t_load + t_finish + (0 if on_gpu else t_detect)) / cores)
    return ceilings


def resources_of(cfg: Any) -> dict[str, Any]:
    """A resolved job config's actor-pool knobs, as the report shows them."""
    return {k: getattr(cfg, k) for k in ("actors", "decoders", "gpus_per_actor", "batch_size", "calls_per_actor")}


def kemo_job(manifest: str, detector_name: str, cfg: BenchmarkConfig, out_dir: str, **resources: Any
             ) -> dict[str, Any]:
    """The whole preprocess job into a fresh output: its wall time (Ray Data start-up included), summary, resolved
    resources and what was sampled of its workers. ``resources``: PreprocessConfig's actors, decoders, ..."""

    from kemo.preprocess import PreprocessConfig
    from kemo.preprocess import run as preprocess

    shutil.rmtree(out_dir, ignore_errors=True)
    # small shards: the job's receipts then time its steady state (summary.steady_photos_per_s)
    # no gallery: the plain loop writes none (its cost is fixed, a capped page; the scale stage's jobs keep it)
    pcfg = PreprocessConfig(input=manifest, output=out_dir, detector=detector_name, weights=cfg.weights,
                            **crop_settings(cfg), rows_per_shard=16, gallery=0, **resources)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = preprocess(pcfg)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "summary": summary, "sampled": sampler.report(),
            "resources": resources_of(resolve_resources(pcfg, cluster_nodes()))}


def preprocess_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]],
                         manifest: str) -> dict[str, Any]:
    """Every detector: kemo's preprocess job against the plain loop, and the stage ceilings."""
    n, n_small = len(rows), len(rows) // 3
    report: dict[str, Any] = {"photos": n, "size": cfg.size, "detectors": {}}
    for name in cfg.detectors:
        log.info("benchmark: preprocess with %s", name)
        ceilings = stage_ceilings(rows[:ALONE], name, cfg, cluster)
        with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
            plain_s, plain_small = plain_preprocess_loop(rows, name, cfg.weights, cfg,
                                                         os.path.join(work, f"plain-{name}"))
        job = kemo_job(manifest, name, cfg, os.path.join(work, f"kemo-{name}"))
        summary = job["summary"]
        plain_rate, kemo_rate = rate(n, plain_s), rate(n, job["seconds"])
        plain_steady = marginal(n_small, plain_small, n, plain_s)
        kemo_steady = summary.steady_photos_per_s or kemo_rate
        stages = {k: v for k, v in ceilings.items() if k != "all stages on all cores"}
        slowest = min(stages, key=stages.get)
        report["detectors"][name] = {
            "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
            "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
            "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
            "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
            "kemo_fixed_cost_s": round(max(0.0, job["seconds"] - n / kemo_steady), 2),  # < 0 is noise
            "stage_ceilings_photos_per_s": ceilings, "slowest_stage": slowest,
            "steady_share_of_slowest_stage": round(kemo_steady / ceilings[slowest], 2),
            # on CPU "all stages on all cores" is the least ceiling; with a GPU detector the bound is the lesser of
            # it and the detector's
            "steady_share_of_all_stages_bound": round(kemo_steady / min(ceilings.values()), 2),
            "statuses": summary.statuses, "resources": job["resources"], "sampled": job["sampled"],
        }
        log.info("%s: %s", name, report["detectors"][name])
    return report
