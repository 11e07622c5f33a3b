"""The paper's classifiers behind one registry (issue 5, DESIGN §1): ``create_model(name, num_classes)``.

- ``kemotionnet``: K-EmotionNet, a ResNet of basic (non-bottleneck) blocks with 54 weighted layers: the stem conv,
  2 × 26 block convs and the classifier. The paper gives no stage layout; the default ``[3, 4, 16, 3]`` deepens stage 3
  as ResNet-101/152 do. ``blocks=`` changes it (a ResNet of basic blocks has 2 + 2 × sum(blocks) weighted layers).
- ``resnet18``, ``vgg19`` (the paper's baselines, torchvision's definitions) and ``vgg19_bn`` (VGG19 with batch norm,
  which trains from scratch far more reliably than the plain one).

Weighted layers are counted as ResNet's and VGG's names count them: convolutions and fully connected layers on the
main path; ResNet's 1×1 projection shortcuts are not counted (ResNet-18 has 18 by this rule, and 3 projections more).
Nothing is downloaded: models start from random weights or from a file the user gives (:func:`load_initial_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
KEMOTIONNET_BLOCKS = (3, 4, 16, 3)


def kemotionnet(num_classes: int = 7, blocks: tuple[int, ...] | list[int] = KEMOTIONNET_BLOCKS) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"K-EmotionNet needs four stages of at least one block, got {list(blocks)}")
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


MODELS: dict[str, Callable[..., nn.Module]] = {"kemotionnet": kemotionnet, "resnet18": resnet18, "vgg19": vgg19,
                                               "vgg19_bn": vgg19_bn}


def create_model(name: str, num_classes: int = 7, **kwargs: Any) -> nn.Module:
    """A registered model with ``num_classes`` outputs and random weights."""
    try:
        build = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return build(num_classes=num_classes, **kwargs)


def weighted_layers(model: nn.Module) -> int:
    """Convolutions and fully connected layers on the main path (ResNet's projection shortcuts excluded)."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split("."))


def load_initial_weights(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Start from a user's weights file (path or ``s3://``; a state dict, or a dict holding one under
    ``state_dict``/``model``), loaded with ``weights_only=True``. Tensors whose name and shape match are copied (an
    ImageNet classifier's 1000-way head is not); returns what was loaded, what in the file was skipped and what in the
    model kept its random start, and refuses a file that matches nothing."""
    import io

    from kemo import storage

    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = sorted(set(state) - set(loaded))
    if not loaded:
        raise ValueError(f"{path}: no tensor matches the model's names and shapes")
    missing = sorted(set(own) - set(loaded))
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    log.info("initialised %d of the model's %d tensors from %s (%d in the file skipped: %s; %d left random: %s)",
             len(loaded), len(own), path, len(skipped), skipped[:5], len(missing), missing[:5])
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
