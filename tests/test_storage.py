"""Local and S3 (moto over HTTP) reads, writes, listings and the conditional writes a lease needs."""

import os
import time

import boto3
import pyarrow as pa
import pytest

from kemo import listing, storage
from tests import hostile

KEYS = ["a/기쁨 사진 & 친구.jpg", "a/b/x+y.jpeg", "c.json"]


def test_local_round_trip_and_listing(tmp_path):
    root = str(tmp_path / "root")
    for i, key in enumerate(KEYS):
        storage.write_bytes(storage.join(root, key), bytes([i]) * (i + 1))
    entries = listing.list_files(root)
    assert [e.rel for e in entries] == sorted(KEYS)
    assert [e.size for e in entries] == [2, 1, 3]
    assert storage.read_bytes(entries[1].uri) == b"\x00"
    assert not [p for p in os.listdir(tmp_path / "root" / "a") if ".tmp-" in p]

    storage.write_parquet(pa.table({"x": [1, 2]}), storage.join(root, "t.parquet"))
    assert storage.read_parquet(storage.join(root, "t.parquet")).column("x").to_pylist() == [1, 2]


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))


def test_a_listing_never_fails_on_an_entry_and_follows_links_only_inside_the_input(tmp_path):
    expected, guard = hostile.build(tmp_path / "in", tmp_path / "out")
    try:
        entries = listing.list_input(str(tmp_path / "in"))
        listed = {e.rel: e.status for e in entries}
        # the listing judges what an entry is, not its size: the sparse file is a regular file
        assert listed == {k: (None if v == "too_large" else v) for k, v in expected.items()}
        for e in entries:
            e.uri.encode("utf-8")  # every uri fits an Arrow string, a CSV, a JSON report
            assert (e.error is None) == (e.status is None), e
        by_rel = {e.rel: e for e in entries}
        odd = by_rel[os.fsdecode(hostile.NON_UTF8)]
        assert odd.uri.startswith("file://") and storage.read_bytes(odd.uri) == hostile.photo(4)  # readable back
        assert storage.local_path(odd.uri) == os.path.join(str(tmp_path / "in"), os.fsdecode(hostile.NON_UTF8))
        assert by_rel["inner/link.jpg"].size == len(hostile.photo(1))  # a followed link: its target's size
        assert "outside the input" in by_rel["outdir"].error and "--links anywhere" in by_rel["outdir"].error
        assert "loop" in by_rel["loop.jpg"].error and "dangling" in by_rel["dangling.jpg"].error
        assert "listed as inner" in by_rel["inner/cycle"].error and "listed as inner" in by_rel["innerdir"].error
        assert "listed as mesh/b" in by_rel["mesh/a/to_b"].error and "FIFO" in by_rel["pipe.jpg"].error
        anywhere = {e.rel: e.status for e in listing.list_input(str(tmp_path / "in"), links="anywhere")}
        assert anywhere == {k: (None if v == "too_large" else v) for k, v in hostile.anywhere(expected).items()}
        # the output store's own listing: regular files only
        assert {e.rel for e in listing.list_files(str(tmp_path / "in"))} == {
            k for k, v in hostile.anywhere(expected).items() if v in (None, "too_large")}
    finally:
        assert not guard.close()  # listing (and stat'ing) the FIFO outside never opened it


def test_an_input_that_is_a_file_or_is_missing_is_named_as_such(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        listing.list_input(str(tmp_path / "a.jpg"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        listing.list_input(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--links"):
        listing.list_input(str(tmp_path), links="everywhere")


def test_bounded_reads_open_only_regular_files_and_never_read_past_the_limit(tmp_path):
    expected, guard = hostile.build(tmp_path / "in", tmp_path / "out")
    root = tmp_path / "in"
    t0 = time.monotonic()
    for name in ("pipe.jpg", "zero.jpg"):  # a FIFO without a writer, a device without an end
        with pytest.raises(storage.NotAFile):
            storage.read_bounded(str(root / name), 1 << 20)
    assert time.monotonic() - t0 < 5
    with hostile.memory_growth() as grew, pytest.raises(storage.TooLarge, match="2147483648 bytes exceeds the "
                                                                         "268435456-byte limit"):
        storage.read_bounded(str(root / "sparse.jpg"), 256 << 20)
    assert grew[0] < 100 << 20  # refused from its size, unread
    data = hostile.photo(0)
    assert storage.read_bounded(str(root / "plain.jpg"), len(data)) == data
    with pytest.raises(storage.TooLarge):
        storage.read_bounded(str(root / "plain.jpg"), len(data) - 1)
    heads = []

    def refuse(head: bytes) -> None:
        heads.append(head)
        raise ValueError("not wanted")

    with pytest.raises(ValueError, match="not wanted"):
        storage.read_bounded(str(root / "plain.jpg"), 1 << 20, refuse)
    assert heads == [data[:storage.HEAD_BYTES]]  # the format is judged on the first bytes alone
    with pytest.raises(storage.TooLarge, match="more than 10 bytes"):  # procfs says 0 bytes: the read itself stops
        storage.read_bounded("/proc/self/status", 10)
    assert not guard.close()


def test_a_file_that_changed_since_it_was_listed_is_not_read(tmp_path, monkeypatch):
    expected, guard = hostile.build(tmp_path / "in", tmp_path / "out")
    root = tmp_path / "in"
    link = next(e for e in listing.list_input(str(root)) if e.rel == "inner/link.jpg")
    assert storage.read_bounded(link.uri, 1 << 20, file_id=link.file_id) == hostile.photo(1)
    os.remove(root / "inner" / "link.jpg")
    os.symlink(tmp_path / "out" / "away.jpg", root / "inner" / "link.jpg")  # re-pointed outside after the listing
    with pytest.raises(storage.Changed):
        storage.read_bounded(link.uri, 1 << 20, file_id=link.file_id)
    os.remove(root / "inner" / "link.jpg")
    os.symlink(guard.path, root / "inner" / "link.jpg")  # … or at the FIFO outside: not even opened
    with pytest.raises(storage.NotAFile):
        storage.read_bounded(link.uri, 1 << 20, file_id=link.file_id)
    assert not guard.close()
    # a FIFO swapped in between the stat and the open: the open does not block, fstat refuses it
    real_stat, regular = os.stat, os.stat(root / "plain.jpg")
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if str(p).endswith("pipe.jpg")
                        else real_stat(p, *a, **k))
    with pytest.raises(storage.NotAFile, match="FIFO"):
        storage.read_bounded(str(root / "pipe.jpg"), 1 << 20)


def test_bounded_reads_of_s3_objects(s3_bucket, moto_endpoint):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for key in ("b/x.jpg", "b//odd.jpg"):  # pyarrow's client, and boto3's for a key pyarrow cannot address
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"\xff\xd8\xff" + bytes(1000))
        uri = f"s3://{s3_bucket}/{key}"
        assert storage.read_bounded(uri, 1003) == b"\xff\xd8\xff" + bytes(1000)
        with pytest.raises(storage.TooLarge, match="1003 bytes exceeds the 1002-byte limit"):
            storage.read_bounded(uri, 1002)


def test_s3_round_trip_with_awkward_keys(s3_bucket, moto_endpoint):
    root = f"s3://{s3_bucket}/pre fix"
    for i, key in enumerate(KEYS):
        storage.write_bytes(storage.join(root, key), f"v{i}".encode())
    # a console-made "folder" marker is not a file
    boto3.client("s3", endpoint_url=moto_endpoint).put_object(Bucket=s3_bucket, Key="pre fix/a/", Body=b"")
    entries = listing.list_files(root)
    assert [e.rel for e in entries] == sorted(KEYS)
    assert entries[0].uri == f"s3://{s3_bucket}/pre fix/a/b/x+y.jpeg"
    assert storage.read_bytes(storage.join(root, KEYS[0])) == b"v0"
    # what pyarrow wrote, boto3 reads under the same key: no mangling of Hangul, spaces, '&' or '+'
    body = boto3.client("s3", endpoint_url=moto_endpoint).get_object(Bucket=s3_bucket, Key="pre fix/" + KEYS[0])
    assert body["Body"].read() == b"v0"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/nope")


def test_s3_keys_that_differ_only_in_slashes_keep_their_own_names(s3_bucket, moto_endpoint):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for key, body in {"in/x.jpg": b"one", "in//x.jpg": b"two", "in/a/../x.jpg": b"three"}.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    entries = listing.list_files(f"s3://{s3_bucket}/in", etags=True)
    assert sorted(e.rel for e in entries) == ["/x.jpg", "a/../x.jpg", "x.jpg"]  # three keys, three names
    assert {e.rel: storage.read_bytes(e.uri) for e in entries} == {"x.jpg": b"one", "/x.jpg": b"two",
                                                                  "a/../x.jpg": b"three"}


def test_an_endpoint_without_a_scheme_means_https_for_both_s3_clients(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.internal:9000")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert storage._s3_settings("bucket") == ("https://minio.internal:9000", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert storage._s3_settings("bucket") == ("http://127.0.0.1:9000", "us-east-1")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_conditional_writes_create_once_and_replace_only_an_unchanged_file(where, tmp_path, request):
    """The two primitives of the output lease. On S3 they are ``If-None-Match: *`` and ``If-Match`` PUTs, which the
    moto server honours (a second conditional create answers 412 PreconditionFailed), as AWS S3 does."""
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    uri = storage.join(root, "out", "_lease.json")
    created, v1 = storage.create_exclusive(uri, b"first")
    assert created and v1
    assert storage.create_exclusive(uri, b"second") == (False, None)
    data, version = storage.read_with_version(uri)
    assert data == b"first" and version == v1
    replaced, v2 = storage.replace_if_version(uri, b"third", v1)
    assert replaced and v2 != v1 and storage.read_bytes(uri) == b"third"
    assert storage.replace_if_version(uri, b"fourth", v1) == (False, None)  # v1 is gone: refused, unchanged
    assert storage.read_bytes(uri) == b"third"


def test_a_folder_that_cannot_be_listed_gets_an_entry_transient_or_not(tmp_path, monkeypatch):
    """As root (these tests' user) every folder is listable, so the refusal comes from a patched scandir. A permission
    refused or a path beyond the system's limit is ``unreadable`` (never retried); an I/O error ``read_error``."""
    (tmp_path / "in" / "locked").mkdir(parents=True)
    (tmp_path / "in" / "locked" / "x.jpg").write_bytes(b"x")
    (tmp_path / "in" / "open.jpg").write_bytes(b"y")
    real = os.scandir

    (tmp_path / "in" / "deep").mkdir()
    (tmp_path / "in" / "flaky").mkdir()

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        if str(path).endswith("deep"):
            raise OSError(36, "File name too long", str(path))
        if str(path).endswith("flaky"):
            raise OSError(5, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = {e.rel: (e.status, e.error) for e in listing.list_input(str(tmp_path / "in"))}
    assert entries == {"open.jpg": (None, None),
                       "locked": ("unreadable", "cannot list this folder: Permission denied"),
                       "deep": ("unreadable", "cannot list this folder: File name too long"),
                       "flaky": ("read_error", "cannot list this folder: Input/output error")}
