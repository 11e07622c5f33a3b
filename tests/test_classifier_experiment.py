"""jobs/train.py's library: worker sizing and a checkpoint evaluated as it predicts (its end-to-end run, Table 5 and
a rerun that writes nothing: tests/test_calibrated_labels.py, which trains once for both)."""

import dataclasses

import numpy as np
import pytest
import torch

from kemo.classifier.checkpoint import input_batch, load_checkpoint, save_checkpoint
from kemo.classifier.evaluation import evaluate_checkpoint
from kemo.classifier.experiment import TrainConfig
from kemo.classifier.metrics import classification_report, confusion_matrix
from kemo.classifier.registry import create_model


def test_cpu_workers_reserve_their_share_of_the_node_and_unplaceable_workers_are_refused():
    from kemo.classifier.experiment import cpus_per_worker
    from kemo.resources import Node

    def node(cpus, gpus=0, launchable=False):
        return Node("n", cpus, gpus, launchable)

    cfg = TrainConfig(shards=("s",), output="o")
    assert cpus_per_worker(cfg, [node(2)]) == 2  # one worker: every core, not Ray's default of one
    assert cpus_per_worker(dataclasses.replace(cfg, workers=2), [node(2)]) == 1
    # a node type the autoscaler could start is no CPU of the alive cluster's share
    assert cpus_per_worker(dataclasses.replace(cfg, workers=2), [node(16), node(16), node(64, launchable=True)]) == 16
    assert cpus_per_worker(dataclasses.replace(cfg, workers=3), [node(8)]) == 2
    assert cpus_per_worker(dataclasses.replace(cfg, workers=8), [node(4)]) == 1  # never below one
    assert cpus_per_worker(dataclasses.replace(cfg, use_gpu=True), [node(8, 1)]) == 1
    assert cpus_per_worker(dataclasses.replace(cfg, cpus_per_worker=3), [node(8)]) == 3
    with pytest.raises(ValueError, match="each training worker asks for 1 CPU and 1 GPU, and no node can hold"):
        cpus_per_worker(dataclasses.replace(cfg, use_gpu=True), [node(8)])
    with pytest.raises(ValueError, match="asks for 12 CPU"):
        cpus_per_worker(dataclasses.replace(cfg, cpus_per_worker=12), [node(8), node(8)])
    assert cpus_per_worker(dataclasses.replace(cfg, use_gpu=True), [node(8), node(8, 1, launchable=True)]) == 1
    # photos decoded every epoch: a CPU stays free for Ray Data's tasks, or the run is refused rather than left waiting
    assert cpus_per_worker(cfg, [node(2)], streamed=True) == 1
    assert cpus_per_worker(dataclasses.replace(cfg, workers=2), [node(4)], streamed=True) == 1
    with pytest.raises(ValueError, match="need a CPU beside the 1 training worker.s. of 2 CPU, and the cluster has 2"):
        cpus_per_worker(dataclasses.replace(cfg, cpus_per_worker=2), [node(2)], streamed=True)
    assert cpus_per_worker(dataclasses.replace(cfg, cpus_per_worker=2), [node(2), node(8, launchable=True)],
                           streamed=True) == 2  # the autoscaler can add CPUs for the data


@pytest.mark.slow
@pytest.mark.parametrize("side", [32, 40])  # at the checkpoint's input size, and resized to it
def test_a_checkpoint_is_evaluated_as_its_own_input_batch_predicts(side, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path), create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet",
                    {"blocks": [1, 1, 1, 1]}, image_size=32)
    images = np.random.default_rng(side).integers(0, 256, (11, side, side, 3), dtype=np.uint8)
    labels = np.arange(11) % 7
    model, meta = load_checkpoint(str(tmp_path))
    with torch.no_grad():
        predicted = model(input_batch(images, meta)).argmax(1).numpy()
    expected = classification_report(confusion_matrix(labels, predicted, 7), meta["classes"])
    batches = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 11, 4)]
    assert evaluate_checkpoint(str(tmp_path), batches) == expected
