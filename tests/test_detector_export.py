"""Detector dataset export: person-disjoint splits, labels that round-trip to the consensus boxes, resumable."""

import os
from collections import Counter

import cv2
import pyarrow as pa
import pytest

from kemo.data import aihub, synth
from kemo.detector.export import ExportConfig, file_id, run, select, yolo_line


def rows_for(persons: int, per_person: int):
    return [{"image_id": f"p{p}/{i}.jpg", "person_id": f"p{p}", "box": [1.0, 2.0, 30.0, 40.0]}
            for p in range(persons) for i in range(per_person)]


def test_select_is_person_disjoint_with_exact_counts():
    rows = rows_for(50, 7)
    rows.append({"image_id": "nobox.jpg", "person_id": "q", "box": None})
    chosen = select(rows, (200, 30, 30), seed=1)
    assert [len(chosen[s]) for s in ("train", "val", "test")] == [200, 30, 30]
    persons = {s: {r["person_id"] for r in chosen[s]} for s in chosen}
    assert not persons["train"] & persons["val"] and not persons["train"] & persons["test"]
    assert not persons["val"] & persons["test"]
    assert all(r["box"] is not None for s in chosen for r in chosen[s])
    assert select(rows, (200, 30, 30), seed=1) == chosen and select(rows, (200, 30, 30), seed=2) != chosen


def test_select_with_too_few_photos_fills_in_order():
    chosen = select(rows_for(3, 5), (10, 10, 10), seed=0)
    assert [len(chosen[s]) for s in ("train", "val", "test")] == [10, 5, 0]


def test_yolo_line():
    assert yolo_line([100, 50, 300, 250], 400, 500) == "0 0.500000 0.300000 0.500000 0.400000"
    assert yolo_line([-10, 0, 100, 600], 200, 500) == "0 0.250000 0.500000 0.500000 1.000000"  # clipped first
    assert yolo_line([300, 0, 400, 10], 200, 500) is None


def test_export_round_trips_to_the_upright_consensus_boxes(corpus_index, corpus, tmp_path):
    root, _ = corpus
    out = str(tmp_path / "faces")
    summary = run(ExportConfig(input=corpus_index, output=out, counts=(60, 20, 20), max_side=160, jobs=2))
    assert summary.counts == {"train": 60, "val": 20, "test": 20}
    assert summary.statuses == {"exported": 100}
    truth = {t["image_id"]: t for t in synth.read_truth(root).to_pylist()}
    manifest = {r["image_id"]: r for r in aihub.load_manifest(corpus_index).to_pylist()}
    seen = Counter()
    for split in ("train", "val", "test"):
        names = sorted(os.listdir(os.path.join(out, "labels", split)))
        assert len(names) == summary.counts[split]
        for r in manifest.values():
            name = file_id(r["image_id"])
            if f"{name}.txt" not in names:
                continue
            seen[r["person_id"]] += 1
            t = truth[r["image_id"]]
            img = cv2.imread(os.path.join(out, "images", split, f"{name}.jpg"))
            h, w = img.shape[:2]
            assert max(h, w) == 160 and abs(w / h - t["width"] / t["height"]) < 0.02  # upright, downsized
            _, cx, cy, bw, bh = map(float, open(os.path.join(out, "labels", split, f"{name}.txt")).read().split())
            W, H = t["width"], t["height"]
            got = [(cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H]
            x1, y1, x2, y2 = r["box"]
            assert got == pytest.approx([x1, y1, min(x2, W), min(y2, H)], abs=0.01 * W)
    persons = {s: set() for s in ("train", "val", "test")}
    for r in manifest.values():
        for split in persons:
            if os.path.exists(os.path.join(out, "labels", split, f"{file_id(r['image_id'])}.txt")):
                persons[split].add(r["person_id"])
    assert not persons["train"] & persons["val"] and not persons["train"] & persons["test"]
    assert "test: images/test" in open(os.path.join(out, "data.yaml")).read()


def test_export_resumes_and_skips_what_is_done(corpus_index, tmp_path):
    out = str(tmp_path / "faces")
    cfg = ExportConfig(input=corpus_index, output=out, counts=(20, 5, 5), max_side=128, jobs=2)
    run(cfg)
    victim = sorted(os.listdir(os.path.join(out, "labels", "train")))[0]
    os.remove(os.path.join(out, "labels", "train", victim))  # as if killed before this label was written
    again = run(cfg)
    assert again.statuses == {"exported": 1, "skipped": 29} and again.counts == {"train": 20, "val": 5, "test": 5}


def test_export_with_other_settings_leaves_only_the_new_selection(corpus_index, tmp_path):
    out = str(tmp_path / "faces")
    run(ExportConfig(input=corpus_index, output=out, counts=(20, 5, 5), max_side=128, seed=0, jobs=2))
    again = run(ExportConfig(input=corpus_index, output=out, counts=(12, 4, 4), max_side=128, seed=1, jobs=2))
    assert again.statuses["removed_stale"] > 0
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        images = {f[:-4] for f in os.listdir(os.path.join(out, "images", split))}
        labels = {f[:-4] for f in os.listdir(os.path.join(out, "labels", split))}
        assert len(images) == n and images == labels  # ultralytics trains on whatever a folder holds


def test_export_redoes_pairs_whose_size_or_box_changed(corpus_index, tmp_path):
    out = str(tmp_path / "faces")
    manifest = aihub.load_manifest(corpus_index)
    run(ExportConfig(input=corpus_index, output=out, counts=(8, 2, 2), max_side=96, jobs=2), manifest=manifest)
    again = run(ExportConfig(input=corpus_index, output=out, counts=(8, 2, 2), max_side=128, jobs=2), manifest=manifest)
    assert again.statuses == {"exported": 12, "removed_stale": 12}  # a crashed run at another size: all redone
    for name in os.listdir(os.path.join(out, "images", "train")):
        assert max(cv2.imread(os.path.join(out, "images", "train", name)).shape[:2]) == 128
    rows = manifest.to_pylist()
    moved = sorted(os.listdir(os.path.join(out, "labels", "train")))[0][:-4]
    for r in rows:
        if file_id(r["image_id"]) == moved:
            r["box"] = [r["box"][0] + 10, r["box"][1], r["box"][2] + 10, r["box"][3]]  # re-indexed, corrected box
    before = open(os.path.join(out, "labels", "train", moved + ".txt")).read()
    third = run(ExportConfig(input=corpus_index, output=out, counts=(8, 2, 2), max_side=128, jobs=2),
                manifest=pa.Table.from_pylist(rows, schema=manifest.schema))
    assert third.statuses == {"exported": 1, "skipped": 11, "removed_stale": 1}
    assert open(os.path.join(out, "labels", "train", moved + ".txt")).read() != before
