"""Videos as a stream (kemo/video.py, kemo/stream.py): the sniffer, the header, sampling by presentation time (exact
on variable frame rates, the same cut into segments as whole), rotation, every bad kind's status, ranged S3 reads.
The videos are generated here (OpenCV's writer, PyAV's encoder) and never committed; the helpers serve
test_video_label.py too."""

from __future__ import annotations

import fractions
import io
import os
from collections.abc import Callable, Iterator

import av
import boto3
import cv2
import numpy as np
import pytest

from kemo import storage, stream, video
from kemo.data import synth
from kemo.image import DecodeError
from tests.photos import jpeg, jpeg_bomb, scene

Boxes = Callable[[int], list[tuple[float, float, float, float]]]  # frame index → the faces drawn in it


def face_frames(n: int, w: int = 320, h: int = 240, faces: Boxes = lambda i: [], seed: int = 0
                ) -> Iterator[np.ndarray]:
    """``n`` upright RGB frames: a plain background with the frame's number written on it, and the faces
    ``faces(i)`` drawn (OpenCV's Haar cascade finds them), the same face in every frame it is in."""
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 200, 3)
    for i in range(n):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = background
        cv2.putText(img, str(i), (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        for k, box in enumerate(faces(i)):
            synth.draw_face(img, box, k % 7, synth._person(seed, k), np.random.default_rng([seed, k]))
        yield img


def write_cv(path: str, fourcc: str, fps: float, frames: Iterator[np.ndarray]) -> str:
    """A video written by OpenCV's writer (mp4v, MJPG, VP80, VP90)."""
    writer = None
    for img in frames:
        if writer is None:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (img.shape[1], img.shape[0]))
            assert writer.isOpened(), fourcc
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_av(path: str, times: list[float], frames: Iterator[np.ndarray], codec: str = "libx264",
             rotation: int | None = None, options: dict[str, str] | None = None) -> str:
    """A video encoded by PyAV with each frame at its own presentation time (variable frame rates), optionally a
    display matrix (``rotation``, counterclockwise degrees as FFmpeg stores it) and muxer options (faststart)."""
    out = av.open(path, "w", options=options or {})
    s = None
    for t, img in zip(times, frames):
        if s is None:
            s = out.add_stream(codec, rate=30)
            s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], "yuv420p"
            s.time_base = s.codec_context.time_base = fractions.Fraction(1, 1000)
            if rotation is not None:
                s.set_display_rotation(rotation)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = round(t * 1000), fractions.Fraction(1, 1000)
        for packet in s.encode(frame):
            out.mux(packet)
    return _finish(out, s, path)


def _finish(out, stream, path: str) -> str:
    """Flush ``stream``'s encoder into ``out`` and close it: the file at ``path`` is complete."""
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def write_audio(path: str) -> str:
    """An AAC file in an MP4 container (.m4a): a container with no video stream."""
    out = av.open(path, "w")
    s = out.add_stream("aac", rate=44100)
    for i in range(20):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 44100, i * 1024
        for packet in s.encode(frame):
            out.mux(packet)
    return _finish(out, s, path)


def half(path: str, dest: str) -> str:
    """The first half of a file: a recording cut short."""
    data = open(path, "rb").read()
    open(dest, "wb").write(data[: len(data) // 2])
    return dest


def unknown_codec(avi: str, dest: str) -> str:
    """An MJPG AVI whose codec tags name a codec no decoder knows."""
    open(dest, "wb").write(open(avi, "rb").read().replace(b"MJPG", b"ZZZZ"))
    return dest


def frame_bomb(path: str) -> str:
    """A small video header (64×48) over MJPEG frames whose own headers claim 40000×30000 pixels."""
    out = av.open(path, "w", format="avi")
    s = out.add_stream("mjpeg", rate=10)
    s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
    for i in range(3):
        packet = av.Packet(jpeg_bomb(40000, 30000))
        packet.stream, packet.pts, packet.dts, packet.time_base = s, i, i, fractions.Fraction(1, 10)
        out.mux(packet)
    out.close()
    return path


def sampled(path: str, fps: float, seconds: float = 1e6, n: int = 1, max_pixels: int = 10**8
            ) -> tuple[list[tuple[int, float, int]], list[video.Report]]:
    """(frame index, time, sample) of every frame sampled from ``path`` cut into ``n`` segments of ``seconds``
    (indices numbered from the video's start), and each segment's report."""
    out, reports, before = [], [], 0
    for k in range(n):
        report = video.Report()
        with stream.open_stream(path, os.path.getsize(path)) as source:
            out += [(before + s.index, s.time, s.sample) for s in video.sample_segment(
                source, max_pixels, k, seconds, k == n - 1, fps, 1, report)]
        before += report.frames
        reports.append(report)
    return out, reports


def probe(path: str, max_pixels: int = 10**8) -> video.Probe:
    with open(path, "rb") as f:
        return video.probe(f, max_pixels)


VFR = [0, 0.1, 0.15, 0.9, 1.0, 1.05, 2.5, 2.6, 3.7, *(4 + 0.2 * i for i in range(11))]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """Small videos of every codec the job's tests use, 4 s at 10 fps unless said."""
    d = tmp_path_factory.mktemp("clips")
    frames = lambda n=40: face_frames(n, 160, 120)  # noqa: E731
    out = {name: write_cv(str(d / name), fourcc, 10, frames()) for name, fourcc in
           (("mp4v.mp4", "mp4v"), ("mjpg.avi", "MJPG"), ("vp8.webm", "VP80"), ("vp9.webm", "VP90"))}
    out["h264.mp4"] = write_av(str(d / "h264.mp4"), [i / 10 for i in range(40)], frames())  # B-frames
    out["vfr.mp4"] = write_av(str(d / "vfr.mp4"), VFR, frames(len(VFR)))
    out["fast.mp4"] = write_av(str(d / "fast.mp4"), [i / 10 for i in range(40)], frames(),
                               options={"movflags": "faststart"})
    return out


def test_the_sniffer_knows_video_containers_by_their_first_bytes(clips, tmp_path):
    for name, path in clips.items():
        assert video.sniff(open(path, "rb").read(video.VIDEO_HEAD)) is not None, name
    audio = write_audio(str(tmp_path / "a.m4a"))
    assert video.sniff(open(audio, "rb").read(64)) == "mp4"  # a container: FFmpeg says there is no video in it
    for data in (jpeg(scene()), b"\x89PNG\r\n\x1a\n" + bytes(64), b"just some text, not a video" * 20, b"",
                 bytes(600)):
        assert video.sniff(data) is None


def test_the_header(clips):
    p = probe(clips["mp4v.mp4"])
    assert (p.container, p.codec, p.width, p.height, p.duration, p.fps, p.frames) == \
        ("mov", "mpeg4", 160, 120, 4.0, 10.0, 40)
    assert probe(clips["vp9.webm"]).codec == "vp9" and probe(clips["mjpg.avi"]).container == "avi"
    assert video.segment_count(4.0, 1.5) == 3 and video.segment_count(None, 1.5) == 1 and \
        video.segment_count(4.5, 1.5) == 3


@pytest.mark.parametrize("fps", [1.0, 2.5, 0.4, 30.0])
def test_each_instant_takes_the_first_frame_that_reaches_it_on_variable_frame_rates(clips, fps):
    """Instants i / fps; the frame taken is the first whose time reaches the instant, its real time stored; a frame
    that reaches several instants (fps above the frame rate) is sampled once, for the first."""
    got, (report,) = sampled(clips["vfr.mp4"], fps)
    times = [round(t, 6) for t in VFR]
    want = {}
    for i in range(int(VFR[-1] * fps) + 1):
        k = next(j for j, t in enumerate(times) if t >= i / fps - 1e-9)
        want.setdefault(k, i)
    assert [(j, round(t, 6), s) for j, t, s in got] == [(k, times[k], i) for k, i in sorted(want.items())]
    assert report.frames == len(VFR) and report.last_time == pytest.approx(VFR[-1])
    for _, t, s in got:  # within one source frame of its instant
        assert 0 <= t - s / fps < max(np.diff(VFR)) + 1e-9


@pytest.mark.parametrize("name", ["mp4v.mp4", "mjpg.avi", "vp8.webm", "vp9.webm", "h264.mp4", "vfr.mp4"])
def test_segments_sample_exactly_what_the_whole_video_samples(clips, name):
    """Each segment seeks to a keyframe before its start and owns the frames from it to the next: cut anywhere, the
    frames, their numbers and their samples are those of one pass over the whole video."""
    whole, (report,) = sampled(clips[name], 2.0)
    for seconds in (0.7, 1.0, 1.3):
        n = video.segment_count(probe(clips[name]).duration, seconds)
        cut, reports = sampled(clips[name], 2.0, seconds, n)
        assert cut == whole, (name, seconds)
        assert sum(r.frames for r in reports) == report.frames
    assert [(j, round(t, 3)) for j, t, _ in whole][:3] == (
        [(0, 0.0), (3, 0.9), (4, 1.0)] if name == "vfr.mp4" else [(0, 0.0), (5, 0.5), (10, 1.0)])


@pytest.mark.parametrize("ccw", [90, -90, 180])
def test_a_rotated_phone_video_comes_out_upright(tmp_path, ccw):
    """A phone stores its sensor's frame and a display matrix: the frames come out as a player shows them."""
    upright = scene(160, 240)  # portrait: red top left, green top right, blue bottom left
    # stored turned the other way: turning it ccw degrees counterclockwise shows it upright
    stored = cv2.rotate(upright, {90: cv2.ROTATE_90_CLOCKWISE, -90: cv2.ROTATE_90_COUNTERCLOCKWISE,
                                  180: cv2.ROTATE_180}[ccw])
    path = write_av(str(tmp_path / "phone.mp4"), [0, 0.1, 0.2], iter([stored] * 3), rotation=ccw)
    report = video.Report()
    with open(path, "rb") as f:
        (first, *_) = list(video.sample_segment(f, 10**8, 0, 60, True, 10, 1, report))
    assert first.image.shape == upright.shape and (report.width, report.height) == (160, 240)
    assert report.rotation == (-ccw) % 360
    assert np.abs(first.image.astype(int) - upright).mean() < 6
    with open(path, "rb") as f:
        (again,) = video.frames_at(f, 10**8, [first.time])
    np.testing.assert_array_equal(again, first.image)


def test_frames_at_gives_the_frames_sampled(clips):
    with open(clips["h264.mp4"], "rb") as f:
        frames = list(video.sample_segment(f, 10**8, 0, 60, True, 1.0, 1, video.Report()))
    with open(clips["h264.mp4"], "rb") as f:
        again = video.frames_at(f, 10**8, [s.time for s in reversed(frames)] + [99.0])
    assert again[-1] is None
    for s, image in zip(reversed(frames), again):
        np.testing.assert_array_equal(image, s.image)


def test_every_bad_kind_gets_its_status(clips, tmp_path):
    def status(path: str, max_pixels: int = 10**8) -> str:
        try:
            probe(path, max_pixels)
        except DecodeError as e:
            return e.status
        return "opens"

    moov_at_end = half(clips["h264.mp4"], str(tmp_path / "cut.mp4"))
    garbage = str(tmp_path / "garbage.mp4")
    open(garbage, "wb").write(b"\0\0\0\x18ftypisom\0\0\2\0isomiso2" + os.urandom(20000))
    assert status(moov_at_end) == "truncated"  # the index was never written: does not open
    assert status(garbage) == "decode_error"
    assert status(write_audio(str(tmp_path / "a.m4a"))) == "empty"
    assert status(unknown_codec(clips["mjpg.avi"], str(tmp_path / "zz.avi"))) == "unsupported_codec"
    assert status(clips["mp4v.mp4"], max_pixels=160 * 120 - 1) == "too_large"
    bomb = frame_bomb(str(tmp_path / "bomb.avi"))  # its header is sane: it opens, and its frames are refused
    with open(bomb, "rb") as f, pytest.raises(DecodeError, match="40000×30000 = 1200.0 MP frames exceed") as e:
        list(video.sample_segment(f, 10**8, 0, 60, True, 1.0, 1, video.Report()))
    assert e.value.status == "too_large"
    # a read that fails is no decoding verdict: its own error reaches the job, whose read status retries it
    class Unreachable(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def readinto(self, buffer) -> int:
            raise ConnectionError("the network went away")

    with pytest.raises(ConnectionError):
        video.probe(Unreachable(), 10**8)
    # cut short with the index at the front, or in formats that stop silently: they open, and end early
    for name in ("fast.mp4", "vp8.webm", "mjpg.avi"):
        cut = half(clips[name], str(tmp_path / f"half-{name}"))
        assert status(cut) == "opens"
        _, (report,) = sampled(cut, 1.0)
        assert 0 < report.last_time < probe(cut).duration - 1, name


def test_ranged_s3_reads_read_the_version_listed(s3_bucket, moto_endpoint, clips):
    """An S3 video is read by ranged GETs (a block at a time, never whole) and only as the version listed."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    data = open(clips["h264.mp4"], "rb").read()
    s3.put_object(Bucket=s3_bucket, Key="v/clip.mp4", Body=data)
    uri = f"s3://{s3_bucket}/v/clip.mp4"
    etag = s3.head_object(Bucket=s3_bucket, Key="v/clip.mp4")["ETag"].strip('"')
    with stream.open_stream(uri, len(data), etag=etag) as f:
        assert f.read(10) == data[:10] and f.seek(-100, io.SEEK_END) == len(data) - 100
        assert f.read() == data[-100:] and f.read(5) == b""
        f.seek(1000)
        assert f.read(len(data)) == data[1000:]
        assert len(f.data) <= stream.BLOCK  # one block held
    with stream.open_stream(uri, len(data), etag=etag) as f:
        assert [(j, round(t, 3)) for j, t, _ in [(s.index, s.time, s.sample) for s in video.sample_segment(
            f, 10**8, 1, 2.0, True, 1.0, 1, video.Report())]] == [(0, 2.0), (10, 3.0)]
    s3.put_object(Bucket=s3_bucket, Key="v/clip.mp4", Body=data[:5000])  # replaced since the listing
    with pytest.raises(storage.Changed), stream.open_stream(uri, len(data), etag=etag) as f:
        f.read(10)
