"""Crop shards → Ray Data training splits: what is kept, what is left out and why, pixels and labels, a fixed order
that depends on the photos alone, and the cache decision."""

import dataclasses

import cv2
import numpy as np
import pyarrow as pa
import pytest

from kemo import outputs
from kemo.classes import CLASS_NAMES
from kemo.classifier.data import (
    CACHE_SHARE,
    cache_decision,
    datasets,
    decode_crop,
    order_keys,
    plan,
    split_dataset,
    vote_distribution,
)
from kemo.data import aihub
from kemo.preprocess import KIND, read_crops


def rows_of(ds):
    """(key, label, image) per row of a split, in its order."""
    out = []
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        out += list(zip(batch["key"].tolist(), batch["label"].tolist(), batch["image"]))
    return out


def test_plan_counts_usable_crops_per_split_and_class_from_the_small_columns(corpus_index, annotation_crops):
    manifest = {r["image_id"]: r for r in aihub.load_manifest(corpus_index).to_pylist()}
    strict = plan(annotation_crops, image_size=32, min_agree=3)
    unknown = sum(1 for r in manifest.values() if r["label"] < 0)
    two_only = sum(1 for r in manifest.values() if r["label"] >= 0 and r["agree_n"] < 3)
    assert strict.report.left_out == {"unknown label": unknown, "fewer than 3 annotators agree": two_only}
    assert unknown > 0 and two_only > 0
    kept = sum(strict.photos(s) for s in ("train", "val", "test"))
    assert kept + unknown + two_only == strict.report.rows == len(manifest)
    for split in ("train", "val", "test"):
        expected = [sum(1 for r in manifest.values() if r["split"] == split and r["label"] == c and r["agree_n"] >= 3)
                    for c in range(len(CLASS_NAMES))]
        assert strict.counts[split] == expected
        assert strict.report.splits[split].per_class == dict(zip(CLASS_NAMES, expected))
    loose = plan(annotation_crops, image_size=32, min_agree=2)
    assert sum(loose.photos(s) for s in ("train", "val", "test")) == kept + two_only
    assert loose.decoded_bytes() == (loose.photos("train") + loose.photos("val")) * 32 * 32 * 3


def test_a_split_streams_its_usable_photos_decoded_in_the_order_of_their_keys(corpus_index, annotation_crops):
    manifest = {r["image_id"]: r for r in aihub.load_manifest(corpus_index).to_pylist()}
    data = plan(annotation_crops, image_size=32, min_agree=3)
    crops = {r["image_id"]: r for r in read_crops(annotation_crops).to_pylist()}
    for split in ("train", "val"):
        rows = rows_of(split_dataset(data, split))
        ids = [i for i, r in manifest.items() if r["split"] == split and r["label"] >= 0 and r["agree_n"] >= 3]
        by_key = dict(zip(order_keys(ids).tolist(), ids))
        assert len(rows) == data.photos(split) == len(ids)
        assert [k for k, _, _ in rows] == sorted(by_key)  # a keyed hash of image_id: a shuffle fixed by the photos
        for key, label, image in rows[:10]:
            image_id = by_key[key]
            assert label == manifest[image_id]["label"] and image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert np.array_equal(image, decode_crop(crops[image_id]["crop"], 32))


def test_the_train_split_carries_each_photos_vote_shares_and_shards_without_votes_are_refused(
        corpus_index, annotation_crops, tmp_path):
    manifest = {r["image_id"]: r for r in aihub.load_manifest(corpus_index).to_pylist()}
    data = plan(annotation_crops, image_size=32)
    data.check_votes()
    ids = [i for i, r in manifest.items() if r["split"] == "train" and r["label"] >= 0 and r["agree_n"] >= 2]
    by_key = dict(zip(order_keys(ids).tolist(), ids))
    rows = list(split_dataset(data, "train", votes=True).iter_rows())
    assert len(rows) == len(ids)
    split = 0
    for r in rows:
        m = manifest[by_key[r["key"]]]
        expected = vote_distribution([m["votes"]], [m["label"]])[0]
        assert np.allclose(r["votes"], expected) and int(np.argmax(r["votes"])) == m["label"]
        split += r["votes"].max() < 1
    assert split > 0  # the generated annotators disagree on some photos: soft targets that are not one-hot
    # crop shards without the votes column (another kemo version's): refused, whatever the target
    table = read_crops(annotation_crops).drop_columns(["votes"])
    old = str(tmp_path / "old")
    outputs.Output(old, KIND).commit([outputs.write_part(old, "shards", table, ["a"])], {})
    with pytest.raises(ValueError, match="has no votes column: it was written by an earlier version of kemo; write "
                                         "a new output"):
        plan(old, 32)
    # shards that carry the column with no vote in it (preprocessed from a manifest without votes): refused too,
    # not trained on the one-hot majority under the votes target's name
    unvoted = str(tmp_path / "unvoted")
    nulls = table.append_column(read_crops(annotation_crops).schema.field("votes"),
                                pa.nulls(table.num_rows, read_crops(annotation_crops).schema.field("votes").type))
    outputs.Output(unvoted, KIND).commit([outputs.write_part(unvoted, "shards", nulls, ["a"])], {})
    empty = plan(unvoted, 32)
    assert empty.voted == 0 and data.voted == len(ids)
    with pytest.raises(ValueError, match="no training photo of .* has a known annotator vote"):
        empty.check_votes()


def test_the_shards_row_order_and_files_never_reach_training(annotation_crops, tmp_path):
    """Ray Data writes rows in an order that varies between runs; the splits (and so a seeded run) must not."""
    table = read_crops(annotation_crops)
    shuffled = str(tmp_path / "shuffled")
    order = np.random.default_rng(0).permutation(table.num_rows)
    parts = [outputs.write_part(shuffled, "shards", table.take(order[:40]), ["b"]),
             outputs.write_part(shuffled, "shards", table.take(order[40:]), ["a"])]
    outputs.Output(shuffled, KIND).commit(parts, {})
    original = rows_of(split_dataset(plan(annotation_crops, 32), "train"))
    again = rows_of(split_dataset(plan(shuffled, 32), "train"))
    assert [(k, y) for k, y, _ in again] == [(k, y) for k, y, _ in original] and len(original) > 100
    assert all(np.array_equal(a, b) for (*_, a), (*_, b) in zip(again, original))


def test_cached_splits_are_materialised_once_and_auto_caches_what_fits(annotation_crops):
    data = plan(annotation_crops, 32)
    splits, decision = datasets(data, "memory")
    assert decision.cached and decision.cache == "memory" and not decision.crops_that_do_not_decode
    assert type(splits["train"]).__name__ == "MaterializedDataset" == type(splits["val"]).__name__
    assert type(splits["test"]).__name__ == "Dataset"  # tested once per run: streamed
    assert splits["train"].count() == data.photos("train")
    cached, streamed = rows_of(splits["train"]), rows_of(split_dataset(data, "train"))
    assert [(k, y) for k, y, _ in cached] == [(k, y) for k, y, _ in streamed]
    assert all(np.array_equal(a, b) for (*_, a), (*_, b) in zip(cached, streamed))
    gb = 2 ** 30
    assert cache_decision("auto", int(CACHE_SHARE * 8 * gb), 8 * gb) and not cache_decision("auto", 5 * gb, 8 * gb)
    assert cache_decision("memory", 100 * gb, 8 * gb) and not cache_decision("none", 1, 8 * gb)
    with pytest.raises(ValueError, match="--cache must be one of auto, memory, none"):
        cache_decision("disk", 1, 1)


def test_a_materialised_split_of_many_blocks_holds_the_same_order_every_time(annotation_crops):
    """Decode tasks finish in any order; the cache must not keep that order (a relaunch would get other shares)."""
    data = plan(annotation_crops, 32)
    first, second = (split_dataset(data, "train", block_rows=8).materialize() for _ in range(2))
    keys = [k for k, *_ in rows_of(first)]
    assert first.num_blocks() > 10  # ~8 rows each (decode bundles small blocks up to 8 rows)
    assert keys == [k for k, *_ in rows_of(second)] == sorted(keys) and len(keys) == data.photos("train")


def test_decode_crop_resizes_to_the_training_size_and_refuses_garbage():
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[:, :48] = (255, 0, 0)  # left half red
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    small = decode_crop(jpeg.tobytes(), 32)
    assert small.shape == (32, 32, 3) and small[16, 4, 0] > 200 and small[16, 4, 2] < 50 and small[16, 28, 0] < 50
    assert decode_crop(b"not a jpeg", 32) is None


def test_table5_scores_every_row_on_the_indexs_test_photos_a_missed_face_counting_wrong(annotation_crops, tmp_path):
    """Two crop outputs of one index, one whose detector missed the faces of 3 known test photos: both are scored on
    the same test photos; the three figures of each row are exactly those computed by hand."""
    from types import SimpleNamespace

    from kemo.classifier.calibration import Kept
    from kemo.classifier.evaluation import Abstention
    from kemo.classifier.report import Row, scored_photos

    table = read_crops(annotation_crops)
    good = plan(annotation_crops, 32)
    test_ok = [i for i, (s, st, y, a) in enumerate(zip(*(table.column(c).to_pylist() for c in (
        "split", "status", "label", "agree_n")))) if s == "test" and st == "ok" and y >= 0 and a >= 2]
    missed = test_ok[:3]
    status = table.column("status").to_pylist()
    for i in missed:
        status[i] = "no_face"
    weak = str(tmp_path / "weak")
    shard = outputs.write_part(weak, "shards", table.set_column(table.schema.get_field_index("status"), "status",
                                                                pa.array(status)), ["weak"])
    outputs.Output(weak, KIND).commit([shard], {})
    worse = plan(weak, 32)
    n = good.report.test_photos
    assert n == worse.report.test_photos == len(test_ok) + sum(  # the index's test photos, whatever their crop
        s == "test" and st != "ok" and y >= 0 and a >= 2 for s, st, y, a in zip(*(table.column(c).to_pylist() for c in (
            "split", "status", "label", "agree_n"))))
    assert good.report.test_photos_sha256 == worse.report.test_photos_sha256
    faces = worse.report.splits["test"].photos
    assert faces == good.report.splits["test"].photos - 3

    def run(correct: int, seen: int) -> SimpleNamespace:  # what Row.of reads of a finished run
        cm = [[0] * 7 for _ in range(7)]
        cm[0][0], cm[0][1] = correct, seen - correct
        scores = SimpleNamespace(ece=0.1, nll=1.0, brier=0.5)
        return SimpleNamespace(
            name=f"r{correct}", best_val=SimpleNamespace(val_accuracy=correct / seen),
            test=SimpleNamespace(accuracy=correct / seen, macro_f1=0.3, per_class={}, confusion_matrix=cm),
            calibration=SimpleNamespace(before=scores, after=scores, temperature=1.0),
            coverage=SimpleNamespace(table=[]),
            abstention=Abstention(0.9, 0.9, 0.5, 0.9, 10, split="val", photos_in_split=20,
                                  test=Kept(0.9, photos=2, coverage=2 / seen, accuracy=1.0)))

    # the weak detector's row, two seeds: 4 and 2 of its faces right
    row = Row.of("weak", "resnet18", "majority", [run(4, faces), run(2, faces)], worse.report)
    assert row.accuracy.mean == pytest.approx((4 / n + 2 / n) / 2)  # over every test photo: missed faces wrong
    assert row.accuracy_on_faces.mean == pytest.approx((4 / faces + 2 / faces) / 2)
    assert row.face_coverage == pytest.approx(faces / n) and row.test_photos == n
    assert row.abstention.test.coverage == pytest.approx(2 / n)  # a missed face is a photo not kept
    seen = good.report.splits["test"].photos
    full = Row.of("annotations", "resnet18", "majority", [run(5, seen)], good.report)
    assert full.face_coverage == pytest.approx(seen / n) and full.accuracy.mean == pytest.approx(5 / n)
    assert full.accuracy_on_faces.mean == pytest.approx(5 / seen)
    assert scored_photos([row, full]).startswith(f"Every row is scored on the same {n} test photos of the index")
    other = dataclasses.replace(full, preprocessing="elsewhere", test_photos=n - 1, test_photos_sha256="other")
    assert scored_photos([row, other]).startswith("The rows' test photos differ") and f"elsewhere: {n - 1}" in \
        scored_photos([row, other])
