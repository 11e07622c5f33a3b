"""The manifest's split by person (8:1:1 by image count, no person in two splits) and its balanced sample per class,
both in a seeded order that does not depend on the listing's order."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from kemo.classes import EMOTIONS, UNKNOWN
from kemo.schema import SPLITS

SHARES = (0.8, 0.1, 0.1)


def seeded_key(seed: int, key: str) -> bytes:
    """A sort key that orders strings at random, the same for the same seed on every machine."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def assign_splits(weights: dict[str, int], seed: int, shares: tuple[float, ...] = SHARES) -> dict[str, str]:
    """Person → split. Persons in a seeded random order fill train, val, test by image count, each going where the
    middle of its images falls, so shares are exact to within half a person's images and no person is split."""
    total = sum(weights.values())
    bounds = [sum(shares[: i + 1]) / sum(shares) * total for i in range(len(shares))]
    out, acc = {}, 0.0
    for person in sorted(weights, key=lambda p: seeded_key(seed, p)):
        mid = acc + weights[person] / 2
        out[person] = SPLITS[next((i for i, b in enumerate(bounds) if mid < b), len(SPLITS) - 1)]
        acc += weights[person]
    return out


@dataclass
class Sample:
    """How the balanced sample went: per class (by name) the rows ``available`` and ``taken`` by agreement level
    (``{"3": n, "2": n}``) and how many it is ``short`` of ``per_class``."""

    per_class: int
    classes: dict[str, dict[str, Any]]
    short_classes: list[str]


def balanced_sample(rows: list[dict[str, Any]], per_class: int, seed: int) -> tuple[list[dict[str, Any]], Sample]:
    """Up to ``per_class`` rows per class, unanimous (agree_n 3) first, then 2; seeded order within each level."""
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["label"] != UNKNOWN:
            by_class[r["label"]].append(r)
    taken, report = [], {}
    for emo in EMOTIONS:
        cand = sorted(by_class[emo.index], key=lambda r: (-r["agree_n"], seeded_key(seed, r["image_id"])))
        take = cand[:per_class]
        taken.extend(take)
        report[emo.name] = {
            "available": {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in cand).items(), reverse=True)},
            "taken": {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in take).items(), reverse=True)},
            "short": max(0, per_class - len(take)),
        }
    return taken, Sample(per_class, report, [name for name, r in report.items() if r["short"]])


def split_by_person(rows: list[dict[str, Any]], seed: int, shares: tuple[float, ...]) -> None:
    """Set every row's ``split`` from its person, persons weighed by their labelled images."""
    weights: Counter[str] = Counter()
    for r in rows:
        weights[r["person_id"]] += r["label"] != UNKNOWN
    splits = assign_splits(weights, seed, shares)
    for r in rows:
        r["split"] = splits[r["person_id"]]
