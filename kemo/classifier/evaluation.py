"""A model on photos, and a checkpoint calibrated and tested: the per-epoch validation pass (:func:`evaluate`), the
logits calibration needs (:func:`predict`), and :func:`calibrate_and_test`, which fits a checkpoint's temperature and
abstention threshold on the val split, stores them in its ``meta.json`` and scores the test split before and after.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier import calibration
from kemo.classifier.calibration import CoveragePoint, Kept, Scores, Threshold
from kemo.classifier.checkpoint import META, load_checkpoint
from kemo.classifier.metrics import ClassificationReport, classification_report, confusion_matrix
from kemo.classifier.transform import InputTransform

COVERAGE_CURVE = tuple(k / 100 for k in range(1, 101))  # the risk-coverage curve, at every 1% of coverage
Batches = Iterable[tuple[Any, Any]]  # (photos, labels): uint8 (B, S, S, 3) tensors, or numpy photos of any size


def _outputs(model: torch.nn.Module, batches: Batches, transform: InputTransform, bf16: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) per batch of uint8 photo tensors already at the model's input size, through
    ``transform``, on the model's device, in eval mode without gradients (bf16 autocast if ``bf16`` and on GPU)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            x = transform.normalise(transform.scale(images, device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                logits = model(x)
            yield logits.float(), labels.to(device)


def evaluate(model: torch.nn.Module, batches: Batches, transform: InputTransform,
             num_classes: int = len(CLASS_NAMES), bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The model on ``batches`` (see :func:`_outputs`). Workers each evaluate their share and add up. Returns
    (confusion matrix ``cm[true, predicted]`` as (num_classes, num_classes) int64 counts, summed cross-entropy as
    float64) on the model's device, so nothing waits for the GPU until the caller reads them."""
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for logits, y in _outputs(model, batches, transform, bf16):
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    return confusion.view(num_classes, num_classes), loss


def predict(model: torch.nn.Module, batches: Batches, transform: InputTransform) -> tuple[np.ndarray, np.ndarray]:
    """The model's fp32 logits (N, classes) and the labels on batches of numpy photos of any size (resized by
    ``transform``): what calibration and the test figures are computed from."""
    logits, labels = [], []
    tensors = ((torch.from_numpy(transform.resize(np.asarray(images))),
                torch.as_tensor(np.asarray(y), dtype=torch.int64)) for images, y in batches)
    for z, y in _outputs(model, tensors, transform, bf16=False):
        logits.append(z.cpu().numpy())
        labels.append(y.cpu().numpy().astype(np.int64))
    if not logits:
        return np.zeros((0, len(CLASS_NAMES)), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def _report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> ClassificationReport:
    predicted = logits.argmax(1) if len(labels) else np.zeros(0, np.int64)
    return classification_report(confusion_matrix(labels, predicted, len(classes)), classes)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_checkpoint(path: str, batches: Batches) -> ClassificationReport:
    """Accuracy, macro-F1, per-class figures and the confusion matrix of a checkpoint on batches of (uint8 photos,
    labels), resized to the checkpoint's input size if they are not at it, in fp32."""
    model, meta = load_checkpoint(path, _device())
    return _report(*predict(model, batches, InputTransform.of(meta)), meta["classes"])


@dataclass
class Calibration:
    """The temperature fitted on validation, and the test split's scores and reliability bins before and after."""

    temperature: float
    fitted_on: dict[str, str | int]  # split, photos
    before: Scores
    after: Scores
    reliability: dict[str, list[calibration.Bin]]  # "before", "after"


@dataclass
class Abstention(Threshold):
    """The abstention threshold fitted on validation (what ``meta.json`` stores), and what it keeps of the test."""

    split: str
    photos_in_split: int
    test: Kept | None = None  # not in meta.json

    def meta(self) -> dict[str, Any]:
        """As the checkpoint's ``meta.json`` stores it."""
        return {k: v for k, v in asdict(self).items() if k != "test"}


@dataclass
class Coverage:
    """Test accuracy of the most confident photos: at the reported coverages and at every 1%."""

    split: str
    table: list[CoveragePoint]
    curve: list[CoveragePoint]


@dataclass
class Tested:
    """A checkpoint calibrated on validation and tested: :func:`calibrate_and_test`'s result."""

    test: ClassificationReport
    calibration: Calibration
    abstention: Abstention
    coverage: Coverage


def calibrate_and_test(path: str, val: Batches, test: Batches, target_accuracy: float) -> Tested:
    """A checkpoint's temperature fitted on ``val`` and stored in its ``meta.json`` (with the abstention threshold
    that keeps ``target_accuracy`` on ``val``); its test figures: the classification report (arg-max, which the
    temperature does not change), calibration before and after (ECE, NLL, Brier, reliability bins), accuracy against
    coverage, and the test photos kept at the validation threshold. Confidences are the top calibrated probability."""
    model, meta = load_checkpoint(path, _device())
    transform = InputTransform.of(meta)
    val_logits, val_labels = predict(model, val, transform)
    test_logits, test_labels = predict(model, test, transform)
    if not len(val_labels) or not len(test_labels):
        raise ValueError(f"{path}: no validation or no test photo decodes: damaged shards?")
    # a checkpoint keeps the temperature it was given: labels made with it stay labels of the same setup (another
    # --target-accuracy moves only the threshold)
    temperature = float(meta["temperature"]) if "temperature" in meta else \
        calibration.fit_temperature(val_logits, val_labels)
    val_probs = calibration.softmax(val_logits, temperature)
    before, after = calibration.softmax(test_logits), calibration.softmax(test_logits, temperature)
    confidence, correct = after.max(1), after.argmax(1) == test_labels
    # the confidence as labelling stores and compares it: float32
    val_confidence = val_probs.max(1).astype(np.float32).astype(np.float64)
    threshold = calibration.threshold_for(val_confidence, val_probs.argmax(1) == val_labels, target_accuracy)
    abstention = Abstention(**asdict(threshold), split="val", photos_in_split=len(val_labels))
    storage.write_json(storage.join(path, META), {**meta, "temperature": temperature, "abstention": abstention.meta()})
    abstention.test = calibration.kept_at(confidence.astype(np.float32).astype(np.float64), correct,
                                          threshold.threshold)
    return Tested(
        _report(test_logits, test_labels, meta["classes"]),
        Calibration(temperature, {"split": "val", "photos": len(val_labels)}, calibration.scores(before, test_labels),
                    calibration.scores(after, test_labels),
                    {"before": calibration.reliability(before, test_labels),
                     "after": calibration.reliability(after, test_labels)}),
        abstention,
        Coverage("test", calibration.coverage_table(confidence, correct),
                 calibration.coverage_table(confidence, correct, COVERAGE_CURVE)))


def _test_task(checkpoint: str, val: Any, test: Any, target_accuracy: float) -> Tested:
    """Ray task: a checkpoint calibrated on the val split and scored on the test split, both streamed from their
    datasets (the driver never holds the photos)."""
    def batches(ds: Any) -> Batches:
        return ((b["image"], b["label"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))

    return calibrate_and_test(checkpoint, batches(val), batches(test), target_accuracy)


def evaluate_on_ray(checkpoint: str, val: Any, test: Any, target_accuracy: float, use_gpu: bool) -> Tested:
    """:func:`calibrate_and_test` in a Ray task next to the data (one GPU with ``use_gpu``)."""
    import ray

    # no CPU reserved: the Ray Data tasks that read and decode the photos for it need the CPUs
    task = ray.remote(num_cpus=0, num_gpus=1 if use_gpu else 0, max_retries=2)(_test_task)
    return ray.get(task.remote(checkpoint, val, test, target_accuracy))
