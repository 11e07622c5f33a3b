"""Which torch device a model runs on."""

from __future__ import annotations


def torch_device(device: str) -> str:
    """``auto`` is the first CUDA GPU when there is one, else the CPU; anything else is taken as given."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
