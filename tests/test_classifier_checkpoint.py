"""The checkpoint directory: reloads to identical logits and class order, locally and on S3; refuses torn writes."""

import numpy as np
import pytest
import torch

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import input_batch, load_checkpoint, save_checkpoint
from kemo.classifier.registry import create_model


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
    from kemo.classifier.data import resize_square

    same = resize_square(images[0], 64).astype(np.float32) / 255  # the training data's resize, exactly
    mean, std = np.array(meta["normalize"]["mean"]), np.array(meta["normalize"]["std"])
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), (same - mean) / std, atol=1e-5)
    weights = storage.join(path, "model.pt")
    storage.write_bytes(weights, storage.read_bytes(weights)[:-8] + b"x" * 8)  # another epoch's weights, say
    with pytest.raises(ValueError, match="not the one meta.json describes"):
        load_checkpoint(path)


def _local(path, tmp_path):
    out = tmp_path / "copy.pt"
    out.write_bytes(storage.read_bytes(storage.join(path, "model.pt")))
    return str(out)

