"""The classifier's input: uint8 RGB photos → resized to the model's square side → ``/255`` → normalised by the
checkpoint's own mean and std. Training, evaluation and labelling all take their input through :class:`InputTransform`
(training augments between :meth:`~InputTransform.scale` and :meth:`~InputTransform.normalise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB → (size, size, 3): area-averaged when shrinking. Training and labelling both resize here."""
    if image.shape[:2] == (size, size):
        return image
    shrink = size < min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class InputTransform:
    """A model's input: its square side and the normalisation it was trained with."""

    size: int
    mean: tuple[float, ...] = tuple(IMAGENET["mean"])
    std: tuple[float, ...] = tuple(IMAGENET["std"])
    # (mean, std) as (1, 3, 1, 1) tensors per device, made once: no host-to-device copy per training step
    _stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False,
                                                                 compare=False, hash=False)

    @classmethod
    def of(cls, meta: dict[str, Any]) -> InputTransform:
        """The input a checkpoint expects, from its ``meta.json``."""
        return cls(meta["image_size"], tuple(meta["normalize"]["mean"]), tuple(meta["normalize"]["std"]))

    def resize(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H, W, 3) RGB photos, any size → one (N, S, S, 3) uint8 array that torch may write to."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (self.size,
                                                                                              self.size, 3):
            # Ray Data's zero-copy view is read-only: torch wants memory it may write
            return images if images.flags.writeable else images.copy()
        batch = []
        for image in images:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"expected uint8 (H, W, 3) RGB images, got {image.shape} {image.dtype}")
            batch.append(resize_square(image, self.size))
        return np.stack(batch)

    def scale(self, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        """(B, S, S, 3) uint8 → (B, 3, S, S) float in [0, 1] on ``device``."""
        return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] → ``(x − mean) / std`` per channel."""
        import torch

        if str(x.device) not in self._stats:
            self._stats[str(x.device)] = (torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1),
                                          torch.tensor(self.std, device=x.device).view(1, 3, 1, 1))
        mean, std = self._stats[str(x.device)]
        return (x - mean) / std

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], device: str | torch.device = "cpu"
                 ) -> torch.Tensor:
        """uint8 RGB photos, any size → the normalised float (N, 3, S, S) batch on ``device``."""
        import torch

        return self.normalise(self.scale(torch.from_numpy(self.resize(images)), device))
