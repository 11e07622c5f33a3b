"""Test photos: one of every kind of bad or unusual input the decoder must handle, made in memory."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from kemo.exif import undo_orientation, with_orientation


def scene(w: int = 240, h: int = 160) -> np.ndarray:
    """An upright RGB test frame whose corners differ: red top-left, green top-right, blue bottom-left."""
    img = np.full((h, w, 3), 128, np.uint8)
    img[: h // 3, : w // 3] = (220, 30, 30)
    img[: h // 3, -w // 3:] = (30, 200, 30)
    img[-h // 3:, : w // 3] = (30, 30, 220)
    return img


def jpeg(rgb: np.ndarray, orientation: int | None = None, quality: int = 95) -> bytes:
    """A JPEG that shows ``rgb`` upright: pixels stored turned, EXIF saying how to turn them back."""
    stored = undo_orientation(rgb, orientation) if orientation else rgb
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return with_orientation(enc.tobytes(), orientation) if orientation else enc.tobytes()


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int = 60000, h: int = 60000) -> bytes:
    """A valid PNG header (correct CRC) claiming w×h pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def png_text_bomb(inflated: int = 64 << 20) -> bytes:
    """A small, valid 8×8 PNG whose zTXt metadata chunk inflates to ``inflated`` bytes (64 KB on disk)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    text = b"Comment\x00\x00" + zlib.compress(b"\0" * inflated, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"zTXt", text)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * (8 * 25))) + _png_chunk(b"IEND", b""))


def jpeg_bomb(w: int = 60000, h: int = 60000) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to claim w×h pixels."""
    data = bytearray(jpeg(scene(64, 48)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """name → (bytes, expected status)."""
    good = jpeg(scene())
    return {
        "truncated.jpg": (good[: len(good) * 6 // 10], "decode_error"),
        "empty.jpg": (b"", "decode_error"),
        "garbage.jpg": (b"this is not a photo at all" * 20, "decode_error"),
        "corrupt_png.jpg": (pil_bytes(Image.fromarray(scene()), "PNG")[:-40], "decode_error"),
        "photo.heic.jpg": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64, "unsupported_format"),
        "bomb.jpg": (jpeg_bomb(), "too_large"),
        "bomb.png": (png_bomb(), "too_large"),
        "text_bomb.png": (png_text_bomb(), "too_large"),
    }


def unusual_inputs() -> dict[str, tuple[bytes, np.ndarray]]:
    """name → (bytes, the upright RGB the decoder must return, up to compression error)."""
    rgb = scene()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :40, 3] = 0  # transparent stripe → white
    flat = rgb.copy()
    flat[:, :40] = 255
    pal = Image.fromarray(rgb).quantize(colors=8)
    sixteen = (gray.astype(np.uint16) * 257)
    return {
        "png_named.jpg": (pil_bytes(Image.fromarray(rgb), "PNG"), rgb),
        "webp_named.jpg": (pil_bytes(Image.fromarray(rgb), "WEBP", lossless=True), rgb),
        "cmyk.jpg": (pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb),
        "gray.jpg": (pil_bytes(Image.fromarray(gray), "JPEG", quality=95), np.dstack([gray] * 3)),
        "palette.png": (pil_bytes(pal, "PNG"), np.asarray(pal.convert("RGB"))),
        "rgba.png": (pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), flat),
        "gray16.png": (pil_bytes(Image.fromarray(sixteen), "PNG"), np.dstack([gray] * 3)),
    }
