"""Third-party detector weights, trusted by hash: fetched from a path or an ``s3://`` URI and checked."""

from __future__ import annotations

import hashlib
import os

from kemo import storage


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(uri: str, sha256: str | None = None, cache_dir: str | None = None) -> tuple[str, str]:
    """(local path, SHA-256) of a weights file given as a path or an ``s3://`` URI; checked against ``sha256``.

    S3 weights are cached under their content hash; given ``sha256``, a cached copy is used without downloading.
    """
    if storage.is_s3(uri):
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "kemo", "weights")
        cached = os.path.join(cache_dir, f"{(sha256 or '').lower()[:16]}-{os.path.basename(uri)}")
        if sha256 and os.path.isfile(cached) and sha256_file(cached) == sha256.lower():
            return cached, sha256.lower()  # known by hash: no download
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(cache_dir, f"{digest[:16]}-{os.path.basename(uri)}")
        if not os.path.exists(path):
            storage.write_bytes(path, data)
    else:
        path = os.path.abspath(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {uri}")
        digest = sha256_file(path)
    if sha256 and digest != sha256.lower():
        raise ValueError(f"weights {uri} have SHA-256 {digest}, expected {sha256}: refusing to load them")
    return path, digest
