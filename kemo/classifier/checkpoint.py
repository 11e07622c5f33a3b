"""The classifier checkpoint: a directory with ``model.pt`` and ``meta.json``, local or s3://.

Training writes it and labelling reads it, so it is the one contract between them. ``model.pt`` is a plain state
dict (loaded with ``weights_only=True``: no pickled code runs); ``meta.json`` names the architecture and its arguments,
the class names in index order, the input size and normalisation, and whatever training config, metrics and code
version the trainer adds; once calibrated (jobs/train.py calibrates each run's best checkpoint), the
``temperature`` that calibrates its softmax and the ``abstention`` threshold fitted on validation (an uncalibrated
checkpoint has neither: temperature 1, no threshold). :func:`load_checkpoint` rebuilds the model, and
:func:`input_batch` its input (:class:`kemo.classifier.transform.InputTransform`), from these alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.transform import IMAGENET, InputTransform
from kemo.config import code_version

if TYPE_CHECKING:  # torch is imported where a model is built: reading meta.json (a rerun's check) needs none
    import torch
    from torch import nn

MODEL, META = "model.pt", "meta.json"
MAX_META_BYTES, MAX_MODEL_BYTES = 1 << 20, 4 << 30  # bounded reads of regular files: a FIFO or a device is refused


def save_checkpoint(path: str, model: nn.Module, architecture: str, arguments: dict[str, Any] | None = None,
                    image_size: int = 224, normalize: dict[str, list[float]] | None = None,
                    classes: list[str] | tuple[str, ...] = CLASS_NAMES, **extra: Any) -> dict[str, Any]:
    """Write ``model.pt`` then ``meta.json`` (the file a reader checks first) under ``path``; returns the meta."""
    import torch

    model = getattr(model, "module", model)  # DDP-wrapped under Ray Train with several workers
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    meta = {"architecture": architecture, "arguments": dict(arguments or {}), "classes": list(classes),
            "image_size": image_size, "normalize": normalize or IMAGENET, "code_version": code_version(),
            "model_sha256": hashlib.sha256(data).hexdigest(), **extra}
    storage.write_bytes(storage.join(path, MODEL), data)
    storage.write_json(storage.join(path, META), meta)
    return meta


class CheckpointError(ValueError):
    """A checkpoint that cannot be what it claims, in one line naming the file and the problem."""


META_KEYS = {"architecture": str, "arguments": dict, "classes": list, "image_size": int, "normalize": dict,
             "model_sha256": str}


def read_meta(path: str) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked: every key a reader needs, of its type (the architecture is checked
    against the registry where the model is built, :func:`load_checkpoint`)."""
    uri = storage.join(path, META)
    try:
        meta = json.loads(storage.read_bounded(uri, MAX_META_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} not found: --checkpoint takes a directory holding model.pt and meta.json") \
            from None
    except (storage.TooLarge, storage.NotAFile) as e:
        raise CheckpointError(f"{uri}: {e}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise CheckpointError(f"{uri} is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{uri} holds no JSON object")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{uri}: {key!r} is missing or not a {kind.__name__}")
    norm = meta["normalize"]
    if not all(isinstance(norm.get(k), list) and len(norm[k]) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in norm[k]) for k in ("mean", "std")):
        raise CheckpointError(f"{uri}: 'normalize' needs 'mean' and 'std', three numbers each")
    if isinstance(meta["image_size"], bool) or meta["image_size"] <= 0:
        raise CheckpointError(f"{uri}: 'image_size' must be a positive number of pixels")
    if not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]):
        raise CheckpointError(f"{uri}: 'classes' must be the class names, in order")
    t = meta.get("temperature", 1.0)
    if not _number(t) or not 0 < t < float("inf"):
        raise CheckpointError(f"{uri}: 'temperature' must be a positive number (the calibration of the logits)")
    if not isinstance(meta.get("abstention") or {}, dict):
        raise CheckpointError(f"{uri}: 'abstention' must be an object (threshold, target_accuracy, ...)")
    threshold = (meta.get("abstention") or {}).get("threshold")
    if threshold is not None and not (_number(threshold) and 0 <= threshold <= 1):
        raise CheckpointError(f"{uri}: 'abstention.threshold' must be a confidence between 0 and 1")
    return meta


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def temperature(meta: dict[str, Any]) -> float:
    """The temperature the logits are divided by before the softmax: fitted on validation after training
    (:mod:`kemo.classifier.calibration`); 1 for a checkpoint not calibrated."""
    return float(meta.get("temperature", 1.0))


def abstention_threshold(meta: dict[str, Any], where: str) -> float:
    """The calibrated confidence below which a label is abstained on, as fitted on validation for the target
    accuracy; refused, in one line, for a checkpoint that has none."""
    abstention = meta.get("abstention")
    if not abstention:
        raise CheckpointError(f"{where} holds no abstention threshold (a checkpoint not calibrated: jobs/train.py "
                              "calibrates each run's best checkpoint): give --min-confidence X instead of --abstain")
    if abstention.get("threshold") is None:
        raise CheckpointError(f"{where}: no confidence reached the target accuracy "
                              f"{abstention.get('target_accuracy')} on validation, so it has no threshold: give "
                              "--min-confidence X, or a lower jobs/train.py --target-accuracy")
    return float(abstention["threshold"])


def load_checkpoint(path: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a checkpoint directory; a checkpoint that is not what its
    ``meta.json`` says (another architecture, a forged or truncated ``model.pt``) raises ``CheckpointError``."""
    import torch

    from kemo.classifier.registry import MODELS, create_model

    meta = read_meta(path)
    if meta["architecture"] not in MODELS:
        raise CheckpointError(f"{storage.join(path, META)} names architecture {meta['architecture']!r}, which this "
                              f"kemo does not know ({', '.join(MODELS)})")
    uri = storage.join(path, MODEL)
    try:
        data = storage.read_bounded(uri, MAX_MODEL_BYTES)
    except (storage.TooLarge, storage.NotAFile) as e:
        raise CheckpointError(f"{uri}: {e}") from None
    if hashlib.sha256(data).hexdigest() != meta["model_sha256"]:
        raise CheckpointError(f"{uri} is not the model.pt that meta.json describes (its SHA-256 differs: a write "
                              "was interrupted, or the file was replaced)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated zip: refused, never run
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's advice runs on for lines
        raise CheckpointError(f"{uri} is not a plain state dict ({type(e).__name__}: {first})") from None
    try:
        model = create_model(meta["architecture"], num_classes=len(meta["classes"]), **meta["arguments"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{storage.join(path, META)}: {meta['architecture']} cannot be built with arguments "
                              f"{meta['arguments']}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state)
                       if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"{uri} does not fit the {meta['architecture']} that meta.json names: {len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, {len(misshapen)} of another shape (e.g. "
            f"{(missing or unexpected or misshapen)[0]})")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def input_batch(images: np.ndarray | list[np.ndarray], meta: dict[str, Any], device: str | torch.device = "cpu"
                ) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3), any size → the normalised float (N, 3, S, S) batch the checkpoint expects,
    through the input transform training and evaluation use (:class:`~kemo.classifier.transform.InputTransform`)."""
    return InputTransform.of(meta)(images, device)
