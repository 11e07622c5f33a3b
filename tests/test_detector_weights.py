"""kemo.detector.weights: weights trusted by hash, from a path or S3 (cached by content)."""

from __future__ import annotations

import hashlib

import pytest

from kemo import storage
from kemo.detector.weights import fetch_weights


def test_weights_are_checked_by_hash(yolo_weights, tmp_path):
    path, digest = fetch_weights(yolo_weights)
    assert digest == hashlib.sha256(open(yolo_weights, "rb").read()).hexdigest() and path == yolo_weights
    assert fetch_weights(yolo_weights, digest.upper())[1] == digest
    with pytest.raises(ValueError, match="refusing"):
        fetch_weights(yolo_weights, "0" * 64)
    with pytest.raises(FileNotFoundError):
        fetch_weights(str(tmp_path / "none.pt"))


def test_weights_from_s3_are_cached_by_content(yolo_weights, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/weights/face.pt"
    storage.write_bytes(uri, open(yolo_weights, "rb").read())
    path, digest = fetch_weights(uri, cache_dir=str(tmp_path))
    assert open(path, "rb").read() == open(yolo_weights, "rb").read() and path.startswith(str(tmp_path))
    storage.delete(uri)  # known by hash, the cached copy serves without any download
    assert fetch_weights(uri, digest, cache_dir=str(tmp_path)) == (path, digest)
