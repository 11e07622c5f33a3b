"""Labels a user can trust, end to end: train on the majority and on the votes → each checkpoint calibrated on
validation (temperature and abstention threshold in its meta.json) → the report's calibration, coverage, annotator
agreement and majority-against-votes → jobs/label.py on the held-out test photos with --abstain: calibrated
probabilities, abstained rows exactly below the threshold, a gallery; reruns that write nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from kemo import outputs, preprocess
from kemo.classifier import calibration
from kemo.classifier.checkpoint import input_batch, load_checkpoint, read_meta
from kemo.classifier.data import decode_crop, usable
from kemo.classifier.experiment import KIND, TrainConfig, plan_runs, run
from kemo.classifier.metrics import annotator_agreement
from kemo.crop import encode_jpeg, resize_whole
from kemo.label import LabelConfig
from kemo.label import run as label
from kemo.label_store import read_labels
from kemo.preprocess import read_crops
from tests.galleries import decoded_thumb, parse_gallery
from tests.tree import snapshot

TARGET_ACCURACY = 0.5  # the models of a 2-minute test reach ~40-70% on these crops: 0.9 would keep a photo or two


@pytest.fixture(scope="module")
def trained(annotation_crops, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("classify"))
    cfg = TrainConfig(shards=(annotation_crops,), output=out, models=("resnet18",), seeds=1, epochs=5, image_size=32,
                      batch_size=16, target=("majority", "votes"), target_accuracy=TARGET_ACCURACY)
    return cfg, run(cfg)


@pytest.mark.slow
def test_the_report_holds_calibration_coverage_agreement_and_majority_against_votes(annotation_crops, trained):
    cfg, report = trained
    assert [(r.model, r.target) for r in report.rows] == [("resnet18", "majority"), ("resnet18", "votes")]
    # the annotators' agreement on the very test photos the models were scored on
    crops = read_crops(annotation_crops, ["split", "label", "agree_n", "status", "votes", "image_id"])
    ok, _ = usable(crops, cfg.min_agree)
    test = [v for v, good, s in zip(crops.column("votes").to_pylist(), ok, crops.column("split").to_pylist())
            if good and s == "test"]
    agreement = annotator_agreement(test)
    assert report.data["annotations"].annotators.agreement == agreement.agreement
    assert 0.5 < agreement.agreement < 1 and agreement.photos == len(test)
    (both,) = report.targets
    for target, row in zip(("majority", "votes"), report.rows):
        assert getattr(both, target).accuracy == row.accuracy.mean
        assert getattr(both, target).ece == row.ece.after.mean
        assert row.annotators == agreement.agreement
        assert [c.coverage for c in row.coverage] == [0.5, 0.8, 0.9, 1.0]
        assert row.coverage[-1].accuracy == pytest.approx(row.accuracy_on_faces.mean)
        assert row.coverage[-1].photos == len(test)
    table = open(os.path.join(cfg.output, "table5.md")).read()
    assert "| annotations | resnet18 | " in table and "| votes |" in table and "Majority against votes" in table
    assert f"{100 * agreement.agreement:.2f}" in table
    for png in ("reliability.png", "coverage.png"):
        assert open(os.path.join(cfg.output, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for r in report.runs:
        meta = read_meta(r.checkpoint)
        # the temperature minimises the validation NLL: recompute the validation logits and check both sides
        assert meta["temperature"] == r.calibration.temperature > 0
        assert meta["abstention"]["target_accuracy"] == TARGET_ACCURACY
        assert meta["abstention"]["threshold"] == r.abstention.threshold
        if meta["abstention"]["threshold"] is not None:
            assert meta["abstention"]["accuracy"] >= TARGET_ACCURACY
        before, after = r.calibration.before, r.calibration.after
        assert before.accuracy == after.accuracy == r.test.accuracy  # T changes no arg-max
        assert 0 <= after.ece <= 1 and 0 <= before.ece <= 1


@pytest.mark.slow
def test_temperature_minimises_the_validation_nll(annotation_crops, trained):
    from kemo.classifier.data import decode_crop as decode

    cfg, report = trained
    crops = read_crops(annotation_crops, ["split", "label", "agree_n", "status", "crop"])
    ok, _ = usable(crops, cfg.min_agree)
    rows = [r for r, good in zip(crops.to_pylist(), ok) if good and r["split"] == "val"]
    run_ = report.runs[0]
    model, meta = load_checkpoint(run_.checkpoint)
    with torch.no_grad():
        logits = model(input_batch([decode(r["crop"], 32) for r in rows], meta)).numpy()
    labels = np.array([r["label"] for r in rows])
    t = meta["temperature"]
    at = calibration.nll(calibration.softmax(logits, t), labels)
    assert at <= calibration.nll(calibration.softmax(logits, 1.0), labels) + 1e-9
    lo, hi = calibration.T_RANGE
    assert at <= min(calibration.nll(calibration.softmax(logits, min(hi, max(lo, t * f))), labels)
                     for f in (0.8, 1.25)) + 1e-9
    assert lo < t < hi  # a model that learned something: not a temperature at the edge of the search
    assert run_.calibration.fitted_on["photos"] == len(rows)


@pytest.fixture(scope="module")
def held_out(annotation_crops, trained, tmp_path_factory):
    """The test split's crops as photo files of a plain folder (new photos to label), and their labels."""
    cfg, _ = trained
    crops = read_crops(annotation_crops, ["image_id", "split", "label", "agree_n", "status", "crop"])
    ok, _ = usable(crops, cfg.min_agree)
    folder = tmp_path_factory.mktemp("heldout")
    truth = {}
    for r, good in zip(crops.to_pylist(), ok):
        if good and r["split"] == "test":
            path = folder / f"{len(truth):03d}.jpg"
            path.write_bytes(r["crop"])
            truth[str(path)] = r["label"]
    return str(folder), truth


@pytest.mark.slow
def test_labels_are_calibrated_abstain_exactly_below_the_threshold_and_keep_their_accuracy(trained, held_out,
                                                                                          tmp_path):
    cfg, report = trained
    folder, truth = held_out
    best = max((r for r in report.runs if r.abstention.threshold is not None), key=lambda r: r.best_val.val_accuracy)
    meta = read_meta(best.checkpoint)
    out = str(tmp_path / "labels")
    lcfg = LabelConfig(input=folder, output=out, checkpoint=best.checkpoint, detector="none", crop_size=64,
                       abstain=True, gallery=5)
    summary = label(lcfg)
    rows = read_labels(out).to_pylist()
    assert len(rows) == len(truth) and all(r["status"] == "ok" for r in rows)
    # calibrated: softmax(logits / T) of the labelling path's pixels, within 1e-5
    model, _ = load_checkpoint(best.checkpoint)
    pixels = [decode_crop(encode_jpeg(resize_whole(cv2.cvtColor(cv2.imread(r["uri"]), cv2.COLOR_BGR2RGB), 64), 95), 32)
              for r in rows]
    with torch.no_grad():
        logits = model(input_batch(pixels, meta)).numpy()
    expected = calibration.softmax(logits, meta["temperature"])
    assert np.abs(np.array([r["probs"] for r in rows]) - expected).max() < 1e-5
    assert meta["temperature"] != 1.0
    # abstained exactly where the stored confidence is below the checkpoint's threshold
    threshold = meta["abstention"]["threshold"]
    assert summary.min_confidence == threshold
    assert [r["abstained"] for r in rows] == [r["confidence"] < threshold for r in rows]
    assert summary.abstained == sum(r["abstained"] for r in rows)
    assert all(r["label"] == int(np.argmax(r["probs"])) for r in rows)  # the arg-max is still given
    kept = [r["label"] == truth[r["uri"]] for r in rows if not r["abstained"]]
    # the held-out test photos kept at the validation threshold: at least the validation figure, less three
    # binomial standard errors over the kept photos (p(1 − p) taken as at least 0.09: a validation figure of 1 on a
    # few photos is no promise of 1)
    val = meta["abstention"]["accuracy"]
    tolerance = 3 * np.sqrt(max(val * (1 - val), 0.09) / max(len(kept), 1))
    assert kept and np.mean(kept) >= val - tolerance
    # and a threshold that splits the photos: exactly those below it abstain, on both sides of it
    median = float(np.median([r["confidence"] for r in rows]))
    split = label(LabelConfig(input=folder, output=str(tmp_path / "median"), checkpoint=best.checkpoint,
                              detector="none", crop_size=64, min_confidence=median, gallery=0))
    halves = read_labels(str(tmp_path / "median")).to_pylist()
    assert [r["abstained"] for r in halves] == [r["confidence"] < median for r in halves]
    assert 0 < split.abstained == sum(r["abstained"] for r in halves) < len(halves)
    assert not os.path.exists(tmp_path / "median" / "gallery.html")

    # the gallery: every shown face has one thumbnail; groups capped at 5, most confident first
    sections = parse_gallery(os.path.join(out, outputs.GALLERY))
    for name in meta["classes"]:
        group = [r for r in rows if r["label_name"] == name and not r["abstained"]]
        figures = sections[name]["figures"]
        assert len(figures) == min(5, len(group)) and all(len(f) == 1 for f in figures)
        for f in figures:
            decoded_thumb(f[0])
    assert len(sections["abstained"]["figures"]) == min(5, summary.abstained)

    # a rerun with nothing new rewrites none of it
    before = snapshot(out)
    again = label(lcfg)
    assert again.processed == 0 and snapshot(out) == before
    # another threshold is another setup: refused, the output untouched
    with pytest.raises(ValueError, match="min_confidence"):
        label(LabelConfig(input=folder, output=out, checkpoint=best.checkpoint, detector="none", crop_size=64,
                          min_confidence=0.99))
    assert snapshot(out) == before


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium here (.ci/run installs Debian's chromium)")
def test_both_galleries_render_in_a_real_browser(annotation_crops, trained, held_out, tmp_path):
    """The pages users look at, drawn by a real browser: the labels' and the crops' galleries, each a page of many
    thumbnails in many colours (not a page of broken images or escaped markup)."""
    cfg, report = trained
    folder, _ = held_out
    out = str(tmp_path / "labels")
    label(LabelConfig(input=folder, output=out, checkpoint=report.runs[0].checkpoint, detector="none",
                      crop_size=64, gallery=8))
    for page in (os.path.join(out, outputs.GALLERY), os.path.join(annotation_crops, outputs.GALLERY)):
        shot = str(tmp_path / "shot.png")
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1000,1400", "file://" + os.path.abspath(page)],
                       check=True, capture_output=True, timeout=120)
        image = cv2.imread(shot)
        assert image.shape[:2] == (1400, 1000), page
        # thumbnails drawn: many pixels far from the page's near-white background, in many colours
        dark = (image.astype(int).sum(2) < 600).mean()
        assert dark > 0.05 and len(np.unique(image.reshape(-1, 3) // 32, axis=0)) > 50, page


@pytest.mark.slow
def test_every_run_named_evaluated_reported_committed_and_a_rerun_writes_nothing(annotation_crops, trained):
    """jobs/train.py's library end to end: every run named, evaluated, reported and committed; run again (and the
    crops preprocessed again) it trains nothing and writes nothing."""
    cfg, report = trained
    out, shards = cfg.output, annotation_crops
    outputs.Output(out, KIND).committed()
    test_photos = report.data["annotations"].splits["test"].photos
    for entry, row in zip(report.runs, report.rows):
        assert read_meta(entry.checkpoint)["training"]["seed"] == entry.seed == 0
        assert row.preprocessing == "annotations" and row.accuracy.n == 1
        assert row.accuracy_on_faces.mean == pytest.approx(entry.test.accuracy)
        assert sum(map(sum, entry.test.confusion_matrix)) == test_photos
        right = sum(entry.test.confusion_matrix[k][k] for k in range(7))
        assert row.accuracy.mean == pytest.approx(right / report.data["annotations"].test_photos)
    table = open(os.path.join(out, "table5.md")).read().splitlines()
    assert table[0].startswith("Every row is scored on the same ") and table[2].startswith(
        "| Preprocessing | Model | Test accuracy (%) | On faces (%) | Faces found (%)") and table[4].startswith(
        "| annotations | resnet18 | ")
    for png in ("confusion.png", "curves.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    name = report.runs[0].name
    assert name.startswith("annotations-resnet18-seed0-") and report.runs[1].name.startswith(
        "annotations-resnet18-votes-seed0-")
    finished = json.load(open(os.path.join(out, "results", f"{name}.json")))
    # preprocess again (the crops are committed: a no-op) and train again: nothing is trained, nothing written
    before = snapshot(out) | snapshot(shards)
    preprocess.run(preprocess.PreprocessConfig(**outputs.Output(shards, preprocess.KIND).read_json("config.json")
                                               ["config"]))
    again = run(cfg)
    assert again.runs == report.runs and finished["checkpoint"] == report.runs[0].checkpoint
    assert snapshot(out) | snapshot(shards) == before  # every file byte-identical, every mtime unchanged
    # other settings name other runs (a run resumes only under its own name: tests/test_classifier_train.py), each
    # seed is a run of its own, and a model's runs keep their names when another model joins the grid
    other = plan_runs(dataclasses.replace(cfg, lr=5e-4)).runs["annotations"]
    assert {r.name for r in other}.isdisjoint(r.name for r in report.runs) and other[0].spec.lr == 5e-4
    seeds = plan_runs(dataclasses.replace(cfg, seeds=2)).runs["annotations"]
    assert sorted(r.seed for r in seeds) == [0, 0, 1, 1] and {r.name for r in report.runs} < {r.name for r in seeds}
    grown = plan_runs(dataclasses.replace(cfg, models=("resnet18", "kemotionnet"))).runs["annotations"]
    assert {r.name for r in report.runs} < {r.name for r in grown}
    # K-EmotionNet in a layout given on the command line (--blocks 1,1,1,1) is in each of its runs' specs (that a
    # spec's layout reaches the checkpoint: tests/test_classifier_train.py, which trains that layout)
    laid_out = plan_runs(dataclasses.replace(cfg, models=("kemotionnet",), blocks=(1, 1, 1, 1))).runs["annotations"]
    assert [r.spec.arguments for r in laid_out] == [{"blocks": [1, 1, 1, 1]}] * 2
    assert plan_runs(dataclasses.replace(cfg, models=("kemotionnet",))).runs["annotations"][0].spec.arguments == {}
    with pytest.raises(ValueError, match="unknown models"):
        run(TrainConfig(shards=(shards,), output=out, models=("resnet50",)))
    with pytest.raises(ValueError, match="four stages"):
        run(dataclasses.replace(cfg, blocks=(3, 4, 16)))


@pytest.mark.slow
def test_another_target_accuracy_calibrates_finished_runs_again_without_training(trained):
    """The module's last test: it leaves the checkpoints calibrated for another target accuracy."""
    cfg, report = trained
    name = report.runs[0].name
    path = os.path.join(cfg.output, "results", f"{name}.json")
    result = json.load(open(path))
    meta_path = os.path.join(result["checkpoint"], "meta.json")
    meta = json.load(open(meta_path))
    other = dataclasses.replace(cfg, target_accuracy=0.3)
    # a result that another kemo version wrote (here: without calibration) is refused in one line
    original = open(path, "rb").read()
    json.dump({k: v for k, v in result.items() if k != "calibration"}, open(path, "w"))
    with pytest.raises(ValueError, match=r"results/.*\.json: not a RunResult this kemo writes .*written by another "
                                         "kemo version: write a new output"):
        run(other)
    open(path, "wb").write(original)
    again = run(other)
    fresh = json.load(open(path))
    assert fresh["history"] == result["history"]  # not trained again
    assert fresh["calibration"]["temperature"] == result["calibration"]["temperature"]  # the temperature kept
    assert json.load(open(meta_path))["temperature"] == meta["temperature"]
    assert fresh["abstention"]["target_accuracy"] == 0.3 == json.load(open(meta_path))["abstention"]["target_accuracy"]
    assert again.rows[0].ece == report.rows[0].ece
    before = snapshot(cfg.output)
    run(other)  # the same report, committed: nothing written
    assert snapshot(cfg.output) == before
