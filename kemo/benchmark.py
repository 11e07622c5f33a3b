"""What each stage costs on this machine, against a plain per-image loop measured in the same run (DESIGN §6).

    python jobs/benchmark.py [--images 300] [--size 2000x1500] [--detectors annotations,none,haar] [--output DIR]

For each detector: kemo's preprocess job (Ray Data, actor pool) against a plain loop (cv2.imread → the same detector
→ crop → write a JPEG) over the same generated photos, and every stage measured alone — reading bytes, decoding,
the detector, crop + encode — scaled to all cores for the stages that run in parallel. Also decode cost by method
(cv2 vs Pillow, full vs DCT-reduced). Writes benchmark.json and benchmark.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from kemo import storage
from kemo.crop import clip_box, crop_region, crop_square, encode_jpeg, primary_face, resize_whole
from kemo.detect import create_detector
from kemo.image import decode

log = logging.getLogger(__name__)


@dataclass
class BenchmarkConfig:
    """Measure kemo's stages against plain per-image loops on generated photos."""

    images: int = field(default=300, metadata={"help": "photos to process"})
    size: str = field(default="2000x1500", metadata={"help": "generated photo size WxH"})
    detectors: str = field(default="annotations,none,haar", metadata={"help": "comma-separated detectors to run"})
    weights: str | None = field(default=None, metadata={"help": "YOLO weights, needed for the yolo detector"})
    corpus: str | None = field(default=None, metadata={"help": "use this AI-Hub-shaped root instead of generating"})
    output: str = field(default="out/benchmark", metadata={"help": "where benchmark.json and benchmark.md go"})
    crop_size: int = 500
    decode_min_side: int = 1000
    seed: int = 0


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def _time(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return time.perf_counter() - t0


def decode_methods(blobs: list[bytes], min_side: int) -> dict[str, float]:
    """ms per photo on one core for each way of decoding the same JPEGs."""
    cv2.setNumThreads(1)

    def pil_full(b):
        Image.open(io.BytesIO(b)).convert("RGB").load()

    def pil_draft(b):
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
        im.convert("RGB").load()

    methods = {
        "cv2 full, BGR + cvtColor to RGB": lambda b: cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8),
                                                                             cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB),
        "cv2 full": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
        "cv2 full, straight to RGB": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB),
        "cv2 reduced 1/2": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2),
        "cv2 reduced 1/4": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_4),
        "PIL full": pil_full,
        "PIL draft 1/2": pil_draft,
        f"kemo.decode(min_side={min_side})": lambda b: decode(b, min_side=min_side),
    }
    for fn in methods.values():  # warm every path first, so no method pays another's first-use costs
        fn(blobs[0])
    out = {name: round(1000 * _time(fn, blobs) / len(blobs), 2) for name, fn in methods.items()}
    cv2.setNumThreads(-1)
    return out


def plain_loop(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig, out_dir: str) -> float:
    """The loop a user would write first: one photo at a time, cv2.imread → detector → crop → write a JPEG."""
    t0 = time.perf_counter()
    det = create_detector(detector_name, weights=cfg.weights, device="cpu")
    os.makedirs(out_dir, exist_ok=True)
    for i, row in enumerate(rows):
        rgb = cv2.imread(row["uri"], cv2.IMREAD_COLOR_RGB)  # applies EXIF orientation itself
        if rgb is None:
            continue
        h, w = rgb.shape[:2]
        if det.whole_photo:
            crop = resize_whole(rgb, cfg.crop_size)
        else:
            inp, (fx, fy) = det.prepare(rgb, (1.0, 1.0))
            (faces,) = det.detect([inp], [row])
            boxes = [clip_box(b * [fx, fy, fx, fy], w, h) for b in faces.boxes]
            keep = [j for j, b in enumerate(boxes) if b is not None]
            best = primary_face(np.asarray([boxes[j] for j in keep]).reshape(-1, 4), faces.scores[keep])
            if best is None:
                continue
            crop = crop_square(rgb, crop_region(boxes[keep[best]], 0.25), cfg.crop_size)
        with open(os.path.join(out_dir, f"{i}.jpg"), "wb") as f:
            f.write(encode_jpeg(crop))
    return time.perf_counter() - t0


def stage_ceilings(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig,
                   cores: int) -> dict[str, float]:
    """Photos/s of each of kemo's stages alone, through the UDF's own methods: the CPU stages on one core scaled
    to all cores, the detector at the job's batch size."""
    import torch

    from kemo.preprocess import CropPhotos, PreprocessConfig, resolve_resources

    pcfg = resolve_resources(PreprocessConfig(input="-", output="-", detector=detector_name, weights=cfg.weights,
                                              crop_size=cfg.crop_size, decode_min_side=cfg.decode_min_side),
                             {"CPU": cores})
    torch_threads = torch.get_num_threads()
    udf = CropPhotos(asdict(pcfg))  # sets the actor's torch/cv2 threads in this process: restored below
    cv2.setNumThreads(1)
    t_read = _time(lambda r: storage.read_bytes(r["uri"]), rows)
    prepared = []
    t_load = _time(lambda r: prepared.append(udf._load(r)), rows)  # read + decode + detector input
    t0 = time.perf_counter()
    found = []
    for i in range(0, len(rows), pcfg.batch_size):
        found += udf.detector.detect([p.det_input for p in prepared[i:i + pcfg.batch_size]],
                                     rows[i:i + pcfg.batch_size])
    t_detect = time.perf_counter() - t0
    t_finish = _time(lambda k: udf._finish(rows[k], prepared[k], found[k]), range(len(rows)))
    cv2.setNumThreads(-1)
    torch.set_num_threads(torch_threads)  # the plain loop must get torch's default threads, as a user would
    n = len(rows)
    ceilings = {"read bytes": _rate(n, t_read / cores), "decode": _rate(n, (t_load - t_read) / cores),
                "crop + encode": _rate(n, t_finish / cores)}
    if detector_name in ("yolo", "haar"):  # runs on the actor's one CPU per actor, like the CPU stages
        ceilings["detect"] = _rate(n, t_detect / cores)
    # On a CPU-only node every stage shares the same cores, so together they cannot beat this:
    ceilings["all stages on all cores"] = _rate(n, (t_load + t_detect + t_finish) / cores)
    return ceilings


def kemo_job(manifest: str, detector_name: str, cfg: BenchmarkConfig, out_dir: str) -> tuple[float, dict]:
    """Wall time of the whole preprocess job (Ray Data start-up included) into a fresh output."""
    from kemo.preprocess import PreprocessConfig, run

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    # small shards: the job's receipts then time its steady state (summary["steady_photos_per_s"])
    summary = run(PreprocessConfig(input=manifest, output=out_dir, detector=detector_name, weights=cfg.weights,
                                   crop_size=cfg.crop_size, decode_min_side=cfg.decode_min_side, rows_per_shard=16))
    return time.perf_counter() - t0, summary


def _marginal(n_small: int, t_small: float, n: int, t: float) -> float:
    """Photos/s of the photos beyond the first ``n_small``: fixed costs (model load) cancel out."""
    return _rate(n - n_small, t - t_small)


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run every measurement; the caller has started Ray. Returns the report written to ``cfg.output``."""
    import pyarrow.compute as pc
    import ray

    from kemo.data import aihub, synth

    work = tempfile.mkdtemp(prefix="kemo-bench-")
    try:
        corpus = cfg.corpus
        if corpus is None:
            corpus = os.path.join(work, "corpus")
            per_class = -(-cfg.images // 7)
            synth.generate(synth.SynthConfig(out=corpus, per_class=per_class, size=cfg.size, seed=cfg.seed))
        table, _ = aihub.index(corpus)
        table = table.filter(pc.is_valid(table.column("box"))).slice(0, cfg.images)
        manifest = os.path.join(work, "manifest.parquet")
        storage.write_parquet(table, manifest)
        n_small = table.num_rows // 3
        rows = table.to_pylist()
        cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        report: dict[str, Any] = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                        "ray_cpus": cores, "python": platform.python_version()},
            "photos": len(rows), "size": cfg.size, "config": asdict(cfg),
            "decode_ms_per_photo_one_core": decode_methods([storage.read_bytes(r["uri"]) for r in rows[:40]],
                                                           cfg.decode_min_side),
            "detectors": {},
        }
        for name in [d.strip() for d in cfg.detectors.split(",") if d.strip()]:
            log.info("benchmark: %s", name)
            ceilings = stage_ceilings(rows[:60], name, cfg, cores)
            plain_small = plain_loop(rows[:n_small], name, cfg, os.path.join(work, f"plain-{name}"))
            plain_s = plain_loop(rows, name, cfg, os.path.join(work, f"plain-{name}"))
            kemo_s, summary = kemo_job(manifest, name, cfg, os.path.join(work, f"kemo-{name}"))
            n = len(rows)
            plain_rate, kemo_rate = _rate(n, plain_s), _rate(n, kemo_s)
            plain_steady = _marginal(n_small, plain_small, n, plain_s)
            kemo_steady = summary["steady_photos_per_s"] or kemo_rate
            stages = {k: v for k, v in ceilings.items() if k != "all stages on all cores"}
            slowest = min(stages, key=stages.get)
            report["detectors"][name] = {
                "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
                "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
                "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
                "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
                "kemo_fixed_cost_s": round(kemo_s - n / kemo_steady, 2),
                "stage_ceilings_photos_per_s": ceilings, "slowest_stage": slowest,
                "steady_share_of_slowest_stage": round(kemo_steady / ceilings[slowest], 2),
                "steady_share_of_all_stages_bound": round(kemo_steady / ceilings["all stages on all cores"], 2),
                "statuses": summary["statuses"],
            }
            log.info("%s: %s", name, report["detectors"][name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(cfg.output, exist_ok=True)
    with open(os.path.join(cfg.output, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.output, "benchmark.md"), "w") as f:
        f.write(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Preprocessing {report['photos']} generated {report['size']} photos on {m['cores']} cores "
             f"({m['cpu']}, Python {m['python']}). Photos/s end to end (kemo: Ray Data start-up included), and "
             f"steady (plain loop: photos beyond the first third; kemo: between its first and last shard).", "",
             "| detector | plain loop | kemo | kemo / plain | plain, steady | kemo, steady "
             "| kemo / plain, steady | kemo fixed cost | slowest stage alone | kemo steady / it "
             "| all stages on all cores | kemo steady / it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["detectors"].items():
        c = d["stage_ceilings_photos_per_s"]
        lines.append(f"| {name} | {d['plain_loop_photos_per_s']} | {d['kemo_photos_per_s']} | {d['ratio_vs_plain']}× | "
                     f"{d['plain_loop_steady_photos_per_s']} | {d['kemo_steady_photos_per_s']} | "
                     f"{d['steady_ratio_vs_plain']}× | {d['kemo_fixed_cost_s']} s | {d['slowest_stage']}: "
                     f"{c[d['slowest_stage']]} | {d['steady_share_of_slowest_stage']:.0%} | "
                     f"{c['all stages on all cores']} | {d['steady_share_of_all_stages_bound']:.0%} |")
    lines += ["", "Decode, ms per photo on one core:", "", "| method | ms |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["decode_ms_per_photo_one_core"].items()]
    return "\n".join(lines) + "\n"
