"""The benchmark job at a tiny size: its report's fields and their consistency, not its speed."""

import json
import os

import numpy as np
import pytest
import torch

from kemo.benchmark import BenchmarkConfig, run
from kemo.benchmark.config import DEFAULT_STAGES, parse_stages
from kemo.benchmark.decode import decode_methods
from kemo.benchmark.label import ALL_STAGES, label_ceilings
from kemo.benchmark.loops import plain_train
from kemo.benchmark.scaling import worker_counts
from kemo.classifier.checkpoint import save_checkpoint
from kemo.classifier.registry import create_model
from kemo.data import synth
from kemo.label import LabelConfig
from kemo.resources import Node, resolve_resources
from tests.photos import jpeg, scene

PNG = b"\x89PNG\r\n\x1a\n"


def test_steady_rate_excludes_start_up():
    from kemo.preprocess import steady_rate

    assert steady_rate([(10.0, 16), (11.0, 32), (12.0, 48)]) == 16.0  # start-up before the first shard is not counted
    assert steady_rate([(1.0, 16), (2.0, 32)]) is None  # too few shards to say


def test_decode_methods_cover_cv2_pil_and_reduced():
    ms = decode_methods([jpeg(scene(640, 480))] * 3, min_side=200)
    assert {"cv2 full", "cv2 reduced 1/2", "PIL full", "PIL draft 1/2", "kemo.decode(min_side=200)"} <= set(ms)
    assert all(v > 0 for v in ms.values())


def test_stages_and_worker_counts():
    assert parse_stages(("train", "decode")) == ["decode", "train"]  # run in pipeline order, whatever the order asked
    for bad in (("train", "fly"), ()):
        with pytest.raises(ValueError, match="unknown stages"):
            parse_stages(bad)
    assert [worker_counts(n) for n in (1, 2, 3, 6, 16)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4, 6], [1, 2, 4, 8, 16]]


def test_smoke_test_config():
    """--smoke-test shrinks the work, not what runs; list fields are tuples, and a bare str is refused."""
    cfg = BenchmarkConfig(smoke_test=True, images=300, train_model="resnet18", detectors=("haar",)).smoke()
    assert (cfg.images, cfg.size, cfg.train_epochs, cfg.train_images) == (14, "320x240", 2, 32)
    assert (cfg.stages, cfg.detectors, cfg.train_model) == (DEFAULT_STAGES, ("haar",), "resnet18")
    assert BenchmarkConfig(images=300).smoke().images == 300
    with pytest.raises(TypeError, match="tuple of str"):
        BenchmarkConfig(detectors="haar")


def _check_sampled(s, worker):
    """Peak memory was sampled from this run's own workers, ``worker`` among them; no GPU fields on CPU."""
    assert s["samples"] >= 1 and s["peak_rss_mib"] > 0
    assert s["peak_rss_mib"] == max(w["peak_rss_mib"] for w in s["peak_rss_mib_per_worker"])
    for w in s["peak_rss_mib_per_worker"]:  # named by what they were started for, not by the method they ran last
        assert w["name"].startswith("ray::") and w["name"] != "ray::IDLE"
        assert not w["name"].endswith((".submit", ".__init__")), w["name"]
    assert any(worker in w["name"] for w in s["peak_rss_mib_per_worker"]), s["peak_rss_mib_per_worker"]
    assert (s["gpu_utilization_pct_mean"], s["gpu_utilization_pct_max"], s["gpu_memory_used_mib_max"]) == (None,) * 3


def test_benchmark_report(ray_local, tmp_path):
    cfg = BenchmarkConfig(stages=("decode", "detect", "preprocess", "scaling", "label"), images=21, size="320x240",
                          decode_sizes=("320x240", "400x300"), detectors=("annotations", "haar"),
                          output=str(tmp_path / "b"),
                          crop_size=64, decode_min_side=100, label_detector="none", label_image_size=32)
    report = run(cfg)
    assert report["stages"] == ["decode", "detect", "preprocess", "scaling", "label"] and "train" not in report
    seconds = report["seconds"]
    assert list(seconds) == ["photos", *report["stages"], "total"] and seconds["total"] >= sum(
        v for k, v in seconds.items() if k != "total") - 0.5  # each rounded to 0.1 s
    m = report["machine"]
    assert (m["cores"], m["gpu"], m["gpus"]) == (2, "no GPU", 0) and m["cpu"] and m["memory_gib"] > 0

    assert list(report["decode"]) == ["320x240", "400x300"]
    for d in report["decode"].values():
        assert 0 < d["photos"] <= 40 and d["decoder"] == "kemo.decode(min_side=100)"
        assert d["kemo_photos_per_s_one_core"] == round(1000 / d["ms_per_photo_one_core"][d["decoder"]], 2)
        assert d["plain_photos_per_s_one_core"] == round(1000 / d["ms_per_photo_one_core"]["cv2 full, straight to RGB"],
                                                         2)
        assert d["ratio_vs_plain"] == round(d["kemo_photos_per_s_one_core"] / d["plain_photos_per_s_one_core"], 2)
        assert d["kemo_photos_per_s_all_cores"] == round(2 * d["kemo_photos_per_s_one_core"], 2)

    assert list(report["detect"]) == ["haar"]  # annotations looks at no pixels
    h = report["detect"]["haar"]
    assert (h["photos"], h["batch"], h["device"], h["half_precision"], h["threads"]) == (21, 16, "cpu", False, 1)
    assert h["ratio_vs_plain"] == round(h["kemo_images_per_s"] / h["plain_images_per_s"], 2)
    assert h["prepare_ms_per_photo_one_core"] > 0

    assert report["photos"] == 21
    for name in ("annotations", "haar"):
        d = report["detectors"][name]
        assert sum(d["statuses"].values()) == 21
        assert d["ratio_vs_plain"] == round(d["kemo_photos_per_s"] / d["plain_loop_photos_per_s"], 2)
        steady = d["kemo_steady_photos_per_s"] / d["plain_loop_steady_photos_per_s"]
        assert d["steady_ratio_vs_plain"] == round(steady, 2)
        assert d["kemo_fixed_cost_s"] >= 0
        c = d["stage_ceilings_photos_per_s"]
        assert {"read bytes", "decode", "crop + encode", "all stages on all cores"} <= set(c)
        assert ("detect" in c) == (name == "haar")
        assert d["slowest_stage"] in c and c["all stages on all cores"] <= c[d["slowest_stage"]]
        assert d["resources"] == {"actors": 2, "decoders": 1, "gpus_per_actor": 0.0, "batch_size": 16,
                                  "calls_per_actor": 1}
        _check_sampled(d["sampled"], "CropPhotos")
    assert report["detectors"]["annotations"]["statuses"] == {"ok": 21}

    s = report["scaling"]
    assert (s["photos"], s["cpu_detector"], s["gpu"], s["gpu_note"]) == (21, "annotations", None, "no GPU")
    assert [p["workers"] for p in s["cpu"]] == [1, 2]
    for p in s["cpu"]:
        assert (p["resources"]["actors"], p["resources"]["decoders"]) == (p["workers"], 1)
        assert p["speedup"] == round(p["photos_per_s"] / s["cpu"][0]["photos_per_s"], 2)
        assert p["efficiency"] == round(p["speedup"] / p["workers"], 2)
        _check_sampled(p["sampled"], "CropPhotos")
    assert s["cpu"][0]["speedup"] == 1.0
    with open(os.path.join(cfg.output, s["plot"]), "rb") as f:
        assert s["plot"] == "scaling.png" and f.read(8) == PNG

    lab = report["label"]
    assert (lab["detector"], lab["classifier"], lab["image_size"], lab["photos"]) == ("none", "kemotionnet", 32, 21)
    assert lab["statuses"] == {"ok": 21}
    assert lab["ratio_vs_plain"] == round(lab["kemo_photos_per_s"] / lab["plain_loop_photos_per_s"], 2)
    steady = lab["kemo_steady_photos_per_s"] / lab["plain_loop_steady_photos_per_s"]
    assert lab["steady_ratio_vs_plain"] == round(steady, 2)
    assert lab["kemo_fixed_cost_s"] >= 0 and lab["resources"]["actors"] == 2
    _check_sampled(lab["sampled"], "LabelFiles")  # the label job's actor: photos and short clips

    saved = json.load(open(os.path.join(cfg.output, "benchmark.json")))
    commit = json.load(open(os.path.join(cfg.output, "_commit.json")))  # committed through the output store
    assert commit["kind"] == "benchmark" and {f["path"] for f in commit["files"]} == {
        "benchmark.json", "benchmark.md", "scaling.png", "config.json"}
    assert saved["detectors"].keys() == report["detectors"].keys() and saved["scaling"] == report["scaling"]
    md = open(os.path.join(cfg.output, "benchmark.md")).read()
    for part in ("no GPU", "| 320x240 ms | 400x300 ms |", "cv2 reduced 1/2", "| haar | cpu | no | 1 | 16 |",
                 "| annotations |", "| 1 CPU | annotations | 1 × 1, 0 |", "| 2 CPU | annotations | 2 × 1, 0 |",
                 "GPU scaling: no GPU.", "(scaling.png)", "Labelling 21 photos", "| preprocess, haar |",
                 "| scaling, 2 CPU |", "| label |", "MapWorker(MapBatches(LabelFiles))"):
        assert part in md, part


def test_plain_train_channels_last():
    """The channels_last path (timed on GPU only) trains on CPU too, and leaves torch's threads as it found them."""
    import torch

    from kemo.classifier.train import RunSpec

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 7, 8).astype(np.int64)
    threads = torch.get_num_threads()
    rates = plain_train(x, y, RunSpec(model="resnet18", epochs=1, batch_size=4, image_size=32), 1, channels_last=True)
    assert len(rates) == 1 and rates[0] > 0 and torch.get_num_threads() == threads


def test_training_benchmark_report(ray_local, tmp_path):
    cfg = BenchmarkConfig(stages=("train",), train_model="resnet18", train_images=48, train_image_size=32,
                          train_epochs=2, train_batch=16, output=str(tmp_path / "t"))
    report = run(cfg)
    assert "detectors" not in report and "scaling" not in report  # only the stages asked for
    assert list(report["seconds"]) == ["train", "total"]  # no photos are made for training alone
    assert not os.path.exists(os.path.join(cfg.output, "scaling.png"))
    commit = json.load(open(os.path.join(cfg.output, "_commit.json")))
    assert {f["path"] for f in commit["files"]} == {"benchmark.json", "benchmark.md", "config.json"}
    t = report["train"]
    assert (t["model"], t["image_size"], t["images"], t["epochs"], t["device"]) == ("resnet18", 32, 48, 2,
                                                                                      "cpu (2 threads)")
    assert t["plain_loop_images_per_s"] == pytest.approx(sum(t["plain_loop_images_per_s_before_after"]) / 2, abs=0.1)
    assert t["ratio_vs_plain"] == round(t["kemo_images_per_s"] / t["plain_loop_images_per_s"], 2)
    assert 0 < t["kemo_epoch_images_per_s"] <= t["kemo_images_per_s"]  # an epoch also validates and checkpoints
    assert 0 <= t["kemo_fixed_cost_s"] < t["kemo_wall_s"]
    assert (t["precision"], t["plain_loop_channels_last_images_per_s"], t["channels_last_ratio_vs_plain"]) == (
        "fp32", None, None)
    _check_sampled(t["sampled"], "RayTrainWorker")
    md = open(os.path.join(cfg.output, "benchmark.md")).read()
    assert "plain PyTorch loop" in md and f"| {t['kemo_images_per_s']} | {t['ratio_vs_plain']}× |" in md
    assert "channels_last: no GPU" in md and "| train |" in md
    with pytest.raises(ValueError, match="unknown stages"):
        run(BenchmarkConfig(stages=("train", "fly"), output=str(tmp_path / "x")))


def _checkpoint(path) -> str:
    torch.manual_seed(0)
    save_checkpoint(str(path), create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet",
                    {"blocks": [1, 1, 1, 1]}, image_size=32)
    return str(path)


def test_the_label_ceilings_cover_every_phase_of_the_actor(tmp_path):
    rows = []
    for i in range(4):
        img = scene(320, 240)
        synth.draw_face(img, (100, 60, 200, 180), i, synth._person(i, 0), np.random.default_rng(i))
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg(img))
        rows.append({"uri": str(path)})
    cfg = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=_checkpoint(tmp_path / "c"),
                      detector="haar", batch_size=2)
    threads = torch.get_num_threads()
    report = label_ceilings(rows, resolve_resources(cfg, [Node("node", 2, 0)]), {"CPU": 2})
    assert torch.get_num_threads() == threads  # restored for the plain loop
    ms, ceilings = report["ms_per_photo_one_core"], report["ceilings_photos_per_s"]
    assert list(ms) == ["read", "decode", "detect", "crop", "classifier input", "classify", "rows to Arrow"]
    assert all(v >= 0 for v in ms.values()) and report["on_gpu"] == []
    assert set(ceilings) == {*ms, ALL_STAGES}
    assert ceilings[ALL_STAGES] <= min(v for k, v in ceilings.items() if k != ALL_STAGES)
