"""The label job: one row per file whatever it is, the training path's probabilities, incremental reruns, S3, faces."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from kemo import gallery, outputs, storage, views
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import input_batch, load_checkpoint, read_meta, save_checkpoint
from kemo.classifier.data import decode_crop
from kemo.classifier.registry import create_model
from kemo.data import aihub, synth
from kemo.label import LabelConfig, calibration, run, snapshot
from kemo.label_photos import LabelPhotos
from kemo.label_store import read_labels, write_part
from kemo.preprocess import CropPhotos, PreprocessConfig
from kemo.schema import LABELS, MANIFEST
from tests import hostile
from tests.galleries import decoded_thumb, parse_gallery
from tests.photos import bad_inputs, jpeg, scene
from tests.tree import snapshot as tree_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART = re.compile(r"parts/part-[0-9a-f]{20}\.parquet")


def label_one_by_one(cfg: LabelConfig, photos: pa.Table) -> pa.Table:
    """The same models and code, one photo at a time in this process, no Ray, no batching, one decoder thread: what
    the Ray job's rows are compared with (jobs/benchmark.py times its own cv2.imread loop instead)."""
    udf = LabelPhotos(dataclasses.asdict(dataclasses.replace(cfg, decoders=1, batch_size=1)),
                      *calibration(cfg, read_meta(cfg.checkpoint)))
    return pa.concat_tables([udf(photos.slice(i, 1)) for i in range(photos.num_rows)])


def actor(cfg: LabelConfig) -> LabelPhotos:
    """The job's actor in this process, with the calibration the job's driver would give it."""
    return LabelPhotos(dataclasses.asdict(cfg), *calibration(cfg, read_meta(cfg.checkpoint)))


def face_photo(seed: int, boxes: list[tuple[float, float, float, float]], w: int = 320, h: int = 240) -> bytes:
    """A JPEG of drawn frontal faces on a plain background (OpenCV's Haar cascade finds these)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(60, 200, 3)
    for k, box in enumerate(boxes):
        synth.draw_face(img, box, int(rng.integers(0, 7)), synth._person(seed, k), rng)
    return jpeg(img)


def one_face(seed: int) -> bytes:
    x = 30 + 12 * seed
    return face_photo(seed, [(x, 40, x + 110, 180)])


TWO_FACES = face_photo(101, [(15, 40, 135, 190), (185, 70, 295, 205)])


def write_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def tree_state(root) -> dict[str, tuple[bytes, int]]:
    """Every file under root: (bytes, mtime_ns), to prove that nothing was written."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def committed_parts(out: str) -> list[str]:
    files = outputs.Output(out, "labels").committed()["files"]
    return sorted(f["path"] for f in files if f["path"].startswith("parts/"))


def by_uri(out: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in read_labels(out).to_pylist():
        rows.setdefault(r["uri"], []).append(r)
    return rows


def direct(cfg: LabelConfig, uris: list[str]) -> dict[str, dict]:
    """The training path, without kemo.label: preprocessing's crop JPEG → decode_crop → load_checkpoint → preprocess
    → softmax, per photo."""
    pre = PreprocessConfig(input="-", output="-", detector=cfg.detector, weights=cfg.weights, crop_size=cfg.crop_size,
                           margin=cfg.margin, imgsz=cfg.imgsz, conf=cfg.conf, decode_min_side=cfg.decode_min_side,
                           jpeg_quality=cfg.jpeg_quality)
    manifest = pa.Table.from_pylist([{"image_id": u, "uri": u} for u in uris], schema=MANIFEST)
    model, meta = load_checkpoint(cfg.checkpoint)
    out = {}
    for r in CropPhotos(dataclasses.asdict(pre))(manifest).to_pylist():
        if r["status"] == "ok":
            x = input_batch([decode_crop(r["crop"], meta["image_size"])], meta)
            with torch.no_grad():
                r["probs"] = torch.softmax(model(x), dim=1)[0].numpy()
        out[r["uri"]] = r
    return out


@pytest.fixture(scope="module")
def checkpoint(small_kemotionnet):
    return small_kemotionnet


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Photos, a JPEG named .txt, a text file, JSON, every bad input kind, a file over max_bytes, OS metadata."""
    root = tmp_path_factory.mktemp("photos")
    files = {f"a/face{s}.jpg": one_face(s) for s in range(4)}
    files["한글 사진 + & 1.jpg"] = one_face(5)
    files["really a jpeg.txt"] = one_face(6)
    files["no face.jpg"] = jpeg(scene(320, 240))
    files["notes.txt"] = b"a list of photos to label\n"
    files["b/labels.json"] = b'{"filename": "x.jpg"}'
    files["huge.bin"] = b"\xff\xd8\xff" + bytes(300_000)  # over max_bytes below: refused unread
    files[".DS_Store"] = b"\0\0\0\1Bud1"
    expected = {rel: "ok" for rel in files if rel.endswith((".jpg", ".txt"))}
    expected.update({"no face.jpg": "no_face", "notes.txt": "decode_error", "b/labels.json": "decode_error",
                     "huge.bin": "too_large"})
    for name, (data, status) in bad_inputs().items():
        files[f"bad/{name}"], expected[f"bad/{name}"] = data, status
    write_tree(root, files)
    return str(root), expected


@pytest.fixture(scope="module")
def labelled(ray_local, folder, checkpoint, tmp_path_factory):
    root, _ = folder
    cfg = LabelConfig(input=root, output=str(tmp_path_factory.mktemp("labels")), checkpoint=checkpoint,
                      detector="haar", crop_size=96, max_bytes=200_000, batch_size=4)
    return cfg, run(cfg)


def test_every_file_gets_one_row_with_its_status(folder, labelled):
    root, expected = folder
    cfg, summary = labelled
    rows = by_uri(cfg.output)
    assert sorted(os.path.relpath(u, root) for u in rows) == sorted(expected)  # .DS_Store: no row
    assert summary.ignored == 1 and summary.listed == summary.processed == summary.photos == len(expected)
    for uri, (r,) in rows.items():
        rel = os.path.relpath(uri, root)
        assert r["status"] == expected[rel], (rel, r["status"], r["error"])
        assert (r["error"] is None) == (r["status"] == "ok"), rel
        assert r["size"] == os.path.getsize(uri) and r["detector"] == "haar"
        if r["status"] == "ok":
            assert r["face"] == 0 and r["n_faces"] == 1 and CLASS_NAMES[r["label"]] == r["label_name"]
            assert len(r["probs"]) == 7 and abs(sum(r["probs"]) - 1) < 1e-5
            assert r["confidence"] == pytest.approx(max(r["probs"]))
            assert (r["orig_width"], r["orig_height"]) == (320, 240)
        else:
            assert r["label"] is None and r["probs"] is None and r["face"] is None
    assert "exceeds the 200000-byte limit" in rows[os.path.join(root, "huge.bin")][0]["error"]
    statuses = {s: list(expected.values()).count(s) for s in set(expected.values())}
    assert summary.statuses == summary.processed_statuses == statuses
    assert sum(summary.emotions.values()) == statuses["ok"]
    # labels.csv holds the same rows, list columns spread out; the commit names every file and nothing else
    csv = pacsv.read_csv(os.path.join(cfg.output, "labels.csv")).to_pylist()
    assert sorted(r["uri"] for r in csv) == sorted(rows)
    ok = next(r for r in csv if r["status"] == "ok")
    assert [ok[f"p_{c}"] for c in CLASS_NAMES] == pytest.approx(rows[ok["uri"]][0]["probs"], abs=1e-6)
    assert ok["face_x2"] == pytest.approx(rows[ok["uri"]][0]["face_box"][2])
    files = [f["path"] for f in outputs.Output(cfg.output, "labels").committed()["files"]]
    assert all(PART.fullmatch(f) for f in files if f.startswith("parts/"))
    assert sorted(f for f in files if not f.startswith("parts/")) == [
        "_run.json", "config.json", "gallery.html", "labels.csv", "summary.json"]
    # the gallery: each face once with its thumbnail under its emotion, the photo without a face whole, every
    # other status listed with its error
    sections = parse_gallery(os.path.join(cfg.output, "gallery.html"))
    for name in CLASS_NAMES:
        figures = sections[name]["figures"]
        assert len(figures) == summary.emotions.get(name, 0) and all(len(f) == 1 for f in figures)
        for f in figures:
            decoded_thumb(f[0])
    assert len(sections["no face"]["figures"]) == statuses["no_face"] == 1
    decoded_thumb(sections["no face"]["figures"][0][0])
    others = sum(n for s, n in statuses.items() if s not in ("ok", "no_face"))
    assert sections["other statuses"]["rows"] == others + 1  # and the header
    assert sections["abstained"]["figures"] == [] and summary.abstained == 0
    assert storage.read_json(os.path.join(cfg.output, "summary.json"))["statuses"] == statuses


def test_labels_equal_the_classifier_on_the_training_path(labelled):
    cfg, _ = labelled
    rows = {u: rs[0] for u, rs in by_uri(cfg.output).items() if not u.endswith("huge.bin")}  # max_bytes: ours
    want = direct(cfg, sorted(rows))
    for uri, r in rows.items():
        w = want[uri]
        assert r["status"] == w["status"], uri
        if r["status"] == "ok":
            np.testing.assert_allclose(r["face_box"], w["face_box"], rtol=1e-6)
            np.testing.assert_allclose(r["probs"], w["probs"], atol=1e-5)
            assert r["label"] == int(np.argmax(w["probs"]))
    # the UDF alone, and the plain per-photo loop, give the same rows as the Ray job
    photos = snapshot(cfg)[0]
    alone = actor(cfg)(photos)
    plain = label_one_by_one(cfg, photos)
    assert alone.schema.equals(LABELS) and plain.schema.equals(LABELS)
    job = read_labels(cfg.output).sort_by("uri")
    for table in (alone, plain):
        table = table.sort_by("uri")
        assert table.drop_columns(["probs", "confidence"]).equals(job.drop_columns(["probs", "confidence"]))
        for a, b in zip(table.column("probs").to_pylist(), job.column("probs").to_pylist()):
            assert (a is None and b is None) or np.allclose(a, b, atol=1e-5)


def test_reruns_label_only_new_and_replaced_photos(ray_local, checkpoint, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, ckpt)
    photos = tmp_path / "photos"
    write_tree(photos, {f"p{s}.jpg": one_face(s) for s in range(4)})
    cfg = LabelConfig(input=str(photos), output=str(tmp_path / "out"), checkpoint=ckpt, detector="none",
                      crop_size=64, batch_size=2, actors=1)
    first = run(cfg)
    assert first.processed == 4 and first.statuses == {"ok": 4}
    parts = committed_parts(cfg.output)
    before = tree_state(cfg.output)

    # Nothing new: no model may load. A broken model.pt would fail any actor that tried; nothing is written.
    model_pt = os.path.join(ckpt, "model.pt")
    good = open(model_pt, "rb").read()
    with open(model_pt, "wb") as f:
        f.write(b"not the model")
    again = run(cfg)
    assert again.processed == 0 and again.skipped == 4 and again.statuses == {"ok": 4}
    assert tree_state(cfg.output) == before
    with open(model_pt, "wb") as f:
        f.write(good)

    # Two new photos: exactly those two are labelled, in one new part; the first run's parts stay as they were, and
    # labels.csv gets the new rows appended: its earlier bytes are not written again
    write_tree(photos, {"new/p4.jpg": one_face(4), "new/p5.jpg": one_face(5)})
    csv_path = os.path.join(cfg.output, "labels.csv")
    csv_before, inode = open(csv_path, "rb").read(), os.stat(csv_path).st_ino
    cut = []  # the gallery cuts the new photos' thumbnails only: the others are the committed page's
    real_thumbnail = gallery.face_thumbnail
    monkeypatch.setattr(gallery, "face_thumbnail", lambda uri, *a: cut.append(uri) or real_thumbnail(uri, *a))
    added = run(cfg)
    assert added.processed == 2 and added.skipped == 4 and added.photos == 6
    (new_part,) = set(committed_parts(cfg.output)) - set(parts)
    assert set(parts) <= set(committed_parts(cfg.output))
    new_rows = storage.read_parquet(os.path.join(cfg.output, new_part)).column("uri").to_pylist()
    assert sorted(new_rows) == [str(photos / "new" / "p4.jpg"), str(photos / "new" / "p5.jpg")]
    assert sorted(cut) == sorted(new_rows)
    page = parse_gallery(os.path.join(cfg.output, "gallery.html"))
    shown = [f for name in CLASS_NAMES for f in page[name]["figures"]]
    assert len(shown) == 6 and all(len(f) == 1 for f in shown)  # every face with its picture
    csv_after = open(csv_path, "rb").read()
    assert csv_after.startswith(csv_before) and os.stat(csv_path).st_ino == inode
    assert sorted(r["uri"] for r in pacsv.read_csv(csv_path).to_pylist()) == sorted(by_uri(cfg.output))
    assert outputs.verify(outputs.VerifyConfig(cfg.output)) == []

    # A replaced photo (same key, other bytes) is labelled again and keeps exactly one, current row.
    target = photos / "p1.jpg"
    old = by_uri(cfg.output)[str(target)]
    target.write_bytes(TWO_FACES)
    replaced = run(cfg)
    assert replaced.processed == 1 and replaced.photos == 6 and replaced.rows == 6
    (row,) = by_uri(cfg.output)[str(target)]
    assert row["size"] == len(TWO_FACES) != old[0]["size"]
    np.testing.assert_allclose(row["probs"], direct(cfg, [str(target)])[str(target)]["probs"], atol=1e-5)
    assert not np.allclose(row["probs"], old[0]["probs"], atol=1e-5)
    # the part that held the old row was rewritten; the parts directory holds exactly what the commit names
    assert set(os.listdir(os.path.join(cfg.output, "parts"))) == {p[6:] for p in committed_parts(cfg.output)}
    # labels.csv lost a row: written whole again, sorted, with exactly the current rows
    csv = pacsv.read_csv(csv_path).to_pylist()
    assert [r["uri"] for r in csv] == sorted(by_uri(cfg.output)) and len(csv) == 6
    assert next(r for r in csv if r["uri"] == str(target))["size"] == len(TWO_FACES)
    assert outputs.verify(outputs.VerifyConfig(cfg.output)) == []


def test_an_interrupted_output_resumes_without_duplicates(labelled, folder, tmp_path):
    cfg, first = labelled
    out = str(tmp_path / "out")
    shutil.copytree(cfg.output, out)
    resumed = dataclasses.replace(cfg, output=out)
    root, _ = folder
    target = os.path.join(root, "a", "face0.jpg")
    # as a killed rerun leaves it: no commit, a block written twice under two names, one photo's read failed
    os.remove(os.path.join(out, "_commit.json"))
    part = os.path.join(out, committed_parts(cfg.output)[0])
    table = storage.read_parquet(part)
    uris = table.column("uri").to_pylist()
    assert target in uris
    status = [("read_error" if u == target else s) for u, s in zip(uris, table.column("status").to_pylist())]
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    assert os.path.join(out, "parts", write_part(table, out)) == part  # the same rows: the same part, rewritten
    outputs.write_part(out, "parts", table, ["the same block, retried"])  # and a copy under another name
    with pytest.raises(FileNotFoundError):
        read_labels(out)
    summary = run(resumed)
    assert summary.processed == 1 and summary.processed_statuses == {"ok": 1}  # only the failed read
    rows = by_uri(out)
    assert len(rows) == first.photos and all(len(r) == 1 for r in rows.values())
    assert rows[target][0]["status"] == "ok"
    assert summary.statuses == first.statuses
    assert set(os.listdir(os.path.join(out, "parts"))) == {p[6:] for p in committed_parts(out)}
    original = {u: rs[0] for u, rs in by_uri(cfg.output).items()}
    for uri, (r,) in rows.items():
        assert r["status"] == original[uri]["status"] and r["label"] == original[uri]["label"], uri


def test_s3_in_and_out_with_awkward_and_path_traversal_keys(ray_local, checkpoint, s3_bucket, moto_endpoint,
                                                           tmp_path):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    photos = {"in/한글 사진 + & 1.jpg": one_face(1), "in/sub dir/a+b&c.jpg": one_face(2),
              "in/a/../../escape.jpg": one_face(3), "in//etc/absolute.jpg": one_face(4), "in/../up.jpg": one_face(5),
              "in/..\\..\\win.jpg": one_face(6), "in/notes.txt": b"aaaa"}
    others = {"in/folder/": b"", "other/x.jpg": one_face(7)}  # a "folder" marker, and a key outside the prefix
    for key, data in {**photos, **others}.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    out = f"s3://{s3_bucket}/labels"
    cfg = LabelConfig(input=f"s3://{s3_bucket}/in/", output=out, checkpoint=checkpoint, detector="none", crop_size=64,
                      actors=1)
    summary = run(cfg)
    rows = by_uri(out)
    assert sorted(rows) == sorted(f"s3://{s3_bucket}/{k}" for k in photos)  # keys exactly as stored
    assert summary.statuses == {"ok": 6, "decode_error": 1}
    for key, data in photos.items():
        (r,) = rows[f"s3://{s3_bucket}/{key}"]
        assert r["size"] == len(data) and r["etag"] and r["status"] == ("decode_error" if key.endswith("txt") else "ok")
    # nothing written outside the output prefix, and no output name taken from a key
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    written = sorted(k for k in keys if k not in photos and k not in others)
    assert all(k.startswith("labels/") for k in written)
    parts = [k for k in written if k.startswith(("labels/parts/", "labels/_receipts/"))]
    assert {k[len("labels/"):] for k in written if k not in parts} == {
        "_commit.json", "_run.json", "config.json", "gallery.html", "labels.csv", "summary.json"}
    assert all(PART.fullmatch(k[len("labels/"):].removeprefix("_receipts/").removesuffix(".json")) for k in parts)
    assert len(parts) == 2 * len([k for k in parts if k.startswith("labels/parts/")])  # a receipt for each part

    # the same keys into a local output: every file lands under it, nothing beside it
    work = tmp_path / "work"
    work.mkdir()
    local = dataclasses.replace(cfg, output=str(work / "out"))
    run(local)
    assert os.listdir(work) == ["out"] and os.listdir(tmp_path) == ["work"]
    assert sorted(os.path.relpath(os.path.join(d, n), work / "out") for d, _, ns in os.walk(work / "out")
                  for n in ns if not n.startswith("part-")) == [
        "_commit.json", "_run.json", "config.json", "gallery.html", "labels.csv", "summary.json"]
    assert len(read_labels(local.output)) == len(photos)
    # the gallery's thumbnails are cut from the S3 photos, awkward keys and all
    shown = [f for name in CLASS_NAMES for f in parse_gallery(str(work / "out" / "gallery.html"))[name]["figures"]]
    assert len(shown) == 6 and all(len(f) == 1 for f in shown)

    # rerun: nothing to do; then a same-size replacement within the same second is seen by its ETag
    before = {k: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in written}
    assert run(cfg).processed == 0
    assert {k: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in written} == before
    s3.put_object(Bucket=s3_bucket, Key="in/notes.txt", Body=b"bbbb")
    assert run(cfg).processed == 1
    (r,) = by_uri(out)[f"s3://{s3_bucket}/in/notes.txt"]
    assert r["size"] == 4 and r["etag"] != rows[f"s3://{s3_bucket}/in/notes.txt"][0]["etag"]
    assert len(read_labels(out)) == len(photos)


def test_all_faces_gives_one_row_per_face(ray_local, checkpoint, tmp_path):
    photos = tmp_path / "photos"
    write_tree(photos, {"two.jpg": TWO_FACES, "one.jpg": one_face(2), "none.jpg": jpeg(scene(320, 240))})
    cfg = LabelConfig(input=str(photos), output=str(tmp_path / "out"), checkpoint=checkpoint, detector="haar",
                      crop_size=64, all_faces=True, actors=1)
    summary = run(cfg)
    rows = by_uri(cfg.output)
    two, one, none = (rows[str(photos / n)] for n in ("two.jpg", "one.jpg", "none.jpg"))
    assert [r["face"] for r in two] == [0, 1] and {r["n_faces"] for r in two} == {2}
    assert [(r["face"], r["status"]) for r in one] == [(0, "ok")]
    assert [(r["face"], r["status"], r["n_faces"]) for r in none] == [(None, "no_face", 0)]
    assert summary.photos == 3 and summary.rows == 4 and sum(summary.emotions.values()) == 3
    left, right = sorted(r["face_box"][0] for r in two)
    assert left < 100 < 150 < right  # the two drawn faces, not one face twice
    # face 0 is the primary face: the one row that labelling without --all-faces gives
    (primary,) = actor(dataclasses.replace(cfg, all_faces=False))(
        snapshot(cfg)[0].filter(pa.compute.equal(pa.compute.field("uri"), str(photos / "two.jpg")))).to_pylist()
    assert primary["face_box"] == two[0]["face_box"]
    np.testing.assert_allclose(primary["probs"], two[0]["probs"], atol=1e-5)
    assert len(pacsv.read_csv(os.path.join(cfg.output, "labels.csv"))) == 4


def test_refusals(labelled, checkpoint, tmp_path):
    cfg, _ = labelled
    with pytest.raises(ValueError, match="annotators' boxes"):
        run(dataclasses.replace(cfg, detector="annotations"))
    with pytest.raises(ValueError, match="needs --weights"):
        run(dataclasses.replace(cfg, detector="yolo"))
    with pytest.raises(ValueError, match="inside --input"):
        run(dataclasses.replace(cfg, output=os.path.join(cfg.input, "labels")))
    with pytest.raises(ValueError, match="--format"):
        run(dataclasses.replace(cfg, format=("parquet", "xlsx")))
    other = str(tmp_path / "other")
    torch.manual_seed(1)
    save_checkpoint(other, create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet", {"blocks": [1, 1, 1, 1]},
                    image_size=48)
    with pytest.raises(ValueError, match="another setup.*model"):
        run(dataclasses.replace(cfg, checkpoint=other))
    with pytest.raises(ValueError, match="another setup.*all_faces"):
        run(dataclasses.replace(cfg, all_faces=True))
    fresh = dataclasses.replace(cfg, output=str(tmp_path / "fresh"))
    with pytest.raises(ValueError, match="choose one"):
        run(dataclasses.replace(fresh, abstain=True, min_confidence=0.5))
    with pytest.raises(ValueError, match="min-confidence must lie"):
        run(dataclasses.replace(fresh, min_confidence=1.5))
    assert not os.path.exists(fresh.output)


def test_an_old_checkpoint_labels_at_temperature_1_and_refuses_abstain_but_takes_a_min_confidence(labelled,
                                                                                                  tmp_path):
    cfg, _ = labelled  # its checkpoint was saved without calibration, as before kemo calibrated them
    assert "temperature" not in storage.read_json(os.path.join(cfg.checkpoint, "meta.json"))
    out = str(tmp_path / "abstain")
    with pytest.raises(ValueError, match="no abstention threshold.*--min-confidence"):
        run(dataclasses.replace(cfg, output=out, abstain=True))
    assert not os.path.exists(out)
    baseline = by_uri(cfg.output)  # labelled at temperature 1 (the training-path test checks those probabilities)
    summary = run(dataclasses.replace(cfg, output=out, min_confidence=0.3))
    rows = by_uri(out)
    ok = [r for (r,) in rows.values() if r["status"] == "ok"]
    assert ok and all(r["abstained"] == (r["confidence"] < 0.3) for r in ok)
    assert all(r["abstained"] is None for (r,) in rows.values() if r["status"] != "ok")
    assert summary.abstained == sum(r["abstained"] for r in ok) and summary.min_confidence == 0.3
    assert summary.temperature == 1.0
    for r in ok:
        assert r["probs"] == pytest.approx(baseline[r["uri"]][0]["probs"], abs=1e-6)


def test_actors_apply_the_calibration_the_driver_read_not_meta_json_again(labelled):
    """jobs/train.py rewrites meta.json when it calibrates a finished run: an actor started after that must still
    write the temperature and threshold that the run fingerprinted (and its commit says), the ones it is given."""
    cfg, _ = labelled
    assert "temperature" not in read_meta(cfg.checkpoint)  # meta.json says 1; the driver said 2
    photos = snapshot(cfg)[0]
    plain = LabelPhotos(dataclasses.asdict(cfg), 1.0, None)(photos).to_pylist()
    given = LabelPhotos(dataclasses.asdict(cfg), 2.0, 0.3)(photos).to_pylist()
    ok = [(a, b) for a, b in zip(plain, given) if a["status"] == "ok"]
    assert len(ok) >= 4 and [a["uri"] for a, _ in ok] == [b["uri"] for _, b in ok]
    for a, b in ok:
        z = np.log(np.asarray(a["probs"], np.float64)) / 2  # log softmax(z) is z up to a constant
        assert b["probs"] == pytest.approx(np.exp(z) / np.exp(z).sum(), abs=1e-5)
        assert a["abstained"] is False and b["abstained"] == (b["confidence"] < 0.3)


def test_an_output_of_an_earlier_kemo_is_refused_in_one_line(labelled, tmp_path):
    """kemo keeps no compatibility with its unreleased development versions: an output one of them wrote (a claim
    without the calibration keys, parts without `abstained`) is refused, saying to write a new output."""
    cfg, _ = labelled
    old = dataclasses.replace(cfg, output=str(tmp_path / "old"))
    run(old)
    run_json = os.path.join(old.output, "_run.json")
    claim = storage.read_json(run_json)
    storage.write_json(run_json, {k: v for k, v in claim.items() if k not in ("temperature", "min_confidence")})
    with pytest.raises(ValueError, match=r"another setup \(differs in temperature\); use a new --output"):
        run(old)
    storage.write_json(run_json, claim)
    for name in outputs.parts(old.output, "parts"):
        part = storage.read_parquet(os.path.join(old.output, "parts", name)).drop_columns(["abstained"])
        assert write_part(part, old.output) == name  # named after its rows: the same part, rewritten
    out = outputs.Output(old.output, "labels")
    summary = outputs.Receipt.of("summary.json", open(os.path.join(old.output, "summary.json"), "rb").read())
    out.commit([*outputs.parts(old.output, "parts").values(), summary, out.claim_receipt()], {}, claim)
    with pytest.raises(outputs.Damaged, match="has no abstained column: it was written by an earlier version"):
        read_labels(old.output)
    with pytest.raises(outputs.Damaged, match="write a new output"):
        run(old)


def test_a_failing_gallery_costs_the_labels_nothing_and_a_rerun_that_only_retries_it_writes_nothing(
        labelled, folder, tmp_path, monkeypatch):
    cfg, _ = labelled
    job = dataclasses.replace(cfg, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    shutil.copytree(folder[0], job.input)
    run(job)
    page = os.path.join(job.output, "gallery.html")
    committed = lambda: sorted(f["path"] for f in outputs.Output(job.output, "labels").committed()["files"])  # noqa: E731
    assert "gallery.html" in committed() and os.path.exists(page)

    def no_page(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(views, "label_gallery", no_page)
    open(os.path.join(job.input, "new.jpg"), "wb").write(one_face(9))
    summary = run(job)  # the new photo is labelled and committed; the page of the older rows is not left behind
    assert summary.processed == 1 and summary.photos == len(by_uri(job.output))
    assert "gallery.html" not in committed() and not os.path.exists(page)
    before = tree_snapshot(job.output)
    assert run(job).processed == 0 and tree_snapshot(job.output) == before  # the page fails again: no writes
    monkeypatch.undo()
    run(job)  # now it can be made: the commit gains it, and then a rerun writes nothing
    assert "gallery.html" in committed() and os.path.exists(page)
    before = tree_snapshot(job.output)
    run(job)
    assert tree_snapshot(job.output) == before
    run(dataclasses.replace(job, gallery=0))  # asked for none: none committed, none left on disk
    assert "gallery.html" not in committed() and not os.path.exists(page)


def test_the_gallery_reads_only_the_files_listed_not_what_an_old_row_s_name_points_to_now(ray_local, checkpoint,
                                                                                        tmp_path):
    """A labelled folder becomes a link to somebody else's photos: its old rows stay in the output (a row is
    superseded only by its photo's new version), but the gallery must not read what their names reach now."""
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(one_face(1))
    (root / "b.jpg").write_bytes(one_face(2))
    cfg = LabelConfig(input=str(root), output=str(tmp_path / "labels"), checkpoint=checkpoint, detector="none",
                      crop_size=48, batch_size=4)
    run(cfg)
    outside.mkdir()
    (outside / "a.jpg").write_bytes(one_face(7))  # a photo outside the input, under the same name
    shutil.rmtree(root / "sub")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    (root / "c.jpg").write_bytes(one_face(3))
    summary = run(cfg)  # c.jpg, and the link (outside the input: a row of its own)
    assert summary.processed == 2 and summary.statuses["outside_link"] == 1
    tiles = {t: (f, x) for s in parse_gallery(os.path.join(cfg.output, "gallery.html")).values()
             for t, f, x in zip(s["titles"], s["figures"], s["texts"])}
    old = next(t for t in tiles if t.endswith("sub/a.jpg"))
    figures, text = tiles[old]
    assert figures == [] and "no longer listed under the input" in text  # no picture: nothing was read
    for name in ("b.jpg", "c.jpg"):
        (figure, _), = [v for t, v in tiles.items() if t.endswith(name)]
        decoded_thumb(figure[0])


def test_an_output_of_another_kind_is_refused_and_left_intact(labelled, corpus_index):
    """--output pointed at an index by mistake: refused before anything is written, and the index still reads."""
    cfg, _ = labelled
    before = tree_snapshot(corpus_index)
    with pytest.raises(outputs.OtherKind, match="holds a 'index' output, not 'labels'"):
        run(dataclasses.replace(cfg, output=corpus_index))
    assert tree_snapshot(corpus_index) == before
    assert aihub.load_manifest(corpus_index).num_rows > 0


def test_a_hostile_folder_gets_one_row_per_entry_and_nothing_outside_is_opened(ray_local, checkpoint, tmp_path):
    """Broken links, loops, a directory cycle, a FIFO, a device link, links out of the input, a 2 GB sparse file, a
    cp949 name and a folder beyond PATH_MAX: the job ends with a row for each, every photo labelled, no target outside
    the input opened, and a rerun has nothing to do."""
    expected, guard = hostile.build(tmp_path / "in", tmp_path / "outside")
    expected[hostile.beyond_path_max(tmp_path / "in")] = "unreadable"  # the same every time: not retried
    try:
        cfg = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "labels"), checkpoint=checkpoint,
                          detector="none", crop_size=48, batch_size=4)
        summary = run(cfg)
        rows = {os.path.relpath(storage.local_path(u), cfg.input): r for u, (r,) in by_uri(cfg.output).items()}
        assert {rel: r["status"] for rel, r in rows.items()} == {rel: s or "ok" for rel, s in expected.items()}
        assert summary.photos == len(expected) and summary.statuses["ok"] == list(expected.values()).count(None)
        odd = next(r for r in rows.values() if r["uri"].startswith("file://"))  # the cp949 name: labelled, readable
        assert odd["label_name"] and storage.read_bytes(odd["uri"]) == hostile.photo(4)
        assert "outside the input" in rows["outdir"]["error"] and "--links anywhere" in rows["secret.jpg"]["error"]
        assert "2147483648 bytes exceeds" in rows["sparse.jpg"]["error"]
        csv = pacsv.read_csv(os.path.join(cfg.output, "labels.csv")).to_pylist()
        assert sorted(r["uri"] for r in csv) == sorted(r["uri"] for r in rows.values())
        before = tree_snapshot(cfg.output)
        assert run(cfg).processed == 0 and tree_snapshot(cfg.output) == before  # listing statuses are final
        # following links anywhere: the outside photos are labelled; a device or a FIFO is still never opened
        anywhere = dataclasses.replace(cfg, output=str(tmp_path / "anywhere"), links="anywhere")
        run(anywhere)
        rows = {os.path.relpath(storage.local_path(u), cfg.input): r["status"]
                for u, (r,) in by_uri(anywhere.output).items()}
        assert rows == {rel: s or "ok" for rel, s in hostile.anywhere(expected).items()}
    finally:
        assert not guard.close()


def _bad_copy(checkpoint: str, where: str, **meta) -> str:
    shutil.copytree(checkpoint, where)
    good = storage.read_json(os.path.join(where, "meta.json"))
    storage.write_json(os.path.join(where, "meta.json"), {**good, **meta})
    return where


@pytest.mark.slow
def test_a_bad_checkpoint_is_refused_in_seconds_before_any_file_and_the_right_one_then_labels(ray_local, folder,
                                                                                            checkpoint, tmp_path):
    root, _ = folder
    out = str(tmp_path / "out")
    wrong_arch = _bad_copy(checkpoint, str(tmp_path / "arch"), architecture="resnet18", arguments={})
    wrong_hash = _bad_copy(checkpoint, str(tmp_path / "hash"), model_sha256="0" * 64)
    base = [sys.executable, "jobs/label.py", "--input", root, "--output", out, "--detector", "none",
            "--crop-size", "48", "--smoke-test"]
    for bad, message in ((wrong_arch, "does not fit the resnet18 that meta.json names"),
                         (wrong_hash, "is not the model.pt that meta.json describes")):
        t0 = time.monotonic()
        proc = subprocess.run(base + ["--checkpoint", bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - t0
        # refused before Ray starts (its start alone is 10-40 s here): ~4 s alone, of which the interpreter and torch's
        # import are most; the bound leaves room for a machine that other work keeps busy
        assert proc.returncode == 2 and seconds < 30 and "Ray instance" not in proc.stderr, (seconds, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr, proc.stderr
        assert not os.path.exists(out)  # not even the lease
    # a missing bucket, of the input or of the output: one line, before Ray starts
    for flag, missing in (("--input", "s3://kemo-no-such-bucket/photos"), ("--output", "s3://kemo-no-such-bucket/o")):
        args = base + ["--checkpoint", checkpoint]
        args[args.index(flag) + 1] = missing
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            "error: no such bucket: s3://kemo-no-such-bucket (at " + os.environ["AWS_ENDPOINT_URL"] + ")"), proc.stderr
        assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    # the same command with the right checkpoint (here, in this test's Ray): nothing of the refused runs is in the way
    assert run(LabelConfig(input=root, output=out, checkpoint=checkpoint, detector="none", crop_size=48,
                           smoke_test=True)).processed == 16
    assert read_labels(out).num_rows == 16


def test_an_input_or_output_that_is_a_file_is_named_as_such(labelled, tmp_path):
    cfg, _ = labelled
    a_file = tmp_path / "a.jpg"
    a_file.write_bytes(one_face(1))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run(dataclasses.replace(cfg, input=str(a_file), output=str(tmp_path / "out")))
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        run(dataclasses.replace(cfg, output=str(a_file)))
    assert a_file.read_bytes() == one_face(1)


@pytest.mark.slow
def test_job_script_smoke_test(ray_local, folder, checkpoint, tmp_path, monkeypatch, capsys):
    root, expected = folder
    out = str(tmp_path / "out")
    command = ["jobs/label.py", "--input", root, "--output", out, "--checkpoint", checkpoint, "--detector", "none",
               "--crop-size", "64", "--smoke-test"]
    # the script as `python jobs/label.py` runs it, in this process: its Ray is the session's (a Ray of its own
    # costs 10-20 s here; tests/test_job_submit.py runs the scripts with theirs)
    monkeypatch.setattr(sys, "argv", command)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runpy.run_path(os.path.join(ROOT, command[0]), run_name="__main__")
    finally:  # the job's own SIGINT/SIGTERM handlers (a clean stop) are the job's, not pytest's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert len(expected) > 16 and "16 files: 16 labelled" in capsys.readouterr().out
    rows = read_labels(out)
    assert rows.num_rows == 16 and set(rows.column("detector").to_pylist()) == {"none"}
    before = tree_snapshot(out)
    # the same command again, a process of its own with nothing to do: it starts no Ray (RAY_ADDRESS names no
    # cluster, so a start would fail) and writes nothing
    again = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert again.returncode == 0 and "16 files: 0 labelled" in again.stdout, again.stderr[-3000:]
    assert "Ray" not in again.stderr and tree_snapshot(out) == before  # no Ray, no write


@pytest.mark.slow
def test_yolo_labels_equal_the_training_path(ray_local, yolo_weights, folder, checkpoint, tmp_path):
    root, _ = folder
    cfg = LabelConfig(input=root, output=str(tmp_path / "out"), checkpoint=checkpoint, detector="yolo",
                      weights=yolo_weights, imgsz=224, conf=0.001, crop_size=64, max_bytes=200_000)
    summary = run(cfg)
    assert summary.processed == summary.listed
    assert storage.read_json(os.path.join(cfg.output, "_run.json"))["weights_sha256"] == \
        __import__("hashlib").sha256(open(yolo_weights, "rb").read()).hexdigest()
    rows = {u: rs[0] for u, rs in by_uri(cfg.output).items()}
    want = direct(cfg, sorted(rows))
    ok = [u for u, r in rows.items() if r["status"] == "ok"]
    assert len(ok) >= 3
    for uri in ok:
        np.testing.assert_allclose(rows[uri]["face_box"], want[uri]["face_box"], rtol=1e-5)
        np.testing.assert_allclose(rows[uri]["probs"], want[uri]["probs"], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_half_precision_agrees_with_cpu(labelled):
    cfg, _ = labelled
    photos = snapshot(cfg)[0]
    cpu = actor(dataclasses.replace(cfg, device="cpu"))(photos).to_pylist()
    gpu = actor(dataclasses.replace(cfg, device="cuda:0"))(photos).to_pylist()
    assert [r["status"] for r in gpu] == [r["status"] for r in cpu]
    for a, b in zip(cpu, gpu):
        if a["status"] == "ok":
            np.testing.assert_allclose(b["probs"], a["probs"], atol=0.02)  # bf16/fp16 autocast vs fp32


def test_the_actor_holds_torch_to_its_cpu_share(small_kemotionnet, tmp_path):
    """In a fresh process, as in a Ray worker: intra- and inter-op threads are the actor's decoders, not the node's
    cores."""
    cfg = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=small_kemotionnet,
                      detector="haar", decoders=1)
    code = ("import json, sys, torch; from kemo.label_photos import LabelPhotos; "
            "LabelPhotos(json.loads(sys.argv[1]), 1.0, None); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]
