"""Export a face-detection dataset in the layout ultralytics trains from (the paper's 2,800/350/350): photos sampled
by person, decoded upright and downsized, ``images/<split>/<hash>.jpg`` with one YOLO label line from the consensus
box. An interrupted export resumes; files of another selection (counts, seed, boxes, size) are removed, so the folders
hold exactly this one; ``data.yaml`` comes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import pyarrow as pa

from kemo import storage
from kemo.crop import clip_box, valid_box
from kemo.data.split import seeded_key
from kemo.image import DecodeError, decode, largest_reduction, probe, read_photo
from kemo.schema import SPLITS
from kemo.settings import InputSettings

log = logging.getLogger(__name__)


@dataclass
class ExportConfig(InputSettings):
    """Export upright, downsized photos and YOLO face labels, split by person."""

    input: str = field(metadata={"help": "index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "local directory for the ultralytics dataset"})
    counts: tuple[int, ...] = field(default=(2800, 350, 350), metadata={
        "help": "photos for train,val,test (the paper's split)"})
    max_side: int = field(default=1280, metadata={"help": "longer side of exported photos (2× a 640 input)"})
    seed: int = field(default=0, metadata={"help": "seed of the person order"})
    jobs: int = field(default=0, metadata={"help": "export threads; 0 = all cores"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if storage.is_s3(self.output):
            raise ValueError("ultralytics trains from a local directory: give a local --output")
        if len(self.counts) != len(SPLITS) or min(self.counts) < 0:
            raise ValueError(f"--counts needs three non-negative numbers, got {self.counts!r}")


@dataclass
class ExportSummary:
    """What an export holds (``summary.json``): photos and persons per split, and every photo's status."""

    counts: dict[str, int]
    statuses: dict[str, int]
    persons: dict[str, int]
    config: dict[str, Any]


def select(rows: list[dict[str, Any]], counts: tuple[int, ...], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Person-disjoint sample: persons in a seeded order fill train, then val, then test, up to each count.

    A person whose photos overflow a split contributes only what fits; the rest of that person is left out rather
    than spilled into the next split. Only photos with a usable consensus box are eligible.
    """
    by_person: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if valid_box(r.get("box")):
            by_person.setdefault(r["person_id"], []).append(r)
    persons = sorted(by_person, key=lambda p: seeded_key(seed, p))
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    split = 0
    for person in persons:
        while split < len(SPLITS) and len(out[SPLITS[split]]) >= counts[split]:
            split += 1
        if split == len(SPLITS):
            break
        photos = sorted(by_person[person], key=lambda r: seeded_key(seed, r["image_id"]))
        out[SPLITS[split]].extend(photos[: counts[split] - len(out[SPLITS[split]])])
    return out


def file_id(image_id: str) -> str:
    """Output name of a photo: a hash, so no input key ever becomes a path."""
    return hashlib.sha1(image_id.encode()).hexdigest()[:20]


def yolo_line(box: list[float], width: int, height: int) -> str | None:
    """``0 cx cy w h`` normalised to the upright frame, from a box clipped to it; None if nothing is left."""
    clipped = clip_box(box, width, height)
    if clipped is None:
        return None
    x1, y1, x2, y2 = clipped
    cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
    return f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def export_one(row: dict[str, Any], split: str, out: str, max_side: int, max_bytes: int) -> str:
    """Write one photo and its label; returns ``exported``, ``skipped`` (already there) or an error status."""
    name = file_id(row["image_id"])
    image_path = os.path.join(out, "images", split, f"{name}.jpg")
    label_path = os.path.join(out, "labels", split, f"{name}.txt")
    if os.path.exists(label_path) and os.path.exists(image_path):  # the label is written last
        return "skipped"
    try:
        data = read_photo(row["uri"], max_bytes)
    except DecodeError as e:
        return e.status
    except Exception:
        return "read_error"
    try:
        # DCT-reduce only while the longer side stays >= max_side (labels are normalised: any scale is exact)
        header, _ = probe(data)
        dec = decode(data, min_side=1, max_scale=largest_reduction(max(header.width, header.height), max_side))
    except DecodeError as e:
        return e.status
    line = yolo_line(row["box"], dec.width, dec.height)
    if line is None:
        return "no_box"
    img = dec.image
    r = max_side / max(img.shape[:2])
    if r < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * r)), max(1, round(img.shape[0] * r))),
                         interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        return "error"
    storage.write_bytes(image_path, enc.tobytes())
    storage.write_bytes(label_path, (line + "\n").encode())
    return "exported"


STAMP = "_export.json"


def file_key(row: dict[str, Any], max_side: int) -> str:
    """What an exported pair depends on besides its image id: the box (its label) and the photo's size."""
    return hashlib.sha1(json.dumps([[round(float(v), 3) for v in row["box"]], max_side]).encode()).hexdigest()[:16]


def _reconcile(out: str, wanted: dict[str, dict[str, str]]) -> int:
    """Keep only exported pairs of this selection made with this box and size; returns how many photos went.

    ultralytics trains on whatever a split's folder holds, so a resumed export must hold exactly this selection.
    ``_export.json`` (written before any photo of the selection) records the key of every pair; pairs of another
    selection, another box or another ``max_side``, and pairs no stamp vouches for, are deleted and re-exported.
    """
    try:
        previous = storage.read_json(os.path.join(out, STAMP))
    except FileNotFoundError:
        previous = {}
    removed = 0
    for split in SPLITS:
        for kind, ext in (("labels", ".txt"), ("images", ".jpg")):
            folder = os.path.join(out, kind, split)
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                stem, _, suffix = name.rpartition(".")
                if "." + suffix != ext:
                    continue
                key = wanted[split].get(stem)
                if key is None or previous.get(split, {}).get(stem) != key:
                    os.remove(os.path.join(folder, name))
                    removed += kind == "images"
    os.makedirs(out, exist_ok=True)
    storage.write_json(os.path.join(out, STAMP), wanted)
    return removed


def run(cfg: ExportConfig, manifest: pa.Table | None = None) -> ExportSummary:
    """Export the dataset under ``cfg.output`` (local) and return a summary; ``data.yaml`` is written last.
    ``manifest`` saves reading ``cfg.input`` again when the caller already holds it."""
    from kemo.data.aihub import load_manifest

    if manifest is None:
        manifest = load_manifest(cfg.input)
    chosen = select(manifest.to_pylist(), tuple(cfg.counts), cfg.seed)
    jobs = [(row, split) for split in SPLITS for row in chosen[split]]
    stale = _reconcile(cfg.output, {s: {file_id(r["image_id"]): file_key(r, cfg.max_side) for r in chosen[s]}
                                    for s in SPLITS})
    with ThreadPoolExecutor(cfg.jobs or os.cpu_count() or 1) as pool:  # cv2 decode/encode release the GIL
        results = list(pool.map(lambda j: export_one(j[0], j[1], cfg.output, cfg.max_side, cfg.max_bytes),
                                 jobs))
    statuses = Counter(results)
    if stale:
        statuses["removed_stale"] = stale
    kept = {s: [r for (r, sp), st in zip(jobs, results) if sp == s and st in ("exported", "skipped")] for s in SPLITS}
    index = pa.Table.from_pylist([{"split": s, "file": file_id(r["image_id"]), "image_id": r["image_id"],
                                   "person_id": r["person_id"], "box": r["box"]} for s in SPLITS for r in kept[s]])
    storage.write_parquet(index, os.path.join(cfg.output, "index.parquet"))
    with open(os.path.join(cfg.output, "data.yaml"), "w") as f:
        f.write(f"path: {os.path.abspath(cfg.output)}\ntrain: images/train\nval: images/val\ntest: images/test\n"
                "names:\n  0: face\n")
    summary = ExportSummary(counts={s: len(kept[s]) for s in SPLITS}, statuses=dict(sorted(statuses.items())),
                            persons={s: len({r["person_id"] for r in kept[s]}) for s in SPLITS},
                            config=dataclasses.asdict(cfg))
    storage.write_json(os.path.join(cfg.output, "summary.json"), dataclasses.asdict(summary))
    log.info("exported %s (%s) to %s", summary.counts, summary.statuses, cfg.output)
    return summary
