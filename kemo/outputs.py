"""The output store: how every job writes, resumes, commits and reads its output directory (local or ``s3://``).

An output is a directory of whole files. Parts (Parquet files of rows) are named after their rows, so a retried
batch overwrites its own file instead of adding a copy; each writer hashes the bytes it uploads and leaves a small
receipt beside the part (``_receipts/<folder>/<part>.json``), so committing reads no data file. ``_commit.json``,
written last, names every file with its size and SHA-256, the output's kind and the fingerprint of the run (what
made its rows); readers read what it names, never a glob, so a crashed run leaves nothing a reader can take for
output. ``content_sha256`` (the commit's data-file hashes) is what downstream keys use: it changes with the content,
never with the time.

One run at a time writes an output: ``Output.lease()`` creates ``_lease.json`` exclusively (``If-None-Match: *`` on
S3, ``O_EXCL`` locally) before anything is written, renews it while the run lives and deletes it at the end. A second
run is refused at once with the holder's name; a lease whose holder died (its process gone on this host, or no
renewal for ``STALE_S``) is taken over, and the takeover is logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kemo import storage
from kemo.config import code_version

log = logging.getLogger(__name__)
COMMIT = "_commit.json"
CONFIG = "config.json"
LEASE = "_lease.json"
RECEIPTS = "_receipts"
RUN = "_run.json"
SUMMARY = "summary.json"
# files of a commit that describe a run rather than its content (timings, resolved resource knobs)
VOLATILE = (CONFIG, SUMMARY)
# the kinds of output, one name each: a job refuses an output directory that holds another kind
INDEX, CROPS, LABELS, DETECTOR, CLASSIFIER, BENCHMARK = (
    "index", "crops", "labels", "detector", "classifier-report", "benchmark")
RENEW_S = float(os.environ.get("KEMO_LEASE_RENEW_S", 30))
STALE_S = float(os.environ.get("KEMO_LEASE_STALE_S", 300))  # ten missed renewals: a holder that is gone


class OutputBusy(RuntimeError):
    """Another run holds the output's lease."""


class OtherKind(ValueError):
    """The directory holds a committed output of another kind (a job never writes over it)."""


class Damaged(ValueError):
    """A file the commit names is missing or changed."""


@dataclass(frozen=True)
class Receipt:
    """What a writer wrote: the path relative to the output, its size and its SHA-256."""

    path: str
    bytes: int
    sha256: str


def part_name(keys: Iterable[str]) -> str:
    """A part named after its rows' keys: the same rows give the same name, whatever their order."""
    return f"part-{hashlib.sha1(chr(0).join(sorted(keys)).encode()).hexdigest()[:20]}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str).encode("utf-8")


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a fingerprint compares equal to its stored self."""
    return json.loads(json_bytes(obj))


def write_file(out_dir: str, rel: str, data: bytes) -> Receipt:
    """Write one whole file of an output and return its receipt (hashed from the bytes in hand, not read back)."""
    storage.write_bytes(storage.join(out_dir, rel), data)
    return Receipt(rel, len(data), hashlib.sha256(data).hexdigest())


def write_json(out_dir: str, rel: str, obj: Any) -> Receipt:
    return write_file(out_dir, rel, json_bytes(obj))


def _receipt_path(folder: str, name: str) -> str:
    return f"{RECEIPTS}/{folder}/{name}.json"


def write_part(out_dir: str, folder: str, table: pa.Table, keys: Iterable[str]) -> Receipt:
    """Write ``table`` whole as ``folder/part-….parquet`` named after ``keys``, then its receipt."""
    name = part_name(keys)
    receipt = write_file(out_dir, f"{folder}/{name}", parquet_bytes(table))
    storage.write_bytes(storage.join(out_dir, _receipt_path(folder, name)), json_bytes(asdict(receipt)))
    return receipt


def delete_part(out_dir: str, folder: str, name: str) -> None:
    for rel in (_receipt_path(folder, name), f"{folder}/{name}"):
        try:
            storage.delete(storage.join(out_dir, rel))
        except FileNotFoundError:
            pass


def parts(out_dir: str, folder: str) -> dict[str, Receipt]:
    """The parts present whole in ``folder`` (by name): a part counts when its receipt is there and matches the
    listed size; one killed between part and receipt is not there (its rows are done again, into the same name)."""
    try:
        listed = {e.rel: e.size for e in storage.list_files(storage.join(out_dir, folder))}
        receipts = storage.list_files(storage.join(out_dir, RECEIPTS, folder))
    except FileNotFoundError:
        return {}
    mine = [e for e in receipts if e.rel.removesuffix(".json") in listed]
    with ThreadPoolExecutor(16) as pool:  # small objects: on S3 the round trips, not the bytes, take the time
        read = list(pool.map(lambda e: Receipt(**storage.read_json(e.uri)), mine))
    return {r.path.rsplit("/", 1)[-1]: r for r in read if r.bytes == listed[r.path.rsplit("/", 1)[-1]]}


def sweep(out_dir: str, folder: str) -> dict[str, Receipt]:
    """Delete the files in ``folder`` that are not parts (a writer killed before its receipt), so that the folder
    holds exactly what a commit names; returns the parts, as ``parts`` does."""
    try:
        listed = [e.rel for e in storage.list_files(storage.join(out_dir, folder))]
    except FileNotFoundError:
        return {}
    whole = parts(out_dir, folder)
    for name in listed:
        if name not in whole:
            storage.delete(storage.join(out_dir, folder, name))
    return whole


def read_parts(out_dir: str, folder: str, columns: list[str]) -> dict[str, pa.Table]:
    """The named columns of every part present in ``folder`` (for resuming), one column read each."""
    return {name: storage.read_parquet_columns(storage.join(out_dir, folder, name), columns)
            for name in sorted(parts(out_dir, folder))}


def content_sha256(files: list[dict[str, Any]]) -> str:
    """The content key of a commit: its data files' paths and hashes (config and summary left out)."""
    lines = sorted(f"{f['path']}\0{f['sha256']}" for f in files if f["path"] not in VOLATILE)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class Output:
    """One output directory of one kind (index, crops, labels, detector, classifier-report, benchmark)."""

    def __init__(self, uri: str, kind: str):
        self.uri, self.kind = uri, kind

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ------------------------------------------------------------------------------------------- reading

    def manifest(self) -> dict[str, Any] | None:
        """The commit manifest as written, or None when there is none; raises when it is of another kind."""
        try:
            manifest = storage.read_json(self.path(COMMIT))
        except FileNotFoundError:
            return None
        if manifest.get("kind") != self.kind:
            raise OtherKind(f"{self.uri} holds a {manifest.get('kind')!r} output, not {self.kind!r}: "
                             "choose another output")
        return manifest

    def committed(self) -> dict[str, Any]:
        """The commit manifest, checked against one listing: raises if missing, of another kind, or a file named in
        it is gone or changed in size."""
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.uri} holds no committed output ({COMMIT} missing)")
        listed = {e.rel: e.size for e in storage.list_files(self.uri)}
        for entry in manifest["files"]:
            if listed.get(entry["path"]) != entry["bytes"]:
                raise Damaged(f"{self.uri}: committed file {entry['path']} is missing or changed")
        return manifest

    def current(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The commit manifest when the output is committed, intact and made with ``fingerprint``; else None."""
        try:
            manifest = self.committed()
        except (FileNotFoundError, Damaged):
            return None
        return manifest if manifest.get("fingerprint") == plain(fingerprint) else None

    def files(self, folder: str, manifest: dict[str, Any] | None = None) -> list[str]:
        """The committed files under ``folder``, as URIs (readers read these, never a listing)."""
        manifest = manifest or self.committed()
        return [self.path(f["path"]) for f in manifest["files"] if f["path"].startswith(f"{folder}/")]

    def read_table(self, folder: str, columns: list[str] | None, empty: pa.Schema) -> pa.Table:
        """Every row of the committed parts under ``folder``."""
        tables = [storage.read_parquet_columns(uri, columns) for uri in self.files(folder)]
        if tables:
            return pa.concat_tables(tables)
        return empty.empty_table().select(columns) if columns else empty.empty_table()

    def read_json(self, rel: str) -> Any:
        return storage.read_json(self.path(rel))

    # ------------------------------------------------------------------------------------------- writing

    def check_claim(self, fingerprint: dict[str, Any]) -> bool:
        """Whether a run of this setup has claimed the output (False: nobody has); raises for another setup or
        another kind of output. Reads only."""
        self.manifest()  # an output of another kind is refused before anything is written
        try:
            previous = storage.read_json(self.path(RUN))
        except FileNotFoundError:
            return False
        fingerprint = plain(fingerprint)
        if previous != fingerprint:
            changed = sorted(k for k in {*fingerprint, *previous} if previous.get(k) != fingerprint.get(k))
            raise ValueError(f"{self.uri} holds a {self.kind} output of another run, another setup (differs in "
                             f"{', '.join(changed)}); use a new --output")
        return True

    def claim(self, fingerprint: dict[str, Any]) -> None:
        """Refuse to mix rows of another setup into this output; record this run's fingerprint once (a matching
        claim is left as it is), before any part is written, so a killed run's parts are never taken for another
        setup's."""
        if not self.check_claim(fingerprint):
            storage.write_bytes(self.path(RUN), json_bytes(plain(fingerprint)))

    def claim_receipt(self) -> Receipt:
        data = storage.read_bytes(self.path(RUN))
        return Receipt(RUN, len(data), hashlib.sha256(data).hexdigest())

    def uncommit(self) -> None:
        """Remove the commit marker before rewriting an output, so a crash mid-rewrite leaves no valid output."""
        try:
            storage.delete(self.path(COMMIT))
        except FileNotFoundError:
            pass

    def commit(self, receipts: list[Receipt], config: dict[str, Any], fingerprint: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Write the resolved config, then ``_commit.json`` naming ``receipts`` and the config. Reads nothing."""
        version = code_version()
        files = [*receipts, write_json(self.uri, CONFIG, {"kind": self.kind, "code_version": version,
                                                         "config": config})]
        entries = [{"path": r.path, "bytes": r.bytes, "sha256": r.sha256} for r in files]
        manifest = {"kind": self.kind, "code_version": version, "fingerprint": fingerprint,
                    "content_sha256": content_sha256(entries),
                    "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "files": entries}
        storage.write_bytes(self.path(COMMIT), json_bytes(manifest))
        return manifest

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """Hold the output's lease for the ``with`` block: refused at once when another live run holds it."""
        held = Lease(self.path(LEASE))
        held.acquire()
        try:
            yield held
        finally:
            held.release()


# --------------------------------------------------------------------------------------------------- the lease


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive, renewed claim on one output, held by one run (a uuid, this host and process)."""

    def __init__(self, uri: str, renew_s: float = RENEW_S, stale_s: float = STALE_S):
        self.uri, self.renew_s, self.stale_s = uri, renew_s, stale_s
        self.body = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                     "started_at": _now(), "renewed_at": _now(), "renewed_unix": time.time()}
        self.version: str | None = None  # S3 ETag of our lease object: renewals are conditional on it
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, body: dict[str, Any]) -> str:
        age = time.time() - float(body.get("renewed_unix", 0))
        return (f"run {body.get('run')} (pid {body.get('pid')} on {body.get('host')}, started {body.get('started_at')},"
                f" renewed {age:.0f} s ago)")

    def _stale(self, body: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it lives."""
        if body.get("host") == socket.gethostname() and not _pid_alive(int(body.get("pid", -1))):
            return "its process is gone"
        if time.time() - float(body.get("renewed_unix", 0)) > self.stale_s:
            return f"no renewal for over {self.stale_s:.0f} s"
        return None

    def acquire(self) -> None:
        for _ in range(5):  # the holder may release between our create and our read
            created, self.version = storage.create_exclusive(self.uri, json_bytes(self.body))
            if created:
                break
            try:
                data, version = storage.read_with_version(self.uri)
                holder = json.loads(data)
            except FileNotFoundError:
                continue
            except ValueError:  # a local lease caught mid-write by its creator: it is alive
                time.sleep(0.2)
                continue
            why = self._stale(holder)
            if why is None:
                raise OutputBusy(f"{os.path.dirname(self.uri)} is being written by {self.describe(holder)}: "
                                 "wait for it to finish, or choose another output")
            replaced, self.version = storage.replace_if_version(self.uri, json_bytes(self.body), version)
            if replaced:
                log.warning("took over the lease of %s: %s", self.describe(holder), why)
                break
        else:
            raise OutputBusy(f"could not take the lease {self.uri}: other runs keep taking it")
        self._thread = threading.Thread(target=self._renew, name="kemo-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            body = {**self.body, "renewed_at": _now(), "renewed_unix": time.time()}
            try:
                ok, version = storage.replace_if_version(self.uri, json_bytes(body), self.version)
            except Exception as e:  # a network blip: try again next time; staleness allows ten misses
                log.warning("renewing the lease %s failed: %s", self.uri, e)
                continue
            if not ok:
                self.lost = "another run took the lease over"
                log.error("lost the lease %s: %s", self.uri, self.lost)
                return
            self.body, self.version = body, version

    def check(self) -> None:
        """Raise when the lease was lost (before a commit: another run owns the output now)."""
        if self.lost:
            raise OutputBusy(f"{os.path.dirname(self.uri)}: {self.lost}; this run stops without committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.lost:
            return
        try:
            holder = json.loads(storage.read_bytes(self.uri))
        except (FileNotFoundError, ValueError):
            return
        if holder.get("run") == self.body["run"]:
            storage.delete(self.uri)
