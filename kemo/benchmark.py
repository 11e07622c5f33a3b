"""What each stage costs on this machine, against a plain per-image loop measured in the same run (DESIGN §6).

    python jobs/benchmark.py [--stages decode,detect,preprocess,scaling,train,label] [--images 300] [--size 2000x1500]

decode: kemo's decoder alone on one core against the plain loop's cv2 decode, and every way of decoding the same
JPEGs (cv2 vs Pillow, full vs DCT-reduced), at each ``--decode-sizes``. detect: each detector that looks at pixels,
alone on decoded photos, at the job's batch size against one photo at a time. preprocess: for each detector, kemo's
preprocess job (Ray Data, actor pool) against a plain loop (cv2.imread → the same detector → crop → write a JPEG) over
the same generated photos, and each of its stages alone, scaled to all cores. scaling: kemo's preprocess throughput
at 1, 2, 4 … all cores (one decoder per actor) and 1 … all GPUs, plotted in scaling.png. train: classifier training
images/s of a Ray Train run against a plain PyTorch loop over the same in-memory tensors. label: kemo's label job
against a plain loop (cv2.imread → detector → crop → classifier, one photo at a time). Every Ray run also reports
the peak RSS of each Ray worker it started and the GPUs' utilisation (null without a GPU). Writes benchmark.json,
benchmark.md and scaling.png.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from kemo import storage
from kemo.crop import clip_box, crop_region, crop_square, encode_jpeg, primary_face, resize_whole
from kemo.detect import create_detector
from kemo.image import decode

log = logging.getLogger(__name__)
STAGES = ("decode", "detect", "preprocess", "scaling", "train", "label")
ALONE = 60  # photos for the timings of one stage alone
MIB = 1 << 20
PLAIN_DECODE = "cv2 full, straight to RGB"  # what the plain loop's cv2.imread(path, IMREAD_COLOR_RGB) does
# Ray processes that are not a run's workers: idle pooled workers, the node's agents, a submitted job's supervisor
NOT_WORKERS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor")


@dataclass
class BenchmarkConfig:
    """Measure kemo's stages against plain per-image loops on generated photos."""

    stages: str = field(default=",".join(STAGES), metadata={"help": f"comma-separated: {', '.join(STAGES)}"})
    images: int = field(default=300, metadata={"help": "photos to process"})
    size: str = field(default="2000x1500", metadata={"help": "generated photo size WxH"})
    decode_sizes: str = field(default="", metadata={
        "help": "decode: photo sizes WxH to time, comma-separated ('' = --size); DESIGN §6: 2000x1500,4000x3000"})
    detectors: str = field(default="annotations,none,haar", metadata={"help": "comma-separated detectors to run"})
    weights: str | None = field(default=None, metadata={"help": "YOLO weights, needed for the yolo detector"})
    corpus: str | None = field(default=None, metadata={"help": "use this AI-Hub-shaped root instead of generating"})
    output: str = field(default="out/benchmark", metadata={"help": "where benchmark.json, .md and scaling.png go"})
    crop_size: int = 500
    decode_min_side: int = 1000
    seed: int = 0
    scaling_detector: str = field(default="annotations", metadata={
        "help": "scaling: detector of the CPU runs (1 … all cores, one decoder each); the GPU runs use yolo"})
    train_model: str = field(default="kemotionnet", metadata={"help": "train: the classifier"})
    train_images: int = field(default=0, metadata={
        "help": "train: in-memory training images; 0 = 8192 on GPU (epochs long enough to time), 512 on CPU"})
    train_image_size: int = field(default=0, metadata={"help": "train: input side; 0 = 224 on GPU, 64 on CPU"})
    train_epochs: int = field(default=4, metadata={"help": "train: epochs (the first is warm-up, not counted)"})
    train_batch: int = field(default=64, metadata={"help": "train: batch size"})
    label_detector: str = field(default="", metadata={"help": "label: detector; '' = yolo with --weights, else haar"})
    label_image_size: int = field(default=0, metadata={
        "help": "label: the classifier's input side; 0 = 224 on GPU, 64 on CPU (random weights: speed is the same)"})
    sample_every: float = field(default=0.2, metadata={"help": "seconds between samples of worker memory and GPUs"})


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def _time(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return time.perf_counter() - t0


def _marginal(n_small: int, t_small: float, n: int, t: float) -> float:
    """Photos/s of the photos beyond the first ``n_small``, timed ``t_small`` and ``t`` seconds from the start: fixed
    costs (model load, first-call set-up) fall in the first ``n_small``."""
    return _rate(n - n_small, t - t_small)


def _detectors(cfg: BenchmarkConfig) -> list[str]:
    return [d.strip() for d in cfg.detectors.split(",") if d.strip()]


def parse_stages(stages: str) -> list[str]:
    """The stages asked for, in the order they run; unknown names are refused before anything runs."""
    asked = {s.strip() for s in stages.split(",") if s.strip()}
    unknown = asked - set(STAGES)
    if unknown or not asked:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in asked]


# --------------------------------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(cluster: dict[str, float]) -> dict[str, Any]:
    """This node as the benchmark sees it; ``cores`` and ``gpus`` are what Ray may use."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu": _cpu_model(), "cores": int(cluster.get("CPU", os.cpu_count() or 1)),
            "ray_cpus": int(cluster.get("CPU", os.cpu_count() or 1)), "logical_cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "gpu": torch.cuda.get_device_name(0) if cuda else "no GPU", "gpus": int(cluster.get("GPU", 0)),
            "python": platform.python_version()}


def _raylet_pid() -> int | None:
    """This node's raylet: the Ray workers it starts carry its pid as RAY_RAYLET_PID, which tells them apart from
    other Ray instances' workers on the same machine (their parent is not always the raylet)."""
    import psutil
    import ray

    me = ray.get_runtime_context().get_node_id()
    socket = next((n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == me), None)
    for p in psutil.process_iter(["cmdline"]):
        if socket and f"--raylet_socket_name={socket}" in (p.info["cmdline"] or ()):
            return p.pid
    return None


def _gpu_probe() -> Callable[[], list[tuple[float, float]]] | None:
    """A function giving (utilisation %, memory used MiB) for each GPU: NVML through pynvml, else nvidia-smi; None
    where there is no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if handles:
            return lambda: [(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                             pynvml.nvmlDeviceGetMemoryInfo(h).used / MIB) for h in handles]
    except Exception:  # no pynvml, or no NVIDIA driver (NVMLError): nvidia-smi may still answer
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def smi() -> list[tuple[float, float]]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return [(float(u), float(m)) for u, m in (line.split(",") for line in out.splitlines() if line.strip())]

    return smi


class Sampler:
    """Peak RSS of each Ray worker process this node runs for the ``with`` block, and the GPUs' utilisation, sampled
    every ``every`` seconds by a thread of the driver. Workers busy before the block (another run's actors) are left
    out, and so are workers that stayed idle; RSS counts the object-store pages a worker touched."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peak: dict[int, int] = {}  # pid → bytes
        self.names: dict[int, str] = {}  # pid → its last title other than NOT_WORKERS: what it was started for
        self.gpu: list[tuple[float, float]] = []
        self.samples = 0
        self._ours: dict[int, bool] = {}
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._raylet = _raylet_pid()
        self._probe = _gpu_probe()
        self._before = {pid for pid, title, _ in self._scan() if title not in NOT_WORKERS}
        self._thread = threading.Thread(target=self._loop, name="benchmark-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> list[tuple[int, str, int]]:
        """(pid, title, RSS bytes) of this node's Ray worker processes."""
        import psutil

        out = []
        for p in psutil.process_iter(["cmdline"]):
            title = (p.info["cmdline"] or [""])[0]  # Ray sets a worker's whole command line to its title
            if not title.startswith("ray::"):
                continue
            try:
                if p.pid not in self._ours:
                    self._ours[p.pid] = p.environ().get("RAY_RAYLET_PID") == str(self._raylet)
                if self._ours[p.pid]:
                    out.append((p.pid, title, p.memory_info().rss))
            except psutil.Error:  # gone since listed, or not ours to read
                continue
        return out

    def _loop(self) -> None:
        while True:
            for pid, title, rss in self._scan():
                if pid in self._before:
                    continue
                if title not in NOT_WORKERS:
                    self.names[pid] = re.sub(r"\.\w+$", "", title)  # an actor's title ends in the method it runs
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            if self._probe is not None:
                try:
                    self.gpu += self._probe()
                except Exception as e:  # a failing probe must not end the run it watches
                    log.warning("GPU sampling stopped: %s", e)
                    self._probe = None
            self.samples += 1
            if self._stop.wait(self.every):
                return

    def report(self) -> dict[str, Any]:
        workers = sorted(({"pid": pid, "name": name, "peak_rss_mib": round(self.peak[pid] / MIB, 1)}
                          for pid, name in self.names.items()), key=lambda w: -w["peak_rss_mib"])
        util = [u for u, _ in self.gpu]
        return {"peak_rss_mib": workers[0]["peak_rss_mib"] if workers else None,
                "peak_rss_mib_per_worker": workers, "samples": self.samples,
                "gpu_utilization_pct_mean": round(float(np.mean(util)), 1) if util else None,
                "gpu_utilization_pct_max": max(util) if util else None,
                "gpu_memory_used_mib_max": round(max(m for _, m in self.gpu)) if self.gpu else None}


# --------------------------------------------------------------------------------------------------- photos


def photos(corpus: str | None, root: str, size: str, n: int, seed: int) -> pa.Table:
    """Manifest rows of the first ``n`` photos with an annotated face: of ``corpus``, or generated at ``size`` under
    ``root``."""
    import pyarrow.compute as pc

    from kemo.data import aihub, synth

    if corpus is None:
        corpus = root
        synth.generate(synth.SynthConfig(out=root, per_class=-(-n // 7), size=size, seed=seed))
    table, _ = aihub.index(corpus)
    return table.filter(pc.is_valid(table.column("box"))).slice(0, n)


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
        PLAIN_DECODE: lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB),
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


def decode_benchmark(cfg: BenchmarkConfig, rows: list[dict[str, Any]], work: str, cores: int) -> dict[str, Any]:
    """kemo's decoder (at the yolo/haar decode setting) on one core against the plain loop's cv2 decode, and every
    decode method, at each size: the first 40 of the run's photos at ``--size``, 14 generated ones at other sizes."""
    sizes = ["corpus"] if cfg.corpus else [s.strip() for s in (cfg.decode_sizes or cfg.size).split(",") if s.strip()]
    kemo_name = f"kemo.decode(min_side={cfg.decode_min_side})"
    out = {}
    for size in sizes:
        sample = rows if size in (cfg.size, "corpus") else \
            photos(None, os.path.join(work, f"decode-{size}"), size, 14, cfg.seed).to_pylist()
        ms = decode_methods([storage.read_bytes(r["uri"]) for r in sample[:40]], cfg.decode_min_side)
        kemo, plain = round(1000 / ms[kemo_name], 2), round(1000 / ms[PLAIN_DECODE], 2)
        out[size] = {"photos": len(sample[:40]), "decoder": kemo_name, "kemo_photos_per_s_one_core": kemo,
                     "plain_photos_per_s_one_core": plain, "ratio_vs_plain": round(kemo / plain, 2),
                     "kemo_photos_per_s_all_cores": round(kemo * cores, 2), "ms_per_photo_one_core": ms}
    return out


# --------------------------------------------------------------------------------------------------- stages alone


@contextlib.contextmanager
def _alone(detector_name: str, cfg: BenchmarkConfig, cluster: dict[str, float]) -> Iterator[tuple[Any, Any]]:
    """(kemo's preprocess UDF built in this process as an actor builds it, its resolved config), its CPU stages held
    to one core; torch's and OpenCV's threads are restored after, since the plain loop must get their defaults."""
    import torch

    from kemo.preprocess import CropPhotos, PreprocessConfig, resolve_resources

    pcfg = resolve_resources(PreprocessConfig(input="-", output="-", detector=detector_name, weights=cfg.weights,
                                              crop_size=cfg.crop_size, decode_min_side=cfg.decode_min_side), cluster)
    torch_threads = torch.get_num_threads()
    udf = CropPhotos(asdict(pcfg))  # sets the actor's torch/cv2 threads in this process
    cv2.setNumThreads(1)
    try:
        yield udf, pcfg
    finally:
        udf.pool.shutdown()
        cv2.setNumThreads(-1)
        torch.set_num_threads(torch_threads)


def _detect_all(detector: Any, prepared: list[Any], rows: list[dict[str, Any]], batch: int) -> tuple[list, float]:
    """The detector's faces for every prepared photo, in batches of ``batch``, and the seconds they took after one
    warm-up batch (lazy set-up, cuDNN's algorithm search)."""
    inputs = [p.det_input for p in prepared]
    detector.detect(inputs[:batch], rows[:batch])
    found: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch):
        found += detector.detect(inputs[i:i + batch], rows[i:i + batch])
    return found, time.perf_counter() - t0


def detect_benchmark(cfg: BenchmarkConfig, rows: list[dict[str, Any]], cluster: dict[str, float]) -> dict[str, Any]:
    """Each detector that looks at pixels (yolo, haar), alone on the first photos decoded as kemo decodes them: images/s
    at the job's batch size against one photo at a time, same device and threads; and its input preparation."""
    import torch

    out = {}
    for name in [d for d in _detectors(cfg) if d in ("yolo", "haar")]:
        with _alone(name, cfg, cluster) as (udf, pcfg):
            prepared = [udf._load(r) for r in rows[:ALONE]]  # read + decode + detector input
            keep = [i for i, p in enumerate(prepared) if p.decoded is not None]
            prepared, sample = [prepared[i] for i in keep], [rows[i] for i in keep]
            t_prepare = _time(lambda p: udf.detector.prepare(p.decoded.image, p.decoded.factors), prepared)
            _, t_batch = _detect_all(udf.detector, prepared, sample, pcfg.batch_size)
            _, t_one = _detect_all(udf.detector, prepared, sample, 1)
            threads = torch.get_num_threads() if name == "yolo" else cv2.getNumThreads()  # as timed
        n, det = len(prepared), udf.detector
        kemo, plain = _rate(n, t_batch), _rate(n, t_one)
        out[name] = {"photos": n, "batch": pcfg.batch_size, "device": getattr(det, "device", "cpu"),
                     "half_precision": bool(getattr(det, "half", False)), "threads": threads,
                     "kemo_images_per_s": kemo, "plain_images_per_s": plain, "ratio_vs_plain": round(kemo / plain, 2),
                     "prepare_ms_per_photo_one_core": round(1000 * t_prepare / n, 2)}
        log.info("detect %s: %s", name, out[name])
    return out


def stage_ceilings(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig,
                   cluster: dict[str, float]) -> dict[str, float]:
    """Photos/s of each of kemo's stages alone, through the UDF's own methods: the CPU stages on one core scaled
    to all cores, the detector at the job's batch size (one per core on CPU, one per GPU on GPU)."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    with _alone(detector_name, cfg, cluster) as (udf, pcfg):
        t_read = _time(lambda r: storage.read_bytes(r["uri"]), rows)
        prepared: list[Any] = []
        t_load = _time(lambda r: prepared.append(udf._load(r)), rows)  # read + decode + detector input
        found, t_detect = _detect_all(udf.detector, prepared, rows, pcfg.batch_size)
        t_finish = _time(lambda k: udf._finish(rows[k], prepared[k], found[k]), range(len(rows)))
    on_gpu = str(getattr(udf.detector, "device", "cpu")).startswith("cuda")
    n = len(rows)
    ceilings = {"read bytes": _rate(n, t_read / cores), "decode": _rate(n, (t_load - t_read) / cores),
                "crop + encode": _rate(n, t_finish / cores)}
    if detector_name in ("yolo", "haar"):
        ceilings["detect"] = _rate(n, t_detect / (gpus if on_gpu else cores))
    # Every CPU stage shares the same cores, so together they cannot beat this (a GPU detector runs beside them):
    ceilings["all stages on all cores"] = _rate(n, (t_load + t_finish + (0 if on_gpu else t_detect)) / cores)
    return ceilings


# --------------------------------------------------------------------------------------------------- preprocess


def _plain_crops(rows: list[dict[str, Any]], det: Any, crop_size: int) -> Iterator[tuple[int, np.ndarray | None]]:
    """The loop a user writes first, up to the crop: cv2.imread → detector → the primary face, cut square (None where
    the photo does not read or shows no face)."""
    for i, row in enumerate(rows):
        rgb = cv2.imread(row["uri"], cv2.IMREAD_COLOR_RGB)  # applies EXIF orientation itself
        if rgb is None:
            yield i, None
            continue
        h, w = rgb.shape[:2]
        if det.whole_photo:
            yield i, resize_whole(rgb, crop_size)
            continue
        inp, (fx, fy) = det.prepare(rgb, (1.0, 1.0))
        (faces,) = det.detect([inp], [row])
        boxes = [clip_box(b * [fx, fy, fx, fy], w, h) for b in faces.boxes]
        keep = [j for j, b in enumerate(boxes) if b is not None]
        best = primary_face(np.asarray([boxes[j] for j in keep]).reshape(-1, 4), faces.scores[keep])
        yield i, None if best is None else crop_square(rgb, crop_region(boxes[keep[best]], 0.25), crop_size)


def plain_loop(rows: list[dict[str, Any]], detector_name: str, cfg: BenchmarkConfig, out_dir: str
               ) -> tuple[float, float]:
    """(seconds for every photo, seconds for the first third) of the plain preprocessing loop: one photo at a time,
    cv2.imread → detector (on the GPU where there is one, as a user's would be) → crop → write a JPEG."""
    t0 = time.perf_counter()
    third = t0
    det = create_detector(detector_name, weights=cfg.weights, device="auto")
    os.makedirs(out_dir, exist_ok=True)
    for i, crop in _plain_crops(rows, det, cfg.crop_size):
        if crop is not None:
            with open(os.path.join(out_dir, f"{i}.jpg"), "wb") as f:
                f.write(encode_jpeg(crop))
        if i == len(rows) // 3 - 1:
            third = time.perf_counter()
    return time.perf_counter() - t0, third - t0


def _resources(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("actors", "decoders", "gpus_per_actor", "batch_size", "calls_per_actor")}


def kemo_job(manifest: str, detector_name: str, cfg: BenchmarkConfig, out_dir: str, **resources: Any
             ) -> dict[str, Any]:
    """The whole preprocess job into a fresh output: its wall time (Ray Data start-up included), summary, resolved
    resources and what was sampled of its workers. ``resources``: PreprocessConfig's actors, decoders, ..."""
    import ray

    from kemo.preprocess import PreprocessConfig, resolve_resources, run

    shutil.rmtree(out_dir, ignore_errors=True)
    # small shards: the job's receipts then time its steady state (summary["steady_photos_per_s"])
    pcfg = PreprocessConfig(input=manifest, output=out_dir, detector=detector_name, weights=cfg.weights,
                            crop_size=cfg.crop_size, decode_min_side=cfg.decode_min_side, rows_per_shard=16,
                            **resources)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = run(pcfg)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "summary": summary, "sampled": sampler.report(),
            "resources": _resources(resolve_resources(pcfg, ray.cluster_resources()))}


def preprocess_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]],
                         manifest: str) -> dict[str, Any]:
    """Every detector: kemo's preprocess job against the plain loop, and the stage ceilings."""
    n, n_small = len(rows), len(rows) // 3
    report: dict[str, Any] = {"photos": n, "size": cfg.size, "detectors": {}}
    for name in _detectors(cfg):
        log.info("benchmark: preprocess with %s", name)
        ceilings = stage_ceilings(rows[:ALONE], name, cfg, cluster)
        with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
            plain_s, plain_small = plain_loop(rows, name, cfg, os.path.join(work, f"plain-{name}"))
        job = kemo_job(manifest, name, cfg, os.path.join(work, f"kemo-{name}"))
        summary = job["summary"]
        plain_rate, kemo_rate = _rate(n, plain_s), _rate(n, job["seconds"])
        plain_steady = _marginal(n_small, plain_small, n, plain_s)
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


def worker_counts(n: int) -> list[int]:
    """1, 2, 4 … below ``n``, then ``n``: every count on a small node, few runs on a large one."""
    counts = [1]
    while counts[-1] * 2 < n:
        counts.append(counts[-1] * 2)
    return counts + [n] if n > 1 else counts


def _scaling_points(jobs: list[tuple[int, dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    points = []
    for workers, job in jobs:
        steady = job["summary"]["steady_photos_per_s"]
        points.append({"workers": workers, "photos_per_s": steady or _rate(n, job["seconds"]), "steady": bool(steady),
                       "photos_per_s_end_to_end": _rate(n, job["seconds"]), "resources": job["resources"],
                       "sampled": job["sampled"]})
    for p in points:
        p["speedup"] = round(p["photos_per_s"] / points[0]["photos_per_s"], 2)
        p["efficiency"] = round(p["speedup"] / p["workers"], 2)
    return points


def scaling_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, manifest: str, n: int
                      ) -> dict[str, Any]:
    """kemo's preprocess throughput (steady where the run is long enough to tell) on 1 … all cores, one actor with
    one decoder per core and no GPU; then on 1 … all GPUs with yolo, one actor per GPU with its default decoders."""
    cores, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    name = cfg.scaling_detector
    cpu = [(k, kemo_job(manifest, name, cfg, os.path.join(work, f"scale-cpu-{k}"), actors=k, decoders=1,
                        gpus_per_actor=0)) for k in worker_counts(cores)]
    gpu, note = None, None
    if not gpus:
        note = "no GPU"
    elif not cfg.weights:
        note = "needs --weights: the GPU runs use yolo"
    else:
        gpu = _scaling_points([(k, kemo_job(manifest, "yolo", cfg, os.path.join(work, f"scale-gpu-{k}"), actors=k,
                                            gpus_per_actor=1)) for k in worker_counts(gpus)], n)
    return {"photos": n, "cpu_detector": name, "cpu": _scaling_points(cpu, n), "gpu_detector": "yolo", "gpu": gpu,
            "gpu_note": note}


def plot_scaling(scaling: dict[str, Any], path: str) -> None:
    """Throughput against workers, with the line that perfect scaling from one worker would follow."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ticks: set[int] = set()
    for key, what in (("cpu", f"CPU actors, 1 decoder each ({scaling['cpu_detector']})"),
                      ("gpu", f"GPU actors, 1 GPU each ({scaling['gpu_detector']})")):
        points = scaling[key] or []
        if not points:
            continue
        workers = [p["workers"] for p in points]
        rates = [p["photos_per_s"] for p in points]
        (line,) = ax.plot(workers, rates, marker="o", label=what)
        ax.plot(workers, [rates[0] * w for w in workers], linestyle="--", color=line.get_color(), alpha=0.5,
                label=f"{key.upper()}: linear from 1")
        ticks.update(workers)
    ax.set_xticks(sorted(ticks))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="workers", ylabel="photos/s", title=f"kemo preprocess, {scaling['photos']} photos")
    ax.legend()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- train


def plain_train(x: np.ndarray, y: np.ndarray, spec: Any, threads: int, channels_last: bool = False) -> list[float]:
    """Images/s per epoch of the loop a user writes first: the model, optimiser and in-memory tensors in this process,
    no Ray; each epoch is the same ``train_one_epoch`` (augmentation, steps, bf16 autocast on GPU) that a Ray Train
    worker runs. ``channels_last`` stores the weights NHWC, so convolutions run NHWC (their inputs follow)."""
    import torch

    from kemo.models import create_model
    from kemo.models.train import train_one_epoch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(spec.seed)
        model = create_model(spec.model, num_classes=7).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
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
    runs before and after Ray Train and the two are averaged, so drift in the machine's load shows up in both. On a
    GPU the plain loop runs once more with channels_last (kemo's Ray Train loop has no such option)."""
    import ray
    import torch

    from kemo.models.train import TRAIN_STATE, RunSpec, fit

    gpu = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1
    size = cfg.train_image_size or (224 if gpu else 64)
    spec = RunSpec(model=cfg.train_model, epochs=cfg.train_epochs, batch_size=cfg.train_batch, image_size=size)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.train_images or (8192 if gpu else 512)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # the speed is content-blind
    y = rng.integers(0, 7, n).astype(np.int64)
    val = (x[: cfg.train_batch], y[: cfg.train_batch])  # one batch: evaluation is part of kemo's epoch, kept small
    steady = slice(1, None)  # the first epoch warms up allocators and kernels
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        before = plain_train(x, y, spec, cores)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        result = fit((x, y), val, spec, os.path.join(work, "train"), "bench", workers=1, use_gpu=gpu,
                     cpus_per_worker=1 if gpu else cores)
        kemo_wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"Ray Train benchmark run failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)["history"]
    with Sampler(cfg.sample_every):
        after = plain_train(x, y, spec, cores)
    plain = float(np.mean(before[steady] + after[steady]))
    kemo_steps = float(np.mean([h["train_images_per_s"] for h in history][steady]))
    kemo_epochs = float(np.mean([len(y) / h["epoch_seconds"] for h in history][steady]))
    channels_last = round(float(np.mean(plain_train(x, y, spec, cores, channels_last=True)[steady])), 1) if gpu \
        else None
    return {
        "model": spec.model, "image_size": size, "images": len(y), "batch": spec.batch_size, "epochs": spec.epochs,
        "device": "cuda" if gpu else f"cpu ({cores} threads)",
        "precision": "bf16 autocast" if gpu else "fp32",  # kemo.models.train.train_one_epoch's choice
        "plain_loop_images_per_s": round(plain, 1),
        "plain_loop_images_per_s_before_after": [round(float(np.mean(r[steady])), 1) for r in (before, after)],
        "kemo_images_per_s": round(kemo_steps, 1), "ratio_vs_plain": round(kemo_steps / plain, 2),
        # the whole epoch: training, validation on one batch, and the checkpoint written and registered
        "kemo_epoch_images_per_s": round(kemo_epochs, 1), "epoch_ratio_vs_plain": round(kemo_epochs / plain, 2),
        "kemo_wall_s": round(kemo_wall, 1),
        "kemo_fixed_cost_s": round(max(0.0, kemo_wall - sum(h["epoch_seconds"] for h in history)), 1),
        "plain_loop_channels_last_images_per_s": channels_last,
        "channels_last_ratio_vs_plain": round(channels_last / round(plain, 1), 2) if channels_last else None,
        "sampled": sampler.report(),
    }


# --------------------------------------------------------------------------------------------------- label


def _photo_folder(rows: list[dict[str, Any]], folder: str) -> str:
    """The photos as one flat folder, which is what the label job takes (hard links where the file system allows)."""
    os.makedirs(folder)
    for i, r in enumerate(rows):
        dst = os.path.join(folder, f"{i:05d}{os.path.splitext(r['uri'])[1]}")
        try:
            os.link(r["uri"], dst)
        except OSError:  # another file system
            shutil.copyfile(r["uri"], dst)
    return folder


def plain_label_loop(rows: list[dict[str, Any]], detector_name: str, checkpoint: str, cfg: BenchmarkConfig
                     ) -> tuple[float, float]:
    """(seconds for every photo, seconds for the first third) of the plain labelling loop: one photo at a time,
    cv2.imread → detector → crop → the checkpoint's classifier (both on the GPU where there is one, as a user's would
    be). Unlike kemo it does not pass the crop through JPEG first, as training crops were: a little less work."""
    import torch

    from kemo.models.checkpoint import load_checkpoint, preprocess

    t0 = time.perf_counter()
    third = t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    det = create_detector(detector_name, weights=cfg.weights, device="auto")
    model, meta = load_checkpoint(checkpoint, device)
    with torch.inference_mode():
        for i, crop in _plain_crops(rows, det, cfg.crop_size):
            if crop is not None:
                torch.softmax(model(preprocess([crop], meta, device)), dim=1).cpu()
            if i == len(rows) // 3 - 1:
                third = time.perf_counter()
    return time.perf_counter() - t0, third - t0


def _part_receipts(parts_dir: str) -> list[tuple[float, int]]:
    """(time written, rows so far) per label part: the job writes a part as its rows arrive."""
    import pyarrow.parquet as pq

    parts = sorted((e.stat().st_mtime, pq.read_metadata(e.path).num_rows)
                   for e in os.scandir(parts_dir) if e.name.endswith(".parquet"))
    return [(t, sum(rows for _, rows in parts[:i + 1])) for i, (t, _) in enumerate(parts)]


def label_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str, rows: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """kemo's label job against :func:`plain_label_loop` on the same photos, with the same detector and classifier:
    a K-EmotionNet checkpoint with random weights (the speed does not depend on them). kemo's steady rate is timed
    between its first and last part file, written every 16 rows."""
    import ray
    import torch

    from kemo.label import PARTS, LabelConfig
    from kemo.label import run as label
    from kemo.models import create_model
    from kemo.models.checkpoint import save_checkpoint
    from kemo.preprocess import _steady, resolve_resources

    gpu = torch.cuda.is_available() and cluster.get("GPU", 0) >= 1
    size = cfg.label_image_size or (224 if gpu else 64)
    detector = cfg.label_detector or ("yolo" if cfg.weights else "haar")
    checkpoint = os.path.join(work, "classifier")
    torch.manual_seed(cfg.seed)
    save_checkpoint(checkpoint, create_model("kemotionnet"), "kemotionnet", {}, image_size=size)
    n, n_small = len(rows), len(rows) // 3
    with Sampler(cfg.sample_every):  # the sampler's own CPU time weighs on both paths alike
        plain_s, plain_small = plain_label_loop(rows, detector, checkpoint, cfg)
    lcfg = LabelConfig(input=_photo_folder(rows, os.path.join(work, "label-photos")),
                       output=os.path.join(work, "labels"), checkpoint=checkpoint, detector=detector,
                       weights=cfg.weights, crop_size=cfg.crop_size, decode_min_side=cfg.decode_min_side,
                       rows_per_part=16)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = label(lcfg)
        kemo_s = time.perf_counter() - t0
    plain_rate, kemo_rate = _rate(n, plain_s), _rate(n, kemo_s)
    plain_steady = _marginal(n_small, plain_small, n, plain_s)
    kemo_steady = _steady(_part_receipts(os.path.join(lcfg.output, PARTS))) or kemo_rate
    return {
        "detector": detector, "classifier": "kemotionnet", "image_size": size, "photos": n,
        "plain_loop_photos_per_s": plain_rate, "kemo_photos_per_s": kemo_rate,
        "ratio_vs_plain": round(kemo_rate / plain_rate, 2),
        "plain_loop_steady_photos_per_s": plain_steady, "kemo_steady_photos_per_s": kemo_steady,
        "steady_ratio_vs_plain": round(kemo_steady / plain_steady, 2),
        "kemo_fixed_cost_s": round(max(0.0, kemo_s - n / kemo_steady), 2),
        "statuses": summary["processed_statuses"],
        "resources": _resources(resolve_resources(lcfg, ray.cluster_resources())), "sampled": sampler.report(),
    }


# --------------------------------------------------------------------------------------------------- the job


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the stages asked for; the caller has started Ray. Returns the report written to ``cfg.output``."""
    import ray

    stages = parse_stages(cfg.stages)
    cluster = ray.cluster_resources()
    cores = int(cluster.get("CPU", os.cpu_count() or 1))
    report: dict[str, Any] = {"machine": machine(cluster), "config": asdict(cfg), "stages": stages, "seconds": {}}
    work = tempfile.mkdtemp(prefix="kemo-bench-")
    t0 = time.perf_counter()
    try:
        rows, manifest = [], ""
        if set(stages) - {"train"}:  # every other stage works on the same photos
            table = photos(cfg.corpus, os.path.join(work, "corpus"), cfg.size, cfg.images, cfg.seed)
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
        }
        for stage in stages:
            log.info("benchmark: %s", stage)
            started = time.perf_counter()
            steps[stage]()
            report["seconds"][stage] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    os.makedirs(cfg.output, exist_ok=True)
    if "scaling" in report:
        report["scaling"]["plot"] = "scaling.png"
        plot_scaling(report["scaling"], os.path.join(cfg.output, "scaling.png"))
    with open(os.path.join(cfg.output, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.output, "benchmark.md"), "w") as f:
        f.write(markdown(report))
    return report


# --------------------------------------------------------------------------------------------------- the report


def markdown(report: dict[str, Any]) -> str:
    """benchmark.md: one table per stage, then the peak memory of the workers of every Ray run."""
    m = report["machine"]
    gpus = f" ×{m['gpus']}" if m["gpus"] > 1 else ""
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores for Ray ({m['logical_cpus']} logical CPUs), "
             f"{m['memory_gib']} GiB, {m['gpu']}{gpus}, Python {m['python']}."]
    if "decode" in report:
        lines += _decode_markdown(report)
    if "detect" in report:
        lines += _detect_markdown(report)
    if "detectors" in report:
        lines += ["", *_preprocess_markdown(report)]
    if "scaling" in report:
        lines += _scaling_markdown(report)
    if "train" in report:
        lines += _train_markdown(report)
    if "label" in report:
        lines += _label_markdown(report)
    lines += _sampled_markdown(report)
    return "\n".join(lines) + "\n"


def _decode_markdown(report: dict[str, Any]) -> list[str]:
    d, cores = report["decode"], report["machine"]["cores"]
    sizes = list(d)
    lines = ["", "Decode alone: kemo's decoder against the plain loop's (cv2 straight to RGB), one core.", "",
             f"| photos | kemo decoder | kemo, photos/s per core | plain, photos/s per core | kemo / plain | "
             f"kemo on {cores} cores |", "|---|---|---|---|---|---|"]
    lines += [f"| {s}: {d[s]['photos']} | {d[s]['decoder']} | {d[s]['kemo_photos_per_s_one_core']} | "
              f"{d[s]['plain_photos_per_s_one_core']} | {d[s]['ratio_vs_plain']}× | "
              f"{d[s]['kemo_photos_per_s_all_cores']} |" for s in sizes]
    lines += ["", "Decode, ms per photo on one core:", "", "| method | " + " | ".join(f"{s} ms" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    lines += [f"| {k} | " + " | ".join(str(d[s]["ms_per_photo_one_core"][k]) for s in sizes) + " |"
              for k in d[sizes[0]]["ms_per_photo_one_core"]]
    return lines


def _detect_markdown(report: dict[str, Any]) -> list[str]:
    lines = ["", "Detectors alone, on decoded photos (preparing the input is timed apart, on one core): kemo's batch "
             "against one photo at a time, same device and threads.", ""]
    if not report["detect"]:
        return lines + ["No detector that looks at pixels was asked for (yolo, haar)."]
    lines += ["| detector | device | half precision | threads | batch | kemo, images/s | one at a time, images/s | "
              "kemo / plain | input preparation, ms |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {d['device']} | {'yes' if d['half_precision'] else 'no'} | {d['threads']} | {d['batch']} | "
              f"{d['kemo_images_per_s']} | {d['plain_images_per_s']} | {d['ratio_vs_plain']}× | "
              f"{d['prepare_ms_per_photo_one_core']} |" for k, d in report["detect"].items()]
    return lines


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
    r = next(iter(report["detectors"].values()))["resources"] if report["detectors"] else None
    if r:
        lines += ["", f"kemo's resources (its defaults on this cluster): {_resources_text(r)}."]
    return lines


def _resources_text(r: dict[str, Any]) -> str:
    return (f"actors {r['actors']}, decoder threads per actor {r['decoders']}, GPUs per actor {r['gpus_per_actor']:g}, "
            f"batch {r['batch_size']}, batches in flight per actor {r['calls_per_actor']}")


def _statuses_text(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in statuses.items())


def _scaling_markdown(report: dict[str, Any]) -> list[str]:
    s = report["scaling"]
    lines = ["", f"Scaling: kemo's preprocess job on the same {s['photos']} photos, photos/s (steady where the run "
             "shows three shards or more, else end to end); speedup against one worker, efficiency = speedup / "
             "workers.", "", "| workers | detector | actors × decoders, GPUs each | photos/s | speedup | efficiency |",
             "|---|---|---|---|---|---|"]
    for key, name in (("cpu", s["cpu_detector"]), ("gpu", s["gpu_detector"])):
        for p in s[key] or []:
            r = p["resources"]
            lines.append(f"| {p['workers']} {key.upper()} | {name} | {r['actors']} × {r['decoders']}, "
                         f"{r['gpus_per_actor']:g} | {p['photos_per_s']}{'' if p['steady'] else ' (end to end)'} | "
                         f"{p['speedup']}× | {p['efficiency']:.0%} |")
    if s["gpu_note"]:
        lines += ["", f"GPU scaling: {s['gpu_note']}."]
    return lines + ["", "![throughput against workers](scaling.png)"]


def _train_markdown(report: dict[str, Any]) -> list[str]:
    t, m = report["train"], report["machine"]
    lines = ["", f"Classifier training: {t['model']} at {t['image_size']}², batch {t['batch']}, {t['images']} "
             f"in-memory images, {t['epochs']} epochs (the first not counted), {t['device']}, {t['precision']}, "
             f"{m['cores']} cores.", "", "| path | images/s | vs plain loop |", "|---|---|---|",
             f"| plain PyTorch loop (mean of before and after: {t['plain_loop_images_per_s_before_after']}) | "
             f"{t['plain_loop_images_per_s']} | 1.0× |",
             f"| kemo, Ray Train: training steps | {t['kemo_images_per_s']} | {t['ratio_vs_plain']}× |",
             f"| kemo, Ray Train: whole epoch (+ validation, checkpoint) | {t['kemo_epoch_images_per_s']} | "
             f"{t['epoch_ratio_vs_plain']}× |"]
    if t["plain_loop_channels_last_images_per_s"] is not None:
        lines.append(f"| plain PyTorch loop, channels_last | {t['plain_loop_channels_last_images_per_s']} | "
                     f"{t['channels_last_ratio_vs_plain']}× |")
    return lines + [
        "", f"Ray Train's fixed cost (worker group start, data from the object store, shutdown): "
        f"{t['kemo_fixed_cost_s']} s of {t['kemo_wall_s']} s. channels_last: "
        + ("timed in the plain loop only; kemo's Ray Train loop would need a RunSpec field and "
           "`model.to(memory_format=torch.channels_last)` after `create_model` in kemo/models/train.py's train_loop."
           if t["plain_loop_channels_last_images_per_s"] is not None else "no GPU, not timed.")]


def _label_markdown(report: dict[str, Any]) -> list[str]:
    d, r = report["label"], report["label"]["resources"]
    return ["", f"Labelling {d['photos']} photos: {d['detector']} → crop → {d['classifier']} at {d['image_size']}² "
            f"(random weights): kemo's label job ({_resources_text(r)}) against a plain loop (cv2.imread → the same "
            f"detector → crop → the same classifier, one photo at a time). kemo's photos: "
            f"{_statuses_text(d['statuses'])}.", "",
            "| detector | plain loop | kemo | kemo / plain | plain, steady | kemo, steady | kemo / plain, steady "
            "| kemo fixed cost |", "|---|---|---|---|---|---|---|---|",
            f"| {d['detector']} | {d['plain_loop_photos_per_s']} | {d['kemo_photos_per_s']} | {d['ratio_vs_plain']}× | "
            f"{d['plain_loop_steady_photos_per_s']} | {d['kemo_steady_photos_per_s']} | {d['steady_ratio_vs_plain']}× "
            f"| {d['kemo_fixed_cost_s']} s |"]


def _sampled_runs(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    runs = [(f"preprocess, {k}", d["sampled"]) for k, d in report.get("detectors", {}).items()]
    for key in ("cpu", "gpu"):
        runs += [(f"scaling, {p['workers']} {key.upper()}", p["sampled"])
                 for p in (report.get("scaling", {}).get(key) or [])]
    return runs + [(stage, report[stage]["sampled"]) for stage in ("train", "label") if stage in report]


def _sampled_markdown(report: dict[str, Any]) -> list[str]:
    runs = _sampled_runs(report)
    if not runs:
        return []
    lines = ["", "Peak memory (RSS, MiB) of each Ray worker a run started on this node, sampled every "
             f"{report['config']['sample_every']} s; GPU utilisation over the same run.", "",
             "| run | largest worker | each worker | GPU utilisation mean / max | GPU memory max |",
             "|---|---|---|---|---|"]
    for name, s in runs:
        each: dict[str, list[str]] = {}
        for w in s["peak_rss_mib_per_worker"]:
            each.setdefault(w["name"].removeprefix("ray::"), []).append(f"{w['peak_rss_mib']:.0f}")
        gpu = "no GPU" if s["gpu_utilization_pct_mean"] is None else \
            f"{s['gpu_utilization_pct_mean']}% / {s['gpu_utilization_pct_max']:g}%"
        mem = "no GPU" if s["gpu_memory_used_mib_max"] is None else f"{s['gpu_memory_used_mib_max']} MiB"
        lines.append(f"| {name} | {s['peak_rss_mib']} | "
                     + "; ".join(f"{k}: {', '.join(v)}" for k, v in each.items()) + f" | {gpu} | {mem} |")
    return lines
