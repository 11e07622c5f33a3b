"""The video pass of labelling: videos cut into time segments, each segment a separate work unit of a pool of
``LabelSegments`` actors, so a long video is spread over the pool. An actor opens its segment's video itself (from its
path, or by ranged S3 reads: :mod:`kemo.stream`), decodes it as a stream and sends each sampled frame through the
photo front end and classifier of :class:`LabelPhotos`; only label rows leave it, never a frame.

Two rounds: in the first, the actor that finds a video among the listed files reads its header (its duration says how
many segments it has) and labels it there if it is one segment long; the second labels the segments of the others,
a segment a call. The driver numbers a video's frames across its segments and hands on its rows and its summary
(:mod:`kemo.video_summary`) once all its segments are in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kemo import stream, video
from kemo.image import DecodeError
from kemo.label_photos import LISTED, PHOTO, LabelPhotos
from kemo.schema import LABELS, VIDEO, VIDEOS, read_status
from kemo.video_summary import assemble

log = logging.getLogger(__name__)
# one work unit: a segment of a video (`segments` null: the first, of a video whose header is still to be read;
# width and height as stored: the pixels its decoding holds)
SEGMENT = pa.schema([*(LISTED.field(n) for n in ("uri", "size", "mtime_ns", "etag", "file_id")),
                     ("segment", pa.int32()), ("segments", pa.int32()), VIDEOS.field("width"), VIDEOS.field("height")])
HEADER = ("container", "codec", "width", "height", "duration", "fps")  # what a video's header says (Probe's fields)
# what labelling a segment gives: the video's header (first segments only; `status` set and `container` null where the
# video did not open), the report of its decoding, and its frames' label rows (`frame` counted from the segment's
# start; the driver adds the frames of the segments before)
SEGMENT_RESULT = pa.schema([
    *PHOTO, LISTED.field("file_id"), ("segment", pa.int32()), ("segments", pa.int32()),
    *(LABELS.field(n) for n in ("status", "error")),
    *(VIDEOS.field(n) for n in HEADER), ("frames", pa.int64()), ("first_time", pa.float64()),
    ("last_time", pa.float64()), ("bad_packets", pa.int64()), ("stopped", pa.string()), VIDEOS.field("rotation"),
    ("upright_width", pa.int32()), ("upright_height", pa.int32()), ("actor", pa.string()),
    ("deferred", pa.bool_()),  # a first segment left to the second round (its header read, nothing labelled)
    ("rows", pa.list_(pa.struct(list(LABELS)))),
])


def _failure(e: Exception, unit: dict[str, Any]) -> dict[str, str]:
    """The status and error of a segment that failed: a ``DecodeError``'s own; a read that may pass on a rerun
    (missing, permissions, network, changed since listed); else ``error`` (retried too)."""
    if isinstance(e, DecodeError):
        return {"status": e.status, "error": str(e)}
    log.exception("segment %d of %s failed", unit["segment"], unit["uri"])
    return {"status": read_status(e) if isinstance(e, OSError) else "error", "error": f"{type(e).__name__}: {e}"}


class LabelSegments(LabelPhotos):
    """Ray Data class UDF: ``SEGMENT`` rows → their ``SEGMENT_RESULT`` rows. The same models, front end and label
    rows as :class:`LabelPhotos` (frames enter the front end after the decode, as photos of the same pixels)."""

    def __init__(self, cfg: dict[str, Any], temperature: float, threshold: float | None):
        super().__init__(cfg, temperature, threshold)
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def frames(self, unit: dict[str, Any], sampled: list[video.Sampled]) -> list[dict[str, Any]]:
        """The label rows of a batch of sampled frames: detected once, classified once."""
        photos = self.front.frames([s.image for s in sampled], [{"uri": unit["uri"]}] * len(sampled))
        rows: list[dict[str, Any]] = []
        inputs: list[Any] = []
        for s, (frame_rows, frame_inputs) in zip(sampled, self.front.pool.map(self.rows, [unit] * len(sampled),
                                                                                photos)):
            rows += [{**r, "frame": s.index, "time": s.time, "sample": s.sample} for r in frame_rows]
            inputs += frame_inputs
        self.label(rows, inputs)
        return rows

    def header(self, unit: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        """A first segment's unit completed from its video's header (read here, into ``out`` too): how many
        segments it has, its frame size. Raises ``DecodeError`` for a video that does not open, or is over
        ``--max-video-bytes``."""
        if unit["size"] > self.cfg.max_video_bytes:
            raise DecodeError("too_large", f"video of {unit['size']} bytes exceeds the {self.cfg.max_video_bytes}"
                                           "-byte limit (--max-video-bytes)")
        with stream.open_stream(unit["uri"], unit["size"], unit["file_id"], unit["etag"]) as source:
            p = video.probe(source, self.cfg.max_pixels)
        n = video.segment_count(p.duration, self.cfg.segment_seconds)
        out.update({k: getattr(p, k) for k in HEADER}, segments=n)
        return {**unit, "segments": n, "width": p.width, "height": p.height}

    def batches(self, unit: dict[str, Any], report: video.Report) -> Iterator[list[video.Sampled]]:
        """The segment's sampled frames, a detector batch at a time; the decode holds its frames' pixels of the
        actor's --decode-pixels while it runs."""
        cfg = self.cfg
        last = unit["segment"] == unit["segments"] - 1
        with stream.open_stream(unit["uri"], unit["size"], unit["file_id"], unit["etag"]) as source, \
                self.front.budget.hold(unit["width"] * unit["height"]):
            batch: list[video.Sampled] = []
            for sampled in video.sample_segment(source, cfg.max_pixels, unit["segment"], cfg.segment_seconds, last,
                                                cfg.fps, cfg.decoders, report):
                batch.append(sampled)
                if len(batch) == max(1, cfg.batch_size):
                    yield batch
                    batch = []
            if batch:
                yield batch

    def segment(self, unit: dict[str, Any], out: dict[str, Any] | None = None) -> dict[str, Any]:
        """One segment's ``SEGMENT_RESULT`` row (``out``: what is known of it already: its video's header)."""
        report = video.Report()
        out = {**{k: unit[k] for k in SEGMENT.names if k in SEGMENT_RESULT.names}, **(out or {}), "actor": self.actor,
               "rows": []}
        try:
            for batch in self.batches(unit, report):
                out["rows"] += self.frames(unit, batch)
        except Exception as e:
            out.update(_failure(e, unit))
        return {**out, "frames": report.frames, "first_time": report.first_time, "last_time": report.last_time,
                "bad_packets": report.bad_packets, "stopped": report.stopped, "rotation": report.rotation,
                "upright_width": report.width, "upright_height": report.height}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.segment(u) for u in batch.to_pylist()], schema=SEGMENT_RESULT)


@dataclasses.dataclass
class VideoPass:
    """What the video pass of one run did."""

    videos: int = 0
    statuses: Counter = dataclasses.field(default_factory=Counter)
    segments: int = 0
    actors: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # per video: the actors of its segments

    def spread(self) -> int:
        """The most actors one video's segments were spread over."""
        return max(map(len, self.actors.values()), default=0)


def _header(first: dict[str, Any]) -> dict[str, Any]:
    """A video's header as :func:`kemo.video_summary.assemble` reads it, from its first segment's result: the
    status is the header's only where the video did not open (no container)."""
    opened = first["container"] is not None
    return {**{k: first[k] for k in (*PHOTO.names, *HEADER)}, "status": None if opened else first["status"],
            "error": None if opened else first["error"]}


class VideoRounds:
    """The driver's side of the video pass. Each video's first result comes back from the first round (its header,
    and the video labelled whole by :class:`LabelFiles` in the call that found it, or deferred); the segments of the
    deferred ones are labelled in a second round (:meth:`second_round`); a video's rows and summary go to ``add``
    once all its segments are in (``claim``: the run's fingerprint, whose classes and model the summary names)."""

    def __init__(self, cfg: Any, claim: dict[str, Any], add: Callable[[pa.Table, list[dict[str, Any]], int], None]):
        self.cfg, self.claim, self.add = cfg, claim, add
        self.done = VideoPass()
        # videos with segments still out: (their results in so far, their header)
        self.waiting: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        self.rest: list[dict[str, Any]] = []  # the second round's units

    def finish(self, header: dict[str, Any], results: list[dict[str, Any]]) -> None:
        rows, summary = assemble(header, results, self.claim["classes"], self.claim["model"], self.cfg.detector)
        self.done.statuses[summary["status"]] += 1
        self.add(rows, [summary], 1)

    def result(self, r: dict[str, Any]) -> None:
        """One segment's ``SEGMENT_RESULT`` row; a video's first, with its header, plans its other segments."""
        uri = r["uri"]
        if not r["deferred"]:
            self.done.segments += 1
            self.done.actors.setdefault(uri, set()).add(r["actor"])
        if uri not in self.waiting:  # the video's first result
            self.done.videos += 1
            header = _header(r)
            if header["status"] is not None or (r["segments"] == 1 and not r["deferred"]):
                self.finish(header, [] if header["status"] is not None else [r])
                return
            self.waiting[uri] = ([] if r["deferred"] else [r], header)
            unit = {k: r[k] for k in SEGMENT.names}
            self.rest += [{**unit, "segment": k} for k in range(0 if r["deferred"] else 1, r["segments"])]
            return
        got, header = self.waiting[uri]
        got.append(r)
        if len(got) == r["segments"]:
            self.finish(header, self.waiting.pop(uri)[0])

    def second_round(self, kwargs: dict[str, Any]) -> None:
        """Label the segments of the deferred videos, a segment a call, in a pool of :class:`LabelSegments`
        (``kwargs``: its constructor's)."""
        from kemo.actor_pool import map_photos

        if not self.rest:
            return
        log.info("%d videos longer than --segment-seconds %g (or left by a busy call): %d segments", len(self.waiting),
                 self.cfg.segment_seconds, len(self.rest))
        units = pa.Table.from_pylist(self.rest, schema=SEGMENT)
        ds = map_photos(units, LabelSegments, kwargs, dataclasses.replace(self.cfg, batch_size=1))
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in block.to_pylist():
                self.result(r)
        self.rest = []


def photo_rows(results: pa.Table) -> pa.Table:
    """The ``LABELS`` rows nested in ``SEGMENT_RESULT`` rows."""
    flat = pc.list_flatten(results.column("rows"))
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(c) for c in flat.chunks if len(c)], schema=LABELS)


def _nested(rows: pa.Table) -> pa.Table:
    """``LABELS`` rows as one ``SEGMENT_RESULT`` row that holds them all (none: no row)."""
    if not rows.num_rows:
        return SEGMENT_RESULT.empty_table()
    struct = pa.StructArray.from_arrays([rows.column(n).combine_chunks() for n in LABELS.names], fields=list(LABELS))
    columns = [pa.nulls(1, f.type) for f in SEGMENT_RESULT][:-1]
    return pa.Table.from_arrays([*columns, pa.ListArray.from_arrays(pa.array([0, len(struct)], pa.int32()), struct)],
                                schema=SEGMENT_RESULT)


class LabelFiles(LabelSegments):
    """Ray Data class UDF of the job's first round: a batch of listed files (``LISTED``) → ``SEGMENT_RESULT`` rows:
    one (``segment`` null) holding the photos' ``LABELS`` rows, then one for each video among them: its header
    read, and a video of one segment labelled here while the call has labelled less than one segment's length of
    video (short clips are labelled whole where they are found, in the pool that labels the photos, and no call
    straggles); the others are ``deferred`` to the second round."""

    def first(self, listed: dict[str, Any], budget: list[float]) -> dict[str, Any]:
        """A video's first result; ``budget``: the seconds of video this call may still label."""
        unit = {**dict.fromkeys(SEGMENT.names), **{k: listed[k] for k in SEGMENT.names if k in listed}, "segment": 0}
        out: dict[str, Any] = {}
        try:
            unit = self.header(unit, out)
        except Exception as e:
            return {**unit, **out, **_failure(e, unit), "actor": self.actor}
        span = out["duration"] or self.cfg.segment_seconds
        if unit["segments"] > 1 or span > budget[0]:  # a long video is spread over the pool, a segment a call
            return {**unit, **out, "actor": self.actor, "deferred": True}
        budget[0] -= span
        return self.segment(unit, {**out, "deferred": False})

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels = LabelPhotos.__call__(self, batch)
        is_video = pc.equal(labels.column("status"), VIDEO)
        videos = set(labels.filter(is_video).column("uri").to_pylist())
        budget = [float(self.cfg.segment_seconds)]
        firsts = [self.first(r, budget) for r in batch.to_pylist() if r["uri"] in videos]
        return pa.concat_tables([_nested(labels.filter(pc.invert(is_video))),
                                 pa.Table.from_pylist(firsts, schema=SEGMENT_RESULT)])
