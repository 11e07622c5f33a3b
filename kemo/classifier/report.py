"""The paper's Table 5 and Figure 4 from finished runs: each run's result (``results/<run>.json``), the rows over seeds,
majority against votes, ``report.json``, ``table5.md`` and the plots of the best run (confusion, curves, reliability,
coverage). Results are dataclasses written with ``asdict``, read back typed (:func:`kemo.record.from_dict`).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from kemo import outputs
from kemo.classes import CLASS_NAMES
from kemo.classifier import calibration
from kemo.classifier.calibration import CoveragePoint, Kept, Scores
from kemo.classifier.data import DataReport
from kemo.classifier.evaluation import Abstention, Calibration, Coverage
from kemo.classifier.metrics import ClassificationReport
from kemo.classifier.train import EpochMetrics, RunSpec
from kemo.record import from_dict

REPORT = "report.json"
PLOTS = ("confusion.png", "curves.png", "reliability.png", "coverage.png")


@dataclass
class RunResult:
    """One finished run, trained and calibrated: ``results/<run>.json``. In the report, without history and data."""

    name: str
    preprocessing: str
    model: str
    target: str
    seed: int
    spec: RunSpec
    checkpoint: str  # the best-validation checkpoint, calibrated
    best_val: EpochMetrics
    test: ClassificationReport
    calibration: Calibration
    abstention: Abstention
    coverage: Coverage
    history: list[EpochMetrics] = field(default_factory=list)
    data: DataReport | None = None

    def summary(self) -> RunResult:
        """As ``report.json`` lists it: without the history and the data report."""
        return replace(self, history=[], data=None)


@dataclass
class MeanStd:
    mean: float
    std: float  # sample standard deviation (0 for one value)
    n: int

    @classmethod
    def of(cls, values: list[float]) -> MeanStd:
        return cls(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values))


@dataclass
class BeforeAfter:
    """A calibration score over seeds, before and after temperature scaling."""

    before: MeanStd
    after: MeanStd


@dataclass
class Row:
    """One row of Table 5: a (preprocessing, model, target) over its seeds, with the best-validation run's details."""

    preprocessing: str
    model: str
    target: str
    accuracy: MeanStd  # over the index's test photos, a photo without a usable crop counted wrong: the headline
    accuracy_on_faces: MeanStd  # over the test photos with a face (those the model saw)
    face_coverage: float  # the share of the index's test photos with a face: the detector's coverage
    test_photos: int  # the index's test photos (the headline's denominator)
    test_photos_sha256: str  # their image_ids' hash: rows with the same one were scored on the same photos
    macro_f1: MeanStd
    ece: BeforeAfter
    nll: BeforeAfter
    brier: BeforeAfter
    temperature: MeanStd
    annotators: float | None  # the annotators' own agreement on the test photos
    best_run: str
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    coverage: list[CoveragePoint]
    abstention: Abstention

    @classmethod
    def of(cls, tag: str, model: str, target: str, runs: list[RunResult], data: DataReport) -> Row:
        top = max(runs, key=lambda r: r.best_val.val_accuracy)  # chosen on validation, never on test

        def over_seeds(metric: str) -> BeforeAfter:
            return BeforeAfter(*(MeanStd.of([getattr(getattr(r.calibration, when), metric) for r in runs])
                                 for when in ("before", "after")))

        n = data.test_photos
        correct = [int(np.trace(np.asarray(r.test.confusion_matrix))) for r in runs]
        kept = top.abstention.test  # a missed face is a photo not kept: its share is of every test photo
        abstention = replace(top.abstention, test=replace(kept, coverage=kept.photos / n if n else 0.0)) \
            if kept is not None else top.abstention
        return cls(tag, model, target, MeanStd.of([c / n if n else 0.0 for c in correct]),
                   MeanStd.of([r.test.accuracy for r in runs]), data.splits["test"].photos / n if n else 0.0, n,
                   data.test_photos_sha256, MeanStd.of([r.test.macro_f1 for r in runs]), over_seeds("ece"),
                   over_seeds("nll"), over_seeds("brier"), MeanStd.of([r.calibration.temperature for r in runs]),
                   data.annotators.agreement, top.name, top.test.per_class, top.test.confusion_matrix,
                   top.coverage.table, abstention)


@dataclass
class TargetFigures:
    """Test figures of one training target, means over seeds (ECE after temperature scaling)."""

    accuracy: float
    macro_f1: float
    ece: float
    runs: int


@dataclass
class TargetPair:
    """Majority against votes for a (preprocessing, model) trained on both."""

    preprocessing: str
    model: str
    annotators: float | None
    majority: TargetFigures
    votes: TargetFigures


def target_pairs(rows: list[Row]) -> list[TargetPair]:
    """Majority against votes for each (preprocessing, model) trained on both."""
    out = []
    for r in rows:
        other = next((v for v in rows if (v.preprocessing, v.model, v.target) == (r.preprocessing, r.model, "votes")),
                     None)
        if r.target == "majority" and other is not None:
            majority, votes = (TargetFigures(x.accuracy.mean, x.macro_f1.mean, x.ece.after.mean, x.accuracy.n)
                               for x in (r, other))
            out.append(TargetPair(r.preprocessing, r.model, r.annotators, majority, votes))
    return out


@dataclass
class Report:
    """``report.json``: Table 5's rows, majority against votes, every run, the data each preprocessing used, and how
    the figures were made."""

    rows: list[Row]
    targets: list[TargetPair]
    runs: list[RunResult]  # summaries: no history, no data
    data: dict[str, DataReport]  # preprocessing → the data its runs used
    split: str
    label_filter: str
    calibration: str
    annotators: str
    config: dict[str, Any]  # the TrainConfig, as config.json holds it
    seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for run in out["runs"]:  # report.json lists the runs without their history and data
            del run["history"], run["data"]
        return out

    @classmethod
    def read(cls, out: outputs.Output) -> Report:
        return from_dict(cls, out.read_json(REPORT), out.path(REPORT))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def scored_photos(rows: list[Row]) -> str:
    """One line on the photos the rows were scored on: the same for every row, or, where they differ (crop outputs
    of different indexes, or of a different sample), which each row was scored on."""
    if len({r.test_photos_sha256 for r in rows}) <= 1:
        n = rows[0].test_photos if rows else 0
        return (f"Every row is scored on the same {n} test photos of the index; a photo whose crop has no face "
                "counts as wrong.")
    each = "; ".join(f"{p}: {n}" for p, n in dict((r.preprocessing, r.test_photos) for r in rows).items())
    return (f"The rows' test photos differ (crop outputs of different indexes or samples): each row is scored on its "
            f"own crop output's test photos ({each}), so the rows do not compare on the same photos.")


COLUMNS = ("Test accuracy: over every test photo of the index, a photo whose crop has no face counted wrong (the "
           "paper's comparison). On faces: over the test photos with a face. Faces found: the share of test photos "
           "with a face (the detector's coverage). ECE, NLL and the coverage table: over the photos with a face, the "
           "ones the model saw.")


def table5(rows: list[Row], targets: list[TargetPair] | None = None) -> str:
    """The paper's Table 5 with what a user also needs beside it: accuracy on the same test photos for every row
    (a missed face counts as wrong) beside accuracy on the faces found and the share found, the training target,
    calibration before and after temperature scaling, and the annotators' own agreement on the test photos (the
    ceiling); then majority against votes where both were trained."""
    lines = [scored_photos(rows), "",
             "| Preprocessing | Model | Test accuracy (%) | On faces (%) | Faces found (%) | Macro-F1 (%) | Target "
             "| ECE (%) before → after T | NLL before → after T | Annotators agree (%) | Runs |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        a, o, f, e, n = r.accuracy, r.accuracy_on_faces, r.macro_f1, r.ece, r.nll
        lines.append(f"| {r.preprocessing} | {r.model} | {100 * a.mean:.2f} ± {100 * a.std:.2f} | "
                     f"{100 * o.mean:.2f} | {_pct(r.face_coverage)} | {100 * f.mean:.2f} ± {100 * f.std:.2f} | "
                     f"{r.target} | {_pct(e.before.mean)} → {_pct(e.after.mean)} | "
                     f"{n.before.mean:.3f} → {n.after.mean:.3f} | {_pct(r.annotators)} | {a.n} |")
    lines += ["", COLUMNS]
    lines += ["", "Test accuracy (%) of the most confident photos kept (best run of each row), and what the "
              "threshold chosen on validation for the target accuracy keeps of the test photos:", "",
              "| Preprocessing | Model | Target | 50% | 80% | 90% | 100% | Threshold "
              "| Test kept: coverage / accuracy (%) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cover = " | ".join(_pct(c.accuracy) for c in r.coverage)
        a = r.abstention
        kept = "–" if a.threshold is None else f"{_pct(a.test.coverage)} / {_pct(a.test.accuracy)}"
        threshold = f"none reaches {a.target_accuracy:g}" if a.threshold is None else \
            f"{a.threshold:.3f} (for {a.target_accuracy:g})"
        lines.append(f"| {r.preprocessing} | {r.model} | {r.target} | {cover} | {threshold} | {kept} |")
    if targets:
        lines += ["", "Majority against votes (test, means over seeds; ECE after temperature scaling):", "",
                  "| Preprocessing | Model | Majority: accuracy / macro-F1 / ECE (%) | Votes: accuracy / macro-F1 / "
                  "ECE (%) | Annotators agree (%) |", "|---|---|---:|---:|---:|"]
        for t in targets:
            m, v = t.majority, t.votes
            lines.append(f"| {t.preprocessing} | {t.model} | {_pct(m.accuracy)} / {_pct(m.macro_f1)} / "
                         f"{_pct(m.ece)} | {_pct(v.accuracy)} / {_pct(v.macro_f1)} / {_pct(v.ece)} | "
                         f"{_pct(t.annotators)} |")
    return "\n".join(lines) + "\n"


def plots(best: RunResult, out: outputs.Output) -> list[outputs.Receipt]:
    """Figure 4 and its companions for ``best`` (a run with its history), written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    figures = (_confusion(best, plt), _curves(best, plt), _reliability(best, plt), _coverage(best, plt))
    for name, figure in zip(PLOTS, figures):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        plt.close(figure)
        written.append(out.write_file(name, buffer.getvalue()))
    return written


def _title(best: RunResult) -> str:
    target = "" if best.target == "majority" else f" ({best.target})"
    return f"{best.preprocessing} · {best.model}{target} · seed {best.seed}"


def _confusion(best: RunResult, plt: Any) -> Any:
    cm = np.asarray(best.test.confusion_matrix, np.float64)
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
    ax.set_title(f"{_title(best)}: test accuracy {100 * best.test.accuracy:.1f}%")
    fig.tight_layout()
    return fig


def _curves(best: RunResult, plt: Any) -> Any:
    epochs = [h.epoch for h in best.history]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(epochs, [h.train_loss for h in best.history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.val_accuracy for h in best.history], color="tab:orange", label="validation accuracy")
    ax2.set_ylabel("validation accuracy")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


def _reliability(best: RunResult, plt: Any) -> Any:
    """The reliability diagram of the test split: accuracy per confidence bin before and after the temperature."""
    cal = best.calibration
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, when in zip(axes, ("before", "after")):
        bins = cal.reliability[when]
        lo = [b.lo for b in bins]
        width = bins[0].hi - bins[0].lo
        ax.bar(lo, [b.accuracy or 0 for b in bins], width=width, align="edge", edgecolor="k",
               color="tab:blue", label="accuracy")
        ax.bar(lo, [(b.confidence or 0) - (b.accuracy or 0) if b.n else 0 for b in bins], width=width,
               bottom=[b.accuracy or 0 for b in bins], align="edge", color="tab:red", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        t = "T = 1" if when == "before" else f"T = {cal.temperature:.2f}"
        scores: Scores = getattr(cal, when)
        ax.set_title(f"{when} ({t}): ECE {100 * scores.ece:.1f}%, NLL {scores.nll:.2f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle(f"{_title(best)}: test split, {calibration.BINS} equal-width bins")
    fig.tight_layout()
    return fig


def _coverage(best: RunResult, plt: Any) -> Any:
    """Accuracy against coverage on the test split (the most confident photos kept), with the threshold chosen on
    validation for the target accuracy."""
    curve, abst = best.coverage.curve, best.abstention
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([100 * c.coverage for c in curve], [100 * (c.accuracy or 0) for c in curve], color="tab:blue",
            label="test accuracy of the kept photos")
    ax.axhline(100 * abst.target_accuracy, color="tab:gray", ls=":", label="target accuracy (validation)")
    kept: Kept = abst.test
    if kept.accuracy is not None:
        ax.plot([100 * kept.coverage], [100 * kept.accuracy], "o", color="tab:red",
                label=f"validation threshold {abst.threshold:.2f}")
    ax.set_xlabel("coverage (%): the most confident photos kept")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    ax.set_title(f"{_title(best)}: accuracy against coverage")
    fig.tight_layout()
    return fig
