"""Photo bytes → upright RGB uint8, the same way at preprocessing, training and labelling. No Ray here.

The format is sniffed from content, never from the name. Sizes are read from the header and decompression bombs
refused before any pixel is decoded. Baseline/progressive JPEG in YCbCr or gray (nearly every phone photo) decodes
with OpenCV's libjpeg-turbo, optionally DCT-reduced by 2, 4 or 8; everything else (PNG, WebP, CMYK JPEG, palette,
16-bit, alpha) through Pillow with explicit conversions, then reduced by the same factor. EXIF orientation is then
applied as ``kemo.exif`` does. A ``PixelBudget`` bounds how many pixels the decoder threads of a process decode at once;
``read_photo`` reads a photo's bytes bounded, as every job that decodes photos does.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from kemo import storage
from kemo.exif import ORIENTATION_TAG, ORIENTATIONS, SWAPS_AXES, apply_orientation

MAX_PIXELS = 100_000_000  # the corpus tops out at 6431×4951 ≈ 32 MP
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
# libjpeg-turbo decodes straight to RGB (a separate BGR→RGB pass costs as much again at 3 MP) and DCT-reduced;
# the REDUCED_COLOR flags carry the BGR bit, which OpenCV refuses beside IMREAD_COLOR_RGB.
_REDUCED = {s: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
            for s, flag in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (8, cv2.IMREAD_REDUCED_COLOR_8))}


class DecodeError(Exception):
    """A photo that cannot be decoded; ``status`` is the crop shard's status column."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Decoded:
    image: np.ndarray  # (H, W, 3) uint8 RGB, upright, reduced by `scale` from the full frame
    width: int  # full-resolution upright size
    height: int
    orientation: int  # EXIF orientation found (1 when absent or invalid)
    scale: int  # reduction used (1, 2, 4, 8: DCT for JPEG, INTER_AREA for the rest); exact factors below
    format: str

    @property
    def factors(self) -> tuple[float, float]:
        """Full-resolution upright pixels per pixel of ``image``, along x and y."""
        return self.width / self.image.shape[1], self.height / self.image.shape[0]


@dataclass
class Header:
    format: str
    width: int  # upright
    height: int
    orientation: int
    mode: str


def sniff(data: bytes) -> str | None:
    """Image format from the first bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "heif"
    return None


def check_head(data: bytes) -> str:
    """The format of a file from its first bytes (``storage.HEAD_BYTES`` suffice), or the ``DecodeError`` that ends
    it there: a file that is no image is refused before the rest of it is read."""
    if not data:
        raise DecodeError("decode_error", "empty file")
    fmt = sniff(data)
    if fmt == "heif":
        raise DecodeError("unsupported_format", "HEIF/HEIC/AVIF photos are not supported; convert them to JPEG")
    if fmt is None:
        raise DecodeError("decode_error", f"not an image (starts with {data[:8]!r})")
    return fmt


def read_photo(uri: str, max_bytes: int, file_id: str | None = None) -> bytes:
    """A photo's bytes, read bounded (:func:`kemo.storage.read_bounded`, sniffed from its first bytes); what must not
    be read raises ``DecodeError`` with its row's status: ``too_large`` past ``max_bytes`` (the listing said less: a
    growing file, a size the OS does not know), ``special_file`` for a FIFO or device swapped in after the listing,
    or the sniffer's own status for a file that is no image. Other failures (missing, permissions, network, a file
    that changed since it was listed) propagate: the caller's ``read_error``."""
    try:
        return storage.read_bounded(uri, max_bytes, check_head, file_id)
    except storage.TooLarge as e:
        raise DecodeError("too_large", str(e)) from None
    except storage.NotAFile as e:
        raise DecodeError("special_file", str(e)) from None


def _metadata_bomb(e: Exception) -> bool:
    """Pillow's refusal of PNG text chunks that inflate past its limits (``MAX_TEXT_CHUNK``, ``MAX_TEXT_MEMORY``)."""
    return isinstance(e, ValueError) and ("too large" in str(e).lower() or "too much memory" in str(e).lower())


def probe(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[Header, Image.Image]:
    """Read format, size, mode and orientation from the header only; refuse what must not be decoded."""
    fmt = check_head(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if _metadata_bomb(e):
            raise DecodeError("too_large", f"{fmt} metadata bomb: {e}") from None
        raise DecodeError("decode_error", f"unreadable {fmt} header: {e}") from None
    if w <= 0 or h <= 0:
        raise DecodeError("decode_error", f"{fmt} header gives size {w}×{h}")
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}×{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
    try:
        orientation = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not cost the photo
        orientation = 1
    if orientation not in ORIENTATIONS:
        orientation = 1
    if orientation in SWAPS_AXES:
        w, h = h, w
    return Header(fmt, w, h, orientation, im.mode), im


def largest_reduction(size: float, needed: float) -> int:
    """Largest DCT reduction (1, 2, 4, 8) that keeps ``size`` pixels at least ``needed``."""
    return next((s for s in (8, 4, 2) if size / s >= needed), 1)


def reduction_for(width: int, height: int, min_side: int) -> int:
    """Largest DCT reduction (1, 2, 4, 8) that keeps the short side at least ``min_side``; 1 when min_side <= 0."""
    return largest_reduction(min(width, height), min_side) if min_side > 0 else 1


def _jpeg_complete(data: bytes) -> bool:
    """Whether the main image's scan data reaches its end-of-image marker.

    libjpeg fills the rows of a truncated file with gray and reports success, so we look ourselves: walk the
    length-prefixed segments from SOI to the main start-of-scan (skipping APP segments, whose EXIF thumbnail has
    its own EOI), then find EOI after it. Entropy-coded data cannot contain FF D9, and trailers after EOI (motion
    photos append an MP4) are fine.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) != -1
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) uint8 RGB: alpha composited on white, 16-bit scaled, CMYK and palettes converted."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"))


class PixelBudget:
    """Bounds the pixels that the decoder threads of one process decode at once: each decode takes its frame's pixels
    from the budget before it starts (a JPEG at its DCT-reduced size, anything else whole) and gives them back when
    it ends. A frame larger than the whole budget waits until it can run alone; nothing is refused for its size here
    (``max_pixels`` does that). Frames kept after decoding are bounded otherwise: each is reduced (short side >=
    ``min_side``), so a batch holds its photos at a few megapixels each."""

    def __init__(self, pixels: int):
        self.total, self.free = max(1, pixels), max(1, pixels)
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(max(1, pixels), self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= need)
            self.free -= need
        try:
            yield
        finally:
            with self.cond:
                self.free += need
                self.cond.notify_all()


def decode(data: bytes, min_side: int = 0, max_pixels: int = MAX_PIXELS, max_scale: int = 8,
           budget: PixelBudget | None = None) -> Decoded:
    """Decode photo bytes into an upright RGB frame, reduced by up to ``max_scale`` while the short side stays
    >= ``min_side``. With ``budget``, the decode waits for its pixels' share of it, held while it decodes."""
    header, im = probe(data, max_pixels)
    scale = min(reduction_for(header.width, header.height, min_side), max_scale)
    if header.format == "jpeg" and not _jpeg_complete(data):
        raise DecodeError("decode_error", "truncated JPEG (no end-of-image marker)")
    # JPEG decodes DCT-reduced; anything else decodes whole, then is reduced by the same factor (INTER_AREA), so no
    # kept frame is larger than a JPEG's would be
    pixels = -(-header.width // scale) * -(-header.height // scale) if header.format == "jpeg" \
        else header.width * header.height
    with budget.hold(pixels) if budget else contextlib.nullcontext():
        return _decode(data, header, im, scale)


def _decode(data: bytes, header: Header, im: Image.Image, scale: int) -> Decoded:
    if header.format == "jpeg" and header.mode in ("RGB", "L"):
        rgb = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[scale])
        if rgb is None:
            raise DecodeError("decode_error", "corrupt JPEG data")
    else:
        try:
            if header.format == "jpeg" and scale > 1:  # CMYK JPEG: Pillow's DCT scaling
                full_w = im.size[0]
                im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))
                scale = max(1, round(full_w / im.size[0]))
            im.load()
            rgb = _to_rgb(im)
            if header.format != "jpeg" and scale > 1:
                h, w = rgb.shape[:2]
                rgb = cv2.resize(rgb, (-(-w // scale), -(-h // scale)), interpolation=cv2.INTER_AREA)
        except (OSError, SyntaxError, ValueError) as e:
            if _metadata_bomb(e):
                raise DecodeError("too_large", f"{header.format} metadata bomb: {e}") from None
            raise DecodeError("decode_error", f"corrupt {header.format} data: {e}") from None
    upright = apply_orientation(rgb, header.orientation)
    return Decoded(upright, header.width, header.height, header.orientation, scale, header.format)
