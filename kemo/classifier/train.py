"""One classifier training run on Ray Train (:func:`fit`): Ray Data splits → TorchTrainer (V2) → best checkpoint.
Each worker streams its share (train in equal shares, val in disjoint ones) through a shuffle buffer seeded by (seed,
epoch, rank), so a resumed run sees what an uninterrupted one saw; augments on its device (flip and resized crop, then
Random Erasing); reports every epoch and checkpoints at each new best, every ``checkpoint_every`` epochs and the last.
A lost worker restarts the group from the latest checkpoint; a relaunch resumes from it too (:class:`CapacityLost`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import save_checkpoint
from kemo.classifier.data import DataReport
from kemo.classifier.evaluation import evaluate
from kemo.classifier.registry import create_model, load_initial_weights
from kemo.classifier.transform import InputTransform
from kemo.config import Stopped
from kemo.record import from_dict

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"
BALANCES = ("none", "weights", "sampler")
TARGETS = ("majority", "votes")
SCHEDULES = ("cosine", "constant")


@dataclass(kw_only=True)
class Recipe:
    """How every run trains: the settings a job config and each run's spec share (their defaults, the paper's)."""

    epochs: int = field(default=150, metadata={"help": "epochs per run"})
    batch_size: int = field(default=64, metadata={"help": "batch per worker"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "learning rate per epoch: cosine (to 0) or constant"})
    image_size: int = field(default=224, metadata={"help": "training input side"})
    erasing: float = field(default=0.5, metadata={"help": "Random Erasing probability"})
    init_weights: str | None = field(default=None, metadata={
        "help": "start every run from this weights file (path or s3://; matching names and shapes are copied)"})
    balance: str = field(default="none", metadata={
        "help": "class balance: none, weights (inverse-frequency loss weights) or sampler (batches resampled)"})

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule: unknown schedule {self.schedule!r}: {' or '.join(SCHEDULES)}")
        if self.balance not in BALANCES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")


@dataclass(kw_only=True)
class RunSpec(Recipe):
    """What one run trains: a model, a seed, a target and the recipe."""

    model: str = "kemotionnet"
    arguments: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    weight_decay: float = 0.0
    target: str = "majority"  # majority (the annotators' majority label) | votes (soft cross-entropy on the votes)

    @classmethod
    def of(cls, recipe: Recipe, model: str, arguments: dict[str, Any], seed: int, target: str) -> RunSpec:
        """A run of ``recipe``: its settings, each written once, in the recipe."""
        shared = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(Recipe)}
        return cls(**shared, model=model, arguments=arguments, seed=seed, target=target)


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


def array_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """In-memory photos as the training loop takes them: ``images[order]`` in batches (a plain loop's, and tests')."""
    for b in range(0, len(order), batch_size):
        idx = np.sort(order[b:b + batch_size])  # sorted: a faster gather
        yield torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


def dataset_batches(shard: Any, batch_size: int, shuffle_seed: int | None = None, target: str = "label"
                    ) -> Iterator[Batch]:
    """A Ray Data shard (``image``, ``label``, ``key``, maybe ``votes``) as the training loop takes it: photos and
    the ``target`` column; with ``shuffle_seed``, through a seeded local shuffle buffer of :func:`shuffle_buffer`
    rows. Photos stay uint8 until the device, a quarter of the bytes."""
    buffer = shuffle_buffer(batch_size) if shuffle_seed is not None else None
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2,
                                          local_shuffle_buffer_size=buffer, local_shuffle_seed=shuffle_seed):
        yield batch["image"], batch[target]


def shuffle_buffer(batch_size: int) -> int:
    """Rows a worker shuffles among: eight batches, at least 1,024 (at 224², ~150 MB of the worker's memory)."""
    return max(8 * batch_size, 1024)


def class_weights(counts: list[int]) -> list[float]:
    """Inverse-frequency weights, mean 1 over the photos (a class with none gets 0): ``n / (k · n_c)``."""
    n, k = sum(counts), sum(1 for c in counts if c)
    return [n / (k * c) if c else 0.0 for c in counts]


def learning_rate(spec: RunSpec, epoch: int) -> float:
    """``spec.schedule`` at ``epoch`` (0-based): constant, or cosine annealed to 0 at the last epoch."""
    if spec.schedule == "constant":
        return spec.lr
    return spec.lr * 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))


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
    transform = InputTransform(spec.image_size)  # training normalises with ImageNet's statistics
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    model.train()
    for images, labels in batches:
        x = transform.scale(images, device)
        y = labels.to(device, non_blocking=True)
        if spec.balance == "sampler" and weights is not None:
            per_photo = y.float() @ weights if y.is_floating_point() else weights[y]
            pick = torch.multinomial(per_photo, len(y), replacement=True, generator=generator)
            x, y = x[pick], y[pick]
        x = augment(x, generator)
        x = random_erasing(transform.normalise(x), generator, spec.erasing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = cross_entropy(model(x).float(), y, weights if spec.balance == "weights" else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += loss.detach().double() * len(y)  # no host sync per step
        sums[1] += len(y)
    return sums


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


@dataclass
class EpochMetrics:
    """What every worker reports each epoch (Ray keeps the best checkpoint by ``val_accuracy``)."""

    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float
    best_val_accuracy: float
    train_images_per_s: float | None  # every worker's photos in this worker's time: the group's rate
    epoch_seconds: float


@dataclass
class WorkerConfig:
    """What each Ray Train worker is given: crosses to the workers as ``asdict``, rebuilt there."""

    spec: RunSpec
    checkpoint_every: int
    cpus_per_worker: float = 0
    class_weights: list[float] | None = None  # per class, when ``spec.balance`` balances
    data_report: DataReport | None = None  # into each checkpoint's meta.json


@dataclass
class _Worker:
    """One worker's model, optimiser, data shares and where the run stands."""

    cfg: WorkerConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped with several workers
    net: torch.nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    weights: torch.Tensor | None
    train_shard: Any
    val_shard: Any
    start: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochMetrics as dicts (train_state.pt)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop (every worker runs it): set up, resume from the latest checkpoint, then each epoch
    trains, validates and reports."""
    _quiet_report_logs()
    worker = _setup(from_dict(WorkerConfig, config))
    _resume(worker)
    for epoch in range(worker.start, worker.cfg.spec.epochs):
        metrics = _epoch(worker, epoch)
        keep = keeps_checkpoint(epoch + 1, worker.cfg.spec.epochs, worker.cfg.checkpoint_every,
                                metrics.val_accuracy > worker.best)
        worker.best = metrics.best_val_accuracy
        worker.history.append(asdict(metrics))
        _report(worker, epoch, metrics, keep)


def _setup(cfg: WorkerConfig) -> _Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    spec = cfg.spec
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.cpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # the CPU share Ray reserved (at least 1)
    torch.manual_seed(spec.seed)
    model = create_model(spec.model, num_classes=len(CLASS_NAMES), **spec.arguments)
    if spec.init_weights:
        load_initial_weights(model, spec.init_weights)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    weights = torch.tensor(cfg.class_weights, device=device) if cfg.class_weights else None
    return _Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, model, getattr(model, "module", model),
                   optimizer, weights, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"))


def _resume(worker: _Worker) -> None:
    """Model, optimiser and history from the latest checkpoint, if the run has one (a restart or a relaunch)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
            model_state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        worker.net.load_state_dict(model_state)
        worker.optimizer.load_state_dict(state["optimizer"])
        worker.start, worker.best, worker.history = state["epoch"] + 1, state["best"], state["history"]


def _epoch(worker: _Worker, epoch: int) -> EpochMetrics:
    """One epoch (0-based) on this worker's shares: train, then validation accuracy summed over the workers."""
    spec, device = worker.cfg.spec, worker.device
    seed = spec.seed * 100_003 + epoch * 1_009 + worker.rank
    aug = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # dropout: per rank, and again on resume
    for group in worker.optimizer.param_groups:  # a function of the epoch alone: a resumed run follows the same curve
        group["lr"] = learning_rate(spec, epoch)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # train loss, train n, val correct, val n
    started = time.perf_counter()
    batches = dataset_batches(worker.train_shard, spec.batch_size, seed, "votes" if spec.target == "votes" else "label")
    sums[:2] = train_one_epoch(worker.model, worker.optimizer, batches, spec, aug, worker.weights)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started  # this worker's steps and the data they waited for
    if worker.world > 1:  # BatchNorm statistics as rank 0 has them, explicitly: evaluation bypasses the DDP wrapper
        for buffer in worker.net.buffers():
            torch.distributed.broadcast(buffer, 0)
    confusion, _ = evaluate(worker.net, dataset_batches(worker.val_shard, spec.batch_size),
                            InputTransform(spec.image_size), bf16=True)
    sums[2], sums[3] = confusion.trace(), confusion.sum()
    if worker.world > 1:
        torch.distributed.all_reduce(sums)
    val_accuracy = float(sums[2] / sums[3]) if sums[3] else 0.0
    return EpochMetrics(epoch + 1, float(sums[0] / max(sums[1], 1)), val_accuracy, max(worker.best, val_accuracy),
                        round(float(sums[1]) / train_seconds, 1) if train_seconds else None,
                        round(time.perf_counter() - started, 2))


def _report(worker: _Worker, epoch: int, metrics: EpochMetrics, keep: bool) -> None:
    """The epoch's metrics to Ray Train from every worker; rank 0 adds the checkpoint when the epoch keeps one."""
    import ray.train
    from ray.train import Checkpoint

    spec = worker.cfg.spec
    if worker.rank == 0:  # one progress line per epoch (Ray Train's worker logging forwards it to the driver once;
        # a print there is forwarded twice)
        log.info("%s seed %d epoch %d/%d | loss %.3f | val acc %.3f | best %.3f | %s img/s", spec.model, spec.seed,
                 metrics.epoch, spec.epochs, metrics.train_loss, metrics.val_accuracy, metrics.best_val_accuracy,
                 metrics.train_images_per_s)
    with tempfile.TemporaryDirectory() as d:
        if worker.rank == 0 and keep:
            data = asdict(worker.cfg.data_report) if worker.cfg.data_report else None
            save_checkpoint(d, worker.net, spec.model, spec.arguments, image_size=spec.image_size,
                            training={**asdict(spec), "workers": worker.world}, metrics=asdict(metrics), data=data)
            torch.save({"optimizer": worker.optimizer.state_dict(), "epoch": epoch, "best": worker.best,
                        "history": worker.history, "spec": asdict(spec)}, os.path.join(d, TRAIN_STATE))
            ray.train.report(asdict(metrics), checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(asdict(metrics))


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
        max_failures: int = 3, data_report: DataReport | None = None, cpus_per_worker: float = 0,
        checkpoint_every: int = 1, capacity_timeout: float = 0, class_counts: list[int] | None = None) -> Any:
    """Train one run under ``storage_uri/name`` (relaunching with the same two resumes it); returns Ray's Result,
    whose ``best_checkpoints`` hold the best-validation checkpoint. ``train`` and ``val`` are Ray Datasets of
    ``image`` (uint8 (S, S, 3) RGB at ``spec.image_size``) and ``label``, materialised or not. ``cpus_per_worker``
    (0 = Ray's default of 1) is what each worker reserves and, on CPU, how many threads its torch uses. A checkpoint
    is written at every new best validation accuracy, every ``checkpoint_every`` epochs and at the last epoch.
    ``capacity_timeout`` (seconds, 0 = wait as long as it takes, as on an autoscaling cluster) bounds the wait for
    a worker group that cannot be placed; past it the run raises :class:`CapacityLost`. ``class_counts`` (train
    photos per class) are what ``spec.balance`` balances."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(storage_uri)
    weights = class_weights(class_counts) if class_counts and spec.balance != "none" else None
    config = asdict(WorkerConfig(spec, checkpoint_every, cpus_per_worker, weights, data_report))
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
