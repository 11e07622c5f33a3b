"""Local paths and ``s3://`` URIs behind one API: read, write and delete whole files, and the conditional writes a
lease needs (create only if absent, replace only if unchanged). S3 goes through pyarrow (boto3 where it cannot: ETags,
odd keys, conditional writes); ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` selects a custom endpoint (moto in
tests, MinIO on premises). What is under a root is :mod:`kemo.listing`; committing outputs is :mod:`kemo.outputs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import posixpath
import stat
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

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
    return pafs.LocalFileSystem(), local_path(uri)


@functools.cache
def _boto3_s3(endpoint: str | None, region: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)  # thread-safe; one per process


def s3_client(bucket: str) -> Any:
    """boto3's S3 client for ``bucket``: for what pyarrow cannot do (ETags, odd keys, conditional writes)."""
    return _boto3_s3(*_s3_settings(bucket))


_BUCKETS_SEEN: set[tuple[str | None, str]] = set()  # (endpoint, bucket) found to exist by this process


def check_bucket(uri: str) -> None:
    """Refuse an ``s3://`` URI whose bucket does not exist, in one line (a missing bucket would otherwise surface as
    a traceback from whichever call met it first, after Ray had started)."""
    bucket = uri[len("s3://"):].split("/", 1)[0]
    where = (_s3_settings(bucket)[0], bucket)
    if where in _BUCKETS_SEEN:  # every Output and listing asks: one HEAD per bucket and process
        return
    client = s3_client(bucket)
    try:
        client.head_bucket(Bucket=bucket)
        _BUCKETS_SEEN.add(where)
    except client.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            raise FileNotFoundError(f"no such bucket: s3://{bucket} (at {_s3_settings(bucket)[0] or 'AWS S3'})") \
                from None
        # 403 and the like: a role may read a prefix without the right to HEAD its bucket; later calls will tell


def _pyarrow_addressable(key: str) -> bool:
    """pyarrow's S3 client refuses empty path components and drops "." / ".." ones: such keys are legal S3 objects
    (``a/../x.jpg``, ``a//x.jpg``) that only a client sending the key verbatim, boto3, can read."""
    return not any(part in ("", ".", "..") for part in key.split("/"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (POSIX separators, no normalisation of ``..``)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


HEAD_BYTES = 64  # enough for every format sniffer: read first, before the rest of a file


class TooLarge(ValueError):
    """A file over a read's byte limit: found by reading at most limit + 1 bytes, never by trusting a listed size."""


class NotAFile(OSError):
    """A FIFO, socket or device where a file was expected: it is never read (a FIFO would block for ever)."""


class Changed(OSError):
    """A local file that is no longer the one listed (a link re-pointed, a file replaced): not read."""


def local_uri(path: str) -> str:
    """A local path as text that any Arrow column, CSV or JSON holds and :func:`local_path` turns back into the same
    bytes: the path itself, or for a name that is not UTF-8 (cp949 from some unzip tools, surrogate-escaped by
    Python) a ``file://`` URI with every such byte percent-encoded (RFC 8089)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path), safe="/")


def local_path(uri: str) -> str:
    """The OS path of a local URI: a plain path, or a ``file://`` URI (percent-decoded to the original bytes)."""
    if uri.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(uri[len("file://"):]))
    return os.path.abspath(uri)


def file_kind(mode: int) -> str:
    return {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "not a regular file")


def file_identity(st: os.stat_result) -> str:
    """A file's ``device:inode``: which file a name led to, so a later open can tell it is still that one."""
    return f"{st.st_dev}:{st.st_ino}"


def read_bytes(uri: str) -> bytes:
    """A whole file. On S3 one GET, which returns one version of the object whole: pyarrow's stream asks for the
    size first and then reads that many bytes, so an object rewritten in between (a lease renewed, a commit made)
    came back torn."""
    if not is_s3(uri):
        with open(local_path(uri), "rb") as f:
            return f.read()
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = s3_client(bucket)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey as e:
        raise FileNotFoundError(f"no such object: {uri}") from e


def _read_upto(read: Callable[[int], bytes], limit: int, have: int, size: int | None) -> list[bytes]:
    """Chunks from ``read`` until EOF or ``limit`` + 1 bytes in all (``have`` already read): never more. A known
    ``size`` is asked for in one read (on S3 one ranged GET, not one per MiB); past it, or without it, 1 MiB at once."""
    chunks, want = [], (size - have + 1) if size is not None else 1 << 20
    while have <= limit:
        chunk = read(min(max(want, 1 << 20), limit + 1 - have))
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return chunks


def read_bounded(uri: str, limit: int, check_head: Callable[[bytes], object] | None = None,
                 file_id: str | None = None) -> bytes:
    """A whole input file of at most ``limit`` bytes, reading at most ``limit`` + 1 (``TooLarge`` beyond).

    A size the file system knows at open time (``fstat``, S3's Content-Length) over the limit is refused unread; the
    read itself stops at ``limit`` + 1 whatever was said. Locally only a regular file is read: the open never blocks
    (``O_NONBLOCK``: a FIFO has no writer) and a FIFO, socket or device raises ``NotAFile``. With the listing's
    ``file_id``, a file that is no longer the one listed (a symlink re-pointed outside the input since) raises
    ``Changed``, unread. ``check_head`` sees the first ``HEAD_BYTES`` before the rest is read and may raise to stop
    there (a file that is no image is not read on).
    """
    def finish(size: int | None, read: Callable[[int], bytes]) -> bytes:
        if size is not None and size > limit:
            raise TooLarge(f"file of {size} bytes exceeds the {limit}-byte limit")
        head = read(min(HEAD_BYTES, limit + 1))
        if check_head is not None:
            check_head(head)
        data = b"".join([head, *_read_upto(read, limit, len(head), size)])
        if len(data) > limit:
            raise TooLarge(f"file of more than {limit} bytes exceeds the {limit}-byte limit")
        return data

    if not is_s3(uri):
        path = local_path(uri)

        def check(st: os.stat_result) -> None:
            if not stat.S_ISREG(st.st_mode):
                raise NotAFile(f"{file_kind(st.st_mode)}: never read")
            if file_id is not None and file_identity(st) != file_id:
                raise Changed("not the file that was listed (replaced, or a symlink re-pointed since): not read")

        check(os.stat(path))  # a FIFO is not even opened (that alone wakes a writer waiting on it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)  # of what was opened, whatever the name points to by now
            check(st)
            return finish(st.st_size, f.read)
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _pyarrow_addressable(key):
        client = s3_client(bucket)
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no such object: {uri}") from e
        with contextlib.closing(answer["Body"]) as body:
            return finish(answer.get("ContentLength"), body.read)
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:  # random access: its size from a HEAD, its bytes by ranged GETs as read
        return finish(f.size(), f.read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename; an S3 PUT is atomic already."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(_temporary(path, data), path)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the UTF-8 JSON every kemo file is written in."""
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str).encode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json_bytes(obj))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_parquet(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pa.Table:
    """A whole Parquet file, read through Arrow's own file: parsed from Python bytes with Arrow's threads, a process
    aborted at exit now and then ("terminate called without an active exception", pyarrow 26), after its work."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if is_s3(uri) and not _pyarrow_addressable(key):  # a key only boto3 reads: parsed from bytes, on this thread
        return pq.read_table(pa.BufferReader(read_bytes(uri)), use_threads=False)
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read()


def read_parquet_columns(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Only the named columns: a random-access read of the footer and those column chunks, local or S3 (a column the
    file lacks is left out: :func:`kemo.outputs.read_files` refuses such a file)."""
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
    return s3_client(bucket), bucket, key


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


TEMPORARY = ".tmp-"  # a whole file being written, beside the name it will take


def _temporary(path: str, data: bytes) -> str:
    """``data`` written whole beside ``path`` under a unique name, to be renamed or linked into place."""
    tmp = f"{path}{TEMPORARY}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:  # a full disk, a signal: no half-written temporary is left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def sweep_temporaries(root: str, spare: str) -> int:
    """Delete the temporaries a killed local writer left under ``root`` (S3 writes leave none), except those of the
    files named ``spare`` (a live writer's: the lease renewing itself); returns how many."""
    if is_s3(root):
        return 0
    found = 0
    for folder, _, names in os.walk(local_path(root)):
        for name in names:
            if TEMPORARY in name and not name.startswith(f"{spare}{TEMPORARY}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    found += 1
    return found


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
