"""The label job on videos: a row per sampled frame and a summary per video, sampled by presentation time, faces found
where they are, a frame labelled as the same frame saved as a photo, every bad kind's status, rotated phone video,
views, resume, reruns, a 2-hour video spread over the pool, and the actor on S3 (ranged GETs)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import boto3
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from kemo import label_store, outputs, storage
from kemo import label_videos as lv
from kemo.classes import CLASS_NAMES
from kemo.classifier.checkpoint import read_meta
from kemo.crop import iou
from kemo.label import LabelConfig, calibration, run, snapshot
from kemo.label_photos import LabelPhotos
from kemo.label_store import read_labels, read_videos
from kemo.schema import LABELS, VIDEOS
from kemo.video import frames_at
from tests.galleries import decoded_thumb, parse_gallery
from tests.photos import jpeg
from tests.test_video import face_frames, frame_bomb, half, unknown_codec, write_audio, write_av, write_cv
from tests.tree import snapshot as tree_snapshot

FACE = (100, 40, 210, 190)  # where the drawn face is, in 320×240 frames
UPRIGHT_FACE = (60, 90, 180, 250)  # in the phone video's upright 240×320 frames
VFR = [0, 0.1, 0.15, 0.9, 1.0, 1.05, 2.5, 2.6, 3.7, *(4 + 0.2 * i for i in range(11))]


def face_in(first: int, last: int, box=FACE):
    """The faces of frame i: one at ``box`` from frame ``first`` up to (not with) ``last``."""
    return lambda i: [box] if first <= i < last else []


@pytest.fixture(scope="module")
def checkpoint(small_kemotionnet):
    return small_kemotionnet


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """Videos of every codec and kind, good and bad, beside a photo; rel → the status its summary (or, for a file
    that is no video by content, its photo row) must have."""
    root = tmp_path_factory.mktemp("videos")
    work = tmp_path_factory.mktemp("sources")
    (root / "clips").mkdir()
    (root / "bad").mkdir()
    p = lambda name: str(root / name)  # noqa: E731
    write_cv(p("enter_leave.mp4"), "mp4v", 10, face_frames(60, faces=face_in(20, 40)))  # a face from 2.0 to 4.0 s
    write_cv(p("clips/mjpg.avi"), "MJPG", 10, face_frames(30, faces=face_in(0, 30)))
    write_cv(p("clips/vp8.webm"), "VP80", 10, face_frames(30, faces=face_in(0, 15)))
    write_cv(p("clips/vp9.webm"), "VP90", 10, face_frames(30))  # nobody in it
    write_av(p("vfr.mp4"), VFR, face_frames(len(VFR), faces=face_in(0, len(VFR))))
    upright = face_frames(20, 240, 320, faces=face_in(0, 20, UPRIGHT_FACE))  # portrait, as the phone was held
    write_av(p("phone.mp4"), [i / 10 for i in range(20)], (cv2.rotate(f, cv2.ROTATE_90_COUNTERCLOCKWISE)
                                                           for f in upright), rotation=-90)
    write_cv(p("big.mp4"), "mp4v", 10, face_frames(10, 480, 360))  # over --max-pixels 100000
    whole = write_av(str(work / "whole.mp4"), [i / 10 for i in range(40)], face_frames(40))
    fast = write_av(str(work / "fast.mp4"), [i / 10 for i in range(40)], face_frames(40),
                    options={"movflags": "faststart"})
    half(whole, p("bad/cut before its index.mp4"))
    half(fast, p("bad/cut.mp4"))
    half(write_cv(str(work / "w.webm"), "VP80", 10, face_frames(40)), p("bad/cut.webm"))
    avi = write_cv(str(work / "w.avi"), "MJPG", 10, face_frames(40))
    half(avi, p("bad/header claims 40 frames.avi"))
    unknown_codec(avi, p("bad/codec.avi"))
    write_audio(p("bad/audio only.m4a"))
    frame_bomb(p("bad/bomb.avi"))
    open(p("bad/garbage.mp4"), "wb").write(b"\0\0\0\x18ftypisom\0\0\2\0isomiso2" + os.urandom(20000))
    open(p("bad/zero.mp4"), "wb").write(b"")
    open(p("photo.jpg"), "wb").write(jpeg(next(face_frames(1, faces=face_in(0, 1)))))
    expected = {"enter_leave.mp4": "ok", "clips/mjpg.avi": "ok", "clips/vp8.webm": "ok", "clips/vp9.webm": "no_face",
                "vfr.mp4": "ok", "phone.mp4": "ok", "big.mp4": "too_large", "bad/cut before its index.mp4": "truncated",
                "bad/cut.mp4": "truncated", "bad/cut.webm": "truncated", "bad/header claims 40 frames.avi": "truncated",
                "bad/codec.avi": "unsupported_codec", "bad/audio only.m4a": "empty", "bad/bomb.avi": "too_large",
                "bad/garbage.mp4": "decode_error"}
    return str(root), expected


@pytest.fixture(scope="module")
def labelled(ray_local, folder, checkpoint, tmp_path_factory):
    root, _ = folder
    cfg = LabelConfig(input=root, output=str(tmp_path_factory.mktemp("labels")), checkpoint=checkpoint,
                      detector="haar", crop_size=64, fps=2.0, max_pixels=100_000, batch_size=4, min_confidence=0.1563,
                      gallery=12)
    return cfg, run(cfg)


def frames_of(cfg: LabelConfig, rel: str) -> list[dict]:
    uri = os.path.join(cfg.input, rel)
    return sorted((r for r in read_labels(cfg.output).to_pylist() if r["uri"] == uri), key=lambda r: r["sample"])


def test_every_video_gets_its_status_and_one_summary(folder, labelled):
    root, expected = folder
    cfg, summary = labelled
    assert read_videos(cfg.output).schema.equals(VIDEOS) and read_labels(cfg.output).schema.equals(LABELS)
    videos = {os.path.relpath(v["uri"], root): v for v in read_videos(cfg.output).to_pylist()}
    assert {rel: v["status"] for rel, v in videos.items()} == expected
    assert all((v["error"] is None) == (v["status"] == "ok") for v in videos.values())
    photos = {os.path.relpath(r["uri"], root): r for r in read_labels(cfg.output).to_pylist() if r["sample"] is None}
    assert {rel: r["status"] for rel, r in photos.items()} == {"photo.jpg": "ok", "bad/zero.mp4": "decode_error"}
    assert summary.videos == len(expected) and summary.photos == 2 and summary.listed == summary.processed == 17
    assert summary.video_statuses == {s: list(expected.values()).count(s) for s in set(expected.values())}
    assert summary.frames == sum(v["frames_sampled"] for v in videos.values()) == summary.rows - 2
    assert "frames end at" in videos["bad/cut.webm"]["error"] and "no moov" in videos["bad/cut before its index.mp4"][
        "error"] and "40000×30000" in videos["bad/bomb.avi"]["error"] and "100000" not in videos["big.mp4"]["error"]
    for rel in ("bad/cut.mp4", "bad/cut.webm", "bad/header claims 40 frames.avi"):  # labelled as far as they go
        v = videos[rel]
        assert 0 < v["frames_decoded"] and v["last_time"] < v["duration"] - 1 and v["frames_sampled"] == len(
            frames_of(cfg, rel))
    ok = videos["enter_leave.mp4"]
    assert (ok["container"], ok["codec"], ok["width"], ok["height"], ok["rotation"], ok["duration"], ok["fps"]) == (
        "mov", "mpeg4", 320, 240, 0, 6.0, 10.0)
    assert (ok["frames_decoded"], ok["frames_sampled"], ok["last_time"], ok["segments"]) == (60, 12, 5.9, 1)


def test_frames_are_sampled_by_time_and_faces_found_where_they_are(labelled):
    cfg, _ = labelled
    rows = frames_of(cfg, "enter_leave.mp4")
    assert [(r["sample"], r["frame"], r["time"]) for r in rows] == [(k, 5 * k, k / 2) for k in range(12)]
    assert [r["time"] for r in rows if r["status"] == "ok"] == [2.0, 2.5, 3.0, 3.5]  # it enters at 2.0, leaves at 4.0
    for r in rows:
        assert r["n_faces"] == (1 if r["status"] == "ok" else 0) and (r["orig_width"], r["orig_height"]) == (320, 240)
        if r["status"] == "ok":
            assert iou(r["face_box"], FACE) > 0.4 and r["label_name"] == CLASS_NAMES[r["label"]]
    # variable frame rate: each instant takes the first frame whose time reaches it, within one source frame of it
    rows = frames_of(cfg, "vfr.mp4")
    times = [round(t, 6) for t in VFR]
    assert [(r["frame"], r["time"]) for r in rows] == [
        (k, times[k]) for k in sorted({next(j for j, t in enumerate(times) if t >= i / 2) for i in range(13)})]
    assert all(0 <= r["time"] - r["sample"] / 2 < 1.45 for r in rows) and {r["status"] for r in rows} == {"ok"}
    for rel, faces in (("clips/mjpg.avi", [0, 0.5, 1.0, 1.5, 2.0, 2.5]), ("clips/vp8.webm", [0, 0.5, 1.0]),
                       ("clips/vp9.webm", [])):
        assert [r["time"] for r in frames_of(cfg, rel) if r["status"] == "ok"] == faces, rel


def test_a_rotated_phone_video_is_labelled_upright(labelled):
    cfg, _ = labelled
    (v,) = [v for v in read_videos(cfg.output).to_pylist() if v["uri"].endswith("phone.mp4")]
    assert (v["width"], v["height"], v["rotation"], v["status"]) == (240, 320, 90, "ok")
    rows = frames_of(cfg, "phone.mp4")
    assert len(rows) == 4 and all(r["status"] == "ok" and iou(r["face_box"], UPRIGHT_FACE) > 0.4 for r in rows)


def test_a_frame_is_labelled_as_the_same_frame_saved_as_a_photo(labelled, tmp_path):
    """The same front end and classifier input: a frame saved losslessly labels to the same probabilities; saved
    as a JPEG (quality 95), to the same label, within JPEG's noise of the same confidence."""
    cfg, _ = labelled
    rows = [r for r in frames_of(cfg, "enter_leave.mp4") + frames_of(cfg, "phone.mp4") if r["status"] == "ok"]
    photos = tmp_path / "frames"
    photos.mkdir()
    for k, r in enumerate(rows):
        with open(r["uri"], "rb") as f:
            (image,) = frames_at(f, cfg.max_pixels, [r["time"]])
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(photos / f"{k}.png"), bgr)
        cv2.imwrite(str(photos / f"{k}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    photo_cfg = dataclasses.replace(cfg, input=str(photos))
    labels = LabelPhotos(dataclasses.asdict(photo_cfg), *calibration(cfg, read_meta(cfg.checkpoint)))(
        snapshot(photo_cfg)[0]).to_pylist()
    by_name = {os.path.basename(r["uri"]): r for r in labels}
    for k, r in enumerate(rows):
        png, jpg = by_name[f"{k}.png"], by_name[f"{k}.jpg"]
        assert png["face_box"] == r["face_box"] and png["label"] == r["label"] and png["abstained"] == r["abstained"]
        np.testing.assert_allclose(png["probs"], r["probs"], atol=1e-6)
        assert jpg["label"] == r["label"] and jpg["confidence"] == pytest.approx(r["confidence"], abs=0.02)


def test_abstention_applies_to_frames_and_the_summary_counts_the_rest(labelled):
    cfg, _ = labelled
    rows = [r for r in read_labels(cfg.output).to_pylist() if r["status"] == "ok"]
    # the random classifier's confidences lie in 0.1556-0.1582: the threshold keeps some and abstains on others
    assert {r["abstained"] for r in rows} == {True, False}
    assert all(r["abstained"] == (r["confidence"] < cfg.min_confidence) for r in rows)
    for v in read_videos(cfg.output).to_pylist():
        faces = [r for r in rows if r["uri"] == v["uri"] and r["face"] == 0]
        kept = [r for r in faces if not r["abstained"]]
        assert (v["face_frames"], v["abstained"]) == (len(faces), len(faces) - len(kept)), v["uri"]
        if kept:
            shares = [sum(r["label"] == k for r in kept) / len(kept) for k in range(len(CLASS_NAMES))]
            assert v["shares"] == pytest.approx(shares) and v["dominant"] == CLASS_NAMES[int(np.argmax(shares))]
        else:
            assert v["shares"] is None and v["dominant"] is None


def test_views_show_frames_videos_strips_and_timelines(labelled):
    cfg, summary = labelled
    files = sorted(f["path"] for f in outputs.Output(cfg.output, "labels").committed()["files"])
    assert [f for f in files if not f.startswith(("parts/", "videos/"))] == [
        "_run.json", "config.json", "gallery.html", "labels.csv", "summary.json", "videos.csv"]
    csv = pacsv.read_csv(os.path.join(cfg.output, "labels.csv")).to_pylist()
    assert len(csv) == summary.rows and {"frame", "time", "sample", "p_happy"} <= set(csv[0])
    videos = pacsv.read_csv(os.path.join(cfg.output, "videos.csv")).to_pylist()
    assert len(videos) == summary.videos and {f"share_{c}" for c in CLASS_NAMES} <= set(videos[0])
    page = open(os.path.join(cfg.output, "gallery.html"), encoding="utf-8").read()
    sections = parse_gallery(os.path.join(cfg.output, "gallery.html"))
    framed = [v for v in read_videos(cfg.output).to_pylist() if v["frames_sampled"]]
    assert page.count("<svg") == len(framed)  # a timeline each
    for v in framed:
        title = next(t for t in sections if t.startswith(f"video {'/'.join(v['uri'].split('/')[-2:])} ·"))
        figures = sections[title]["figures"]
        assert len(figures) == min(12, v["face_frames"]) and all(len(f) == 1 for f in figures)
        for f in figures:
            decoded_thumb(f[0])
        assert all(re.fullmatch(r"\d+\.\d s · \w+ \d\.\d\d( \(abstained\))?", t) for t in sections[title]["texts"])
    assert sections["videos: other statuses"]["rows"] == 1 + sum(
        1 for v in read_videos(cfg.output).to_pylist() if not v["frames_sampled"])
    # the photo sections hold the photo only: no frame shown as a photo
    assert sum(len(sections[c]["figures"]) for c in CLASS_NAMES) + len(sections["abstained"]["figures"]) == 1


def test_a_rerun_writes_nothing_and_another_fps_is_refused(labelled):
    cfg, _ = labelled
    before = tree_snapshot(cfg.output)
    assert run(cfg).processed == 0 and tree_snapshot(cfg.output) == before
    with pytest.raises(ValueError, match=r"another setup \(differs in fps\)"):
        run(dataclasses.replace(cfg, fps=1.0))
    assert tree_snapshot(cfg.output) == before


def test_a_killed_run_resumes_to_the_exact_rows_and_changed_or_added_videos_alone_are_labelled(labelled, tmp_path):
    """Killed after a video's frames were written and before its summary: the video is not done, and the rerun ends
    with exactly one row per sampled frame and one summary per video. A replaced video and an added one are labelled
    too, the added one 2 hours long (a frame a minute): its 24 segments are spread over the pool."""
    cfg, first = labelled
    job = dataclasses.replace(cfg, output=str(tmp_path / "out"), gallery=0)
    shutil.copytree(cfg.output, job.output)
    (name,) = outputs.parts(job.output, "videos")
    os.remove(os.path.join(job.output, "_commit.json"))
    summaries = storage.read_parquet(os.path.join(job.output, "videos", name))
    killed = pc.invert(pc.ends_with(summaries.column("uri"), "enter_leave.mp4"))
    label_store.write_videos(summaries.filter(killed), job.output)
    outputs.delete_part(job.output, "videos", name)
    key = lambda r: (r["uri"], r["sample"], r["face"])  # noqa: E731
    before = {key(r): r for r in read_labels(cfg.output).to_pylist()}
    changed, added = os.path.join(cfg.input, "clips", "vp9.webm"), os.path.join(cfg.input, "long.mp4")
    original, stat = open(changed, "rb").read(), os.stat(changed)
    shutil.copyfile(os.path.join(cfg.input, "clips", "mjpg.avi"), changed)
    write_av(added, [60.0 * i for i in range(120)], face_frames(120, 64, 48))
    try:
        summary = run(job)
    finally:
        open(changed, "wb").write(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.remove(added)
    assert summary.processed == 3 and summary.processed_statuses == {"ok": 2, "no_face": 1}
    assert summary.segments == 1 + 1 + 24 and summary.segment_actors >= 2  # the long one spread over the pool
    after = {key(r): r for r in read_labels(job.output).to_pylist()}
    assert len(after) == read_labels(job.output).num_rows == summary.rows  # one row per sampled frame (and face)
    assert summary.videos == first.videos + 1 == read_videos(job.output).num_rows  # one summary per video
    assert sorted(r["frame"] for k, r in after.items() if k[0] == changed) == list(range(0, 30, 5))
    long = sorted((r for k, r in after.items() if k[0] == added), key=lambda r: r["frame"])
    assert [(r["frame"], r["time"], r["sample"]) for r in long] == [(0, 0.0, 0)] + [
        (k, 60.0 * k, 120 * (k - 1) + 1) for k in range(1, 120)]  # each frame the first to reach its instants
    (v,) = [v for v in read_videos(job.output).to_pylist() if v["uri"] == added]
    assert (v["status"], v["frames_decoded"], v["frames_sampled"], v["segments"]) == ("no_face", 120, 120, 24)
    old = {k: (r["status"], r["label"], r["frame"], r["time"]) for k, r in before.items() if k[0] != changed}
    assert {k: (r["status"], r["label"], r["frame"], r["time"]) for k, r in after.items()
            if k[0] not in (changed, added)} == old


def test_the_actor_reads_s3_videos_by_ranged_gets(checkpoint, s3_bucket, moto_endpoint, tmp_path):
    """The job's actor, alone (no Ray), on an S3 prefix: a video over --max-bytes is still sniffed and streamed (a
    photo that size is refused unread), labelled in the call that found it; a long one has its header read and its
    segments left to the second round, which labels them from ranged GETs too."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    short = write_cv(str(tmp_path / "short.mp4"), "mp4v", 10, face_frames(30, faces=face_in(10, 20)))
    long = write_av(str(tmp_path / "long.mp4"), [60.0 * i for i in range(30)], face_frames(30, 64, 48))
    for path in (short, long):
        s3.upload_file(path, s3_bucket, f"in/{os.path.basename(path)}")
    s3.put_object(Bucket=s3_bucket, Key="in/big.jpg", Body=b"\xff\xd8\xff" + bytes(60_000))
    cfg = LabelConfig(input=f"s3://{s3_bucket}/in", output=str(tmp_path / "out"), checkpoint=checkpoint,
                      detector="haar", crop_size=64, fps=2.0, max_bytes=10_000, batch_size=4)
    assert os.path.getsize(short) > cfg.max_bytes
    actor = lv.LabelFiles(dataclasses.asdict(cfg), *calibration(cfg, read_meta(cfg.checkpoint)))
    out = actor(snapshot(cfg)[0]).to_pylist()
    (photos, *videos) = out
    assert [(r["uri"].rsplit("/", 1)[-1], r["status"]) for r in photos["rows"]] == [("big.jpg", "too_large")]
    first = {r["uri"].rsplit("/", 1)[-1]: r for r in videos}
    assert first["short.mp4"]["deferred"] is False and first["short.mp4"]["segments"] == 1
    assert [(x["time"], x["status"]) for x in first["short.mp4"]["rows"]] == [
        (0.0, "no_face"), (0.5, "no_face"), (1.0, "ok"), (1.5, "ok"), (2.0, "no_face"), (2.5, "no_face")]
    deferred = first["long.mp4"]
    assert deferred["deferred"] and deferred["segments"] == 6 and not deferred["rows"] and deferred["etag"]
    (r,) = lv.LabelSegments(dataclasses.asdict(cfg), 1.0, None)(pa.Table.from_pylist(
        [{**deferred, "segment": 5}], schema=lv.SEGMENT)).to_pylist()
    assert (r["status"], r["frames"], [x["time"] for x in r["rows"]]) == (None, 5, [1500.0, 1560.0, 1620.0, 1680.0,
                                                                                  1740.0])
