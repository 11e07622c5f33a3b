"""The label stage: kemo's label job against the plain labelling loop on the same photos, with the same detector and a
classifier of random weights (the speed does not depend on them)."""

from __future__ import annotations

import os
import time
from typing import Any

from kemo import listing, outputs, storage
from kemo.benchmark.config import BenchmarkConfig, crop_settings
from kemo.benchmark.loops import plain_label_loop
from kemo.benchmark.photos import photo_folder
from kemo.benchmark.preprocess import resources_of
from kemo.benchmark.probes import Sampler, marginal, rate
from kemo.resources import cluster_nodes, resolve_resources


def part_receipts(label_output: str) -> list[tuple[float, int]]:
    """(time written, rows so far) per committed part of a label output: the job writes a part as its rows arrive."""
    import pyarrow.parquet as pq

    from kemo.label_store import PARTS

    committed = {f["path"] for f in outputs.Output(label_output, outputs.LABELS).committed()["files"]}
    parts = sorted((e.mtime_ns / 1e9, pq.read_metadata(e.uri).num_rows)
                   for e in listing.list_files(storage.join(label_output, PARTS)) if f"{PARTS}/{e.rel}" in committed)
    return [(t, sum(rows for _, rows in parts[:i + 1])) for i, (t, _) in enumerate(parts)]


def random_classifier(cfg: BenchmarkConfig, cluster: dict[str, float], checkpoint: str) -> tuple[str, int]:
    """The label stages' detector and classifier: ``cfg``'s detector (yolo with weights, else haar) and a K-EmotionNet
    checkpoint of random weights written to ``checkpoint`` (the speed does not depend on them). Returns (detector,
    the classifier's input side)."""
    import torch

    from kemo.classifier.checkpoint import save_checkpoint
    from kemo.classifier.registry import create_model

    gpu = torch.cuda.is_available() and cluster.get("GPU", 0) >= 1
    size = cfg.label_image_size or (224 if gpu else 64)
    torch.manual_seed(cfg.seed)
    save_checkpoint(checkpoint, create_model("kemotionnet"), "kemotionnet", {}, image_size=size)
    return cfg.label_detector or ("yolo" if cfg.weights else "haar"), size


def label_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """kemo's label job against :func:`plain_label_loop` on the same photos, with the same detector and classifier:
    a K-EmotionNet checkpoint with random weights (the speed does not depend on them). kemo's steady rate is timed
    between its first and last part file, written every 16 rows."""
    from kemo.label import LabelConfig
    from kemo.label import run as label
    from kemo.preprocess import steady_rate

    checkpoint = os.path.join(work, "classifier")
    detector, size = random_classifier(cfg, cluster, checkpoint)
    n, n_small = len(rows), len(rows) // 3
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        plain_s, plain_small = plain_label_loop(rows, detector, cfg.weights, cfg, checkpoint)
    lcfg = LabelConfig(input=photo_folder(rows, os.path.join(work, "label-photos")),
                       output=os.path.join(work, "labels"), checkpoint=checkpoint, detector=detector,
                       weights=cfg.weights, **crop_settings(cfg), rows_per_part=16, gallery=0)  # as preprocess's
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = label(lcfg)
        kemo_s = time.perf_counter() - t0
    plain_rate, kemo_rate = rate(n, plain_s), rate(n, kemo_s)
    plain_steady = marginal(n_small, plain_small, n, plain_s)
    kemo_steady = steady_rate(part_receipts(lcfg.output)) or kemo_rate
    return {
        "detector": detector, "classifier": "kemotionnet", "image_size": size, "photos": n,
        "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
        "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
        "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
        "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
        "kemo_fixed_cost_s": round(max(0.0, kemo_s - n / kemo_steady), 2),
        "statuses": summary.processed_statuses,
        "resources": resources_of(resolve_resources(lcfg, cluster_nodes())), "sampled": sampler.report(),
    }
