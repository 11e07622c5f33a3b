"""Ray Train runs of the classifiers on CPU (two workers, the best checkpoint, a killed worker resumed exactly); the
evaluation pass on a model whose outputs are known; checkpoint schedule, learning rate and augmentation."""

import json
import os
import time

import numpy as np
import pytest
import torch

from kemo.classifier import train
from kemo.classifier.checkpoint import IMAGENET, input_batch, load_checkpoint
from kemo.classifier.data import order_keys, plan, split_dataset, usable
from kemo.classifier.evaluation import evaluate
from kemo.classifier.networks import weighted_layers
from kemo.classifier.train import (
    TRAIN_STATE,
    CapacityLost,
    RunSpec,
    array_batches,
    augment,
    capacity_attempts,
    class_weights,
    cross_entropy,
    fit,
    keeps_checkpoint,
    learning_rate,
    random_erasing,
    train_one_epoch,
)
from kemo.classifier.transform import InputTransform
from kemo.preprocess import read_crops
from tests import seams

# Two epochs: enough to see a new order each epoch, a checkpoint to resume from and a falling loss; K-EmotionNet in
# the layout `--blocks 1,1,1,1` gives a run (tests/test_calibrated_labels.py checks that it reaches the run's spec)
SPEC = RunSpec(model="kemotionnet", arguments={"blocks": [1, 1, 1, 1]}, epochs=2, batch_size=16, image_size=32)
TIMING = {"train_images_per_s", "epoch_seconds"}


def learned(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.fixture(scope="module")
def splits(ray_local, annotation_crops):
    """The real input path, uncached: crop shards read, sorted, repartitioned and decoded again every epoch and after
    a restart, in blocks of 16 so that order could go astray; (planned data, train, val)."""
    data = plan(annotation_crops, 32)
    return data, *(split_dataset(data, s, block_rows=16) for s in ("train", "val"))


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trace"))


@pytest.fixture(scope="module")
def uninterrupted(splits, tmp_path_factory, traces):
    _, train_split, val = splits
    with pytest.MonkeyPatch.context() as patch:  # each worker writes the photos it trained on, per epoch
        patch.setattr(train, "train_loop", seams.traced(traces))
        # half a CPU each: the other CPU decodes (kemo.classifier.experiment.cpus_per_worker leaves one to Ray Data)
        return fit(train_split, val, SPEC, str(tmp_path_factory.mktemp("runs")), "ken", workers=2,
                   cpus_per_worker=0.5)


def _train_keys(annotation_crops: str) -> set[int]:
    table = read_crops(annotation_crops, ["image_id", "split", "label", "agree_n", "status"])
    ok, _ = usable(table, 2)
    ids = [i for i, good, s in zip(table.column("image_id").to_pylist(), ok, table.column("split").to_pylist())
           if good and s == "train"]
    return set(order_keys(ids).tolist())


@pytest.mark.slow
def test_two_workers_train_and_the_best_checkpoint_scores_what_it_reported(uninterrupted, splits):
    _, _, val = splits
    assert uninterrupted.error is None and uninterrupted.metrics["epoch"] == 2
    (best, metrics), = uninterrupted.best_checkpoints
    assert metrics["val_accuracy"] == uninterrupted.metrics["best_val_accuracy"]
    with best.as_directory() as d:
        model, meta = load_checkpoint(d)
        state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
    assert meta["training"]["workers"] == 2 and meta["metrics"] == metrics
    assert meta["arguments"] == {"blocks": [1, 1, 1, 1]} and weighted_layers(model) == 10  # the spec's layout
    rows = val.take_all()  # the validation photos as the workers were given them
    x_val, y_val = np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])
    with torch.no_grad():
        accuracy = float((model(input_batch(x_val, meta)).argmax(1).numpy() == y_val).mean())
    assert accuracy == pytest.approx(metrics["val_accuracy"])
    assert [h["epoch"] for h in state["history"]][-1] == metrics["epoch"]
    with uninterrupted.checkpoint.as_directory() as d:  # the latest: both epochs
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # the two workers' steps lowered the loss


@pytest.mark.slow
def test_each_worker_trains_on_a_disjoint_equal_share_each_epoch_reshuffled(uninterrupted, annotation_crops, traces):
    train_keys = _train_keys(annotation_crops)
    seen = {(e, r): json.load(open(os.path.join(traces, f"epoch{e}-rank{r}.json")))["keys"]
            for e in (1, 2) for r in (0, 1)}
    for epoch in (1, 2):
        a, b = seen[epoch, 0], seen[epoch, 1]
        assert len(a) == len(b) == len(train_keys) // 2 and len(set(a)) == len(a)  # equal shares, each photo once
        assert not set(a) & set(b) and set(a) | set(b) <= train_keys  # disjoint, and the train split's
        assert len(train_keys) - 2 * len(a) <= 1  # every photo, less at most one for equal steps
    assert seen[1, 0] != seen[2, 0] and sorted(seen[1, 0]) == sorted(seen[2, 0])  # the same share, in a new order


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint_and_ends_where_an_uninterrupted_run_does(
        uninterrupted, splits, tmp_path, monkeypatch):
    _, train_split, val = splits
    marker = str(tmp_path / "killed")
    monkeypatch.setattr(train, "train_loop", seams.failing_once(epoch=1, rank=1, marker=marker))  # the last epoch
    # failures beyond the injected one are tolerated: a loaded machine may fail a worker's health check as well, and
    # that restart resumes the same way; the marker proves the injected death happened (once: it checks the marker)
    result = fit(train_split, val, SPEC, str(tmp_path / "runs"), "ken", workers=2, max_failures=3,
                 cpus_per_worker=0.5)
    assert os.path.exists(marker) and result.error is None  # rank 1 died at epoch 2; the group restarted
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 was not trained twice
    assert TIMING < set(result.metrics) and result.metrics["train_images_per_s"] > 0
    # same seeds, same data order: the same run
    assert learned(result.metrics) == learned(uninterrupted.metrics)


@pytest.mark.slow
def test_workers_no_node_can_hold_end_the_run_once_the_capacity_timeout_is_spent(splits, tmp_path):
    """Ray Train retries a worker group that cannot start without end; with a capacity timeout the run stops with
    a message that says what to do (on a cluster the rerun resumes: tests/test_job_submit.py)."""
    _, train_split, val = splits
    t0 = time.monotonic()
    with pytest.raises(CapacityLost, match=r"no node could hold 1 training worker\(s\) \(64 CPU each\) for 5 s"):
        fit(train_split, val, SPEC, str(tmp_path / "runs"), "big", workers=1, cpus_per_worker=64, capacity_timeout=5)
    waited = time.monotonic() - t0
    print(f"capacity timeout 5 s: the run ended after {waited:.1f} s")
    assert 5 <= waited < 30


class Lookup(torch.nn.Module):
    """A 3-class "model" whose output is known: a photo whose first pixel is k gets the probabilities ``P[k]``."""

    P = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]

    def __init__(self):
        super().__init__()
        self.log_p = torch.nn.Parameter(torch.log(torch.tensor(self.P)))

    def forward(self, x):
        return self.log_p[(x[:, 0, 0, 0] * 255).round().long()]  # unnormalised by mean 0, std 1: the pixel itself


def test_evaluate_counts_every_photo_once_and_sums_the_cross_entropy():
    codes, labels = [0, 1, 2, 0, 1], np.array([0, 1, 1, 2, 1])  # predicted class = code: 3 of 5 right
    images = np.zeros((5, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = codes
    identity = InputTransform(4, mean=(0.0,) * 3, std=(1.0,) * 3)
    model = Lookup().train()
    confusion, loss = evaluate(model, array_batches(images, labels, np.arange(5), 2), identity, num_classes=3)
    assert not model.training and not loss.requires_grad
    assert confusion.tolist() == [[1, 0, 0], [0, 2, 1], [1, 0, 0]]  # cm[true, predicted]
    assert float(confusion.trace()) / float(confusion.sum()) == 0.6
    # -log P: right with 1/2 three times (photos 0, 1, 4), wrong with 1/4 twice (photos 2, 3)
    assert float(loss) == pytest.approx(3 * np.log(2) + 2 * np.log(4))
    # two workers' disjoint shares (photos 0, 1 and 4; photos 2 and 3) add up to the whole set
    shares = [evaluate(model, array_batches(images, labels, np.array(idx), 2), identity, 3)
              for idx in ([0, 1, 4], [2, 3])]
    assert shares[0][0].tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 0]]
    assert shares[1][0].tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert float(shares[0][1]) == pytest.approx(3 * np.log(2)) and float(shares[1][1]) == pytest.approx(4 * np.log(2))
    assert torch.equal(shares[0][0] + shares[1][0], confusion)
    empty, nothing = evaluate(model, array_batches(images, labels, np.arange(0), 2), InputTransform(4), num_classes=3)
    assert empty.tolist() == [[0] * 3] * 3 and float(nothing) == 0.0


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


def test_balance_weights_are_inverse_frequency_and_a_resampled_batch_holds_the_classes_evenly():
    assert class_weights([60, 30, 10, 0]) == pytest.approx([100 / 180, 100 / 90, 100 / 30, 0.0])
    counts = [90, 10]
    weights = torch.tensor(class_weights(counts))
    y = torch.tensor([0] * 90 + [1] * 10)
    picks = torch.multinomial(weights[y], 10_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs(float((y[picks] == 1).float().mean()) - 0.5) < 0.02  # 10% of the batch, drawn as half



class Recorder(torch.nn.Module):
    """A linear classifier that records, per photo it is given, whether the photo was the bright class-1 one."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 7)
        self.bright: list[bool] = []

    def forward(self, x):
        self.bright += (x.mean((1, 2, 3)) > 0).tolist()  # normalised: black photos < 0, white ones > 0
        return self.linear(x.flatten(1))


def test_balance_options_change_what_the_loss_weighs_and_what_the_model_sees():
    x = np.zeros((8, 16, 16, 3), np.uint8)
    x[7] = 255  # photo 7 is the only one of class 1; flips, crops and grid_sample keep a flat photo flat
    labels = np.array([0] * 7 + [1])

    def epoch(balance, weights, lr=1e-3):
        torch.manual_seed(0)
        model = Recorder()
        spec = RunSpec(batch_size=8, image_size=16, erasing=0.0, balance=balance)
        sums = train_one_epoch(model, torch.optim.Adam(model.parameters(), lr=lr),
                               array_batches(x, labels, np.arange(8), 8), spec, torch.Generator().manual_seed(1),
                               torch.tensor(weights))
        return model, sums

    only_class_1 = [0.0, 1.0, 0, 0, 0, 0, 0]
    model, sums = epoch("none", only_class_1)
    assert model.bright == [False] * 7 + [True] and float(sums[1]) == 8
    model, sums = epoch("sampler", only_class_1)  # every draw is the class-1 photo
    assert model.bright == [True] * 8 and float(sums[1]) == 8
    model, _ = epoch("sampler", [1.0, 0, 0, 0, 0, 0, 0])
    assert model.bright == [False] * 8

    # weights: the epoch's loss is the class-weighted cross-entropy (lr 0: the model it was computed on stays)
    w = [1.0, 3.0, 0, 0, 0, 0, 0]
    model, sums = epoch("weights", w, lr=0.0)
    with torch.no_grad():
        inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET["mean"]).view(
            1, 3, 1, 1)) / torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
        logits = model.linear(inputs.flatten(1))
    weighted = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), weight=torch.tensor(w)))
    plain = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))
    assert float(sums[0]) / 8 == pytest.approx(weighted, rel=1e-5) and abs(weighted - plain) > 1e-3


def test_vote_targets_train_on_the_soft_cross_entropy_and_one_hot_votes_equal_the_majority():
    # flat photos of eight grey levels: flips and crops keep them as they are, so the loss can be recomputed
    x = np.broadcast_to((np.arange(8) * 32).astype(np.uint8)[:, None, None, None], (8, 16, 16, 3)).copy()
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 0])

    def epoch(targets, lr=1e-3):
        torch.manual_seed(0)
        model = Recorder()
        spec = RunSpec(batch_size=8, image_size=16, erasing=0.0)
        batches = [(torch.from_numpy(x), torch.as_tensor(targets))]
        sums = train_one_epoch(model, torch.optim.Adam(model.parameters(), lr=lr), batches, spec,
                               torch.Generator().manual_seed(1))
        return model, float(sums[0]) / 8

    hard_model, hard = epoch(labels)
    one_hot = np.eye(7, dtype=np.float32)[labels]
    soft_model, soft = epoch(one_hot)
    assert soft == pytest.approx(hard, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(hard_model.parameters(), soft_model.parameters()))
    # split votes: the loss is the cross-entropy against the vote shares, −Σ q log p (lr 0: the model stays)
    votes = np.full((8, 7), 0.0, np.float32)
    votes[np.arange(8), labels], votes[np.arange(8), (labels + 1) % 7] = 2 / 3, 1 / 3
    model, loss = epoch(votes, lr=0.0)
    with torch.no_grad():
        inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET["mean"]).view(
            1, 3, 1, 1)) / torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
        log_p = torch.log_softmax(model.linear(inputs.flatten(1)), 1)
    assert loss == pytest.approx(float(-(torch.from_numpy(votes) * log_p).sum(1).mean()), rel=1e-5)
    assert abs(loss - hard) > 1e-3
    # class weights: one rule for both targets (torch's weighted mean for indices; the same for one-hot votes)
    w = torch.tensor([1.0, 3.0, 0.5, 1, 1, 2, 1])
    logits = torch.randn(8, 7, generator=torch.Generator().manual_seed(0))
    assert float(cross_entropy(logits, torch.from_numpy(one_hot), w)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), weight=w)), rel=1e-6)


def test_capacity_timeout_becomes_start_timeouts_and_retries_that_add_up_to_it():
    assert capacity_attempts(0) == (None, -1)  # no limit: Ray Train's own default, every start retried
    assert capacity_attempts(300) == (60.0, 4)  # five starts of 60 s
    assert capacity_attempts(20) == (20.0, 0)  # one start of 20 s, no retry
    assert capacity_attempts(90) == (60.0, 1)
    assert capacity_attempts(300, "100") == (None, 2)  # the user's own start timeout stays; three starts of it
    with pytest.raises(ValueError, match="--capacity-timeout"):
        capacity_attempts(-1)
