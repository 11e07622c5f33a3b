"""jobs/train.py's library: crop shards × models × seeds on Ray Train → evaluated, reported, committed; reruns skip."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from kemo import outputs, preprocess
from kemo.classifier.checkpoint import input_batch, load_checkpoint, save_checkpoint
from kemo.classifier.evaluation import evaluate_checkpoint
from kemo.classifier.experiment import KIND, TrainConfig, plan_runs, run
from kemo.classifier.metrics import classification_report, confusion_matrix
from kemo.classifier.networks import weighted_layers
from kemo.classifier.registry import create_model
from tests.tree import snapshot


@pytest.mark.slow
def test_runs_every_seed_reports_table5_and_skips_finished_runs(annotation_crops, tmp_path):
    shards = annotation_crops
    out = str(tmp_path / "classify")
    # K-EmotionNet in a layout given on the command line (--blocks 1,1,1,1): it reaches every run and checkpoint
    cfg = TrainConfig(shards=(shards,), output=out, models=("kemotionnet",), blocks=(1, 1, 1, 1), seeds=2, epochs=1,
                      image_size=32, batch_size=32)
    report = run(cfg)
    outputs.Output(out, KIND).committed()
    (row,) = report.rows
    assert row.preprocessing == "annotations" and row.model == "kemotionnet" and row.accuracy.n == 2
    for entry in report.runs:
        assert entry.spec.arguments == {"blocks": [1, 1, 1, 1]}
        model, meta = load_checkpoint(entry.checkpoint)
        assert meta["arguments"] == {"blocks": [1, 1, 1, 1]} and weighted_layers(model) == 10
    accuracies = [r.test.accuracy for r in report.runs]
    assert row.accuracy_on_faces.mean == pytest.approx(sum(accuracies) / 2)
    test_photos = report.data["annotations"].splits["test"].photos
    assert all(sum(map(sum, r.test.confusion_matrix)) == test_photos for r in report.runs)
    right = [sum(r.test.confusion_matrix[k][k] for k in range(7)) for r in report.runs]
    assert row.accuracy.mean == pytest.approx(sum(right) / 2 / report.data["annotations"].test_photos)
    table = open(os.path.join(out, "table5.md")).read().splitlines()
    assert table[0].startswith("Every row is scored on the same ") and table[2].startswith(
        "| Preprocessing | Model | Test accuracy (%) | On faces (%) | Faces found (%)") and table[4].startswith(
        "| annotations | kemotionnet | ")
    for png in ("confusion.png", "curves.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    name = report.runs[0].name
    assert name.startswith("annotations-kemotionnet-seed0-")
    finished = json.load(open(os.path.join(out, "results", f"{name}.json")))
    # preprocess again (the crops are committed: a no-op) and train again: nothing is trained, nothing written
    before = snapshot(out) | snapshot(shards)
    preprocess.run(preprocess.PreprocessConfig(**outputs.Output(shards, preprocess.KIND).read_json("config.json")
                                               ["config"]))
    again = run(cfg)
    assert again.runs == report.runs and finished["checkpoint"] == report.runs[0].checkpoint
    assert snapshot(out) | snapshot(shards) == before  # every file byte-identical, every mtime unchanged
    # other settings name other runs (a run resumes only under its own name: tests/test_classifier_train.py), and a
    # model's runs keep their names when another model joins the grid
    other = plan_runs(dataclasses.replace(cfg, lr=5e-4)).runs["annotations"]
    assert {r.name for r in other}.isdisjoint(r.name for r in report.runs) and other[0].spec.lr == 5e-4
    grown = plan_runs(dataclasses.replace(cfg, models=("kemotionnet", "resnet18"))).runs["annotations"]
    assert {r.name for r in report.runs} < {r.name for r in grown}
    with pytest.raises(ValueError, match="unknown models"):
        run(TrainConfig(shards=(shards,), output=out, models=("resnet50",)))
    with pytest.raises(ValueError, match="four stages"):
        run(dataclasses.replace(cfg, blocks=(3, 4, 16)))


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
