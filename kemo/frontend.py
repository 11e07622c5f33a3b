"""The photo front end that preprocessing and labelling share: bytes → decode → detect → rank → crop.

One ``FrontEnd`` per actor: the detector loads once, a pool of decoder threads reads and decodes the photos of a
batch (cv2 and the reads release the GIL), the detector runs once on the decodable ones, and each photo becomes a
``Photo``: its status, and its faces in rank order (the primary face first; every face with ``all_faces``), each with
its full-resolution box, score and square crop. A video's frames, decoded already, enter after the decode
(``frames``) and go on exactly as a photo of the same pixels would. The jobs only turn a ``Photo`` into their schema's
rows. Nothing here knows a detector by name: each says how far a photo may be reduced (``decode_hint``) and whether it
crops the whole photo (``whole_photo``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from kemo.crop import clip_box, crop_region, crop_square, ranked_faces, resize_whole
from kemo.detector.base import Faces
from kemo.detector.registry import create_detector
from kemo.image import Decoded, DecodeError, PixelBudget, decode, read_photo, reduction_for
from kemo.schema import STATUSES, read_status
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


@dataclass
class Face:
    """One face of a photo, as the crops and the labels keep it."""

    box: list[float]  # xyxy in the full-resolution upright frame (the whole frame when the detector crops it whole)
    score: float | None  # the detector's score; None when nothing was searched
    crop: np.ndarray  # (crop_size, crop_size, 3) uint8 RGB: the square around the box with its margin


@dataclass
class Photo:
    """What the front end made of one photo: ``ok`` with its faces, ``no_face``, or a status it stopped at."""

    status: str = "ok"
    error: str | None = None
    width: int | None = None  # full-resolution upright size, once decoded (from the header)
    height: int | None = None
    orientation: int | None = None  # EXIF orientation
    n_faces: int | None = None  # faces the detector found; None when it searched none (the whole photo, or undecoded)
    faces: list[Face] = field(default_factory=list)  # rank order, the primary face first; empty unless ok

    def __post_init__(self) -> None:
        if self.status not in STATUSES:  # a reader's refusal outside the contract would reach the rows unnoticed
            raise ValueError(f"status {self.status!r} is not one of the data contract's {STATUSES}")


class FrontEnd:
    """Detector, decoder threads and crop settings of one actor."""

    def __init__(self, detector: DetectorSettings, crop: CropSettings, decoders: int, max_bytes: int,
                 decode_pixels: int, all_faces: bool = False):
        """``detector`` as the driver resolved it; ``decoders`` threads (the actor's CPU share); no file of more than
        ``max_bytes`` is read; the threads decode at most ``decode_pixels`` at once; ``all_faces``: every face of a
        photo, not only the primary one."""
        self.crop_settings, self.max_bytes, self.all_faces = crop, max_bytes, all_faces
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
            return Prepared(read_status(e), f"{type(e).__name__}: {e}")
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

    def __call__(self, rows: list[dict[str, Any]]) -> list[Photo]:
        """Each row's ``Photo``, in order: read and decoded in the decoder threads, the detector run once on the
        decodable ones, then ranked and cropped in the threads again."""
        prepared, faces = self.detect(rows)
        return list(self.pool.map(self.finish, prepared, faces))

    def detect(self, rows: list[dict[str, Any]]) -> tuple[list[Prepared], list[Faces | None]]:
        """Read and decode ``rows`` in the decoder threads, then run the detector once on the decodable ones."""
        # With several calls in flight another batch decodes in the shared pool while this one holds the detector.
        prepared = list(self.pool.map(self.load, rows))
        return self.run_detector(prepared, rows)

    def run_detector(self, prepared: list[Prepared], rows: list[dict[str, Any]]
                     ) -> tuple[list[Prepared], list[Faces | None]]:
        """The detector run once on the decoded ones of ``prepared``; a detector that fails makes each an error."""
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

    def frame(self, image: np.ndarray) -> Prepared:
        """An upright RGB frame decoded already (a video's) prepared as the same pixels decoded from a photo (a PNG of
        them) are: reduced by the factor the detector's hint gives (INTER_AREA), then the detector's input."""
        h, w = image.shape[:2]
        hint = self.detector.decode_hint({}, self.crop_settings)
        scale = min(reduction_for(w, h, hint.min_side), hint.max_scale)
        if scale > 1:
            image = cv2.resize(image, (-(-w // scale), -(-h // scale)), interpolation=cv2.INTER_AREA)
        dec = Decoded(image, w, h, 1, scale, "frame")
        det_input, det_factors = self.detector.prepare(dec.image, dec.factors)
        return Prepared(decoded=dec, det_input=det_input, det_factors=det_factors, header=(w, h, None))

    def frames(self, images: list[np.ndarray], rows: list[dict[str, Any]]) -> list[Photo]:
        """Each upright RGB frame of ``images`` as the ``Photo`` its pixels make as a photo: prepared in the decoder
        threads (:meth:`frame`), the detector run once on all, then ranked and cropped in the threads again."""
        prepared, faces = self.run_detector(list(self.pool.map(self.frame, images)), rows)
        return list(self.pool.map(self.finish, prepared, faces))

    def finish(self, prep: Prepared, faces: Faces | None) -> Photo:
        """One photo's ``Photo`` from its preparation and the detector's faces: ranked, and cropped."""
        width, height, orientation = prep.header
        photo = Photo(prep.status or "ok", prep.error, width, height, orientation)
        dec = prep.decoded
        if dec is None:
            return photo
        try:
            if self.detector.whole_photo:
                photo.faces = [Face([0.0, 0.0, float(dec.width), float(dec.height)], None, self.crop(dec, None))]
                return photo
            boxes, scores = self.faces(prep, faces)
            photo.n_faces = len(boxes)
            order = ranked_faces(np.asarray(boxes), np.asarray(scores))[:None if self.all_faces else 1]
            if not order:
                photo.status, photo.error = "no_face", f"{self.detector.name} found no face"
            photo.faces = [Face(boxes[i], scores[i], self.crop(dec, boxes[i])) for i in order]
        except Exception as e:
            log.exception("cropping a photo of %s×%s failed", dec.width, dec.height)
            photo.status, photo.error, photo.faces = "error", f"{type(e).__name__}: {e}", []
        return photo

    def faces(self, prep: Prepared, faces: Faces | None) -> tuple[list[list[float]], list[float]]:
        """The detector's faces as boxes of the full-resolution upright frame, clipped to it, with their scores."""
        dec = prep.decoded
        fx, fy = prep.det_factors
        boxes, scores = [], []
        for b, s in zip(faces.boxes if faces is not None else [], faces.scores if faces is not None else []):
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

    def close(self) -> None:
        """Stop the decoder threads (an actor's pool ends with its process; an in-process front end calls this)."""
        self.pool.shutdown()
