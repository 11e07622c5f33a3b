"""How far to trust a label: temperature scaling, calibration error, and accuracy against coverage. Pure numpy.

Temperature scaling (Guo et al., 2017) divides a network's logits by one number T fitted on the validation split to
minimise the negative log-likelihood; it moves every confidence without changing any arg-max, so accuracy stays and
the confidences come to mean what they say. ECE (15 equal-width bins of the top confidence), NLL and the Brier score
measure that on the test split, before and after. Selective prediction: keeping only the most confident photos buys
accuracy at the cost of coverage; :func:`threshold_for` finds the lowest confidence at which the kept validation
photos reach a target accuracy, which labelling uses to abstain (``jobs/label.py --abstain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 15
COVERAGES = (0.5, 0.8, 0.9, 1.0)
T_RANGE = (0.05, 20.0)  # a temperature outside it says the logits are degenerate, not that they need it


@dataclass
class Bin:
    """One equal-width bin of the top confidence, (lo, hi]: its photos, mean confidence and accuracy (None if empty)."""

    lo: float
    hi: float
    n: int
    confidence: float | None
    accuracy: float | None


@dataclass
class Scores:
    """Accuracy, ECE, NLL and Brier score of probabilities against labels."""

    accuracy: float
    ece: float
    nll: float
    brier: float


@dataclass
class CoveragePoint:
    """The most confident ``coverage`` share of photos: how many, their accuracy, the last one's confidence."""

    coverage: float
    photos: int
    accuracy: float | None
    min_confidence: float | None


@dataclass
class Threshold:
    """The lowest confidence whose kept photos reach ``target_accuracy`` (None: none does), and what it keeps."""

    target_accuracy: float
    threshold: float | None
    coverage: float
    accuracy: float | None
    photos: int


@dataclass
class Kept:
    """The photos at or above a confidence threshold: how many, their share and accuracy."""

    threshold: float | None
    photos: int
    coverage: float
    accuracy: float | None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, in float64, stable for large logits."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, 1e-12, 1)).mean()) if len(labels) else 0.0


def _nll_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in :data:`T_RANGE` that minimises the NLL of ``softmax(logits / T)`` on (N, C) logits and their labels.
    NLL is convex in 1/T, so a golden-section search over 1/T finds the minimum (to ~1e-6 relative)."""
    labels = np.asarray(labels, np.int64)
    if not len(labels):
        return 1.0
    lo, hi = 1 / T_RANGE[1], 1 / T_RANGE[0]  # over beta = 1/T
    g = (np.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll_at(logits, labels, 1 / c), _nll_at(logits, labels, 1 / d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll_at(logits, labels, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll_at(logits, labels, 1 / d)
    return float(1 / ((a + b) / 2))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over photos of the squared distance between the probabilities and the one-hot truth (0 best, 2 worst)."""
    p = np.asarray(probs, np.float64)
    if not len(p):
        return 0.0
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), np.asarray(labels)] = 1
    return float(((p - onehot) ** 2).sum(1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[Bin]:
    """Per equal-width bin of the top confidence: its edges, photos, mean confidence and accuracy (the
    reliability diagram's bars; empty bins have n 0 and no means)."""
    p = np.asarray(probs, np.float64)
    confidence, correct = p.max(1), p.argmax(1) == np.asarray(labels)
    # bin k holds (k/bins, (k+1)/bins]; a confidence of exactly 0 cannot occur (it is at least 1/C)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        m = which == k
        n = int(m.sum())
        out.append(Bin(k / bins, (k + 1) / bins, n, float(confidence[m].mean()) if n else None,
                       float(correct[m].mean()) if n else None))
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the photo-weighted mean |accuracy − confidence| over equal-width bins."""
    total = len(labels)
    return float(sum(b.n / total * abs(b.accuracy - b.confidence)
                     for b in reliability(probs, labels, bins) if b.n)) if total else 0.0


def scores(probs: np.ndarray, labels: np.ndarray) -> Scores:
    """Accuracy, ECE, NLL and Brier score of probabilities against labels."""
    p = np.asarray(probs, np.float64)
    accuracy = float((p.argmax(1) == np.asarray(labels)).mean()) if len(p) else 0.0
    return Scores(accuracy, ece(p, labels), nll(p, labels), brier(p, labels))


def _ranked(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidences descending, kept photos, kept accuracy) at each distinct confidence: keeping every photo at or
    above a confidence keeps its ties too."""
    order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
    conf, hits = np.asarray(confidence, np.float64)[order], np.asarray(correct, np.float64)[order]
    kept = np.arange(1, len(conf) + 1)
    accuracy = np.cumsum(hits) / kept
    last = np.r_[conf[1:] != conf[:-1], True]  # the last of each run of equal confidences
    return conf[last], kept[last], accuracy[last]


def coverage_table(confidence: np.ndarray, correct: np.ndarray, coverages: tuple[float, ...] = COVERAGES
                   ) -> list[CoveragePoint]:
    """Accuracy of the most confident ``coverage`` share of photos (ties broken by order, so exactly
    round(coverage · N) photos), with the confidence of the last photo kept."""
    order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
    conf, hits = np.asarray(confidence, np.float64)[order], np.asarray(correct, np.float64)[order]
    rows = []
    for c in coverages:
        k = max(1, int(round(c * len(conf)))) if len(conf) else 0
        rows.append(CoveragePoint(c, k, float(hits[:k].mean()) if k else None, float(conf[k - 1]) if k else None))
    return rows


def threshold_for(confidence: np.ndarray, correct: np.ndarray, target: float) -> Threshold:
    """The lowest confidence threshold at which the photos at or above it reach ``target`` accuracy (the most
    photos kept), with the coverage and accuracy there; ``threshold`` None when no threshold reaches it."""
    if not 0 < target <= 1:
        raise ValueError(f"--target-accuracy must lie in (0, 1], not {target:g}")
    conf, kept, accuracy = _ranked(confidence, correct) if len(confidence) else (np.zeros(0),) * 3
    ok = np.flatnonzero(accuracy >= target - 1e-12)
    if not len(ok):
        return Threshold(target, None, 0.0, None, 0)
    i = ok[-1]
    return Threshold(target, float(conf[i]), float(kept[i] / len(confidence)), float(accuracy[i]), int(kept[i]))


def kept_at(confidence: np.ndarray, correct: np.ndarray, threshold: float | None) -> Kept:
    """Coverage and accuracy of the photos at or above ``threshold`` (None: none kept)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    keep = confidence >= threshold if threshold is not None else np.zeros(len(confidence), bool)
    n = int(keep.sum())
    return Kept(threshold, n, n / len(confidence) if len(confidence) else 0.0,
                float(correct[keep].mean()) if n else None)
