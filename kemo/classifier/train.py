"""One classifier training run on Ray Train: in-memory crops → TorchTrainer (V2) → best checkpoint.

The arrays of :func:`kemo.classifier.data.load_splits` are put in Ray's object store once; every worker maps them
(zero-copy) and takes its share of a seeded permutation each epoch. Augmentation runs on batched tensors on the worker's
device: a per-photo horizontal flip and light random resized crop in one ``grid_sample``, then the paper's Random
Erasing. Adam; bf16 autocast on GPU; validation accuracy every epoch (:func:`evaluate`, each worker on its share of the
batches, summed over workers). Every epoch reports its metrics; a checkpoint (the :mod:`kemo.classifier.checkpoint`
directory, plus ``train_state.pt`` for resuming) comes with each new best validation accuracy, every
``checkpoint_every`` epochs and the last: Ray keeps the best by validation accuracy and the latest, a failed worker
restarts the group from the latest (``FailureConfig``), and a relaunch with the same output and run name resumes from it
too.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import IMAGENET, save_checkpoint
from kemo.classifier.registry import create_model, load_initial_weights

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"


@dataclass
class RunSpec:
    """What one run trains: a model, a seed and the recipe."""

    model: str = "kemotionnet"
    arguments: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    epochs: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # learning rate per epoch: "cosine" (annealed to 0 at the last epoch) or "constant"
    erasing: float = 0.5  # probability of Random Erasing per photo
    image_size: int = 224
    init_weights: str | None = None  # a user's weights file (path or s3://) to start from; nothing downloads


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-photo flip + random resized crop (scale 0.85–1 of the side) on a (B, 3, S, S) float batch in [0, 1];
    ``generator`` lives on the batch's device."""
    b = x.shape[0]
    rand = torch.rand(b, 2, generator=generator, device=x.device)
    scale = 0.85 + 0.15 * rand[:, 0]
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, generator=generator, device=x.device) - 1)
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_erasing(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Random Erasing (Zhong et al.; torchvision's defaults: area 2–33%, aspect 0.3–3.3, random values) per photo,
    on a normalised (B, C, H, W) batch."""
    b, _, h, w = x.shape
    r = torch.rand(b, 5, generator=generator, device=x.device)
    area = (0.02 + r[:, 0] * (0.33 - 0.02)) * h * w
    aspect = torch.exp(np.log(0.3) + r[:, 1] * (np.log(1 / 0.3) - np.log(0.3)))
    eh = torch.sqrt(area * aspect).clamp(1, h)
    ew = torch.sqrt(area / aspect).clamp(1, w)
    top, left = r[:, 2] * (h - eh), r[:, 3] * (w - ew)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    mask = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None])
            & (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]) & (r[:, 4] < p)[:, None, None])
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return torch.where(mask[:, None], noise, x)


def _to_input(images: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images[idx]).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def learning_rate(spec: RunSpec, epoch: int) -> float:
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))
    raise ValueError(f"unknown schedule {spec.schedule!r}: cosine or constant")


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: np.ndarray, labels: np.ndarray,
                    order: np.ndarray, spec: RunSpec, generator: torch.Generator) -> torch.Tensor:
    """One pass over ``images[order]`` (uint8 (N, S, S, 3), in memory) in batches of ``spec.batch_size``: augment on
    the model's device, Adam step, bf16 autocast on GPU. Returns (summed loss, photos) as a float64 tensor on the
    device, so the loop never waits for the GPU."""
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET["std"], device=device).view(1, 3, 1, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    model.train()
    for b in range(0, len(order), spec.batch_size):
        idx = np.sort(order[b:b + spec.batch_size])  # sorted: a faster gather from the shared array
        x = augment(_to_input(images, idx, device), generator)
        x = random_erasing((x - mean) / std, generator, spec.erasing)
        y = torch.from_numpy(labels[idx]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += loss.detach().double() * len(idx)  # no host sync per step
        sums[1] += len(idx)
    return sums


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256,
             normalize: dict[str, list[float]] = IMAGENET, num_classes: int = len(CLASS_NAMES), bf16: bool = False,
             rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The model (in eval mode, without gradients) on uint8 photos (N, S, S, 3) already at its input size, normalised
    by ``normalize``; bf16 autocast if ``bf16`` and on GPU. ``rank`` of ``world`` workers takes batches rank,
    rank + world, ... so that the workers' results add up to the whole set's. Returns (confusion matrix
    ``cm[true, predicted]`` as (num_classes, num_classes) int64 counts, summed cross-entropy as float64) on the
    model's device, so nothing waits for the GPU until the caller reads them."""
    device = next(model.parameters()).device
    mean = torch.tensor(normalize["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalize["std"], device=device).view(1, 3, 1, 1)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for b in range(rank * batch_size, len(labels), world * batch_size):
            idx = np.arange(b, min(b + batch_size, len(labels)))
            x = (_to_input(images, idx, device) - mean) / std
            y = torch.from_numpy(labels[idx]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                logits = model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    return confusion.view(num_classes, num_classes), loss


def keeps_checkpoint(epoch: int, epochs: int, every: int, improved: bool) -> bool:
    """Whether epoch ``epoch`` (1-based) of ``epochs`` writes a checkpoint: at each new best validation accuracy (the
    checkpoint that is tested), every ``every`` epochs (where a restart resumes) and at the last (whose history has
    every epoch). K-EmotionNet's weights and Adam state are ~400 MB: 60 GB to S3 a 150-epoch run if every epoch."""
    return improved or epoch % max(1, every) == 0 or epoch == epochs


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every report (with its whole metrics dict) and every checkpoint at INFO on the driver's
    console: two lines an epoch that say again what the progress line says. Keep its warnings and errors. These
    are Ray's internal modules: when another Ray moves them, the lines come back and nothing else changes."""
    try:
        from ray.train.v2._internal.execution import context
        from ray.train.v2._internal.execution import storage as train_storage
    except ImportError:
        return
    for logger in (getattr(context, "logger", None), getattr(train_storage, "logger", None)):
        if isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop (every worker runs it)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    _quiet_report_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = RunSpec(**config["spec"])
    x_train, y_train = ray.get(config["train"])
    x_val, y_val = ray.get(config["val"])
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpus_per_worker"):
        torch.set_num_threads(int(config["cpus_per_worker"]))  # the worker's CPU share, as Ray reserved it
    torch.manual_seed(spec.seed)
    model = create_model(spec.model, num_classes=len(CLASS_NAMES), **spec.arguments)
    if spec.init_weights:
        load_initial_weights(model, spec.init_weights)
    model = ray.train.torch.prepare_model(model)
    net = getattr(model, "module", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    start, best, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
            weights = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        net.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
    per_worker = len(y_train) // world  # equal shares: DDP needs the same number of steps everywhere
    fail = config.get("_fail_once")  # tests: {"epoch": k, "rank": r, "marker": path} kills one worker once

    for epoch in range(start, spec.epochs):
        if fail and epoch == fail["epoch"] and rank == fail["rank"] and not os.path.exists(fail["marker"]):
            open(fail["marker"], "w").close()
            os._exit(1)  # a worker process dies without warning
        g = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)
        mine = torch.randperm(len(y_train), generator=g)[rank * per_worker:(rank + 1) * per_worker].numpy()
        aug = torch.Generator(device=device).manual_seed(spec.seed * 100_003 + epoch * 1_009 + rank)
        torch.manual_seed(spec.seed * 100_003 + epoch * 1_009 + rank)  # dropout: per rank, and again on resume
        for group in optimizer.param_groups:  # a function of the epoch alone, so a resumed run follows the same curve
            group["lr"] = learning_rate(spec, epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # train loss, train n, val correct, val n
        started = time.perf_counter()
        sums[:2] = train_one_epoch(model, optimizer, x_train, y_train, mine, spec, aug)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started  # this worker's training steps, without evaluation
        if world > 1:  # BatchNorm statistics as rank 0 has them, explicitly: evaluation bypasses the DDP wrapper
            for buffer in net.buffers():
                torch.distributed.broadcast(buffer, 0)
        confusion, _ = evaluate(net, x_val, y_val, spec.batch_size, bf16=True, rank=rank, world=world)
        sums[2], sums[3] = confusion.trace(), confusion.sum()
        if world > 1:
            torch.distributed.all_reduce(sums)
        val_accuracy = float(sums[2] / sums[3]) if sums[3] else 0.0
        keep = keeps_checkpoint(epoch + 1, spec.epochs, config["checkpoint_every"], val_accuracy > best)
        best = max(best, val_accuracy)
        metrics = {"epoch": epoch + 1, "train_loss": float(sums[0] / max(sums[1], 1)), "val_accuracy": val_accuracy,
                   "best_val_accuracy": best,
                   # every worker's photos in this worker's time: the group's rate (DDP keeps workers in step)
                   "train_images_per_s": round(float(sums[1]) / train_seconds, 1) if train_seconds else None,
                   "epoch_seconds": round(time.perf_counter() - started, 2)}
        history.append(metrics)
        if rank == 0:  # one progress line per epoch (Ray Train's worker logging forwards it to the driver once;
            # a print there is forwarded twice)
            log.info("%s seed %d epoch %d/%d | loss %.3f | val acc %.3f | best %.3f | %s img/s", spec.model, spec.seed,
                     epoch + 1, spec.epochs, metrics["train_loss"], val_accuracy, best, metrics["train_images_per_s"])
        with tempfile.TemporaryDirectory() as d:
            if rank == 0 and keep:
                save_checkpoint(d, net, spec.model, spec.arguments, image_size=spec.image_size,
                                training={**config["spec"], "workers": world}, metrics=metrics,
                                data=config.get("data_report"))
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "best": best, "history": history,
                            "spec": config["spec"]}, os.path.join(d, TRAIN_STATE))  # weights: model.pt
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def fit(train: Any, val: Any, spec: RunSpec, storage_uri: str, name: str, workers: int = 1, use_gpu: bool = False,
        max_failures: int = 3, data_report: dict[str, Any] | None = None, cpus_per_worker: float = 0,
        checkpoint_every: int = 1, _fail_once: dict[str, Any] | None = None):
    """Train one run under ``storage_uri/name`` (relaunching with the same two resumes it); returns Ray's Result,
    whose ``best_checkpoints`` hold the best-validation checkpoint. ``train`` and ``val`` are (images, labels)
    pairs, or ObjectRefs of them so that a grid of runs shares one copy in the object store. ``cpus_per_worker``
    (0 = Ray's default of 1) is what each worker reserves and, on CPU, how many threads its torch uses. A checkpoint
    is written at every new best validation accuracy, every ``checkpoint_every`` epochs and at the last epoch."""
    import dataclasses

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(storage_uri)
    refs = [x if isinstance(x, ray.ObjectRef) else ray.put(x) for x in (train, val)]
    config = {"spec": dataclasses.asdict(spec), "train": refs[0], "val": refs[1],
              "data_report": data_report, "cpus_per_worker": cpus_per_worker, "checkpoint_every": checkpoint_every}
    if _fail_once:
        config["_fail_once"] = _fail_once
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker} if cpus_per_worker else None),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max")))
    return trainer.fit()
