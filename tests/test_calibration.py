"""Temperature scaling, calibration error and accuracy against coverage (kemo.classifier.calibration), the
annotators' agreement and the vote targets: by hand on small cases, and by recovery on samples with a known answer."""

import numpy as np
import pytest

from kemo.classifier import calibration as cal
from kemo.classifier.data import vote_distribution
from kemo.classifier.metrics import annotator_agreement


def sample(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 7))
    p = cal.softmax(logits, temperature)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_recovers_the_true_one_and_minimises_nll(true_t):
    logits, labels = sample(20000, true_t, seed=int(true_t * 10))
    t = cal.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    at = cal.nll(cal.softmax(logits, t), labels)
    for other in (t * 0.9, t * 1.1, 1.0):
        assert at <= cal.nll(cal.softmax(logits, other), labels) + 1e-12


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_and_keeps_its_arg_max():
    logits, labels = sample(20000, 3.0, seed=1)  # the labels are 3× softer than the logits say: overconfident
    held_logits, held_labels = sample(20000, 3.0, seed=2)
    t = cal.fit_temperature(logits, labels)
    before, after = cal.softmax(held_logits), cal.softmax(held_logits, t)
    assert (before.argmax(1) == after.argmax(1)).all()
    b, a = cal.scores(before, held_labels), cal.scores(after, held_labels)
    assert a.ece < 0.02 < 0.1 < b.ece and a.nll < b.nll and a.brier < b.brier
    assert a.accuracy == b.accuracy


def test_ece_nll_brier_and_reliability_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    # top confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (right); 15 bins of width 1/15
    bins = cal.reliability(probs, labels)
    assert len(bins) == 15 and sum(b.n for b in bins) == 4
    filled = [(b.n, b.confidence, b.accuracy) for b in bins if b.n]
    assert filled == [(1, 0.6, 0.0), (1, 0.7, 1.0), (1, 0.8, 1.0), (1, 0.9, 1.0)]
    assert cal.ece(probs, labels) == pytest.approx((0.6 + 0.3 + 0.2 + 0.1) / 4)
    assert cal.nll(probs, labels) == pytest.approx(-np.log([0.9, 0.4, 0.7, 0.8]).mean())
    assert cal.brier(probs, labels) == pytest.approx((0.02 + 0.72 + 0.18 + 0.08) / 4)
    # a confidence of exactly 1 falls in the last bin; 0.5 in (7/15, 8/15]
    edge = cal.reliability(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1]))
    assert (edge[-1].n, edge[-1].accuracy, edge[7].n, edge[7].accuracy) == (1, 1.0, 1, 0.0)


def test_coverage_table_and_the_threshold_for_a_target_accuracy():
    confidence = np.array([0.95, 0.9, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0], bool)
    table = {r.coverage: r for r in cal.coverage_table(confidence, correct)}
    assert table[0.5].photos == 5 and table[0.5].accuracy == pytest.approx(0.8)
    assert table[0.8].accuracy == pytest.approx(5 / 8) and table[1.0].accuracy == pytest.approx(0.5)
    assert table[0.5].min_confidence == 0.7
    # at >= 0.9 the two tied photos come together: 2 of 3 right; >= 0.7: 4 of 5 = 0.8
    t = cal.threshold_for(confidence, correct, 0.8)
    assert (t.threshold, t.photos, t.accuracy, t.coverage) == (0.7, 5, pytest.approx(0.8), 0.5)
    assert cal.threshold_for(confidence, correct, 1.0).threshold == 0.95
    assert cal.threshold_for(confidence, ~correct, 1.0).threshold is None  # the top photo is wrong: unreachable
    kept = cal.kept_at(confidence, correct, 0.7)
    assert (kept.photos, kept.accuracy) == (5, pytest.approx(0.8))
    with pytest.raises(ValueError, match="target-accuracy"):
        cal.threshold_for(confidence, correct, 1.5)


def test_annotator_agreement_counts_one_annotator_against_the_other_two():
    votes = [[2, 2, 2],  # three pairs, three matches
             [2, 2, 5],  # annotator C against A and B (both 2): a miss; A against (B, C) = (2, 5): no majority
             [1, 3, 5],  # no two agree: nothing to match
             [4, 4, -1],  # C gave no vote: A against (4, -1) and B the same have no majority; C is no vote
             None]
    a = annotator_agreement(votes)
    assert (a.pairs, a.agreement, a.photos) == (4, 0.75, 4)
    assert annotator_agreement([]).agreement is None


def test_vote_distribution_is_the_share_of_known_votes():
    d = vote_distribution([[2, 2, 5], [3, -1, 3], [-1, -1, -1], None], [2, 3, 4, 6])
    assert d.dtype == np.float32 and d.shape == (4, 7)
    assert d[0, 2] == pytest.approx(2 / 3) and d[0, 5] == pytest.approx(1 / 3) and d[1, 3] == 1
    assert d[2, 4] == 1 and d[3, 6] == 1  # no known vote: the label, one-hot
    assert np.allclose(d.sum(1), 1)
