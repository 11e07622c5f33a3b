"""A video's label rows and summary row from its segments' results: frames numbered across segments, the status the
video earns, and its emotion shares over its sampled face frames. No Ray here.

Status, first that applies: the probe's (the video did not open: ``decode_error``, ``truncated`` before its index,
``unsupported_codec``, ``empty``, ``too_large``, a read status); a segment's that failed (a read status, or ``error``);
``decode_error`` when packets were there and no frame decoded, ``empty`` when none were; ``truncated`` when the last
frame falls short of the header's duration by more than :func:`shortfall_allowed`; ``error`` when a frame's row is one
(a detector or classifier failure: the video is labelled again on a rerun); ``no_face`` when no sampled frame had a
face; else ``ok``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from kemo.schema import LABELS, TRANSIENT

SHORTFALL_S = 0.5  # a video may end this much (or two frames) before its header's duration and not be truncated


def shortfall_allowed(fps: float | None) -> float:
    """Seconds by which a video's last frame may end before its header's duration."""
    return max(SHORTFALL_S, 2 / fps) if fps else SHORTFALL_S


def frame_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The label rows of a video's segments (in segment order), each frame numbered from the video's start."""
    rows, before = [], 0
    for r in sorted(results, key=lambda r: r["segment"]):
        rows += [{**row, "frame": row["frame"] + before} for row in r["rows"]]
        before += r["frames"] or 0
    return rows


def status_of(probed: dict[str, Any], results: list[dict[str, Any]], rows: list[dict[str, Any]], last: float | None
              ) -> tuple[str, str | None]:
    """(the video's status, why) from its probe, its segments' results and its label rows."""
    if probed["status"]:
        return probed["status"], probed["error"]
    failed = sorted((r for r in results if r["status"]), key=lambda r: (r["status"] not in TRANSIENT, r["segment"]))
    if failed:
        return failed[0]["status"], f"segment {failed[0]['segment']}: {failed[0]['error']}"
    frames = sum(r["frames"] or 0 for r in results)
    stopped = next((r["stopped"] for r in results if r["stopped"]), None)
    if not frames:
        bad = sum(r["bad_packets"] or 0 for r in results)
        if bad or stopped:
            return "decode_error", f"no frame decoded ({bad} packets did not decode{'; ' + stopped if stopped else ''})"
        return "empty", "the video stream holds no frames"
    if probed["duration"] and last is not None and last + (1 / probed["fps"] if probed["fps"] else 0) \
            < probed["duration"] - shortfall_allowed(probed["fps"]):
        why = f"; {stopped}" if stopped else ""
        return "truncated", f"frames end at {last:.3f} s of the {probed['duration']:.3f} s its header claims{why}"
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        return "error", f"{len(errors)} frame rows failed: {errors[0]['error']}"
    if not any(r["status"] == "ok" for r in rows):
        return "no_face", "no sampled frame had a face"
    return "ok", None


def shares(rows: list[dict[str, Any]], classes: list[str]) -> tuple[int, int, list[float] | None, str | None]:
    """(sampled frames whose primary face was labelled, those abstained, the emotion shares over the rest in class
    order, the dominant emotion; None where no frame is left)."""
    faces = [r for r in rows if r["status"] == "ok" and r["face"] == 0]
    kept = Counter(r["label"] for r in faces if not r["abstained"])
    n = sum(kept.values())
    if not n:
        return len(faces), len(faces) - n, None, None
    share = [kept.get(k, 0) / n for k in range(len(classes))]
    return len(faces), len(faces) - n, share, classes[int(np.argmax(share))]


def assemble(probed: dict[str, Any], results: list[dict[str, Any]], classes: list[str], model: str, detector: str
             ) -> tuple[pa.Table, dict[str, Any]]:
    """(the video's label rows, its ``VIDEOS`` summary row), from its header (``probed``: the file's version, the
    header's fields, and a status where it did not open) and its segments' results."""
    rows = frame_rows(results)
    times = [r["last_time"] for r in results if r["last_time"] is not None]
    last = max(times) if times else None
    status, error = status_of(probed, results, rows, last)
    first = next((r for r in sorted(results, key=lambda r: r["segment"]) if r["upright_width"]), None)
    face_frames, abstained, share, dominant = shares(rows, classes)
    summary = {k: probed[k] for k in ("uri", "size", "mtime_ns", "etag", "container", "codec", "duration", "fps")}
    summary.update(
        status=status, error=error, rotation=first["rotation"] if first else None,
        width=first["upright_width"] if first else probed["width"],
        height=first["upright_height"] if first else probed["height"],
        frames_decoded=sum(r["frames"] or 0 for r in results), frames_sampled=len({r["sample"] for r in rows}),
        last_time=last, bad_packets=sum(r["bad_packets"] or 0 for r in results), segments=len(results),
        face_frames=face_frames, abstained=abstained, shares=share, dominant=dominant, model=model, detector=detector)
    return pa.Table.from_pylist(rows, schema=LABELS), summary
