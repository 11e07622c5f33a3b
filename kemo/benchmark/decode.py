"""The decode stage: kemo's decoder alone on one core against the plain loop's cv2 decode, and every way of decoding
the same JPEGs (cv2 vs Pillow, full vs DCT-reduced), at each ``--decode-sizes``."""

from __future__ import annotations

import io
import os
from typing import Any

import cv2
import numpy as np
from PIL import Image

from kemo import storage
from kemo.benchmark.config import BenchmarkConfig
from kemo.benchmark.loops import PLAIN_DECODE, plain_decode
from kemo.benchmark.photos import photos
from kemo.benchmark.probes import time_each
from kemo.image import decode


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
