"""The benchmark's stages, each kemo's own code against its plain loop (:mod:`kemo.benchmark.loops`), and ``run``.

decode: kemo's decoder alone on one core against the plain loop's cv2 decode, and every way of decoding the same
JPEGs (cv2 vs Pillow, full vs DCT-reduced), at each ``decode_sizes``. detect: each detector that looks at pixels,
alone on decoded photos, at the job's batch size against one photo at a time. preprocess: for each detector, kemo's
preprocess job against the plain loop over the same photos, and each of its stages alone, scaled to all cores.
scaling: kemo's preprocess throughput at 1, 2, 4 … all cores (one decoder per actor) and 1 … all GPUs. train: Ray
Train fed from Ray Data's cache against a plain PyTorch loop over the same tensors in its own memory. label: kemo's
label job against the plain labelling loop. scale: every job at a handful, N and 10×N photos
(:mod:`~kemo.benchmark.scale`). Every Ray run is watched by a :class:`~kemo.benchmark.probes.Sampler`.

The stages reach kemo only through its public names (the jobs' configs and ``run``, ``CropPhotos`` and its front
end, the detector registry), so the benchmark times the code that users run, not a copy of it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from kemo import outputs, storage
from kemo.benchmark.config import BenchmarkConfig, crop_settings, effective, parse_stages
from kemo.benchmark.loops import PLAIN_DECODE, plain_decode, plain_label_loop, plain_preprocess_loop, plain_train
from kemo.benchmark.probes import Sampler, data_path_rates, machine, marginal, rate, time_each
from kemo.benchmark.report import markdown, scaling_png
from kemo.benchmark.scale import scale_benchmark
from kemo.image import decode
from kemo.resources import cluster_nodes, resolve_resources

log = logging.getLogger(__name__)
ALONE = 60  # photos for the timings of one stage alone
LOOKS_AT_PIXELS = ("yolo", "haar")  # the detectors that search the image (annotations reads boxes, none crops all)
REPORT, NOTES, PLOT = "benchmark.json", "benchmark.md", "scaling.png"


# --------------------------------------------------------------------------------------------------- photos


def photos(corpus: str | None, root: str, size: str, n: int, seed: int, texture: bool) -> pa.Table:
    """Manifest rows of the first ``n`` photos with an annotated face: of ``corpus``, or generated at ``size`` under
    ``root``."""
    import pyarrow.compute as pc

    from kemo.data import aihub, synth

    if corpus is None:
        corpus = root
        synth.generate(synth.SynthConfig(out=root, per_class=-(-n // 7), size=size, seed=seed, texture=texture))
    table, _ = aihub.index(corpus)
    return table.filter(pc.is_valid(table.column("box"))).slice(0, n)


def photo_folder(rows: list[dict[str, Any]], folder: str) -> str:
    """The photos as one flat folder, which is what the label job takes (hard links where the file system allows)."""
    os.makedirs(folder)
    for i, r in enumerate(rows):
        dst = os.path.join(folder, f"{i:05d}{os.path.splitext(r['uri'])[1]}")
        try:
            os.link(r["uri"], dst)
        except OSError:  # another file system
            shutil.copyfile(r["uri"], dst)
    return folder


# --------------------------------------------------------------------------------------------------- decode


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
        PLAIN_DECODE: plain_decode,
        "cv2 reduced 1/2": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2),
        "cv2 reduced 1/4": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_4),
        "PIL full": pil_full,
        "PIL draft 1/2": pil_draft,
        f"kemo.decode(min_side={min_side})": lambda b: decode(b, min_side=min_side),
    }
    for fn in methods.values():  # warm every path first, so no method pays another's first-use costs
        fn(blobs[0])
    out = {name: round(1000 * time_each(fn, blobs) / len(blobs), 2) for name, fn in methods.items()}
    cv2.setNumThreads(-1)
    return out


def decode_benchmark(cfg: BenchmarkConfig, rows: list[dict[str, Any]], work: str, cores: int) -> dict[str, Any]:
    """kemo's decoder (at the yolo/haar decode setting) on one core against the plain loop's cv2 decode, and every
    decode method, at each size: the first 40 of the run's photos at ``size``, 14 generated ones at other sizes."""
    sizes = ["corpus"] if cfg.corpus else list(cfg.decode_sizes or (cfg.size,))
    kemo_name = f"kemo.decode(min_side={cfg.decode_min_side})"
    out = {}
    for size in sizes:
        sample = rows if size in (cfg.size, "corpus") else \
            photos(None, os.path.join(work, f"decode-{size}"), size, 14, cfg.seed, cfg.texture).to_pylist()
        ms = decode_methods([storage.read_bytes(r["uri"]) for r in sample[:40]], cfg.decode_min_side)
        kemo, plain = round(1000 / ms[kemo_name], 2), round(1000 / ms[PLAIN_DECODE], 2)
        out[size] = {"photos": len(sample[:40]), "decoder": kemo_name, "kemo_photos_per_s_one_core": kemo,
                     "plain_photos_per_s_one_core": plain, "ratio_vs_plain": round(kemo / plain, 2),
                     "kemo_photos_per_s_all_cores": round(kemo * cores, 2), "ms_per_photo_one_core": ms}
    return out


# --------------------------------------------------------------------------------------------------- stages alone


@contextlib.contextmanager
def alone(detector_name: str, cfg: BenchmarkConfig) -> Iterator[tuple[Any, Any]]:
    """(kemo's preprocess UDF built in this process as an actor builds it, its resolved config), its CPU stages held
    to one core; torch's and OpenCV's threads are restored after, since the plain loop must get their defaults."""
    import torch

    from kemo.preprocess import CropPhotos, PreprocessConfig

    pcfg = resolve_resources(PreprocessConfig(input="-", output="-", detector=detector_name, weights=cfg.weights,
                                              **crop_settings(cfg)), cluster_nodes())
    torch_threads = torch.get_num_threads()
    udf = CropPhotos(asdict(pcfg))  # its front end sets the actor's torch/cv2 threads in this process
    cv2.setNumThreads(1)
    try:
        yield udf, pcfg
    finally:
        udf.front.pool.shutdown()
        cv2.setNumThreads(-1)
        torch.set_num_threads(torch_threads)


def detect_all(detector: Any, prepared: list[Any], rows: list[dict[str, Any]], batch: int) -> tuple[list, float]:
    """The detector's faces for every prepared photo, in batches of ``batch``, and the seconds they took after one
    warm-up batch (lazy set-up, cuDNN's algorithm search)."""
    inputs = [p.det_input for p in prepared]
    detector.detect(inputs[:batch], rows[:batch])
    found: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch):
        found += detector.detect(inputs[i:i + batch], rows[i:i + batch])
    return found, time.perf_counter() - t0


def detect_alone(name: str, cfg: BenchmarkConfig, rows: list[dict[str, Any]], cluster: dict[str, float]
                 ) -> dict[str, Any]:
    """One detector alone on ``rows`` decoded as kemo decodes them: images/s at the job's batch size against one
    photo at a time, same device and threads; and its input preparation on one core."""
    import torch

    with alone(name, cfg) as (udf, pcfg):
        front = udf.front
        det = front.detector
        prepared = [front.load(r) for r in rows]  # read + decode + detector input
        keep = [i for i, p in enumerate(prepared) if p.decoded is not None]
        prepared, sample = [prepared[i] for i in keep], [rows[i] for i in keep]
        t_prepare = time_each(lambda p: det.prepare(p.decoded.image, p.decoded.factors), prepared)
        _, t_batch = detect_all(det, prepared, sample, pcfg.batch_size)
        _, t_one = detect_all(det, prepared, sample, 1)
        threads = torch.get_num_threads() if name == "yolo" else cv2.getNumThreads()  # as timed
    n = len(prepared)
    kemo, plain = rate(n, t_batch), rate(n, t_one)
    return {"photos": n, "batch": pcfg.batch_size, "device": getattr(det, "device", "cpu"),
            "half_precision": bool(getattr(det, "half", False)), "threads": threads,
            "kemo_images_per_s": kemo, "plain_images_per_s": plain, "ratio_vs_plain": round(kemo / plain, 2),
            "prepare_ms_per_photo_one_core": round(1000 * t_prepare / n, 2)}


def detect_benchmark(cfg: BenchmarkConfig, rows: list[dict[str, Any]], cluster: dict[str, float]) -> dict[str, Any]:
    """Each detector that looks at pixels (yolo, haar), alone on the first photos: :func:`detect_alone`."""
    out = {}
    for name in [d for d in cfg.detectors if d in LOOKS_AT_PIXELS]:
        out[name] = detect_alone(name, cfg, rows[:ALONE], cluster)
        log.info("detect %s: %s", name, out[name])
    return out


def stage_ceilings(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig,
                   cluster: dict[str, float]) -> dict[str, float]:
    """Photos/s of each of kemo's stages alone, through the UDF's own methods: the CPU stages on one core scaled
    to all cores, the detector at the job's batch size (one per core on CPU, one per GPU on GPU)."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    with alone(detector_name, cfg) as (udf, pcfg):
        front = udf.front
        t_read = time_each(lambda r: storage.read_bytes(r["uri"]), rows)
        prepared: list[Any] = []
        t_load = time_each(lambda r: prepared.append(front.load(r)), rows)  # read + decode + detector input
        found, t_detect = detect_all(front.detector, prepared, rows, pcfg.batch_size)
        t_finish = time_each(lambda k: udf.finish(rows[k], prepared[k], found[k]), range(len(rows)))
    on_gpu = str(getattr(front.detector, "device", "cpu")).startswith("cuda")
    n = len(rows)
    ceilings = {"read bytes": rate(n, t_read / cores), "decode": rate(n, (t_load - t_read) / cores),
                "crop + encode": rate(n, t_finish / cores)}
    if detector_name in LOOKS_AT_PIXELS:
        ceilings["detect"] = rate(n, t_detect / (gpus if on_gpu else cores))
    # Every CPU stage shares the same cores, so together they cannot beat this (a GPU detector runs beside them):
    ceilings["all stages on all cores"] = rate(n, (t_load + t_finish + (0 if on_gpu else t_detect)) / cores)
    return ceilings


# --------------------------------------------------------------------------------------------------- preprocess


def resources_of(cfg: Any) -> dict[str, Any]:
    """A resolved job config's actor-pool knobs, as the report shows them."""
    return {k: getattr(cfg, k) for k in ("actors", "decoders", "gpus_per_actor", "batch_size", "calls_per_actor")}


def kemo_job(manifest: str, detector_name: str, cfg: BenchmarkConfig, out_dir: str, **resources: Any
             ) -> dict[str, Any]:
    """The whole preprocess job into a fresh output: its wall time (Ray Data start-up included), summary, resolved
    resources and what was sampled of its workers. ``resources``: PreprocessConfig's actors, decoders, ..."""

    from kemo.preprocess import PreprocessConfig
    from kemo.preprocess import run as preprocess

    shutil.rmtree(out_dir, ignore_errors=True)
    # small shards: the job's receipts then time its steady state (summary["steady_photos_per_s"])
    # no gallery: the plain loop writes none (its cost is fixed, a capped page; the scale stage's jobs keep it)
    pcfg = PreprocessConfig(input=manifest, output=out_dir, detector=detector_name, weights=cfg.weights,
                            **crop_settings(cfg), rows_per_shard=16, gallery=0, **resources)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = preprocess(pcfg)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "summary": summary, "sampled": sampler.report(),
            "resources": resources_of(resolve_resources(pcfg, cluster_nodes()))}


def preprocess_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]],
                         manifest: str) -> dict[str, Any]:
    """Every detector: kemo's preprocess job against the plain loop, and the stage ceilings."""
    n, n_small = len(rows), len(rows) // 3
    report: dict[str, Any] = {"photos": n, "size": cfg.size, "detectors": {}}
    for name in cfg.detectors:
        log.info("benchmark: preprocess with %s", name)
        ceilings = stage_ceilings(rows[:ALONE], name, cfg, cluster)
        with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
            plain_s, plain_small = plain_preprocess_loop(rows, name, cfg.weights, cfg,
                                                         os.path.join(work, f"plain-{name}"))
        job = kemo_job(manifest, name, cfg, os.path.join(work, f"kemo-{name}"))
        summary = job["summary"]
        plain_rate, kemo_rate = rate(n, plain_s), rate(n, job["seconds"])
        plain_steady = marginal(n_small, plain_small, n, plain_s)
        kemo_steady = summary["steady_photos_per_s"] or kemo_rate
        stages = {k: v for k, v in ceilings.items() if k != "all stages on all cores"}
        slowest = min(stages, key=stages.get)
        report["detectors"][name] = {
            "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
            "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
            "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
            "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
            "kemo_fixed_cost_s": round(max(0.0, job["seconds"] - n / kemo_steady), 2),  # < 0 is noise
            "stage_ceilings_photos_per_s": ceilings, "slowest_stage": slowest,
            "steady_share_of_slowest_stage": round(kemo_steady / ceilings[slowest], 2),
            # on CPU "all stages on all cores" is the least ceiling; with a GPU detector the bound is the lesser of
            # it and the detector's
            "steady_share_of_all_stages_bound": round(kemo_steady / min(ceilings.values()), 2),
            "statuses": summary["statuses"], "resources": job["resources"], "sampled": job["sampled"],
        }
        log.info("%s: %s", name, report["detectors"][name])
    return report


# --------------------------------------------------------------------------------------------------- scaling


def worker_counts(n: int) -> list[int]:
    """1, 2, 4 … below ``n``, then ``n``: every count on a small node, few runs on a large one."""
    counts = [1]
    while counts[-1] * 2 < n:
        counts.append(counts[-1] * 2)
    return counts + [n] if n > 1 else counts


def scaling_points(jobs: list[tuple[int, dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    points = []
    for workers, job in jobs:
        steady = job["summary"]["steady_photos_per_s"]
        points.append({"workers": workers, "photos_per_s": steady or rate(n, job["seconds"]), "steady": bool(steady),
                       "photos_per_s_end_to_end": rate(n, job["seconds"]), "resources": job["resources"],
                       "sampled": job["sampled"]})
    for p in points:
        p["speedup"] = round(p["photos_per_s"] / points[0]["photos_per_s"], 2)
        p["efficiency"] = round(p["speedup"] / p["workers"], 2)
    return points


def scaling_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, manifest: str, n: int
                      ) -> dict[str, Any]:
    """kemo's preprocess throughput (steady where the run is long enough to tell) on 1 … all cores, one actor with
    one decoder per core and no GPU; then on 1 … all GPUs with yolo, one actor per GPU with its default decoders.
    A smoke test runs one worker and all of them only."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))

    def counts(k: int) -> list[int]:
        return sorted({1, k}) if cfg.smoke_test else worker_counts(k)

    name = cfg.scaling_detector
    cpu = [(k, kemo_job(manifest, name, cfg, os.path.join(work, f"scale-cpu-{k}"), actors=k, decoders=1,
                        gpus_per_actor=0)) for k in counts(cores)]
    gpu, note = None, None
    if not gpus:
        note = "no GPU"
    elif not cfg.weights:
        note = "needs --weights: the GPU runs use yolo"
    else:
        gpu = scaling_points([(k, kemo_job(manifest, "yolo", cfg, os.path.join(work, f"scale-gpu-{k}"), actors=k,
                                           gpus_per_actor=1)) for k in counts(gpus)], n)
    return {"photos": n, "cpu_detector": name, "cpu": scaling_points(cpu, n), "gpu_detector": "yolo", "gpu": gpu,
            "gpu_note": note}


# --------------------------------------------------------------------------------------------------- train


def train_benchmark(cfg: BenchmarkConfig, cores: int, work: str) -> dict[str, Any]:
    """Classifier training: kemo's Ray Train run (one worker holding every core or the GPU, its photos streamed from
    Ray Data with the cache, ``--cache memory``; validation and a checkpoint every epoch) against :func:`plain_train`,
    the in-memory loop, on the same tensors; and the data path alone (the cached split through a worker's local
    shuffle and ``iter_torch_batches``, in this process, no model) against the plain loop's rate (the model alone),
    so the report says whether training is data-bound. The plain loop
    runs before and after Ray Train and the two are averaged, so drift in the machine's load shows up in both. On a
    GPU the plain loop runs once more with channels_last (kemo's Ray Train loop has no such option)."""
    import ray
    import torch

    from kemo.classifier.data import arrays_dataset
    from kemo.classifier.train import TRAIN_STATE, RunSpec, fit

    gpu = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1
    size = cfg.train_image_size or (224 if gpu else 64)
    spec = RunSpec(model=cfg.train_model, epochs=cfg.train_epochs, batch_size=cfg.train_batch, image_size=size)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.train_images or (8192 if gpu else 512)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # the speed is content-blind
    y = rng.integers(0, 7, n).astype(np.int64)
    steady = slice(1, None)  # the first epoch warms up allocators and kernels
    train = arrays_dataset(x, y).materialize()  # what --cache memory hands Ray Train: blocks in the object store
    # one batch: evaluation is part of kemo's epoch, kept small
    val = arrays_dataset(x[: cfg.train_batch], y[: cfg.train_batch]).materialize()
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        before = plain_train(x, y, spec, cores)
    data_path = data_path_rates(train, spec.batch_size, spec.epochs)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        result = fit(train, val, spec, os.path.join(work, "train"), "bench", workers=1, use_gpu=gpu,
                     cpus_per_worker=1 if gpu else cores)
        kemo_wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"Ray Train benchmark run failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    with Sampler(cfg.sample_every):
        after = plain_train(x, y, spec, cores)
    # rounded as reported before any ratio is taken, so each ratio is the one of the numbers beside it
    plain = round(float(np.mean(before[steady] + after[steady])), 1)
    kemo_steps = round(float(np.mean([h["train_images_per_s"] for h in history][steady])), 1)
    kemo_epochs = round(float(np.mean([len(y) / h["epoch_seconds"] for h in history][steady])), 1)
    data_alone = round(float(np.mean(data_path[steady])), 1)
    channels_last = round(float(np.mean(plain_train(x, y, spec, cores, channels_last=True)[steady])), 1) if gpu \
        else None
    return {
        "model": spec.model, "image_size": size, "images": len(y), "batch": spec.batch_size, "epochs": spec.epochs,
        "device": "cuda" if gpu else f"cpu ({cores} threads)",
        "precision": "bf16 autocast" if gpu else "fp32",  # kemo.classifier.train.train_one_epoch's choice
        "input": "Ray Data, cached in the object store (--cache memory), local shuffle buffer",
        "plain_loop_images_per_s": plain,
        "plain_loop_images_per_s_before_after": [round(float(np.mean(r[steady])), 1) for r in (before, after)],
        "kemo_images_per_s": kemo_steps, "ratio_vs_plain": round(kemo_steps / plain, 2),
        # the whole epoch: training, validation on one batch, and the checkpoint written and registered
        "kemo_epoch_images_per_s": kemo_epochs, "epoch_ratio_vs_plain": round(kemo_epochs / plain, 2),
        # against the model alone (the plain loop: no input path to wait for); under 20% headroom it sets the pace
        "data_path_images_per_s": data_alone, "data_path_vs_model": round(data_alone / plain, 2),
        "data_bound": data_alone < 1.2 * plain,
        "kemo_wall_s": round(kemo_wall, 1),
        "kemo_fixed_cost_s": round(max(0.0, kemo_wall - sum(h["epoch_seconds"] for h in history)), 1),
        "plain_loop_channels_last_images_per_s": channels_last,
        "channels_last_ratio_vs_plain": round(channels_last / plain, 2) if channels_last else None,
        "sampled": sampler.report(),
    }


# --------------------------------------------------------------------------------------------------- label


def part_receipts(label_output: str) -> list[tuple[float, int]]:
    """(time written, rows so far) per committed part of a label output: the job writes a part as its rows arrive."""
    import pyarrow.parquet as pq

    from kemo.label import PARTS

    committed = {f["path"] for f in outputs.Output(label_output, outputs.LABELS).committed()["files"]}
    parts = sorted((e.mtime_ns / 1e9, pq.read_metadata(e.uri).num_rows)
                   for e in storage.list_files(storage.join(label_output, PARTS)) if f"{PARTS}/{e.rel}" in committed)
    return [(t, sum(rows for _, rows in parts[:i + 1])) for i, (t, _) in enumerate(parts)]


def label_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """kemo's label job against :func:`plain_label_loop` on the same photos, with the same detector and classifier:
    a K-EmotionNet checkpoint with random weights (the speed does not depend on them). kemo's steady rate is timed
    between its first and last part file, written every 16 rows."""
    import torch

    from kemo.classifier.checkpoint import save_checkpoint
    from kemo.classifier.registry import create_model
    from kemo.label import LabelConfig
    from kemo.label import run as label
    from kemo.preprocess import steady_rate

    gpu = torch.cuda.is_available() and cluster.get("GPU", 0) >= 1
    size = cfg.label_image_size or (224 if gpu else 64)
    detector = cfg.label_detector or ("yolo" if cfg.weights else "haar")
    checkpoint = os.path.join(work, "classifier")
    torch.manual_seed(cfg.seed)
    save_checkpoint(checkpoint, create_model("kemotionnet"), "kemotionnet", {}, image_size=size)
    n, n_small = len(rows), len(rows) // 3
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        plain_s, plain_small = plain_label_loop(rows, detector, cfg.weights, cfg, checkpoint)
    lcfg = LabelConfig(input=photo_folder(rows, os.path.join(work, "label-photos")),
                       output=os.path.join(work, "labels"), checkpoint=checkpoint, detector=detector,
                       weights=cfg.weights, **crop_settings(cfg), rows_per_part=16, gallery=0)  # as preprocess's
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = label(lcfg)
        kemo_s = time.perf_counter() - t0
    plain_rate, kemo_rate = rate(n, plain_s), rate(n, kemo_s)
    plain_steady = marginal(n_small, plain_small, n, plain_s)
    kemo_steady = steady_rate(part_receipts(lcfg.output)) or kemo_rate
    return {
        "detector": detector, "classifier": "kemotionnet", "image_size": size, "photos": n,
        "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
        "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
        "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
        "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
        "kemo_fixed_cost_s": round(max(0.0, kemo_s - n / kemo_steady), 2),
        "statuses": summary["processed_statuses"],
        "resources": resources_of(resolve_resources(lcfg, cluster_nodes())), "sampled": sampler.report(),
    }


# --------------------------------------------------------------------------------------------------- the job


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the stages asked for (the caller has started Ray) and commit the report to ``cfg.output`` like every
    job's output: benchmark.json, benchmark.md, scaling.png (with the scaling stage), config.json, _commit.json.
    The output's lease is held from the start, so a second run into the same output is refused before it works
    for minutes. Returns the report."""
    import ray

    cfg = effective(cfg)
    stages = parse_stages(cfg.stages)
    out = outputs.Output(cfg.output, outputs.BENCHMARK)
    previous = out.manifest()  # an output of another kind is refused here, before any work
    cluster = ray.cluster_resources()
    cores = int(cluster.get("CPU", os.cpu_count() or 1))
    report: dict[str, Any] = {"machine": machine(cluster), "config": asdict(cfg), "stages": stages, "seconds": {}}
    with out.lease() as lease:
        work = tempfile.mkdtemp(prefix="kemo-bench-")
        t0 = time.perf_counter()
        try:
            rows, manifest = [], ""
            if set(stages) - {"train", "scale"}:  # every other stage works on the same photos
                table = photos(cfg.corpus, os.path.join(work, "corpus"), cfg.size, cfg.images, cfg.seed, cfg.texture)
                manifest = os.path.join(work, "manifest.parquet")
                storage.write_parquet(table, manifest)
                rows = table.to_pylist()
                report["seconds"]["photos"] = round(time.perf_counter() - t0, 1)
            steps: dict[str, Callable[[], None]] = {
                "decode": lambda: report.update(decode=decode_benchmark(cfg, rows, work, cores)),
                "detect": lambda: report.update(detect=detect_benchmark(cfg, rows, cluster)),
                "preprocess": lambda: report.update(preprocess_benchmark(cfg, cluster, work, rows, manifest)),
                "scaling": lambda: report.update(scaling=scaling_benchmark(cfg, cluster, work, manifest, len(rows))),
                "train": lambda: report.update(train=train_benchmark(cfg, cores, work)),
                "label": lambda: report.update(label=label_benchmark(cfg, cluster, work, rows)),
                "scale": lambda: report.update(scale=scale_benchmark(cfg, work)),
            }
            for stage in stages:
                log.info("benchmark: %s", stage)
                started = time.perf_counter()
                steps[stage]()
                report["seconds"][stage] = round(time.perf_counter() - started, 1)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        out.uncommit()  # from here until the commit, no reader takes the previous report for this one
        files = []
        if "scaling" in report:
            report["scaling"]["plot"] = PLOT
            files.append(out.write_file(PLOT, scaling_png(report["scaling"])))
        files += [out.write_json(REPORT, report),
                  out.write_file(NOTES, markdown(report).encode("utf-8"))]
        lease.check()
        out.commit(files, asdict(cfg), fingerprint=None)
        named = {r.path for r in files} | {outputs.CONFIG}
        for f in (previous or {}).get("files", []):  # a plot from an earlier run with scaling is no longer current
            if f["path"] not in named:
                with contextlib.suppress(FileNotFoundError):
                    storage.delete(storage.join(cfg.output, f["path"]))
    return report
