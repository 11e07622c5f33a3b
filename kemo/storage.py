"""Local paths and ``s3://`` URIs behind one filesystem API: list, read, write whole files, and the two conditional
writes that a lease needs (create only if absent, replace only if unchanged).

S3 goes through pyarrow's S3 client (boto3 where pyarrow cannot: ETags, odd keys, conditional writes);
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` selects a custom endpoint (a moto server in tests, MinIO on premises).
How outputs are committed is :mod:`kemo.outputs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.cache
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@functools.cache
def _bucket_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)  # one HEAD request per bucket, not per file


def _s3_settings(bucket: str) -> tuple[str | None, str | None]:
    """(endpoint URL with its scheme, https when none is given; region) for pyarrow's and boto3's clients alike."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"  # boto3 refuses a bare host:port; pyarrow assumed https
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint and not region:
        region = _bucket_region(bucket)
    return endpoint, region


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/key`` URI."""
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        return _s3_filesystem(*_s3_settings(path.split("/", 1)[0])), path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@functools.cache
def _boto3_s3(endpoint: str | None, region: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)  # thread-safe; one per process


def _pyarrow_addressable(key: str) -> bool:
    """pyarrow's S3 client refuses empty path components and drops "." / ".." ones: such keys are legal S3 objects
    (``a/../x.jpg``, ``a//x.jpg``) that only a client sending the key verbatim, boto3, can read."""
    return not any(part in ("", ".", "..") for part in key.split("/"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (POSIX separators, no normalisation of ``..``)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


@dataclass(frozen=True)
class FileEntry:
    rel: str  # root-relative key with '/' separators, exactly as stored (not normalised)
    uri: str  # what read_bytes() takes
    size: int
    mtime_ns: int | None
    etag: str | None = None  # S3 with etags=True: changes with the content even within LastModified's second


def os_metadata(rel: str) -> bool:
    """Files an OS leaves beside photos (macOS resource forks and folder views, Windows thumbnails): never inputs."""
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in (".DS_Store", "Thumbs.db")


def _below(path: str, base: str) -> str:
    """An S3 key relative to the listed prefix, verbatim: ``posixpath.relpath`` would fold ``a/../x`` into ``x``
    (two keys, one name) and needs a current directory, which a job's unpacked working dir may no longer be."""
    return path[len(base):].removeprefix("/") if path.startswith(base) else path


def list_files(root: str, etags: bool = False) -> list[FileEntry]:
    """Every file under ``root`` (recursive), sorted by key. S3 "folder" marker keys are not files.

    Local names that are not UTF-8 (cp949 from some unzip tools) come back surrogate-escaped instead of failing.
    ``etags=True`` lists S3 with boto3, whose ListObjectsV2 answer carries each object's ETag (pyarrow drops it).
    """
    out = []
    if is_s3(root) and etags:
        bucket, _, prefix = root[len("s3://"):].rstrip("/").partition("/")
        base = f"{bucket}/{prefix}" if prefix else bucket
        pages = _boto3_s3(*_s3_settings(bucket)).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    path = f"{bucket}/{obj['Key']}"
                    out.append(FileEntry(_below(path, base), f"s3://{path}", int(obj["Size"]),
                                         int(obj["LastModified"].timestamp()) * 10**9, obj["ETag"].strip('"')))
    elif is_s3(root):
        fs, base = resolve(root)
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=False)):
            if info.type == pafs.FileType.File and not info.path.endswith("/"):
                out.append(FileEntry(_below(info.path, base), f"s3://{info.path}", int(info.size or 0),
                                     info.mtime_ns))
    else:
        base = os.path.abspath(root)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"no such directory: {root}")
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                out.append(FileEntry(os.path.relpath(path, base).replace(os.sep, "/"), path, st.st_size,
                                     st.st_mtime_ns))
    out.sort(key=lambda e: e.rel)
    return out


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        with open(uri, "rb") as f:
            return f.read()
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _pyarrow_addressable(key):
        client = _boto3_s3(*_s3_settings(bucket))
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no such object: {uri}") from e
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename; an S3 PUT is atomic already."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(_temporary(path, data), path)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, ensure_ascii=False, indent=2, default=str).encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_parquet(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri)))


def read_parquet_columns(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Only the named columns: a random-access read of the footer and those column chunks, local or S3."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str, missing_ok: bool = False) -> None:
    if is_s3(uri):
        # boto3, not pyarrow: deleting the last object under a prefix, pyarrow leaves a "prefix/" marker object
        client, bucket, key = _s3_object(uri)
        if not missing_ok and not exists(uri):
            raise FileNotFoundError(f"no such object: {uri}")
        client.delete_object(Bucket=bucket, Key=key)  # S3 answers a delete of a missing key with success
        return
    try:
        os.remove(os.path.abspath(uri))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _s3_object(uri: str) -> tuple[Any, str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return _boto3_s3(*_s3_settings(bucket)), bucket, key


def _version(st: os.stat_result) -> str:
    """A local file's version: every write of ours makes a new inode (a temporary file renamed or linked into place)."""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


@contextlib.contextmanager
def _directory_lock(path: str) -> Iterator[None]:
    """An exclusive flock on the directory holding ``path``: local conditional writes check and swap under it, so two
    of them never interleave (the lock goes with the process: a killed holder never leaves it taken)."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _temporary(path: str, data: bytes) -> str:
    """``data`` written whole beside ``path`` under a unique name, to be renamed or linked into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def create_exclusive(uri: str, data: bytes) -> tuple[bool, str | None]:
    """Create ``uri`` only if nothing is there: (created, version). S3: a PUT with ``If-None-Match: *``; locally the
    whole file is written aside and hard-linked into place, so the name never shows a half-written file."""
    if is_s3(uri):
        client, bucket, key = _s3_object(uri)
        try:
            answer = client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False, None
            raise
        return True, answer["ETag"]
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temporary(path, data)
    try:
        os.link(tmp, path)  # fails if the name exists: the exclusive create
        return True, _version(os.stat(tmp))
    except FileExistsError:
        return False, None
    finally:
        os.unlink(tmp)


def read_with_version(uri: str) -> tuple[bytes, str]:
    """(content, version) of one small file; the version is what ``replace_if_version`` compares."""
    if is_s3(uri):
        client, bucket, key = _s3_object(uri)
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no such object: {uri}") from e
        return answer["Body"].read(), answer["ETag"]
    with open(os.path.abspath(uri), "rb") as f:
        st = os.fstat(f.fileno())  # of the file opened, even if another writer replaces the path meanwhile
        return f.read(), _version(st)


def replace_if_version(uri: str, data: bytes, version: str | None) -> tuple[bool, str | None]:
    """Replace ``uri`` only if it is still at ``version``: (replaced, new version). S3: a PUT with ``If-Match``;
    locally a check and an atomic rename under the directory's lock (the name is never absent meanwhile)."""
    if version is None:
        return False, None
    if is_s3(uri):
        client, bucket, key = _s3_object(uri)
        try:
            answer = client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False, None
            raise
        return True, answer["ETag"]
    path = os.path.abspath(uri)
    with _directory_lock(path):
        try:
            if _version(os.stat(path)) != version:
                return False, None
        except FileNotFoundError:
            return False, None
        tmp = _temporary(path, data)
        new = _version(os.stat(tmp))
        os.replace(tmp, path)
        return True, new


def delete_if_version(uri: str, version: str | None) -> bool:
    """Delete ``uri`` only if it is still at ``version``. Locally under the directory's lock; on S3 a HEAD then the
    delete (conditional deletes are not on every S3 endpoint), which leaves a window of one round trip."""
    if version is None:
        return False
    if is_s3(uri):
        client, bucket, key = _s3_object(uri)
        try:
            if client.head_object(Bucket=bucket, Key=key)["ETag"] != version:
                return False
        except client.exceptions.ClientError:
            return False
        client.delete_object(Bucket=bucket, Key=key)
        return True
    path = os.path.abspath(uri)
    with _directory_lock(path):
        try:
            if _version(os.stat(path)) != version:
                return False
        except FileNotFoundError:
            return False
        os.unlink(path)
        return True
