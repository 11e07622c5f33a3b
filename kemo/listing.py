"""What is under a root, local or ``s3://``: one entry per file with its size and version, and, locally, one per thing
that is not a readable file (a broken or outside symlink, a FIFO, an unlistable folder) with why, so a job gives it
its row instead of failing. Reading the files is :mod:`kemo.storage`.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from dataclasses import dataclass

import pyarrow.fs as pafs

from kemo.schema import read_status
from kemo.storage import check_bucket, file_identity, file_kind, is_s3, local_uri, resolve, s3_client

LINKS = ("inside", "anywhere")  # symlink policies of a job's input (docs/design.md, «Safety»)


@dataclass(frozen=True, slots=True)  # slots: a listing holds one per file, 500k for the corpus
class FileEntry:
    rel: str  # root-relative key with '/' separators, exactly as stored (not normalised; surrogate-escaped if need be)
    uri: str  # what read_bytes() takes: valid UTF-8 always (a local name that is not is a file:// URI, percent-encoded)
    size: int
    mtime_ns: int | None
    etag: str | None = None  # S3 with etags=True: changes with the content even within LastModified's second
    # set when the entry is not a readable file: broken_link, outside_link, folder_link, special_file or
    # read_error (with why)
    status: str | None = None
    error: str | None = None
    file_id: str | None = None  # local files: "device:inode" of what was listed (a link's target), see read_bounded


def os_metadata(rel: str) -> bool:
    """Files an OS leaves beside photos (macOS resource forks and folder views, Windows thumbnails): never inputs."""
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in (".DS_Store", "Thumbs.db")


def _below(path: str, base: str) -> str:
    """An S3 key relative to the listed prefix, verbatim: ``posixpath.relpath`` would fold ``a/../x`` into ``x``
    (two keys, one name) and needs a current directory, which a job's unpacked working dir may no longer be."""
    return path[len(base):].removeprefix("/") if path.startswith(base) else path


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _LocalWalk:
    """Every entry under a local ``base``: regular files (and links the policy follows to one) as plain entries,
    everything else as an entry with a status; no entry ever raises. ``links="inside"`` follows a symlink only when
    its target (resolved) stays inside the resolved root. Each real folder is walked once: the real tree first, then
    the folder links in the order found, so a link to a folder already listed (its own ancestor, a sibling, a second
    link to the same place) is a ``folder_link`` entry, and links between folders cannot multiply the listing.
    """

    def __init__(self, base: str, links: str):
        if links not in LINKS:
            raise ValueError(f"--links {links!r}: choose from {', '.join(LINKS)}")
        self.base, self.links, self.real_root = base, links, os.path.realpath(base)
        self.out: list[FileEntry] = []
        root_st = os.stat(base)
        self.listed = {(root_st.st_dev, root_st.st_ino): base}  # real folder → the path it is listed under
        self.folder_links: list[tuple[str, os.stat_result, os.stat_result]] = []  # (link, its lstat, target's stat)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.base).replace(os.sep, "/")

    def entry(self, path: str, st: os.stat_result | None, status: str | None = None, error: str | None = None) -> None:
        plain = st is not None and status is None
        self.out.append(FileEntry(self.rel(path), local_uri(path), st.st_size if plain else 0,
                                  st.st_mtime_ns if st else None, status=status, error=error,
                                  file_id=file_identity(st) if plain else None))

    def run(self) -> list[FileEntry]:
        self.walk(self.base)
        for path, st, tst in self.folder_links:  # grows while linked folders are walked
            key = (tst.st_dev, tst.st_ino)
            if key in self.listed:
                self.entry(path, st, "folder_link", f"a symlink to the folder listed as {self.rel(self.listed[key])}: "
                                                    "its photos have their rows there")
            else:
                self.listed[key] = path
                self.walk(path)
        return self.out

    def walk(self, start: str) -> None:
        queue = collections.deque([start])
        while queue:
            directory = queue.popleft()
            try:
                with os.scandir(directory) as it:
                    items = sorted(it, key=lambda d: d.name)
            except OSError as e:  # permissions, I/O: the folder's entries cannot be known; it gets the row
                self.entry(directory, None, read_status(e), f"cannot list this folder: {e.strerror or e}")
                continue
            for item in items:
                try:
                    folder = self.visit(item.path)
                except OSError as e:  # vanished or unreadable between the listing and its stat
                    self.entry(item.path, None, read_status(e), f"{type(e).__name__}: {e.strerror or e}")
                    continue
                if folder is not None:
                    queue.append(folder)

    def visit(self, path: str) -> str | None:
        """Lists one item of a folder; returns it when it is a folder still to walk."""
        st = tst = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            tst = self.follow(path, st)
            if tst is None:
                return None
            if stat.S_ISDIR(tst.st_mode):
                self.folder_links.append((path, st, tst))  # after the real tree
                return None
        if stat.S_ISDIR(tst.st_mode):
            key = (tst.st_dev, tst.st_ino)
            if key in self.listed:  # the same folder mounted twice
                self.entry(path, st, "folder_link", f"the folder listed as {self.rel(self.listed[key])}: not listed "
                                                    "twice")
                return None
            self.listed[key] = path
            return path
        if stat.S_ISREG(tst.st_mode):
            self.entry(path, tst)
        else:
            self.entry(path, st, "special_file", f"{file_kind(tst.st_mode)}: never opened")
        return None

    def follow(self, path: str, st: os.stat_result) -> os.stat_result | None:
        """A symlink's target's stat, or None (the link then has its entry) where it is broken or the policy stops."""
        try:
            target = os.path.realpath(path, strict=True)
        except OSError as e:
            why = "a symlink loop" if e.errno == errno.ELOOP else "a dangling symlink"
            self.entry(path, st, "broken_link", f"{why} ({os.readlink(path)!r}): {e.strerror or e}")
            return None
        if self.links == "inside" and not _inside(target, self.real_root):
            self.entry(path, st, "outside_link", f"a symlink to {local_uri(target)}, outside the input: not followed "
                                                 "(--links anywhere follows it)")
            return None
        return os.stat(target)


def _list_s3(root: str, etags: bool) -> list[FileEntry]:
    """The objects under an S3 prefix; "folder" marker keys are not files. ``etags=True`` lists with boto3, whose
    ListObjectsV2 answer carries each object's ETag (pyarrow drops it)."""
    out = []
    check_bucket(root)
    if etags:
        bucket, _, prefix = root[len("s3://"):].rstrip("/").partition("/")
        base = f"{bucket}/{prefix}" if prefix else bucket
        pages = s3_client(bucket).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    path = f"{bucket}/{obj['Key']}"
                    out.append(FileEntry(_below(path, base), f"s3://{path}", int(obj["Size"]),
                                         int(obj["LastModified"].timestamp()) * 10**9, obj["ETag"].strip('"')))
        return out
    fs, base = resolve(root)
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=False)):
        if info.type == pafs.FileType.File and not info.path.endswith("/"):
            out.append(FileEntry(_below(info.path, base), f"s3://{info.path}", int(info.size or 0), info.mtime_ns))
    return out


def list_input(root: str, links: str = "inside", etags: bool = False) -> list[FileEntry]:
    """Every entry under a job's input ``root`` (recursive), sorted by key; no single entry fails the listing.

    Regular files come back plain. Locally, what is not one (a dangling or looping symlink, a symlink the ``links``
    policy does not follow, a link to a folder listed already, a FIFO, socket or device, an unlistable folder) comes
    back with ``status`` and ``error`` set, for the job to give it its row. Names that are not UTF-8 keep their bytes
    (``FileEntry.uri``). ``etags=True``: S3 entries carry their ETag.
    """
    if is_s3(root):
        out = _list_s3(root, etags)
    else:
        base = os.path.abspath(root)
        if os.path.isfile(base):
            raise NotADirectoryError(f"{root} is a file, not a folder: give the folder that holds it")
        if not os.path.isdir(base):
            raise FileNotFoundError(f"no such folder: {root}")
        out = _LocalWalk(base, links).run()
    out.sort(key=lambda e: e.rel)
    return out


def list_files(root: str, etags: bool = False) -> list[FileEntry]:
    """The regular files under ``root`` (recursive), sorted by key: what the output store lists of its own folders.
    Links are followed anywhere (an output's files are its own); entries that are not files are left out."""
    return [e for e in list_input(root, "anywhere", etags) if e.status is None]
