"""A hostile input folder, the same for every job's tests: every kind of directory entry that is not a plain photo
file, beside photos reached in unusual ways. What each entry must become is stated once, here.

Targets outside the input are guarded: ``Untouchable`` is a FIFO whose opening (for reading, by anyone) the test can
see afterwards, so "a link target outside the root is never opened" is something a test can fail on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.photos import jpeg, scene

# "한글 사진.jpg" in cp949, as `unzip` leaves the names of a Korean archive
NON_UTF8 = b"\xc7\xd1\xb1\xdb \xbb\xe7\xc1\xf8.jpg"


class Untouchable:
    """A FIFO at ``path`` with a writer waiting for a reader: ``opened`` tells whether anything opened it to read."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            with open(self.path, "wb"):  # blocks until a reader opens the FIFO
                self._opened.set()
        except OSError:
            self._opened.set()

    def close(self) -> bool:
        """Whether anything opened it; then releases the writer (by opening it ourselves)."""
        opened = self._opened.is_set()
        if self._thread.is_alive():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self._thread.join(timeout=5)
            os.close(fd)
        return opened


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) << 10


@contextlib.contextmanager
def memory_growth() -> Iterator[list[int]]:
    """How far this process's peak RSS rose above its RSS at the start of the block, in bytes (Linux: VmHWM, reset
    first through /proc/self/clear_refs). The list holds the figure once the block is done."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start, out = _status_kb("VmRSS"), []
    yield out
    out.append(_status_kb("VmHWM") - start)


def photo(seed: int = 0) -> bytes:
    return jpeg(scene(320, 240), quality=90 - seed)


def build(root: Path, outside: Path) -> tuple[dict[str, str | None], Untouchable]:
    """Fill ``root`` (and ``outside``, for link targets). Returns (root-relative name as listed → the status its row
    must have with ``--links inside``, None for entries that must be read and decoded as photos; the guard)."""
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (root / "inner").mkdir()
    (root / "plain.jpg").write_bytes(photo(0))
    (root / "inner" / "real.jpg").write_bytes(photo(1))
    os.symlink("real.jpg", root / "inner" / "link.jpg")  # a link inside the input: followed
    os.symlink("inner", root / "innerdir")  # a directory link inside: followed (its photos listed under its name)
    os.symlink("missing.jpg", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink(".", root / "inner" / "cycle")  # a directory link to its own parent
    for a, b in (("a", "b"), ("b", "c"), ("c", "a")):  # folders linking each other: walked once each, not 3! times
        (root / "mesh" / a).mkdir(parents=True)
        os.symlink(f"../{b}", root / "mesh" / a / f"to_{b}")
    (root / "mesh" / "a" / "m.jpg").write_bytes(photo(5))
    os.mkfifo(root / "pipe.jpg")  # a FIFO named like a photo: opening it to read would block for ever
    os.symlink("/dev/zero", root / "zero.jpg")  # a device: endless bytes
    guard = Untouchable(outside / "secret.fifo")
    os.symlink(guard.path, root / "secret.jpg")
    (outside / "dir").mkdir()
    (outside / "dir" / "away.jpg").write_bytes(photo(2))
    os.symlink(outside / "dir", root / "outdir")
    os.symlink(outside / "dir", root / "outdir2")  # the same outside folder again
    (outside / "away.jpg").write_bytes(photo(3))
    os.symlink(outside / "away.jpg", root / "away.jpg")
    with open(root / "sparse.jpg", "wb") as f:  # 2 GB that occupies no disk: must be refused, never read
        f.write(b"\xff\xd8\xff")
        f.truncate(2 << 30)
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as f:
        f.write(photo(4))
    expected: dict[str, str | None] = {
        "plain.jpg": None, "inner/real.jpg": None, "inner/link.jpg": None, os.fsdecode(NON_UTF8): None,
        "mesh/a/m.jpg": None, "dangling.jpg": "broken_link", "loop.jpg": "broken_link",
        "inner/cycle": "folder_link", "innerdir": "folder_link", "mesh/a/to_b": "folder_link",
        "mesh/b/to_c": "folder_link", "mesh/c/to_a": "folder_link", "pipe.jpg": "special_file",
        "zero.jpg": "outside_link", "secret.jpg": "outside_link", "outdir": "outside_link",
        "outdir2": "outside_link", "away.jpg": "outside_link", "sparse.jpg": "too_large",
    }
    return expected, guard


def anywhere(expected: dict[str, str | None]) -> dict[str, str | None]:
    """The same folder with ``--links anywhere``: outside targets are followed (a device or FIFO still never read)."""
    out = {k: v for k, v in expected.items() if v != "outside_link"}
    out.update({"zero.jpg": "special_file", "secret.jpg": "special_file", "outdir/away.jpg": None, "away.jpg": None,
                "outdir2": "folder_link"})
    return out


def beyond_path_max(root: Path) -> str:
    """A folder under ``root`` whose path is longer than the system allows (PATH_MAX, 4096 on Linux), made one level
    at a time through directory descriptors; returns the root-relative name of the first folder that cannot be listed
    by its path (where the listing gives its row)."""
    name, fd, rel = "d" * 250, os.open(root, os.O_RDONLY), []
    try:
        while len(str(root)) + sum(len(p) + 1 for p in rel) < 4200:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
            rel.append(name)
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(photo(6))
    finally:
        os.close(fd)
    limit = os.pathconf(root, "PC_PATH_MAX")
    depth = next(k for k in range(1, len(rel) + 1) if len(os.path.join(root, *rel[:k])) >= limit)
    return os.path.join(*rel[:depth])
