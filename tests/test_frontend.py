"""kemo.frontend: one photo read, decoded and prepared for its detector, alone (no Ray), whatever the input is."""

from __future__ import annotations

import numpy as np

from kemo.frontend import FrontEnd
from kemo.settings import CropSettings, DetectorSettings
from tests.photos import jpeg, scene


def test_a_photo_goes_through_read_decode_detect_and_crop(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(scene(320, 240)))
    front = FrontEnd(DetectorSettings(detector="annotations"), CropSettings(crop_size=64), decoders=1)
    row = {"uri": str(path), "box": [100.0, 60.0, 200.0, 180.0]}
    (prep,), (faces,) = front.detect([row])
    assert prep.status is None and prep.header == (320, 240, 1)
    boxes, scores = front.faces(prep, faces)
    assert boxes == [[100.0, 60.0, 200.0, 180.0]] and scores == [1.0]
    crop = front.crop(prep.decoded, boxes[0])
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert front.crop(prep.decoded, None).shape == (64, 64, 3)  # the whole photo


def test_what_cannot_be_read_or_is_too_large_gets_a_status_and_is_not_decoded(tmp_path):
    front = FrontEnd(DetectorSettings(detector="none"), CropSettings(), decoders=1, max_bytes=10)
    (tmp_path / "big.jpg").write_bytes(jpeg(scene(64, 48)))
    (tmp_path / "junk.jpg").write_bytes(b"12345")
    big, missing, junk = front.detect([{"uri": str(tmp_path / "big.jpg"), "size": 11},
                                       {"uri": str(tmp_path / "none.jpg")},
                                       {"uri": str(tmp_path / "junk.jpg"), "size": 5}])[0]
    assert big.status == "too_large" and "10-byte limit" in big.error and big.decoded is None
    assert missing.status == "read_error" and "FileNotFoundError" in missing.error
    assert junk.status == "decode_error" and junk.decoded is None
