"""Index an AI-Hub "한국인 감정인식을 위한 복합 영상" root (local or ``s3://``) into manifest rows
(docs/design.md, «Corpus facts the code respects»).

    python jobs/index.py --root s3://bucket/aihub --output s3://bucket/kemo/index [--per-class 7000] [--seed 0]

The label is the annotators' majority, never the folder. Every string is NFC-normalised; JSON may be UTF-8 (with or
without BOM) or cp949; annotator keys may be ``annot_*`` or ``faceBB_*``. Images are split 8:1:1 by person (the
64-hex file-name prefix), so no person is in two splits. Records without an image and images without a record are
reported, not fatal. A rerun that finds the same manifest committed writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kemo import outputs, storage
from kemo.classes import EMOTIONS, KOREAN_NAMES, UNKNOWN, class_index
from kemo.schema import MANIFEST, SPLITS
from kemo.settings import InputSettings

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"})
ANNOTATORS = ("A", "B", "C")
ANNOTATOR_KEYS = ("annot_", "facebb_")  # releases differ (faceBB_A …); keys are compared lower-cased
MAX_JSON_DEPTH = 32  # an AI-Hub label file nests 5 deep (list → record → annotator → boxes → value)
MAX_COORD = 65535  # no JPEG is larger: a coordinate beyond it is a broken box, not a big face
AGE_RANGE = (0, 120)
_PERSON = re.compile(r"^([0-9a-fA-F]{64})(?:_|$)")
_EMOTION_IN_NAME = re.compile(r"EMOIMG_([^_\]/]+)_|\(([^)]+)\)\.json$")
KIND = outputs.INDEX
MANIFEST_FILE = "manifest.parquet"
REPORT = "report.json"


@dataclass(kw_only=True)
class IndexConfig(InputSettings):
    """Index an AI-Hub root into a manifest of labelled images (label files, too, are read within --max-bytes)."""

    root: str = field(metadata={"help": "AI-Hub root: local path or s3://bucket/prefix"})
    output: str = field(metadata={"help": "output directory (local or s3://): manifest.parquet, report.json"})
    per_class: int = field(default=0, metadata={"help": "balanced sample of N per class, unanimous first; 0 = all"})
    seed: int = field(default=0, metadata={"help": "seed of the person split and of the sample"})
    split: tuple[float, ...] = field(default=(0.8, 0.1, 0.1), metadata={"help": "train,val,test shares, by person"})
    smoke_test: bool = field(default=False, metadata={
        "help": "list the root but read only its first label file: checks the layout and the credentials quickly"})


def nfc(value: Any) -> Any:
    """NFC-normalise every string (and dict key) in a JSON value. Keys are matched case-insensitively later."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [nfc(v) for v in value]
    if isinstance(value, dict):
        return {nfc(k): nfc(v) for k, v in value.items()}
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, depth + 1)
            stack.extend((x, depth + 1) for x in v)
    return deepest


def decode_json(data: bytes) -> tuple[Any, str]:
    """(parsed JSON with NFC strings, encoding used): UTF-8 with or without BOM, UTF-16 with BOM, or cp949.
    Nesting deeper than ``MAX_JSON_DEPTH`` is refused (ValueError), not parsed into a ``RecursionError``."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        candidates = ("utf-16",)
    else:
        candidates = ("utf-8-sig", "cp949")
    for enc in candidates:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        used = "utf-8-sig" if enc == "utf-8-sig" and data[:3] == b"\xef\xbb\xbf" else enc.replace("-sig", "")
        try:
            value = json.loads(text)
        except RecursionError:  # the C parser gives up on deep nesting this way
            raise ValueError(f"JSON nested deeper than Python can parse (over {MAX_JSON_DEPTH} levels)") from None
        if json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels: not an AI-Hub label file")
        return nfc(value), used
    raise ValueError("not UTF-8, UTF-16 or cp949 text")


# --------------------------------------------------------------------------------------------------- one record


def parse_box(raw: Any) -> tuple[list[float] | None, str]:
    """(xyxy box or None, what happened): corners sorted, clipped at 0; zero-area or malformed boxes → None.

    The right and bottom edges are clipped to the frame later, where the decoded image's size is known.
    """
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if not isinstance(raw, dict):
        return None, "missing"
    raw = _lower_keys(raw)
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


def _lower_keys(d: dict) -> dict:
    return {k.lower() if isinstance(k, str) else k: v for k, v in d.items()}


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


def parse_record(rec: Any) -> dict[str, Any]:
    """One JSON record (NFC already) → manifest fields, without uri, split or image_id. Raises ValueError if unusable.

    Box notes are returned in ``_boxes`` for the report.
    """
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    rec = _lower_keys(rec)
    filename = rec.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise ValueError("record has no filename")
    filename = posixpath.basename(filename.strip().replace("\\", "/"))
    votes, boxes, notes = [], [], []
    for letter in ANNOTATORS:
        ann = next((rec[k + letter.lower()] for k in ANNOTATOR_KEYS if isinstance(rec.get(k + letter.lower()), dict)),
                   None)
        if ann is None:
            votes.append(UNKNOWN)
            boxes.append(None)
            notes.append("missing")
            continue
        ann = _lower_keys(ann)
        votes.append(class_index(ann.get("faceexp")))
        box, note = parse_box(ann.get("boxes"))
        boxes.append(box)
        notes.append(note)
    if notes == ["missing"] * len(ANNOTATORS):
        notes = ["no_annotators"]
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


# --------------------------------------------------------------------------------------------------- the corpus


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _shown(rel: str) -> str:
    """A listed key as report text: names that are not UTF-8 shown as cp949 (what a Korean archive holds)."""
    return "/".join(part if _valid_utf8(part) else part.encode("utf-8", "surrogateescape").decode("cp949", "replace")
                    for part in rel.split("/"))


def _is_label_file(rel_nfc: str) -> bool:
    name = posixpath.basename(rel_nfc)
    return name.lower().endswith(".json") and ("[라벨]" in rel_nfc or name.startswith("img_emotion"))


def _folder_emotion(rel_nfc: str) -> int:
    for m in _EMOTION_IN_NAME.finditer(rel_nfc):
        c = class_index(m.group(1) or m.group(2))
        if c != UNKNOWN:
            return c
    return UNKNOWN


def _release(rel_nfc: str) -> str:
    """The path up to and including the release's own Training/Validation folder ('' when there is none)."""
    parts = rel_nfc.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.lower() in ("training", "validation"):
            return "/".join(parts[: i + 1])
    return ""


def _unit(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def assign_splits(weights: dict[str, int], seed: int, shares: tuple[float, ...] = (0.8, 0.1, 0.1)) -> dict[str, str]:
    """Person → split. Persons in a seeded random order fill train, val, test by image count, each going where the
    middle of its images falls, so shares are exact to within half a person's images and no person is split."""
    total = sum(weights.values())
    bounds = [sum(shares[: i + 1]) / sum(shares) * total for i in range(len(shares))]
    out, acc = {}, 0.0
    for person in sorted(weights, key=lambda p: _unit(seed, p)):
        mid = acc + weights[person] / 2
        out[person] = SPLITS[next((i for i, b in enumerate(bounds) if mid < b), len(SPLITS) - 1)]
        acc += weights[person]
    return out


def balanced_sample(rows: list[dict[str, Any]], per_class: int, seed: int) -> tuple[list[dict[str, Any]], dict]:
    """Up to ``per_class`` rows per class, unanimous (agree_n 3) first, then 2; seeded order within each level."""
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["label"] != UNKNOWN:
            by_class[r["label"]].append(r)
    taken, report = [], {}
    for emo in EMOTIONS:
        cand = sorted(by_class[emo.index], key=lambda r: (-r["agree_n"], _unit(seed, r["image_id"])))
        take = cand[:per_class]
        taken.extend(take)
        report[emo.name] = {
            "available": {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in cand).items(), reverse=True)},
            "taken": {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in take).items(), reverse=True)},
            "short": max(0, per_class - len(take)),
        }
    return taken, {"per_class": per_class, "classes": report,
                   "short_classes": [name for name, r in report.items() if r["short"]]}


def index(root: str, seed: int = 0, shares: tuple[float, ...] = (0.8, 0.1, 0.1),
          per_class: int = 0, label_files_limit: int = 0, inputs: InputSettings | None = None
          ) -> tuple[pa.Table, dict[str, Any]]:
    """(manifest table, report) for an AI-Hub root. Nothing is written. Entries that are not readable files (broken
    or outside links, FIFOs, devices, unlistable folders) are reported, and never become manifest rows."""
    inputs = inputs or InputSettings()
    entries = [e for e in storage.list_input(root, inputs.links) if not storage.os_metadata(e.rel)]
    images: dict[str, list[storage.FileEntry]] = defaultdict(list)
    label_files, undecodable = [], []
    problems = [{"path": _shown(e.rel), "status": e.status, "error": e.error} for e in entries if e.status]
    for e in entries:
        if not _valid_utf8(e.rel):  # e.g. cp949 bytes from `unzip` of a Korean zip: rename with convmv first
            undecodable.append(_shown(e.rel))
            continue
        rel = unicodedata.normalize("NFC", e.rel)
        ext = posixpath.splitext(rel)[1].lower()
        if ext in IMAGE_EXTS:
            images[posixpath.basename(rel).casefold()].append(e)
        elif _is_label_file(rel):
            label_files.append(e)
    log.info("%s: %d label files, %d images", root, len(label_files), sum(len(v) for v in images.values()))
    if label_files_limit:
        label_files = sorted(label_files, key=lambda e: e.rel)[:label_files_limit]

    report: dict[str, Any] = {"root": root, "label_files": [], "bad_records": [], "missing_images": [],
                              "duplicate_records": [], "ambiguous_images": [], "unusable_images": [],
                              "boxes": Counter(), "no_person_id": 0, "no_box": 0, "links": inputs.links,
                              "not_files": dict(sorted(Counter(p["status"] for p in problems).items())),
                              "not_file_entries": problems}
    claimed: dict[str, str] = {}  # image uri → label file that claimed it
    rows, folder_counts = [], defaultdict(Counter)
    for lf in label_files:
        lf_rel = unicodedata.normalize("NFC", lf.rel)
        folder = _folder_emotion(lf_rel)
        release = _release(lf_rel)
        source = release.rsplit("/", 1)[-1]
        try:
            if lf.status:
                raise ValueError(f"{lf.status}: {lf.error}")
            if lf.size > inputs.max_bytes:
                raise ValueError(f"label file of {lf.size} bytes exceeds the {inputs.max_bytes}-byte limit")
            records, encoding = decode_json(storage.read_bounded(lf.uri, inputs.max_bytes))
            if not isinstance(records, list):
                raise ValueError("top level is not a list of records")
        except (ValueError, OSError) as e:  # OSError: unreadable, vanished, a FIFO (never read)
            report["label_files"].append({"path": lf_rel, "error": str(e)})
            log.warning("unreadable label file %s: %s", lf_rel, e)
            continue
        keys = sorted({k[:-1] for r in records if isinstance(r, dict) for k in r
                       if isinstance(k, str) and k[:-1].lower() in ANNOTATOR_KEYS})
        report["label_files"].append({"path": lf_rel, "encoding": encoding, "records": len(records),
                                      "annotator_keys": keys, "folder_label": folder})
        for i, rec in enumerate(records):
            try:
                fields = parse_record(rec)
            except ValueError as e:
                report["bad_records"].append({"label_file": lf_rel, "index": i, "error": str(e)})
                continue
            report["boxes"].update(fields.pop("_boxes"))
            name = fields.pop("filename")
            candidates = images.get(name.casefold(), [])
            if not candidates:
                report["missing_images"].append({"label_file": lf_rel, "filename": name})
                continue
            if len(candidates) > 1:  # prefer the same release folder and emotion; report the ambiguity
                korean = KOREAN_NAMES[folder] if folder != UNKNOWN else "\0"
                candidates = sorted(candidates, key=lambda e: (
                    bool(e.status), _release(unicodedata.normalize("NFC", e.rel)) != release,
                    korean not in unicodedata.normalize("NFC", e.rel), e.rel))
                report["ambiguous_images"].append({"filename": name, "chosen": candidates[0].rel,
                                                   "candidates": len(candidates)})
            entry = candidates[0]
            if entry.status:  # a broken or outside link, a FIFO…: the record is reported, its "image" never opened
                report["unusable_images"].append({"label_file": lf_rel, "filename": name, "path": entry.rel,
                                                  "status": entry.status, "error": entry.error})
                continue
            if entry.uri in claimed:
                report["duplicate_records"].append({"label_file": lf_rel, "filename": name,
                                                    "first_in": claimed[entry.uri]})
                continue
            claimed[entry.uri] = lf_rel
            if fields["person_id"] is None:
                report["no_person_id"] += 1
                fields["person_id"] = "file:" + posixpath.splitext(name)[0]
            report["no_box"] += fields["box"] is None
            folder_counts[folder][fields["label"]] += 1
            rows.append({"image_id": unicodedata.normalize("NFC", entry.rel), "uri": entry.uri,
                         "source": source, **fields})

    report["undecodable_names"] = undecodable
    report["orphan_images"] = sorted(unicodedata.normalize("NFC", e.rel) for v in images.values() for e in v
                                     if e.uri not in claimed and not e.status)
    report["boxes"] = dict(report["boxes"])
    report["folder_purity"] = {
        (KOREAN_NAMES[f] if f != UNKNOWN else "?"): round(c[f] / sum(c.values()), 4) if f != UNKNOWN else None
        for f, c in sorted(folder_counts.items())}
    report["indexed"] = len(rows)
    if per_class:
        rows, report["sample"] = balanced_sample(rows, per_class, seed)
    weights = Counter()
    for r in rows:
        weights[r["person_id"]] += r["label"] != UNKNOWN
    splits = assign_splits(weights, seed, shares)
    for r in rows:
        r["split"] = splits[r["person_id"]]
    rows.sort(key=lambda r: r["image_id"])

    report["rows"] = len(rows)
    report["labels"] = {(EMOTIONS[k].name if k != UNKNOWN else "unknown"): v
                        for k, v in sorted(Counter(r["label"] for r in rows).items())}
    report["agree_n"] = {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in rows).items())}
    report["splits"] = {s: {"images": sum(r["split"] == s for r in rows),
                            "labelled": sum(r["split"] == s and r["label"] != UNKNOWN for r in rows),
                            "persons": len({r["person_id"] for r in rows if r["split"] == s})} for s in SPLITS}
    table = pa.Table.from_pylist(rows, schema=MANIFEST)
    return table, report


def summarize(report: dict[str, Any]) -> str:
    """Human-readable lines for the log: what was found, what was missing, how the sample went."""
    lines = [f"indexed {report['indexed']} images from {len(report['label_files'])} label files; "
             f"{report['rows']} manifest rows",
             f"labels: {report['labels']}  agree_n: {report['agree_n']}",
             "splits: " + ", ".join(f"{s} {v['labelled']} labelled / {v['persons']} persons"
                                    for s, v in report["splits"].items()),
             f"records without image: {len(report['missing_images'])}, images without record: "
             f"{len(report['orphan_images'])}, bad records: {len(report['bad_records'])}, "
             f"duplicate records: {len(report['duplicate_records'])}, undecodable names: "
             f"{len(report['undecodable_names'])}, boxes: {report['boxes']}",
             f"entries that are not files (never opened): {report['not_files'] or 0}, records whose image is one: "
             f"{len(report['unusable_images'])}"]
    if "sample" in report:
        s = report["sample"]
        for name, c in s["classes"].items():
            lines.append(f"  sample {name:<12} took {c['taken']} of {c['available']}"
                         + (f"  SHORT by {c['short']}" if c["short"] else ""))
        if s["short_classes"]:
            lines.append(f"classes short of {s['per_class']}: {', '.join(s['short_classes'])}")
    return "\n".join(lines)


def run(cfg: IndexConfig) -> dict[str, Any]:
    """Index ``cfg.root`` and commit ``manifest.parquet`` and ``report.json`` under ``cfg.output``."""
    shares = tuple(float(x) for x in cfg.split)
    if len(shares) != len(SPLITS) or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"--split needs three non-negative shares, got {cfg.split!r}")
    out = outputs.Output(cfg.output, KIND)
    out.manifest()  # another kind of output is refused before the corpus is listed
    table, report = index(cfg.root, cfg.seed, shares, cfg.per_class, label_files_limit=1 if cfg.smoke_test else 0,
                          inputs=cfg)
    settings = dataclasses.asdict(cfg)
    settings.pop("output")
    fingerprint = {"settings": settings, "manifest_sha256": outputs.table_sha256(table)}
    if out.current(fingerprint) is not None:
        log.info("%s already holds this index, committed: nothing written", cfg.output)
    else:
        with out.lease() as lease:
            out.uncommit()
            files = [out.write_file(MANIFEST_FILE, outputs.parquet_bytes(table)),
                     out.write_json(REPORT, report)]
            lease.check()
            out.commit(files, dataclasses.asdict(cfg), fingerprint)
    log.info("%s", summarize(report))
    return report


def load_manifest(uri: str) -> pa.Table:
    """A manifest from an index output directory (through its commit manifest) or from a Parquet file."""
    if uri.endswith(".parquet"):
        return storage.read_parquet(uri)
    out = outputs.Output(uri, KIND)
    out.committed()
    return storage.read_parquet(out.path(MANIFEST_FILE))


def load_or_index(input: str, index_dir: str, per_class: int = 0, seed: int = 0, index: bool = True,
                  inputs: InputSettings | None = None) -> pa.Table | None:
    """The manifest a job works on: ``input`` is a manifest .parquet, an index output, or an AI-Hub root, which is
    then indexed into ``index_dir`` (once: a resumed job reuses its own index and refuses one of other settings).
    ``index=False``: None where indexing would be needed, so that nothing is written."""
    if input.endswith(".parquet"):
        return load_manifest(input)
    if not storage.is_s3(input) and os.path.isfile(input):
        raise NotADirectoryError(f"--input {input} is a file, not a folder: give an AI-Hub root, an index output or a "
                                 "manifest .parquet")
    if not storage.is_s3(input) and not os.path.isdir(input):
        raise FileNotFoundError(f"--input {input}: no such folder")
    try:
        return load_manifest(input)  # an index output directory
    except FileNotFoundError:
        if storage.exists(storage.join(input, MANIFEST_FILE)):
            raise ValueError(f"{input} holds an index that was never committed (crashed?): "
                             "run jobs/index.py again") from None
    inputs = inputs or InputSettings()
    wanted = IndexConfig(root=input, output=index_dir, per_class=per_class, seed=seed, max_bytes=inputs.max_bytes,
                         links=inputs.links)
    try:  # a different index would silently change the inputs
        # an index committed by an older kemo has no fingerprint: indexed again
        previous = (outputs.Output(index_dir, KIND).committed().get("fingerprint") or {}).get("settings")
    except FileNotFoundError:
        previous = None
    expected = {k: v for k, v in dataclasses.asdict(wanted).items() if k != "output"}
    if previous is None:
        if not index:
            return None
        log.info("indexing %s into %s", input, index_dir)
        run(wanted)
    elif outputs.plain(expected) != {**dataclasses.asdict(InputSettings()), **previous}:  # older: no such keys
        raise ValueError(f"{index_dir} indexes {previous['root']} with per_class={previous['per_class']}, "
                         f"seed={previous['seed']}, links={previous.get('links', 'inside')}, "
                         f"max_bytes={previous.get('max_bytes', InputSettings().max_bytes)}; use a new --output for "
                         "other inputs")
    return load_manifest(index_dir)
