"""The paper's classifier networks, each a factory ``name(num_classes=7, ...) -> nn.Module`` with random weights.

- ``kemotionnet``: K-EmotionNet, a ResNet of basic (non-bottleneck) blocks with 54 weighted layers: the stem conv,
  2 × 26 block convs and the classifier. The paper gives no stage layout; the default ``[3, 4, 16, 3]`` deepens stage 3
  as ResNet-101/152 do. ``blocks=`` changes it (a ResNet of basic blocks has 2 + 2 × sum(blocks) weighted layers).
- ``resnet18``, ``vgg19`` (the paper's baselines, as torchvision defines them) and ``vgg19_bn`` (VGG19 with batch norm,
  which trains from scratch far more reliably than the plain one).

Weighted layers are counted as ResNet's and VGG's names count them (:func:`weighted_layers`): convolutions and fully
connected layers on the main path; ResNet's 1×1 projection shortcuts are not counted (ResNet-18 has 18 by this rule,
and 3 projections more). Nothing is downloaded here; :mod:`kemo.classifier.registry` names these factories.
"""

from __future__ import annotations

import torch
from torch import nn

KEMOTIONNET_BLOCKS = (3, 4, 16, 3)


def check_blocks(blocks: tuple[int, ...] | list[int]) -> None:
    """K-EmotionNet's stage layout, refused before any model is built if it is not one."""
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"K-EmotionNet needs four stages of at least one block, got {list(blocks)}")


def kemotionnet(num_classes: int = 7, blocks: tuple[int, ...] | list[int] = KEMOTIONNET_BLOCKS) -> nn.Module:
    check_blocks(blocks)
    return ResNet(list(blocks), num_classes)


def resnet18(num_classes: int = 7) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes)


def vgg19(num_classes: int = 7) -> nn.Module:
    return VGG(VGG19_LAYOUT, num_classes, batch_norm=False)


def vgg19_bn(num_classes: int = 7) -> nn.Module:
    return VGG(VGG19_LAYOUT, num_classes, batch_norm=True)


# torchvision's definitions, written out: importing torchvision imports torch._dynamo (through torchvision.ops), about
# 4 s of CPU and 170 MB in every process that builds a model (each training worker, evaluation task and labelling
# actor) for two small classes. Modules are created, registered and initialised in torchvision's order, so a seed
# gives the same weights and a checkpoint the same state-dict keys (tests/test_classifier_networks.py compares them).


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with batch norm, and the shortcut (projected where the shape
    changes)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet of basic blocks, ``blocks`` per stage (64, 128, 256, 512 channels)."""

    def __init__(self, blocks: list[int], num_classes: int):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(64, blocks[0], 1)
        self.layer2 = self._stage(128, blocks[1], 2)
        self.layer3 = self._stage(256, blocks[2], 2)
        self.layer4 = self._stage(512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:  # created before the block, as torchvision does (the seed's order)
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG: 3×3 convolutions (``layout``'s channels, "M" a 2×2 max pool), then three fully connected layers."""

    def __init__(self, layout: tuple[int | str, ...], num_classes: int, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            conv = nn.Conv2d(channels, int(v), kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)] if batch_norm \
                else [conv, nn.ReLU(inplace=True)]
            channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
                                        nn.Linear(4096, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def weighted_layers(model: nn.Module) -> int:
    """Convolutions and fully connected layers on the main path (ResNet's projection shortcuts excluded)."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split("."))
