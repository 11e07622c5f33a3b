"""The paper's Table 5 and Figure 4: every (crop shards × model × seed) run, evaluated on the test split, and reported.

    from kemo.classifier.experiment import TrainConfig, run
    run(TrainConfig(shards=("out/crops/yolo", "out/crops/none"), output="out/classify"))

For each crop output the driver counts the usable crops from the shards' small columns; Ray Data tasks read, order and
decode the crops, once for every run of those shards when they fit the object store (``--cache``,
:mod:`kemo.classifier.data`); each model is trained once per seed on Ray Train (:func:`kemo.classifier.train.fit`,
under ``OUTPUT/runs/<preprocessing>-<model>-seed<k>``), and its best-validation checkpoint is evaluated on the test
split in a Ray task (:func:`calibrate_and_test`): a temperature is fitted on the validation split and stored in the
checkpoint's ``meta.json`` with the confidence threshold that keeps ``--target-accuracy`` on validation (what
``jobs/label.py --abstain`` uses), and the test split is scored before and after it. The driver never holds pixels.
A run is named after its spec and the crops' content, so other settings or other crops never resume it; one that
finished is not trained again (its ``results/<run>.json``), an interrupted one resumes from its last
checkpoint, and a rerun that finds the same report committed writes nothing.
Rows are (preprocessing, model, target): ``--target majority,votes`` trains both and compares them.
Output: ``report.json`` (data used with the annotators' own agreement on the test photos, every run, accuracy,
macro-F1, ECE/NLL/Brier before and after the temperature as mean ± std over seeds, per-class precision/recall/F1,
confusion matrix and accuracy at 50/80/90/100% coverage of the best run of each row, majority against votes),
``table5.md`` (with the coverage table of each row's best run), ``results/<run>.json``, ``confusion.png``,
``curves.png``, ``reliability.png`` and ``coverage.png`` (the best run overall), ``config.json``, and last
``_commit.json``.
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
from kemo.classifier import calibration
from kemo.classifier.checkpoint import META, load_checkpoint
from kemo.classifier.data import CACHES, TrainingData, datasets, plan, resize_square
from kemo.classifier.metrics import classification_report, confusion_matrix
from kemo.classifier.networks import KEMOTIONNET_BLOCKS
from kemo.classifier.registry import MODELS
from kemo.classifier.train import (
    BALANCES,
    TARGETS,
    TRAIN_STATE,
    RunSpec,
    capacity_attempts,
    fit,
    learning_rate,
    predict,
)
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
    target: tuple[str, ...] = field(default=("majority",), metadata={
        "help": "what the models learn: majority (the annotators' majority label) and/or votes (soft cross-entropy "
                "on the three votes); majority,votes trains and reports both"})
    target_accuracy: float = field(default=0.9, metadata={
        "help": "the validation accuracy the abstention threshold keeps (stored in each checkpoint's meta.json; "
                "jobs/label.py --abstain uses it)"})
    smoke_test: bool = field(default=False, metadata={"help": f"a quick check: {SMOKE}"})

    def __post_init__(self) -> None:  # flag errors before anything starts
        if self.cache not in CACHES:
            raise ValueError(f"--cache must be one of {', '.join(CACHES)}, not {self.cache!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")
        if not self.target or not set(self.target) <= set(TARGETS) or len(set(self.target)) < len(self.target):
            raise ValueError(f"--target takes {' and/or '.join(TARGETS)}, each once, not {','.join(self.target)!r}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"--target-accuracy must lie in (0, 1], not {self.target_accuracy:g}")
        if self.capacity_timeout is not None:
            capacity_attempts(self.capacity_timeout)


def _tag(shards: str) -> str:
    """The preprocessing a crop output used (its detector), for names and tables."""
    try:
        return storage.read_json(storage.join(shards, outputs.CONFIG))["config"]["detector"]
    except (FileNotFoundError, KeyError):
        return os.path.basename(shards.rstrip("/"))


Batches = Iterable[tuple[np.ndarray, np.ndarray]]  # (uint8 photos, labels)


def _at_size(batches: Batches, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in batches:
        images = np.asarray(images)
        if images.shape[1:3] != (size, size):
            images = np.stack([resize_square(image, size) for image in images])
        elif not images.flags.writeable:  # Ray Data's zero-copy view: torch wants memory it may write
            images = images.copy()
        yield torch.from_numpy(images), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _logits(model: torch.nn.Module, meta: dict[str, Any], batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    return predict(model, _at_size(batches, meta["image_size"]), meta["normalize"])


def _report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    predicted = logits.argmax(1) if len(labels) else np.zeros(0, np.int64)
    return classification_report(confusion_matrix(labels, predicted, len(classes)), classes)


def evaluate_checkpoint(path: str, batches: Batches) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class figures and the confusion matrix of a checkpoint on batches of (uint8 photos,
    labels), resized to the checkpoint's input size if they are not at it, in fp32."""
    model, meta = load_checkpoint(path, "cuda" if torch.cuda.is_available() else "cpu")
    return _report(*_logits(model, meta, batches), meta["classes"])


COVERAGE_CURVE = tuple(k / 100 for k in range(1, 101))  # the risk-coverage curve, at every 1% of coverage


def calibrate_and_test(path: str, val: Batches, test: Batches, target_accuracy: float) -> dict[str, Any]:
    """A checkpoint's temperature fitted on ``val`` and stored in its ``meta.json`` (with the abstention threshold
    that keeps ``target_accuracy`` on ``val``); its test figures: the classification report (arg-max, which the
    temperature does not change), calibration before and after (ECE, NLL, Brier, reliability bins), accuracy against
    coverage, and the test photos kept at the validation threshold. Confidences are the top calibrated probability."""
    model, meta = load_checkpoint(path, "cuda" if torch.cuda.is_available() else "cpu")
    val_logits, val_labels = _logits(model, meta, val)
    test_logits, test_labels = _logits(model, meta, test)
    if not len(val_labels) or not len(test_labels):
        raise ValueError(f"{path}: no validation or no test photo decodes: damaged shards?")
    # a checkpoint keeps the temperature it was given: labels made with it stay labels of the same setup (another
    # --target-accuracy moves only the threshold)
    temperature = float(meta["temperature"]) if "temperature" in meta else \
        calibration.fit_temperature(val_logits, val_labels)
    val_probs = calibration.softmax(val_logits, temperature)
    before, after = calibration.softmax(test_logits), calibration.softmax(test_logits, temperature)
    confidence, correct = after.max(1), after.argmax(1) == test_labels
    # the confidence as labelling stores and compares it: float32
    val_confidence = val_probs.max(1).astype(np.float32).astype(np.float64)
    threshold = calibration.threshold_for(val_confidence, val_probs.argmax(1) == val_labels, target_accuracy)
    abstention = {**threshold, "split": "val", "photos_in_split": len(val_labels)}
    storage.write_json(storage.join(path, META), {**meta, "temperature": temperature, "abstention": abstention})
    return {
        "test": _report(test_logits, test_labels, meta["classes"]),
        "calibration": {"temperature": temperature, "fitted_on": {"split": "val", "photos": len(val_labels)},
                        "before": calibration.scores(before, test_labels),
                        "after": calibration.scores(after, test_labels),
                        "reliability": {"before": calibration.reliability(before, test_labels),
                                        "after": calibration.reliability(after, test_labels)}},
        "abstention": {**abstention, "test": calibration.kept_at(confidence.astype(np.float32).astype(np.float64),
                                                                 correct, threshold["threshold"])},
        "coverage": {"split": "test", "table": calibration.coverage_table(confidence, correct),
                     "curve": calibration.coverage_table(confidence, correct, COVERAGE_CURVE)}}


def _test_task(checkpoint: str, val: Any, test: Any, target_accuracy: float) -> dict[str, Any]:
    """Ray task: a checkpoint calibrated on the val split and scored on the test split, both streamed from their
    datasets (the driver never holds the photos)."""
    def batches(ds: Any) -> Batches:
        return ((b["image"], b["label"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))

    return calibrate_and_test(checkpoint, batches(val), batches(test), target_accuracy)


def evaluate_on_ray(checkpoint: str, val: Any, test: Any, target_accuracy: float, use_gpu: bool) -> dict[str, Any]:
    import ray

    # no CPU reserved: the Ray Data tasks that read and decode the photos for it need the CPUs
    task = ray.remote(num_cpus=0, num_gpus=1 if use_gpu else 0, max_retries=2)(_test_task)
    return ray.get(task.remote(checkpoint, val, test, target_accuracy))


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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def table5(rows: list[dict[str, Any]], targets: list[dict[str, Any]] | None = None) -> str:
    """The paper's Table 5 with what a user also needs beside it: the training target, calibration before and after
    temperature scaling, and the annotators' own agreement on the same test photos (the ceiling); then majority
    against votes where both were trained."""
    lines = ["| Preprocessing | Model | Test accuracy (%) | Macro-F1 (%) | Target | ECE (%) before → after T "
             "| NLL before → after T | Annotators agree (%) | Runs |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        a, f, e, n = r["accuracy"], r["macro_f1"], r["ece"], r["nll"]
        lines.append(f"| {r['preprocessing']} | {r['model']} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
                     f"{100 * f['mean']:.2f} ± {100 * f['std']:.2f} | {r['target']} | "
                     f"{_pct(e['before']['mean'])} → {_pct(e['after']['mean'])} | "
                     f"{n['before']['mean']:.3f} → {n['after']['mean']:.3f} | {_pct(r['annotators'])} | {a['n']} |")
    lines += ["", "Test accuracy (%) of the most confident photos kept (best run of each row), and what the "
              "threshold chosen on validation for the target accuracy keeps of the test photos:", "",
              "| Preprocessing | Model | Target | 50% | 80% | 90% | 100% | Threshold "
              "| Test kept: coverage / accuracy (%) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cover = " | ".join(_pct(c["accuracy"]) for c in r["coverage"])
        a = r["abstention"]
        kept = "–" if a["threshold"] is None else f"{_pct(a['test']['coverage'])} / {_pct(a['test']['accuracy'])}"
        threshold = f"none reaches {a['target_accuracy']:g}" if a["threshold"] is None else \
            f"{a['threshold']:.3f} (for {a['target_accuracy']:g})"
        lines.append(f"| {r['preprocessing']} | {r['model']} | {r['target']} | {cover} | {threshold} | {kept} |")
    if targets:
        lines += ["", "Majority against votes (test, means over seeds; ECE after temperature scaling):", "",
                  "| Preprocessing | Model | Majority: accuracy / macro-F1 / ECE (%) | Votes: accuracy / macro-F1 / "
                  "ECE (%) | Annotators agree (%) |", "|---|---|---:|---:|---:|"]
        for t in targets:
            m, v = t["majority"], t["votes"]
            lines.append(f"| {t['preprocessing']} | {t['model']} | {_pct(m['accuracy'])} / {_pct(m['macro_f1'])} / "
                         f"{_pct(m['ece'])} | {_pct(v['accuracy'])} / {_pct(v['macro_f1'])} / {_pct(v['ece'])} | "
                         f"{_pct(t['annotators'])} |")
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
    ax.set_title(f"{_title(best)}: test accuracy {100 * best['test']['accuracy']:.1f}%")
    fig.tight_layout()
    for name, figure in (("confusion.png", fig), ("curves.png", _curves(best, plt)),
                         ("reliability.png", _reliability(best, plt)), ("coverage.png", _coverage(best, plt))):
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


def _title(best: dict[str, Any]) -> str:
    target = "" if best.get("target", "majority") == "majority" else f" ({best['target']})"
    return f"{best['preprocessing']} · {best['model']}{target} · seed {best['seed']}"


def _reliability(best: dict[str, Any], plt) -> Any:
    """The reliability diagram of the test split: accuracy per confidence bin before and after the temperature."""
    cal = best["calibration"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, when in zip(axes, ("before", "after")):
        bins = cal["reliability"][when]
        lo = [b["lo"] for b in bins]
        width = bins[0]["hi"] - bins[0]["lo"]
        ax.bar(lo, [b["accuracy"] or 0 for b in bins], width=width, align="edge", edgecolor="k",
               color="tab:blue", label="accuracy")
        ax.bar(lo, [(b["confidence"] or 0) - (b["accuracy"] or 0) if b["n"] else 0 for b in bins], width=width,
               bottom=[b["accuracy"] or 0 for b in bins], align="edge", color="tab:red", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        t = "T = 1" if when == "before" else f"T = {cal['temperature']:.2f}"
        ax.set_title(f"{when} ({t}): ECE {100 * cal[when]['ece']:.1f}%, NLL {cal[when]['nll']:.2f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle(f"{_title(best)}: test split, {BINS_NOTE}")
    fig.tight_layout()
    return fig


BINS_NOTE = f"{calibration.BINS} equal-width bins"


def _coverage(best: dict[str, Any], plt) -> Any:
    """Accuracy against coverage on the test split (the most confident photos kept), with the threshold chosen on
    validation for the target accuracy."""
    curve, abst = best["coverage"]["curve"], best["abstention"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([100 * c["coverage"] for c in curve], [100 * (c["accuracy"] or 0) for c in curve], color="tab:blue",
            label="test accuracy of the kept photos")
    ax.axhline(100 * abst["target_accuracy"], color="tab:gray", ls=":", label="target accuracy (validation)")
    kept = abst["test"]
    if kept["accuracy"] is not None:
        ax.plot([100 * kept["coverage"]], [100 * kept["accuracy"]], "o", color="tab:red",
                label=f"validation threshold {abst['threshold']:.2f}")
    ax.set_xlabel("coverage (%): the most confident photos kept")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    ax.set_title(f"{_title(best)}: accuracy against coverage")
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
            for target in cfg.target:
                for seed in range(cfg.seeds):
                    spec = RunSpec(model=model, arguments=arguments.get(model, {}), seed=seed, epochs=cfg.epochs,
                                   batch_size=cfg.batch_size, lr=cfg.lr, erasing=cfg.erasing,
                                   image_size=cfg.image_size, init_weights=cfg.init_weights, schedule=cfg.schedule,
                                   balance=cfg.balance, target=target)
                    keyed = {k: v for k, v in dataclasses.asdict(spec).items()
                             if (k, v) not in (("balance", "none"), ("target", "majority"))}
                    # (balance none and the majority target are how every run trained before those options: their
                    # names stay theirs)
                    key = hashlib.sha256(json.dumps([keyed, data_key], sort_keys=True).encode())
                    # other settings or other crops never resume this run
                    kind = "" if target == "majority" else f"-{target}"
                    plan_of[tag].append((model, seed, spec, f"{tag}-{model}{kind}-seed{seed}-{key.hexdigest()[:10]}"))
    out = outputs.Output(cfg.output, KIND)
    # the target accuracy sets each checkpoint's threshold: another one calibrates the runs again, trains none
    fingerprint = {"runs": [name for runs in plan_of.values() for *_, name in runs], "min_agree": cfg.min_agree,
                   "target_accuracy": cfg.target_accuracy}
    if out.current(fingerprint) is not None:
        log.info("%s already holds this report, committed: nothing trained, nothing written", cfg.output)
        return out.read_json(REPORT)
    with out.lease() as lease:
        report, files = _train_and_test(cfg, out, dict(zip(tags, shard_list)), plan_of)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out.uncommit()
        files += [out.write_json(REPORT, report),
                  out.write_file("table5.md", table5(report["rows"], report["targets"]).encode()),
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
        fresh: set[str] = set()  # results as finished, their receipts already counted
        for *_, name in planned:
            try:
                data = storage.read_bytes(out.path(RESULTS, f"{name}.json"))
            except FileNotFoundError:
                continue
            results[name] = json.loads(data)
            if _calibrated(results[name], cfg.target_accuracy):
                fresh.add(name)
                receipts.append(outputs.Receipt.of(f"{RESULTS}/{name}.json", data))
        splits: dict[str, Any] = {}
        if len(fresh) < len(planned):  # read the crops only when a run needs them (training or calibrating)
            data = plan(shards, cfg.image_size, cfg.min_agree)  # small columns: no Ray, no pixels
            if not all(data.photos(s) for s in ("train", "val", "test")):
                raise ValueError(f"{shards}: a split has no usable photo: {data.report['splits']}")
            training = any(name not in results for *_, name in planned)
            if any(spec.target == "votes" for _, _, spec, name in planned if name not in results):
                data.check_votes()  # before Ray starts
            if cluster is None or (training and not cluster.training):
                cluster = _cluster(cfg, training)
            # calibrating finished runs needs val and test only: the train split is neither decoded nor cached
            splits, decision = datasets(data, cfg.cache, train=training)
            data_report = {**data.report, "cache": decision}
        else:
            data = None
            data_report = next(iter(results.values()))["data"]
        data_reports[tag] = data_report
        by_row: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for model, seed, spec, name in planned:
            if name not in results:
                results[name] = _train_one(cfg, cluster, data, splits, data_report, tag, model, seed, spec,
                                           runs_dir, name)
            elif name not in fresh:  # finished before calibration, or for another target accuracy
                log.info("calibrating %s", name)
                if not storage.exists(storage.join(results[name]["checkpoint"], META)):
                    raise ValueError(f"{name} finished, but its checkpoint {results[name]['checkpoint']} is gone, so "
                                     f"it cannot be calibrated: remove {out.path(RESULTS, name + '.json')} to train "
                                     "it again")
                results[name] = {**results[name], "target": spec.target, "data": data_report,
                                 **evaluate_on_ray(results[name]["checkpoint"], splits["val"], splits["test"],
                                                   cfg.target_accuracy, cfg.use_gpu)}
            if name not in fresh:
                receipts.append(out.write_json(f"{RESULTS}/{name}.json", results[name]))
            by_row.setdefault((model, spec.target), []).append(results[name])
        del splits  # the cached photos leave the object store
        for (model, target), runs in by_row.items():
            all_runs.extend(runs)
            rows.append(_row(tag, model, target, runs, data_report))
    report = {"rows": rows, "targets": _targets(rows),
              "runs": [{k: v for k, v in r.items() if k not in ("history", "data")} for r in all_runs],
              "data": data_reports, "split": "test (person-disjoint, from the index)",
              "label_filter": f"annotators' majority with agree_n >= {cfg.min_agree}; unknown labels left out",
              "calibration": "temperature fitted on val (NLL); ECE over 15 equal-width bins of the top confidence; "
                             "test figures before and after",
              "annotators": "how often one annotator's vote matches the other two's, where those two agree, on the "
                            "test photos (data.<preprocessing>.annotators)",
              "config": dataclasses.asdict(cfg), "best_of": all_runs}  # chosen on validation, never on test
    return report, receipts


def _calibrated(result: dict[str, Any], target_accuracy: float) -> bool:
    """Whether a finished run's result holds calibration and the threshold for this target accuracy (a run finished
    by an older kemo has neither: its checkpoint is calibrated on a rerun, not trained again)."""
    return "calibration" in result and result.get("abstention", {}).get("target_accuracy") == target_accuracy


def _row(tag: str, model: str, target: str, runs: list[dict[str, Any]], data_report: dict[str, Any]
         ) -> dict[str, Any]:
    """One row of Table 5: a (preprocessing, model, target) over its seeds, with the best-validation run's details."""
    top = max(runs, key=lambda r: r["best_val"]["val_accuracy"])

    def over_seeds(when: str, metric: str) -> dict[str, float]:
        return _mean_std([r["calibration"][when][metric] for r in runs])

    return {"preprocessing": tag, "model": model, "target": target,
            "accuracy": _mean_std([r["test"]["accuracy"] for r in runs]),
            "macro_f1": _mean_std([r["test"]["macro_f1"] for r in runs]),
            "ece": {"before": over_seeds("before", "ece"), "after": over_seeds("after", "ece")},
            "nll": {"before": over_seeds("before", "nll"), "after": over_seeds("after", "nll")},
            "brier": {"before": over_seeds("before", "brier"), "after": over_seeds("after", "brier")},
            "temperature": _mean_std([r["calibration"]["temperature"] for r in runs]),
            "annotators": (data_report.get("annotators") or {}).get("agreement"),
            "best_run": top["name"], "per_class": top["test"]["per_class"],
            "confusion_matrix": top["test"]["confusion_matrix"], "coverage": top["coverage"]["table"],
            "abstention": top["abstention"]}


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Majority against votes for each (preprocessing, model) trained on both: accuracy, macro-F1 and ECE after
    temperature scaling, means over seeds."""
    out = []
    for r in rows:
        if r["target"] != "majority":
            continue
        other = next((v for v in rows if (v["preprocessing"], v["model"], v["target"]) ==
                      (r["preprocessing"], r["model"], "votes")), None)
        if other is not None:
            out.append({"preprocessing": r["preprocessing"], "model": r["model"], "annotators": r["annotators"],
                        **{t: {"accuracy": x["accuracy"]["mean"], "macro_f1": x["macro_f1"]["mean"],
                               "ece": x["ece"]["after"]["mean"], "runs": x["accuracy"]["n"]}
                           for t, x in (("majority", r), ("votes", other))}})
    return out


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
    tested = evaluate_on_ray(_uri(best, cfg.output), splits["val"], splits["test"], cfg.target_accuracy,
                             cfg.use_gpu)
    with result.checkpoint.as_directory() as d:  # the latest: its history has every epoch
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    return {"name": name, "preprocessing": tag, "model": model, "target": spec.target, "seed": seed,
            "spec": dataclasses.asdict(spec), "checkpoint": _uri(best, cfg.output), "best_val": best_metrics,
            **tested, "history": history, "data": data_report}
