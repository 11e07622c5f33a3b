"""The photo front end that preprocessing and labelling share: read → decode → detect → the faces → a square crop.

One ``FrontEnd`` per actor: the detector loads once, a pool of decoder threads reads and decodes the photos of a
batch (cv2 and the reads release the GIL), and the detector runs once on the decodable ones. What a photo became is a
``Prepared`` (a status when it went no further); ``faces`` and ``crop`` turn it into full-resolution boxes and pixels.
Nothing here knows a detector by name: each says how far a photo may be reduced (``decode_hint``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from kemo.crop import clip_box, crop_region, crop_square, resize_whole
from kemo.detector.base import Faces
from kemo.detector.registry import create_detector
from kemo.image import Decoded, DecodeError, PixelBudget, decode, read_photo
from kemo.settings import CropSettings, DetectorSettings

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One photo after read, decode and the detector's preparation; ``status`` set when it went no further."""

    status: str | None = None
    error: str | None = None
    decoded: Decoded | None = None
    det_input: Any = None
    det_factors: tuple[float, float] = (1.0, 1.0)
    header: tuple[int | None, int | None, int | None] = (None, None, None)  # width, height, EXIF orientation


class FrontEnd:
    """Detector, decoder threads and crop settings of one actor."""

    def __init__(self, detector: DetectorSettings, crop: CropSettings, decoders: int, max_bytes: int,
                 decode_pixels: int):
        """``decoders`` threads (the actor's CPU share); no file of more than ``max_bytes`` is read; the threads
        decode at most ``decode_pixels`` at once."""
        self.crop_settings, self.max_bytes = crop, max_bytes
        threads = max(1, decoders)
        cv2.setNumThreads(threads)  # the actor's CPU share, not every core of the node
        self.detector = create_detector(detector, threads)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.budget = PixelBudget(decode_pixels)
        self.detect_lock = threading.Lock()  # with several calls in flight, batches share one (not thread-safe) model

    def load(self, row: dict[str, Any]) -> Prepared:
        """Read and decode one photo (``row["uri"]``) and prepare the detector's input. A row the listing gave a
        status (a broken link, a FIFO…) keeps it, unread."""
        if row.get("status"):
            return Prepared(row["status"], row.get("error"))
        size = row.get("size")
        if size is not None and size > self.max_bytes:  # known from the listing: not even opened
            return Prepared("too_large", f"file of {size} bytes exceeds the {self.max_bytes}-byte limit")
        try:
            data = read_photo(row["uri"], self.max_bytes, row.get("file_id"))
        except DecodeError as e:  # too large, a FIFO, or no image from its first bytes: the rest is never read
            return Prepared(e.status, str(e))
        except Exception as e:  # missing object, permissions, network: the photo still gets its row
            return Prepared("read_error", f"{type(e).__name__}: {e}")
        hint = self.detector.decode_hint(row, self.crop_settings)
        try:
            dec = decode(data, min_side=hint.min_side, max_pixels=self.crop_settings.max_pixels,
                         max_scale=hint.max_scale, budget=self.budget)
        except DecodeError as e:
            return Prepared(e.status, str(e))
        except Exception as e:
            return Prepared("decode_error", f"{type(e).__name__}: {e}")
        det_input, det_factors = self.detector.prepare(dec.image, dec.factors)
        return Prepared(decoded=dec, det_input=det_input, det_factors=det_factors,
                        header=(dec.width, dec.height, dec.orientation))

    def detect(self, rows: list[dict[str, Any]]) -> tuple[list[Prepared], list[Faces | None]]:
        """Read and decode ``rows`` in the decoder threads, then run the detector once on the decodable ones."""
        # With several calls in flight another batch decodes in the shared pool while this one holds the detector.
        prepared = list(self.pool.map(self.load, rows))
        faces: list[Faces | None] = [None] * len(rows)
        good = [i for i, p in enumerate(prepared) if p.decoded is not None]
        if good:
            try:
                with self.detect_lock:
                    found = self.detector.detect([prepared[i].det_input for i in good], [rows[i] for i in good])
                for i, f in zip(good, found):
                    faces[i] = f
            except Exception as e:
                log.exception("detector failed on a batch of %d", len(good))
                for i in good:
                    prepared[i] = Prepared("error", f"detector: {type(e).__name__}: {e}", header=prepared[i].header)
        return prepared, faces

    def faces(self, prep: Prepared, faces: Faces) -> tuple[list[list[float]], list[float]]:
        """The detector's faces as boxes of the full-resolution upright frame, clipped to it, with their scores."""
        dec = prep.decoded
        fx, fy = prep.det_factors
        boxes, scores = [], []
        for b, s in zip(faces.boxes, faces.scores):
            clipped = clip_box([b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy], dec.width, dec.height)
            if clipped is not None:
                boxes.append(clipped)
                scores.append(float(s))
        return boxes, scores

    def crop(self, dec: Decoded, box: list[float] | None) -> np.ndarray:
        """(crop_size, crop_size, 3) uint8: the square around ``box`` with its margin, or the whole photo (None)."""
        size = self.crop_settings.crop_size
        if box is None:
            return resize_whole(dec.image, size)
        return crop_square(dec.image, crop_region(box, self.crop_settings.margin), size, dec.factors)
