"""The paper's Table 5 and Figure 4: every (crop output × model × target × seed) run, trained on Ray Train, calibrated
on validation and tested (:mod:`kemo.classifier.evaluation`), then reported (:mod:`kemo.classifier.report`).

    from kemo.classifier.experiment import TrainConfig, run
    run(TrainConfig(shards=("out/crops/yolo", "out/crops/none"), output="out/classify"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kemo import outputs, storage
from kemo.classifier.checkpoint import META
from kemo.classifier.data import CACHES, DataReport, TrainingData, datasets, plan
from kemo.classifier.evaluation import evaluate_on_ray
from kemo.classifier.networks import KEMOTIONNET_BLOCKS, check_blocks
from kemo.classifier.registry import MODELS
from kemo.classifier.report import REPORT, Report, Row, RunResult, plots, table5, target_pairs
from kemo.classifier.train import TARGETS, TRAIN_STATE, EpochMetrics, Recipe, RunSpec, capacity_attempts, fit
from kemo.record import from_dict
from kemo.resources import Node, check_placeable, check_shared, connect

log = logging.getLogger(__name__)
KIND = outputs.CLASSIFIER
RESULTS = "results"  # results/<run>.json per finished run: a file of the output, and what a rerun skips
SMOKE = {"epochs": 2, "seeds": 1, "image_size": 64}
FIXED_CLUSTER_CAPACITY_TIMEOUT_S = 300.0  # a lost node is not coming back by itself: say so after five minutes


@dataclass(kw_only=True)
class TrainConfig(Recipe):
    """Train K-EmotionNet and its baselines on crop shards; report the paper's Table 5 and Figure 4."""

    shards: tuple[str, ...] = field(metadata={"help": "crop outputs of jobs/preprocess.py, comma-separated (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    models: tuple[str, ...] = field(default=("kemotionnet", "resnet18", "vgg19"),
                                    metadata={"help": f"from {', '.join(MODELS)}"})
    blocks: tuple[int, ...] = field(default=KEMOTIONNET_BLOCKS, metadata={
        "help": "K-EmotionNet's basic blocks per stage (2 + 2 × their sum weighted layers: 3,4,16,3 → 54)"})
    seeds: int = field(default=3, metadata={"help": "runs per (shards, model), seeds 0..N-1"})
    min_agree: int = field(default=2, metadata={"help": "train and test on photos at least N annotators agree on"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per run"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=0, metadata={
        "help": "CPUs each worker reserves (and torch threads on CPU); 0 = CPUs / workers on CPU, 1 with GPUs"})
    max_failures: int = field(default=3, metadata={"help": "worker-group restarts per run"})
    checkpoint_every: int = field(default=10, metadata={
        "help": "a checkpoint to resume from every N epochs, besides each new best and the last (1 = every epoch)"})
    cache: str = field(default="auto", metadata={
        "help": "decoded train/val photos in Ray's object store across epochs: memory, none (decode every epoch) or "
                "auto (memory when they take at most half of the object store)"})
    capacity_timeout: float | None = field(default=None, metadata={
        "help": "seconds a run waits for nodes to hold its workers again (a node lost) before it stops; a rerun "
                f"resumes. 0 = no limit; default: no limit with an autoscaler, {FIXED_CLUSTER_CAPACITY_TIMEOUT_S:g} "
                "on a fixed cluster"})
    target: tuple[str, ...] = field(default=("majority",), metadata={
        "help": "what the models learn: majority (the annotators' majority label) and/or votes (soft cross-entropy "
                "on the three votes); majority,votes trains and reports both"})
    target_accuracy: float = field(default=0.9, metadata={
        "help": "the validation accuracy the abstention threshold keeps (stored in each checkpoint's meta.json; "
                "jobs/label.py --abstain uses it)"})
    smoke_test: bool = field(default=False, metadata={"help": f"a quick check: {SMOKE}"})

    def __post_init__(self) -> None:  # every flag refused here, before anything starts
        super().__post_init__()
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
        check_blocks(self.blocks)
        if self.cache not in CACHES:
            raise ValueError(f"--cache must be one of {', '.join(CACHES)}, not {self.cache!r}")
        if not self.target or not set(self.target) <= set(TARGETS) or len(set(self.target)) < len(self.target):
            raise ValueError(f"--target takes {' and/or '.join(TARGETS)}, each once, not {','.join(self.target)!r}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"--target-accuracy must lie in (0, 1], not {self.target_accuracy:g}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1 epoch, not {self.checkpoint_every}")
        if self.capacity_timeout is not None:
            capacity_attempts(self.capacity_timeout)

    def smoke(self) -> TrainConfig:
        """The quick check ``--smoke-test`` runs: :data:`SMOKE`'s epochs and seeds, photos at most its size."""
        return dataclasses.replace(self, epochs=SMOKE["epochs"], seeds=SMOKE["seeds"],
                                   image_size=min(self.image_size, SMOKE["image_size"]))


def run(cfg: TrainConfig) -> Report:
    """Train and test every (shards, model, target, seed); write and commit the report, which it returns. A rerun
    that finds the same report committed writes nothing."""
    t0 = time.perf_counter()
    cfg = cfg.smoke() if cfg.smoke_test else cfg
    planned = plan_runs(cfg)
    out = outputs.Output(cfg.output, KIND)
    if out.current(planned.fingerprint) is not None:
        log.info("%s already holds this report, committed: nothing trained, nothing written", cfg.output)
        return Report.read(out)
    with out.lease() as lease:
        results, data, receipts = _work(cfg, out, planned)
        report = _reconcile(cfg, results, data)
        report.seconds = round(time.perf_counter() - t0, 1)
        _commit(cfg, out, lease, planned, report, results, receipts)
    return report


# ------------------------------------------------------------------------------------------------------------ plan


@dataclass
class PlannedRun:
    model: str
    seed: int
    spec: RunSpec
    name: str  # <preprocessing>-<model>[-votes]-seed<k>-<hash of the spec and the crops' content>


@dataclass
class Plan:
    shards: dict[str, str]  # preprocessing tag → crop output
    runs: dict[str, list[PlannedRun]]  # preprocessing tag → its runs
    fingerprint: dict[str, Any]  # what the committed report is of


def plan_runs(cfg: TrainConfig) -> Plan:
    """Every run, named after its spec and the crops' content (other settings or other crops never resume it)."""
    # the default layout is the architecture's own default (no argument), as timm records its models' defaults
    arguments = {"kemotionnet": {} if tuple(cfg.blocks) == KEMOTIONNET_BLOCKS else {"blocks": list(cfg.blocks)}}
    tags = _tags(list(cfg.shards))
    runs: dict[str, list[PlannedRun]] = {tag: [] for tag in tags}
    for shards, tag in zip(cfg.shards, tags):
        data_key = _data_key(shards, cfg.min_agree)
        for model in cfg.models:
            for target in cfg.target:
                for seed in range(cfg.seeds):
                    spec = RunSpec.of(cfg, model, arguments.get(model, {}), seed, target)
                    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), data_key], sort_keys=True).encode())
                    kind = "" if target == "majority" else f"-{target}"
                    name = f"{tag}-{model}{kind}-seed{seed}-{key.hexdigest()[:10]}"
                    runs[tag].append(PlannedRun(model, seed, spec, name))
    # the target accuracy sets each checkpoint's threshold: another one calibrates the runs again, trains none
    fingerprint = {"runs": [r.name for planned in runs.values() for r in planned], "min_agree": cfg.min_agree,
                   "target_accuracy": cfg.target_accuracy}
    return Plan(dict(zip(tags, cfg.shards)), runs, fingerprint)


def _tags(shards: list[str]) -> list[str]:
    """The preprocessing each crop output used (its detector), for names and tables; the folder name added where
    two used the same."""
    tags = [_tag(x) for x in shards]
    tags = [t if tags.count(t) == 1 else f"{t}-{os.path.basename(x.rstrip('/'))}" for t, x in zip(tags, shards)]
    if len(set(tags)) != len(tags):
        raise ValueError(f"crop outputs must differ in detector or folder name: {shards}")
    return tags


def _tag(shards: str) -> str:
    try:
        return storage.read_json(storage.join(shards, outputs.CONFIG))["config"]["detector"]
    except (FileNotFoundError, KeyError):
        return os.path.basename(shards.rstrip("/"))


def _data_key(shards: str, min_agree: int) -> str:
    """What a run's result depends on besides its spec: the crops' content (their commit's file hashes, never a
    time) and the label filter."""
    content = outputs.Output(shards, outputs.CROPS).committed().get("content_sha256")
    if content is None:
        raise ValueError(f"{shards} was committed by another kemo version, without content hashes: run "
                         "jobs/preprocess.py into a new output")
    return hashlib.sha256(f"{content}\0{min_agree}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ work


def _work(cfg: TrainConfig, out: outputs.Output, planned: Plan
          ) -> tuple[list[RunResult], dict[str, DataReport], list[outputs.Receipt]]:
    """Every planned run that has no current result trained and/or calibrated; returns every run's result (in plan
    order), the data each preprocessing used, and the receipts of every ``results/<run>.json``."""
    cluster: _Cluster | None = None  # Ray, and workers sized for its nodes, only once a run needs them
    results, data_reports, receipts = [], {}, []
    for tag, runs in planned.runs.items():
        finished, current = _finished(out, runs, cfg.target_accuracy)
        receipts += current.values()
        todo = [r for r in runs if r.name not in current]
        if not todo:
            data_reports[tag] = finished[runs[0].name].data
            results += [finished[r.name] for r in runs]
            continue
        training = any(r.name not in finished for r in todo)
        data = plan(planned.shards[tag], cfg.image_size, cfg.min_agree)  # small columns: no Ray, no pixels
        _check_data(data, [r for r in todo if r.name not in finished])
        if cluster is None or (training and not cluster.training):
            cluster = _cluster(cfg, training)
        # calibrating finished runs needs val and test only: the train split is neither decoded nor cached
        splits, decision = datasets(data, cfg.cache, train=training)
        data_reports[tag] = dataclasses.replace(data.report, cache=decision)
        for r in runs:
            if r.name in current:
                results.append(finished[r.name])
                continue
            if r.name in finished:
                result = _recalibrate(cfg, out, finished[r.name], splits, data_reports[tag])
            else:
                result = _train_one(cfg, out, cluster, data, splits, data_reports[tag], tag, r)
            receipts.append(out.write_json(f"{RESULTS}/{r.name}.json", dataclasses.asdict(result)))
            results.append(result)
        del splits  # the cached photos leave the object store
    return results, data_reports, receipts


def _finished(out: outputs.Output, runs: list[PlannedRun], target_accuracy: float
              ) -> tuple[dict[str, RunResult], dict[str, outputs.Receipt]]:
    """The runs that finished (their results), and the receipts of those calibrated for this target accuracy."""
    finished, current = {}, {}
    for r in runs:
        path = out.path(RESULTS, f"{r.name}.json")
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            continue
        finished[r.name] = from_dict(RunResult, json.loads(data), path)
        if finished[r.name].abstention.target_accuracy == target_accuracy:
            current[r.name] = outputs.Receipt.of(f"{RESULTS}/{r.name}.json", data)
    return finished, current


def _check_data(data: TrainingData, training: list[PlannedRun]) -> None:
    """Refused before Ray starts: a split without a photo, or votes asked of crops without any."""
    if not all(data.photos(s) for s in ("train", "val", "test")):
        raise ValueError(f"{data.shards}: a split has no usable photo: "
                         f"{ {s: dataclasses.asdict(c) for s, c in data.report.splits.items()} }")
    if any(r.spec.target == "votes" for r in training):
        data.check_votes()


def _recalibrate(cfg: TrainConfig, out: outputs.Output, result: RunResult, splits: dict[str, Any],
                 data_report: DataReport) -> RunResult:
    """A finished run calibrated again for another target accuracy (its temperature kept), not trained again."""
    log.info("calibrating %s", result.name)
    if not storage.exists(storage.join(result.checkpoint, META)):
        raise ValueError(f"{result.name} finished, but its checkpoint {result.checkpoint} is gone, so it cannot be "
                         f"calibrated: remove {out.path(RESULTS, result.name + '.json')} to train it again")
    tested = evaluate_on_ray(result.checkpoint, splits["val"], splits["test"], cfg.target_accuracy, cfg.use_gpu)
    return dataclasses.replace(result, data=data_report, **vars(tested))


def _train_one(cfg: TrainConfig, out: outputs.Output, cluster: _Cluster, data: TrainingData, splits: dict[str, Any],
               data_report: DataReport, tag: str, planned: PlannedRun) -> RunResult:
    """One run trained (or resumed), calibrated and tested."""
    log.info("training %s", planned.name)
    cpus = cpus_per_worker(cfg, cluster.nodes, streamed=not data_report.cache.cached)
    result = fit(splits["train"], splits["val"], planned.spec, out.path("runs"), planned.name,
                 workers=cfg.workers, use_gpu=cfg.use_gpu, max_failures=cfg.max_failures, data_report=data_report,
                 cpus_per_worker=cpus, checkpoint_every=cfg.checkpoint_every,
                 capacity_timeout=cluster.capacity_timeout, class_counts=data.counts["train"])
    (best, best_metrics), = result.best_checkpoints
    checkpoint = _uri(best, cfg.output)
    tested = evaluate_on_ray(checkpoint, splits["val"], splits["test"], cfg.target_accuracy, cfg.use_gpu)
    with result.checkpoint.as_directory() as d:  # the latest: its history has every epoch
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    return RunResult(planned.name, tag, planned.model, planned.spec.target, planned.seed, planned.spec, checkpoint,
                     from_dict(EpochMetrics, best_metrics), **vars(tested),
                     history=[from_dict(EpochMetrics, h) for h in history], data=data_report)


def _uri(checkpoint: Any, output: str) -> str:
    """A checkpoint's location as kemo.storage reads it (Ray gives S3 paths without their scheme)."""
    return f"s3://{checkpoint.path}" if storage.is_s3(output) else checkpoint.path


@dataclass
class _Cluster:
    nodes: list[Node]
    capacity_timeout: float
    training: bool  # checked for training workers (calibrating finished runs needs none)


def _cluster(cfg: TrainConfig, training: bool = True) -> _Cluster:
    """Ray started (or joined), its nodes, and the wait for lost capacity: no limit where an autoscaler can start
    nodes, :data:`FIXED_CLUSTER_CAPACITY_TIMEOUT_S` where none can."""
    nodes = connect()
    check_shared({**{f"--shards {i + 1}": x for i, x in enumerate(cfg.shards)}, "--output": cfg.output,
                  "--init-weights": cfg.init_weights}, len(nodes),
                 "Ray Data tasks and training workers on other nodes read and write it")
    timeout = cfg.capacity_timeout
    if timeout is None:
        timeout = 0.0 if any(n.launchable for n in nodes) else FIXED_CLUSTER_CAPACITY_TIMEOUT_S
    if training:
        cpus_per_worker(cfg, nodes)  # a worker that no node can hold is refused before any crop is read
    return _Cluster(nodes, timeout, training)


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


# ------------------------------------------------------------------------------------------------ reconcile, commit


def _reconcile(cfg: TrainConfig, results: list[RunResult], data: dict[str, DataReport]) -> Report:
    """The report over every run: a row per (preprocessing, model, target), majority against votes, the runs."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.preprocessing, r.model, r.target), []).append(r)
    rows = [Row.of(tag, model, target, runs, data[tag]) for (tag, model, target), runs in groups.items()]
    return Report(
        rows, target_pairs(rows), [r.summary() for r in results], data, "test (person-disjoint, from the index)",
        f"annotators' majority with agree_n >= {cfg.min_agree}; unknown labels left out",
        "temperature fitted on val (NLL); ECE over 15 equal-width bins of the top confidence; test figures before "
        "and after",
        "how often one annotator's vote matches the other two's, where those two agree, on the test photos "
        "(data.<preprocessing>.annotators)",
        dataclasses.asdict(cfg))


def _commit(cfg: TrainConfig, out: outputs.Output, lease: outputs.Lease, planned: Plan, report: Report,
            results: list[RunResult], receipts: list[outputs.Receipt]) -> None:
    """``report.json``, ``table5.md`` and the plots of the best run (chosen on validation, never on test), then the
    commit that makes them current."""
    out.uncommit()
    best = max(results, key=lambda r: r.best_val.val_accuracy)
    files = [*receipts, out.write_json(REPORT, report.as_json()),
             out.write_file("table5.md", table5(report.rows, report.targets).encode()), *plots(best, out)]
    lease.check()
    out.commit(files, dataclasses.asdict(cfg), planned.fingerprint)
