"""The labelling actor: the photo front end's faces, classified in the same actor, as ``LABELS`` rows.

``LabelPhotos(cfg, temperature, threshold)`` loads the detector (through :class:`~kemo.frontend.FrontEnd`) and the
classifier once; called on a pyarrow table of listed photos, it turns each ``Photo`` into its rows (one, or one per
face with ``all_faces``) and classifies every face of the batch at once. A face reaches the classifier as a training
crop reaches it: JPEG-encoded at the crop quality, decoded at the model's size, through the one input transform. A
file whose first bytes are a video's (one the photo decoder refuses, or one over ``--max-bytes``, read no further)
comes back as one row with status ``video``, for the video pass (:mod:`kemo.label_videos`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import numpy as np
import pyarrow as pa

from kemo import image, stream, video
from kemo.crop import encode_jpeg
from kemo.device import torch_device
from kemo.frontend import FrontEnd, Photo
from kemo.schema import LABELS, VIDEO

log = logging.getLogger(__name__)
PHOTO = pa.schema([LABELS.field(n) for n in ("uri", "size", "mtime_ns", "etag")])  # a listed photo version
# … and what the listing found it to be; file_id ties a local read to the very file listed (storage.read_bounded)
LISTED = pa.schema([*PHOTO, LABELS.field("status"), LABELS.field("error"), ("file_id", pa.string())])
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def autocast_dtype(precision: str, device: str) -> Any:
    """The classifier's autocast dtype on ``device`` for ``--precision`` (None: fp32)."""
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def torch_threads(share: int) -> None:
    """torch's intra-op and inter-op threads held to the actor's CPU share (by default each is every core of the
    node: with an actor per core they oversubscribe it). The inter-op pool can be sized once per process, before any
    inter-op work: a process that has run some (a test, the benchmark) keeps its own."""
    import torch

    torch.set_num_threads(share)
    if torch.get_num_interop_threads() != share:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(share)


class LabelPhotos:
    """Ray Data class UDF: a batch of listed photos (``LISTED`` columns) → their ``LABELS`` rows."""

    def __init__(self, cfg: dict[str, Any], temperature: float, threshold: float | None):
        """``cfg``: a resolved ``LabelConfig`` as a dict. ``temperature`` and ``threshold`` (None: no abstention) are
        what the driver read from meta.json with the run's fingerprint, not read here again: meta.json is rewritten
        when jobs/train.py calibrates a finished run, and an actor started after that must still write what the
        commit will say."""
        from kemo.classifier.checkpoint import load_checkpoint
        from kemo.label import LabelConfig

        self.cfg = LabelConfig(**cfg)
        torch_threads(max(1, self.cfg.decoders))  # before the detector's model, which may run torch
        self.front = FrontEnd(self.cfg, self.cfg, self.cfg.decoders, self.cfg.max_bytes, self.cfg.decode_pixels,
                              all_faces=self.cfg.all_faces)
        self.device = torch_device(self.cfg.device)
        self.model, self.meta = load_checkpoint(self.cfg.checkpoint, self.device)
        self.temperature, self.threshold = temperature, threshold
        self.autocast = autocast_dtype(self.cfg.precision, self.device)
        self.classify_lock = threading.Lock()  # with calls_per_actor > 1, batches share the model
        log.info("classifier %s (%s, %d² input) on %s%s", self.cfg.checkpoint, self.meta["architecture"],
                 self.meta["image_size"], self.device, f" {self.autocast}" if self.autocast else "")

    def pixels(self, crop: np.ndarray) -> np.ndarray:
        """A face crop as the classifier's (S, S, 3) uint8 input, made as training makes it from a shard's JPEG."""
        from kemo.classifier.data import decode_crop
        from kemo.classifier.transform import resize_square

        size = self.meta["image_size"]
        if not self.cfg.jpeg_quality:
            return resize_square(crop, size)
        pixels = decode_crop(encode_jpeg(crop, self.cfg.jpeg_quality), size)
        if pixels is None:
            raise RuntimeError("the crop's JPEG does not decode")
        return pixels

    def rows(self, listed: dict[str, Any], photo: Photo) -> tuple[list[dict[str, Any]], list[np.ndarray | None]]:
        """A photo's rows before classification, and each row's classifier input (None: nothing to classify)."""
        base = {k: listed[k] for k in PHOTO.names}
        base.update(status=photo.status, error=photo.error, detector=self.cfg.detector, n_faces=photo.n_faces,
                    model=self.meta["model_sha256"], orig_width=photo.width, orig_height=photo.height)
        if not photo.faces:
            return [base], [None]
        try:
            inputs: list[np.ndarray | None] = [self.pixels(face.crop) for face in photo.faces]
        except Exception as e:
            log.exception("preparing the faces of %s failed", listed["uri"])
            return [{**base, "status": "error", "error": f"{type(e).__name__}: {e}"}], [None]
        rows = [{**base, "face": k, "face_box": f.box, "face_score": f.score} for k, f in enumerate(photo.faces)]
        return rows, inputs

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, C) float32 class probabilities, calibrated (softmax of the fp32 logits over the checkpoint's
        temperature), in chunks of the batch size (with all_faces a batch holds more)."""
        import torch

        from kemo.classifier.checkpoint import input_batch

        chunk = max(1, self.cfg.batch_size or 16)
        out = []
        autocast = torch.autocast("cuda", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for i in range(0, len(images), chunk):
                x = input_batch(images[i:i + chunk], self.meta, self.device)  # (n, 3, S, S), already S²: no resize
                out.append(torch.softmax(self.model(x).float() / self.temperature, dim=1).cpu().numpy())
        return np.concatenate(out)

    def label(self, rows: list[dict[str, Any]], inputs: list[np.ndarray | None]) -> None:
        """Fill the label columns of the ``rows`` that have an input, classified in one batch."""
        todo = [i for i, x in enumerate(inputs) if x is not None]
        if not todo:
            return
        try:
            with self.classify_lock:
                probs = self.classify([inputs[i] for i in todo])
        except Exception as e:
            log.exception("classifier failed on a batch of %d crops", len(todo))
            for i in todo:
                rows[i].update(status="error", error=f"classifier: {type(e).__name__}: {e}")
            return
        classes = self.meta["classes"]
        for i, p in zip(todo, probs):
            if not np.isfinite(p).all():  # never an ok row with NaN probabilities and the first class as its label
                rows[i].update(status="error", error="classifier: probabilities that are not finite numbers")
                continue
            k = int(np.argmax(p))
            # the stored float32 confidence, exactly, against the threshold as a double (what SQL, pyarrow and
            # DuckDB compare): a row is abstained exactly when its confidence column is below it
            rows[i].update(label=k, label_name=classes[k], confidence=float(p[k]), probs=p.tolist(),
                           abstained=self.threshold is not None and float(p[k]) < self.threshold)

    def is_video(self, listed: dict[str, Any]) -> bool:
        """Whether a listed file's first bytes are a video container's (not an image's); False when they cannot be
        read (the photo path then gives the file its status)."""
        if listed.get("status"):
            return False
        try:
            head = stream.read_head(listed["uri"], listed["size"], video.VIDEO_HEAD, listed.get("file_id"),
                                    listed.get("etag"))
        except Exception:
            return False
        return image.sniff(head) is None and video.sniff(head) is not None

    def videos(self, listed: list[dict[str, Any]]) -> set[str]:
        """The uris of ``listed`` whose first bytes are a video's, sniffed in the decoder threads."""
        return {r["uri"] for r, v in zip(listed, self.front.pool.map(self.is_video, listed)) if v}

    def __call__(self, batch: pa.Table) -> pa.Table:
        listed = batch.to_pylist()
        # a file over --max-bytes is refused unread as a photo; a video is streamed, so its first bytes are read here
        videos = self.videos([r for r in listed if (r["size"] or 0) > self.cfg.max_bytes])
        photos = [r for r in listed if r["uri"] not in videos]
        made = self.front(photos)
        videos |= self.videos([r for r, p in zip(photos, made) if p.status == "decode_error"])
        kept = [(r, p) for r, p in zip(photos, made) if r["uri"] not in videos]
        rows: list[dict[str, Any]] = [{**{k: r[k] for k in PHOTO.names}, "status": VIDEO}
                                      for r in listed if r["uri"] in videos]
        inputs: list[np.ndarray | None] = [None] * len(rows)
        for photo_rows, photo_inputs in self.front.pool.map(self.rows, *zip(*kept)) if kept else ():
            rows.extend(photo_rows)
            inputs.extend(photo_inputs)
        self.label(rows, inputs)
        return pa.Table.from_pylist(rows, schema=LABELS)
