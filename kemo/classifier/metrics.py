"""Classification metrics the paper reports (accuracy, confusion matrix) and what a careful user also needs
(per-class precision, recall, F1 and support; macro-F1). Pure numpy; rows of the matrix are true classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def confusion_matrix(y_true: np.ndarray | list[int], y_pred: np.ndarray | list[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: ``cm[t, p]`` photos of true class t predicted as p."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size and not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
        raise ValueError("class indices must be integers")
    t, p = t.astype(np.int64), p.astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} labels against {p.shape[0]} predictions")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class ClassificationReport:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix ``[true][predicted]``."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class name → precision, recall, f1, support
    confusion_matrix: list[list[int]]


def classification_report(cm: np.ndarray, names: list[str] | tuple[str, ...]) -> ClassificationReport:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix (0 where undefined).

    Macro-F1 averages the classes present in the evaluation set (support > 0); a class absent from it but predicted
    still lowers the others' precision, not the average's denominator (scikit-learn's default would count it as 0)."""
    cm = np.asarray(cm, np.float64)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"a {cm.shape} confusion matrix for {len(names)} class names")
    tp = np.diag(cm)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    present = actual > 0  # macro-F1 over the classes the evaluation set holds
    return ClassificationReport(
        accuracy=float(tp.sum() / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class={name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(actual[i])} for i, name in enumerate(names)},
        confusion_matrix=cm.astype(np.int64).tolist())


@dataclass
class Agreement:
    """How often one annotator matches the other two's majority (None: no such case), over how many (photo,
    annotator) cases and photos, and on which split."""

    agreement: float | None
    pairs: int
    photos: int
    split: str | None = None


def annotator_agreement(votes: list[list[int] | None]) -> Agreement:
    """How often one annotator matches the other two's majority: the ceiling a model scored against a majority label
    can expect. For each photo and each annotator whose two others gave the same known vote (their majority), whether
    that annotator chose it too; -1 (알수없음, missing) is no vote. ``pairs`` is how many such (photo, annotator)
    cases there were; a photo whose others disagree has no majority to match and adds none."""
    matches = pairs = 0
    for v in votes:
        if not v or len(v) != 3:
            continue
        for i in range(3):
            a, b = (v[j] for j in range(3) if j != i)
            if a >= 0 and a == b and v[i] >= 0:
                pairs += 1
                matches += v[i] == a
    return Agreement(matches / pairs if pairs else None, pairs, sum(1 for v in votes if v and len(v) == 3))
