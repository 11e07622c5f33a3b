"""The video stage: kemo's label job on generated clips against the plain loop a user writes first
(``cv2.VideoCapture`` → every frame read, one per sampling interval taken → the same detector → crop → classifier),
with the same detector and a classifier of random weights, and decode-only frames per second on the same clip.
"""

from __future__ import annotations

import os
import time
from typing import Any

import cv2
import numpy as np

from kemo.benchmark.config import BenchmarkConfig, crop_settings
from kemo.benchmark.label import part_receipts, random_classifier
from kemo.benchmark.loops import plain_detector
from kemo.benchmark.preprocess import resources_of
from kemo.benchmark.probes import Sampler, rate
from kemo.crop import clip_box, crop_region, crop_square, primary_face, resize_whole

CLIPS = 4  # clips of CLIP_SECONDS each, labelled in segments of SEGMENT_SECONDS: 4 × 4 work units
CLIP_SECONDS = 60
CLIP_FPS = 30
CLIP_SIZE = (1280, 720)
SEGMENT_SECONDS = 15
SAMPLE_FPS = 2.0


def clip(path: str, seed: int, seconds: float = CLIP_SECONDS, fps: float = CLIP_FPS,
         size: tuple[int, int] = CLIP_SIZE) -> str:
    """A generated clip (mp4v): a face that moves across the frame, there for 10 s, then away for 10 s."""
    from kemo.data import synth

    w, h = size
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    rng = np.random.default_rng(seed)
    base = np.empty((h, w, 3), np.uint8)
    base[:] = rng.integers(60, 200, 3)
    side = h // 2
    for i in range(int(seconds * fps)):
        frame = base.copy()
        if (i // int(fps * 10)) % 2 == 0:
            x = (i * 5) % (w - side)
            synth.draw_face(frame, (x, h // 5, x + side * 0.8, h // 5 + side), i % 7, synth._person(seed, 0), rng)
        writer.write(frame)
    writer.release()
    return path


def _face(det: Any, rgb: np.ndarray, row: dict[str, Any], crop: BenchmarkConfig) -> np.ndarray | None:
    """The plain loop's face of one frame: the detector, the primary face cut square (None: no face). The body of
    :func:`kemo.benchmark.loops.plain_crops` for a frame in hand, which that loop reads from a file itself."""
    h, w = rgb.shape[:2]
    if det.whole_photo:
        return resize_whole(rgb, crop.crop_size)
    inp, (fx, fy) = det.prepare(rgb, (1.0, 1.0))
    (faces,) = det.detect([inp], [row])
    boxes = [clip_box(b * [fx, fy, fx, fy], w, h) for b in faces.boxes]
    keep = [j for j, b in enumerate(boxes) if b is not None]
    best = primary_face(np.asarray([boxes[j] for j in keep]).reshape(-1, 4), faces.scores[keep])
    return None if best is None else crop_square(rgb, crop_region(boxes[keep[best]], crop.margin), crop.crop_size)


def plain_video_loop(paths: list[str], every: float, detector_name: str, weights: str | None, crop: BenchmarkConfig,
                     checkpoint: str) -> tuple[float, int]:
    """(seconds, frames sampled) of the plain loop over ``paths``: every frame read by ``cv2.VideoCapture``, one in
    each ``every`` seconds of its frame rate taken through the detector, the primary face's crop and the classifier,
    one at a time."""
    import torch

    from kemo.classifier.checkpoint import input_batch, load_checkpoint

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    det = plain_detector(detector_name, weights)
    model, meta = load_checkpoint(checkpoint, device)
    sampled = 0
    with torch.inference_mode():
        for path in paths:
            capture = cv2.VideoCapture(path)
            step = max(1, round(capture.get(cv2.CAP_PROP_FPS) * every))
            i = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                if i % step == 0:
                    sampled += 1
                    face = _face(det, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), {"uri": path}, crop)
                    if face is not None:
                        torch.softmax(model(input_batch([face], meta, device)), dim=1).cpu()
                i += 1
            capture.release()
    return time.perf_counter() - t0, sampled


def decode_rates(path: str) -> dict[str, float]:
    """Decode-only frames per second of one clip: PyAV (kemo's decoder; frames left in YUV, and converted to RGB)
    and ``cv2.VideoCapture.read`` (BGR), each over every frame."""
    import av

    out = {}
    for name, rgb in (("pyav_fps", False), ("pyav_rgb_fps", True)):
        t0, n = time.perf_counter(), 0
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO"
            for frame in container.decode(stream):
                if rgb:
                    frame.to_ndarray(format="rgb24")
                n += 1
        out[name] = rate(n, time.perf_counter() - t0)
    t0, n, capture = time.perf_counter(), 0, cv2.VideoCapture(path)
    while capture.read()[0]:
        n += 1
    capture.release()
    out["cv2_read_fps"] = rate(n, time.perf_counter() - t0)
    return out


def video_benchmark(cfg: BenchmarkConfig, cluster: dict[str, float], work: str) -> dict[str, Any]:
    """kemo's label job on :data:`CLIPS` generated clips against :func:`plain_video_loop` on the same clips, with the
    same detector and a K-EmotionNet of random weights, sampling :data:`SAMPLE_FPS` frames a second; kemo's steady
    rate is timed between its first and last part (a part a video), and decode-only rates on the first clip."""
    from kemo.label import LabelConfig
    from kemo.label import run as label
    from kemo.preprocess import steady_rate
    from kemo.resources import cluster_nodes, resolve_resources

    checkpoint = os.path.join(work, "video-classifier")
    detector, size = random_classifier(cfg, cluster, checkpoint)
    folder = os.path.join(work, "clips")
    os.makedirs(folder, exist_ok=True)
    paths = [clip(os.path.join(folder, f"clip{k}.mp4"), cfg.seed + k) for k in range(CLIPS)]
    with Sampler(cfg.sample_every):
        plain_s, plain_n = plain_video_loop(paths, 1 / SAMPLE_FPS, detector, cfg.weights, cfg, checkpoint)
    lcfg = LabelConfig(input=folder, output=os.path.join(work, "video-labels"), checkpoint=checkpoint,
                       detector=detector, weights=cfg.weights, **crop_settings(cfg), fps=SAMPLE_FPS,
                       segment_seconds=SEGMENT_SECONDS, rows_per_part=1, gallery=0)
    with Sampler(cfg.sample_every) as sampler:
        t0 = time.perf_counter()
        summary = label(lcfg)
        kemo_s = time.perf_counter() - t0
    plain_rate, kemo_rate = rate(plain_n, plain_s), rate(summary.frames, kemo_s)
    kemo_steady = steady_rate(part_receipts(lcfg.output)) or kemo_rate
    return {
        "detector": detector, "classifier": "kemotionnet", "image_size": size, "clips": CLIPS,
        "clip": f"{CLIP_SECONDS} s of {CLIP_SIZE[0]}x{CLIP_SIZE[1]} at {CLIP_FPS} fps, mp4v",
        "sample_fps": SAMPLE_FPS, "segment_seconds": SEGMENT_SECONDS, "frames_sampled": summary.frames,
        "plain_loop_frames_per_s": plain_rate, "kemo_frames_per_s": kemo_rate,
        "ratio_vs_plain": round(kemo_rate / plain_rate, 2), "kemo_steady_frames_per_s": kemo_steady,
        "steady_ratio_vs_plain": round(kemo_steady / plain_rate, 2), "decode_only": decode_rates(paths[0]),
        "video_statuses": summary.video_statuses, "segment_actors": summary.segment_actors,
        "resources": resources_of(resolve_resources(lcfg, cluster_nodes())), "sampled": sampler.report(),
    }
