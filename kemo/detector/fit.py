"""One ultralytics training run into a work directory that survives the job: an interrupted run of the same settings
resumes from its ``last.pt``, a finished one is kept (even one killed before ultralytics stripped its checkpoints),
and any other is started afresh. The trainer itself is :class:`kemo.detector.trainer.FaceTrainer`, with the loss asked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from kemo import storage
from kemo.detector.loss import LossWeights

log = logging.getLogger(__name__)


@dataclass
class Training:
    """How the ultralytics run went (``meta.json``'s ``train``): its settings, time, device, and whether it resumed
    an interrupted run (at which epoch) or reused a finished one."""

    train: dict[str, Any]  # what makes a run the same: source and dataset hashes, epochs, imgsz, batch, seed, args,
    # the loss weights
    seconds: float
    resumed_at_epoch: int | None
    reused_finished_run: bool
    device: str
    cpu_seconds_per_epoch: float | None  # this process's CPU per epoch trained (FaceTrainer.epoch_cpu); None: none


def _read_json(path: str) -> Any:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return None


def _finished_last(last: str, run_dir: str, epochs: int) -> tuple[dict[str, Any] | None, bool]:
    """(``last.pt``'s checkpoint to resume from, or None; whether the run had finished: then its best.pt and
    last.pt are stripped as ultralytics would have). A checkpoint that does not load is None: train again."""
    import torch
    from ultralytics.utils.torch_utils import strip_optimizer

    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:  # killed while ultralytics wrote it: start over
        log.warning("%s does not load (%s): training again from the start", last, e)
        return None, False
    if ckpt.get("epoch", -1) == -1 or ckpt.get("optimizer") is None \
            or ckpt["epoch"] + 1 >= ckpt.get("train_args", {}).get("epochs", epochs):
        # the last epoch ran: killed before (or while) ultralytics stripped its checkpoints, or before
        # trained.json; finish what it would have done instead of asking it to resume a finished run
        try:
            for path in (os.path.join(run_dir, "weights", "best.pt"), last):
                strip_optimizer(path)
            log.info("training in %s had finished; keeping its best.pt", run_dir)
            return None, True
        except Exception as e:  # killed while ultralytics rewrote best.pt
            log.warning("the finished run in %s is damaged (%s): training again from the start", run_dir, e)
            return None, False
    return ckpt, False


def run_dir(work: str) -> str:
    """Where ultralytics trains (``results.csv``, ``weights/``) for a work directory."""
    return os.path.join(work, "runs", "train")


def fit(wanted: dict[str, Any], loss: LossWeights, source_path: str, data_yaml: str, work: str, device: str,
        workers: int) -> tuple[Training, str]:
    """(how training went, best.pt's path): ultralytics trains into ``work/runs/train`` with ``loss``, ``wanted``
    (the run's settings, with ``train_args``; the loss is added to it) deciding whether an earlier run there is this
    one: an interrupted one resumes, a finished one is kept."""
    from ultralytics import YOLO

    from kemo.detector import trainer

    wanted = {**wanted, "loss": dataclasses.asdict(loss)}
    face_trainer = trainer.FaceTrainer.with_loss(loss)
    runs = run_dir(work)
    last = os.path.join(runs, "weights", "last.pt")
    state_path, done_path = os.path.join(work, "train.json"), os.path.join(work, "trained.json")
    state, done = _read_json(state_path), _read_json(done_path)
    t0 = time.perf_counter()
    if state == wanted and done and done.get("train") == wanted and os.path.isfile(done["best"]):
        log.info("training already finished in %s", runs)
        best = done.pop("best")
        return Training(**done), best
    ckpt, finished = _finished_last(last, runs, wanted["epochs"]) if state == wanted and os.path.isfile(last) \
        else (None, False)
    if finished:
        return _finish(done_path, wanted, runs, t0, None, device, [], reused=True)
    if ckpt is not None:
        resumed = int(ckpt["epoch"]) + 1
        log.info("resuming the interrupted training from %s (epoch %d of %d)", last, resumed + 1, wanted["epochs"])
        # device and workers may differ on this machine; every other setting comes from the checkpoint
        yolo = YOLO(last)
        yolo.train(resume=True, device=device, workers=workers, trainer=face_trainer)
        return _finish(done_path, wanted, runs, t0, resumed, device, yolo.trainer.epoch_cpu)
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    storage.write_json(state_path, wanted)
    if os.path.exists(done_path):
        os.remove(done_path)
    args = {"data": data_yaml, "epochs": wanted["epochs"], "imgsz": wanted["imgsz"], "batch": wanted["batch"],
            "device": device, "workers": workers, "seed": wanted["seed"], "project": os.path.join(work, "runs"),
            "name": "train", "exist_ok": True, "plots": False, "verbose": False}
    yolo = YOLO(source_path, task="detect")
    yolo.train(**{**args, **wanted["train_args"]}, trainer=face_trainer)
    return _finish(done_path, wanted, runs, t0, None, device, yolo.trainer.epoch_cpu)


def _finish(done_path: str, wanted: dict[str, Any], runs: str, t0: float, resumed: int | None,
            device: str, epoch_cpu: list[float], reused: bool = False) -> tuple[Training, str]:
    import torch

    best = os.path.join(runs, "weights", "best.pt")
    if not os.path.isfile(best):
        raise RuntimeError(f"ultralytics finished without {best}")
    torch.load(best, map_location="cpu", weights_only=False)  # a truncated best.pt fails here, not after trained.json
    cpu = round(sum(epoch_cpu) / len(epoch_cpu), 2) if epoch_cpu else None
    training = Training(train=wanted, seconds=round(time.perf_counter() - t0, 1), resumed_at_epoch=resumed,
                        reused_finished_run=reused, device=device, cpu_seconds_per_epoch=cpu)
    storage.write_json(done_path, {**dataclasses.asdict(training), "best": best})
    return training, best
