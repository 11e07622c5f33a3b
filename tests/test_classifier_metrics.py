"""Classification metrics against a hand-computed confusion matrix."""

import dataclasses
import json

import pytest

from kemo.classifier.metrics import classification_report, confusion_matrix


def test_metrics_match_a_hand_computed_confusion_matrix():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    r = classification_report(cm, ["a", "b", "c", "d"])
    assert r.accuracy == pytest.approx(6 / 9)
    assert r.per_class["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert r.per_class["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert r.per_class["c"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert r.per_class["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)  # classes absent from the set excluded
    json.dumps(dataclasses.asdict(r))  # goes into report.json as it is
    with pytest.raises(ValueError, match="indices"):
        confusion_matrix([0, 7], [0, 1], 7)
