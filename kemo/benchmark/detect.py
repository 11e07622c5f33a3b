"""The detect stage: each detector that looks at pixels, alone on decoded photos, built as kemo's preprocess actor
builds it, at the job's batch size against one photo at a time, same device and threads."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import cv2

from kemo.benchmark.config import BenchmarkConfig, crop_settings
from kemo.benchmark.probes import rate, time_each
from kemo.resources import cluster_nodes, resolve_resources

log = logging.getLogger(__name__)
ALONE = 60  # photos for the timings of one stage alone
LOOKS_AT_PIXELS = ("yolo", "haar")  # the detectors that search the image (annotations reads boxes, none crops all)


@contextlib.contextmanager
def alone(detector_name: str, cfg: BenchmarkConfig) -> Iterator[tuple[Any, Any]]:
    """(kemo's preprocess UDF built in this process as an actor builds it, its resolved config), its CPU stages held
    to one core; torch's and OpenCV's threads are restored after, since the plain loop must get their defaults."""
    import torch

    from kemo.preprocess import CropPhotos, PreprocessConfig

    pcfg = resolve_resources(PreprocessConfig(input="-", output="-", detector=detector_name, weights=cfg.weights,
                                              **crop_settings(cfg)), cluster_nodes())
    torch_threads = torch.get_num_threads()
    udf = CropPhotos(asdict(pcfg))  # its front end sets the actor's torch/cv2 threads in this process
    cv2.setNumThreads(1)
    try:
        yield udf, pcfg
    finally:
        udf.front.pool.shutdown()
        cv2.setNumThreads(-1)
        torch.set_num_threads(torch_threads)


def detect_all(detector: Any, prepared: list[Any], rows: list[dict[str, Any]], batch: int) -> tuple[list, float]:
    """The detector's faces for every prepared photo, in batches of ``batch``, and the seconds they took after one
    warm-up batch (lazy set-up, cuDNN's algorithm search)."""
    inputs = [p.det_input for p in prepared]
    detector.detect(inputs[:batch], rows[:batch])
    found: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch):
        found += detector.detect(inputs[i:i + batch], rows[i:i + batch])
    return found, time.perf_counter() - t0


def detect_alone(name: str, cfg: BenchmarkConfig, rows: list[dict[str, Any]], cluster: dict[str, float]
                 ) -> dict[str, Any]:
    """One detector alone on ``rows`` decoded as kemo decodes them: images/s at the job's batch size against one
    photo at a time, same device and threads; and its input preparation on one core."""
    import torch

    with alone(name, cfg) as (udf, pcfg):
        front = udf.front
        det = front.detector
        prepared = [front.load(r) for r in rows]  # read + decode + detector input
        keep = [i for i, p in enumerate(prepared) if p.decoded is not None]
        prepared, sample = [prepared[i] for i in keep], [rows[i] for i in keep]
        t_prepare = time_each(lambda p: det.prepare(p.decoded.image, p.decoded.factors), prepared)
        _, t_batch = detect_all(det, prepared, sample, pcfg.batch_size)
        _, t_one = detect_all(det, prepared, sample, 1)
        threads = torch.get_num_threads() if name == "yolo" else cv2.getNumThreads()  # as timed
    n = len(prepared)
    kemo, plain = rate(n, t_batch), rate(n, t_one)
    return {"photos": n, "batch": pcfg.batch_size, "device": getattr(det, "device", "cpu"),
            "half_precision": bool(getattr(det, "half", False)), "threads": threads,
            "kemo_images_per_s": kemo, "plain_images_per_s": plain, "ratio_vs_plain": round(kemo / plain, 2),
            "prepare_ms_per_photo_one_core": round(1000 * t_prepare / n, 2)}


def detect_benchmark(cfg: BenchmarkConfig, rows: list[dict[str, Any]], cluster: dict[str, float]) -> dict[str, Any]:
    """Each detector that looks at pixels (yolo, haar), alone on the first photos: :func:`detect_alone`."""
    out = {}
    for name in [d for d in cfg.detectors if d in LOOKS_AT_PIXELS]:
        out[name] = detect_alone(name, cfg, rows[:ALONE], cluster)
        log.info("detect %s: %s", name, out[name])
    return out
