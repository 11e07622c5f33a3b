"""ultralytics' detection trainer, made safe for kemo: offline, importable by its DDP workers, and training with
YOLO-FaceV2's loss terms when asked (:meth:`FaceTrainer.with_loss`).

Multi-GPU training makes ultralytics write a script that unpickles the trainer *class* in fresh processes: importing
this module there registers MultiSEAM and C3RFEM with ultralytics' YAML parser before any model is rebuilt, and the
trainer's constructor makes that process offline (:func:`offline`). The loss weights travel as an attribute of that
class; the loss itself lives on the model only while it trains (ultralytics strips ``criterion`` from every
checkpoint), so checkpoints load without kemo's loss.
"""

from __future__ import annotations

import logging
import os
import re
import time

import torch
from ultralytics.data import utils as ul_data_utils
from ultralytics.engine import trainer as ul_trainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import USER_CONFIG_DIR, WEIGHTS_DIR
from ultralytics.utils import checks as ul_checks
from ultralytics.utils import plotting as ul_plotting
from ultralytics.utils.torch_utils import unwrap_model

from kemo.detector import modules
from kemo.detector.loss import STOCK, FaceV2Loss, LossWeights

log = logging.getLogger(__name__)
modules.register()
_ultralytics_check_amp = ul_checks.check_amp
# GPUs ultralytics' own AMP check refuses by name (the part of the check that needs no download)
AMP_BROKEN = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
                        re.IGNORECASE)


def check_amp_offline(model: torch.nn.Module) -> bool:
    """ultralytics' AMP check compares fp32 and fp16 outputs of yolo26n.pt, which it downloads when missing. Use it when
    those weights are on disk; else refuse AMP on the GPUs it refuses by name and trust it on the others (disable it
    with ``--train-args '{"amp": false}'``)."""
    if (WEIGHTS_DIR / "yolo26n.pt").is_file():
        return _ultralytics_check_amp(model)
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    if AMP_BROKEN.search(torch.cuda.get_device_name(device)):
        log.warning("AMP disabled on %s (known to produce NaN losses)", torch.cuda.get_device_name(device))
        return False
    log.warning("AMP check skipped (it needs yolo26n.pt, which is never downloaded): training with AMP")
    return True


def check_font_offline(font: str = "Arial.ttf"):
    """ultralytics' check_font without its download: the font from its config directory or the system, else None.
    Its dataset check calls check_font whatever ``plots`` says; kemo never plots."""
    name = os.path.basename(str(font))
    path = USER_CONFIG_DIR / name
    if path.exists():
        return path
    from matplotlib import font_manager

    return next((f.fname for f in font_manager.fontManager.ttflist if font in f.fname and os.path.exists(f.fname)),
                None)


def offline() -> None:
    """Remove ultralytics' two run-time downloads that YOLO_OFFLINE does not stop (the AMP-check weights, the font)."""
    ul_trainer.check_amp = check_amp_offline
    ul_checks.check_font = check_font_offline
    ul_data_utils.check_font = check_font_offline
    ul_plotting.check_font = check_font_offline


def _start_epoch_clock(trainer: FaceTrainer) -> None:
    trainer.epoch_cpu_start = time.process_time()


def _stop_epoch_clock(trainer: FaceTrainer) -> None:
    trainer.epoch_cpu.append(time.process_time() - trainer.epoch_cpu_start)


class FaceTrainer(DetectionTrainer):
    """DetectionTrainer with kemo's modules registered, no downloads, the loss :attr:`loss_weights` asks for
    (ultralytics' own when stock), and the CPU time of each epoch it trains (``epoch_cpu``: training and validation,
    this process's threads; steadier than wall time on a shared machine)."""

    loss_weights: LossWeights = STOCK

    def __init__(self, *args, **kwargs):
        offline()
        super().__init__(*args, **kwargs)
        self.epoch_cpu: list[float] = []
        self.epoch_cpu_start = 0.0
        self.add_callback("on_train_epoch_start", _start_epoch_clock)
        self.add_callback("on_fit_epoch_end", _stop_epoch_clock)

    @classmethod
    def with_loss(cls, weights: LossWeights) -> type[FaceTrainer]:
        """This trainer training with ``weights``: a subclass, as ultralytics (and the DDP workers it starts, which
        receive the class by value) take a trainer class, not an instance."""
        if weights == cls.loss_weights:
            return cls
        return type(cls.__name__, (cls,), {"loss_weights": weights, "__module__": cls.__module__})

    def _setup_train(self) -> None:
        super()._setup_train()
        if not self.loss_weights.stock:  # else ultralytics builds its own loss on the first batch
            for model in (unwrap_model(self.model), self.ema.ema):  # the EMA's loss is the validation loss
                model.criterion = FaceV2Loss(model, self.loss_weights)
