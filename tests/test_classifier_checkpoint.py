"""The checkpoint directory: reloads to identical logits and class order, locally and on S3; refuses torn writes,
another architecture, pickled code and a broken meta.json, each in one line."""

import copy
import hashlib
import io

import numpy as np
import pytest
import torch

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import CheckpointError, input_batch, load_checkpoint, read_meta, save_checkpoint
from kemo.classifier.registry import MODELS, create_model


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_reloads_to_identical_logits_and_class_order(where, tmp_path, request):
    torch.manual_seed(0)
    model = create_model("kemotionnet", blocks=[1, 1, 1, 1]).eval()
    if where == "s3":
        path = f"s3://{request.getfixturevalue('s3_bucket')}/ckpt/best"
    else:
        path = str(tmp_path / "best")
    save_checkpoint(path, torch.nn.DataParallel(model), "kemotionnet", {"blocks": [1, 1, 1, 1]}, image_size=64,
                    metrics={"val_accuracy": 0.5})
    images = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == list(CLASS_NAMES) and meta["metrics"] == {"val_accuracy": 0.5}
    x = input_batch(images, meta)
    assert x.shape == (3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    state = torch.load(storage.join(path, "model.pt") if where == "local" else _local(path, tmp_path),
                       weights_only=True)  # a plain state dict: no pickled code
    assert not any(k.startswith("module.") for k in state)
    with pytest.raises(ValueError, match="uint8"):
        input_batch(images.astype(np.float32), meta)
    from kemo.classifier.transform import resize_square

    same = resize_square(images[0], 64).astype(np.float32) / 255  # the training data's resize, exactly
    mean, std = np.array(meta["normalize"]["mean"]), np.array(meta["normalize"]["std"])
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), (same - mean) / std, atol=1e-5)
    weights = storage.join(path, "model.pt")
    storage.write_bytes(weights, storage.read_bytes(weights)[:-8] + b"x" * 8)  # another epoch's weights, say
    with pytest.raises(CheckpointError, match="not the model.pt that meta.json describes"):
        load_checkpoint(path)


def _with(path: str, meta: dict | None = None, model: bytes | None = None) -> None:
    """Rewrite a checkpoint's meta.json and/or model.pt, keeping meta's hash true to the model written."""
    meta = meta if meta is not None else storage.read_json(storage.join(path, "meta.json"))
    if model is not None:
        storage.write_bytes(storage.join(path, "model.pt"), model)
        meta = {**meta, "model_sha256": hashlib.sha256(model).hexdigest()}
    storage.write_json(storage.join(path, "meta.json"), meta)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_checkpoint_that_is_not_what_its_meta_says_is_refused_in_one_line(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet", {"blocks": [1, 1, 1, 1]},
                    image_size=48)
    good = storage.read_json(storage.join(path, "meta.json"))
    weights = storage.read_bytes(storage.join(path, "model.pt"))
    forged = io.BytesIO()
    torch.save({"conv.weight": _Payload()}, forged)
    cases = {
        "does not fit the resnet18 that meta.json names": ({**good, "architecture": "resnet18", "arguments": {}}, None),
        "names architecture 'vit_h14'": ({**good, "architecture": "vit_h14"}, None),
        "'classes' is missing": ({k: v for k, v in good.items() if k != "classes"}, None),
        "three numbers each": ({**good, "normalize": {"mean": [0.5], "std": [0.5]}}, None),
        "'image_size' must lie in": ({**good, "image_size": 0}, None),
        "is not a plain state dict": (good, forged.getvalue()),  # pickled code, its hash recorded: never run
        "truncated": (good, weights[: len(weights) // 2]),
    }
    for message, (meta, model) in cases.items():
        _with(path, meta, model)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        text = str(e.value)
        assert "\n" not in text and len(text) < 400, text
        if message != "truncated":
            assert message in text, text
        else:
            assert "is not a plain state dict" in text, text
        _with(path, good, weights)
    assert "pickled code ran" not in capsys.readouterr().out  # refused, never run
    assert load_checkpoint(path)[1]["architecture"] == "kemotionnet"  # the right files load again
    storage.write_bytes(storage.join(path, "meta.json"), b"{not json")
    with pytest.raises(CheckpointError, match="is not JSON"):
        read_meta(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(str(tmp_path / "nowhere"))


def _local(path, tmp_path):
    out = tmp_path / "copy.pt"
    out.write_bytes(storage.read_bytes(storage.join(path, "model.pt")))
    return str(out)



def _forged(tmp_path, name: str, **meta) -> str:
    """A small real checkpoint whose meta.json then claims ``meta``."""
    import json

    path = str(tmp_path / name)
    save_checkpoint(path, create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet", {"blocks": [1, 1, 1, 1]},
                    image_size=32)
    claims = {**json.load(open(f"{path}/meta.json")), **meta}
    json.dump(claims, open(f"{path}/meta.json", "w"))
    return path


@pytest.mark.parametrize("meta, message", [
    ({"image_size": 100000}, "'image_size' must lie in"),
    ({"temperature": 1e-300}, "'temperature' must lie in"),
    ({"temperature": float("inf")}, "'temperature' must lie in"),
    ({"normalize": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}, "standard deviations above 0"),
    ({"classes": ["happy"] * 7}, "names a class twice"),
    ({"classes": ["happy"]}, "2 to 1000 class names"),
    ({"arguments": {"blocks": [3, 4, 300, 3]}}, "four stages of 1 to 64 blocks"),
])
def test_meta_json_claims_are_bounded_before_anything_is_built(meta, message, tmp_path):
    path = _forged(tmp_path, "forged", **meta)
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)


def test_a_model_pt_declaring_more_tensor_bytes_than_its_model_is_refused_before_it_is_read(tmp_path):
    """A zip bomb: a few KB that declare gigabytes of tensors, with meta.json's hash to match."""
    import json
    import zipfile

    path = _forged(tmp_path, "bomb")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", b"\0" * (64 << 20))  # 64 MB of zeros, deflated to ~64 KB
    open(f"{path}/model.pt", "wb").write(buf.getvalue())
    meta = json.load(open(f"{path}/meta.json"))
    json.dump({**meta, "model_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}, open(f"{path}/meta.json", "w"))
    with pytest.raises(CheckpointError, match=r"declares 67108864 bytes of tensors, more than the \d+ it may hold"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_tensor_of_a_registered_model_is_in_its_state_dict(name):
    """A model built uninitialised takes its tensors from the state dict alone (assign): a buffer left out of it
    (non-persistent) would keep what its constructor made, a parameter its garbage."""
    with torch.device("meta"):
        model = create_model(name)
    held = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    assert held <= set(model.state_dict())


def test_a_loaded_checkpoint_is_the_saved_model_in_fp32(tmp_path):
    torch.manual_seed(0)
    model = create_model("kemotionnet", blocks=[1, 1, 1, 1]).eval()
    save_checkpoint(str(tmp_path / "fp32"), model, "kemotionnet", {"blocks": [1, 1, 1, 1]}, image_size=32)
    half = copy.deepcopy(model).half()
    save_checkpoint(str(tmp_path / "fp16"), half, "kemotionnet", {"blocks": [1, 1, 1, 1]}, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    for folder in ("fp32", "fp16"):
        loaded, _ = load_checkpoint(str(tmp_path / folder))
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert not loaded.training and not any(t.is_meta for t in tensors)
        assert {t.dtype for t in loaded.parameters()} == {torch.float32}  # as a copy into a built model holds them
        saved = (model if folder == "fp32" else half).state_dict()
        for k, a in loaded.state_dict().items():
            assert torch.equal(a, saved[k].to(a.dtype)), k
        if folder == "fp32":
            with torch.inference_mode():
                assert torch.equal(loaded(x), model(x))
