"""The paper's classifier networks, each a factory ``name(num_classes=7, ...) -> nn.Module`` with random weights.

- ``kemotionnet``: K-EmotionNet, a ResNet of basic (non-bottleneck) blocks with 54 weighted layers: the stem conv,
  2 × 26 block convs and the classifier. The paper gives no stage layout; the default ``[3, 4, 16, 3]`` deepens stage 3
  as ResNet-101/152 do. ``blocks=`` changes it (a ResNet of basic blocks has 2 + 2 × sum(blocks) weighted layers).
- ``resnet18``, ``vgg19`` (the paper's baselines, torchvision's definitions) and ``vgg19_bn`` (VGG19 with batch norm,
  which trains from scratch far more reliably than the plain one).

Weighted layers are counted as ResNet's and VGG's names count them (:func:`weighted_layers`): convolutions and fully
connected layers on the main path; ResNet's 1×1 projection shortcuts are not counted (ResNet-18 has 18 by this rule,
and 3 projections more). Nothing is downloaded here; :mod:`kemo.classifier.registry` names these factories.
"""

from __future__ import annotations

from torch import nn

KEMOTIONNET_BLOCKS = (3, 4, 16, 3)


def check_blocks(blocks: tuple[int, ...] | list[int]) -> None:
    """K-EmotionNet's stage layout, refused before any model is built if it is not one."""
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"K-EmotionNet needs four stages of at least one block, got {list(blocks)}")


def kemotionnet(num_classes: int = 7, blocks: tuple[int, ...] | list[int] = KEMOTIONNET_BLOCKS) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    check_blocks(blocks)
    return ResNet(BasicBlock, list(blocks), num_classes=num_classes)


def resnet18(num_classes: int = 7) -> nn.Module:
    from torchvision.models import resnet18 as build

    return build(weights=None, num_classes=num_classes)


def vgg19(num_classes: int = 7) -> nn.Module:
    from torchvision.models import vgg19 as build

    return build(weights=None, num_classes=num_classes)


def vgg19_bn(num_classes: int = 7) -> nn.Module:
    from torchvision.models import vgg19_bn as build

    return build(weights=None, num_classes=num_classes)


def weighted_layers(model: nn.Module) -> int:
    """Convolutions and fully connected layers on the main path (ResNet's projection shortcuts excluded)."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split("."))
