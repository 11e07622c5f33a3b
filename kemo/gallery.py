"""``gallery.html``: a page to check a run's rows by eye, self-contained (thumbnails embedded as data URIs, no
network, no JavaScript), for labelling (faces by predicted emotion, videos as strips) and preprocessing (crops by
status).

A page is sections of tiles; a tile is a thumbnail with a caption, or, for a row with nothing to show (a photo that
did not decode), its name and error in a list; a section may open with a plot (a video's timeline of emotion shares,
inline SVG). Each section shows at most the cap it was given and says how many it holds in all. The caller chooses the
rows; this module draws them and makes the thumbnails: a face cut from its photo (read and decoded as the pipeline
does, reduced while it decodes), from a video's frame (decoded again at its time) or a stored crop, resized to
:data:`THUMB` pixels.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from kemo.crop import crop_region, crop_square, encode_jpeg

THUMB = 112  # pixels a side: enough to tell an expression, ~4 KB a thumbnail (48 × 9 sections ≈ 2 MB a page)
THUMB_QUALITY = 80
MARGIN = 0.2  # around a face box, as the crops have
READERS = 4  # photos read and decoded at once for the thumbnails (cv2 and the reads release the GIL)


@dataclass
class Tile:
    caption: str  # under the thumbnail (or the list entry's text)
    title: str  # the full name, on hover
    thumb: bytes | None = None  # a JPEG; None lists the row without a picture
    note: str | None = None  # an error to show beside it
    make: Callable[[], bytes | None] | None = None  # makes ``thumb`` (reads a photo): run by :func:`thumbnails`
    key: str | None = None  # names the picture (:func:`tile_key`): a later page takes it from this one's


@dataclass
class Section:
    title: str
    tiles: list[Tile]
    total: int  # rows the group holds; ``tiles`` are the first of them
    note: str = ""
    pictures: bool = True  # False: a list of names and errors (rows with nothing to show)
    plot: str | None = None  # SVG markup drawn above the tiles, inline (a video's timeline)


def top(table: pa.Table, mask: pa.Array | None, cap: int, order: list[tuple[str, str]]) -> tuple[int, list[dict]]:
    """(rows of ``table`` where ``mask``, the first ``cap`` of them by ``order`` as dicts): chosen in Arrow, so the
    driver holds a section's rows, not the output's."""
    if mask is not None:
        table = table.filter(mask)
    return table.num_rows, table.sort_by(order).slice(0, cap).to_pylist()


def thumbnail(rgb: np.ndarray) -> bytes:
    """An RGB image as a THUMB-pixel JPEG (the longer side THUMB, aspect kept; small crops enlarged, so every tile
    is the same size)."""
    h, w = rgb.shape[:2]
    scale = THUMB / max(h, w)
    if scale != 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return encode_jpeg(np.ascontiguousarray(rgb), THUMB_QUALITY)


def crop_thumbnail(jpeg: bytes) -> bytes | None:
    """A stored crop (JPEG) as a thumbnail; None when it does not decode."""
    image = cv2.imdecode(np.frombuffer(jpeg or b"", np.uint8), cv2.IMREAD_COLOR_RGB) if jpeg else None
    return None if image is None else thumbnail(image)


def face_thumbnail(uri: str, box: list[float] | None, max_bytes: int, file_id: str | None = None) -> bytes:
    """The face at ``box`` (full-resolution upright pixels; None: the whole photo) of the photo at ``uri``, read
    bounded (with the listing's ``file_id``: only the very file listed, :func:`kemo.storage.read_bounded`) and
    decoded upright as the pipeline decodes it, DCT-reduced to what a thumbnail needs. Raises what the read or the
    decode raises."""
    from kemo.image import decode, probe, read_photo

    data = read_photo(uri, max_bytes, file_id)
    if box is None:
        return thumbnail(decode(data, min_side=THUMB).image)
    side = max(box[2] - box[0], box[3] - box[1], 1) * (1 + 2 * MARGIN)
    header, _ = probe(data)
    # reduced while decoding as far as the face keeps THUMB pixels: a 12 MP photo decodes at an eighth
    dec = decode(data, min_side=math.ceil(min(header.width, header.height) * THUMB / side))
    return thumbnail(crop_square(dec.image, crop_region(box, MARGIN), THUMB, dec.factors))


def tile_key(r: dict[str, Any], box: list[float] | None, at: float | None = None) -> str | None:
    """What a thumbnail is cut from: the file version of ``r`` (uri, size, mtime, ETag: as the skip rule knows a
    file), the box (None: the whole photo), a video's time and the thumbnail's settings, hashed; None for a row
    without a version (a crop output's)."""
    if "size" not in r:
        return None
    parts = [r["uri"], r["size"], r["mtime_ns"], r.get("etag"), box, at, THUMB, THUMB_QUALITY, MARGIN]
    return hashlib.sha1("\0".join(map(str, parts)).encode()).hexdigest()[:24]


KNOWN = re.compile(r'<figure title="[^"]*" data-k="([0-9a-f]+)"><img src="data:image/jpeg;base64,([A-Za-z0-9+/=]*)"')


def known_thumbs(page: bytes) -> dict[str, bytes]:
    """The thumbnails of an earlier page, by :func:`tile_key`: what a new page need not cut again."""
    return {k: base64.b64decode(b64) for k, b64 in KNOWN.findall(page.decode("utf-8", errors="replace"))}


NOT_LISTED = "no picture: no longer listed under the input (what that name holds now is not read)"


def photo_tiles(rows: list[dict[str, Any]], caption: Callable[[dict[str, Any]], str], title: str, box: str | None,
                max_bytes: int) -> list[Tile]:
    """A tile per row whose picture :func:`thumbnails` cuts from the row's photo (``uri``, read as the listing's
    ``file_id`` where the row has one): the face at ``row[box]``, or the whole photo when ``box`` is None; the row's
    ``title`` column on hover, its ``error`` (if any) beside it. A row whose ``listed`` is False gets no picture:
    its name may be a link to anywhere by now."""
    def tile(r: dict[str, Any]) -> Tile:
        if not r.get("listed", True):
            return Tile(caption=caption(r), title=r[title], note="; ".join(filter(None, [r.get("error"), NOT_LISTED])))
        return Tile(caption=caption(r), title=r[title], note=r.get("error"),
                    make=lambda: face_thumbnail(r["uri"], r[box] if box else None, max_bytes, r.get("file_id")),
                    key=tile_key(r, r[box] if box else None))

    return [tile(r) for r in rows]


class VideoFrames:
    """Thumbnails of faces in one video's frames, each at a presentation time (with its face box; None: the whole
    frame), decoded together on the first call: one open of the video (streamed, :mod:`kemo.stream`), one seek a
    frame. :func:`thumbnails` may ask for them from several threads in any order."""

    def __init__(self, listed: dict[str, Any], max_pixels: int, shots: list[tuple[float, list[float] | None]]):
        self.listed, self.max_pixels, self.shots = listed, max_pixels, shots
        self.lock = threading.Lock()
        self.thumbs: list[bytes | None] | None = None
        self.failed: Exception | None = None

    def thumb(self, i: int) -> bytes | None:
        with self.lock:
            if self.thumbs is None and self.failed is None:
                try:
                    self.thumbs = self.load()
                except Exception as e:  # said once per tile, decoded once
                    self.failed = e
        if self.failed is not None:
            raise self.failed
        return self.thumbs[i]

    def load(self) -> list[bytes | None]:
        from kemo import stream, video

        r = self.listed
        with stream.open_stream(r["uri"], r["size"], r.get("file_id"), r.get("etag")) as source:
            images = video.frames_at(source, self.max_pixels, [t for t, _ in self.shots])
        return [None if im is None else thumbnail(im if box is None else crop_square(im, crop_region(box, MARGIN),
                                                                                     THUMB))
                for im, (_, box) in zip(images, self.shots)]


# the classes' colours in a timeline, in class order (7 emotions; more cycle)
PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0")
NONE_COLOUR = "#d0d0d0"  # sampled frames without a labelled face (or abstained)
BINS = 60


def timeline(times: list[float], labels: list[int | None], classes: list[str], end: float) -> str:
    """An SVG of a video's emotion shares over time: its span [0, ``end``] cut into at most :data:`BINS` bins, each a
    stacked bar of the sampled frames in it, one colour per emotion of the frame's face (``labels``: class indices
    in ``classes`` order, None for a frame without a labelled face: grey), then a legend."""
    width, plot, gap = 600, 60, 4
    bins = max(1, min(BINS, len(times)))
    span = end if end > 0 else max(times, default=0) or 1.0
    counts = np.zeros((bins, len(classes) + 1), np.int64)
    for t, k in zip(times, labels):
        counts[min(bins - 1, max(0, int(t / span * bins))), len(classes) if k is None else k] += 1
    colours = [PALETTE[k % len(PALETTE)] for k in range(len(classes))] + [NONE_COLOUR]
    w = width / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{plot + 40}" role="img" '
             f'font-family="sans-serif" font-size="11"><rect width="{width}" height="{plot}" fill="#f4f4f4"/>']
    for b, row in enumerate(counts):
        y = float(plot)
        for k in np.flatnonzero(row):
            h = plot * row[k] / row.sum()
            y -= h
            parts.append(f'<rect x="{b * w:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{colours[k]}"/>')
    parts.append(f'<text x="0" y="{plot + 13}">0 s</text><text x="{width}" y="{plot + 13}" text-anchor="end">'
                 f"{span:.0f} s</text>")
    x = 0.0
    for name, colour in zip([*classes, "no face"], colours):
        parts.append(f'<rect x="{x:.0f}" y="{plot + 22}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 13:.0f}" y="{plot + 31}">{escape(name)}</text>')
        x += 14 + 7 * len(name) + gap
    parts.append("</svg>")
    return "".join(parts)


def no_face(rows: list[dict[str, Any]], total: int, caption: Callable[[dict[str, Any]], str], title: str,
            max_bytes: int) -> Section:
    """The section of photos where no face was found: each shown whole, with the detector's words."""
    return Section("no face", photo_tiles(rows, caption, title, None, max_bytes), total, "the whole photo")


def thumbnails(sections: Iterable[Section], known: dict[str, bytes] | None = None) -> None:
    """Fill the ``thumb`` of every tile that has a ``make``: from ``known`` (an earlier page's, by key) where it is
    there, else made, :data:`READERS` at a time; a failure leaves the tile without a picture and its error in
    ``note``."""
    def make(tile: Tile) -> None:
        try:
            tile.thumb = tile.make()
            if tile.thumb is None:
                tile.note = tile.note or "no picture: it does not decode"
        except Exception as e:  # the photo changed or went since the run: the page still shows the rest
            tile.note = f"no picture: {type(e).__name__}: {e}"

    tiles = [t for s in sections for t in s.tiles if t.make is not None]
    for tile in tiles:
        if tile.key is not None and (known or {}).get(tile.key):
            tile.thumb, tile.make = known[tile.key], None
    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(make, [t for t in tiles if t.make is not None]))


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
nav a{margin-right:1em} .note{color:#555}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:THUMBpx;font-size:11px;line-height:1.25}
figure img{width:THUMBpx;height:THUMBpx;object-fit:contain;background:#ddd;display:block}
figcaption{overflow-wrap:anywhere} .err{color:#a00} .plot{margin:4px 0 8px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
""".replace("THUMB", str(THUMB))


# Bidirectional controls (embeddings, overrides, isolates, marks): a file name holding one would show reversed text
# (``photo\u202egpj.exe`` reads as ``photoexe.jpg``); the page shows them as their escapes instead.
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """``text`` for the page: HTML-escaped, bidirectional controls shown as ``\\u202e``."""
    return html.escape(BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def page(title: str, lines: list[str], sections: list[Section]) -> bytes:
    """The HTML page (UTF-8): a title, a few summary lines, a table of contents, then the sections."""
    e = escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    parts += [f'<p class="note">{e(line)}</p>' for line in lines]
    # a section's anchor is its place on the page: titles may repeat or hold any character
    parts.append("<nav>" + "".join(f'<a href="#s{i}">{e(s.title)} ({s.total})</a>' for i, s in enumerate(sections))
                 + "</nav>")
    for i, s in enumerate(sections):
        shown = f"{len(s.tiles)} of {s.total}" if len(s.tiles) < s.total else f"{s.total}"
        parts.append(f'<h2 id="s{i}">{e(s.title)} <span class="note">({shown})</span></h2>')
        if s.note:
            parts.append(f'<p class="note">{e(s.note)}</p>')
        if s.plot:
            parts.append(f'<div class="plot">{s.plot}</div>')
        if not s.tiles:
            parts.append('<p class="note">none</p>')
        elif s.pictures:
            parts.append('<div class="grid">')
            for t in s.tiles:
                img = (f'<img src="data:image/jpeg;base64,{base64.b64encode(t.thumb).decode()}" alt="{e(t.title)}">'
                       if t.thumb else "")
                note = f'<br><span class="err">{e(t.note)}</span>' if t.note else ""
                key = f' data-k="{t.key}"' if t.key and t.thumb else ""
                parts.append(f'<figure title="{e(t.title)}"{key}>{img}<figcaption>{e(t.caption)}{note}</figcaption>'
                             "</figure>")
            parts.append("</div>")
        else:
            parts.append("<table><tr><th>photo</th><th>why</th></tr>")
            parts += [f'<tr><td title="{e(t.title)}">{e(t.caption)}</td><td class="err">{e(t.note or "")}</td></tr>'
                      for t in s.tiles]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts).encode("utf-8")
