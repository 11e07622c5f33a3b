"""mAP and primary-face recall: hand-worked values, and ultralytics' own code on the same predictions."""

import numpy as np
import pytest

from kemo.detector.metrics import (
    Predictions,
    average_precision,
    box_iou,
    detection_map,
    match,
    primary_face_recall,
    ultralytics_map,
)

FACE = [100.0, 100.0, 200.0, 200.0]


def photo(boxes, scores, truth=(FACE,)):
    return Predictions(np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float),
                       np.asarray(truth, float).reshape(-1, 4))


def test_box_iou():
    got = box_iou([FACE], [FACE, [150, 100, 250, 200], [300, 300, 310, 310], [0, 0, 0, 0]])
    assert got.shape == (1, 4) and got[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])


def test_perfect_detections_score_0995_as_in_ultralytics():
    # the last of the 101 trapezoids ends on the (recall 1, precision 0) sentinel: YOLOv5's and ultralytics' 0.995
    photos = [photo([FACE], [0.9]), photo([FACE], [0.8])]
    m = detection_map(photos)
    assert m == {"map50": pytest.approx(0.995), "map50_95": pytest.approx(0.995), "faces": 2, "detections": 2}
    assert ultralytics_map(photos)["map50"] == pytest.approx(0.995)


def test_a_loose_box_is_right_at_the_low_thresholds_only():
    loose = [100.0, 100.0, 200.0, 236.0]  # IoU 100/136 = 0.735: true positive at 0.50 … 0.70, five of ten
    assert box_iou([FACE], [loose])[0, 0] == pytest.approx(0.7353, abs=1e-4)
    m = detection_map([photo([loose], [0.9])])
    assert m["map50"] == pytest.approx(0.995) and m["map50_95"] == pytest.approx(0.995 / 2)


def test_a_second_box_on_a_claimed_face_is_a_false_positive():
    scores, tp = match(np.array([FACE, FACE]), np.array([0.6, 0.9]), np.array([FACE]))
    assert scores.tolist() == [0.9, 0.6] and tp[:, 0].tolist() == [True, False]


def test_a_false_positive_ranked_first_costs_a_third():
    # ranked: FP 0.9, TP 0.8, TP 0.7 → precision 0, 1/2, 2/3 at recall 0, 1/2, 1: the envelope is 2/3 everywhere,
    # less half of the last trapezoid, which ends on the sentinel
    photos = [photo([[0, 0, 10, 10], FACE], [0.9, 0.8]), photo([FACE], [0.7])]
    m = detection_map(photos)
    assert m["map50"] == pytest.approx(2 / 3 * (1 - 0.005))
    assert ultralytics_map(photos)["map50"] == pytest.approx(m["map50"], abs=1e-12)


def test_missed_faces_lower_recall_and_no_detections_score_zero():
    # precision 1 up to recall 1/2, then 0: 0.49 of whole trapezoids and half of the one ending at recall 0.5
    assert detection_map([photo([FACE], [0.9]), photo([], [])])["map50"] == pytest.approx(0.495, abs=1e-9)
    assert detection_map([photo([], [])])["map50"] == 0.0
    assert average_precision(np.zeros((0, 10), bool), np.zeros(0), 0).tolist() == [0.0] * 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_ultralytics_on_the_same_predictions(seed):
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(150):
        corner = rng.uniform(0, 300, (rng.integers(0, 3), 2))
        truth = np.concatenate([corner, corner + rng.uniform(20, 120, corner.shape)], 1)
        n = int(rng.integers(0, 6))
        if len(truth):
            boxes = truth[rng.integers(0, len(truth), n)] + rng.normal(0, 8, (n, 4))
        else:
            boxes = rng.uniform(0, 300, (n, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        photos.append(photo(boxes, rng.uniform(0, 1, n), truth))
    ours, theirs = detection_map(photos), ultralytics_map(photos)
    assert 0.05 < ours["map50_95"] < ours["map50"] < 0.95  # a non-trivial case
    assert ours["map50"] == pytest.approx(theirs["map50"], abs=1e-12)
    assert ours["map50_95"] == pytest.approx(theirs["map50_95"], abs=1e-12)


def test_primary_face_recall_takes_the_selfie_subject_over_a_poster():
    poster = [10.0, 10.0, 40.0, 40.0]  # a small face scoring higher than the subject
    photos = [photo([poster, FACE], [0.95, 0.6]),  # subject wins: score × √area
              photo([poster, FACE], [0.3, 0.2]),  # the subject wins only when 0.2 passes the threshold
              photo([], []),  # nothing found: a miss
              photo([[100, 100, 200, 260]], [0.9])]  # IoU 0.625: a hit
    assert primary_face_recall(photos, conf=0.25) == 0.5
    assert primary_face_recall(photos, conf=0.1) == 0.75
