"""The paper's Table 5 and Figure 4: every (crop shards × model × seed) run, evaluated on the test split, and reported.

    from kemo.classifier.experiment import TrainConfig, run
    run(TrainConfig(shards=("out/crops/yolo", "out/crops/none"), output="out/classify"))

For each crop output the driver counts the usable crops from the shards' small columns; Ray Data tasks read, order and
decode the crops, once for every run of those shards when they fit the object store (``--cache``,
:mod:`kemo.classifier.data`); each model is trained once per seed on Ray Train (:func:`kemo.classifier.train.fit`,
under ``OUTPUT/runs/<preprocessing>-<model>-seed<k>``), and its best-validation checkpoint is evaluated on the test
split in a Ray task (:func:`evaluate_checkpoint`, the same evaluation pass as validation's). The driver never holds
pixels. A run is named after its spec and the crops' content, so other settings or other crops never resume it;
one that finished is not trained again (its ``results/<run>.json``), an interrupted one resumes from its last
checkpoint, and a rerun that finds the same report committed writes nothing.
Output: ``report.json`` (data used, every run, accuracy and macro-F1 mean ± std over seeds, per-class
precision/recall/F1 and confusion matrix of the best run of each row), ``table5.md``, ``confusion.png`` and
``curves.png`` (the best run overall), ``config.json``, and last ``_commit.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kemo import outputs, storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import load_checkpoint
from kemo.classifier.data import CACHES, TrainingData, datasets, plan, resize_square
from kemo.classifier.metrics import classification_report
from kemo.classifier.networks import KEMOTIONNET_BLOCKS
from kemo.classifier.registry import MODELS
from kemo.classifier.train import BALANCES, TRAIN_STATE, RunSpec, capacity_attempts, evaluate, fit, learning_rate
from kemo.resources import Node, check_placeable, check_shared, connect

log = logging.getLogger(__name__)
KIND = outputs.CLASSIFIER
RESULTS = "results"  # results/<run>.json per finished run: a file of the output, and what a rerun skips
REPORT = "report.json"
SMOKE = {"epochs": 2, "seeds": 1, "image_size": 64}
FIXED_CLUSTER_CAPACITY_TIMEOUT_S = 300.0  # a lost node is not coming back by itself: say so after five minutes


@dataclass
class TrainConfig:
    """Train K-EmotionNet and its baselines on crop shards; report the paper's Table 5 and Figure 4."""

    shards: tuple[str, ...] = field(metadata={"help": "crop outputs of jobs/preprocess.py, comma-separated (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    models: tuple[str, ...] = field(default=("kemotionnet", "resnet18", "vgg19"),
                                    metadata={"help": f"from {', '.join(MODELS)}"})
    blocks: tuple[int, ...] = field(default=KEMOTIONNET_BLOCKS, metadata={
        "help": "K-EmotionNet's basic blocks per stage (2 + 2 × their sum weighted layers: 3,4,16,3 → 54)"})
    seeds: int = field(default=3, metadata={"help": "runs per (shards, model), seeds 0..N-1"})
    epochs: int = field(default=150, metadata={"help": "epochs per run"})
    batch_size: int = field(default=64, metadata={"help": "batch per worker"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "learning rate per epoch: cosine (to 0) or constant"})
    image_size: int = field(default=224, metadata={"help": "training input side"})
    erasing: float = field(default=0.5, metadata={"help": "Random Erasing probability"})
    min_agree: int = field(default=2, metadata={"help": "train and test on photos at least N annotators agree on"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per run"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=0, metadata={
        "help": "CPUs each worker reserves (and torch threads on CPU); 0 = CPUs / workers on CPU, 1 with GPUs"})
    init_weights: str | None = field(default=None, metadata={
        "help": "start every run from this weights file (path or s3://; matching names and shapes are copied)"})
    max_failures: int = field(default=3, metadata={"help": "worker-group restarts per run"})
    checkpoint_every: int = field(default=10, metadata={
        "help": "a checkpoint to resume from every N epochs, besides each new best and the last (1 = every epoch)"})
    cache: str = field(default="auto", metadata={
        "help": "decoded train/val photos in Ray's object store across epochs: memory, none (decode every epoch) or "
                "auto (memory when they take at most half of the object store)"})
    balance: str = field(default="none", metadata={
        "help": "class balance: none, weights (inverse-frequency loss weights) or sampler (batches resampled)"})
    capacity_timeout: float | None = field(default=None, metadata={
        "help": "seconds a run waits for nodes to hold its workers again (a node lost) before it stops; a rerun "
                f"resumes. 0 = no limit; default: no limit with an autoscaler, {FIXED_CLUSTER_CAPACITY_TIMEOUT_S:g} "
                "on a fixed cluster"})
    smoke_test: bool = field(default=False, metadata={"help": f"a quick check: {SMOKE}"})

    def __post_init__(self) -> None:  # flag errors before anything starts
        if self.cache not in CACHES:
            raise ValueError(f"--cache must be one of {', '.join(CACHES)}, not {self.cache!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")
        if self.capacity_timeout is not None:
            capacity_attempts(self.capacity_timeout)


def _tag(shards: str) -> str:
    """The preprocessing a crop output used (its detector), for names and tables."""
    try:
        return storage.read_json(storage.join(shards, outputs.CONFIG))["config"]["detector"]
    except (FileNotFoundError, KeyError):
        return os.path.basename(shards.rstrip("/"))


def evaluate_checkpoint(path: str, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class figures and the confusion matrix of a checkpoint on batches of (uint8 photos,
    labels), resized to the checkpoint's input size if they are not at it, in fp32."""
    model, meta = load_checkpoint(path, "cuda" if torch.cuda.is_available() else "cpu")
    size = meta["image_size"]

    def at_size() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in batches:
            images = np.asarray(images)
            if images.shape[1:3] != (size, size):
                images = np.stack([resize_square(image, size) for image in images])
            elif not images.flags.writeable:  # Ray Data's zero-copy view: torch wants memory it may write
                images = images.copy()
            yield torch.from_numpy(images), torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    confusion, _ = evaluate(model, at_size(), normalize=meta["normalize"], num_classes=len(meta["classes"]))
    return classification_report(confusion.cpu().numpy(), meta["classes"])


def _test_task(checkpoint: str, test: Any) -> dict[str, Any]:
    """Ray task: a checkpoint on the test split, streamed from its dataset (the driver never holds the photos)."""
    batches = ((b["image"], b["label"]) for b in test.iter_batches(batch_size=256, batch_format="numpy"))
    return evaluate_checkpoint(checkpoint, batches)


def evaluate_on_ray(checkpoint: str, test: Any, use_gpu: bool) -> dict[str, Any]:
    import ray

    # no CPU reserved: the Ray Data tasks that read and decode the test photos for it need the CPUs
    task = ray.remote(num_cpus=0, num_gpus=1 if use_gpu else 0, max_retries=2)(_test_task)
    return ray.get(task.remote(checkpoint, test))


def cpus_per_worker(cfg: TrainConfig, nodes: list[Node], streamed: bool = False) -> float:
    """What each worker reserves: given, or on CPU an equal share of the alive nodes' CPUs (at most one node's), so
    that torch in each worker uses its cores instead of Ray's default of one. A worker that no node (alive, or a type
    the autoscaler can start) can hold is refused here, not left waiting. ``streamed`` (the splits are not cached):
    Ray Data's read and decode tasks run while the workers train, so one CPU is left to them; where the workers would
    take every CPU of a cluster that cannot grow, the run is refused (Ray Data would wait for a CPU for ever)."""
    alive = [n.cpus for n in nodes if not n.launchable]
    data_cpus = 1 if streamed else 0
    if cfg.cpus_per_worker:
        cpus = cfg.cpus_per_worker
    elif cfg.use_gpu:
        cpus = 1
    else:
        cpus = max(1, min(int((sum(alive) - data_cpus) // cfg.workers), int(max(alive, default=1))))
    check_placeable(cpus, 1 if cfg.use_gpu else 0, nodes, "training worker", "--cpus-per-worker or --use-gpu")
    if streamed and not any(n.launchable for n in nodes) and sum(alive) - cfg.workers * cpus < data_cpus:
        raise ValueError(f"the photos are decoded every epoch (--cache {cfg.cache}: not cached), by Ray Data tasks "
                         f"that need a CPU beside the {cfg.workers} training worker(s) of {cpus:g} CPU, and the "
                         f"cluster has {sum(alive):g}: lower --cpus-per-worker, or give --cache memory")
    return cpus


def _uri(checkpoint: Any, output: str) -> str:
    """A checkpoint's location as kemo.storage reads it (Ray gives S3 paths without their scheme)."""
    return f"s3://{checkpoint.path}" if storage.is_s3(output) else checkpoint.path


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def table5(rows: list[dict[str, Any]]) -> str:
    lines = ["| Preprocessing | Model | Test accuracy (%) | Macro-F1 (%) | Runs |", "|---|---|---:|---:|---:|"]
    for r in rows:
        a, f = r["accuracy"], r["macro_f1"]
        lines.append(f"| {r['preprocessing']} | {r['model']} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
                     f"{100 * f['mean']:.2f} ± {100 * f['std']:.2f} | {a['n']} |")
    return "\n".join(lines) + "\n"


def _plots(best: dict[str, Any], out: outputs.Output) -> list[outputs.Receipt]:
    import matplotlib

    matplotlib.use("Agg")
    import io

    from matplotlib import pyplot as plt

    written = []
    cm = np.asarray(best["test"]["confusion_matrix"], np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "k")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("annotators' majority")
    ax.set_title(f"{best['preprocessing']} · {best['model']} · seed {best['seed']}: "
                 f"test accuracy {100 * best['test']['accuracy']:.1f}%")
    fig.tight_layout()
    for name, figure in (("confusion.png", fig), ("curves.png", _curves(best, plt))):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        plt.close(figure)
        written.append(out.write_file(name, buffer.getvalue()))
    return written


def _curves(best: dict[str, Any], plt) -> Any:
    history = best["history"]
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], color="tab:orange", label="validation accuracy")
    ax2.set_ylabel("validation accuracy")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train and test every (shards, model, seed); write and commit the report. Returns ``report.json``'s content."""
    t0 = time.perf_counter()
    if cfg.smoke_test:
        cfg = dataclasses.replace(cfg, epochs=SMOKE["epochs"], seeds=SMOKE["seeds"],
                                  image_size=min(cfg.image_size, SMOKE["image_size"]))
    models = list(cfg.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    learning_rate(RunSpec(schedule=cfg.schedule), 0)  # an unknown schedule fails here, not in every worker
    if cfg.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1 epoch, not {cfg.checkpoint_every}")
    blocks = list(cfg.blocks)
    MODELS["kemotionnet"](blocks=blocks)  # a bad layout fails here, not in every worker
    # the default layout is the architecture's own default (no argument), as timm records its models' defaults
    arguments = {"kemotionnet": {} if tuple(blocks) == KEMOTIONNET_BLOCKS else {"blocks": blocks}}
    shard_list = list(cfg.shards)
    tags = [_tag(x) for x in shard_list]
    tags = [t if tags.count(t) == 1 else f"{t}-{os.path.basename(x.rstrip('/'))}" for t, x in zip(tags, shard_list)]
    if len(set(tags)) != len(tags):
        raise ValueError(f"crop outputs must differ in detector or folder name: {shard_list}")
    plan_of = {tag: [] for tag in tags}  # tag → [(model, seed, spec, run name)]
    for shards, tag in zip(shard_list, tags):
        data_key = _data_key(shards, cfg.min_agree)
        for model in models:
            for seed in range(cfg.seeds):
                spec = RunSpec(model=model, arguments=arguments.get(model, {}), seed=seed, epochs=cfg.epochs,
                               batch_size=cfg.batch_size, lr=cfg.lr, erasing=cfg.erasing,
                               image_size=cfg.image_size, init_weights=cfg.init_weights, schedule=cfg.schedule,
                               balance=cfg.balance)
                keyed = {k: v for k, v in dataclasses.asdict(spec).items() if (k, v) != ("balance", "none")}
                # (balance none is how every run trained before the option: their names stay theirs)
                key = hashlib.sha256(json.dumps([keyed, data_key], sort_keys=True).encode())
                # other settings or other crops never resume this run
                plan_of[tag].append((model, seed, spec, f"{tag}-{model}-seed{seed}-{key.hexdigest()[:10]}"))
    out = outputs.Output(cfg.output, KIND)
    fingerprint = {"runs": [name for runs in plan_of.values() for *_, name in runs], "min_agree": cfg.min_agree}
    if out.current(fingerprint) is not None:
        log.info("%s already holds this report, committed: nothing trained, nothing written", cfg.output)
        return out.read_json(REPORT)
    with out.lease() as lease:
        report, files = _train_and_test(cfg, out, dict(zip(tags, shard_list)), plan_of)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out.uncommit()
        files += [out.write_json(REPORT, report),
                  out.write_file("table5.md", table5(report["rows"]).encode()),
                  *_plots(max(report["best_of"], key=lambda r: r["best_val"]["val_accuracy"]), out)]
        del report["best_of"]
        lease.check()
        out.commit(files, dataclasses.asdict(cfg), fingerprint)
    return report


def _data_key(shards: str, min_agree: int) -> str:
    """What a run's result depends on besides its spec: the crops' content (their commit's file hashes, never a
    time) and the label filter."""
    content = outputs.Output(shards, outputs.CROPS).committed().get("content_sha256")
    if content is None:
        raise ValueError(f"{shards} was committed by an older kemo, without content hashes: run jobs/preprocess.py "
                         "into it again")
    return hashlib.sha256(f"{content}\0{min_agree}".encode()).hexdigest()


def _train_and_test(cfg: TrainConfig, out: outputs.Output, shard_of: dict[str, str],
                    plan_of: dict[str, list[tuple[str, int, RunSpec, str]]]
                    ) -> tuple[dict[str, Any], list[outputs.Receipt]]:
    """Every planned run that has no result yet, trained and tested; returns the report (with ``best_of``, the
    runs the plots may show) and the receipts of every run's result.json."""
    runs_dir = out.path("runs")
    cluster = None  # Ray, and the workers sized for its nodes, only once a run needs training
    rows, all_runs, data_reports, receipts = [], [], {}, []
    for tag, planned in plan_of.items():
        shards = shard_of[tag]
        results: dict[str, dict[str, Any]] = {}
        for *_, name in planned:
            try:
                data = storage.read_bytes(out.path(RESULTS, f"{name}.json"))
            except FileNotFoundError:
                continue
            results[name] = json.loads(data)
            receipts.append(outputs.Receipt.of(f"{RESULTS}/{name}.json", data))
        splits: dict[str, Any] = {}
        if len(results) < len(planned):  # read the crops only when a run needs them
            data = plan(shards, cfg.image_size, cfg.min_agree)  # small columns: no Ray, no pixels
            if not all(data.photos(s) for s in ("train", "val", "test")):
                raise ValueError(f"{shards}: a split has no usable photo: {data.report['splits']}")
            if cluster is None:
                cluster = _cluster(cfg)
            splits, decision = datasets(data, cfg.cache)
            data_report = {**data.report, "cache": decision}
        else:
            data = None
            data_report = next(iter(results.values()))["data"]
        data_reports[tag] = data_report
        by_model: dict[str, list[dict[str, Any]]] = {}
        for model, seed, spec, name in planned:
            if name not in results:
                results[name] = _train_one(cfg, cluster, data, splits, data_report, tag, model, seed, spec,
                                           runs_dir, name)
                receipts.append(out.write_json(f"{RESULTS}/{name}.json", results[name]))
            by_model.setdefault(model, []).append(results[name])
        del splits  # the cached photos leave the object store
        for model, runs in by_model.items():
            all_runs.extend(runs)
            top = max(runs, key=lambda r: r["best_val"]["val_accuracy"])
            rows.append({"preprocessing": tag, "model": model,
                         "accuracy": _mean_std([r["test"]["accuracy"] for r in runs]),
                         "macro_f1": _mean_std([r["test"]["macro_f1"] for r in runs]),
                         "best_run": top["name"], "per_class": top["test"]["per_class"],
                         "confusion_matrix": top["test"]["confusion_matrix"]})
    report = {"rows": rows, "runs": [{k: v for k, v in r.items() if k not in ("history", "data")} for r in all_runs],
              "data": data_reports, "split": "test (person-disjoint, from the index)",
              "label_filter": f"annotators' majority with agree_n >= {cfg.min_agree}; unknown labels left out",
              "config": dataclasses.asdict(cfg), "best_of": all_runs}  # chosen on validation, never on test
    return report, receipts


@dataclass
class _Cluster:
    nodes: list[Node]
    capacity_timeout: float


def _cluster(cfg: TrainConfig) -> _Cluster:
    """Ray started (or joined), its nodes, and the wait for lost capacity: no limit where an autoscaler can start
    nodes, :data:`FIXED_CLUSTER_CAPACITY_TIMEOUT_S` where none can."""
    nodes = connect()
    check_shared({**{f"--shards {i + 1}": x for i, x in enumerate(cfg.shards)}, "--output": cfg.output,
                  "--init-weights": cfg.init_weights}, len(nodes),
                 "Ray Data tasks and training workers on other nodes read and write it")
    timeout = cfg.capacity_timeout
    if timeout is None:
        timeout = 0.0 if any(n.launchable for n in nodes) else FIXED_CLUSTER_CAPACITY_TIMEOUT_S
    cpus_per_worker(cfg, nodes)  # a worker that no node can hold is refused before any crop is read
    return _Cluster(nodes, timeout)


def _train_one(cfg: TrainConfig, cluster: _Cluster, data: TrainingData, splits: dict[str, Any],
               data_report: dict[str, Any], tag: str, model: str, seed: int, spec: RunSpec, runs_dir: str,
               name: str) -> dict[str, Any]:
    """One run trained (or resumed) and tested: its result.json's content."""
    log.info("training %s", name)
    cpus = cpus_per_worker(cfg, cluster.nodes, streamed=not data_report["cache"]["cached"])
    result = fit(splits["train"], splits["val"], spec, runs_dir, name, workers=cfg.workers, use_gpu=cfg.use_gpu,
                 max_failures=cfg.max_failures, data_report=data_report, cpus_per_worker=cpus,
                 checkpoint_every=cfg.checkpoint_every, capacity_timeout=cluster.capacity_timeout,
                 class_counts=data.counts["train"])
    (best, best_metrics), = result.best_checkpoints
    tested = evaluate_on_ray(_uri(best, cfg.output), splits["test"], cfg.use_gpu)
    with result.checkpoint.as_directory() as d:  # the latest: its history has every epoch
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    return {"name": name, "preprocessing": tag, "model": model, "seed": seed, "spec": dataclasses.asdict(spec),
            "checkpoint": _uri(best, cfg.output), "best_val": best_metrics, "test": tested, "history": history,
            "data": data_report}
