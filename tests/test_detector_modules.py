"""YOLO-Face-v2's MultiSEAM and C3RFEM, and the YAML model built from them by ultralytics."""

import math

import pytest
import torch

from kemo.detector.modules import C3RFEM, RFEM, MultiSEAM, resolve_yaml


def test_multiseam_scales_each_channel_by_a_factor_between_1_and_e():
    torch.manual_seed(0)
    seam = MultiSEAM(16).eval()
    x = torch.rand(2, 16, 13, 9) + 0.1  # sides that are multiples of no patch: the border is padded, not dropped
    y = seam(x)
    assert y.shape == x.shape
    ratio = y / x
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[:, :, :1].expand_as(per_channel), atol=1e-5)  # one factor each
    assert per_channel.min() >= 1 - 1e-6 and per_channel.max() <= math.e + 1e-6
    with pytest.raises(ValueError, match="16 channels got 8"):
        seam(torch.rand(1, 8, 8, 8))


def test_multiseam_sees_the_border_a_patch_does_not_cover():
    torch.manual_seed(0)
    seam = MultiSEAM(4, patches=(8,)).eval()
    x = torch.rand(1, 4, 9, 9)
    x2 = x.clone()
    x2[..., 8, 8] += 5  # outside the only whole 8×8 patch
    branch = seam.branches[0]
    assert not torch.allclose(branch(x), branch(x2))


def test_multiseam_trains_on_one_photo_whose_map_the_patch_shrinks_to_one_value():
    seam = MultiSEAM(8).train()
    x = torch.rand(1, 8, 5, 5, requires_grad=True)  # batch 1, every branch's embedding is 1×1
    seam(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_rfem_shares_one_1x1_and_one_3x3_weight_across_dilations():
    block = RFEM(8)
    convs = [p for name, p in block.named_parameters() if p.dim() == 4]
    assert [tuple(p.shape) for p in convs] == [(8, 8, 1, 1), (8, 8, 3, 3)]


def test_rfem_dilation_3_reaches_three_pixels_away():
    torch.manual_seed(0)
    x = torch.rand(1, 4, 15, 15)
    far = x.clone()
    far[..., 7, 10] += 3  # three columns right of the centre
    for dilations, reaches in (((1, 2, 3), True), ((1,), False)):
        block = RFEM(4, dilations).eval()
        changed = not torch.allclose(block(x)[..., 7, 7], block(far)[..., 7, 7])
        assert changed is reaches


def test_c3rfem_keeps_channels_and_backpropagates():
    block = C3RFEM(32, n=2)
    x = torch.rand(2, 32, 10, 10)
    y = block(x)
    assert y.shape == x.shape
    y.mean().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_yolo_face_v2_yaml_builds_runs_forward_and_backward():
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg

    net = YOLO(resolve_yaml("yolo-face-v2.yaml")).model
    kinds = [type(m).__name__ for m in net.model]
    assert kinds.count("MultiSEAM") == 3 and kinds.count("C3RFEM") == 1 and kinds[0] == "Focus"
    assert net.stride.tolist() == [8.0, 16.0, 32.0]
    net.args = get_cfg()  # loss hyper-parameters
    net.train()
    batch = {"img": torch.rand(2, 3, 160, 160), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.zeros(2, 1),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.4, 0.5, 0.3, 0.3]])}
    loss, _ = net.loss(batch)
    loss.sum().backward()
    seam = [m for m in net.model if type(m).__name__ == "MultiSEAM"][0]
    assert seam.branches[0].embed.weight.grad.abs().sum() > 0
    assert net.model[9].m[0].w3.grad.abs().sum() > 0  # C3RFEM's shared dilated 3×3
