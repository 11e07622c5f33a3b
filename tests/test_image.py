"""Decoding: every bad input gets its status, every unusual format the right pixels, every EXIF orientation upright."""

import io
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from kemo.image import DecodeError, PixelBudget, decode, probe, reduction_for, sniff
from tests.photos import bad_inputs, jpeg, pil_bytes, scene, unusual_inputs


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_bad_inputs_get_their_status(name):
    data, status = bad_inputs()[name]
    with pytest.raises(DecodeError) as e:
        decode(data)
    assert e.value.status == status, str(e.value)


def test_bombs_are_refused_from_the_header():
    for data in (bad_inputs()["bomb.jpg"][0], bad_inputs()["bomb.png"][0]):
        with pytest.raises(DecodeError, match="pixels|MP") as e:
            probe(data)
        assert e.value.status == "too_large"
    with pytest.raises(DecodeError, match="too_large|exceeds"):
        decode(jpeg(scene(300, 200)), max_pixels=300 * 200 - 1)


def test_a_png_metadata_bomb_is_too_large_and_its_text_is_never_inflated():
    with pytest.raises(DecodeError, match="metadata bomb") as e:
        decode(bad_inputs()["text_bomb.png"][0])
    assert e.value.status == "too_large"


def test_large_photos_other_than_jpeg_are_kept_reduced_like_a_jpeg():
    rgb = cv2.resize(scene(), (2000, 1000), interpolation=cv2.INTER_LINEAR)
    for fmt in ("PNG", "JPEG"):
        got = decode(pil_bytes(Image.fromarray(rgb), fmt), min_side=250)
        assert (got.width, got.height, got.scale) == (2000, 1000, 4), fmt
        assert got.image.shape == (250, 500, 3) and got.factors == (4.0, 4.0), fmt
        small = cv2.resize(rgb, (500, 250), interpolation=cv2.INTER_AREA)
        assert np.abs(got.image.astype(int) - small).mean() < 6, fmt


def test_a_pixel_budget_lets_a_large_photo_decode_alone():
    budget, running, seen, lock = PixelBudget(100), [0], [], threading.Lock()

    def decode_like(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                running[0] += pixels
                seen.append((pixels, running[0]))  # what was decoding at once, as this one started
            time.sleep(0.05)
            with lock:
                running[0] -= pixels

    threads = [threading.Thread(target=decode_like, args=(p,)) for p in (40, 40, 40, 500, 10, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads) and running == [0] and budget.free == 100
    assert sorted(p for p, _ in seen) == [10, 40, 40, 40, 40, 500]
    assert max(at for p, at in seen if p != 500) <= 100  # never more than the budget at once
    assert [at for p, at in seen if p == 500] == [500]  # larger than the budget: alone


@pytest.mark.parametrize("name", sorted(unusual_inputs()))
def test_unusual_formats_decode_to_the_right_rgb(name):
    data, expected = unusual_inputs()[name]
    got = decode(data)
    assert got.image.dtype == np.uint8 and got.image.shape == expected.shape
    assert np.abs(got.image.astype(int) - expected).mean() < 6, name


def test_jpeg_completeness_looks_past_trailers_and_thumbnails():
    good = jpeg(scene(), 6)
    assert decode(good + b"\0" * 5000 + b"ftypmp42" * 200).orientation == 6  # motion-photo style trailer
    # an EXIF thumbnail carries its own end-of-image marker, before the main scan: truncation is still caught
    from PIL import Image as PILImage

    im = PILImage.fromarray(scene(480, 320))
    exif = im.getexif()
    exif[0x0112] = 1
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    thumb = jpeg(scene(60, 40))
    app1 = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb  # a segment that holds FF D8 ... FF D9
    with_thumb = data[:2] + app1 + data[2:]
    assert decode(with_thumb).image.shape == (320, 480, 3)
    with pytest.raises(DecodeError, match="truncated"):
        decode(with_thumb[: len(with_thumb) * 3 // 4])


def test_format_is_sniffed_from_content():
    assert sniff(jpeg(scene())) == "jpeg"
    assert sniff(unusual_inputs()["png_named.jpg"][0]) == "png"
    assert sniff(unusual_inputs()["webp_named.jpg"][0]) == "webp"
    assert sniff(bad_inputs()["photo.heic.jpg"][0]) == "heif"
    assert sniff(b"") is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_upright(orientation):
    upright = scene(240, 160)
    data = jpeg(upright, orientation)
    got = decode(data)
    assert got.orientation == orientation and (got.width, got.height) == (240, 160)
    assert np.abs(got.image.astype(int) - upright).mean() < 3
    pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.abs(got.image.astype(int) - pil).mean() < 3  # as Pillow shows it, as the annotators saw it


def test_invalid_orientation_value_is_treated_as_upright():
    data = jpeg(scene(), 1)
    data = data.replace(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01", b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09")
    assert decode(data).orientation == 1


@pytest.mark.parametrize("w, h, min_side, scale", [(4000, 3000, 1000, 2), (6431, 4951, 1000, 4), (2000, 1500, 1000, 1),
                                                   (2000, 1500, 0, 1), (8000, 8000, 500, 8)])
def test_reduction_for(w, h, min_side, scale):
    assert reduction_for(w, h, min_side) == scale


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_decode_keeps_full_resolution_geometry(orientation):
    upright = scene(480, 320)
    got = decode(jpeg(upright, orientation), min_side=150)
    assert got.scale == 2 and got.image.shape == (160, 240, 3) and (got.width, got.height) == (480, 320)
    assert got.factors == (2.0, 2.0)
    half = np.asarray(Image.fromarray(upright).resize((240, 160), Image.BILINEAR))
    assert np.abs(got.image.astype(int) - half).mean() < 6
    cmyk = decode(unusual_inputs()["cmyk.jpg"][0], min_side=60)  # Pillow's DCT scaling path
    assert cmyk.scale == 2 and cmyk.image.shape == (80, 120, 3)
