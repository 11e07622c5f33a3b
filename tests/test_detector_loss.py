"""YOLO-FaceV2's loss terms, each alone on hand-computed boxes (values and the direction of their gradient), and the
whole loss on a real YOLO built from its YAML: the stock loss when every weight is zero, gradient from every term."""

from __future__ import annotations

import math

import pytest
import torch

from kemo.detector.loss import (
    FACE_V2,
    NWD_C,
    STOCK,
    FaceV2Loss,
    LossWeights,
    nwd,
    rep_box,
    rep_gt,
    slide_weights,
    smooth_ln,
)


def boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def test_nwd_is_one_for_identical_boxes_and_falls_with_distance_and_size_mismatch():
    target = torch.tensor([[100.0, 100.0, 140.0, 150.0]], dtype=torch.float64)
    assert nwd(target, target).item() == pytest.approx(1.0, abs=1e-4)
    for d in (3.0, 10.0, 30.0):  # centre moved by d: W₂ = d
        shifted = target + torch.tensor([d, 0.0, d, 0.0], dtype=torch.float64)
        assert nwd(shifted, target).item() == pytest.approx(math.exp(-d / NWD_C), rel=1e-6)
    wider = target + torch.tensor([-4.0, 0.0, 4.0, 0.0], dtype=torch.float64)  # same centre, 8 px wider: W₂ = 8 / 2
    assert nwd(wider, target).item() == pytest.approx(math.exp(-4 / NWD_C), rel=1e-6)
    both = target + torch.tensor([6.0, -3.0, 14.0, 3.0], dtype=torch.float64)  # centre (10, 0), size (8, 6): W₂² = 125
    assert nwd(both, target).item() == pytest.approx(math.exp(-math.sqrt(100 + 25) / NWD_C), rel=1e-6)
    # the same 10 px offset costs a small face more than the NWD of a large face gains it: NWD sees pixels
    assert nwd(shifted * 1, target) < nwd(target * 10 + 10, target * 10)


def test_nwd_loss_pulls_a_prediction_toward_its_face():
    target = torch.tensor([[100.0, 100.0, 140.0, 150.0]], dtype=torch.float64)
    pred = boxes([108.0, 100.0, 148.0, 150.0])  # 8 px right of its face
    (1 - nwd(pred, target)).sum().backward()
    grad = pred.grad[0]
    assert grad[0] > 0 and grad[2] > 0  # descent moves both x edges left, toward the face
    assert grad[1] == pytest.approx(0, abs=1e-9) and grad[3] == pytest.approx(0, abs=1e-9)
    # d(1 - e^(-d/C))/dd = e^(-d/C)/C, shared by the two x edges (the centre moves by half of each)
    assert grad[0].item() + grad[2].item() == pytest.approx(math.exp(-8 / NWD_C) / NWD_C, rel=1e-5)


def test_slide_weights_at_the_three_iou_ranges():
    iou = torch.tensor([[0.45, 0.55, 0.7, 0.7, 0.0, 0.55]])
    fg = torch.tensor([[True, True, True, True, False, False]])  # μ = mean of the foreground = 0.6
    w = slide_weights(iou, fg)[0]
    assert w[0].item() == pytest.approx(1.0)  # IoU ≤ μ - 0.1: an easy negative
    assert w[1].item() == pytest.approx(math.exp(1 - 0.6))  # μ - 0.1 < IoU < μ: e^(1-μ), the paper's (not e^μ)
    assert w[2].item() == pytest.approx(math.exp(1 - 0.7))  # IoU ≥ μ: e^(1-IoU)
    assert w[4].item() == 1.0  # background
    assert w[5].item() == pytest.approx(math.exp(0.4))  # by IoU, wherever it comes from
    low = slide_weights(torch.tensor([0.05, 0.15, 0.16]), torch.tensor([True, True, True]))  # μ 0.12, floored to 0.2
    assert low.tolist() == pytest.approx([1.0, math.exp(0.8), math.exp(0.8)])


def test_smooth_ln_is_minus_log_then_its_tangent():
    x = torch.tensor([0.0, 0.3, 0.5, 0.8])
    assert smooth_ln(x).tolist() == pytest.approx([0.0, -math.log(0.7), -math.log(0.5), 0.3 / 0.5 - math.log(0.5)])


def two_faces() -> tuple[torch.Tensor, torch.Tensor]:
    """(ground truths (1, 3, 4) with a padded third, their mask): face 0 and face 1 side by side, overlapping."""
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    return gt, torch.tensor([[[1.0], [1.0], [0.0]]])


def test_rep_gt_by_hand_and_it_pushes_a_prediction_away_from_the_other_face():
    gt, mask = two_faces()
    pred = boxes([0.0, 1.0, 10.0, 9.0])  # face 0's prediction, 8 high: 5 × 8 of it lies over face 1
    one = torch.ones(1, dtype=torch.float64)
    value = rep_gt(pred, torch.tensor([0]), torch.tensor([0]), gt, mask, one)
    assert value.item() == pytest.approx(-math.log(1 - 40 / 100))  # IoG = 40 / area(face 1)
    value.backward()
    # descent moves the right edge left, away from face 1 (d/dx2 = 1/(1-0.4) · 8/100); the left edge does not matter
    assert pred.grad[0, 2].item() == pytest.approx(8 / 100 / 0.6, rel=1e-6) and pred.grad[0, 0].item() == 0
    step = pred.detach() - 10 * pred.grad
    assert rep_gt(step, torch.tensor([0]), torch.tensor([0]), gt, mask, one) < value
    # its own face does not repel it, nor does a padded ground truth; a far prediction adds 0
    alone = rep_gt(boxes([0.0, 1.0, 10.0, 9.0]), torch.tensor([0]), torch.tensor([0]), gt[:, [0, 2]], mask[:, [0, 2]],
                   one)
    far = rep_gt(boxes([30.0, 1.0, 40.0, 9.0]), torch.tensor([0]), torch.tensor([0]), gt, mask, one)
    assert alone.item() == 0 and far.item() == 0
    # weighted as the attraction term is
    assert rep_gt(pred.detach(), torch.tensor([0]), torch.tensor([0]), gt, mask, 0.5 * one).item() == \
        pytest.approx(value.item() / 2)


def test_rep_box_by_hand_and_it_pushes_two_predictions_apart():
    pred = boxes([0.0, 0.0, 10.0, 10.0],  # photo 0, face 0
                 [5.0, 1.0, 15.0, 9.0],  # photo 0, face 1: overlaps the first, IoU 40 / 140
                 [1.0, 0.0, 11.0, 10.0],  # photo 0, face 0 again: same face as the first, not a pair
                 [50.0, 0.0, 60.0, 10.0],  # photo 0, face 2: overlaps nothing, not in the mean
                 [0.0, 0.0, 10.0, 10.0])  # photo 1, face 1: another photo, never a pair
    image, face = torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 1, 0, 2, 1])
    value = rep_box(pred, image, face, batch_size=2)
    # pairs (0, 1): 5 × 8 = 40 over 100 + 80 - 40; (2, 1): 6 × 8 = 48 over 100 + 80 - 48
    pairs = [-math.log(1 - 40 / 140), -math.log(1 - 48 / 132)]
    assert value.item() == pytest.approx(sum(pairs) / 2, rel=1e-5)
    value.backward()
    assert pred.grad[0, 2] > 0 and pred.grad[1, 0] < 0  # descent moves face 0's right edge left, face 1's left right
    assert pred.grad[3].abs().sum() == 0 and pred.grad[4].abs().sum() == 0
    assert rep_box(boxes([0.0, 0.0, 1.0, 1.0]), torch.tensor([0]), torch.tensor([0]), 1).item() == 0  # no pair


def real_model():
    """yolo11n from its YAML, one class, with ultralytics' default hyperparameters: the loss sees a real head."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=1, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    return model.train()


@pytest.fixture(scope="module")
def model_and_batch():
    model = real_model()
    images = torch.rand(2, 3, 64, 64)
    # photo 0: two overlapping faces and a small one; photo 1: one face (normalised cx, cy, w, h)
    batch = {"img": images, "batch_idx": torch.tensor([0.0, 0.0, 0.0, 1.0]), "cls": torch.zeros(4, 1),
             "bboxes": torch.tensor([[0.35, 0.4, 0.3, 0.4], [0.55, 0.42, 0.3, 0.4], [0.85, 0.85, 0.1, 0.1],
                                     [0.5, 0.5, 0.5, 0.6]])}
    return model, batch


@pytest.fixture(scope="module")
def head_output(model_and_batch):
    """The head's training output as leaf tensors (the loss's input). An untrained head spreads its distance bins
    evenly, so every box spans the photo and contains every face, where IoG and IoU no longer change: tilt the bins
    toward short distances, boxes of a face's size."""
    model, batch = model_and_batch
    with torch.no_grad():
        preds = model(batch["img"])
    bins = torch.arange(model.model[-1].reg_max, dtype=torch.float32).repeat(4)[None, :, None]
    return {"boxes": (preds["boxes"] - 0.6 * bins).requires_grad_(), "scores": preds["scores"].requires_grad_(),
            "feats": preds["feats"]}


def loss_and_grads(model, batch, preds, weights: LossWeights | None):
    from ultralytics.utils.loss import v8DetectionLoss

    criterion = v8DetectionLoss(model) if weights is None else FaceV2Loss(model, weights)
    loss, items = criterion(preds, batch)
    grads = torch.autograd.grad(loss.sum(), [preds["boxes"], preds["scores"]])
    return items, grads


def test_all_weights_zero_is_ultralytics_loss_value_for_value(model_and_batch, head_output):
    model, batch = model_and_batch
    stock, (box_grad, score_grad) = loss_and_grads(model, batch, head_output, None)
    ours, (our_box_grad, our_score_grad) = loss_and_grads(model, batch, head_output, STOCK)
    assert list(ours) == [*stock, "rep_loss"] and ours["rep_loss"] == 0
    assert all(torch.equal(stock[k], ours[k]) for k in stock)
    assert torch.equal(box_grad, our_box_grad) and torch.equal(score_grad, our_score_grad)


@pytest.mark.parametrize("weights", [LossWeights(nwd=0.2), LossWeights(rep_gt=0.5), LossWeights(rep_box=0.5)],
                         ids=["nwd", "rep_gt", "rep_box"])
def test_each_box_term_reaches_the_predicted_boxes(model_and_batch, head_output, weights):
    model, batch = model_and_batch
    stock, (box_grad, score_grad) = loss_and_grads(model, batch, head_output, STOCK)
    ours, (our_box_grad, our_score_grad) = loss_and_grads(model, batch, head_output, weights)
    assert (box_grad - our_box_grad).abs().max() > 1e-6  # detach the term and the box gradient is the stock one
    assert torch.equal(score_grad, our_score_grad)
    changed = "box_loss" if weights.nwd else "rep_loss"
    assert ours[changed] != stock[changed] and torch.isfinite(torch.stack(list(ours.values()))).all()


def test_slide_scales_the_classification_gradient_by_its_weights(model_and_batch, head_output):
    model, batch = model_and_batch
    _, (_, plain) = loss_and_grads(model, batch, head_output, STOCK)
    _, (_, slid) = loss_and_grads(model, batch, head_output, LossWeights(slide=True))
    ratio = (slid / plain)[plain.abs() > 1e-12]  # per anchor: the slide weight
    assert ratio.min() == pytest.approx(1.0, abs=1e-5)  # background anchors keep their gradient
    assert 1.1 < ratio.max() <= math.exp(1 - 0.2) + 1e-5  # hard ones get up to e^(1-μ), μ ≥ 0.2, in the same direction


def test_the_whole_faceV2_loss_under_autocast_takes_half_precision_and_gives_float32(model_and_batch, head_output):
    model, batch = model_and_batch
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp16 on a GPU, bfloat16 on the CPU
    half = torch.float16 if device == "cuda" else torch.bfloat16
    model = model.to(device)
    leaves = [head_output["boxes"].detach().to(device, half).requires_grad_(),
              head_output["scores"].detach().to(device, half).requires_grad_()]
    preds = {"boxes": leaves[0], "scores": leaves[1], "feats": [f.to(device, half) for f in head_output["feats"]]}
    with torch.autocast(device, dtype=half):
        loss, items = FaceV2Loss(model, FACE_V2)(preds, {k: v.to(device) for k, v in batch.items()})
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and items["rep_loss"] > 0
    grads = torch.autograd.grad(loss.sum(), leaves)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.cpu()


def test_refuses_an_end_to_end_head():
    from ultralytics.nn.tasks import DetectionModel

    with pytest.raises(ValueError, match="end-to-end"):
        FaceV2Loss(DetectionModel("yolo26n.yaml", nc=1, verbose=False), FACE_V2)
