"""The label stage: kemo's label job against the plain labelling loop on the same photos, with the same detector and a
classifier of random weights (the speed does not depend on them), and each phase of kemo's labelling actor alone
(read, decode, detect, crop, the classifier's input, classify) scaled to all cores: the ceilings it runs under."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import cv2

from kemo import listing, outputs, storage
from kemo.benchmark.config import BenchmarkConfig, crop_settings
from kemo.benchmark.detect import ALONE, LOOKS_AT_PIXELS, detect_all
from kemo.benchmark.loops import plain_label_loop
from kemo.benchmark.photos import photo_folder
from kemo.benchmark.preprocess import resources_of
from kemo.benchmark.probes import Sampler, marginal, rate, time_each
from kemo.resources import cluster_nodes, resolve_resources

ALL_STAGES = "all stages on all cores"


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


@contextlib.contextmanager
def label_alone(lcfg: Any) -> Iterator[Any]:
    """kemo's labelling actor built in this process as the job builds it (``lcfg`` resolved), held to one core;
    torch's and OpenCV's threads are restored after, since the plain loop must get their defaults."""
    import torch

    from kemo.label_photos import LabelPhotos

    torch_threads = torch.get_num_threads()
    udf = LabelPhotos(dataclasses.asdict(dataclasses.replace(lcfg, decoders=1)), 1.0, None)
    try:
        yield udf
    finally:
        udf.front.close()
        cv2.setNumThreads(-1)
        torch.set_num_threads(torch_threads)


def actor_phases(udf: Any, rows: list[dict[str, Any]], batch: int) -> dict[str, float]:
    """Seconds each phase of the labelling actor takes over ``rows`` on one core, through its own methods, in the
    order a call runs them; the models timed after one warm-up batch."""
    import pyarrow as pa

    from kemo.schema import LABELS

    front = udf.front
    listed = [{"uri": r["uri"], "size": os.path.getsize(r["uri"]), "mtime_ns": 0, "etag": None, "box": r.get("box")}
              for r in rows]
    t: dict[str, float] = {"read": time_each(lambda r: storage.read_bytes(r["uri"]), listed)}
    prepared: list[Any] = []
    t["decode"] = time_each(lambda r: prepared.append(front.load(r)), listed) - t["read"]  # + the detector's input
    found, t["detect"] = detect_all(front.detector, prepared, listed, batch)
    photos: list[Any] = []
    t["crop"] = time_each(lambda k: photos.append(front.finish(prepared[k], found[k])), range(len(rows)))
    made: list[Any] = []
    t["classifier input"] = time_each(lambda k: made.append(udf.rows(listed[k], photos[k])), range(len(rows)))
    blocks = [made[i:i + batch] for i in range(0, len(made), batch)]
    warm = [x for _, inputs in made for x in inputs if x is not None][:batch]
    if warm:
        udf.classify(warm)  # lazy set-up, as the detector's warm-up batch
    out: list[dict[str, Any]] = []

    def classify(block: list[Any]) -> None:
        labelled, inputs = [r for rs, _ in block for r in rs], [x for _, xs in block for x in xs]
        udf.label(labelled, inputs)
        out.extend(labelled)

    t["classify"] = time_each(classify, blocks)
    t["rows to Arrow"] = time_each(lambda rs: pa.Table.from_pylist(rs, schema=LABELS), [out])
    return t


def label_ceilings(rows: list[dict[str, Any]], lcfg: Any, cluster: dict[str, float]) -> dict[str, Any]:
    """Milliseconds per photo of each phase of the labelling actor on one core (:func:`actor_phases`), and photos/s
    of each alone scaled to all cores (a model on a GPU to all GPUs), and of all the CPU phases sharing the cores."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    with label_alone(lcfg) as udf:
        t = actor_phases(udf, rows, lcfg.batch_size)
        on_gpu = {"detect": str(getattr(udf.front.detector, "device", "cpu")).startswith("cuda"),
                  "classify": str(udf.device).startswith("cuda")}
    if lcfg.detector not in LOOKS_AT_PIXELS:  # reads boxes, or searches nothing: not a stage
        del t["detect"]
    n = len(rows)
    ceilings = {k: rate(n, v / (gpus if on_gpu.get(k) else cores)) for k, v in t.items()}
    # every CPU phase shares the same cores, so together they cannot beat this (a model on a GPU runs beside them)
    ceilings[ALL_STAGES] = rate(n, sum(v for k, v in t.items() if not on_gpu.get(k)) / cores)
    return {"ms_per_photo_one_core": {k: round(1000 * v / n, 2) for k, v in t.items()},
            "on_gpu": [k for k, v in on_gpu.items() if v], "ceilings_photos_per_s": ceilings}


def label_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """kemo's label job against :func:`plain_label_loop` on the same photos, with the same detector and classifier:
    a K-EmotionNet checkpoint with random weights (the speed does not depend on them); and the ceilings of its actor's
    phases (:func:`label_ceilings`). kemo's steady rate is timed between its first and last part file, written every
    16 rows."""
    from kemo.label import LabelConfig
    from kemo.label import run as label
    from kemo.preprocess import steady_rate

    checkpoint = os.path.join(work, "classifier")
    detector, size = random_classifier(cfg, cluster, checkpoint)
    n, n_small = len(rows), len(rows) // 3
    lcfg = LabelConfig(input=photo_folder(rows, os.path.join(work, "label-photos")),
                       output=os.path.join(work, "labels"), checkpoint=checkpoint, detector=detector,
                       weights=cfg.weights, **crop_settings(cfg), rows_per_part=16, gallery=0)  # as preprocess's
    resolved = resolve_resources(lcfg, cluster_nodes())
    stages = label_ceilings(rows[:ALONE], resolved, cluster)
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        plain_s, plain_small = plain_label_loop(rows, detector, cfg.weights, cfg, checkpoint)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = label(lcfg)
        kemo_s = time.perf_counter() - t0
    plain_rate, kemo_rate = rate(n, plain_s), rate(n, kemo_s)
    plain_steady = marginal(n_small, plain_small, n, plain_s)
    kemo_steady = steady_rate(part_receipts(lcfg.output)) or kemo_rate
    ceilings = stages["ceilings_photos_per_s"]
    slowest = min((k for k in ceilings if k != ALL_STAGES), key=ceilings.get)
    return {
        "detector": detector, "classifier": "kemotionnet", "image_size": size, "photos": n,
        "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
        "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
        "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
        "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
        "kemo_fixed_cost_s": round(max(0.0, kemo_s - n / kemo_steady), 2),
        **stages, "slowest_stage": slowest, "steady_share_of_slowest_stage": round(kemo_steady / ceilings[slowest], 2),
        # on CPU "all stages on all cores" is the least ceiling; with a model on a GPU, the lesser of it and the GPU's
        "steady_share_of_all_stages_bound": round(kemo_steady / min(ceilings.values()), 2),
        "statuses": summary.processed_statuses, "resources": resources_of(resolved), "sampled": sampler.report(),
    }
