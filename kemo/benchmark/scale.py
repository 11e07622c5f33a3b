"""The scale stage: what index, preprocess, the training input and label cost per photo, and hold in memory, at N and
10×N photos in one run.

Each job runs as its own process, the driver, joined to the benchmark's Ray (so the same workers serve every size and
the sampler sees them), at three sizes: a handful of photos (:data:`FIXED_PHOTOS`, whose time is the job's fixed cost:
start-up, Ray connection, actors; run twice, the first warming the node's workers up), N and 10×N. Per-photo cost =
(wall − fixed cost) / (photos − the handful's), so a constant start-up does not pass for good scaling. Driver peak
RSS is the process's own (``wait4``'s ``ru_maxrss``, through :data:`LAUNCHER`: the true peak, not a sample); the
largest worker is the sampler's peak over the benchmark's Ray workers while the job ran. Photos are generated with
the generator's texture, so their bytes and decode cost are those of real photos.

The training input is what ``jobs/train.py``'s driver does with the crops (:func:`kemo.classifier.data.plan` and
:func:`~kemo.classifier.data.datasets`), and what a Ray Train worker does with its share
(:func:`kemo.classifier.train.dataset_batches`), run in a Ray task: one epoch decoding every crop (``--cache none``),
then the cached split (``--cache memory``) twice. Beside it, what the model consumes: ``train_model`` at the same size
and batch in the plain in-memory loop, so the report says whether training would be data-bound.

    python -m kemo.benchmark.scale SHARDS IMAGE_SIZE BATCH   # the training-input probe: a PROBE line, then JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.photos import generate
from kemo.benchmark.probes import Sampler, data_path_rates

PROBE = "kemo-probe: "  # the probe's result line, among Ray's log lines on the same stream
FIXED_PHOTOS = 14  # two per emotion: the job's fixed cost
MIB = 2 ** 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Linux keeps a child's peak RSS across exec from the memory it was forked with: a job forked from this process
# would report this process's RSS as its own peak. So a small Python starts the job and reports the job's peak, and
# the bytes it read and wrote (/proc's rchar and wchar: every read and write call, files and sockets alike), read
# from the exited job before it is reaped.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[3:]); "
            "os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT); io = open(f'/proc/{p.pid}/io').read().split(); "
            "_, s, r = os.wait4(p.pid, 0); print(f'{sys.argv[1]}{r.ru_maxrss}', flush=True); "
            "print(sys.argv[2] + ' '.join(io[io.index(k) + 1] for k in ('rchar:', 'wchar:')), flush=True); "
            "sys.exit(os.waitstatus_to_exitcode(s))")
PEAK = "kemo-peak-kib: "
IO = "kemo-io-bytes: "


def _last(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines()[::-1] if line.startswith(prefix))[len(prefix):]


def run_driver(args: list[str], sample_every: float) -> dict[str, Any]:
    """One job as its own driver process joined to this process's Ray: wall seconds, its peak RSS, the MiB it read
    and wrote, the largest Ray worker's peak RSS while it ran, and its stdout. A job that fails fails the stage, with
    its output."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with Sampler(sample_every) as sampler:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, PEAK, IO, sys.executable, *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
    out = proc.stdout.decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
    read, written = (round(int(b) / MIB, 2) for b in _last(out, IO).split())
    return {"seconds": round(seconds, 2), "driver_peak_rss_mib": round(int(_last(out, PEAK)) / 1024, 1),
            "driver_read_mib": read, "driver_written_mib": written,
            "largest_worker_rss_mib": sampler.report()["peak_rss_mib"], "stdout": out}


def scale_benchmark(cfg: BenchmarkConfig, work: str) -> dict[str, Any]:
    import torch

    from kemo.classifier.checkpoint import save_checkpoint
    from kemo.classifier.registry import create_model

    checkpoint = os.path.join(work, "scale-classifier")
    torch.manual_seed(cfg.seed)  # random weights: labelling costs the same
    save_checkpoint(checkpoint, create_model(cfg.train_model), cfg.train_model, {}, image_size=cfg.label_image_size
                    or 64)
    # the handful twice: the first run starts the node's Ray workers and is not counted
    sizes = [FIXED_PHOTOS, FIXED_PHOTOS, cfg.scale_photos, 10 * cfg.scale_photos]
    runs: dict[str, list[dict[str, Any]]] = {"index": [], "preprocess": [], "training_input": [], "label": []}
    photos, incremental, added = [], [], 0
    for k, n in enumerate(sizes):
        d = os.path.join(work, f"scale-{k}-{n}")
        photos.append(generate(os.path.join(d, "corpus"), n, cfg.scale_size, cfg.seed, cfg.texture))
        runs["index"].append(run_driver(["jobs/index.py", "--root", f"{d}/corpus", "--output", f"{d}/index"],
                                        cfg.sample_every))
        runs["preprocess"].append(run_driver(
            ["jobs/preprocess.py", "--input", f"{d}/index", "--output", f"{d}/crops", "--detector",
             cfg.scaling_detector, "--crop-size", str(cfg.scale_image_size)], cfg.sample_every))
        probe = run_driver(["-m", "kemo.benchmark.scale", f"{d}/crops", str(cfg.scale_image_size),
                            str(cfg.train_batch)], cfg.sample_every)
        probe.update(json.loads(_last(probe["stdout"], PROBE)))
        runs["training_input"].append(probe)
        label = ["jobs/label.py", "--input", f"{d}/corpus", "--output", f"{d}/labels", "--checkpoint", checkpoint,
                 "--detector", "haar"]
        runs["label"].append(run_driver(label, cfg.sample_every))
        if k >= 2:  # the same output a day later: a handful more photos, as many as the first run into an empty one
            added = generate(os.path.join(d, "corpus", "added"), FIXED_PHOTOS, cfg.scale_size, cfg.seed + 1,
                             cfg.texture)
            incremental.append(run_driver(label, cfg.sample_every))
    photos = photos[1:]
    runs = {stage: r[1:] for stage, r in runs.items()}
    report: dict[str, Any] = {"photos": photos, "photo_size": cfg.scale_size, "texture": cfg.texture,
                              "crop_and_training_size": cfg.scale_image_size, "stages": {}}
    for stage, (fixed, small, big) in runs.items():
        cost = [1000 * (r["seconds"] - fixed["seconds"]) / (n - photos[0]) for r, n in zip((small, big), photos[1:])]
        entry = {"fixed_cost_s": fixed["seconds"],
                 "ms_per_photo": [round(c, 2) for c in cost], "cost_ratio_10x": round(cost[1] / cost[0], 2),
                 "driver_peak_rss_mib": [r["driver_peak_rss_mib"] for r in (fixed, small, big)],
                 "driver_rss_ratio_10x": round(big["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 2),
                 "largest_worker_rss_mib": [r["largest_worker_rss_mib"] for r in (fixed, small, big)],
                 "seconds": [r["seconds"] for r in (fixed, small, big)]}
        if stage == "index":  # the manifest is held whole: what each record costs the driver
            entry["driver_bytes_per_record"] = round(
                (big["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]) * MIB / (photos[2] - photos[1]))
        if stage == "training_input":
            entry["data_path_images_per_s"] = {k: [r[k] for r in (small, big)]
                                               for k in ("decode_images_per_s", "cached_images_per_s")}
        report["stages"][stage] = entry
    report["label_incremental"] = incremental_report(runs["label"][0], incremental, added)
    report["model_images_per_s"] = model_rate(cfg)
    best = max(report["stages"]["training_input"]["data_path_images_per_s"]["decode_images_per_s"])
    report["training_data_bound_without_cache"] = best < 1.2 * report["model_images_per_s"]
    return report


def incremental_report(first: dict[str, Any], reruns: list[dict[str, Any]], added: int) -> dict[str, Any]:
    """A labelling rerun that adds ``added`` photos to an output of N and of 10×N photos, against the first run of
    as many photos into an empty output: its seconds and driver bytes, and their ratios (the goal: within 2× of the
    first run, and flat from N to 10×N)."""
    keys = ("seconds", "driver_read_mib", "driver_written_mib")
    return {"added": added, "first_run": {k: first[k] for k in keys},
            "reruns": [{k: r[k] for k in keys} for r in reruns],
            "vs_first_run": [{k: round(r[k] / max(first[k], 1e-9), 2) for k in keys} for r in reruns],
            "ratio_10x": {k: round(reruns[1][k] / max(reruns[0][k], 1e-9), 2) for k in keys}}


def model_rate(cfg: BenchmarkConfig) -> float:
    """Images/s that ``train_model`` trains at the stage's size and batch in the plain in-memory loop (two batches,
    two epochs, the first not counted): what the data path has to keep up with."""
    import torch

    from kemo.benchmark.loops import plain_train
    from kemo.classifier.train import RunSpec

    size = cfg.scale_image_size
    spec = RunSpec(model=cfg.train_model, epochs=2, batch_size=cfg.train_batch, image_size=size)
    x = np.random.default_rng(cfg.seed).integers(0, 256, (2 * cfg.train_batch, size, size, 3), dtype=np.uint8)
    y = (np.arange(len(x)) % 7).astype(np.int64)
    threads = torch.get_num_threads()
    return round(plain_train(x, y, spec, threads)[1], 1)


# --------------------------------------------------------------------------------------------------- the probe


def train_input_probe(shards: str, image_size: int, batch_size: int) -> dict[str, Any]:
    """What jobs/train.py's driver does with a crop output, then its train split consumed as a worker would."""
    import ray

    from kemo.classifier.data import datasets, plan
    from kemo.resources import connect

    connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    consume = ray.remote(num_cpus=1)(data_path_rates)  # where a Ray Train worker reads: in a worker
    data = plan(shards, image_size)
    streamed, _ = datasets(data, "none")
    decode = ray.get(consume.remote(streamed["train"], batch_size, 1))[0]
    cached, decision = datasets(data, "memory")
    again = ray.get(consume.remote(cached["train"], batch_size, 2))[1]
    return {"train_photos": data.photos("train"), "decode_images_per_s": decode, "cached_images_per_s": again,
            "decoded_train_val_gb": decision.decoded_train_val_gb}


if __name__ == "__main__":
    print(PROBE + json.dumps(train_input_probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
