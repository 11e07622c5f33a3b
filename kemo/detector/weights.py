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


def _cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "kemo", "weights")


def local_path(uri: str, sha256: str, cache_dir: str | None = None) -> str:
    """Where :func:`fetch_weights` left the weights it checked against ``sha256``: the file itself, or the cached
    copy of an ``s3://`` URI (named by its hash). Hashes nothing."""
    if storage.is_s3(uri):
        return os.path.join(cache_dir or _cache_dir(), f"{sha256.lower()[:16]}-{os.path.basename(uri)}")
    return os.path.abspath(uri)


def fetch_weights(uri: str, sha256: str | None = None, cache_dir: str | None = None) -> tuple[str, str]:
    """(local path, SHA-256) of a weights file given as a path or an ``s3://`` URI; checked against ``sha256``.

    S3 weights are cached under their content hash; given ``sha256``, a cached copy is used without downloading.
    """
    if storage.is_s3(uri):
        cached = local_path(uri, sha256 or "", cache_dir)
        if sha256 and os.path.isfile(cached) and sha256_file(cached) == sha256.lower():
            return cached, sha256.lower()  # known by hash: no download
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        path = local_path(uri, digest, cache_dir)
        storage.write_bytes(path, data)  # over a damaged cached copy of the same name, too
    else:
        path = local_path(uri, "")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {uri}")
        digest = sha256_file(path)
    if sha256 and digest != sha256.lower():
        raise ValueError(f"weights {uri} have SHA-256 {digest}, expected {sha256}: refusing to load them")
    return path, digest
