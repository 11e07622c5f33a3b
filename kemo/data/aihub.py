"""Index an AI-Hub "한국인 감정인식을 위한 복합 영상" root (local or ``s3://``) into a manifest, one row per image
(docs/design.md, «Corpus facts the code respects»): list the root, match every label record to its image
(:mod:`~kemo.data.labelfile`, :mod:`~kemo.data.record`), report what matches nothing, then sample and split by person
(:mod:`~kemo.data.split`). What cannot be read is reported, not fatal; a rerun that finds the same manifest committed
writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kemo import listing, outputs, storage
from kemo.classes import EMOTIONS, KOREAN_NAMES, UNKNOWN, class_index
from kemo.data.labelfile import decode_json, nfc
from kemo.data.record import ANNOTATOR_KEYS, parse_record
from kemo.data.split import SHARES, Sample, balanced_sample, split_by_person
from kemo.listing import FileEntry
from kemo.record import from_dict
from kemo.schema import MANIFEST, SPLITS
from kemo.settings import InputSettings

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"})
_EMOTION_IN_NAME = re.compile(r"EMOIMG_([^_\]/]+)_|\(([^)]+)\)\.json$")
KIND = outputs.INDEX
MANIFEST_FILE = "manifest.parquet"
REPORT = "report.json"
SMOKE_LABEL_FILES = 1  # --smoke-test: the listing and one label file check the layout and the credentials


@dataclass(kw_only=True)
class IndexConfig(InputSettings):
    """Index an AI-Hub root into a manifest of labelled images (label files, too, are read within --max-bytes)."""

    root: str = field(metadata={"help": "AI-Hub root: local path or s3://bucket/prefix"})
    output: str = field(metadata={"help": "output directory (local or s3://): manifest.parquet, report.json"})
    per_class: int = field(default=0, metadata={"help": "balanced sample of N per class, unanimous first; 0 = all"})
    seed: int = field(default=0, metadata={"help": "seed of the person split and of the sample"})
    split: tuple[float, ...] = field(default=SHARES, metadata={"help": "train,val,test shares, by person"})
    smoke_test: bool = field(default=False, metadata={
        "help": "list the root but read only its first label file: checks the layout and the credentials quickly"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.split) != len(SPLITS) or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError(f"--split needs three non-negative shares, got {self.split!r}")


@dataclass
class IndexReport:
    """``report.json``: every label file read (or why not), every record or image left out and why, and how the
    manifest's rows fall into labels, agreement levels, splits and the sample."""

    root: str
    links: str
    label_files: list[dict[str, Any]] = field(default_factory=list)
    bad_records: list[dict[str, Any]] = field(default_factory=list)
    missing_images: list[dict[str, Any]] = field(default_factory=list)
    duplicate_records: list[dict[str, Any]] = field(default_factory=list)
    ambiguous_images: list[dict[str, Any]] = field(default_factory=list)
    unusable_images: list[dict[str, Any]] = field(default_factory=list)
    boxes: dict[str, int] = field(default_factory=dict)  # annotator boxes by what parse_box said of them
    no_person_id: int = 0
    no_box: int = 0
    not_files: dict[str, int] = field(default_factory=dict)
    not_file_entries: list[dict[str, Any]] = field(default_factory=list)
    undecodable_names: list[str] = field(default_factory=list)
    orphan_images: list[str] = field(default_factory=list)
    folder_purity: dict[str, float | None] = field(default_factory=dict)
    indexed: int = 0
    sample: Sample | None = None
    rows: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    agree_n: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)


    @classmethod
    def read(cls, index_dir: str) -> IndexReport:
        """The report of a committed index output."""
        out = outputs.Output(index_dir, KIND)
        out.committed()
        return from_dict(cls, out.read_json(REPORT), out.path(REPORT))

    def count(self, rows: list[dict[str, Any]]) -> None:
        """The manifest's tallies: rows, labels, agreement levels, and each split's images, labels and persons."""
        self.rows = len(rows)
        self.labels = {(EMOTIONS[k].name if k != UNKNOWN else "unknown"): v
                       for k, v in sorted(Counter(r["label"] for r in rows).items())}
        self.agree_n = {str(k): v for k, v in sorted(Counter(r["agree_n"] for r in rows).items())}
        self.splits = {s: {"images": sum(r["split"] == s for r in rows),
                           "labelled": sum(r["split"] == s and r["label"] != UNKNOWN for r in rows),
                           "persons": len({r["person_id"] for r in rows if r["split"] == s})} for s in SPLITS}


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


@dataclass
class Corpus:
    """An AI-Hub root's listing, sorted: images by case-folded file name, label files, names that are not UTF-8."""

    images: dict[str, list[FileEntry]]
    label_files: list[FileEntry]
    undecodable: list[str]


def list_corpus(root: str, links: str, report: IndexReport) -> Corpus:
    """The plan: what the root holds. Entries that are not readable files (broken or outside links, FIFOs, devices,
    unlistable folders) are reported, and never become manifest rows."""
    entries = [e for e in listing.list_input(root, links) if not listing.os_metadata(e.rel)]
    report.not_file_entries = [{"path": _shown(e.rel), "status": e.status, "error": e.error} for e in entries
                               if e.status]
    report.not_files = dict(sorted(Counter(p["status"] for p in report.not_file_entries).items()))
    corpus = Corpus(defaultdict(list), [], [])
    for e in entries:
        if not _valid_utf8(e.rel):  # e.g. cp949 bytes from `unzip` of a Korean zip: rename with convmv first
            corpus.undecodable.append(_shown(e.rel))
            continue
        rel = nfc(e.rel)
        if posixpath.splitext(rel)[1].lower() in IMAGE_EXTS:
            corpus.images[posixpath.basename(rel).casefold()].append(e)
        elif _is_label_file(rel):
            corpus.label_files.append(e)
    log.info("%s: %d label files, %d images", root, len(corpus.label_files),
             sum(len(v) for v in corpus.images.values()))
    return corpus


class _Matcher:
    """The work: every record of every label file matched to a listed image, each image claimed once (by the first
    record that names it); what matches nothing, or an image that cannot be read, goes to the report."""

    def __init__(self, corpus: Corpus, report: IndexReport):
        self.corpus, self.report = corpus, report
        self.claimed: dict[str, str] = {}  # image uri → label file that claimed it
        self.folder_counts: dict[int, Counter[int]] = defaultdict(Counter)  # folder emotion → labels found in it
        self.rows: list[dict[str, Any]] = []

    def label_file(self, lf: FileEntry, max_bytes: int) -> None:
        lf_rel = nfc(lf.rel)
        folder, release = _folder_emotion(lf_rel), _release(lf_rel)
        for i, rec in enumerate(self._records(lf, lf_rel, folder, max_bytes)):
            try:
                fields = parse_record(rec)
            except ValueError as e:
                self.report.bad_records.append({"label_file": lf_rel, "index": i, "error": str(e)})
                continue
            for note in fields.pop("_boxes"):
                self.report.boxes[note] = self.report.boxes.get(note, 0) + 1
            name = fields.pop("filename")
            entry = self._image(name, lf_rel, folder, release)
            if entry is None:
                continue
            self.claimed[entry.uri] = lf_rel
            if fields["person_id"] is None:
                self.report.no_person_id += 1
                fields["person_id"] = "file:" + posixpath.splitext(name)[0]
            self.report.no_box += fields["box"] is None
            self.folder_counts[folder][fields["label"]] += 1
            self.rows.append({"image_id": nfc(entry.rel), "uri": entry.uri, "source": release.rsplit("/", 1)[-1],
                              **fields})

    def _records(self, lf: FileEntry, lf_rel: str, folder: int, max_bytes: int) -> list[Any]:
        """A label file's records; none (the file reported) where it cannot be read."""
        try:
            if lf.status:
                raise ValueError(f"{lf.status}: {lf.error}")
            if lf.size > max_bytes:
                raise ValueError(f"label file of {lf.size} bytes exceeds the {max_bytes}-byte limit")
            records, encoding = decode_json(storage.read_bounded(lf.uri, max_bytes))
            if not isinstance(records, list):
                raise ValueError("top level is not a list of records")
        except (ValueError, OSError) as e:  # OSError: unreadable, vanished, a FIFO (never read)
            self.report.label_files.append({"path": lf_rel, "error": str(e)})
            log.warning("unreadable label file %s: %s", lf_rel, e)
            return []
        keys = sorted({k[:-1] for r in records if isinstance(r, dict) for k in r
                       if isinstance(k, str) and k[:-1].lower() in ANNOTATOR_KEYS})
        self.report.label_files.append({"path": lf_rel, "encoding": encoding, "records": len(records),
                                        "annotator_keys": keys, "folder_label": folder})
        return records

    def _image(self, name: str, lf_rel: str, folder: int, release: str) -> FileEntry | None:
        """The listed image a record names, or None (reported) when there is none, it is no file or it is taken."""
        candidates = self.corpus.images.get(name.casefold(), [])
        if not candidates:
            self.report.missing_images.append({"label_file": lf_rel, "filename": name})
            return None
        if len(candidates) > 1:  # prefer the same release folder and emotion; report the ambiguity
            korean = KOREAN_NAMES[folder] if folder != UNKNOWN else "\0"
            candidates = sorted(candidates, key=lambda e: (
                bool(e.status), _release(nfc(e.rel)) != release, korean not in nfc(e.rel), e.rel))
            self.report.ambiguous_images.append({"filename": name, "chosen": candidates[0].rel,
                                                 "candidates": len(candidates)})
        entry = candidates[0]
        if entry.status:  # a broken or outside link, a FIFO…: the record is reported, its "image" never opened
            self.report.unusable_images.append({"label_file": lf_rel, "filename": name, "path": entry.rel,
                                                "status": entry.status, "error": entry.error})
            return None
        if entry.uri in self.claimed:
            self.report.duplicate_records.append({"label_file": lf_rel, "filename": name,
                                                  "first_in": self.claimed[entry.uri]})
            return None
        return entry

    def reconcile(self) -> None:
        """What no record claimed, and how pure each emotion folder's labels are."""
        self.report.undecodable_names = self.corpus.undecodable
        self.report.orphan_images = sorted(nfc(e.rel) for v in self.corpus.images.values() for e in v
                                           if e.uri not in self.claimed and not e.status)
        self.report.folder_purity = {
            (KOREAN_NAMES[f] if f != UNKNOWN else "?"): round(c[f] / sum(c.values()), 4) if f != UNKNOWN else None
            for f, c in sorted(self.folder_counts.items())}
        self.report.indexed = len(self.rows)


def index(root: str, seed: int = 0, shares: tuple[float, ...] = SHARES, per_class: int = 0,
          label_files_limit: int = 0, inputs: InputSettings | None = None) -> tuple[pa.Table, IndexReport]:
    """(manifest table, report) for an AI-Hub root; nothing is written. ``label_files_limit``: read only the first
    that many label files (by path)."""
    inputs = inputs or InputSettings()
    report = IndexReport(root=root, links=inputs.links)
    corpus = list_corpus(root, inputs.links, report)
    if label_files_limit:
        corpus.label_files = sorted(corpus.label_files, key=lambda e: e.rel)[:label_files_limit]
    matcher = _Matcher(corpus, report)
    for lf in corpus.label_files:
        matcher.label_file(lf, inputs.max_bytes)
    matcher.reconcile()
    rows = matcher.rows
    if per_class:
        rows, report.sample = balanced_sample(rows, per_class, seed)
    split_by_person(rows, seed, shares)
    rows.sort(key=lambda r: r["image_id"])
    report.count(rows)
    return pa.Table.from_pylist(rows, schema=MANIFEST), report


def summarize(report: IndexReport) -> str:
    """Human-readable lines for the log: what was found, what was missing, how the sample went."""
    r = report
    lines = [f"indexed {r.indexed} images from {len(r.label_files)} label files; {r.rows} manifest rows",
             f"labels: {r.labels}  agree_n: {r.agree_n}",
             "splits: " + ", ".join(f"{s} {v['labelled']} labelled / {v['persons']} persons"
                                    for s, v in r.splits.items()),
             f"records without image: {len(r.missing_images)}, images without record: {len(r.orphan_images)}, "
             f"bad records: {len(r.bad_records)}, duplicate records: {len(r.duplicate_records)}, undecodable names: "
             f"{len(r.undecodable_names)}, boxes: {r.boxes}",
             f"entries that are not files (never opened): {r.not_files or 0}, records whose image is one: "
             f"{len(r.unusable_images)}"]
    if r.sample is not None:
        for name, c in r.sample.classes.items():
            lines.append(f"  sample {name:<12} took {c['taken']} of {c['available']}"
                         + (f"  SHORT by {c['short']}" if c["short"] else ""))
        if r.sample.short_classes:
            lines.append(f"classes short of {r.sample.per_class}: {', '.join(r.sample.short_classes)}")
    return "\n".join(lines)


def _settings(cfg: IndexConfig) -> dict[str, Any]:
    """What decides an index's content: every setting but where it is written."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output"}


def run(cfg: IndexConfig) -> IndexReport:
    """Index ``cfg.root`` and commit ``manifest.parquet`` and ``report.json`` under ``cfg.output``."""
    out = outputs.Output(cfg.output, KIND)
    out.manifest()  # another kind of output is refused before the corpus is listed
    table, report = index(cfg.root, cfg.seed, tuple(float(x) for x in cfg.split), cfg.per_class,
                          label_files_limit=SMOKE_LABEL_FILES if cfg.smoke_test else 0, inputs=cfg)
    fingerprint = {"settings": _settings(cfg), "manifest_sha256": outputs.table_sha256(table)}
    if out.current(fingerprint) is not None:
        log.info("%s already holds this index, committed: nothing written", cfg.output)
    else:
        with out.lease() as lease:
            out.uncommit()
            files = [out.write_file(MANIFEST_FILE, outputs.parquet_bytes(table)),
                     out.write_json(REPORT, dataclasses.asdict(report))]
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


def _check_input(input: str) -> None:
    if not storage.is_s3(input) and os.path.isfile(input):
        raise NotADirectoryError(f"--input {input} is a file, not a folder: give an AI-Hub root, an index output or a "
                                 "manifest .parquet")
    if not storage.is_s3(input) and not os.path.isdir(input):
        raise FileNotFoundError(f"--input {input}: no such folder")


def load_or_index(input: str, index_dir: str, per_class: int = 0, seed: int = 0, index: bool = True,
                  inputs: InputSettings | None = None) -> pa.Table | None:
    """The manifest a job works on: ``input`` is a manifest .parquet, an index output, or an AI-Hub root, which is
    then indexed into ``index_dir`` (once: a resumed job reuses its own index and refuses one of other settings).
    ``index=False``: None where indexing would be needed, so that nothing is written."""
    if input.endswith(".parquet"):
        return load_manifest(input)
    _check_input(input)
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
        committed = outputs.Output(index_dir, KIND).committed()
    except FileNotFoundError:
        committed = None
    if committed is None:
        if not index:
            return None
        log.info("indexing %s into %s", input, index_dir)
        run(wanted)
        return load_manifest(index_dir)
    previous, expected = (committed.get("fingerprint") or {}).get("settings") or {}, outputs.plain(_settings(wanted))
    if set(previous) != set(expected):
        raise ValueError(f"{index_dir} holds an index written by an earlier kemo: use a new --output")
    if previous != expected:
        raise ValueError(f"{index_dir} indexes {previous['root']} with per_class={previous['per_class']}, "
                         f"seed={previous['seed']}, links={previous['links']}, max_bytes={previous['max_bytes']}; "
                         "use a new --output for other inputs")
    return load_manifest(index_dir)
