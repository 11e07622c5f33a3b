"""Model creation by name: ``create_model(name, num_classes)`` over the :data:`MODELS` registry, and
:func:`load_initial_weights` for a run that starts from a user's weights file instead of random ones.

A checkpoint's ``meta.json`` records an architecture by its registry name and arguments, so that
:func:`create_model` alone rebuilds it. Nothing is downloaded: models start from random weights or from a file the
user gives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kemo.classifier.networks import kemotionnet, resnet18, vgg19, vgg19_bn

log = logging.getLogger(__name__)
MODELS: dict[str, Callable[..., nn.Module]] = {"kemotionnet": kemotionnet, "resnet18": resnet18, "vgg19": vgg19,
                                               "vgg19_bn": vgg19_bn}


def create_model(name: str, num_classes: int = 7, **kwargs: Any) -> nn.Module:
    """A registered model with ``num_classes`` outputs and random weights."""
    try:
        build = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return build(num_classes=num_classes, **kwargs)


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
