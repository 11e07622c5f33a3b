"""The output store: how every job writes, resumes, commits and reads its output directory (local or ``s3://``).

An output is a directory of whole files. Parts (Parquet files of rows) are named after their rows, so a retried
batch overwrites its own file instead of adding a copy; each writer hashes the bytes it uploads and leaves a small
receipt beside the part (``_receipts/<folder>/<part>.json``), so committing reads no data file. ``_commit.json``,
written last, names every file with its size and SHA-256, the output's kind and the fingerprint of the run (what
made its rows); readers read what it names, never a glob, so a crashed run leaves nothing a reader can take for
output. ``content_sha256`` (the hashes of the commit's files, config and summary left out) is what downstream keys
use: it changes with what the files hold, never with when they were committed.

One run at a time writes an output: ``Output.lease()`` holds ``_lease.json`` (:mod:`kemo.lease`) while anything is
written. Every write of the commit (uncommit, the driver's files, the commit itself) first checks that the run still
holds the lease, so a run that lost it stops before it touches the output again. A control file that does not parse
is :class:`Damaged`, naming the file; a writer treats a damaged commit as none and commits anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kemo import listing, storage
from kemo.config import code_version
from kemo.lease import Lease, OutputBusy, utc_now  # noqa: F401  (what Output.lease raises)
from kemo.storage import json_bytes

log = logging.getLogger(__name__)
COMMIT = "_commit.json"
CONFIG = "config.json"
LEASE = "_lease.json"
RECEIPTS = "_receipts"
RUN = "_run.json"
SUMMARY = "summary.json"
# files of a commit that describe a run rather than its content (timings, resolved resource knobs)
GALLERY = "gallery.html"  # a page to look at the rows by eye (kemo.gallery): a view of the data, not data
VOLATILE = (CONFIG, SUMMARY, GALLERY)
# the kinds of output, one name each: a job refuses an output directory that holds another kind
INDEX, CROPS, LABELS, DETECTOR, CLASSIFIER, BENCHMARK = (
    "index", "crops", "labels", "detector", "classifier-report", "benchmark")


class OtherKind(ValueError):
    """The directory holds a committed output of another kind (a job never writes over it)."""


class Damaged(ValueError):
    """A file the commit names is missing or changed, or a control file does not parse."""


CONTROL_SMALL = (SUMMARY, RUN)  # small files of a commit re-hashed whenever it is read: what a no-op rerun trusts


def read_control(uri: str) -> dict[str, Any] | None:
    """A control file (``_commit.json``, ``_run.json``, a receipt, ``summary.json``) as written; None when absent;
    :class:`Damaged`, naming the file, when it does not parse as a JSON object (a truncated write, a disk error)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise Damaged(f"{uri} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise Damaged(f"{uri} is damaged (not a JSON object)")
    return obj


@dataclass(frozen=True)
class Receipt:
    """What a writer wrote: the path relative to the output, its size and its SHA-256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: str, data: bytes) -> Receipt:
        return cls(path, len(data), hashlib.sha256(data).hexdigest())


def part_name(keys: Iterable[str]) -> str:
    """A part named after its rows' keys: the same rows give the same name, whatever their order."""
    return f"part-{hashlib.sha1(chr(0).join(sorted(keys)).encode()).hexdigest()[:20]}.parquet"


ROW_GROUP_BYTES = 1 << 20  # a reader after a few rows (a gallery's crops) reads ~1 MiB around each, not the file


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a Parquet file in row groups of about :data:`ROW_GROUP_BYTES` (Arrow's size: a crop shard's
    groups hold a few dozen crops, a label part's thousands of rows)."""
    buf = io.BytesIO()
    rows = max(1, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes))
    pq.write_table(table, buf, compression="zstd", row_group_size=rows)
    return buf.getvalue()


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a fingerprint compares equal to its stored self."""
    return json.loads(json_bytes(obj))


def write_file(out_dir: str, rel: str, data: bytes) -> Receipt:
    """Write one whole file of an output and return its receipt (hashed from the bytes in hand, not read back)."""
    storage.write_bytes(storage.join(out_dir, rel), data)
    return Receipt.of(rel, data)


def write_json(out_dir: str, rel: str, obj: Any) -> Receipt:
    return write_file(out_dir, rel, json_bytes(obj))


def _receipt_path(folder: str, name: str) -> str:
    return f"{RECEIPTS}/{folder}/{name}.json"


def write_part(out_dir: str, folder: str, table: pa.Table, keys: Iterable[str]) -> Receipt:
    """Write ``table`` whole as ``folder/part-….parquet`` named after ``keys``, then its receipt."""
    name = part_name(keys)
    # a part rewritten under its name (a retried batch) must not keep the old receipt while the new bytes land
    storage.delete(storage.join(out_dir, _receipt_path(folder, name)), missing_ok=True)
    receipt = write_file(out_dir, f"{folder}/{name}", parquet_bytes(table))
    storage.write_bytes(storage.join(out_dir, _receipt_path(folder, name)), json_bytes(asdict(receipt)))
    return receipt


def delete_part(out_dir: str, folder: str, name: str) -> None:
    for rel in (_receipt_path(folder, name), f"{folder}/{name}"):  # the receipt first: no receipt, no part
        storage.delete(storage.join(out_dir, rel), missing_ok=True)


def _listed(out_dir: str, folder: str) -> tuple[dict[str, int], dict[str, Receipt]]:
    """(every file in ``folder`` with its size, the parts among them): one listing of each folder."""
    try:
        listed = {e.rel: e.size for e in listing.list_files(storage.join(out_dir, folder))}
    except FileNotFoundError:
        return {}, {}
    try:
        receipts = [e for e in listing.list_files(storage.join(out_dir, RECEIPTS, folder))
                    if e.rel.removesuffix(".json") in listed]
    except FileNotFoundError:
        return listed, {}
    with ThreadPoolExecutor(16) as pool:  # small objects: on S3 the round trips, not the bytes, take the time
        read = [r for r in pool.map(_receipt, receipts) if r is not None]
    whole = {r.path.rsplit("/", 1)[-1]: r for r in read}
    return listed, {name: r for name, r in whole.items() if r.bytes == listed[name]}


def _receipt(entry: listing.FileEntry) -> Receipt | None:
    """A part's receipt; None when it is damaged (its part then counts as not written, and is written again)."""
    try:
        return Receipt(**(read_control(entry.uri) or {}))
    except (Damaged, TypeError) as e:
        log.warning("receipt %s is damaged (%s): its part will be written again", entry.uri, e)
        return None


def parts(out_dir: str, folder: str) -> dict[str, Receipt]:
    """The parts present whole in ``folder`` (by name): a part counts when its receipt is there and matches the
    listed size; one killed between part and receipt is not there (its rows are done again, into the same name)."""
    return _listed(out_dir, folder)[1]


def sweep(out_dir: str, folder: str) -> dict[str, Receipt]:
    """Delete the files in ``folder`` that are not parts (a writer killed before its receipt), so that the folder
    holds exactly what a commit names; returns the parts, as ``parts`` does."""
    listed, whole = _listed(out_dir, folder)
    for name in listed:
        if name not in whole:
            storage.delete(storage.join(out_dir, folder, name), missing_ok=True)
    return whole


def read_parts(out_dir: str, folder: str, columns: list[str]) -> dict[str, pa.Table]:
    """The named columns of every part present in ``folder`` (for resuming), one column read each."""
    return {name: read_files([storage.join(out_dir, folder, name)], columns) for name in sorted(parts(out_dir, folder))}


def read_files(uris: list[str], columns: list[str] | None, schema: pa.Schema | None = None) -> pa.Table:
    """The rows of the Parquet files ``uris`` as one table of ``columns`` (default: all of ``schema``'s); a file
    without one of them was written by an earlier development version of kemo, and is refused in one line."""
    names = columns if columns is not None else (schema.names if schema is not None else None)
    tables = []
    for uri in uris:
        table = storage.read_parquet_columns(uri, names)  # a column the file lacks is left out, silently
        missing = [n for n in names or [] if n not in table.column_names]
        if missing:
            raise Damaged(f"{uri} has no {', '.join(missing)} column: it was written by an earlier version of kemo; "
                          "write a new output")
        tables.append(table)
    if not tables:
        return schema.empty_table().select(names) if schema is not None else pa.table({})
    return pa.concat_tables(tables)


@dataclass
class Appendable:
    """A committed file read once and hashed, to be extended by :meth:`Output.append`: its path, size, the SHA-256
    state over its bytes, and (on S3, which cannot append) the bytes."""

    path: str
    bytes: int
    hasher: Any
    data: bytes | None


def _sha256(uri: str) -> str:
    h = hashlib.sha256()
    h.update(storage.read_bytes(uri))
    return h.hexdigest()


def table_sha256(table: pa.Table, sort_by: str | None = None) -> str:
    """A table's content hash (its Arrow IPC stream: the same rows and schema give the same bytes), in the order of
    ``sort_by`` when given, so that row order does not count."""
    if sort_by:
        table = table.sort_by(sort_by)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def content_sha256(files: list[dict[str, Any]]) -> str:
    """The content key of a commit: its data files' paths and hashes (config and summary left out)."""
    lines = sorted(f"{f['path']}\0{f['sha256']}" for f in files if f["path"] not in VOLATILE)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class Output:
    """One output directory of one kind (index, crops, labels, detector, classifier-report, benchmark)."""

    def __init__(self, uri: str, kind: str):
        if not storage.is_s3(uri) and os.path.isfile(uri):
            raise NotADirectoryError(f"output {uri} is a file, not a directory: give a directory (new or an output "
                                     f"of this kind, {kind})")
        if storage.is_s3(uri):
            storage.check_bucket(uri)
        self.uri, self.kind = uri, kind
        self.held: Lease | None = None  # while a run holds the lease, every write of the commit checks it first

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ------------------------------------------------------------------------------------------- reading

    def manifest(self) -> dict[str, Any] | None:
        """The commit manifest as written, or None when there is none; raises when it is of another kind, or
        :class:`Damaged` when it does not parse."""
        manifest = read_control(self.path(COMMIT))
        if manifest is None:
            return None
        if manifest.get("kind") != self.kind:
            raise OtherKind(f"{self.uri} holds a {manifest.get('kind')!r} output, not {self.kind!r}: "
                             "choose another output")
        return manifest

    def committed(self) -> dict[str, Any]:
        """The commit manifest, checked against one listing: raises if missing, of another kind, damaged, or a file
        named in it is gone or changed in size (or, for the small files a no-op rerun trusts, in content)."""
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.uri} holds no committed output ({COMMIT} missing)")
        listed = {e.rel: e.size for e in listing.list_files(self.uri)}
        for entry in manifest["files"]:
            if listed.get(entry["path"]) != entry["bytes"]:
                raise Damaged(f"{self.uri}: committed file {entry['path']} is missing or changed")
            if entry["path"] in CONTROL_SMALL and _sha256(self.path(entry["path"])) != entry["sha256"]:
                raise Damaged(f"{self.uri}: committed file {entry['path']} is changed")
        return manifest

    def verify(self) -> list[str]:
        """Every committed file re-hashed against the commit: one line per file missing or changed (none: intact).
        Reads the whole output (on S3: downloads it)."""
        manifest = self.manifest()
        if manifest is None:
            return [f"{self.path(COMMIT)} is missing: nothing is committed"]

        def check(entry: dict[str, Any]) -> str | None:
            try:
                digest = _sha256(self.path(entry["path"]))
            except FileNotFoundError:
                return f"{entry['path']}: missing"
            if digest != entry["sha256"]:
                return f"{entry['path']}: SHA-256 {digest}, committed {entry['sha256']}"
            return None

        with ThreadPoolExecutor(8) as pool:
            return [m for m in pool.map(check, manifest["files"]) if m]

    def current(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The commit manifest when the output is committed, intact and made with ``fingerprint``; else None."""
        try:
            manifest = self.committed()
        except (FileNotFoundError, Damaged):
            return None
        recorded = manifest.get("fingerprint")
        return manifest if recorded is not None and recorded == plain(fingerprint) else None

    def files(self, folder: str) -> list[str]:
        """The committed files under ``folder``, as URIs (readers read these, never a listing)."""
        manifest = self.committed()
        return [self.path(f["path"]) for f in manifest["files"] if f["path"].startswith(f"{folder}/")]

    def read_table(self, folder: str, columns: list[str] | None, schema: pa.Schema) -> pa.Table:
        """Every row of the committed parts under ``folder`` (``columns``, default all of ``schema``'s)."""
        return read_files(self.files(folder), columns, schema)

    def read_json(self, rel: str) -> dict[str, Any]:
        """A JSON file of the output (:class:`Damaged` when it does not parse)."""
        data = read_control(self.path(rel))
        if data is None:
            raise FileNotFoundError(f"{self.path(rel)} is missing")
        return data

    # ------------------------------------------------------------------------------------------- writing

    def check_claim(self, fingerprint: dict[str, Any]) -> bool:
        """Whether a run of this setup has claimed the output (False: nobody has, or a damaged claim this run may
        write anew); raises for another setup or another kind of output. Reads only.

        A damaged commit is an uncommitted output to this run (it commits anew from the parts' receipts); a damaged
        claim is rewritten only where an intact commit says this very setup made the output."""
        try:
            commit = self.manifest()  # an output of another kind is refused before anything is written
        except Damaged as e:
            log.warning("%s: this run treats the output as uncommitted and commits it anew", e)
            commit = None
        fingerprint = plain(fingerprint)
        try:
            previous = read_control(self.path(RUN))
        except Damaged as e:
            if (commit or {}).get("fingerprint") != fingerprint:
                raise Damaged(f"{e}, and no intact commit says which setup wrote this output: use a new --output "
                              f"(or delete {RUN} if you know its parts are this setup's)") from None
            log.warning("%s: written anew from the commit, whose setup is this run's", e)
            return False
        if previous is None:
            return False
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
            self._check()
            storage.write_bytes(self.path(RUN), json_bytes(plain(fingerprint)))

    def claim_receipt(self) -> Receipt:
        return Receipt.of(RUN, storage.read_bytes(self.path(RUN)))

    def _check(self) -> None:
        if self.held is not None:
            self.held.check()

    def write_file(self, rel: str, data: bytes) -> Receipt:
        """A whole file of the commit (summary, report, CSV), written by the driver while it holds the lease."""
        self._check()
        return write_file(self.uri, rel, data)

    def write_json(self, rel: str, obj: Any) -> Receipt:
        return self.write_file(rel, json_bytes(obj))

    def appendable(self, entry: dict[str, Any]) -> Appendable | None:
        """The committed file of ``entry`` (its commit's path, bytes and SHA-256), read once and hashed; None when it
        is not what its commit says (then it is written whole)."""
        uri, hasher, data = self.path(entry["path"]), hashlib.sha256(), None
        try:
            if storage.is_s3(uri):
                data = storage.read_bytes(uri)
                hasher.update(data)
            else:
                fs, path = storage.resolve(uri)
                with fs.open_input_file(path) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        hasher.update(chunk)
        except FileNotFoundError:
            return None
        if hasher.hexdigest() != entry["sha256"]:
            return None
        return Appendable(entry["path"], entry["bytes"], hasher, data)

    def append(self, file: Appendable, data: bytes) -> Receipt:
        """``data`` added at the end of ``file``, its receipt hashed from the state in hand: a local file is
        extended in place (only ``data`` is written); an S3 object, which has no append, is uploaded whole."""
        self._check()
        uri = self.path(file.path)
        if file.data is not None:
            storage.write_bytes(uri, file.data + data)
        else:
            with open(storage.local_path(uri), "ab") as f:
                if f.tell() != file.bytes:
                    raise Damaged(f"{uri} changed while this run held the lease")
                f.write(data)
        file.hasher.update(data)
        return Receipt(file.path, file.bytes + len(data), file.hasher.hexdigest())

    def uncommit(self) -> None:
        """Remove the commit marker before rewriting an output, so a crash mid-rewrite leaves no valid output."""
        self._check()
        try:
            storage.delete(self.path(COMMIT))
        except FileNotFoundError:
            pass

    def commit(self, receipts: list[Receipt], config: dict[str, Any], fingerprint: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Write the resolved config, then ``_commit.json`` naming ``receipts`` and the config; a gallery page the
        commit does not name (``--gallery 0``, or a page that failed) is deleted, so none of older rows is left to
        look at. Reads nothing."""
        version = code_version()
        files = [*receipts, self.write_json(CONFIG, {"kind": self.kind, "code_version": version,
                                                         "config": config})]
        entries = [{"path": r.path, "bytes": r.bytes, "sha256": r.sha256} for r in files]
        manifest = {"kind": self.kind, "code_version": version, "fingerprint": fingerprint,
                    "content_sha256": content_sha256(entries),
                    "committed_at": utc_now(), "files": entries}
        self._check()
        storage.write_bytes(self.path(COMMIT), json_bytes(manifest))
        if GALLERY not in {r.path for r in files}:
            storage.delete(self.path(GALLERY), missing_ok=True)
        return manifest

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """Hold the output's lease for the ``with`` block: refused at once when another live run holds it, or on a
        store that ignores conditional writes (where a lease would let two runs write at once)."""
        if storage.is_s3(self.uri):
            check_conditional_writes(self.uri)
        held = Lease(self.path(LEASE))
        held.acquire()
        self.held = held
        try:
            swept = storage.sweep_temporaries(self.uri, LEASE)  # a killed writer's: only the lease holder sweeps
            if swept:
                log.info("removed %d temporary files a killed run left in %s", swept, self.uri)
            yield held
        finally:
            self.held = None
            held.release()


@dataclass
class VerifyConfig:
    """Re-hash every committed file of an output against its commit and name each mismatch."""

    output: str = field(metadata={"help": "an output directory of any kemo job (local or s3://)"})


def verify(cfg: VerifyConfig) -> list[str]:
    """One line per committed file of ``cfg.output`` that is missing or changed (none: intact)."""
    commit = read_control(storage.join(cfg.output, COMMIT))
    if commit is None:
        return [f"{storage.join(cfg.output, COMMIT)} is missing: nothing is committed"]
    return Output(cfg.output, str(commit.get("kind"))).verify()


_HONOURED: set[str] = set()  # buckets probed by this process


def check_conditional_writes(uri: str) -> None:
    """Refuse an S3 store that accepts but ignores ``If-None-Match``, where a lease would let two runs write one
    output at once: a create-if-absent of one scratch key under ``uri``, twice (the second must fail), once per
    bucket and process, before its first lease."""
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if bucket in _HONOURED:
        return
    probe = storage.join(uri, f"_probe-{uuid.uuid4().hex}")
    try:
        storage.create_exclusive(probe, b"1")  # its answer may be lost and its retry refused: the content says
        second, _ = storage.create_exclusive(probe, b"2")
        kept = storage.read_bytes(probe)
    finally:
        storage.delete(probe, missing_ok=True)
    if second or kept != b"1":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        raise ValueError(f"the S3 store at {endpoint} ignores conditional writes (If-None-Match): two runs could write "
                         f"{uri} at once; use a store that honours them (AWS S3 does)")
    _HONOURED.add(bucket)
