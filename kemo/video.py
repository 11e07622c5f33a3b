"""Videos decoded as a stream (PyAV's FFmpeg): what a file's first bytes say it is, what its header says, how it is cut
into time segments, and the frames a segment samples by presentation time. The bytes come through :mod:`kemo.stream`;
one decoded frame is held at a time besides those the caller keeps. No Ray here.

Times are seconds from the video stream's start (its first presentation time), exact as fractions while compared.
Sampling instants are i / fps (i = 0, 1, …); the frame taken for an instant is the first whose time reaches it, so a
frame is sampled when an instant lies in (its predecessor's time, its time], and variable frame rates are sampled
evenly. Segment k of L seconds owns the frames whose times lie in [k·L, (k+1)·L) (the first from the start, the last to
the end): it seeks to a keyframe before k·L and decodes on until the first frame past its end, so every frame and
every instant belongs to exactly one segment, and its frame count lets the caller number frames across segments.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, BinaryIO

import cv2
import numpy as np

from kemo.image import DecodeError

VIDEO_HEAD = 512  # bytes the sniffer reads: MPEG-TS needs three 188-byte packets
BAD_PACKETS_IN_A_ROW = 50  # a stream whose packets stop decoding for this long is taken to end there
IO_BUFFER = 256 << 10  # PyAV's reads from the Python file object
# after a seek, a first frame at or past the segment's start means the seek overshot: back off this far, then further
SEEK_BACKOFF = (Fraction(0), Fraction(5), Fraction(60))
_ROTATE = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


def sniff(head: bytes) -> str | None:
    """The container a file's first bytes (:data:`VIDEO_HEAD`) announce, or None. HEIF/AVIF images (an ISO box
    structure too) are the photo sniffer's, checked before this."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    if head[:4] == b"FLV\x01":
        return "flv"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "asf"
    if head[:4] == b"OggS":
        return "ogg"
    return None


@dataclass
class Probe:
    """What a video's header says, before a frame is decoded (``width``, ``height`` as stored, before rotation)."""

    container: str
    codec: str
    width: int
    height: int
    duration: float | None  # seconds the header claims (the longest of its stream, container and frame-count figures)
    fps: float | None  # the stream's average frame rate
    frames: int | None  # the frame count the header claims (None where it has none)


def _mp4_cut_short(source: BinaryIO) -> bool:
    """Whether an ISO file's top-level boxes run past its end with no index (``moov``) among them: a recording cut
    short before its index was written. Garbage after ``ftyp`` is not (its box types are not letters)."""
    size, pos, boxes = source.seek(0, 2), 0, []
    while pos + 8 <= size and len(boxes) < 64:
        source.seek(pos)
        head = source.read(16)
        length, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if not kind.isalnum() and kind not in (b"uuid", b"free"):
            return False
        if length == 1 and len(head) == 16:
            length = int.from_bytes(head[8:16], "big")
        elif length == 0:
            length = size - pos
        if length < 8:
            return False
        boxes.append(kind)
        pos += length
    return pos > size and b"moov" not in boxes


@contextlib.contextmanager
def _ffmpeg_errors() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's error messages of this thread while the block runs (PyAV passes none on unless asked)."""
    import av.logging

    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=True) as logs:
            yield logs
    finally:
        av.logging.set_level(level)


def _too_large(messages: list[str], max_pixels: int) -> DecodeError | None:
    """The ``too_large`` refusal when one of FFmpeg's ``messages`` says it refused a frame over ``max_pixels`` (or
    over its own limit)."""
    for message in messages:
        found = re.search(r"Picture size (\d+)x(\d+) (exceeds specified max pixel count|is invalid)", message)
        if found:
            w, h = int(found[1]), int(found[2])
            return DecodeError("too_large", f"{w}×{h} = {w * h / 1e6:.1f} MP frames exceed the "
                                            f"{max_pixels / 1e6:.1f} MP limit (--max-pixels)")
    return None


def open_video(source: BinaryIO, max_pixels: int) -> tuple[Any, Any]:
    """(container, video stream) of a video file object, or the ``DecodeError`` that names its row's status:
    ``truncated`` (cut short before its index), ``empty`` (no video stream: audio only), ``unsupported_codec`` (the
    bundled FFmpeg has no decoder for it), ``too_large`` (a frame over ``max_pixels``: FFmpeg's decoders are bounded
    to it while they probe, so an absurd header is refused before its frame is allocated), ``decode_error`` (anything
    else FFmpeg cannot open)."""
    import av

    source.seek(0)
    try:
        with _ffmpeg_errors() as logs:
            container = av.open(source, "r", buffer_size=IO_BUFFER, options={"max_pixels": str(max_pixels)})
    except av.error.FFmpegError as e:  # a read that failed raises its own error (a read status, retried)
        if _mp4_cut_short(source):
            raise DecodeError("truncated", "cut short before its index (no moov box): a recording that did not "
                                           "finish") from None
        why = getattr(e, "strerror", None) or str(e)  # FFmpeg's words, without the file object's name
        raise DecodeError("decode_error", f"FFmpeg cannot open it: {why}") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise DecodeError("empty", f"no video stream ({', '.join(kinds) or 'no streams'})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise DecodeError("unsupported_codec", f"no decoder for its codec ({_codec_tag(stream)})")
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise DecodeError("too_large", f"{w}×{h} = {w * h / 1e6:.1f} MP frames exceed the "
                                           f"{max_pixels / 1e6:.1f} MP limit (--max-pixels)")
        if w <= 0 or h <= 0:
            raise _too_large([m for _, _, m in logs], max_pixels) or DecodeError(
                "decode_error", f"no frame size found ({w}×{h})")
    except BaseException:
        container.close()
        raise
    return container, stream


def _codec_tag(stream: Any) -> str:
    tag = getattr(stream, "codec_tag", None) or ""
    return f"codec tag {tag!r}" if tag else "an unknown codec"


def probe(source: BinaryIO, max_pixels: int) -> Probe:
    """The header of a video file object (raises as :func:`open_video`)."""
    container, stream = open_video(source, max_pixels)
    with container:
        tb = stream.time_base
        claims = [float(stream.duration * tb) if stream.duration and tb else None,
                  container.duration / 1e6 if container.duration else None]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        frames = int(stream.frames) if stream.frames else None
        if frames and fps:
            claims.append(frames / fps)
        known = [c for c in claims if c is not None and math.isfinite(c) and c > 0]
        return Probe(container.format.name.split(",")[0], stream.codec_context.name, stream.codec_context.width,
                     stream.codec_context.height, max(known) if known else None, fps, frames)


def exact(x: float) -> Fraction:
    """A setting as the rational it stands for: ``1 / 120`` is 1/120 and ``29.97`` is 2997/100, not the nearest
    binary fractions (whose instants would fall a hair before or after the frames they are meant to take)."""
    return Fraction(x).limit_denominator(1_000_000)


def segment_count(duration: float | None, seconds: float) -> int:
    """Segments of ``seconds`` a video of ``duration`` (None: unknown, one segment) is cut into."""
    if not duration:
        return 1
    return max(1, math.ceil(Fraction(duration) / exact(seconds)))


def first_instant(before: Fraction | None, time: Fraction, fps: Fraction) -> int | None:
    """The index of the first sampling instant in (``before``, ``time``] — the instant the frame at ``time`` is
    taken for, when its predecessor was at ``before`` (None: it has none) — or None when there is none."""
    if time < 0:
        return None
    first = 0 if before is None or before < 0 else math.floor(before * fps) + 1
    return first if first <= math.floor(time * fps) else None


@dataclass
class Sampled:
    """One sampled frame."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, upright (the display matrix's rotation applied)
    index: int  # frames of this segment before it (the caller adds the frames of the segments before)
    time: float  # presentation time, seconds from the video's start
    sample: int  # the sampling instant it was taken for (the first, where it reaches several)


@dataclass
class Report:
    """What decoding one segment found, filled while it runs."""

    frames: int = 0  # frames decoded whose times lie in the segment
    first_time: float | None = None  # of those frames
    last_time: float | None = None
    bad_packets: int = 0  # packets that did not decode (skipped)
    stopped: str | None = None  # why decoding stopped before the end of the file, if it did
    rotation: int = 0  # degrees clockwise that made the frames upright
    width: int | None = None  # upright frame size
    height: int | None = None


def upright(frame: Any) -> tuple[np.ndarray, int]:
    """(a decoded frame as upright RGB, degrees clockwise that it was turned): its display matrix applied, as a
    player shows it (a mirrored matrix is shown unmirrored)."""
    rgb = frame.to_ndarray(format="rgb24")
    ccw = round((frame.rotation or 0) / 90) * 90 % 360
    if ccw in _ROTATE:
        rgb = cv2.rotate(rgb, _ROTATE[ccw])
    return rgb, (360 - ccw) % 360


def _turn(frame: Any) -> int:
    """Degrees counterclockwise that a frame's display matrix turns it (0, 90, 180, 270)."""
    return round((frame.rotation or 0) / 90) * 90 % 360


def _decoded(container: Any, stream: Any, report: Report) -> Iterator[Any]:
    """The frames the decoder gives from the container's position on: a packet that does not decode is skipped and
    counted; a demuxer that fails, or packets that stop decoding for good, end the stream (``report.stopped``)."""
    import av

    in_row = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = stream.decode(packet)
            except av.error.FFmpegError as e:
                report.bad_packets, in_row = report.bad_packets + 1, in_row + 1
                if in_row >= BAD_PACKETS_IN_A_ROW:
                    report.stopped = f"{in_row} packets in a row did not decode ({e})"
                    return
                continue
            in_row = 0
            yield from frames
    except av.error.FFmpegError as e:
        report.stopped = f"the demuxer stopped: {e}"


class _Clock:
    """Frame times in seconds from the stream's start, as fractions; a frame without a timestamp is one average
    frame after the one before."""

    def __init__(self, stream: Any):
        self.start = stream.start_time or 0
        self.base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 90000)
        rate = stream.average_rate or stream.guessed_rate
        self.step = 1 / Fraction(rate) if rate else Fraction(1, 25)
        self.last: Fraction | None = None

    def __call__(self, frame: Any) -> Fraction:
        if frame.pts is None:
            t = self.last + self.step if self.last is not None else Fraction(0)
        else:
            t = (frame.pts - self.start) * self.base
        self.last = t
        return t


def _positioned(container: Any, stream: Any, clock: _Clock, start: Fraction | None, report: Report
                ) -> Iterator[tuple[Any, Fraction]]:
    """(frame, time) of the decoded frames from a keyframe before ``start`` (None: from the beginning, no seek). A
    seek whose first frame is not before ``start`` overshot (an inexact index): it is tried again further back, then
    from the beginning, where a first frame at or past ``start`` means the stream begins there."""
    import av

    if start is not None:
        for back in SEEK_BACKOFF:
            target = clock.start + math.ceil((start - back) / clock.base) - 1
            try:
                container.seek(max(target, clock.start), stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                break
            frames = _decoded(container, stream, report)
            first = next(frames, None)
            if first is not None and (t := clock(first)) < start:
                yield first, t
                yield from ((f, clock(f)) for f in frames)
                return
        container.seek(clock.start, stream=stream, backward=True, any_frame=False)
    yield from ((f, clock(f)) for f in _decoded(container, stream, report))


def _count(report: Report, frame: Any, t: Fraction) -> None:
    """One more frame of the segment decoded, at ``t``."""
    report.frames += 1
    report.first_time = float(t) if report.first_time is None else report.first_time
    report.last_time = float(t)
    if report.width is None:
        turned = _turn(frame) in (90, 270)
        report.width, report.height = (frame.height, frame.width) if turned else (frame.width, frame.height)
        report.rotation = (360 - _turn(frame)) % 360


def _refusal(source: BinaryIO, max_pixels: int) -> DecodeError | None:
    """Why a video's first packet does not decode, when FFmpeg refused its frame as over ``max_pixels`` (a header
    of sane size over frames of absurd size): decoded again on this thread alone, its errors captured."""
    import av

    container, stream = open_video(source, max_pixels)
    stream.codec_context.thread_count = 1  # FFmpeg's errors on this thread, where they are captured
    errors = []
    with container, _ffmpeg_errors() as logs:
        for packet in container.demux(stream):
            try:
                stream.decode(packet)
            except av.error.FFmpegError as e:  # with FFmpeg's log on, its message ends with FFmpeg's last error
                errors.append(str(e))
            break
    return _too_large([*errors, *(m for _, _, m in logs)], max_pixels)


def sample_segment(source: BinaryIO, max_pixels: int, segment: int, seconds: float, last: bool, fps: float,
                   threads: int, report: Report) -> Iterator[Sampled]:
    """The sampled frames of segment ``segment`` (of ``seconds`` each; ``last``: it runs to the end) of the video in
    ``source`` at ``fps`` instants a second, in time order, each upright; ``report`` says what decoding found. Raises
    ``DecodeError`` (:func:`open_video`) for a video that does not open, or whose frames are over ``max_pixels``."""
    container, stream = open_video(source, max_pixels)
    with container:
        stream.codec_context.thread_count = max(1, threads)
        stream.codec_context.thread_type = "AUTO"
        rate, length = exact(fps), exact(seconds)
        lo = segment * length if segment else None
        hi = None if last else (segment + 1) * length
        before: Fraction | None = None
        for frame, t in _positioned(container, stream, _Clock(stream), lo, report):
            if hi is not None and t >= hi:
                break
            if lo is None or t >= lo:
                _count(report, frame, t)
                instant = first_instant(before, t, rate)
                if instant is not None:
                    yield Sampled(upright(frame)[0], report.frames - 1, float(t), instant)
            before = t if before is None or t > before else before
    if not report.frames and report.bad_packets:
        refusal = _refusal(source, max_pixels)
        if refusal is not None:
            raise refusal


def frames_at(source: BinaryIO, max_pixels: int, times: list[float]) -> list[np.ndarray | None]:
    """The upright frames presented at ``times`` (seconds from the start, as label rows give them), in the order
    given; None for a time no frame has. One seek a frame (a gallery shows a dozen of a video)."""
    container, stream = open_video(source, max_pixels)
    found: dict[float, np.ndarray] = {}
    with container:
        clock = _Clock(stream)
        for t in sorted(set(times)):
            target = Fraction(t)
            for frame, at in _positioned(container, stream, clock, target if target > 0 else None, Report()):
                if at >= target - Fraction(1, 10**6):
                    if at <= target + Fraction(1, 10**6):
                        found[t] = upright(frame)[0]
                    break
    return [found.get(t) for t in times]
