"""The AI-Hub-shaped generator: deterministic, shaped like the corpus (DESIGN §2), and learnable from the face only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import unicodedata
from collections import Counter

import cv2
import numpy as np
from PIL import Image, ImageOps

from kemo.classes import UNKNOWN
from kemo.data import aihub, synth
from kemo.data.labelfile import decode_json
from kemo.data.synth import SynthConfig, generate, read_truth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if name != "summary.json":  # holds the wall time
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def upright(root: str, image_id: str) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(os.path.join(root, image_id))).convert("RGB"))


def test_deterministic_for_a_seed_whatever_the_processes(tmp_path):
    a = SynthConfig(out=str(tmp_path / "a"), per_class=2, seed=5, size="200x150", orphans=1, missing=1, jobs=1)
    b = SynthConfig(**{**a.__dict__, "out": str(tmp_path / "b"), "jobs": 2})
    c = SynthConfig(**{**a.__dict__, "out": str(tmp_path / "c"), "seed": 6})
    for cfg in (a, b, c):
        generate(cfg)
    da, db, dc = tree_digest(a.out), tree_digest(b.out), tree_digest(c.out)
    assert da == db and len(da) == 2 * 7 - 1 + 7 + 1  # photos less the missing one, 7 label files, truth
    assert set(da.values()).isdisjoint(v for k, v in dc.items() if k.endswith(".jpg"))


def test_photos_show_upright_as_rendered_with_boxes_in_the_upright_frame(corpus):
    root, cfg = corpus
    plan = synth._plan(cfg)
    rows = [t for t in read_truth(root).to_pylist() if t["written"]]
    seen = Counter()
    for t in rows:
        seen[t["orientation"]] += 1
        look = synth._person(cfg.seed, plan[t["index"]]["person"])
        drawn = synth.render(cfg.seed, t["index"], t["expression"], look, cfg.wh)
        shown = upright(root, t["image_id"])
        assert shown.shape == drawn["image"].shape == (240, 320, 3)
        assert np.abs(shown.astype(int) - drawn["image"]).mean() < 4, t["image_id"]  # JPEG error only
        assert drawn["face_box"] == t["face_box"]
        stored = Image.open(os.path.join(root, t["image_id"]))
        assert stored.size == ((240, 320) if t["orientation"] in {5, 6, 7, 8} else (320, 240))
    assert {3, 6, 8} <= set(seen) and set(seen) & {2, 4, 5, 7}
    assert 0.2 <= 1 - seen[1] / len(rows) <= 0.45  # real corpus: ~32% not upright


def test_corpus_has_the_real_corpus_quirks(corpus):
    root, cfg = corpus
    rows = read_truth(root).to_pylist()
    area = [(t["face_box"][2] - t["face_box"][0]) * (t["face_box"][3] - t["face_box"][1]) / (320 * 240) for t in rows]
    assert 0.09 <= min(area) and max(area) <= 0.40
    assert 0.1 <= sum(bool(t["distractor_boxes"]) for t in rows) / len(rows) <= 0.5
    votes = [v for t in rows for v in t["votes"]]
    assert UNKNOWN in votes
    assert sum(len(set(t["votes"])) > 1 for t in rows) > 10  # annotators disagree
    assert sum(t["expression"] != t["folder_label"] for t in rows) > 5  # the folder is not the label
    boxes = [b for t in rows for b in t["annot_boxes"]]
    assert any(min(b[0], b[1]) < 0 for b in boxes) and any(b[0] == b[2] for b in boxes)
    assert any(b[2] > 320 or b[3] > 240 for b in boxes)  # beyond the right or bottom edge too
    names = [t["filename"] for t in rows]
    assert any(" " in n for n in names) and any("&" in n for n in names)
    assert all(len(n.split("_")[0]) == 64 for n in names)
    assert all(n.split("_")[3] in {"기쁨", "분노", "슬픔", "불안", "당황", "상처", "중립"} for n in names)
    plan = synth._plan(SynthConfig(out="", per_class=300))
    assert 0.005 < sum(p["ext"] == "jpeg" for p in plan) / len(plan) < 0.03  # ~1.5% .jpeg


def test_label_files_in_every_encoding_and_key_style(corpus):
    root, _ = corpus
    seen_enc, seen_keys = set(), set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith("img_emotion"):
                data = open(os.path.join(dirpath, name), "rb").read()
                records, enc = decode_json(data)
                seen_enc.add(enc)
                seen_keys |= {k[:-2] for k in records[0] if k.endswith(("_A", "_B", "_C"))}
                assert records[0]["filename"].endswith((".jpg", ".jpeg"))
    assert seen_enc == {"utf-8", "utf-8-sig", "cp949"} and seen_keys == {"annot", "faceBB"}


def test_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "old.jpg").write_bytes(b"x")
    import pytest

    with pytest.raises(FileExistsError):
        generate(SynthConfig(out=str(tmp_path), per_class=1, size="64x48"))


def test_nfd_names_index_cleanly(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "nfd"), per_class=2, seed=1, size="160x120", nfd=True, jobs=1)
    generate(cfg)
    on_disk = [n for _, _, names in os.walk(cfg.out) for n in names if n.endswith(".jpg")]
    assert on_disk and all(n != unicodedata.normalize("NFC", n) for n in on_disk)
    table, report = aihub.index(cfg.out)
    assert table.num_rows == 14 and not report.missing_images and not report.orphan_images
    truth_ids = set(read_truth(cfg.out).column("image_id").to_pylist())
    assert set(table.column("image_id").to_pylist()) == truth_ids


def _features(img: np.ndarray) -> np.ndarray:
    g = cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.concatenate([g.ravel(), np.abs(cv2.Laplacian(g, cv2.CV_32F)).ravel()])


def _ridge_accuracy(x: np.ndarray, y: np.ndarray, test: np.ndarray) -> float:
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
    x = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    a = x[~test]
    w = np.linalg.solve(a.T @ a + 100 * np.eye(a.shape[1]), a.T @ np.eye(7)[y[~test]])
    return float((np.argmax(x[test] @ w, 1) == y[test]).mean())


def test_expression_is_learnable_from_the_face_and_hardly_from_the_whole_photo(corpus):
    """The property the paper's pipeline rests on: a linear classifier on 24×24 pixels, held-out persons."""
    root, _ = corpus
    rows = [t for t in read_truth(root).to_pylist() if t["written"]]
    faces, wholes = [], []
    for t in rows:
        img = upright(root, t["image_id"])
        x1, y1, x2, y2 = (int(v) for v in t["face_box"])
        faces.append(_features(img[y1:y2, x1:x2]))
        wholes.append(_features(img))
    y = np.array([t["expression"] for t in rows])
    persons = sorted({t["person_id"] for t in rows})
    test = np.array([persons.index(t["person_id"]) % 4 == 0 for t in rows])
    face_acc, whole_acc = _ridge_accuracy(np.array(faces), y, test), _ridge_accuracy(np.array(wholes), y, test)
    assert face_acc >= 0.85 and whole_acc <= 0.4, (face_acc, whole_acc)


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "kemo.data.synth", "--out", str(out), "--per-class", "1",
                          "--size", "160x120", "--encoding", "cp949", "--annot-keys", "faceBB"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "wrote 7 photos, 7 records in 7 label files" in res.stdout
    summary = json.load(open(out / "_synth" / "summary.json", encoding="utf-8"))
    assert summary["config"]["encoding"] == "cp949" and summary["photos"] == 7


def test_texture_makes_photos_weigh_what_real_ones_do_over_the_same_picture():
    look = synth._person(0, 1)
    plain = [synth.render(0, i, i % 7, look, (2000, 1500))["image"] for i in range(2)]
    textured = [synth.render(0, i, i % 7, look, (2000, 1500), texture=True)["image"] for i in range(2)]

    def mb(img):
        return len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]) / 1e6

    for p, t in zip(plain, textured):
        assert 0.2 < mb(p) < 0.4 and 0.55 < mb(t) < 0.8  # ~0.29 MB plain; ~0.66 MB, a real composite's weight
        diff = t.astype(int) - p
        assert abs(diff.mean()) < 1.5 and 5 < diff.std() < 25  # grain around the same picture, not another one


# the default photo as it was before the crowd option existed (cv2 4.x, numpy's PCG64): the demo's Table 5 rests on it
PLAIN_PHOTO_SHA256 = "9c2f2b28badb88244f1a7f58e856610779b7c77f248a9fba8677ad47135fbab2"


def test_without_a_crowd_every_photo_is_drawn_as_before():
    drawn = synth.render(3, 4, 2, synth._person(3, 1), (320, 240))
    assert hashlib.sha256(drawn["image"].tobytes()).hexdigest() == PLAIN_PHOTO_SHA256
    crowded = synth.render(3, 4, 2, synth._person(3, 1), (320, 240), crowd=True)
    assert crowded["face_box"] == drawn["face_box"] and not np.array_equal(crowded["image"], drawn["image"])


def test_a_crowd_adds_small_and_overlapping_faces_and_leaves_the_records_alone(tmp_path):
    from kemo.crop import iou
    from kemo.data.crowd import crowd_faces

    plain = SynthConfig(out=str(tmp_path / "plain"), per_class=2, seed=4, size="640x480", jobs=1)
    crowd = SynthConfig(**{**plain.__dict__, "out": str(tmp_path / "crowd"), "crowd": True})
    generate(plain)
    generate(crowd)
    a, b = tree_digest(plain.out), tree_digest(crowd.out)
    assert {k: v for k, v in a.items() if k.endswith(".json")} == {k: v for k, v in b.items() if k.endswith(".json")}
    assert all(a[k] != b[k] for k in a if k.endswith((".jpg", ".jpeg")))  # the same records, other photos
    before, after = read_truth(plain.out).to_pylist(), read_truth(crowd.out).to_pylist()
    small = pairs = 0
    for p, c in zip(before, after):
        assert c["face_box"] == p["face_box"] and c["distractor_boxes"][:len(p["distractor_boxes"])] == \
            p["distractor_boxes"]  # the crowd comes after the distractor, from its own generator
        faces = [c["face_box"], *c["distractor_boxes"]]
        assert all(0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480 for x1, y1, x2, y2 in faces)
        small += sum(math.sqrt((x2 - x1) * (y2 - y1)) * 320 / 640 < 32 for x1, y1, x2, y2 in faces)
        pairs += sum(iou(f, g) > 0 for i, f in enumerate(faces) for g in faces[i + 1:])
    assert small >= 2 * len(after) and pairs >= len(after) // 2  # at --imgsz 320: 2-6 small faces a photo
    labels = crowd_faces(crowd.out)
    assert labels[after[0]["image_id"]] == {"boxes": after[0]["distractor_boxes"], "width": 640, "height": 480}
    assert crowd_faces(plain.out) is None and crowd_faces(str(tmp_path / "nowhere")) is None


def test_crowd_labels_give_every_face_one_line_and_rewrite_the_same_bytes(tmp_path):
    import pyarrow as pa

    from kemo import storage
    from kemo.data.crowd import add_labels

    storage.write_parquet(pa.Table.from_pylist([{"split": "train", "file": "a", "image_id": "x/a.jpg"},
                                                {"split": "test", "file": "b", "image_id": "x/b.jpg"}]),
                          str(tmp_path / "index.parquet"))
    for split, name in (("train", "a"), ("test", "b")):
        os.makedirs(tmp_path / "labels" / split)
        (tmp_path / "labels" / split / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    faces = {"x/a.jpg": {"boxes": [[0, 0, 40, 20], [-10, 460, 30, 500], [700, 0, 710, 10]], "width": 640,
                         "height": 480}}
    digest = add_labels(str(tmp_path), faces)
    lines = (tmp_path / "labels" / "train" / "a.txt").read_text().splitlines()
    assert lines == ["0 0.5 0.5 0.2 0.2", "0 0.031250 0.020833 0.062500 0.041667",  # the subject's line stays first
                     "0 0.023438 0.979167 0.046875 0.041667"]  # clipped to the frame; the one outside it dropped
    assert (tmp_path / "labels" / "test" / "b.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
    assert add_labels(str(tmp_path), faces) == digest
    assert (tmp_path / "labels" / "train" / "a.txt").read_text().splitlines() == lines
