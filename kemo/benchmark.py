"""What each stage costs on this machine, against a plain per-image loop measured in the same run (DESIGN §6).

    python jobs/benchmark.py [--stages preprocess,train] [--images 300] [--size 2000x1500] [--output DIR]

preprocess: for each detector, kemo's preprocess job (Ray Data, actor pool) against a plain loop (cv2.imread → the
same detector → crop → write a JPEG) over the same generated photos, and every stage measured alone — reading bytes,
decoding, the detector, crop + encode — scaled to all cores for the stages that run in parallel; also decode cost by
method (cv2 vs Pillow, full vs DCT-reduced). train: classifier training images/s of a Ray Train run against a plain
PyTorch loop over the same in-memory tensors, same model, same steps. Writes benchmark.json and benchmark.md.
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

    stages: str = field(default="preprocess,train", metadata={"help": "comma-separated: preprocess, train"})
    images: int = field(default=300, metadata={"help": "photos to process"})
    size: str = field(default="2000x1500", metadata={"help": "generated photo size WxH"})
    detectors: str = field(default="annotations,none,haar", metadata={"help": "comma-separated detectors to run"})
    weights: str | None = field(default=None, metadata={"help": "YOLO weights, needed for the yolo detector"})
    corpus: str | None = field(default=None, metadata={"help": "use this AI-Hub-shaped root instead of generating"})
    output: str = field(default="out/benchmark", metadata={"help": "where benchmark.json and benchmark.md go"})
    crop_size: int = 500
    decode_min_side: int = 1000
    seed: int = 0
    train_model: str = field(default="kemotionnet", metadata={"help": "train: the classifier"})
    train_images: int = field(default=512, metadata={"help": "train: in-memory training images"})
    train_image_size: int = field(default=0, metadata={"help": "train: input side; 0 = 224 on GPU, 64 on CPU"})
    train_epochs: int = field(default=4, metadata={"help": "train: epochs (the first is warm-up, not counted)"})
    train_batch: int = field(default=64, metadata={"help": "train: batch size"})


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


def plain_train(x: np.ndarray, y: np.ndarray, spec: Any, threads: int) -> list[float]:
    """Images/s per epoch of the loop a user writes first: the model, optimiser and in-memory tensors in this process,
    no Ray; each epoch is the same ``train_one_epoch`` (augmentation, steps) that a Ray Train worker runs."""
    import torch

    from kemo.models import create_model
    from kemo.models.train import train_one_epoch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(spec.seed)
        model = create_model(spec.model, num_classes=7).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
        rates = []
        for epoch in range(spec.epochs):
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).numpy()
            generator = torch.Generator(device=device).manual_seed(epoch)
            t0 = time.perf_counter()
            train_one_epoch(model, optimizer, x, y, order, spec, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(_rate(len(y), time.perf_counter() - t0))
    finally:
        torch.set_num_threads(saved)
    return rates


def train_benchmark(cfg: BenchmarkConfig, cores: int, work: str) -> dict[str, Any]:
    """Classifier training: kemo's Ray Train run (one worker holding every core or the GPU, data in the object
    store, validation and a checkpoint every epoch) against :func:`plain_train` on the same tensors. The plain loop
    runs before and after Ray Train and the two are averaged, so drift in the machine's load shows up in both."""
    import ray
    import torch

    from kemo.models.train import TRAIN_STATE, RunSpec, fit

    gpu = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1
    size = cfg.train_image_size or (224 if gpu else 64)
    spec = RunSpec(model=cfg.train_model, epochs=cfg.train_epochs, batch_size=cfg.train_batch, image_size=size)
    rng = np.random.default_rng(cfg.seed)
    x = rng.integers(0, 256, (cfg.train_images, size, size, 3), dtype=np.uint8)  # the speed is content-blind
    y = rng.integers(0, 7, cfg.train_images).astype(np.int64)
    val = (x[: cfg.train_batch], y[: cfg.train_batch])  # one batch: evaluation is part of kemo's epoch, kept small
    steady = slice(1, None)  # the first epoch warms up allocators and kernels
    before = plain_train(x, y, spec, cores)
    t0 = time.perf_counter()
    result = fit((x, y), val, spec, os.path.join(work, "train"), "bench", workers=1, use_gpu=gpu,
                 cpus_per_worker=1 if gpu else cores)
    kemo_wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"Ray Train benchmark run failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    after = plain_train(x, y, spec, cores)
    plain = float(np.mean(before[steady] + after[steady]))
    kemo_steps = float(np.mean([h["train_images_per_s"] for h in history][steady]))
    kemo_epochs = float(np.mean([len(y) / h["epoch_seconds"] for h in history][steady]))
    return {
        "model": spec.model, "image_size": size, "images": len(y), "batch": spec.batch_size, "epochs": spec.epochs,
        "device": "cuda" if gpu else f"cpu ({cores} threads)",
        "plain_loop_images_per_s": round(plain, 1),
        "plain_loop_images_per_s_before_after": [round(float(np.mean(r[steady])), 1) for r in (before, after)],
        "kemo_images_per_s": round(kemo_steps, 1), "ratio_vs_plain": round(kemo_steps / plain, 2),
        # the whole epoch: training, validation on one batch, and the checkpoint written and registered
        "kemo_epoch_images_per_s": round(kemo_epochs, 1), "epoch_ratio_vs_plain": round(kemo_epochs / plain, 2),
        "kemo_wall_s": round(kemo_wall, 1),
        "kemo_fixed_cost_s": round(max(0.0, kemo_wall - sum(h["epoch_seconds"] for h in history)), 1),
    }


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run every measurement; the caller has started Ray. Returns the report written to ``cfg.output``."""
    import ray

    stages = {s.strip() for s in cfg.stages.split(",") if s.strip()}
    unknown = stages - {"preprocess", "train"}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from preprocess, train")
    cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "ray_cpus": cores,
                    "python": platform.python_version()},
        "config": asdict(cfg),
    }
    work = tempfile.mkdtemp(prefix="kemo-bench-")
    try:
        if "preprocess" in stages:
            report.update(preprocess_benchmark(cfg, cores, work))
        if "train" in stages:
            log.info("benchmark: training %s", cfg.train_model)
            report["train"] = train_benchmark(cfg, cores, work)
            log.info("train: %s", report["train"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(cfg.output, exist_ok=True)
    with open(os.path.join(cfg.output, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.output, "benchmark.md"), "w") as f:
        f.write(markdown(report))
    return report


def preprocess_benchmark(cfg: BenchmarkConfig, cores: int, work: str) -> dict[str, Any]:
    """Every detector: kemo's preprocess job against the plain loop, and the stage ceilings."""
    import pyarrow.compute as pc

    from kemo.data import aihub, synth

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
    report: dict[str, Any] = {
        "photos": len(rows), "size": cfg.size,
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
            "kemo_fixed_cost_s": round(max(0.0, kemo_s - n / kemo_steady), 2),  # < 0 is noise
            "stage_ceilings_photos_per_s": ceilings, "slowest_stage": slowest,
            "steady_share_of_slowest_stage": round(kemo_steady / ceilings[slowest], 2),
            "steady_share_of_all_stages_bound": round(kemo_steady / ceilings["all stages on all cores"], 2),
            "statuses": summary["statuses"],
        }
        log.info("%s: %s", name, report["detectors"][name])
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = []
    if "detectors" in report:
        lines += _preprocess_markdown(report)
    if "train" in report:
        t, m = report["train"], report["machine"]
        lines += ["", f"Classifier training: {t['model']} at {t['image_size']}², batch {t['batch']}, {t['images']} "
                  f"in-memory images, {t['epochs']} epochs (the first not counted), {t['device']}, {m['cores']} cores.",
                  "", "| path | images/s | vs plain loop |", "|---|---|---|",
                  f"| plain PyTorch loop (mean of before and after: {t['plain_loop_images_per_s_before_after']}) | "
                  f"{t['plain_loop_images_per_s']} | 1.0× |",
                  f"| kemo, Ray Train: training steps | {t['kemo_images_per_s']} | {t['ratio_vs_plain']}× |",
                  f"| kemo, Ray Train: whole epoch (+ validation, checkpoint) | {t['kemo_epoch_images_per_s']} | "
                  f"{t['epoch_ratio_vs_plain']}× |",
                  "", f"Ray Train's fixed cost (worker group start, data from the object store, shutdown): "
                  f"{t['kemo_fixed_cost_s']} s of {t['kemo_wall_s']} s."]
    return "\n".join(lines).lstrip("\n") + "\n"


def _preprocess_markdown(report: dict[str, Any]) -> list[str]:
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
    return lines
