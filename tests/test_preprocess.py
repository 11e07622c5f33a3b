"""The preprocess job on Ray Data: one row per input whatever it is, upright crops, resume, S3, and each detector."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pyarrow as pa
import pytest
import ray

from kemo import listing, outputs, storage
from kemo.crop import iou
from kemo.data import aihub, synth
from kemo.preprocess import CropPhotos, PreprocessConfig, read_crops, run
from kemo.schema import CROP, MANIFEST
from tests import hostile
from tests.galleries import decoded_thumb, parse_gallery
from tests.photos import bad_inputs, jpeg, scene, unusual_inputs
from tests.tree import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def manifest_of(paths: dict[str, str], boxes: dict[str, list[float]] | None = None) -> pa.Table:
    rows = [{"image_id": name, "uri": uri, "person_id": name, "split": "train", "label": 0, "agree_n": 3,
             "votes": [0, 0, 0], "box": (boxes or {}).get(name)} for name, uri in paths.items()]
    return pa.Table.from_pylist(rows, schema=MANIFEST)


def write_manifest(table: pa.Table, path: str) -> str:
    storage.write_parquet(table, path)
    return path


def decode_crop(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every bad input kind, every unusual format, a photo in each EXIF orientation and a missing file."""
    d = tmp_path_factory.mktemp("zoo")
    paths, boxes, expected = {}, {}, {}
    for name, (data, status) in bad_inputs().items():
        (d / name).write_bytes(data)
        paths[name], expected[name] = str(d / name), status
    for name, (data, _) in unusual_inputs().items():
        (d / name).write_bytes(data)
        paths[name], expected[name] = str(d / name), "ok"
    upright = scene(240, 160)
    for o in range(1, 9):
        name = f"exif{o}.jpg"
        (d / name).write_bytes(jpeg(upright, o))
        paths[name], expected[name] = str(d / name), "ok"
    paths["missing.jpg"], expected["missing.jpg"] = str(d / "missing.jpg"), "read_error"
    for name in paths:
        boxes[name] = [60.0, 30.0, 180.0, 130.0]
    return manifest_of(paths, boxes), expected, upright


def test_every_input_gets_one_row_with_its_status(ray_local, zoo, tmp_path):
    manifest, expected, upright = zoo
    out = str(tmp_path / "out")
    # two batches in flight per actor: the threaded path GPU nodes use, checked for exactly one row each
    summary = run(PreprocessConfig(input=write_manifest(manifest, str(tmp_path / "m.parquet")), output=out,
                                   detector="annotations", crop_size=64, rows_per_shard=10, batch_size=4,
                                   calls_per_actor=2, actors=1))
    rows = read_crops(out).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    for r in rows:
        assert r["status"] == expected[r["image_id"]], (r["image_id"], r["status"], r["error"])
        assert (r["crop"] is not None) == (r["status"] == "ok")
        assert (r["error"] is None) == (r["status"] == "ok")
    assert summary.statuses["ok"] == sum(s == "ok" for s in expected.values())
    sections = parse_gallery(os.path.join(out, "gallery.html"))  # every status its section, listed with its error
    for status, n in summary.statuses.items():
        if status == "ok":
            assert len(sections["ok"]["figures"]) == n and all(len(f) == 1 for f in sections["ok"]["figures"])
        elif status != "no_face":
            assert sections[status]["rows"] == n + 1  # and the header
    shards = [f["path"] for f in outputs.Output(out, "crops").committed()["files"] if f["path"].startswith("shards/")]
    sizes = [storage.read_parquet(os.path.join(out, s)).num_rows for s in shards]
    assert len(shards) == summary.shards >= 3 and max(sizes) <= 10 and sum(sizes) == len(expected)
    # EXIF 1–8: the same upright crop whatever the stored orientation
    reference = decode_crop(next(r["crop"] for r in rows if r["image_id"] == "exif1.jpg")).astype(int)
    for o in range(2, 9):
        r = next(r for r in rows if r["image_id"] == f"exif{o}.jpg")
        assert r["exif_orientation"] == o and (r["orig_width"], r["orig_height"]) == (240, 160)
        assert np.abs(decode_crop(r["crop"]) - reference).mean() < 4, o


def test_a_manifest_naming_special_files_gets_their_statuses_with_bounded_memory(ray_local, tmp_path):
    """A hand-made manifest can name anything: a FIFO, a device, a link to a FIFO outside, a 2 GB sparse file, a
    dangling link, a cp949 name. Each gets its row within seconds; the actor's memory stays near its idle size."""
    _, guard = hostile.build(tmp_path / "in", tmp_path / "outside")
    try:
        uris = {e.rel: e.uri for e in listing.list_input(str(tmp_path / "in"), links="anywhere")}
        uris["cp949.jpg"] = uris[os.fsdecode(hostile.NON_UTF8)]  # image_id is UTF-8 text; the uri keeps the bytes
        expected = {"plain.jpg": "ok", "pipe.jpg": "special_file", "zero.jpg": "special_file",
                    "secret.jpg": "special_file", "sparse.jpg": "too_large", "dangling.jpg": "read_error",
                    "cp949.jpg": "ok"}
        manifest = manifest_of({rel: uris[rel] for rel in expected})
        cfg = PreprocessConfig(input=write_manifest(manifest, str(tmp_path / "m.parquet")), output=str(tmp_path / "o"),
                               detector="none", crop_size=48, batch_size=8)
        udf = CropPhotos(dataclasses.asdict(dataclasses.replace(cfg, decoders=2)))  # the actor's code, in here
        t0 = time.monotonic()
        with hostile.memory_growth() as grew:
            alone = {r["image_id"]: r["status"] for r in udf(manifest).to_pylist()}
        seconds = time.monotonic() - t0
        assert alone == expected and seconds < 10 and grew[0] < 100 << 20, (alone, seconds, grew)
        run(cfg)
        rows = {r["image_id"]: r for r in read_crops(cfg.output).to_pylist()}
        assert {k: r["status"] for k, r in rows.items()} == expected
        assert "2147483648 bytes exceeds the 268435456-byte limit" in rows["sparse.jpg"]["error"]
        assert "character device" in rows["zero.jpg"]["error"] and "FIFO" in rows["secret.jpg"]["error"]
    finally:
        assert not guard.close()


def test_an_input_or_output_that_is_a_file_is_named_as_such(tmp_path):
    a_file = tmp_path / "photo.jpg"
    a_file.write_bytes(jpeg(scene()))
    with pytest.raises(NotADirectoryError, match="--input .* is a file, not a folder"):
        run(PreprocessConfig(input=str(a_file), output=str(tmp_path / "out"), detector="none"))
    with pytest.raises(NotADirectoryError, match="output .* is a file, not a directory"):
        run(PreprocessConfig(input=str(tmp_path), output=str(a_file), detector="none"))
    assert sorted(os.listdir(tmp_path)) == ["photo.jpg"] and a_file.read_bytes() == jpeg(scene())


def test_detector_weights_that_do_not_load_are_refused_before_any_file(tmp_path):
    weights = tmp_path / "face.pt"
    weights.write_bytes(b"PK\x03\x04 half a zip")
    manifest = write_manifest(manifest_of({"a.jpg": str(tmp_path / "a.jpg")}), str(tmp_path / "m.parquet"))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="do not load as yolo face weights") as e:
        run(PreprocessConfig(input=manifest, output=str(tmp_path / "out"), detector="yolo", weights=str(weights)))
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 10
    assert not os.path.exists(tmp_path / "out")


def test_malformed_manifest_boxes_cost_only_their_face(zoo):
    manifest, _, _ = zoo
    rows = manifest.slice(manifest.num_rows - 9, 4).to_pylist()  # EXIF photos: all decodable
    for row, box in zip(rows, ([1.0, 2.0, 3.0], [float("nan"), 0.0, 10.0, 10.0], [50.0, 50.0, 10.0, 10.0], None)):
        row["box"] = box
    udf = CropPhotos(dataclasses.asdict(PreprocessConfig(input="-", output="-", detector="annotations")))
    out = udf(pa.Table.from_pylist(rows, schema=MANIFEST)).to_pylist()
    assert [r["status"] for r in out] == ["no_face"] * 4


def test_udf_alone_equals_udf_inside_ray_data(ray_local, zoo):
    manifest, _, _ = zoo
    cfg = dataclasses.asdict(PreprocessConfig(input="-", output="-", detector="none", crop_size=48, decoders=2))
    alone = CropPhotos(cfg)(manifest)
    inside = pa.concat_tables(ray.data.from_arrow(manifest).map_batches(
        CropPhotos, fn_constructor_kwargs={"cfg": cfg}, batch_size=5, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2)).iter_batches(batch_format="pyarrow",
                                                                                batch_size=None))
    assert alone.schema.equals(CROP) and inside.schema.equals(CROP)
    assert inside.sort_by("image_id").equals(alone.sort_by("image_id"))


def test_annotations_crops_match_the_ground_truth_and_rerun_adds_nothing(ray_local, corpus, tmp_path):
    root, _ = corpus
    out = str(tmp_path / "ann")
    cfg = PreprocessConfig(input=root, output=out, detector="annotations", crop_size=96, rows_per_shard=64)
    first = run(cfg)
    truth = {t["image_id"]: t for t in synth.read_truth(root).to_pylist()}
    rows = read_crops(out).to_pylist()
    assert len(rows) == first.inputs == len({r["image_id"] for r in rows})
    assert {r["status"] for r in rows} == {"ok"} and first.crop_on_annotated_face == 1.0
    for r in rows:
        assert iou(r["face_box"], truth[r["image_id"]]["face_box"]) >= 0.9, r["image_id"]
        assert decode_crop(r["crop"]).shape == (96, 96, 3)
    shards = sorted(f["path"] for f in outputs.Output(out, "crops").committed()["files"])
    before = snapshot(out)
    again = run(cfg)
    assert snapshot(out) == before  # nothing written: every file byte-identical, every mtime unchanged
    assert again.processed == 0 and again.skipped == first.inputs
    assert sorted(f["path"] for f in outputs.Output(out, "crops").committed()["files"]) == shards
    assert read_crops(out).num_rows == len(rows)
    with pytest.raises(ValueError, match="another run"):
        run(dataclasses.replace(cfg, detector="none"))
    with pytest.raises(ValueError, match="needs --weights"):
        run(dataclasses.replace(cfg, detector="yolo", output=str(tmp_path / "y")))
    outputs.Output(os.path.join(out, "index"), "index").uncommit()  # as if indexing had crashed before its commit
    with pytest.raises(ValueError, match="never committed"):
        run(dataclasses.replace(cfg, input=os.path.join(out, "index"), output=str(tmp_path / "other")))


def counting(monkeypatch, modules: tuple, name: str) -> list[int]:
    """Count the calls of ``name`` made in this process, through any of ``modules`` (each binds it)."""
    calls, real = [0], getattr(modules[0], name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, name, counted)
    return calls


def test_yolo_and_haar_run_end_to_end(ray_local, corpus, yolo_weights, tmp_path, monkeypatch):
    from kemo import preprocess
    from kemo.detector import registry, weights

    root, _ = corpus
    index_dir = str(tmp_path / "index")
    aihub.run(aihub.IndexConfig(root=root, output=index_dir, per_class=4))
    for detector in ("yolo", "haar"):
        out = str(tmp_path / detector)
        checks = counting(monkeypatch, (registry, preprocess), "resolve_detector")
        hashes = counting(monkeypatch, (weights,), "sha256_file")
        # conf 0.001: the briefly trained model still proposes boxes, so the crop path runs on real detections;
        # decode_min_side 100: 320×240 photos decode DCT-reduced by 2, so boxes must be scaled back to full size
        cfg = PreprocessConfig(input=index_dir, output=out, detector=detector, weights=yolo_weights, imgsz=224,
                               crop_size=64, conf=0.001, decode_min_side=100)
        summary = run(cfg)
        # the driver checks the detector once and hashes its weights once (verifying their load hashes nothing)
        assert (checks[0], hashes[0]) == (1, int(detector == "yolo"))
        resolved = registry.resolve_detector(cfg)
        checks[0] = hashes[0] = 0
        preprocess.CropPhotos(dataclasses.asdict(resolved)).front.close()  # as an actor loads it
        assert (checks[0], hashes[0]) == (0, int(detector == "yolo"))  # an actor: no check, one hash per load
        monkeypatch.undo()
        rows = read_crops(out).to_pylist()
        assert len(rows) == summary.inputs == 28
        assert {r["detector"] for r in rows} == {detector}
        assert {r["status"] for r in rows} <= {"ok", "no_face"}
        ok = [r for r in rows if r["status"] == "ok"]
        assert len(ok) >= 10, summary
        for r in rows:
            assert (r["n_faces"] > 0) == (r["status"] == "ok")
        for r in ok:
            x1, y1, x2, y2 = r["face_box"]
            assert 0 <= x1 < x2 <= r["orig_width"] and 0 <= y1 < y2 <= r["orig_height"]
            assert decode_crop(r["crop"]).shape == (64, 64, 3)
        # the annotators' votes ride along, as the manifest has them
        votes = {r["image_id"]: r["votes"] for r in aihub.load_manifest(index_dir).to_pylist()}
        assert all(r["votes"] == votes[r["image_id"]] and len(r["votes"]) == 3 for r in rows)
        # the gallery: a thumbnail for each crop shown, each photo without a face whole, and the crops whose face
        # lies away from the annotators' box, as many as there are (at most 48)
        sections = parse_gallery(os.path.join(out, "gallery.html"))
        no_face = [r for r in rows if r["status"] == "no_face"]
        away = [r for r in ok if iou(r["box"], r["face_box"]) < 0.5]
        assert len(sections["ok"]["figures"]) == min(48, len(ok))
        assert len(sections.get("no face", {"figures": []})["figures"]) == min(48, len(no_face))
        assert len(sections["face away from the annotators' box"]["figures"]) == min(48, len(away))
        # ok: the first shards' first crops (their crops read from a shard or two); away: the least overlap first
        assert sections["ok"]["titles"] == [r["image_id"] for r in ok][:48]
        assert sections["face away from the annotators' box"]["titles"] == [
            r["image_id"] for r in sorted(away, key=lambda r: (iou(r["box"], r["face_box"]), r["image_id"]))][:48]
        for name in ("ok", "face away from the annotators' box", "no face"):
            for figure in sections.get(name, {"figures": []})["figures"]:
                assert len(figure) == 1
                decoded_thumb(figure[0])
    haar = read_crops(str(tmp_path / "haar")).to_pylist()
    assert max(r["face_box"][2] for r in haar if r["face_box"]) > 160  # full-resolution frame, not the 1/2 decode
    cfg = storage.read_json(os.path.join(str(tmp_path / "yolo"), "_run.json"))
    assert cfg["weights_sha256"] == __import__("hashlib").sha256(open(yolo_weights, "rb").read()).hexdigest()


def test_s3_in_and_out(ray_local, corpus, s3_bucket, upload_tree):
    root, _ = corpus
    upload_tree(root, "aihub")
    out = f"s3://{s3_bucket}/crops/none"
    summary = run(PreprocessConfig(input=f"s3://{s3_bucket}/aihub", output=out, detector="none", crop_size=32,
                                   per_class=3))
    rows = read_crops(out).to_pylist()
    assert len(rows) == summary.inputs == 21 and {r["status"] for r in rows} == {"ok"}
    assert all(r["uri"].startswith(f"s3://{s3_bucket}/aihub/") for r in rows)
    assert outputs.Output(f"s3://{s3_bucket}/crops/none/index", "index").committed()
    assert decode_crop(rows[0]["crop"]).shape == (32, 32, 3)


def test_transient_failures_are_retried_on_rerun(ray_local, tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(scene()))
    late = tmp_path / "late.jpg"  # not there on the first run: read_error; there on the second
    paths = {"a.jpg": str(good), "late.jpg": str(late)}
    manifest = write_manifest(manifest_of(paths), str(tmp_path / "m.parquet"))
    cfg = PreprocessConfig(input=manifest, output=str(tmp_path / "out"), detector="none", crop_size=32)
    assert run(cfg).statuses == {"ok": 1, "read_error": 1}
    late.write_bytes(jpeg(scene()))
    again = run(cfg)
    assert again.statuses == {"ok": 2} and again.processed == 1 and again.skipped == 1
    assert sorted(read_crops(cfg.output).column("image_id").to_pylist()) == ["a.jpg", "late.jpg"]


def test_duplicate_rows_left_by_a_retried_batch_are_dropped_at_commit(ray_local, tmp_path):
    paths = {}
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(jpeg(scene()))
        paths[name] = str(tmp_path / name)
    cfg = PreprocessConfig(input=write_manifest(manifest_of(paths), str(tmp_path / "m.parquet")),
                           output=str(tmp_path / "out"), detector="none", crop_size=32)
    run(cfg)
    rows = read_crops(cfg.output)
    # a retried batch regrouped differently: a second shard holding a.jpg and b.jpg again, and a stray file of a
    # writer killed before its receipt, as a crashed rerun leaves them (uncommitted)
    extra = rows.filter(pa.compute.is_in(rows.column("image_id"), pa.array(["a.jpg", "b.jpg"])))
    outputs.write_part(cfg.output, "shards", extra, ["x"])
    storage.write_parquet(extra, os.path.join(cfg.output, "shards", outputs.part_name(["y"])))
    outputs.Output(cfg.output, "crops").uncommit()
    again = run(cfg)
    assert again.processed == 0 and again.statuses == {"ok": 3}
    assert sorted(read_crops(cfg.output).column("image_id").to_pylist()) == ["a.jpg", "b.jpg", "c.jpg"]
    # whichever file keeps a row, no file is left behind that the commit does not name
    files = outputs.Output(cfg.output, "crops").committed()["files"]
    committed = {f["path"] for f in files if f["path"].startswith("shards/")}
    assert {f"shards/{n}" for n in os.listdir(os.path.join(cfg.output, "shards"))} == committed
    assert len(committed) == again.shards in (1, 2)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_into_one_output_one_commits_and_the_other_is_refused(where, ray_local, tmp_path, request):
    """A user submits the same job twice: the second is refused at once, naming the first, and writes nothing; the
    first commits an output that reads back with exactly one row per input."""
    paths = {}
    for i in range(24):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(scene(160, 120)))
        paths[f"{i:02d}.jpg"] = str(tmp_path / f"{i}.jpg")
    out = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/crops"
    cfg = PreprocessConfig(input=write_manifest(manifest_of(paths), str(tmp_path / "m.parquet")), output=out,
                           detector="none", crop_size=32, rows_per_shard=4, batch_size=2)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(run(cfg)))
    worker.start()
    try:
        deadline = time.time() + 60
        while not storage.exists(storage.join(out, outputs.LEASE)) and time.time() < deadline and worker.is_alive():
            time.sleep(0.01)
        holder = json.loads(storage.read_bytes(storage.join(out, outputs.LEASE)))
        started = time.perf_counter()
        with pytest.raises(outputs.OutputBusy, match=f"being written by run {holder['run']} .pid {os.getpid()} on "):
            run(cfg)
        assert time.perf_counter() - started < 5  # at once, not after a wait
    finally:
        worker.join(timeout=300)
    (first,) = done
    assert first.inputs == 24 and first.statuses == {"ok": 24}
    rows = read_crops(out).column("image_id").to_pylist()
    assert sorted(rows) == sorted(paths)  # exactly one row per input
    assert not storage.exists(storage.join(out, outputs.LEASE))


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_one_row_per_input(ray_local, tmp_path):
    # 60 photos, tiny shards: the job is killed once a few shards exist, then run again
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(60):
        (d / f"{i}.jpg").write_bytes(jpeg(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)))
        paths[f"{i:02d}.jpg"] = str(d / f"{i}.jpg")
    manifest = write_manifest(manifest_of(paths), str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    # default actor pool (both CPUs): shards must still be written mid-run, since the writer needs no CPU
    args = [sys.executable, "jobs/preprocess.py", "--input", manifest, "--output", str(out), "--detector", "none",
            "--crop-size", "32", "--rows-per-shard", "4", "--batch-size", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            shards = list((out / "shards").glob("*.parquet")) if (out / "shards").exists() else []
            if len(shards) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.send_signal(signal.SIGTERM)  # what `ray job stop` and schedulers send: a clean stop, lease released
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: what was written is kept")
        assert not (out / outputs.LEASE).exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the job and the Ray processes it started is left
        proc.wait()
    assert not (out / "_commit.json").exists()
    done = len(list((out / "shards").glob("*.parquet")))
    assert 3 <= done < 15
    summary = run(PreprocessConfig(input=manifest, output=str(out), detector="none", crop_size=32,
                                   rows_per_shard=4, batch_size=2))
    rows = read_crops(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(paths)
    assert summary.skipped >= 4 * done - 4 and summary.processed + summary.skipped == 60


FULL_DISK = '''
import errno

import kemo.outputs

_write_part = kemo.outputs.write_part


def write_part(out_dir, folder, table, keys):
    if folder == "shards":
        raise OSError(errno.ENOSPC, "No space left on device", f"{out_dir}/{folder}")
    return _write_part(out_dir, folder, table, keys)


kemo.outputs.write_part = write_part
'''


@pytest.mark.slow
def test_a_disk_that_fills_up_under_the_shards_ends_the_run_in_one_line(tmp_path):
    """The disk fills up in the writer actors, where it would: a job run with a sitecustomize first on its PYTHONPATH
    (its embedded Ray's workers inherit the environment) gets ENOSPC from every shard write."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FULL_DISK)
    paths = {f"{i}.jpg": str(tmp_path / f"{i}.jpg") for i in range(6)}
    for p in paths.values():
        open(p, "wb").write(jpeg(scene(160, 120)))
    manifest = write_manifest(manifest_of(paths), str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), ROOT])}
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--input", manifest, "--output", str(out),
                           "--detector", "none", "--crop-size", "32", "--gallery", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: writing a shard: [Errno 28] No space left on device: '{out}/shards'"
    assert "Traceback" not in proc.stderr
    assert not (out / "_commit.json").exists() and not (out / outputs.LEASE).exists()
