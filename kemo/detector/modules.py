"""YOLO-Face-v2's two modules, written from their published description (docs/design.md),
registered with ultralytics.

- ``MultiSEAM(c)``: separated-and-enhancement attention after a head output. Three branches, each a patch-embedding
  conv (kernel = stride = patch 6, 7, 8) → GELU → BN, a residual depthwise 3×3 → GELU → BN and a pointwise 1×1 → GELU
  → BN, then a global average; the three branch vectors and the input's own average are averaged, passed through
  Linear(c→c/16) → ReLU → Linear(c/16→c) → Sigmoid, and the input channels are scaled by ``exp`` of that (×1 to ×e).
- ``C3RFEM(c)``: a C3 block whose bottlenecks are ``RFEM`` receptive-field blocks: three branches that share one 1×1
  and one 3×3 weight, the 3×3 applied with dilation 1, 2 and 3; each branch is residual; the three branch outputs and
  the input are summed, then BN and SiLU.

Where we differ from the reference code on purpose: feature maps whose side is not a multiple of the patch are padded
(right/bottom) so no border pixel is dropped; each dilation has its own BatchNorm (the branches share conv weights but
see different statistics); RFEM's activations are SiLU, as in the rest of an ultralytics model (SEAM keeps GELU).

ultralytics' ``parse_model`` looks modules up by name in ``ultralytics.nn.tasks`` and passes unknown modules only
their YAML arguments, without input channels, and records their output channels as their input's. So both modules
take their channel count explicitly as the first YAML argument, check it at run time, and keep it unchanged.
Importing this module registers them; checkpoints refer to them as ``kemo.detector.modules.*``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CFG_DIR = Path(__file__).with_name("cfg")


def _norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm that survives one value per channel in training (batch 1 on a map the patch shrank to 1×1):
    batch statistics are undefined there, so that batch is normalised with the running statistics."""
    if bn.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class _SEAMBranch(nn.Module):
    def __init__(self, c: int, patch: int):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(c, c, patch, stride=patch)
        self.bn_embed = nn.BatchNorm2d(c)
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn_depthwise = nn.BatchNorm2d(c)
        self.pointwise = nn.Conv2d(c, c, 1)
        self.bn_pointwise = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))  # partial patches at the right and bottom count
        y = _norm(self.bn_embed, F.gelu(self.embed(x)))
        y = y + _norm(self.bn_depthwise, F.gelu(self.depthwise(y)))
        y = _norm(self.bn_pointwise, F.gelu(self.pointwise(y)))
        return y.mean((2, 3))


class MultiSEAM(nn.Module):
    """Channel attention from multi-scale patch branches; output = input × exp(attention), same shape."""

    def __init__(self, c: int, patches: tuple[int, ...] | list[int] = (6, 7, 8), reduction: int = 16):
        super().__init__()
        self.c = c
        self.branches = nn.ModuleList(_SEAMBranch(c, p) for p in patches)
        hidden = max(1, c // reduction)
        self.fc = nn.Sequential(nn.Linear(c, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, c, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.c:
            raise ValueError(f"MultiSEAM built for {self.c} channels got {x.shape[1]}: fix the model YAML")
        pooled = torch.stack([x.mean((2, 3)), *(b(x) for b in self.branches)]).mean(0)
        return x * torch.exp(self.fc(pooled))[:, :, None, None]


class RFEM(nn.Module):
    """Receptive-field enhancement: one 1×1 and one 3×3 weight shared by branches of dilation 1, 2, 3."""

    def __init__(self, c: int, dilations: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        self.dilations = tuple(dilations)
        self.w1 = nn.Parameter(torch.empty(c, c, 1, 1))
        self.w3 = nn.Parameter(torch.empty(c, c, 3, 3))
        for w in (self.w1, self.w3):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's default
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(c) for _ in self.dilations)
        self.bn3 = nn.ModuleList(nn.BatchNorm2d(c) for _ in self.dilations)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = F.conv2d(x, self.w1)  # the shared 1×1: the same for every branch
        out = x
        for d, bn1, bn3 in zip(self.dilations, self.bn1, self.bn3):
            y = F.silu(bn1(squeezed))
            y = bn3(F.conv2d(y, self.w3, padding=d, dilation=d))
            out = out + F.silu(y + x)  # each branch residual
        return self.act(self.bn(out))


class C3RFEM(nn.Module):
    """C3 (CSP) block with ``n`` RFEM bottlenecks; ``c`` channels in and out."""

    def __init__(self, c: int, n: int = 1, e: float = 0.5):
        super().__init__()
        from ultralytics.nn.modules import Conv

        self.c = c
        hidden = max(1, int(c * e))
        self.cv1 = Conv(c, hidden, 1, 1)
        self.cv2 = Conv(c, hidden, 1, 1)
        self.m = nn.Sequential(*(RFEM(hidden) for _ in range(n)))
        self.cv3 = Conv(2 * hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.c:
            raise ValueError(f"C3RFEM built for {self.c} channels got {x.shape[1]}: fix the model YAML")
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


def register() -> None:
    """Make the modules visible to ultralytics' YAML parser (it resolves names in ``ultralytics.nn.tasks``)."""
    from ultralytics.nn import tasks

    for module in (MultiSEAM, C3RFEM, RFEM):
        setattr(tasks, module.__name__, module)


def resolve_yaml(model: str) -> str:
    """A model YAML given as a path, as the name of one of ours (``yolo-face-v2.yaml``), or of ultralytics'."""
    if Path(model).is_file():
        return str(Path(model).resolve())
    ours = CFG_DIR / Path(model).name
    if ours.is_file():
        return str(ours)
    return model  # ultralytics resolves its own names (yolo11n.yaml) from its package, offline


register()
