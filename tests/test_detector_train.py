"""jobs/train_detector.py's library: real ultralytics models from YAML trained on generated photos (CPU)."""

import contextlib
import dataclasses
import hashlib
import os
import socket
import subprocess
import sys

import cv2
import pytest

from kemo import outputs, storage
from kemo.detector.train import KIND, TrainDetectorConfig, photos_to_use, resolve_source, run, split_counts
from kemo.settings import DetectorSettings

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def killing_trainer(monkeypatch, kill):
    """ultralytics' trainer with ``kill`` called at the end of every epoch (after last.pt is written)."""
    from kemo.detector import trainer

    class Killing(trainer.FaceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback("on_fit_epoch_end", kill)

    with monkeypatch.context() as m:
        m.setattr(trainer, "FaceTrainer", Killing)
        yield


def small(**kw) -> TrainDetectorConfig:
    base = {"images": 40, "epochs": 1, "imgsz": 160, "batch": 8, "workers": 0, "device": "cpu"}
    return TrainDetectorConfig(**{**base, **kw})


def test_split_counts_are_the_papers_8_1_1():
    assert split_counts(3500) == (2800, 350, 350)
    assert split_counts(300) == (240, 30, 30)


def test_an_index_smaller_than_images_is_split_as_a_whole():
    boxes = [[10, 10, 50, 50]] * 400 + [None, [0, 0, 0, 0]] * 10  # 400 usable face boxes, 20 unusable
    assert photos_to_use(3500, boxes) == 400 and split_counts(400) == (320, 40, 40)
    assert photos_to_use(300, boxes) == 300


def test_the_source_is_weights_or_a_yaml_never_both_nor_neither(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        resolve_source(small(input="x", output="y"))
    with pytest.raises(ValueError, match="exactly one"):
        resolve_source(small(input="x", output="y", model="yolo11n.yaml", weights="w.pt"))
    with pytest.raises(ValueError, match="neither a file"):
        resolve_source(small(input="x", output="y", model="no-such-model.yaml"))
    with pytest.raises(FileNotFoundError):
        resolve_source(small(input="x", output="y", weights=str(tmp_path / "missing.pt")))
    ours, _ = resolve_source(small(input="x", output="y", model="yolo-face-v2.yaml"))
    theirs, _ = resolve_source(small(input="x", output="y", model="yolo11n.yaml"))
    assert ours.kind == theirs.kind == "model" and ours.sha256 != theirs.sha256
    assert resolve_source(small(input="x", output="y", model="yolo11s.yaml"))[0].sha256 != theirs.sha256  # scale
    with pytest.raises(ValueError, match="only the yolo detector"):
        small(input="x", output="y", model="yolo11n.yaml", detector="haar")
    assert small(input="x", output="y", model="yolo11n.yaml", smoke_test=True).smoke().epochs == 1


def test_trains_from_a_yaml_resumes_after_a_crash_and_commits(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = str(tmp_path / "detector")
    cfg = small(input=root, output=out, model="yolo11n.yaml", epochs=2)  # an AI-Hub root: indexed on the way

    class Killed(Exception):
        pass

    def kill_after_first_epoch(trainer):
        raise Killed

    with pytest.raises(Killed), killing_trainer(monkeypatch, kill_after_first_epoch):
        run(cfg)
    assert not storage.exists(os.path.join(out, "_commit.json"))

    meta = run(cfg)
    assert meta.train.resumed_at_epoch == 1  # continued from last.pt, not from scratch
    epochs = open(os.path.join(out, "work", "runs", "train", "results.csv")).read().strip().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in epochs] == [1, 2]
    manifest = outputs.Output(out, KIND).committed()
    assert {f["path"] for f in manifest["files"]} == {"best.pt", "best.pt.sha256", "meta.json", "table4.md",
                                                      "config.json"}
    best = open(os.path.join(out, "best.pt"), "rb").read()
    sha = hashlib.sha256(best).hexdigest()
    assert open(os.path.join(out, "best.pt.sha256")).read() == f"{sha}  best.pt\n" and meta.weights.sha256 == sha
    assert meta.data.counts == {"train": 32, "val": 4, "test": 4}
    after = meta.metrics.after
    assert meta.metrics.before is None and after.photos == 4 and after.faces == 4
    assert after.max_abs_diff < 1e-9 and 0 <= after.map50_95 <= after.map50 <= 1
    assert set(after.ultralytics_val) == {"map50", "map50_95"}
    table = open(os.path.join(out, "table4.md")).read().splitlines()
    assert table[0] == "| Model | mAP@0.5:0.95 | mAP@0.5 | primary-face recall |"
    assert table[2].startswith("| yolo11n.yaml (untrained") and table[3].startswith("| yolo11n.yaml (trained) | ")

    assert run(cfg) == meta  # committed: nothing is redone
    with pytest.raises(ValueError, match="new --output"):
        run(dataclasses.replace(cfg, epochs=3))

    # killed after training but before the commit: the finished training is reused, not redone
    work = os.path.join(out, "work")
    os.remove(os.path.join(out, "_commit.json"))
    assert run(cfg).train == meta.train
    # killed after ultralytics' last epoch but before trained.json: its stripped last.pt says it finished
    os.remove(os.path.join(out, "_commit.json"))
    os.remove(os.path.join(work, "trained.json"))
    monkeypatch.chdir(tmp_path)  # a fresh ultralytics run would write ./runs
    again = run(cfg)
    assert again.train.resumed_at_epoch is None and again.weights == meta.weights
    assert open(os.path.join(work, "runs", "train", "results.csv")).read().strip().splitlines()[1:] == epochs
    assert not os.path.exists(tmp_path / "runs")
    with pytest.raises(ValueError, match="may not set"):
        run(dataclasses.replace(cfg, train_args='{"save_dir": "/elsewhere"}'))
    with pytest.raises(ValueError, match="JSON object"):
        run(dataclasses.replace(cfg, train_args="[1]"))


def test_killed_after_the_last_epoch_but_before_ultralytics_finished(corpus_index, tmp_path, monkeypatch):
    out = str(tmp_path / "detector")
    cfg = small(input=corpus_index, output=out, model="yolo11n.yaml")

    def kill(trainer):  # last.pt of the final epoch is written, not yet stripped
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), killing_trainer(monkeypatch, kill):
        run(cfg)
    meta = run(cfg)  # ultralytics would refuse to resume a finished run; kemo finishes it instead
    assert meta.train.reused_finished_run is True and meta.train.resumed_at_epoch is None
    outputs.Output(out, KIND).committed()


def test_fine_tunes_face_weights_into_s3_and_the_pipeline_loads_the_result(corpus_index, yolo_weights, s3_bucket,
                                                                              tmp_path):
    from kemo.detector.yolo import YoloDetector

    out = f"s3://{s3_bucket}/detector"
    meta = run(small(input=corpus_index, output=out, weights=yolo_weights, work=str(tmp_path / "work")))
    outputs.Output(out, KIND).committed()
    before, after = meta.metrics.before, meta.metrics.after
    assert before.photos == after.photos == 4 and before.max_abs_diff < 1e-9
    sha = storage.read_bytes(f"{out}/best.pt.sha256").decode().split()[0]
    assert sha == hashlib.sha256(storage.read_bytes(f"{out}/best.pt")).hexdigest() != meta.source.sha256
    assert meta.source.sha256 == hashlib.sha256(open(yolo_weights, "rb").read()).hexdigest()
    assert meta.use == f"jobs/preprocess.py --detector yolo --weights {out}/best.pt --weights-sha256 {sha}"
    table = storage.read_bytes(f"{out}/table4.md").decode().splitlines()
    assert "(before fine-tuning) | " in table[2] and "(fine-tuned) | " in table[3]
    settings = DetectorSettings(weights=f"{out}/best.pt", weights_sha256=sha, imgsz=160, device="cpu")
    assert YoloDetector.from_settings(settings, threads=1).imgsz == 160  # fetched from S3, its hash checked


def test_yolo_face_v2_yaml_trains_an_epoch_offline_and_its_checkpoint_loads_elsewhere(corpus_index, tmp_path,
                                                                                      monkeypatch):
    import requests

    from kemo.detector.yolo import YoloDetector

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args[:3])
        raise OSError("no network in this test")

    monkeypatch.setattr(requests.sessions.Session, "request", no_network)  # ultralytics' font and asset downloads
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = str(tmp_path / "face-v2")
    meta = run(small(input=corpus_index, output=out, model="yolo-face-v2.yaml"))
    assert attempts == []  # nothing tried to download (fonts, AMP-check weights)
    monkeypatch.undo()
    assert meta.metrics.after.photos == 4 and meta.source.name == "yolo-face-v2.yaml"
    best = os.path.join(out, "best.pt")
    detector = YoloDetector(weights=best, imgsz=160, device="cpu")
    frame = cv2.imread(os.path.join(out, "work", "dataset", "images", "test",
                                    sorted(os.listdir(os.path.join(out, "work", "dataset", "images", "test")))[0]),
                       cv2.IMREAD_COLOR_RGB)
    inputs, _ = detector.prepare(frame, (1.0, 1.0))
    faces = detector.detect([inputs], [{}])[0]
    assert faces.boxes.shape[1] == 4 and len(faces.boxes) == len(faces.scores)
    # a fresh interpreter that never imported kemo: the checkpoint names kemo.detector.modules, which registers itself
    code = ("from ultralytics import YOLO; import sys; m = YOLO(sys.argv[1]); "
            "print(sorted({type(x).__name__ for x in m.model.model} & {'MultiSEAM', 'C3RFEM'}))")
    got = subprocess.run([sys.executable, "-c", code, best], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "YOLO_OFFLINE": "1"})
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip().splitlines()[-1] == "['C3RFEM', 'MultiSEAM']"


def test_the_job_script_runs_a_smoke_test(corpus_index, tmp_path):
    out = tmp_path / "job"
    got = subprocess.run([sys.executable, "jobs/train_detector.py", "--input", corpus_index, "--output", str(out),
                          "--model", "yolo11n.yaml", "--smoke-test", "--workers", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert lines[-2].startswith(" after: mAP@0.5 ") and "(4 test photos)" in lines[-2]
    sha = hashlib.sha256((out / "best.pt").read_bytes()).hexdigest()
    assert lines[-1].startswith(f"best.pt sha256 {sha}; trained in ")
    outputs.Output(str(out), KIND).committed()


def test_loss_flags_override_the_preset_and_ablation_names_are_checked():
    from kemo.detector.loss import FACE_V2, STOCK, LossWeights

    assert small(input="x", output="y", model="yolo11n.yaml").loss_weights() == STOCK
    assert small(input="x", output="y", model="yolo11n.yaml", loss="faceV2").loss_weights() == FACE_V2
    assert small(input="x", output="y", model="yolo11n.yaml", loss="faceV2", rep_box=0.0, slide=False
                 ).loss_weights() == LossWeights(nwd=0.2, rep_gt=0.5)
    assert small(input="x", output="y", model="yolo11n.yaml", nwd_weight=0.3).loss_weights() == LossWeights(nwd=0.3)
    with pytest.raises(ValueError, match="choose from stock, faceV2"):
        small(input="x", output="y", model="yolo11n.yaml", loss="repulsion")
    with pytest.raises(ValueError, match="must lie in"):
        small(input="x", output="y", model="yolo11n.yaml", nwd_weight=1.5)
    with pytest.raises(ValueError, match="--ablation nope"):
        small(input="x", output="y", model="yolo11n.yaml", ablation="stock,nope")


def test_the_trainer_carries_its_loss_to_ddp_workers_by_value():
    import cloudpickle

    from kemo.detector.loss import FACE_V2, STOCK
    from kemo.detector.trainer import FaceTrainer

    assert FaceTrainer.with_loss(STOCK) is FaceTrainer and FaceTrainer.loss_weights == STOCK
    trainer = FaceTrainer.with_loss(FACE_V2)
    assert issubclass(trainer, FaceTrainer) and trainer.loss_weights == FACE_V2
    assert cloudpickle.loads(cloudpickle.dumps(trainer)).loss_weights == FACE_V2  # as ultralytics' DDP file holds it


def test_crowd_recall_counts_small_faces_and_overlapping_pairs():
    import numpy as np

    from kemo.detector.ablation import crowd_recall, found
    from kemo.detector.metrics import Predictions

    truth = np.array([[0, 0, 100, 100], [60, 0, 160, 100], [300, 300, 310, 310], [400, 0, 500, 100.0]])
    detections = np.array([[2, 0, 100, 100], [300, 300, 310, 311], [58, 0, 160, 100], [0, 0, 90, 90],
                           [400, 0, 420, 20]])
    photo = Predictions(detections, np.array([0.9, 0.8, 0.1, 0.7, 0.9]), truth)
    # face 1's only detection scores 0.1 < conf; face 0 is claimed once; face 3's detection misses (IoU 0.04)
    assert found(photo, 0.25).tolist() == [True, False, True, False]
    got = crowd_recall([photo], [0.5], 0.25)  # at half scale: faces of side 50, 50, 5, 50 px
    assert (got.small_faces, got.small_recall, got.pairs, got.pair_recall) == (1, 1.0, 1, 0.0)
    assert found(photo, 0.05).tolist() == [True, True, True, False]
    assert crowd_recall([photo], [0.5], 0.05).pair_recall == 1
    empty = crowd_recall([Predictions(np.zeros((0, 4)), np.zeros(0), truth[[3]])], [1.0], 0.25)
    assert (empty.small_recall, empty.pairs, empty.pair_recall) == (None, 0, None)


def test_the_job_trains_faceV2_on_a_generated_crowd_and_reports_the_ablation(tmp_path, monkeypatch):
    """One tiny training through jobs/train_detector.py: every face labelled, the ablation section written, and a
    checkpoint that loads with kemo's loss unimportable (ultralytics strips the criterion from it)."""
    import numpy as np

    from kemo.data.synth import SynthConfig, generate
    from kemo.detector.train import DetectorMeta
    from kemo.detector.yolo import YoloDetector
    from kemo.record import from_dict

    root, out = tmp_path / "crowd", tmp_path / "det"
    generate(SynthConfig(out=str(root), per_class=2, seed=1, size="320x240", crowd=True, jobs=1))
    got = subprocess.run([sys.executable, "jobs/train_detector.py", "--input", str(root), "--output", str(out),
                          "--model", "yolo11n.yaml", "--images", "14", "--epochs", "1", "--imgsz", "64", "--batch",
                          "8", "--workers", "0", "--device", "cpu", "--loss", "faceV2", "--ablation", "faceV2"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip().splitlines()[-2].startswith("            faceV2: mAP@0.5 ")
    meta = from_dict(DetectorMeta, storage.read_json(str(out / "meta.json")))
    assert meta.data.every_face and meta.loss.rep_box == 0.5 and [r.name for r in meta.ablation] == ["faceV2"]
    row = meta.ablation[0]
    assert row.main and row.after == meta.metrics.after and row.crowd.small_faces > 0 and row.seconds_per_epoch > 0
    assert row.cpu_seconds_per_epoch == meta.train.cpu_seconds_per_epoch > 0
    table = (out / "table4.md").read_text().splitlines()
    at = table.index("## Loss ablation")
    assert table[at + 2].startswith("| Loss | terms | mAP@0.5:0.95 | mAP@0.5 | small-face recall | overlapping-pair")
    assert table[at + 4].startswith("| faceV2 (best.pt) | NWD 0.2 + slide + RepGT 0.5 + RepBox 0.5 | ")
    results = open(out / "work" / "runs" / "train" / "results.csv").readline()
    assert "train/rep_loss" in results and "val/rep_loss" in results  # trained and validated with it
    labels = [open(os.path.join(d, f)).read().count("\n") for d, _, fs in os.walk(out / "work" / "dataset" / "labels")
              for f in fs if f.endswith(".txt")]
    assert max(labels) > 3 and sum(labels) > 3 * len(labels)  # every face, not only the subject
    monkeypatch.setitem(sys.modules, "kemo.detector.loss", None)  # unpickling a reference to it would fail
    detector = YoloDetector(weights=str(out / "best.pt"), imgsz=64, device="cpu")
    assert detector.detect([detector.prepare(np.zeros((48, 64, 3), np.uint8), (1.0, 1.0))[0]], [{}])[0].boxes.ndim == 2
