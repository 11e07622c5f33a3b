"""One classifier training run on Ray Train: Ray Data splits → TorchTrainer (V2) → best checkpoint.

The train and val datasets of :mod:`kemo.classifier.data` reach the workers through ``ray.train.get_dataset_shard``:
train in equal shares (DDP steps in lockstep), val in disjoint shares that together are every photo (:class:`Shares`),
both in the splits' fixed order. Each epoch every worker streams its share through a local shuffle buffer seeded by
(seed, epoch, rank), so a resumed run sees the batches an uninterrupted one saw. Augmentation runs on batched tensors
on the worker's device: a per-photo horizontal flip and light random resized crop in one ``grid_sample``, then the
paper's Random Erasing. Adam; bf16 autocast on GPU; optionally class-balanced (``balance``: a weighted loss, or each
batch resampled towards equal classes). Validation accuracy every epoch (:func:`evaluate`, summed over workers). Every
epoch reports its metrics; a checkpoint (the :mod:`kemo.classifier.checkpoint` directory, plus ``train_state.pt`` for
resuming) comes with each new best validation accuracy, every ``checkpoint_every`` epochs and the last: Ray keeps the
best by validation accuracy and the latest, a failed worker restarts the group from the latest (``FailureConfig``), and
a relaunch with the same output and run name resumes from it too. When no node can hold a worker group (a node
lost), the run waits up to ``capacity_timeout`` seconds in all for one and then ends with :class:`CapacityLost`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import IMAGENET, save_checkpoint
from kemo.classifier.registry import create_model, load_initial_weights
from kemo.config import Stopped

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
    balance: str = "none"  # none | weights (class-weighted loss) | sampler (batches resampled towards equal classes)
    target: str = "majority"  # majority (the annotators' majority label) | votes (soft cross-entropy on the votes)


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


# uint8 (B, S, S, 3) RGB photos and their targets: int64 (B,) class indices, or float (B, classes) distributions
# (the annotators' vote shares), both of which torch's cross_entropy takes
Batch = tuple[torch.Tensor, torch.Tensor]
BALANCES = ("none", "weights", "sampler")
TARGETS = ("majority", "votes")


def array_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """In-memory photos as the training loop takes them: ``images[order]`` in batches (a plain loop's, and tests')."""
    for b in range(0, len(order), batch_size):
        idx = np.sort(order[b:b + batch_size])  # sorted: a faster gather
        yield torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


def dataset_batches(shard: Any, batch_size: int, shuffle_seed: int | None = None,
                    seen: list[int] | None = None, target: str = "label") -> Iterator[Batch]:
    """A Ray Data shard (``image``, ``label``, ``key``, maybe ``votes``) as the training loop takes it: photos and
    the ``target`` column; with ``shuffle_seed``, through a seeded local shuffle buffer of :func:`shuffle_buffer`
    rows. Photos stay uint8 until the device, a quarter of the bytes. ``seen`` (tests) collects the keys of the
    photos passed on."""
    buffer = shuffle_buffer(batch_size) if shuffle_seed is not None else None
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2,
                                          local_shuffle_buffer_size=buffer, local_shuffle_seed=shuffle_seed):
        if seen is not None:
            seen.extend(batch["key"].tolist())
        yield batch["image"], batch[target]


def shuffle_buffer(batch_size: int) -> int:
    """Rows a worker shuffles among: eight batches, at least 1,024 (at 224², ~150 MB of the worker's memory)."""
    return max(8 * batch_size, 1024)


def class_weights(counts: list[int]) -> list[float]:
    """Inverse-frequency weights, mean 1 over the photos (a class with none gets 0): ``n / (k · n_c)``."""
    n, k = sum(counts), sum(1 for c in counts if c)
    return [n / (k * c) if c else 0.0 for c in counts]


def _to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def learning_rate(spec: RunSpec, epoch: int) -> float:
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))
    raise ValueError(f"unknown schedule {spec.schedule!r}: cosine or constant")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy against class indices or class distributions, class-weighted by ``weights`` as one rule:
    −Σ q·w·log p / Σ q·w (for indices, torch's weighted mean; torch divides distributions by the batch size
    instead, which would make a weighted votes loss another scale than the majority's)."""
    if weights is None or not y.is_floating_point():
        return F.cross_entropy(logits, y, weight=weights)
    q = y.float() * weights
    return -(q * F.log_softmax(logits, 1)).sum() / q.sum().clamp_min(1e-12)


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                    spec: RunSpec, generator: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One pass over ``batches``: augment on the model's device, Adam step, bf16 autocast on GPU. Targets are class
    indices or, for ``--target votes``, class distributions (soft cross-entropy). ``weights`` (per class, on the
    device) balance the classes as ``spec.balance`` says: the loss's class weights (``weights``), or each batch
    resampled with replacement in proportion to its photos' weights (``sampler``; a distribution weighs the mean of
    its classes' weights). Returns (summed loss, photos) as a float64 tensor on the device, so the loop never waits
    for the GPU."""
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET["std"], device=device).view(1, 3, 1, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    model.train()
    for images, labels in batches:
        x = _to_input(images, device)
        y = labels.to(device, non_blocking=True)
        if spec.balance == "sampler" and weights is not None:
            per_photo = y.float() @ weights if y.is_floating_point() else weights[y]
            pick = torch.multinomial(per_photo, len(y), replacement=True, generator=generator)
            x, y = x[pick], y[pick]
        x = augment(x, generator)
        x = random_erasing((x - mean) / std, generator, spec.erasing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = cross_entropy(model(x).float(), y, weights if spec.balance == "weights" else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += loss.detach().double() * len(y)  # no host sync per step
        sums[1] += len(y)
    return sums


def _outputs(model: torch.nn.Module, batches: Iterable[Batch], normalize: dict[str, list[float]], bf16: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) per batch of uint8 photos already at the model's input size, normalised by
    ``normalize``, on the model's device, in eval mode without gradients (bf16 autocast if ``bf16`` and on GPU)."""
    device = next(model.parameters()).device
    mean = torch.tensor(normalize["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalize["std"], device=device).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            x = (_to_input(images, device) - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                logits = model(x)
            yield logits.float(), labels.to(device)


def evaluate(model: torch.nn.Module, batches: Iterable[Batch], normalize: dict[str, list[float]] = IMAGENET,
             num_classes: int = len(CLASS_NAMES), bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The model on ``batches`` (see :func:`_outputs`). Workers each evaluate their share and add up. Returns
    (confusion matrix ``cm[true, predicted]`` as (num_classes, num_classes) int64 counts, summed cross-entropy as
    float64) on the model's device, so nothing waits for the GPU until the caller reads them."""
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for logits, y in _outputs(model, batches, normalize, bf16):
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    return confusion.view(num_classes, num_classes), loss


def predict(model: torch.nn.Module, batches: Iterable[Batch], normalize: dict[str, list[float]] = IMAGENET
            ) -> tuple[np.ndarray, np.ndarray]:
    """The model's fp32 logits (N, classes) and the labels on ``batches`` (see :func:`_outputs`), in fp32: what
    calibration and the test figures are computed from."""
    logits, labels = [], []
    for z, y in _outputs(model, batches, normalize, bf16=False):
        logits.append(z.cpu().numpy())
        labels.append(y.cpu().numpy().astype(np.int64))
    if not logits:
        return np.zeros((0, len(CLASS_NAMES)), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


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
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpus_per_worker"):
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))  # the CPU share Ray reserved (at least 1)
    torch.manual_seed(spec.seed)
    model = create_model(spec.model, num_classes=len(CLASS_NAMES), **spec.arguments)
    if spec.init_weights:
        load_initial_weights(model, spec.init_weights)
    model = ray.train.torch.prepare_model(model)
    net = getattr(model, "module", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    weights = torch.tensor(config["class_weights"], device=device) if config.get("class_weights") else None
    start, best, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
            model_state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        net.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
    fail = config.get("_fail_once")  # tests: {"epoch": k, "rank": r, "marker": path} kills one worker once
    trace = config.get("_trace")  # tests: a folder where each worker writes the photos (order keys) of each epoch

    for epoch in range(start, spec.epochs):
        if fail and epoch == fail["epoch"] and rank == fail["rank"] and not os.path.exists(fail["marker"]):
            open(fail["marker"], "w").close()
            os._exit(1)  # a worker process dies without warning
        seed = spec.seed * 100_003 + epoch * 1_009 + rank
        aug = torch.Generator(device=device).manual_seed(seed)
        torch.manual_seed(seed)  # dropout: per rank, and again on resume
        for group in optimizer.param_groups:  # a function of the epoch alone, so a resumed run follows the same curve
            group["lr"] = learning_rate(spec, epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # train loss, train n, val correct, val n
        seen: list[int] | None = [] if trace else None
        started = time.perf_counter()
        batches = dataset_batches(train_shard, spec.batch_size, seed, seen,
                                  "votes" if spec.target == "votes" else "label")
        sums[:2] = train_one_epoch(model, optimizer, batches, spec, aug, weights)
        if trace:
            storage.write_json(storage.join(trace, f"epoch{epoch + 1}-rank{rank}.json"),
                               {"node": ray.get_runtime_context().get_node_id(), "keys": seen})
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started  # this worker's steps and the data they waited for
        if world > 1:  # BatchNorm statistics as rank 0 has them, explicitly: evaluation bypasses the DDP wrapper
            for buffer in net.buffers():
                torch.distributed.broadcast(buffer, 0)
        confusion, _ = evaluate(net, dataset_batches(val_shard, spec.batch_size), bf16=True)
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


class CapacityLost(Stopped):
    """A run could not get its workers placed within ``capacity_timeout``; a rerun resumes from its latest
    checkpoint."""


def _shares(options: Any) -> Any:
    """Ray Train's DataConfig with kemo's split: train in equal shares (DDP needs the same steps on every worker), val
    in disjoint shares that together hold every photo (an equal split would leave up to ``workers - 1`` out), both in
    the datasets' own order (``preserve_order``, which also turns off Ray's locality hints: they make the shares
    depend on timing)."""
    from ray.train import DataConfig

    class Shares(DataConfig):
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                      **kwargs: Any) -> list[dict[str, Any]]:  # kwargs: Ray's own placeholder for later arguments
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train")):
                    output[i][name] = split
            return output

    return Shares(execution_options=options)


def fit(train: Any, val: Any, spec: RunSpec, storage_uri: str, name: str, workers: int = 1, use_gpu: bool = False,
        max_failures: int = 3, data_report: dict[str, Any] | None = None, cpus_per_worker: float = 0,
        checkpoint_every: int = 1, capacity_timeout: float = 0, class_counts: list[int] | None = None,
        _fail_once: dict[str, Any] | None = None, _trace: str | None = None):
    """Train one run under ``storage_uri/name`` (relaunching with the same two resumes it); returns Ray's Result,
    whose ``best_checkpoints`` hold the best-validation checkpoint. ``train`` and ``val`` are Ray Datasets of
    ``image`` (uint8 (S, S, 3) RGB at ``spec.image_size``) and ``label``, materialised or not. ``cpus_per_worker``
    (0 = Ray's default of 1) is what each worker reserves and, on CPU, how many threads its torch uses. A checkpoint
    is written at every new best validation accuracy, every ``checkpoint_every`` epochs and at the last epoch.
    ``capacity_timeout`` (seconds, 0 = wait as long as it takes, as on an autoscaling cluster) bounds the wait for
    a worker group that cannot be placed; past it the run raises :class:`CapacityLost`. ``class_counts`` (train
    photos per class) are what ``spec.balance`` balances."""
    import dataclasses

    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if spec.balance not in BALANCES:
        raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, not {spec.balance!r}")
    if spec.target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, not {spec.target!r}")
    fs, path = storage.resolve(storage_uri)
    config = {"spec": dataclasses.asdict(spec), "data_report": data_report, "cpus_per_worker": cpus_per_worker,
              "checkpoint_every": checkpoint_every,
              "class_weights": class_weights(class_counts) if class_counts and spec.balance != "none" else None}
    if _fail_once:
        config["_fail_once"] = _fail_once
    if _trace:
        config["_trace"] = _trace
    start_timeout, limit = capacity_attempts(capacity_timeout, os.environ.get(START_TIMEOUT_ENV))
    trainer = TorchTrainer(
        train_loop, train_loop_config=config, datasets={"train": train, "val": val},
        dataset_config=_shares(ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker} if cpus_per_worker else None),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=limit),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max")))
    with _env(START_TIMEOUT_ENV, None if start_timeout is None else f"{start_timeout:g}"):
        try:
            return trainer.fit()
        except Exception as error:  # Ray Train's TrainingFailedError wraps what the controller gave up on
            if limit >= 0 and _is_capacity_error(error):
                raise CapacityLost(
                    f"{name}: no node could hold {workers} training worker(s) "
                    f"({cpus_per_worker or 1:g} CPU{' and 1 GPU' if use_gpu else ''} each) for {capacity_timeout:g} s "
                    "(--capacity-timeout); the run stopped. Run the same command again when the capacity is back: "
                    "it resumes from the latest checkpoint") from error
            raise


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train propagates it to its controller
DEFAULT_START_TIMEOUT_S = 60.0  # Ray Train 2.60's own default


def capacity_attempts(capacity_timeout: float, user_start_timeout: str | None = None) -> tuple[float | None, int]:
    """(worker-group start timeout to set, or None to leave it; controller retries) that together wait about
    ``capacity_timeout`` seconds for capacity; 0 = no limit (Ray's defaults: every start retried). A start timeout
    the user set (``user_start_timeout``, the environment's) is kept and the retries are counted in it. Ray counts
    the retries over the whole run, not per outage: the timeout is the run's total wait for capacity."""
    if capacity_timeout < 0:
        raise ValueError(f"--capacity-timeout must be 0 (no limit) or more seconds, not {capacity_timeout:g}")
    if not capacity_timeout:
        return None, -1
    start = float(user_start_timeout) if user_start_timeout else min(DEFAULT_START_TIMEOUT_S, float(capacity_timeout))
    # a start that times out is retried `limit` times
    return (None if user_start_timeout else start), max(0, math.ceil(capacity_timeout / start) - 1)


def _is_capacity_error(error: BaseException) -> bool:
    """Whether Ray Train gave up on placing a worker group (a start that timed out), not on anything else: an actor
    that failed to start is Ray's own error, with its cause."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkerGroupStartupTimeoutError):
            return True
        error = getattr(error, "controller_failure", None) or error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (None: left as it is), unless the user set it."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
