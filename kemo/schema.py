"""Column names and Arrow schemas of the tables that pass between stages, defined once
(docs/design.md, «Data contracts»)."""

from __future__ import annotations

import errno

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "val", "test")

# One row per indexed image. `box` is the annotators' consensus face box, xyxy pixels in the upright (EXIF-applied)
# frame; `votes` holds annotators A, B, C in order (-1 = 알수없음 or missing); `label` is their majority (-1 = none).
MANIFEST = pa.schema([
    ("image_id", pa.string()),  # root-relative key, NFC
    ("uri", pa.string()),  # where the bytes are, exactly as stored (may be NFD)
    ("person_id", pa.string()),  # the 64-hex person hash of the file name
    ("split", pa.string()),  # train | val | test, by person
    ("label", pa.int8()),
    ("agree_n", pa.int8()),  # annotators who chose `label`; 0 when label is -1
    ("votes", pa.list_(pa.int8())),
    ("box", pa.list_(pa.float32())),
    ("uploader_label", pa.int8()),  # the emotion the uploader meant (the folder), not a training target
    ("gender", pa.string()),  # M | F
    ("age", pa.int16()),
    ("is_prof", pa.bool_()),  # 전문인 (professional actor) vs 일반인
    ("background", pa.string()),
    ("source", pa.string()),  # the release's own folder: Training | Validation
])

# The manifest columns every later table carries along, so a crop or a label can be traced to its photo and person.
IDENTITY = ("image_id", "uri", "person_id", "split", "label", "agree_n", "box")
# ... and the annotators' votes, which crop shards carry because training can learn them (`jobs/train.py --target
# votes`). They come from the same annotations as `label` and `agree_n`, so the preprocessing fingerprint (over
# IDENTITY) leaves them out.
CARRIED = (*IDENTITY, "votes")

# One row per input photo, whatever happened to it. `face_box` is the cropped face, xyxy pixels of the full-resolution
# upright frame; `crop` is a JPEG of crop_size² (null unless status is ok). Statuses: ok, no_face, read_error,
# decode_error, too_large, unsupported_format, special_file (a FIFO, socket or device: never opened), broken_link
# (dangling or looping), outside_link (its target leaves the input; not followed), folder_link (a link to a folder
# listed already, under its own path), error (an unexpected failure, with its message in `error`).
CROP = pa.schema([
    *(MANIFEST.field(name) for name in CARRIED),
    ("detector", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("orig_width", pa.int32()),  # upright, full resolution
    ("orig_height", pa.int32()),
    ("exif_orientation", pa.int8()),
    ("n_faces", pa.int16()),  # faces the detector saw; null for `none`
    ("face_box", pa.list_(pa.float32())),
    ("face_score", pa.float32()),
    ("crop", pa.binary()),
])
STATUSES = ("ok", "no_face", "read_error", "unreadable", "decode_error", "too_large", "unsupported_format",
            "special_file", "broken_link", "outside_link", "folder_link", "error", "truncated", "unsupported_codec",
            "empty")
# ... the last three are videos' (a video's summary row): cut short (its last frame falls short of the header's
# duration, or it ends before its index was written), a codec the bundled FFmpeg cannot decode, no video frames
# (audio only). VIDEO marks a file the photo pass found to be a video (its first bytes): the video pass labels it,
# and no row with this status is ever written.
VIDEO = "video"
# transient (throttling, a network blip, a disk error, a GPU out of memory): every job does these photos again on a
# rerun. `unreadable` is not: a path longer than the system allows or a permission refused fails the same way every
# time, and retrying it would keep a rerun from ever having nothing to do (a changed file, a new version, is read).
TRANSIENT = ("read_error", "error")
PERMANENT_ERRNOS = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP)


def read_status(e: BaseException) -> str:
    """The status of an input that could not be read: ``unreadable`` when retrying cannot help, else ``read_error``."""
    return "unreadable" if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS else "read_error"

# One row per photo of a labelling run (one per face with --all-faces), whatever happened to it
# (docs/design.md, «Data contracts»).
# `uri`, `size`, `mtime_ns` and `etag` are the photo's version as listed: a rerun skips a version already labelled and
# labels a replaced photo again. `face` ranks the faces of a photo (0 = the primary face, the selfie subject; null
# when none was classified); `face_box` is xyxy pixels of the full-resolution upright frame (the whole frame for the
# `none` detector). `label`/`label_name`/`confidence`/`probs`/`abstained` are null unless status is ok; `probs` follow
# the checkpoint's class order (kemo.classes) and are calibrated by the checkpoint's temperature; `abstained` says the
# confidence is below the run's --min-confidence (or the checkpoint's threshold, --abstain); the arg-max label is
# still given. `model` is the checkpoint's model_sha256. A video's sampled frames are rows too (one per frame, or per
# face with --all-faces), with `frame` (its index in presentation order from the video's start), `time` (its
# presentation time, seconds from the video's first frame) and `sample` (the sampling instant it was taken for, at
# sample / fps seconds); these three are null for photos.
LABELS = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("etag", pa.string()),  # S3 only
    ("frame", pa.int64()),
    ("time", pa.float64()),
    ("sample", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("face", pa.int16()),
    ("n_faces", pa.int16()),  # faces the detector saw; null for `none`
    ("face_box", pa.list_(pa.float32())),
    ("face_score", pa.float32()),
    ("label", pa.int8()),
    ("label_name", pa.string()),
    ("confidence", pa.float32()),  # probs[label]
    ("probs", pa.list_(pa.float32())),
    ("orig_width", pa.int32()),  # upright, full resolution
    ("orig_height", pa.int32()),
    ("model", pa.string()),
    ("detector", pa.string()),
    ("abstained", pa.bool_()),
])


# One row per video of a labelling run, written after its frames' rows: a video is labelled once this row is committed.
# `width`/`height` are upright; `rotation` the degrees clockwise its display matrix turned the frames; `duration` what
# the header claims (seconds); `fps` the stream's average rate; `last_time` the last frame decoded. `face_frames`
# counts the sampled frames whose primary face was labelled, `abstained` those of them abstained; `shares` (the
# checkpoint's class order) and `dominant` are over the rest (null when none).
VIDEOS = pa.schema([
    *(LABELS.field(n) for n in ("uri", "size", "mtime_ns", "etag", "status", "error")),
    ("container", pa.string()),
    ("codec", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("rotation", pa.int16()),
    ("duration", pa.float64()),
    ("fps", pa.float64()),
    ("frames_decoded", pa.int64()),
    ("frames_sampled", pa.int64()),
    ("last_time", pa.float64()),
    ("bad_packets", pa.int64()),  # packets that did not decode, skipped
    ("segments", pa.int32()),
    ("face_frames", pa.int64()),
    ("abstained", pa.int64()),
    ("shares", pa.list_(pa.float32())),
    ("dominant", pa.string()),
    *(LABELS.field(n) for n in ("model", "detector")),
])


def has_box(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which rows of a box column (``box``, ``face_box``) hold a box of 4 numbers."""
    return pc.equal(pc.fill_null(pc.list_value_length(column), 0), 4).to_numpy(zero_copy_only=False)
