"""The plain loops every ratio of the benchmark is measured against: what a user writes first, one photo at a time.

No Ray, no batching, no decoder threads: ``cv2.imread`` → the same detector kemo runs (on the GPU where there is
one, with torch's default threads, as a user's would be) → the primary face cut square → a JPEG, or the classifier.
Training's plain loop is the model, optimiser and in-memory tensors in this process. Each loop reuses kemo's own
building blocks (detectors, crop geometry, ``train_one_epoch``), so a ratio measures the pipeline around them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from kemo.benchmark.probes import rate
from kemo.crop import clip_box, crop_region, crop_square, encode_jpeg, primary_face, resize_whole
from kemo.detector.base import Detector
from kemo.detector.registry import create_detector
from kemo.settings import CropSettings, DetectorSettings

PLAIN_DECODE = "cv2 full, straight to RGB"  # what the plain loop's cv2.imread(path, IMREAD_COLOR_RGB) does


def plain_decode(data: bytes) -> np.ndarray:
    """The plain loop's decode of bytes already read: cv2 at full size, straight to RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def plain_detector(name: str, weights: str | None) -> Detector:
    """The detector ``name`` as a user would load it: default device (the GPU where there is one), torch's
    default threads (passed on unchanged, so building it changes nothing)."""
    import torch

    return create_detector(DetectorSettings(detector=name, weights=weights), threads=torch.get_num_threads())


def plain_crops(rows: list[dict[str, Any]], det: Detector, crop: CropSettings
                ) -> Iterator[tuple[int, np.ndarray | None]]:
    """The loop a user writes first, up to the crop: cv2.imread → detector → the primary face, cut square (None where
    the photo does not read or shows no face)."""
    for i, row in enumerate(rows):
        rgb = cv2.imread(row["uri"], cv2.IMREAD_COLOR_RGB)  # applies EXIF orientation itself
        if rgb is None:
            yield i, None
            continue
        h, w = rgb.shape[:2]
        if det.whole_photo:
            yield i, resize_whole(rgb, crop.crop_size)
            continue
        inp, (fx, fy) = det.prepare(rgb, (1.0, 1.0))
        (faces,) = det.detect([inp], [row])
        boxes = [clip_box(b * [fx, fy, fx, fy], w, h) for b in faces.boxes]
        keep = [j for j, b in enumerate(boxes) if b is not None]
        best = primary_face(np.asarray([boxes[j] for j in keep]).reshape(-1, 4), faces.scores[keep])
        yield i, None if best is None else crop_square(rgb, crop_region(boxes[keep[best]], crop.margin),
                                                       crop.crop_size)


def plain_preprocess_loop(rows: list[dict[str, Any]], detector_name: str, weights: str | None, crop: CropSettings,
                          out_dir: str) -> tuple[float, float]:
    """(seconds for every photo, seconds for the first third) of the plain preprocessing loop: one photo at a time,
    cv2.imread → detector → crop → write a JPEG into ``out_dir`` (a scratch folder, not the benchmark's output)."""
    t0 = time.perf_counter()
    third = t0
    det = plain_detector(detector_name, weights)
    os.makedirs(out_dir, exist_ok=True)
    for i, face in plain_crops(rows, det, crop):
        if face is not None:
            with open(os.path.join(out_dir, f"{i}.jpg"), "wb") as f:
                f.write(encode_jpeg(face, crop.jpeg_quality))
        if i == len(rows) // 3 - 1:
            third = time.perf_counter()
    return time.perf_counter() - t0, third - t0


def plain_label_loop(rows: list[dict[str, Any]], detector_name: str, weights: str | None, crop: CropSettings,
                     checkpoint: str) -> tuple[float, float]:
    """(seconds for every photo, seconds for the first third) of the plain labelling loop: one photo at a time,
    cv2.imread → detector → crop → the checkpoint's classifier (both on the GPU where there is one). Unlike kemo it
    does not pass the crop through JPEG first, as training crops were: a little less work."""
    import torch

    from kemo.classifier.checkpoint import input_batch, load_checkpoint

    t0 = time.perf_counter()
    third = t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    det = plain_detector(detector_name, weights)
    model, meta = load_checkpoint(checkpoint, device)
    with torch.inference_mode():
        for i, face in plain_crops(rows, det, crop):
            if face is not None:
                torch.softmax(model(input_batch([face], meta, device)), dim=1).cpu()
            if i == len(rows) // 3 - 1:
                third = time.perf_counter()
    return time.perf_counter() - t0, third - t0


def plain_train(x: np.ndarray, y: np.ndarray, spec: Any, threads: int, channels_last: bool = False) -> list[float]:
    """Images/s per epoch of the training loop a user writes first: the model, optimiser and in-memory tensors in
    this process, no Ray; each epoch is the same ``train_one_epoch`` (augmentation, steps, bf16 autocast on GPU) that
    a Ray Train worker runs. ``channels_last`` stores the weights NHWC, so convolutions run NHWC (their inputs
    follow). torch's threads are set to ``threads`` for the loop and restored after."""
    import torch

    from kemo.classifier.registry import create_model
    from kemo.classifier.train import array_batches, train_one_epoch

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
            train_one_epoch(model, optimizer, array_batches(x, y, order, spec.batch_size), spec, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(rate(len(y), time.perf_counter() - t0))
    finally:
        torch.set_num_threads(saved)
    return rates
