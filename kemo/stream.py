"""An input file opened for streaming reads, never read whole: a local regular file (checked as
:func:`kemo.storage.read_bounded` checks it: never a FIFO or device, only the very file listed), or an S3 object read
by ranged GETs that hold one block at a time, each conditional on the listed ETag, so an object rewritten meanwhile is
never read half old, half new. Videos are decoded from these: PyAV reads Python file objects.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

from kemo import storage

FIRST_BLOCK = 64 << 10  # a sniff or a header read after a seek costs one small GET
BLOCK = 4 << 20  # sequential reads grow the blocks to this: a GET per 4 MiB of a video


class RangedObject(io.RawIOBase):
    """A seekable, read-only view of one S3 object version: reads are served from one block held at a time, fetched by
    a ranged GET with ``If-Match: etag``; a block after a seek starts small and grows while reads stay sequential."""

    def __init__(self, uri: str, size: int, etag: str | None):
        super().__init__()
        bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.uri, self.bucket, self.size, self.etag = uri, bucket, size, etag
        self.client = storage.s3_client(bucket)
        self.pos, self.start, self.data, self.next_block = 0, 0, b"", FIRST_BLOCK

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def fetch(self) -> None:
        """The block that holds ``pos``: one ranged GET, conditional on the listed ETag."""
        sequential = self.pos == self.start + len(self.data) and self.data
        self.next_block = min(BLOCK, self.next_block * 2) if sequential else FIRST_BLOCK
        end = min(self.size, self.pos + self.next_block) - 1
        extra = {"IfMatch": f'"{self.etag}"'} if self.etag else {}
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end}", **extra)
        except self.client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no such object: {self.uri}") from e
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise storage.Changed(f"{self.uri} changed since it was listed: not read on") from None
            raise
        self.start, self.data = self.pos, answer["Body"].read()

    def readinto(self, buffer: memoryview) -> int:
        """Fills ``buffer`` whole unless the object ends first (a short read means the end, as for a local file)."""
        done = 0
        while done < len(buffer) and self.pos < self.size:
            if not self.start <= self.pos < self.start + len(self.data):
                self.fetch()
                if not self.data:  # the object is shorter than listed: an ETag-less store changed it
                    break
            at = self.pos - self.start
            n = min(len(buffer) - done, len(self.data) - at)
            buffer[done:done + n] = self.data[at:at + n]
            self.pos += n
            done += n
        return done


def _open_local(path: str, file_id: str | None) -> BinaryIO:
    """A local regular file opened unbuffered, refused (``storage.NotAFile``, ``storage.Changed``) as
    :func:`kemo.storage.read_bounded` refuses it: a FIFO is never opened, the file opened must be the one listed."""
    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise storage.NotAFile(f"{storage.file_kind(st.st_mode)}: never read")
        if file_id is not None and storage.file_identity(st) != file_id:
            raise storage.Changed("not the file that was listed (replaced, or a symlink re-pointed since): not read")

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb", buffering=0)


def open_stream(uri: str, size: int, file_id: str | None = None, etag: str | None = None) -> BinaryIO:
    """The input file at ``uri`` (``size`` bytes as listed) for streaming reads: a local file object, or a
    :class:`RangedObject` of the version listed (``etag``). The caller closes it."""
    if storage.is_s3(uri):
        return RangedObject(uri, size, etag)
    return _open_local(storage.local_path(uri), file_id)


def read_head(uri: str, size: int, n: int, file_id: str | None = None, etag: str | None = None) -> bytes:
    """The first ``n`` bytes of an input file (fewer when it is shorter): what content sniffers read."""
    with open_stream(uri, size, file_id, etag) as f:
        return f.read(n)
