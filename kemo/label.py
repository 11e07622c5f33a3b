"""Label new photos and videos with emotions: a folder or an S3 prefix → one row per photo and per sampled video frame
(per face with --all-faces), and a summary row per video.

The input is listed once; files whose version (uri, size, mtime, ETag) already has its rows are skipped before any
model loads. The rest go through one actor pool (:mod:`kemo.label_photos`) that reads, decodes, detects and crops
through the photo front end preprocessing uses, then classifies the crops in the same actor, so crops never leave
it; the files it finds to be videos (by content) go through the video pass (:mod:`kemo.label_videos`): probed, cut
into time segments, each segment a work unit of a second pool. The driver writes the rows as Parquet parts
(:mod:`kemo.label_store`); ``_commit.json``, written last, names the parts whose rows are current, with the views
(``labels.csv``, ``videos.csv``, ``gallery.html``: :mod:`kemo.views`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kemo import gallery, label_store, listing, outputs, storage, views
from kemo.actor_pool import map_photos, prepare
from kemo.config import at_least, within
from kemo.detector.registry import detector_class, resolve_detector
from kemo.label_photos import LISTED, PRECISIONS
from kemo.label_store import PARTS, VIDEO_PARTS, PartWriter
from kemo.label_videos import LabelFiles, VideoPass, VideoRounds, photo_rows
from kemo.record import from_dict
from kemo.schema import LABELS, VIDEOS
from kemo.settings import PhotoSettings, crop_fingerprint

log = logging.getLogger(__name__)
CSV = "labels.csv"
VIDEOS_CSV = "videos.csv"
FORMATS = ("parquet", "csv")
FLUSH_S = 120.0  # a finished video waits at most this long for its part: a killed run keeps the videos done


def _contains(parent: str, child: str) -> bool:
    if storage.is_s3(parent) != storage.is_s3(child):
        return False
    if storage.is_s3(parent):
        return f"{child.rstrip('/')}/".startswith(f"{parent.rstrip('/')}/")
    parent, child = os.path.abspath(parent), os.path.abspath(child)
    return os.path.commonpath([parent, child]) == parent


@dataclass(kw_only=True)
class LabelConfig(PhotoSettings):
    """Label every photo and video of a folder or S3 prefix with the emotion of its faces."""

    input: str = field(metadata={"help": "folder or s3:// prefix of photos and videos (recursive; known by content)"})
    output: str = field(metadata={"help": "label directory (local or s3://); earlier runs' labels are kept"})
    checkpoint: str = field(metadata={"help": "classifier checkpoint directory (model.pt + meta.json), or s3://"})
    all_faces: bool = field(default=False, metadata={"help": "one row per detected face, not only the primary one"})
    format: tuple[str, ...] = field(default=FORMATS, metadata={
        "help": "parquet (the label store, always written) and csv (labels.csv: every current row)"})
    precision: str = field(default="auto", metadata={
        "help": "classifier on GPU: auto (bf16 where supported, else fp16), bf16, fp16 or fp32; CPU runs fp32"})
    rows_per_part: int = field(default=20000, metadata={
        "help": "rows per Parquet part, at least: whole actor calls (a killed run keeps the parts it wrote)"})
    abstain: bool = field(default=False, metadata={
        "help": "mark labels below the checkpoint's threshold (fitted on validation for the training run's "
                "--target-accuracy) as abstained"})
    min_confidence: float | None = field(default=None, metadata={
        "help": "mark labels whose calibrated confidence is below this as abstained (instead of --abstain)"})
    gallery: int = field(default=48, metadata={
        "help": "gallery.html: at most this many faces per emotion (and per other group, and videos); 0 for none"})
    fps: float = field(default=1.0, metadata={
        "help": "video frames sampled per second of presentation time: for each instant the first frame reaching it"})
    segment_seconds: float = field(default=300.0, metadata={
        "help": "videos are labelled in segments of this many seconds, each a separate work unit of the pool"})
    max_video_bytes: int = field(default=64 << 30, metadata={
        "help": "refuse larger videos as too_large (videos are streamed, never read whole: --max-bytes is photos')"})

    def __post_init__(self) -> None:
        super().__post_init__()
        detector_class(self.detector, annotated=False)  # new photos have no annotators' boxes
        if not set(self.format) <= set(FORMATS):
            raise ValueError(f"--format {','.join(self.format)}: choose from {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.abstain and self.min_confidence is not None:
            raise ValueError("--abstain uses the checkpoint's threshold and --min-confidence gives one: choose one")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"--min-confidence must lie in [0, 1], not {self.min_confidence:g}")
        if self.gallery < 0:
            raise ValueError(f"--gallery takes faces per group (0 for no gallery), not {self.gallery}")
        if self.rows_per_part < 1:
            raise ValueError(f"--rows-per-part {self.rows_per_part}: give at least 1")
        within("--fps", self.fps, 1e-4, 1000)
        at_least("--segment-seconds", self.segment_seconds, 1)
        at_least("--max-video-bytes", self.max_video_bytes, 1)
        if _contains(self.input, self.output):
            raise ValueError(f"--output {self.output} lies inside --input {self.input}: its files would be listed "
                             "as photos on the next run; choose an output outside the input")




@dataclass
class LabelSummary:
    """What a labelling run did, and what its committed output holds (``summary.json``)."""

    input: str
    output: str
    model: str  # the checkpoint's model_sha256
    detector: str
    listed: int  # files listed under the input (OS metadata files left out)
    ignored: int  # OS metadata files left out
    skipped: int  # files whose listed version already had its rows
    processed: int  # files (photos and videos) labelled by this run
    processed_statuses: dict[str, int]  # their statuses (a video's is its summary's)
    segments: int  # video segments this run labelled
    segment_actors: int  # the most actors one video's segments were spread over
    temperature: float
    min_confidence: float | None  # the confidence below which a row is abstained (None: no abstention)
    photos: int  # photos with current rows in the output
    rows: int  # photos' and sampled frames' rows
    frames: int  # of them, sampled frames' rows
    statuses: dict[str, int]  # photos per status, over the current rows
    videos: int  # videos with a current summary
    video_statuses: dict[str, int]  # videos per status
    emotions: dict[str, int]  # rows (faces, of photos and frames) per emotion
    abstained: int
    parts: int
    seconds: float
    photos_per_s: float | None  # files a second

    @classmethod
    def read(cls, out: outputs.Output) -> LabelSummary:
        return from_dict(cls, out.read_json(outputs.SUMMARY), out.path(outputs.SUMMARY))


def calibration(cfg: LabelConfig, meta: dict[str, Any]) -> tuple[float, float | None]:
    """(the temperature, the confidence below which a row is abstained) of a run with the checkpoint whose meta.json
    is ``meta``: its temperature, and --min-confidence, or with --abstain its threshold (refused where it has none),
    or None: no abstention."""
    from kemo.classifier.checkpoint import abstention_threshold, temperature

    if cfg.min_confidence is not None:
        return temperature(meta), float(cfg.min_confidence)
    return temperature(meta), abstention_threshold(meta, cfg.checkpoint) if cfg.abstain else None


def snapshot(cfg: LabelConfig) -> tuple[pa.Table, int]:
    """(every entry under the input as ``LISTED`` rows sorted by uri, the number of OS metadata files left out).
    Content decides what is a photo: every other file gets a row, a non-image one with status decode_error; an
    entry that is not a readable file (a broken or outside link, a FIFO, a device) its listing status, unread."""
    entries = listing.list_input(cfg.input, cfg.links, etags=True)
    kept = [e for e in entries if not listing.os_metadata(e.rel)]
    rows = [{"uri": e.uri, "size": e.size, "mtime_ns": e.mtime_ns, "etag": e.etag, "status": e.status,
             "error": e.error, "file_id": e.file_id} for e in kept]
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=LISTED)
    return cfg.smoke(table), len(entries) - len(kept)


def fingerprint(cfg: LabelConfig) -> dict[str, Any]:
    """Everything that changes a row (``cfg`` resolved: the weights by their pinned hash); resource knobs,
    precision and the code version do not."""
    from kemo.classifier.checkpoint import read_meta

    meta = read_meta(cfg.checkpoint)  # meta.json only, checked: no model is built here
    temperature, threshold = calibration(cfg, meta)
    return {"model": meta["model_sha256"], "architecture": meta["architecture"], "classes": meta["classes"],
            "image_size": meta["image_size"], **crop_fingerprint(cfg, cfg), "all_faces": cfg.all_faces,
            "max_bytes": cfg.max_bytes, "links": cfg.links, "temperature": temperature, "min_confidence": threshold,
            "fps": cfg.fps, "max_video_bytes": cfg.max_video_bytes}


def _label_pending(cfg: LabelConfig, claim: dict[str, Any], pending: pa.Table) -> tuple[int, Counter, VideoPass]:
    """Stream the pending files through the actor pool, whose actors apply the claim's temperature and threshold and
    label each video's first segment where they find it; the driver writes whole files' rows into parts as they come
    (rows are small: crops and frames never leave the actors). The other segments of longer videos follow in a
    second round. Returns (files labelled, their statuses, what the video pass did)."""
    log.info("labelling with %s + %s: %d actors × %d decoders, %g GPU each, batch %d", cfg.detector,
             claim["architecture"], cfg.actors, cfg.decoders, cfg.gpus_per_actor, cfg.batch_size)
    kwargs = {"cfg": dataclasses.asdict(cfg), "temperature": claim["temperature"],
              "threshold": claim["min_confidence"]}
    writer = PartWriter(cfg.output, cfg.rows_per_part, FLUSH_S)
    videos = VideoRounds(cfg, claim, writer.add)
    photos, statuses = 0, Counter()
    # batch_size=None: whole blocks, i.e. whole actor calls, so a photo's rows never straddle two parts
    for batch in map_photos(pending, LabelFiles, kwargs, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        first_segments = pc.is_valid(batch.column("segment"))
        rows = photo_rows(batch.filter(pc.invert(first_segments)))
        uris = rows.column("uri").to_pylist()
        first = [i == 0 or uris[i] != uris[i - 1] for i in range(len(uris))]
        photos += sum(first)
        statuses.update(s for s, f in zip(rows.column("status").to_pylist(), first) if f)
        writer.add(rows, [], sum(first))
        for r in batch.filter(first_segments).to_pylist():
            videos.result(r)
    videos.second_round(kwargs)
    writer.flush()
    return photos + videos.done.videos, statuses + videos.done.statuses, videos.done


def _previous(out: outputs.Output, claim: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The files of the committed output (by path) where this setup committed it; else none."""
    try:
        previous = out.manifest()
    except outputs.Damaged:
        return {}
    if previous is None or previous.get("fingerprint") != outputs.plain(claim):
        return {}
    return {f["path"]: f for f in previous["files"]}


def _known_thumbs(out: outputs.Output, entries: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """The thumbnails of the committed gallery (where it is as committed): a rerun cuts only the new ones."""
    entry = entries.get(outputs.GALLERY)
    page = storage.read_bytes(out.path(outputs.GALLERY)) if entry else b""
    return gallery.known_thumbs(page) if page and outputs.Receipt.of(outputs.GALLERY, page).sha256 == \
        entry["sha256"] else {}


def _csv_tail(cfg: LabelConfig, out: outputs.Output, claim: dict[str, Any], entries: dict[str, dict[str, Any]],
              current: _Current, final: list[str]) -> tuple[outputs.Appendable, bytes] | None:
    """(the committed labels.csv, the rows of the parts it lacks as CSV lines) where that file is still a prefix of
    this commit's: made with this setup from parts that are all still current, whole and unchanged (a part that lost
    rows to a newer version makes it no prefix: then labels.csv is written whole); else None."""
    if CSV not in entries:
        return None
    before = {p.split("/", 1)[1]: f["sha256"] for p, f in entries.items() if p.startswith(f"{PARTS}/")}
    receipts = current.parts.receipts
    if any(name not in final or name not in receipts or receipts[name].sha256 != sha for name, sha in before.items()):
        return None
    file = out.appendable(entries[CSV])
    if file is None:
        return None
    rows = label_store.rows_of(cfg.output, sorted(set(final) - set(before)), None).sort_by(label_store.ORDER)
    return file, views.labels_csv(rows, claim["classes"], header=False)


def _views(cfg: LabelConfig, out: outputs.Output, claim: dict[str, Any], current: _Current, final: dict[str, list[str]],
           listed: pa.Table, summary: LabelSummary) -> dict[str, bytes | tuple[outputs.Appendable, bytes]]:
    """The views of the current rows (``labels.csv``: the rows of this commit's new parts appended where the
    committed file is still a prefix, else every row; ``videos.csv``, ``gallery.html``), made before the old commit
    goes, from the small columns the skip rule read: only new parts (or a whole rewrite of labels.csv) are read
    whole. A gallery that fails is logged and left out (the labels commit without it; the next run tries again)."""
    made: dict[str, bytes | tuple[outputs.Appendable, bytes]] = {}
    classes, previous = claim["classes"], _previous(out, claim)
    rows = label_store.current_rows(current.tables, current.keep)
    summaries = label_store.current_rows(current.videos, current.keep_videos)
    summaries = (summaries if summaries is not None else VIDEOS.empty_table()).sort_by("uri")
    if "csv" in cfg.format:
        tail = _csv_tail(cfg, out, claim, previous, current, final[PARTS])
        made[CSV] = tail if tail is not None else views.labels_csv(
            label_store.rows_of(cfg.output, final[PARTS], None).sort_by(label_store.ORDER), classes)
        if final[VIDEO_PARTS]:
            made[VIDEOS_CSV] = views.videos_csv(summaries, classes)
    if cfg.gallery:
        heading = [f"{cfg.input} → {cfg.output}: {summary.photos} photos, {summary.videos} videos, {summary.rows} "
                   f"rows, statuses {summary.statuses} {summary.video_statuses}",
                   f"checkpoint {cfg.checkpoint} (temperature {summary.temperature:.3f}), detector {cfg.detector}; at "
                   f"most {cfg.gallery} per group"]
        try:
            shown = (rows if rows is not None else LABELS.empty_table()).select(views.LABEL_SHOWN)
            made[outputs.GALLERY] = views.label_gallery(shown, summaries.select(views.VIDEO_SHOWN), listed, classes,
                                                        heading, cfg.gallery, cfg.max_bytes, cfg.max_pixels,
                                                        summary.min_confidence, _known_thumbs(out, previous))
        except Exception:
            log.exception("gallery.html could not be made")
    return made


def _tail(cfg: LabelConfig, videos: bool) -> list[str]:
    """The files a commit names besides the parts (``videos``: the output holds videos)."""
    return ([CSV] if "csv" in cfg.format else []) + ([VIDEOS_CSV] if "csv" in cfg.format and videos else []) \
        + ([outputs.GALLERY] if cfg.gallery else []) + [outputs.SUMMARY, outputs.RUN]


def _commit(out: outputs.Output, cfg: LabelConfig, claim: dict[str, Any], final: dict[str, list[str]],
            made: dict[str, bytes | tuple[outputs.Appendable, bytes]], summary: LabelSummary) -> None:
    """Commit the current parts with the views and the summary, then delete the parts no longer current (only now:
    readers of the previous commit had them until here)."""
    out.uncommit()  # before the sweep: an older commit may name a file that the sweep takes for a stray
    present = {folder: outputs.sweep(cfg.output, folder) for folder in final}
    files = [present[folder][n] for folder, names in final.items() for n in names]
    files += [out.append(*data) if isinstance(data, tuple) else out.write_file(name, data)
              for name, data in made.items()]
    files += [out.write_json(outputs.SUMMARY, dataclasses.asdict(summary)), out.claim_receipt()]
    out.commit(files, dataclasses.asdict(cfg), claim)
    for folder, names in final.items():
        for name in set(present[folder]) - set(names):
            outputs.delete_part(cfg.output, folder, name)


def _nothing_done(out: outputs.Output, listed: pa.Table, ignored: int, t0: float) -> LabelSummary:
    """What this run did (nothing), over the committed output's tallies."""
    return dataclasses.replace(LabelSummary.read(out), listed=listed.num_rows, ignored=ignored,
                               skipped=listed.num_rows, processed=0, processed_statuses={}, segments=0,
                               segment_actors=0, seconds=round(time.perf_counter() - t0, 2), photos_per_s=None)


def _prepare(cfg: LabelConfig) -> LabelConfig:
    """What every actor will load, loaded once here (bad files fail in one line, nothing written), then the pool."""
    from kemo.classifier.checkpoint import load_checkpoint

    load_checkpoint(cfg.checkpoint)
    # actors on any node read the photos, the checkpoint and the weights; the driver alone writes the output
    return prepare(cfg, {"--input": cfg.input, "--checkpoint": cfg.checkpoint, "--weights": cfg.weights},
                   "actors on other nodes cannot read it")


# what the driver reads of every label part, once: the skip rule's and the tally's columns, and the gallery's
SMALL = list(dict.fromkeys([*label_store.KEYS, *views.LABEL_SHOWN]))


@dataclass
class _Current:
    """Which rows of the parts present are current, and which files are done; ``parts`` and ``video_parts`` hold
    what was read of each part (:data:`SMALL` of the label parts, the summaries whole), so that reading again reads
    only the parts written since."""

    parts: label_store.Parts
    video_parts: label_store.Parts
    tables: dict[str, pa.Table]
    videos: dict[str, pa.Table]
    keep: dict[str, Any]
    keep_videos: dict[str, Any]
    done: set[str]

    @classmethod
    def read(cls, output: str, listed: dict[str, tuple], before: _Current | None = None) -> _Current:
        parts = before.parts if before else label_store.Parts(output, PARTS, SMALL)
        video_parts = before.video_parts if before else label_store.Parts(output, VIDEO_PARTS, None)
        tables, videos = parts.read(), video_parts.read()
        return cls(parts, video_parts, tables, videos, *label_store.choose(tables, videos, listed))

    def whole(self) -> bool:
        """Every row of every part present is current."""
        return all(m.all() for m in [*self.keep.values(), *self.keep_videos.values()])


def _plan(cfg: LabelConfig) -> tuple[pa.Table, int, dict[str, tuple], _Current, pa.Table]:
    """(the input listed, OS metadata files left out, each file's listed version, the current rows, the files to
    label)."""
    listed, ignored = snapshot(cfg)
    if listed.num_rows == 0:
        raise ValueError(f"no files under {cfg.input}")
    versions = {r["uri"]: (r["size"], r["mtime_ns"], r["etag"]) for r in listed.select(["uri", "size", "mtime_ns",
                                                                                        "etag"]).to_pylist()}
    current = _Current.read(cfg.output, versions)
    pending = listed.filter(pc.invert(pc.is_in(listed.column("uri"), pa.array(sorted(current.done), pa.string()))))
    log.info("%d files under %s (%d OS metadata files left out): %d already labelled, %d to label",
             listed.num_rows, cfg.input, ignored, listed.num_rows - pending.num_rows, pending.num_rows)
    return listed, ignored, versions, current, pending


def run(cfg: LabelConfig) -> LabelSummary:
    """Label the files under ``cfg.input`` that the output has no current rows for; commit; return the summary.

    Plan (the detector resolved, the claim checked, the input listed, the done files skipped: a rerun with nothing
    new writes nothing and loads no model) → prepare the pool → under the lease: label photos, then videos,
    reconcile the current rows (re-read: another run may have committed meanwhile), views → commit.
    """
    t0 = time.perf_counter()
    cfg = resolve_detector(cfg, annotated=False)  # checked, weights hashed and pinned: once, here
    claim = fingerprint(cfg)
    out = outputs.Output(cfg.output, label_store.KIND)
    out.check_claim(claim)  # another setup's labels are refused before anything is listed or written
    listed, ignored, versions, current, pending = _plan(cfg)
    if not pending.num_rows and current.whole() and label_store.unchanged(
            out, sorted(current.tables), sorted(current.videos), _tail(cfg, bool(current.videos))):
        log.info("nothing to label and the committed output is current: nothing written")
        return _nothing_done(out, listed, ignored, t0)
    if pending.num_rows:
        cfg = _prepare(cfg)
    with out.lease():
        out.claim(claim)
        labelled, run_statuses, videos = _label_pending(cfg, claim, pending) if pending.num_rows \
            else (0, Counter(), VideoPass())
        current = _Current.read(cfg.output, versions, current)  # again, under the lease: the new parts
        final = {PARTS: label_store.keep_current(cfg.output, PARTS, current.tables, current.keep),
                 VIDEO_PARTS: label_store.keep_current(cfg.output, VIDEO_PARTS, current.videos, current.keep_videos)}
        seconds = time.perf_counter() - t0
        summary = LabelSummary(
            input=cfg.input, output=cfg.output, model=claim["model"], detector=cfg.detector, listed=listed.num_rows,
            ignored=ignored, skipped=listed.num_rows - pending.num_rows, processed=labelled,
            processed_statuses=dict(sorted(run_statuses.items())), segments=videos.segments,
            segment_actors=videos.spread(), temperature=claim["temperature"],
            min_confidence=claim["min_confidence"], parts=sum(map(len, final.values())),
            **label_store.tally(current.tables, current.keep, current.videos, current.keep_videos),
            seconds=round(seconds, 2), photos_per_s=round(labelled / seconds, 2) if labelled and seconds else None)
        made = _views(cfg, out, claim, current, final, listed, summary)
        if cfg.gallery and outputs.GALLERY not in made and not labelled and current.whole() \
                and label_store.unchanged(out, final[PARTS], final[VIDEO_PARTS],
                                          [t for t in _tail(cfg, bool(final[VIDEO_PARTS])) if t != outputs.GALLERY]):
            log.warning("the gallery was all this run had to add: the output is left as it was, without one")
            return _nothing_done(out, listed, ignored, t0)
        _commit(out, cfg, claim, final, made, summary)
    log.info("committed %d rows of %d photos and %d videos in %d parts to %s: %s %s", summary.rows, summary.photos,
             summary.videos, summary.parts, cfg.output, summary.statuses, summary.video_statuses)
    return summary
