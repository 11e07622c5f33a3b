"""The AI-Hub index on small hand-written JSON (every rule of DESIGN §2) and on generated corpora."""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter

import boto3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemo import outputs, storage
from kemo.classes import UNKNOWN, class_index
from kemo.crop import iou
from kemo.data import aihub, synth
from kemo.data.aihub import IndexConfig, IndexReport, index, load_manifest, run
from kemo.data.labelfile import decode_json
from kemo.data.record import majority, parse_box
from kemo.data.split import assign_splits
from kemo.settings import InputSettings
from tests import hostile

HASH = "a" * 64
HASH2 = "b" * 64


def fname(person: str = HASH, emo: str = "기쁨", n: int = 0, ext: str = "jpg") -> str:
    return f"{person}_여_25_{emo}_실내 & 카페_2020010112{n:04d}.{ext}"


def rec(filename, votes=("기쁨", "기쁨", "기쁨"), boxes=None, key="annot", **extra):
    boxes = boxes or [(100, 50, 300, 310)] * 3
    out = {"filename": filename, "gender": "여", "age": 25, "isProf": "일반인", "faceExp_uploader": "기쁨",
           "bg_uploader": "실내 & 카페"}
    for letter, vote, b in zip("ABC", votes, boxes):
        out[f"{key}_{letter}"] = {"boxes": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]}, "faceExp": vote}
    out.update(extra)
    return out


def make_root(tmp_path, records, *, emo="기쁨", encoding="utf-8", images=None, source="Training"):
    """One label file of ``records`` plus an image file for each name in ``images`` (default: every record)."""
    tag = "TRAIN" if source == "Training" else "VALID"
    label = tmp_path / source / f"[라벨]EMOIMG_{emo}_{tag}" / f"img_emotion_training_data({emo}).json"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_bytes(json.dumps(records, ensure_ascii=False).encode(encoding))
    part = tmp_path / source / f"[원천]EMOIMG_{emo}_{tag}_01"
    part.mkdir(parents=True, exist_ok=True)
    for name in images if images is not None else [r["filename"] for r in records]:
        (part / name).write_bytes(b"\xff\xd8 not decoded by the index")
    return str(tmp_path)


def rows_by_name(table):
    return {os.path.basename(r["image_id"]): r for r in table.to_pylist()}


# --------------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp949", "utf-16"])
def test_label_file_encodings_give_the_same_rows(tmp_path, encoding):
    records = [rec(fname(n=i), votes=("슬픔", "슬픔", "기쁨")) for i in range(3)]
    table, report = index(make_root(tmp_path, records, encoding=encoding))
    assert report.label_files[0]["encoding"] == encoding
    assert table.num_rows == 3
    rows = table.to_pylist()
    assert {r["label"] for r in rows} == {2} and {r["agree_n"] for r in rows} == {2}
    assert rows[0]["background"] == "실내 & 카페" and rows[0]["gender"] == "F"


def test_cp949_is_not_mistaken_for_utf8():
    data = json.dumps([{"filename": "x_기쁨.jpg"}], ensure_ascii=False).encode("cp949")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    parsed, enc = decode_json(data)
    assert enc == "cp949" and parsed[0]["filename"] == "x_기쁨.jpg"


def test_garbage_label_file_is_reported_not_fatal(tmp_path):
    root = make_root(tmp_path, [rec(fname())])
    bad = tmp_path / "Training" / "[라벨]EMOIMG_분노_TRAIN" / "img_emotion_training_data(분노).json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00\xff\xfe garbage {")
    table, report = index(root)
    assert table.num_rows == 1
    errors = [f for f in report.label_files if "error" in f]
    assert len(errors) == 1 and "분노" in errors[0]["path"]


@pytest.mark.parametrize("depth, message", [(100_000, "deeper than Python can parse"), (40, "deeper than 32")])
def test_deeply_nested_label_file_is_reported_not_fatal(tmp_path, depth, message):
    """A label file nested far deeper than any record: a report line, not a RecursionError."""
    root = make_root(tmp_path, [rec(fname())])
    bad = tmp_path / "Training" / "[라벨]EMOIMG_분노_TRAIN" / "img_emotion_training_data(분노).json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"[" * depth + b"]" * depth)
    table, report = index(root)
    assert table.num_rows == 1
    (error,) = [f for f in report.label_files if "error" in f]
    assert message in error["error"] and "분노" in error["path"]


def test_nfd_names_on_disk_and_in_json_are_matched_and_normalised(tmp_path):
    name = fname(emo="기쁨")
    nfd = unicodedata.normalize("NFD", name)
    assert nfd != name
    records = [rec(nfd, votes=[unicodedata.normalize("NFD", "기쁨")] * 3)]
    root = tmp_path / "root"
    label_dir = root / "Training" / unicodedata.normalize("NFD", "[라벨]EMOIMG_기쁨_TRAIN")
    label = label_dir / "img_emotion_training_data.json"
    label.parent.mkdir(parents=True)
    label.write_bytes(json.dumps(records, ensure_ascii=False).encode())
    part = root / "Training" / unicodedata.normalize("NFD", "[원천]EMOIMG_기쁨_TRAIN_01")
    part.mkdir(parents=True)
    (part / nfd).write_bytes(b"x")
    table, report = index(str(root))
    (row,) = table.to_pylist()
    assert row["image_id"] == unicodedata.normalize("NFC", row["image_id"])
    assert row["image_id"].endswith(name) and row["label"] == 0
    assert os.path.exists(row["uri"])  # the uri keeps the bytes of the name on disk
    assert report.orphan_images == [] and report.missing_images == []


# --------------------------------------------------------------------------------------------------- labels


def test_facebb_keys_are_accepted(tmp_path):
    table, _ = index(make_root(tmp_path, [rec(fname(), key="faceBB", votes=("분노", "분노", "분노"))]))
    (row,) = table.to_pylist()
    assert row["label"] == 1 and row["agree_n"] == 3 and row["votes"] == [1, 1, 1]
    assert row["box"] == pytest.approx([100, 50, 300, 310])


@pytest.mark.parametrize("votes, label, agree_n", [
    (["기쁨", "기쁨", "기쁨"], 0, 3),
    (["기쁨", "불안", "기쁨"], 0, 2),
    (["기쁨", "불안", "중립"], UNKNOWN, 0),  # three-way tie
    (["기쁨", "기쁨", "알수없음"], 0, 2),
    (["기쁨", "알수없음", "알수없음"], UNKNOWN, 0),  # one vote is no majority
    (["알수없음", "알수없음", "알수없음"], UNKNOWN, 0),
    (["기쁨", "슬픔", None], UNKNOWN, 0),  # a missing answer is no vote
])
def test_majority_rules(tmp_path, votes, label, agree_n):
    table, _ = index(make_root(tmp_path, [rec(fname(), votes=votes)]))
    (row,) = table.to_pylist()
    assert (row["label"], row["agree_n"]) == (label, agree_n)
    assert row["votes"] == [class_index(v) for v in votes]


def test_two_annotators_tie_is_unknown():
    assert majority([0, 1, UNKNOWN]) == (UNKNOWN, 0)
    assert majority([4, 4]) == (4, 2)


def test_folder_is_not_the_label_and_purity_is_reported(tmp_path):
    records = [rec(fname(n=0)), rec(fname(n=1), votes=("슬픔", "슬픔", "기쁨")),
               rec(fname(n=2), votes=("슬픔", "상처", "기쁨")), rec(fname(n=3))]
    table, report = index(make_root(tmp_path, records))
    assert sorted(r["label"] for r in table.to_pylist()) == [UNKNOWN, 0, 0, 2]
    assert all(r["uploader_label"] == 0 for r in table.to_pylist())
    assert report.folder_purity == {"기쁨": 0.5}


# --------------------------------------------------------------------------------------------------- boxes


def test_consensus_box_is_the_mean_of_agreeing_annotators(tmp_path):
    boxes = [(100, 100, 200, 220), (110, 90, 210, 200), (500, 500, 900, 900)]
    table, _ = index(make_root(tmp_path, [rec(fname(), votes=("기쁨", "기쁨", "슬픔"), boxes=boxes)]))
    assert table.to_pylist()[0]["box"] == pytest.approx([105, 95, 205, 210])


def test_negative_boxes_are_clipped_and_empty_boxes_dropped(tmp_path):
    boxes = [(-20, -10, 200, 220), (0, 0, 0, 0), (20, 10, 220, 240)]
    table, report = index(make_root(tmp_path, [rec(fname(), boxes=boxes)]))
    assert table.to_pylist()[0]["box"] == pytest.approx([10, 5, 210, 230])
    assert report.boxes == {"clipped": 1, "empty": 1, "ok": 1}


def test_unknown_label_still_gets_a_face_box(tmp_path):
    boxes = [(100, 100, 200, 200), (120, 120, 220, 220), (110, 110, 210, 210)]
    table, _ = index(make_root(tmp_path, [rec(fname(), votes=("기쁨", "슬픔", "분노"), boxes=boxes)]))
    row = table.to_pylist()[0]
    assert row["label"] == UNKNOWN and row["box"] == pytest.approx([110, 110, 210, 210])


def test_no_usable_box_gives_null_box(tmp_path):
    boxes = [(0, 0, 0, 0), (-50, -50, -10, -10), (5, 5, 5, 90)]
    table, report = index(make_root(tmp_path, [rec(fname(), boxes=boxes)]))
    assert table.to_pylist()[0]["box"] is None and report.no_box == 1


@pytest.mark.parametrize("raw, box, note", [
    ({"minX": 300, "minY": 310, "maxX": 100, "maxY": 50}, [100, 50, 300, 310], "ok"),  # drawn right-to-left
    ({"minX": "10.5", "minY": "20", "maxX": "30", "maxY": "40"}, [10.5, 20, 30, 40], "ok"),
    ([{"minX": 1, "minY": 2, "maxX": 3, "maxY": 4}], [1, 2, 3, 4], "ok"),
    ({"minX": 1, "minY": 2, "maxX": 3}, None, "malformed"),
    ({"minX": "nan", "minY": 2, "maxX": 3, "maxY": 4}, None, "malformed"),
    (None, None, "missing"),
])
def test_parse_box(raw, box, note):
    got, got_note = parse_box(raw)
    assert got_note == note and (got == pytest.approx(box) if box else got is None)


# --------------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("age, expected",
                         [(31, 31), ("31", 31), ("31세", 31), (31.0, 31), ("모름", None), (None, None)])
def test_age_int_or_string(tmp_path, age, expected):
    table, _ = index(make_root(tmp_path, [rec(fname(), age=age)]))
    assert table.to_pylist()[0]["age"] == expected


def test_metadata_fields(tmp_path):
    table, _ = index(make_root(tmp_path, [rec(fname(), gender="남", isProf="전문인", faceExp_uploader="당황")]))
    row = table.to_pylist()[0]
    assert (row["gender"], row["is_prof"], row["uploader_label"], row["person_id"]) == ("M", True, 4, HASH)
    assert row["source"] == "Training"


def test_keys_are_matched_whatever_their_case(tmp_path):
    r = {"FileName": fname(), "Gender": "남", "isprof": "전문인", "FaceExp_Uploader": "분노",
         "Annot_A": {"Boxes": {"minx": 1, "MINY": 2, "maxX": 30, "MaxY": 40}, "FaceExp": "분노"},
         "FACEBB_B": {"boxes": {"minX": 3, "minY": 4, "maxX": 32, "maxY": 42}, "faceexp": "분노"},
         "annot_C": {"boxes": {"minX": 3, "minY": 4, "maxX": 32, "maxY": 42}, "faceExp": "슬픔"}}
    table, report = index(make_root(tmp_path, [r, {"filename": fname(n=1)}], images=[fname(), fname(n=1)]))
    rows = rows_by_name(table)
    row = rows[fname()]
    assert (row["label"], row["agree_n"], row["votes"], row["gender"], row["is_prof"], row["uploader_label"]) == (
        1, 2, [1, 1, 2], "M", True, 1)
    assert row["box"] == pytest.approx([2, 3, 31, 41])
    assert rows[fname(n=1)]["label"] == UNKNOWN and report.boxes["no_annotators"] == 1


def test_absurd_values_do_not_stop_the_index(tmp_path):
    boxes = [(10, 10, 1e300, 50), (10, 10, 60, 50), (10, 10, 60, 50)]
    table, report = index(make_root(tmp_path, [rec(fname(), boxes=boxes, age=40000), rec(fname(n=1), age="19900101")]))
    rows = rows_by_name(table)
    assert rows[fname()]["box"] == pytest.approx([10, 10, 60, 50]) and rows[fname()]["age"] is None
    assert rows[fname(n=1)]["age"] is None and report.boxes["malformed"] == 1


def test_non_utf8_file_names_are_reported_not_fatal(tmp_path):
    root = make_root(tmp_path, [rec(fname())])
    raw = fname(n=5).encode("cp949")  # as some unzip tools write Korean zips on Linux
    part = os.path.join(root.encode(), b"Training", "[원천]EMOIMG_기쁨_TRAIN_01".encode())
    with open(os.path.join(part, raw), "wb") as f:
        f.write(b"x")
    table, report = index(root)
    assert table.num_rows == 1
    assert report.undecodable_names == [f"Training/[원천]EMOIMG_기쁨_TRAIN_01/{fname(n=5)}"]


def test_entries_that_are_not_files_are_reported_and_never_opened(tmp_path):
    """Links that break or leave the root, a FIFO, a device link, a huge label file: report lines, never rows or
    crashes; a record whose image is such an entry is reported, not indexed."""
    names = [fname(n=i) for i in range(4)]
    root = make_root(tmp_path / "root", [rec(n) for n in names], images=names[:1])
    part = tmp_path / "root" / "Training" / "[원천]EMOIMG_기쁨_TRAIN_01"
    guard = hostile.Untouchable(tmp_path / "secret.fifo")
    try:
        os.symlink("nowhere.jpg", part / names[1])  # dangling
        os.mkfifo(part / names[2])  # a FIFO named like an image
        os.symlink(guard.path, part / names[3])  # outside the root
        os.symlink("/dev/zero", tmp_path / "root" / "zero.jpg")
        hostile.build(tmp_path / "root" / "more", tmp_path / "outside")
        huge = tmp_path / "root" / "Training" / "[라벨]EMOIMG_분노_TRAIN" / "img_emotion_training_data(분노).json"
        huge.parent.mkdir(parents=True)
        huge.write_bytes(b"[" + b" " * 5000 + b"]")
        table, report = index(root, inputs=InputSettings(max_bytes=4096))
        assert table.column("image_id").to_pylist() == [f"Training/[원천]EMOIMG_기쁨_TRAIN_01/{names[0]}"]
        unusable = {r["filename"]: r["status"] for r in report.unusable_images}
        assert unusable == {names[1]: "broken_link", names[2]: "special_file", names[3]: "outside_link"}
        assert report.not_files == {"broken_link": 3, "folder_link": 5, "outside_link": 7, "special_file": 2}
        errors = {r["path"]: r.get("error") for r in report.label_files}
        assert "exceeds the 4096-byte limit" in errors[huge.relative_to(tmp_path / "root").as_posix()]
        assert report.undecodable_names == ["more/한글 사진.jpg"]
        assert "not files (never opened)" in aihub.summarize(report)
    finally:
        assert not guard.close()


def test_root_above_the_release_folders(tmp_path):
    name = fname()
    for source in ("Training", "Validation"):
        make_root(tmp_path / "aihub", [rec(name, votes=("분노",) * 3 if source == "Training" else ("슬픔",) * 3)],
                  source=source)
    table, report = index(str(tmp_path))
    rows = {r["source"]: r for r in table.to_pylist()}
    assert set(rows) == {"Training", "Validation"}
    assert rows["Training"]["image_id"].startswith("aihub/Training/") and rows["Training"]["label"] == 1
    assert rows["Validation"]["image_id"].startswith("aihub/Validation/") and rows["Validation"]["label"] == 2
    assert not report.duplicate_records and not report.orphan_images


def test_person_id_missing_falls_back_to_the_file(tmp_path):
    table, report = index(make_root(tmp_path, [rec("IMG_0001 & 2.jpg")]))
    assert table.to_pylist()[0]["person_id"] == "file:IMG_0001 & 2" and report.no_person_id == 1


# --------------------------------------------------------------------------------------------------- files


def test_missing_images_orphans_bad_and_duplicate_records_are_reported(tmp_path):
    records = [rec(fname(n=0)), rec(fname(n=1)), {"gender": "여"}, "not a record", rec(fname(n=0))]
    images = [fname(n=0), fname(n=2, ext="jpeg")]
    root = make_root(tmp_path, records, images=images)
    junk = tmp_path / "__MACOSX" / "Training"
    junk.mkdir(parents=True)
    (junk / ("._" + fname(n=9))).write_bytes(b"")
    table, report = index(root)
    assert [os.path.basename(r["image_id"]) for r in table.to_pylist()] == [fname(n=0)]
    assert [m["filename"] for m in report.missing_images] == [fname(n=1)]
    assert [os.path.basename(p) for p in report.orphan_images] == [fname(n=2, ext="jpeg")]
    assert [b["error"] for b in report.bad_records] == ["record has no filename", "record is not an object"]
    assert [d["filename"] for d in report.duplicate_records] == [fname(n=0)]


def test_same_file_name_in_two_parts_prefers_the_records_own_release(tmp_path):
    name = fname()
    make_root(tmp_path, [rec(name)], source="Validation")
    other = tmp_path / "Training" / "[원천]EMOIMG_기쁨_TRAIN_02"
    other.mkdir(parents=True)
    (other / name).write_bytes(b"x")
    table, report = index(str(tmp_path))
    assert table.to_pylist()[0]["image_id"].startswith("Validation/")
    assert report.ambiguous_images[0]["candidates"] == 2
    assert len(report.orphan_images) == 1


# --------------------------------------------------------------------------------------------------- split, sample


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=300), st.integers(0, 2**16))
def test_assign_splits_shares_are_exact_to_half_a_person(weights, seed):
    persons = {f"p{i}": w for i, w in enumerate(weights)}
    splits = assign_splits(persons, seed)
    assert set(splits) == set(persons)
    total = sum(weights)
    for name, share in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        got = sum(w for p, w in persons.items() if splits[p] == name)
        assert abs(got - share * total) <= max(weights) + 1e-9
    assert assign_splits(persons, seed) == splits


def test_assign_splits_depends_on_the_seed():
    persons = {f"p{i}": 10 for i in range(100)}
    assert assign_splits(persons, 0) != assign_splits(persons, 1)


def test_split_is_by_person_with_8_1_1_proportions(tmp_path):
    records = []
    for p in range(40):
        person = f"{p:064x}"
        records += [rec(fname(person, n=i)) for i in range(5)]
    table, report = index(make_root(tmp_path, records), seed=7)
    rows = table.to_pylist()
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["person_id"], r["split"]) == r["split"]
    counts = Counter(r["split"] for r in rows)
    assert counts == {"train": 160, "val": 20, "test": 20}  # 40 persons × 5 images: exact
    assert report.splits["train"]["persons"] == 32


def test_balanced_sample_prefers_unanimous_and_reports_shortfall(tmp_path):
    records = [rec(fname(n=i)) for i in range(3)]  # happy, unanimous
    records += [rec(fname(n=10 + i), votes=("기쁨", "기쁨", "슬픔")) for i in range(5)]  # happy, 2 of 3
    records += [rec(fname(n=20 + i), votes=("분노",) * 3) for i in range(2)]  # angry: only 2
    records += [rec(fname(n=30), votes=("기쁨", "슬픔", "분노"))]  # unknown: never sampled
    table, report = index(make_root(tmp_path, records), per_class=4, seed=1)
    rows = table.to_pylist()
    happy = [r for r in rows if r["label"] == 0]
    assert sorted(r["agree_n"] for r in happy) == [2, 3, 3, 3]
    assert all(r["label"] != UNKNOWN for r in rows) and len(rows) == 6
    sample = report.sample.classes
    assert sample["happy"] == {"available": {"3": 3, "2": 5}, "taken": {"3": 3, "2": 1}, "short": 0}
    assert sample["angry"]["short"] == 2 and sample["sad"]["short"] == 4
    assert report.sample.short_classes == ["angry", "sad", "anxious", "embarrassed", "hurt", "neutral"]
    again, _ = index(make_root(tmp_path, records), per_class=4, seed=1)
    assert again.equals(table)


# --------------------------------------------------------------------------------------------------- jobs


def test_run_commits_output_and_rerun_replaces_it(tmp_path):
    root = make_root(tmp_path / "root", [rec(fname(n=i)) for i in range(4)])
    out = str(tmp_path / "out")
    report = run(IndexConfig(root=root, output=out))
    manifest = outputs.Output(out, "index").committed()
    assert {f["path"] for f in manifest["files"]} == {"manifest.parquet", "report.json", "config.json"}
    assert IndexReport.read(out) == report  # report.json reads back typed, as written
    first = load_manifest(out)
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    run(IndexConfig(root=root, output=out))  # the same corpus: nothing written
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == mtimes
    make_root(tmp_path / "root", [rec(fname(n=i)) for i in range(5)])  # the corpus grew: indexed again
    run(IndexConfig(root=root, output=out))
    assert load_manifest(out).num_rows == 5 and first.num_rows == 4
    make_root(tmp_path / "root", [rec(fname(n=i)) for i in range(4)])
    run(IndexConfig(root=root, output=out))
    assert load_manifest(os.path.join(out, "manifest.parquet")).equals(first)
    assert storage.read_json(os.path.join(out, "config.json"))["config"]["root"] == root


def test_smoke_test_reads_one_label_file(tmp_path):
    root = make_root(tmp_path / "root", [rec(fname(n=i)) for i in range(3)])
    report = run(IndexConfig(root=root, output=str(tmp_path / "out"), smoke_test=True))
    assert len(report.label_files) == 1 and load_manifest(str(tmp_path / "out")).num_rows == 3


def test_split_shares_and_an_earlier_kemos_index_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--split needs three"):
        IndexConfig(root="r", output="o", split=(0.9, 0.1))
    root = make_root(tmp_path / "root", [rec(fname())])
    index_dir = str(tmp_path / "index")
    assert aihub.load_or_index(root, index_dir).num_rows == 1
    with pytest.raises(ValueError, match="use a new --output for other inputs"):
        aihub.load_or_index(root, index_dir, seed=1)
    committed = outputs.Output.committed
    monkeypatch.setattr(outputs.Output, "committed", lambda self: {**committed(self), "fingerprint": None})
    with pytest.raises(ValueError, match="written by an earlier kemo: use a new --output"):
        aihub.load_or_index(root, index_dir)


def test_uncommitted_output_is_refused(tmp_path):
    root = make_root(tmp_path / "root", [rec(fname())])
    out = str(tmp_path / "out")
    run(IndexConfig(root=root, output=out))
    os.remove(os.path.join(out, outputs.COMMIT))
    with pytest.raises(FileNotFoundError, match="no committed output"):
        load_manifest(out)


def test_index_job_command_line(tmp_path):
    import subprocess
    import sys
    root = make_root(tmp_path / "root", [rec(fname(n=i)) for i in range(3)])
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "jobs/index.py", "--root", root, "--output", str(out), "--seed", "2"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr
    assert "indexed 3 images" in res.stderr
    assert load_manifest(str(out)).num_rows == 3


# --------------------------------------------------------------------------------------------------- generated


def test_index_reproduces_the_generators_ground_truth(corpus):
    root, cfg = corpus
    truth = {t["image_id"]: t for t in synth.read_truth(root).to_pylist()}
    table, report = index(root)
    rows = table.to_pylist()
    good = {k: t for k, t in truth.items() if t["written"] and t["has_record"]}
    assert {r["image_id"] for r in rows} == set(good)
    assert len(report.missing_images) == cfg.missing
    assert len(report.orphan_images) == cfg.orphans
    agree = 0
    for r in rows:
        t = good[r["image_id"]]
        assert r["person_id"] == t["person_id"]
        assert r["votes"] == t["votes"]
        votes = Counter(v for v in t["votes"] if v != UNKNOWN).most_common()
        expected = votes[0][0] if votes and votes[0][1] >= 2 else UNKNOWN
        assert r["label"] == expected
        assert r["uploader_label"] == t["folder_label"]
        agree += r["label"] == t["expression"]
        assert r["box"] is not None and iou(r["box"], t["face_box"]) >= 0.9, (r["image_id"], r["box"], t)
        # exactly the mean of the agreeing annotators' usable boxes, negatives clipped to 0
        usable = [[max(v, 0.0) for v in b] for v, b in zip(t["votes"], t["annot_boxes"])
                  if (v == r["label"] or r["label"] == UNKNOWN) and b[2] > b[0] and b[3] > b[1]]
        assert r["box"] == pytest.approx(np.mean(usable, axis=0), abs=1e-3)
    assert agree / len(rows) >= 0.9  # the majority recovers the drawn expression; the folder does not always
    assert report.boxes.get("empty", 0) > 0 and report.boxes.get("clipped", 0) > 0


def test_index_of_generated_corpus_is_person_disjoint(corpus):
    root, _ = corpus
    table, report = index(root, seed=5)
    persons: dict[str, set] = {}
    for r in table.to_pylist():
        persons.setdefault(r["person_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in persons.values())
    labelled = sum(v["labelled"] for v in report.splits.values())
    assert abs(report.splits["train"]["labelled"] / labelled - 0.8) < 0.05


def test_index_from_s3_equals_local_index(corpus, s3_bucket, upload_tree):
    root, _ = corpus
    upload_tree(root, "aihub/root")
    # S3 "folder" marker keys, as consoles create them, are not files
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=s3_bucket, Key="aihub/root/Training/", Body=b"")
    local, _ = index(root)
    remote, report = index(f"s3://{s3_bucket}/aihub/root")
    strip = lambda t: t.drop(["uri"])  # noqa: E731
    assert strip(remote).equals(strip(local))
    assert all(u.startswith(f"s3://{s3_bucket}/aihub/root/") for u in remote.column("uri").to_pylist())
    out = f"s3://{s3_bucket}/kemo/index"
    run(IndexConfig(root=f"s3://{s3_bucket}/aihub/root", output=out))
    assert load_manifest(out).drop(["uri"]).equals(strip(local))
    assert storage.read_bytes(remote.column("uri")[0].as_py())[:2] == b"\xff\xd8"
