"""The benchmark job at a tiny size: its report's fields and their consistency, not its speed."""

import json
import os

import pytest

from kemo.benchmark import BenchmarkConfig, decode_methods, run
from tests.photos import jpeg, scene


def test_steady_rate_excludes_start_up():
    from kemo.preprocess import _steady

    assert _steady([(10.0, 16), (11.0, 32), (12.0, 48)]) == 16.0  # start-up before the first shard is not counted
    assert _steady([(1.0, 16), (2.0, 32)]) is None  # too few shards to say


def test_decode_methods_cover_cv2_pil_and_reduced():
    ms = decode_methods([jpeg(scene(640, 480))] * 3, min_side=200)
    assert {"cv2 full", "cv2 reduced 1/2", "PIL full", "PIL draft 1/2", "kemo.decode(min_side=200)"} <= set(ms)
    assert all(v > 0 for v in ms.values())


def test_benchmark_report(ray_local, tmp_path):
    cfg = BenchmarkConfig(stages="preprocess", images=21, size="320x240", detectors="none,annotations",
                          output=str(tmp_path / "b"), crop_size=64, decode_min_side=100)
    report = run(cfg)
    assert report["photos"] == 21 and report["machine"]["cores"] == 2
    for name in ("none", "annotations"):
        d = report["detectors"][name]
        assert d["statuses"] == {"ok": 21}
        assert d["ratio_vs_plain"] == round(d["kemo_photos_per_s"] / d["plain_loop_photos_per_s"], 2)
        steady = d["kemo_steady_photos_per_s"] / d["plain_loop_steady_photos_per_s"]
        assert d["steady_ratio_vs_plain"] == round(steady, 2)
        assert d["kemo_fixed_cost_s"] >= 0
        c = d["stage_ceilings_photos_per_s"]
        assert {"read bytes", "decode", "crop + encode", "all stages on all cores"} <= set(c)
        assert d["slowest_stage"] in c and c["all stages on all cores"] <= c[d["slowest_stage"]]
    saved = json.load(open(os.path.join(cfg.output, "benchmark.json")))
    assert saved["detectors"].keys() == report["detectors"].keys()
    md = open(os.path.join(cfg.output, "benchmark.md")).read()
    assert "| none |" in md and "| annotations |" in md and "cv2 reduced 1/2" in md


def test_training_benchmark_report(ray_local, tmp_path):
    cfg = BenchmarkConfig(stages="train", train_model="resnet18", train_images=48, train_image_size=32,
                          train_epochs=3, train_batch=16, output=str(tmp_path / "t"))
    report = run(cfg)
    assert "detectors" not in report  # only the stages asked for
    t = report["train"]
    assert (t["model"], t["image_size"], t["images"], t["epochs"], t["device"]) == ("resnet18", 32, 48, 3,
                                                                                      "cpu (2 threads)")
    assert t["plain_loop_images_per_s"] == pytest.approx(sum(t["plain_loop_images_per_s_before_after"]) / 2, abs=0.1)
    assert t["ratio_vs_plain"] == round(t["kemo_images_per_s"] / t["plain_loop_images_per_s"], 2)
    assert 0 < t["kemo_epoch_images_per_s"] <= t["kemo_images_per_s"]  # an epoch also validates and checkpoints
    assert 0 <= t["kemo_fixed_cost_s"] < t["kemo_wall_s"]
    md = open(os.path.join(cfg.output, "benchmark.md")).read()
    assert "plain PyTorch loop" in md and f"| {t['kemo_images_per_s']} | {t['ratio_vs_plain']}× |" in md
    with pytest.raises(ValueError, match="unknown stages"):
        run(BenchmarkConfig(stages="train,fly", output=str(tmp_path / "x")))
