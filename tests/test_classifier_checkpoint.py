"""Checkpoint contract (DESIGN §4) and classification metrics against a hand-computed confusion matrix."""

import json

import numpy as np
import pytest
import torch

from kemo import storage
from kemo.classes import CLASS_NAMES
from kemo.classifier import create_model
from kemo.classifier.checkpoint import load_checkpoint, preprocess, save_checkpoint
from kemo.classifier.metrics import classification_report, confusion_matrix


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
    x = preprocess(images, meta)
    assert x.shape == (3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    state = torch.load(storage.join(path, "model.pt") if where == "local" else _local(path, tmp_path),
                       weights_only=True)  # a plain state dict: no pickled code
    assert not any(k.startswith("module.") for k in state)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32), meta)
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


def test_metrics_match_a_hand_computed_confusion_matrix():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    r = classification_report(cm, ["a", "b", "c", "d"])
    assert r["accuracy"] == pytest.approx(6 / 9)
    assert r["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert r["per_class"]["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert r["per_class"]["c"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert r["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)  # classes absent from the set excluded
    json.dumps(r)  # goes into report.json as it is
    with pytest.raises(ValueError, match="indices"):
        confusion_matrix([0, 7], [0, 1], 7)
