"""One AI-Hub label record → manifest fields: the annotators' majority label, their consensus face box, and the
uploader's metadata. Annotator keys may be ``annot_*`` or ``faceBB_*``; keys are compared lower-cased."""

from __future__ import annotations

import math
import posixpath
import re
from collections import Counter
from typing import Any

from kemo.classes import UNKNOWN, class_index

ANNOTATORS = ("A", "B", "C")
ANNOTATOR_KEYS = ("annot_", "facebb_")  # releases differ (faceBB_A …); keys are compared lower-cased
MAX_COORD = 65535  # no JPEG is larger: a coordinate beyond it is a broken box, not a big face
AGE_RANGE = (0, 120)
_PERSON = re.compile(r"^([0-9a-fA-F]{64})(?:_|$)")


def lower_keys(d: dict) -> dict:
    return {k.lower() if isinstance(k, str) else k: v for k, v in d.items()}


def parse_box(raw: Any) -> tuple[list[float] | None, str]:
    """(xyxy box or None, what happened): corners sorted, clipped at 0; zero-area or malformed boxes → None.

    The right and bottom edges are clipped to the frame later, where the decoded image's size is known.
    """
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if not isinstance(raw, dict):
        return None, "missing"
    raw = lower_keys(raw)
    try:
        x1, y1, x2, y2 = (float(raw[k]) for k in ("minx", "miny", "maxx", "maxy"))
    except (KeyError, TypeError, ValueError):
        return None, "malformed"
    if not all(math.isfinite(v) and abs(v) <= MAX_COORD for v in (x1, y1, x2, y2)):
        return None, "malformed"
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    clipped = min(x1, y1) < 0
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), max(x2, 0.0), max(y2, 0.0)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None, "empty"
    return [x1, y1, x2, y2], "clipped" if clipped else "ok"


def majority(votes: list[int]) -> tuple[int, int]:
    """(label, agree_n): the class chosen by at least two annotators and more than any other; else (-1, 0)."""
    counts = Counter(v for v in votes if v != UNKNOWN).most_common()
    if not counts or counts[0][1] < 2 or (len(counts) > 1 and counts[1][1] == counts[0][1]):
        return UNKNOWN, 0
    return counts[0]


def mean_box(boxes: list[list[float]]) -> list[float] | None:
    if not boxes:
        return None
    return [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]


def _age(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)) and math.isfinite(raw):
        age = int(raw)
    else:
        m = re.search(r"\d+", raw) if isinstance(raw, str) else None
        age = int(m.group()) if m else None
    return age if age is not None and AGE_RANGE[0] <= age <= AGE_RANGE[1] else None


def _gender(raw: Any) -> str | None:
    return {"남": "M", "여": "F", "m": "M", "f": "F", "male": "M", "female": "F"}.get(str(raw).strip().lower())


def _is_prof(raw: Any) -> bool | None:
    return {"전문인": True, "일반인": False}.get(str(raw).strip())


def person_of(filename: str) -> str | None:
    m = _PERSON.match(filename)
    return m.group(1).lower() if m else None


def _annotators(rec: dict) -> tuple[list[int], list[list[float] | None], list[str]]:
    """(votes, boxes, box notes) of annotators A, B and C; a missing annotator votes UNKNOWN with no box."""
    votes, boxes, notes = [], [], []
    for letter in ANNOTATORS:
        ann = next((rec[k + letter.lower()] for k in ANNOTATOR_KEYS if isinstance(rec.get(k + letter.lower()), dict)),
                   None)
        if ann is None:
            votes.append(UNKNOWN)
            boxes.append(None)
            notes.append("missing")
            continue
        ann = lower_keys(ann)
        votes.append(class_index(ann.get("faceexp")))
        box, note = parse_box(ann.get("boxes"))
        boxes.append(box)
        notes.append(note)
    if notes == ["missing"] * len(ANNOTATORS):
        notes = ["no_annotators"]
    return votes, boxes, notes


def parse_record(rec: Any) -> dict[str, Any]:
    """One JSON record (NFC already) → manifest fields, without uri, split or image_id. Raises ValueError if unusable.

    Box notes are returned in ``_boxes`` for the report.
    """
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    rec = lower_keys(rec)
    filename = rec.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise ValueError("record has no filename")
    filename = posixpath.basename(filename.strip().replace("\\", "/"))
    votes, boxes, notes = _annotators(rec)
    label, agree_n = majority(votes)
    agreeing = [b for v, b in zip(votes, boxes) if b is not None and v == label != UNKNOWN]
    # The face location is known even where the emotion is not: fall back to every annotator's box.
    box = mean_box(agreeing) or mean_box([b for b in boxes if b is not None])
    return {
        "filename": filename,
        "person_id": person_of(filename),
        "label": label,
        "agree_n": agree_n,
        "votes": votes,
        "box": box,
        "uploader_label": class_index(rec.get("faceexp_uploader")),
        "gender": _gender(rec.get("gender")),
        "age": _age(rec.get("age")),
        "is_prof": _is_prof(rec.get("isprof")),
        "background": rec.get("bg_uploader") if isinstance(rec.get("bg_uploader"), str) else None,
        "_boxes": notes,
    }
