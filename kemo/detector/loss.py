"""YOLO-FaceV2's training losses (arXiv 2208.02019) on ultralytics' anchor-free head: the NWD box loss, the
slide-weighted classification loss and repulsion (Wang et al., CVPR 2018), as a subclass of ultralytics' v8 detection
loss. Every term is vectorised torch in float32 (also under AMP) and carries gradient to the predicted boxes; only the
slide weights and the choice of repelling boxes are constants, as sample weights and assignments are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import make_anchors

# NWD's normalising constant in pixels of the network input. The paper leaves C to the dataset; the NWD paper sets it
# to the average object size of AI-TOD (12.8 px), which YOLO-FaceV2's code keeps. exp(-d / C) has gradient
# -exp(-d / C) / C: NWD shapes boxes whose centre and size are off by a few C, i.e. small faces, and leaves large ones
# to CIoU.
NWD_C = 12.8
SIGMA = 0.5  # Smooth_ln's switch from -ln(1 - x) to its tangent (the and the reference's σ)
SLIDE_FLOOR = 0.2  # the slide function's lowest mean IoU
EPS = 1e-7


@dataclass(frozen=True)
class LossWeights:
    """Which of YOLO-FaceV2's terms a training adds to ultralytics' loss, and how much. All zero is the stock loss.

    ``nwd``: share r of the box loss given to NWD, box = (1 - r)·(1 - CIoU) + r·(1 - NWD) (the paper: 0.2).
    ``slide``: weight the classification BCE by the slide function of each anchor's IoU.
    ``rep_gt``, ``rep_box``: α and β of L = L_attr + α·RepGT + β·RepBox, scaled by the box gain as L_attr is. The paper
    gives none; the reference's 0.01 and 0.1 multiplied a term without gradient (they never acted, so they were never
    tuned): we take Wang et al.'s 0.5 and 0.5.
    """

    nwd: float = 0.0
    slide: bool = False
    rep_gt: float = 0.0
    rep_box: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.nwd <= 1:
            raise ValueError(f"the NWD share of the box loss must lie in [0, 1], got {self.nwd}")
        if self.rep_gt < 0 or self.rep_box < 0:
            raise ValueError(f"repulsion weights must be >= 0, got RepGT {self.rep_gt}, RepBox {self.rep_box}")

    @property
    def stock(self) -> bool:
        return self == STOCK


STOCK = LossWeights()
FACE_V2 = LossWeights(nwd=0.2, slide=True, rep_gt=0.5, rep_box=0.5)
LOSSES = {"stock": STOCK, "faceV2": FACE_V2}


# --------------------------------------------------------------------------------------------------- the terms


def nwd(pred: torch.Tensor, target: torch.Tensor, c: float = NWD_C) -> torch.Tensor:
    """Normalised Wasserstein distance exp(-√W₂² / C) of xyxy boxes (..., 4) in pixels, each box the Gaussian
    N((cx, cy), diag(w²/4, h²/4)): W₂² = |Δcentre|² + (Δw² + Δh²) / 4. 1 for identical boxes."""
    (px1, py1, px2, py2), (tx1, ty1, tx2, ty2) = pred.unbind(-1), target.unbind(-1)
    w2 = (((px1 + px2) - (tx1 + tx2)) ** 2 + ((py1 + py2) - (ty1 + ty2)) ** 2) / 4  # centres: (Σ/2 - Σ/2)²
    w2 = w2 + (((px2 - px1) - (tx2 - tx1)) ** 2 + ((py2 - py1) - (ty2 - ty1)) ** 2) / 4
    return torch.exp(-torch.sqrt(w2 + EPS) / c)


@torch.no_grad()
def slide_weights(iou: torch.Tensor, fg_mask: torch.Tensor) -> torch.Tensor:
    """The slide function per anchor: with μ the mean IoU of the foreground (at least 0.2), 1 where IoU ≤ μ - 0.1,
    e^(1-μ) where μ - 0.1 < IoU < μ, e^(1-IoU) where IoU ≥ μ (the paper; the reference's master uses e^μ). Background
    anchors have IoU 0, so weight 1. A sample weight, hence without gradient."""
    mu = iou[fg_mask].mean() if fg_mask.any() else iou.new_tensor(0.0)
    mu = mu.clamp(min=SLIDE_FLOOR)
    hard = torch.exp(1 - mu).expand_as(iou)
    out = torch.where(iou >= mu, torch.exp(1 - iou), hard)
    return torch.where(iou <= mu - 0.1, torch.ones_like(iou), out)


def smooth_ln(x: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """-ln(1 - x) up to σ, then its tangent: (x - σ) / (1 - σ) - ln(1 - σ)."""
    inner = -torch.log1p(-x.clamp(max=sigma))
    return torch.where(x <= sigma, inner, (x - sigma) / (1 - sigma) - math.log1p(-sigma))


def iog(box: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over the ground truth's area, xyxy boxes (..., 4)."""
    wh = (torch.minimum(box[..., 2:], gt[..., 2:]) - torch.maximum(box[..., :2], gt[..., :2])).clamp(min=0)
    return wh.prod(-1) / ((gt[..., 2:] - gt[..., :2]).prod(-1) + EPS)


def rep_gt(pred: torch.Tensor, image: torch.Tensor, assigned: torch.Tensor, gt_bboxes: torch.Tensor,
           mask_gt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ weight · Smooth_ln(IoG(B, G_rep)) over positive predictions ``pred`` (N, 4) in pixels, where G_rep is the
    ground truth of the same photo, other than the one the prediction is assigned to, that overlaps it most (IoU);
    a prediction overlapping no other face adds 0. ``image``, ``assigned``: (N,) photo and ground-truth index of each;
    ``gt_bboxes`` (B, G, 4) pixels with ``mask_gt`` (B, G, 1) marking real ones; ``weight`` (N,)."""
    if not len(pred) or not gt_bboxes.shape[1]:
        return pred.sum() * 0
    gts = gt_bboxes[image]  # (N, G, 4)
    others = mask_gt[image].squeeze(-1).bool()
    others &= torch.arange(gts.shape[1], device=pred.device)[None] != assigned[:, None]
    with torch.no_grad():  # which face repels is a choice, as an assignment is
        overlap = bbox_iou(pred.detach()[:, None], gts, xywh=False).squeeze(-1).masked_fill(~others, -1.0)
        best, rep = overlap.max(1)
    repelled = gts[torch.arange(len(pred), device=pred.device), rep]
    return (smooth_ln(iog(pred, repelled)) * (best > 0) * weight).sum()


def rep_box(pred: torch.Tensor, image: torch.Tensor, assigned: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean Smooth_ln(IoU) over the overlapping pairs of positive predictions ``pred`` (N, 4) of one photo assigned to
    different faces (Wang et al.'s Σ / (Σ 1[IoU > 0] + ε)); 0 without such a pair. ``image`` (N,) ascending, as
    ``nonzero`` lists the foreground. Pairs are formed within each photo ((B, M, M) for M positives in the fullest
    photo), never across the batch."""
    if not len(pred):
        return pred.sum() * 0
    counts = torch.bincount(image, minlength=batch_size)
    offsets = counts.cumsum(0) - counts
    m = int(counts.max())
    within = torch.arange(len(image), device=pred.device) - offsets[image]
    face = torch.full((batch_size, m), -1, dtype=torch.long, device=pred.device)
    face[image, within] = assigned
    pairs = (face[:, :, None] != face[:, None, :]) & (face[:, :, None] >= 0) & (face[:, None, :] >= 0)
    b, i, j = (pairs & torch.ones(m, m, dtype=torch.bool, device=pred.device).triu(1)).nonzero(as_tuple=True)
    i, j = offsets[b] + i, offsets[b] + j
    with torch.no_grad():  # keep the pairs that overlap, then build the graph on those alone
        keep = bbox_iou(pred[i].detach(), pred[j].detach(), xywh=False).squeeze(-1) > 0
    i, j = i[keep], j[keep]
    iou = bbox_iou(pred[i], pred[j], xywh=False).squeeze(-1)
    return smooth_ln(iou).sum() / max(len(i), 1)


# --------------------------------------------------------------------------------------------------- the loss


class Assigned(NamedTuple):
    """One batch after ultralytics' task-aligned assignment (its v8DetectionLoss, unchanged). Boxes are xyxy; pred
    boxes in grid units of each anchor's stride, targets and ground truths in pixels."""

    pred_distri: torch.Tensor  # (B, A, 4·reg_max)
    pred_scores: torch.Tensor  # (B, A, nc) logits
    pred_bboxes: torch.Tensor  # (B, A, 4)
    anchor_points: torch.Tensor  # (A, 2)
    stride_tensor: torch.Tensor  # (A, 1)
    imgsz: torch.Tensor  # (2,) h, w
    gt_bboxes: torch.Tensor  # (B, G, 4)
    mask_gt: torch.Tensor  # (B, G, 1)
    target_bboxes: torch.Tensor  # (B, A, 4)
    target_scores: torch.Tensor  # (B, A, nc)
    fg_mask: torch.Tensor  # (B, A) bool
    target_gt_idx: torch.Tensor  # (B, A)


class FaceV2Loss(v8DetectionLoss):
    """ultralytics' v8 detection loss with YOLO-FaceV2's terms (:class:`LossWeights`): box, cls and dfl as ultralytics
    computes them, the box mixed with NWD and the cls slide-weighted where asked, and ``rep_loss`` added. With all
    weights zero it is the stock loss, value for value."""

    def __init__(self, model: torch.nn.Module, weights: LossWeights, tal_topk: int = 10):
        if getattr(model.model[-1], "one2one_cv2", None) is not None:
            raise ValueError("the faceV2 loss extends ultralytics' v8 loss: this model has an end-to-end (one-to-one) "
                             "head, which trains with another loss")
        super().__init__(model, tal_topk)
        self.weights = weights
        self.loss_names = (*self.loss_names, "rep_loss")

    def assign(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> Assigned:
        """Decode the predictions and assign targets exactly as ultralytics' v8DetectionLoss does."""
        pred_distri = preds["boxes"].permute(0, 2, 1).contiguous()
        pred_scores = preds["scores"].permute(0, 2, 1).contiguous()
        anchor_points, stride_tensor = make_anchors(preds["feats"], self.stride, 0.5)
        dtype = pred_scores.dtype
        imgsz = torch.tensor(preds["feats"][0].shape[2:], device=self.device, dtype=dtype) * self.stride[0]
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        targets = self.preprocess(targets.to(self.device), pred_scores.shape[0], scale_tensor=imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = targets.split((1, 4), 2)
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)
        pred_bboxes = self.bbox_decode(anchor_points, pred_distri)
        _, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
            pred_scores.detach().sigmoid(), (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
            anchor_points * stride_tensor, gt_labels, gt_bboxes, mask_gt)
        return Assigned(pred_distri, pred_scores, pred_bboxes, anchor_points, stride_tensor, imgsz, gt_bboxes, mask_gt,
                        target_bboxes, target_scores, fg_mask, target_gt_idx)

    def get_assigned_targets_and_loss(self, preds: dict[str, torch.Tensor], batch: dict[str, Any],
                                      **assign_kwargs: Any) -> tuple:
        """(assignment, gain-scaled (box, cls, dfl, rep) not multiplied by batch size, detached items): the shape of
        ultralytics' method, which :meth:`v8DetectionLoss.loss` sums."""
        if assign_kwargs:
            raise TypeError(f"the faceV2 loss takes no assignment extras, got {sorted(assign_kwargs)}")
        a = self.assign(preds, batch)
        w = self.weights
        target_scores_sum = a.target_scores.sum().clamp_(min=1)
        loss = torch.zeros(4, device=self.device)
        loss[1] = self.cls_loss(a, target_scores_sum)
        loss[0], loss[2] = self.bbox_loss(a.pred_distri, a.pred_bboxes, a.anchor_points,
                                          a.target_bboxes / a.stride_tensor, a.target_scores, target_scores_sum,
                                          a.fg_mask, a.imgsz, a.stride_tensor)
        if w.nwd or w.rep_gt or w.rep_box:
            with torch.autocast(self.device.type, enabled=False):
                pred = (a.pred_bboxes.float() * a.stride_tensor)[a.fg_mask]  # (N, 4) pixels
                image, weight = a.fg_mask.nonzero(as_tuple=True)[0], a.target_scores[a.fg_mask].sum(-1).float()
                if w.nwd:
                    loss_nwd = ((1 - nwd(pred, a.target_bboxes[a.fg_mask].float())) * weight).sum() / target_scores_sum
                    loss[0] = (1 - w.nwd) * loss[0] + w.nwd * loss_nwd
                assigned = a.target_gt_idx[a.fg_mask].long()
                if w.rep_gt:
                    loss[3] += w.rep_gt * rep_gt(pred, image, assigned, a.gt_bboxes.float(), a.mask_gt,
                                                 weight) / target_scores_sum
                if w.rep_box:
                    loss[3] += w.rep_box * rep_box(pred, image, assigned, a.fg_mask.shape[0])
        loss[0] *= self.hyp.box
        loss[3] *= self.hyp.box  # repulsion belongs to the regression loss, as in Wang et al.
        loss[1] *= self.hyp.cls
        loss[2] *= self.hyp.dfl
        return ((a.fg_mask, a.target_gt_idx, a.target_bboxes, a.anchor_points, a.stride_tensor), loss,
                dict(zip(self.loss_names, loss.detach())))

    def cls_loss(self, a: Assigned, target_scores_sum: torch.Tensor) -> torch.Tensor:
        """ultralytics' BCE over every anchor and class, slide-weighted when asked (IoU of each foreground anchor's
        decoded box with its assigned face)."""
        bce = self.bce(a.pred_scores, a.target_scores.to(a.pred_scores.dtype))
        if self.class_weights is not None:
            bce = bce * self.class_weights
        if self.weights.slide:
            with torch.no_grad():
                iou = torch.zeros(a.fg_mask.shape, device=self.device)
                iou[a.fg_mask] = bbox_iou(a.pred_bboxes[a.fg_mask].float(),
                                          (a.target_bboxes / a.stride_tensor)[a.fg_mask].float(),
                                          xywh=False).squeeze(-1).clamp(min=0)
            bce = bce * slide_weights(iou, a.fg_mask)[..., None]
        return bce.sum() / target_scores_sum
