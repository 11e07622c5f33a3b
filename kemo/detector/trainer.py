"""ultralytics' detection trainer, made safe for kemo: offline, and importable by its DDP workers.

Multi-GPU training makes ultralytics write a script that unpickles the trainer *class* in fresh processes: importing
this module there registers MultiSEAM and C3RFEM with ultralytics' YAML parser before any model is rebuilt.
"""

from __future__ import annotations

import logging

import torch
from ultralytics.engine import trainer as ul_trainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import WEIGHTS_DIR

from kemo.detector import modules

log = logging.getLogger(__name__)
modules.register()
_ultralytics_check_amp = ul_trainer.check_amp


def check_amp_offline(model: torch.nn.Module) -> bool:
    """ultralytics' AMP check compares fp32 and fp16 outputs of yolo26n.pt, which it downloads when missing; offline
    that download fails. Use the check when the weights are already on disk, else trust AMP on CUDA (disable it with
    ``--train-args '{"amp": false}'`` on a GPU known to break it)."""
    if (WEIGHTS_DIR / "yolo26n.pt").is_file():
        return _ultralytics_check_amp(model)
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    log.warning("AMP check skipped (it needs yolo26n.pt, which is never downloaded): training with AMP")
    return True


class FaceTrainer(DetectionTrainer):
    """DetectionTrainer with kemo's modules registered and the offline AMP check."""

    def __init__(self, *args, **kwargs):
        ul_trainer.check_amp = check_amp_offline
        super().__init__(*args, **kwargs)
