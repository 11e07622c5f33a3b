"""Ray Train runs of the classifiers on CPU: two workers, the best checkpoint, a killed worker resumed exactly."""

import os

import numpy as np
import pytest
import torch

from kemo.classifier.checkpoint import load_checkpoint, preprocess
from kemo.classifier.train import TRAIN_STATE, RunSpec, augment, fit, keeps_checkpoint, learning_rate, random_erasing

pytestmark = pytest.mark.slow
SPEC = RunSpec(model="resnet18", epochs=3, batch_size=32, image_size=32)


def colour_coded(n, seed):
    """Photos whose class is written in one channel's brightness: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n).astype(np.int64)
    x = rng.integers(0, 20, (n, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, :, c % 3] += np.uint8(40 + 30 * c)
    return x, y


@pytest.fixture(scope="module")
def data():
    return colour_coded(224, 0), colour_coded(56, 1)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, data, tmp_path_factory):
    train, val = data
    return fit(train, val, SPEC, str(tmp_path_factory.mktemp("runs")), "r18", workers=2)


def test_two_workers_train_and_the_best_checkpoint_scores_what_it_reported(uninterrupted, data):
    _, (x_val, y_val) = data
    assert uninterrupted.error is None and uninterrupted.metrics["epoch"] == 3
    (best, metrics), = uninterrupted.best_checkpoints
    assert metrics["val_accuracy"] == uninterrupted.metrics["best_val_accuracy"] > 0.5  # chance is 1/7
    with best.as_directory() as d:
        model, meta = load_checkpoint(d)
        state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
    assert meta["training"]["workers"] == 2 and meta["metrics"] == metrics
    with torch.no_grad():
        accuracy = float((model(preprocess(x_val, meta)).argmax(1).numpy() == y_val).mean())
    assert accuracy == pytest.approx(metrics["val_accuracy"])
    assert [h["epoch"] for h in state["history"]][-1] == metrics["epoch"]


def test_a_killed_worker_resumes_from_the_last_checkpoint_and_ends_where_an_uninterrupted_run_does(
        uninterrupted, data, tmp_path):
    train, val = data
    marker = str(tmp_path / "killed")
    result = fit(train, val, SPEC, str(tmp_path / "runs"), "r18", workers=2, max_failures=1,
                 _fail_once={"epoch": 1, "rank": 1, "marker": marker})
    assert os.path.exists(marker) and result.error is None  # rank 1 died at epoch 2; the group restarted
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 1 was not trained twice
    timing = {"train_images_per_s", "epoch_seconds"}
    assert timing < set(result.metrics) and result.metrics["train_images_per_s"] > 0

    def learned(m):
        return {k: v for k, v in m.items() if k not in timing}

    assert learned(result.metrics) == learned(uninterrupted.metrics)  # same seeds, same data order: the same run


def test_checkpoints_at_each_new_best_every_n_epochs_and_the_last():
    val = [0.2, 0.5, 0.4, 0.5, 0.6, 0.3, 0.3, 0.1]  # val accuracy of epochs 1..8
    best, kept = -1.0, []
    for epoch, accuracy in enumerate(val, 1):
        if keeps_checkpoint(epoch, len(val), 3, accuracy > best):
            kept.append(epoch)
        best = max(best, accuracy)
    assert kept == [1, 2, 3, 5, 6, 8]  # bests 1, 2, 5; every third 3, 6; the last 8 (a tie at 4 is no new best)
    assert [e for e in range(1, 9) if keeps_checkpoint(e, 8, 1, False)] == list(range(1, 9))


def test_learning_rate_follows_the_epoch_alone():
    cosine = RunSpec(lr=1e-3, epochs=10)
    assert learning_rate(cosine, 0) == 1e-3 and learning_rate(cosine, 5) == pytest.approx(5e-4)
    assert learning_rate(cosine, 9) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 0.9)))
    assert learning_rate(RunSpec(lr=1e-3, schedule="constant"), 9) == 1e-3
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate(RunSpec(schedule="step"), 0)


def test_augmentation_is_per_photo_and_erasing_covers_2_to_33_percent():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32).repeat(64, 1, 1, 1)
    out = augment(x, g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len({round(float(o.sum()), 3) for o in out}) > 32  # different crops/flips for identical photos
    zeros = torch.zeros(64, 3, 32, 32)
    assert torch.equal(random_erasing(zeros, g, 0.0), zeros)
    erased = (random_erasing(zeros, g, 1.0) != 0).float().mean((1, 2, 3))
    assert erased.min() >= 0.015 and erased.max() <= 0.36
