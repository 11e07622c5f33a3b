"""Column names and Arrow schemas of the tables that pass between stages (DESIGN §4), defined once."""

from __future__ import annotations

import pyarrow as pa

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
