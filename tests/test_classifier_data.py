"""Crop shards → in-memory training arrays: what is kept, what is left out and why, pixels and labels."""


import cv2
import numpy as np

from kemo import outputs
from kemo.classifier.data import decode_crop, load_splits
from kemo.data import aihub
from kemo.preprocess import KIND, read_crops


def test_load_splits_keeps_labelled_agreed_crops_and_counts_the_rest(corpus_index, annotation_crops):
    out = annotation_crops
    manifest = {r["image_id"]: r for r in aihub.load_manifest(corpus_index).to_pylist()}
    splits, report = load_splits(out, image_size=32, min_agree=3, jobs=2)
    kept = sum(len(s.labels) for s in splits.values())
    assert kept + sum(report["left_out"].values()) == report["rows"] == len(manifest)
    unknown = sum(1 for r in manifest.values() if r["label"] < 0)
    two_only = sum(1 for r in manifest.values() if r["label"] >= 0 and r["agree_n"] < 3)
    assert report["left_out"] == {"unknown label": unknown, "fewer than 3 annotators agree": two_only}
    assert unknown > 0 and two_only > 0
    for name, s in splits.items():
        assert s.images.shape == (len(s.labels), 32, 32, 3) and s.images.dtype == np.uint8
        assert all(manifest[i]["split"] == name and manifest[i]["label"] == y for i, y in zip(s.image_ids, s.labels))
        assert report["splits"][name]["photos"] == len(s.labels)
    assert len(splits["train"].labels) > len(splits["val"].labels) > 0
    loose, _ = load_splits(out, image_size=32, min_agree=2, jobs=2)
    assert sum(len(s.labels) for s in loose.values()) == kept + two_only


def test_decode_crop_resizes_to_the_training_size_and_refuses_garbage():
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[:, :48] = (255, 0, 0)  # left half red
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    small = decode_crop(jpeg.tobytes(), 32)
    assert small.shape == (32, 32, 3) and small[16, 4, 0] > 200 and small[16, 4, 2] < 50 and small[16, 28, 0] < 50
    assert decode_crop(b"not a jpeg", 32) is None


def test_the_shards_row_order_never_reaches_training(annotation_crops, tmp_path):
    """Ray Data writes rows in an order that varies between runs; the arrays (and so a seeded run) must not."""
    table = read_crops(annotation_crops)
    shuffled = str(tmp_path / "shuffled")
    order = np.random.default_rng(0).permutation(table.num_rows)
    parts = [outputs.write_part(shuffled, "shards", table.take(order[:40]), ["b"]),
             outputs.write_part(shuffled, "shards", table.take(order[40:]), ["a"])]
    outputs.Output(shuffled, KIND).commit(parts, {})
    original, _ = load_splits(annotation_crops, image_size=32, jobs=2)
    again, _ = load_splits(shuffled, image_size=32, jobs=2)
    for name in original:
        assert again[name].image_ids == original[name].image_ids == sorted(original[name].image_ids)
        assert np.array_equal(again[name].images, original[name].images)
        assert np.array_equal(again[name].labels, original[name].labels)
