"""The train stage: kemo's Ray Train run, fed from Ray Data's cache, against a plain PyTorch loop over the same tensors
in its own memory, and the data path alone against the model alone (is training data-bound?)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.loops import plain_train
from kemo.benchmark.probes import Sampler, data_path_rates

STEADY = slice(1, None)  # the first epoch warms up allocators and kernels


def _kemo_fit(train: Any, val: Any, spec: Any, cfg: BenchmarkConfig, work: str, gpu: bool, cores: int
              ) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """kemo's Ray Train run: (its per-epoch history, its wall seconds, what the sampler saw of its workers)."""
    import torch

    from kemo.classifier.train import TRAIN_STATE, fit

    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        result = fit(train, val, spec, os.path.join(work, "train"), "bench", workers=1, use_gpu=gpu,
                     cpus_per_worker=1 if gpu else cores)
        kemo_wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"Ray Train benchmark run failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    return history, kemo_wall, sampler.report()


def train_benchmark(cfg: BenchmarkConfig, cores: int, work: str) -> dict[str, Any]:
    """Classifier training: kemo's Ray Train run (one worker holding every core or the GPU, its photos streamed from
    Ray Data with the cache, ``--cache memory``; validation and a checkpoint every epoch) against :func:`plain_train`,
    the in-memory loop, on the same tensors; and the data path alone (the cached split through a worker's local
    shuffle and ``iter_torch_batches``, in this process, no model) against the plain loop's rate (the model alone),
    so the report says whether training is data-bound. The plain loop
    runs before and after Ray Train and the two are averaged, so drift in the machine's load shows up in both. On a
    GPU the plain loop runs once more with channels_last (kemo's Ray Train loop has no such option)."""
    import ray
    import torch

    from kemo.classifier.data import arrays_dataset
    from kemo.classifier.train import RunSpec

    gpu = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1
    size = cfg.train_image_size or (224 if gpu else 64)
    spec = RunSpec(model=cfg.train_model, epochs=cfg.train_epochs, batch_size=cfg.train_batch, image_size=size)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.train_images or (8192 if gpu else 512)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # the speed is content-blind
    y = rng.integers(0, 7, n).astype(np.int64)
    train = arrays_dataset(x, y).materialize()  # what --cache memory hands Ray Train: blocks in the object store
    # one batch: evaluation is part of kemo's epoch, kept small
    val = arrays_dataset(x[: cfg.train_batch], y[: cfg.train_batch]).materialize()
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        before = plain_train(x, y, spec, cores)
    data_path = data_path_rates(train, spec.batch_size, spec.epochs)
    history, kemo_wall, sampled = _kemo_fit(train, val, spec, cfg, work, gpu, cores)
    with Sampler(cfg.sample_every):
        after = plain_train(x, y, spec, cores)
    channels_last = plain_train(x, y, spec, cores, channels_last=True) if gpu else None
    return {"model": spec.model, "image_size": size, "images": len(y), "batch": spec.batch_size,
            "epochs": spec.epochs, "device": "cuda" if gpu else f"cpu ({cores} threads)",
            "precision": "bf16 autocast" if gpu else "fp32",  # kemo.classifier.train.train_one_epoch's choice
            "input": "Ray Data, cached in the object store (--cache memory), local shuffle buffer",
            **_rates(len(y), before, after, history, kemo_wall, data_path, channels_last), "sampled": sampled}


def _rates(n: int, before: list[float], after: list[float], history: list[dict[str, Any]], kemo_wall: float,
           data_path: list[float], channels_last: list[float] | None) -> dict[str, Any]:
    """The steady rates (images/s) of each path, and their ratios to the plain loop's."""
    # rounded as reported before any ratio is taken, so each ratio is the one of the numbers beside it
    plain = round(float(np.mean(before[STEADY] + after[STEADY])), 1)
    kemo_steps = round(float(np.mean([h["train_images_per_s"] for h in history][STEADY])), 1)
    kemo_epochs = round(float(np.mean([n / h["epoch_seconds"] for h in history][STEADY])), 1)
    data_alone = round(float(np.mean(data_path[STEADY])), 1)
    last = round(float(np.mean(channels_last[STEADY])), 1) if channels_last is not None else None
    return {
        "plain_loop_images_per_s": plain,
        "plain_loop_images_per_s_before_after": [round(float(np.mean(r[STEADY])), 1) for r in (before, after)],
        "kemo_images_per_s": kemo_steps, "ratio_vs_plain": round(kemo_steps / plain, 2),
        # the whole epoch: training, validation on one batch, and the checkpoint written and registered
        "kemo_epoch_images_per_s": kemo_epochs, "epoch_ratio_vs_plain": round(kemo_epochs / plain, 2),
        # against the model alone (the plain loop: no input path to wait for); under 20% headroom it sets the pace
        "data_path_images_per_s": data_alone, "data_path_vs_model": round(data_alone / plain, 2),
        "data_bound": data_alone < 1.2 * plain,
        "kemo_wall_s": round(kemo_wall, 1),
        "kemo_fixed_cost_s": round(max(0.0, kemo_wall - sum(h["epoch_seconds"] for h in history)), 1),
        "plain_loop_channels_last_images_per_s": last,
        "channels_last_ratio_vs_plain": round(last / plain, 2) if last else None,
    }
