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

import contextlib
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Iterator
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
# what a checkpoint may claim, checked before anything is built or loaded: a meta.json that claims more allocates
# gigabytes per row, or labels with NaN (a temperature of 1e-300, a std of 0)
IMAGE_SIZES = (16, 2048)  # input side: the models' smallest useful input to a large crop
MAX_CLASSES = 1000
T_BOUNDS = (1e-3, 1e3)  # calibration fits T in [0.05, 20]: far outside, the logits are degenerate, not calibrated
MAX_STAGE_BLOCKS = 64  # K-EmotionNet's blocks per stage (the paper's is 16)


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
    if not all(math.isfinite(v) for v in norm["mean"] + norm["std"]) or min(norm["std"]) <= 0:
        raise CheckpointError(f"{uri}: 'normalize' needs finite means and standard deviations above 0")
    if isinstance(meta["image_size"], bool) or not IMAGE_SIZES[0] <= meta["image_size"] <= IMAGE_SIZES[1]:
        raise CheckpointError(f"{uri}: 'image_size' must lie in {list(IMAGE_SIZES)} pixels, not {meta['image_size']}")
    classes = meta["classes"]
    if not 2 <= len(classes) <= MAX_CLASSES or not all(isinstance(c, str) and c.strip() for c in classes):
        raise CheckpointError(f"{uri}: 'classes' must be 2 to {MAX_CLASSES} class names, in order")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{uri}: 'classes' names a class twice: each label needs its own name")
    t = meta.get("temperature", 1.0)
    if not _number(t) or not T_BOUNDS[0] <= t <= T_BOUNDS[1]:
        raise CheckpointError(f"{uri}: 'temperature' must lie in {list(T_BOUNDS)} (the calibration of the logits), "
                              f"not {t}")
    _check_arguments(uri, meta["arguments"])
    if not isinstance(meta.get("abstention") or {}, dict):
        raise CheckpointError(f"{uri}: 'abstention' must be an object (threshold, target_accuracy, ...)")
    threshold = (meta.get("abstention") or {}).get("threshold")
    if threshold is not None and not (_number(threshold) and 0 <= threshold <= 1):
        raise CheckpointError(f"{uri}: 'abstention.threshold' must be a confidence between 0 and 1")
    return meta


def _check_arguments(uri: str, arguments: dict[str, Any]) -> None:
    """The architecture's arguments within what kemo builds: a model of thousands of blocks is refused here, before
    it is constructed (its construction alone would take minutes and gigabytes)."""
    blocks = arguments.get("blocks")
    if blocks is None:
        return
    if not isinstance(blocks, list) or len(blocks) != 4 or not all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_STAGE_BLOCKS for b in blocks):
        raise CheckpointError(f"{uri}: 'arguments.blocks' must be four stages of 1 to {MAX_STAGE_BLOCKS} blocks, "
                              f"not {blocks}")


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
    ``meta.json`` says (another architecture, a forged or truncated ``model.pt``, a zip bomb) raises
    ``CheckpointError``, the bomb before torch is imported (its import alone holds ~470 MB). The model is built
    uninitialised and takes the loaded tensors as its own: no random initialisation (seconds for K-EmotionNet) and
    no second copy of the weights."""
    meta = read_meta(path)
    model, state = _model_and_state(path, meta)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state) if not _tensor(state[k]) or state[k].shape != own[k].shape)
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"{storage.join(path, MODEL)} does not fit the {meta['architecture']} that meta.json names: "
            f"{len(missing)} tensors missing, {len(unexpected)} unexpected, {len(misshapen)} of another shape (e.g. "
            f"{(missing or unexpected or misshapen)[0]})")
    # in the model's own dtypes, as a copy into a built model would hold them
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, assign=True)
    return model.to(device).eval(), meta


def _model_and_state(path: str, meta: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(the architecture ``meta`` names, built uninitialised (:func:`_uninitialised`); the state dict
    ``model.pt`` holds), both checked: the file is the one ``meta.json`` describes, declares no more tensor bytes than
    the model holds, and is a plain state dict. The file's bytes are freed on return."""
    uri = storage.join(path, MODEL)
    try:
        data = storage.read_bounded(uri, MAX_MODEL_BYTES)
    except (storage.TooLarge, storage.NotAFile) as e:
        raise CheckpointError(f"{uri}: {e}") from None
    if hashlib.sha256(data).hexdigest() != meta["model_sha256"]:
        raise CheckpointError(f"{uri} is not the model.pt that meta.json describes (its SHA-256 differs: a write "
                              "was interrupted, or the file was replaced)")
    _check_declared_size(uri, data, len(data) + (1 << 20))  # torch stores tensors uncompressed: no more than the file
    import torch

    from kemo.classifier.registry import MODELS, create_model

    if meta["architecture"] not in MODELS:
        raise CheckpointError(f"{storage.join(path, META)} names architecture {meta['architecture']!r}, which this "
                              f"kemo does not know ({', '.join(MODELS)})")
    try:
        with _uninitialised():
            model = create_model(meta["architecture"], num_classes=len(meta["classes"]), **meta["arguments"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{storage.join(path, META)}: {meta['architecture']} cannot be built with arguments "
                              f"{meta['arguments']}: {e}") from None
    _check_declared_size(uri, data, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated zip: refused, never run
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's advice runs on for lines
        raise CheckpointError(f"{uri} is not a plain state dict ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri} holds a {type(state).__name__}, not a state dict")
    return model, state


@contextlib.contextmanager
def _uninitialised() -> Iterator[None]:
    """Models built in the block keep their tensors as allocated (``torch.nn.init`` does nothing): the state dict
    replaces every one of them. Untouched memory holds no pages, and K-EmotionNet's random initialisation took seconds
    (on the meta device, its decompositions import torch._dynamo: seconds more, and ~150 MB)."""
    from torch.nn import init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def _tensor(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _check_declared_size(uri: str, data: bytes, expected: int) -> None:
    """Refuse a ``model.pt`` whose archive declares more tensor bytes than the model holds (a zip bomb: 2 MB that
    inflate to gigabytes), from the zip's own directory, before any storage is read."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            declared = sum(i.file_size for i in archive.infolist() if "/data/" in i.filename)
    except zipfile.BadZipFile:
        return  # not torch's zip format: torch.load refuses it below, in one line
    if declared > expected * 1.05 + (1 << 20):
        raise CheckpointError(f"{uri} declares {declared} bytes of tensors, more than the {expected} it may hold: "
                              "refused before reading it")


def input_batch(images: np.ndarray | list[np.ndarray], meta: dict[str, Any], device: str | torch.device = "cpu"
                ) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3), any size → the normalised float (N, 3, S, S) batch the checkpoint expects,
    through the input transform training and evaluation use (:class:`~kemo.classifier.transform.InputTransform`)."""
    return InputTransform.of(meta)(images, device)
