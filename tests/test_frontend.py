"""kemo.frontend: one photo read, decoded and prepared for its detector, alone (no Ray), whatever the input is."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from kemo import listing
from kemo.frontend import FrontEnd
from kemo.settings import CropSettings, DetectorSettings
from tests import hostile
from tests.photos import jpeg, pil_bytes, scene


def test_a_photo_goes_through_read_decode_detect_and_crop(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(scene(320, 240)))
    front = FrontEnd(DetectorSettings(detector="annotations"), CropSettings(crop_size=64), decoders=1,
                     max_bytes=1 << 20, decode_pixels=1 << 20)
    row = {"uri": str(path), "box": [100.0, 60.0, 200.0, 180.0]}
    (prep,), (faces,) = front.detect([row])
    assert prep.status is None and prep.header == (320, 240, 1)
    boxes, scores = front.faces(prep, faces)
    assert boxes == [[100.0, 60.0, 200.0, 180.0]] and scores == [1.0]
    crop = front.crop(prep.decoded, boxes[0])
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert front.crop(prep.decoded, None).shape == (64, 64, 3)  # the whole photo


def test_what_cannot_be_read_or_is_too_large_gets_a_status_and_is_not_decoded(tmp_path):
    front = FrontEnd(DetectorSettings(detector="none"), CropSettings(), decoders=1, max_bytes=10,
                     decode_pixels=1 << 20)
    (tmp_path / "big.jpg").write_bytes(jpeg(scene(64, 48)))
    (tmp_path / "junk.jpg").write_bytes(b"12345")
    big, missing, junk = front.detect([{"uri": str(tmp_path / "big.jpg"), "size": 11},
                                       {"uri": str(tmp_path / "none.jpg")},
                                       {"uri": str(tmp_path / "junk.jpg"), "size": 5}])[0]
    assert big.status == "too_large" and "10-byte limit" in big.error and big.decoded is None
    assert missing.status == "read_error" and "FileNotFoundError" in missing.error
    assert junk.status == "decode_error" and junk.decoded is None


def test_rows_of_the_hostile_folder_get_their_status_within_seconds_and_bounded_memory(tmp_path):
    """As label's rows (with a listed size and status) and as preprocessing's manifest rows (a uri alone)."""
    expected, guard = hostile.build(tmp_path / "in", tmp_path / "out")
    entries = listing.list_input(str(tmp_path / "in"))
    front = FrontEnd(DetectorSettings(detector="none"), CropSettings(crop_size=64), decoders=2,
                     max_bytes=256 << 20, decode_pixels=1 << 20)
    listed = [{"uri": e.uri, "size": e.size, "status": e.status, "error": e.error} for e in entries]
    t0 = time.monotonic()
    with hostile.memory_growth() as grew:
        got = {e.rel: p for e, p in zip(entries, front.detect(listed)[0])}
    assert time.monotonic() - t0 < 10 and grew[0] < 100 << 20
    assert {rel: p.status for rel, p in got.items()} == expected
    assert all(p.decoded is not None for rel, p in got.items() if expected[rel] is None)
    # a uri alone (a manifest row): the FIFO and the device are found on open, the 2 GB file from its size
    by_rel = {e.rel: e.uri for e in entries}
    for rel, status in (("pipe.jpg", "special_file"), ("sparse.jpg", "too_large"), ("dangling.jpg", "read_error")):
        (prep,), _ = front.detect([{"uri": by_rel[rel]}])
        assert prep.status == status, (rel, prep.error)
    (prep,), _ = front.detect([{"uri": "/dev/zero"}])
    assert prep.status == "special_file" and "character device" in prep.error
    assert not guard.close()


def test_a_pixel_budget_smaller_than_every_photo_decodes_them_one_at_a_time(tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(pil_bytes(Image.fromarray(scene(400, 300)), "PNG"))
    front = FrontEnd(DetectorSettings(detector="none"), CropSettings(crop_size=64), decoders=4,
                     max_bytes=1 << 20, decode_pixels=1)
    rows = [{"uri": str(tmp_path / f"{i}.png")} for i in range(8)]
    with ThreadPoolExecutor(1) as pool:  # a deadlock fails the test instead of hanging it
        prepared, _ = pool.submit(front.detect, rows).result(timeout=60)
    # the whole-photo detector needs only the crop size: PNGs kept reduced by 4, as a JPEG would be
    assert all(p.decoded is not None and p.decoded.image.shape == (75, 100, 3) for p in prepared)
    assert front.budget.free == front.budget.total == 1


def test_a_photo_becomes_a_typed_result_with_its_faces_in_rank_order(tmp_path):
    """What both jobs turn into rows: the status, the header, and the faces (box, score, crop), primary first."""
    (tmp_path / "a.jpg").write_bytes(jpeg(scene(320, 240)))
    (tmp_path / "junk.jpg").write_bytes(b"12345")
    rows = [{"uri": str(tmp_path / "a.jpg"), "box": [100.0, 60.0, 200.0, 180.0]},
            {"uri": str(tmp_path / "a.jpg"), "box": None}, {"uri": str(tmp_path / "junk.jpg"), "box": None}]
    front = FrontEnd(DetectorSettings(detector="annotations"), CropSettings(crop_size=64), decoders=2,
                     max_bytes=1 << 20, decode_pixels=1 << 20)
    face, no_face, junk = front(rows)
    assert (face.status, face.width, face.height, face.orientation, face.n_faces) == ("ok", 320, 240, 1, 1)
    assert face.faces[0].box == [100.0, 60.0, 200.0, 180.0] and face.faces[0].score == 1.0
    assert face.faces[0].crop.shape == (64, 64, 3)
    assert (no_face.status, no_face.error, no_face.n_faces, no_face.faces) == (
        "no_face", "annotations found no face", 0, [])
    assert junk.status == "decode_error" and junk.n_faces is None and junk.faces == []
    whole = FrontEnd(DetectorSettings(detector="none"), CropSettings(crop_size=64), decoders=1, max_bytes=1 << 20,
                     decode_pixels=1 << 20)([rows[0]])[0]
    assert whole.n_faces is None and [(f.box, f.score) for f in whole.faces] == [([0.0, 0.0, 320.0, 240.0], None)]
    front.close()


def test_all_faces_are_ranked_by_the_one_rule_the_primary_face_first():
    from kemo.crop import primary_face, ranked_faces

    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 20, 20], [5, 5, 15, 15]], np.float32)
    scores = np.array([0.9, 0.3, 0.9, 0.9], np.float32)  # keys 9, 12, 18, 9: ties keep the detector's order
    assert ranked_faces(boxes, scores) == [2, 1, 0, 3] and primary_face(boxes, scores) == 2
    assert ranked_faces(np.zeros((0, 4)), np.zeros(0)) == [] and primary_face(np.zeros((0, 4)), np.zeros(0)) is None
