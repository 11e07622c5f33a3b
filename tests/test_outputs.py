"""The output store (kemo.outputs): parts and receipts, a commit that reads no data, and the one-run-at-a-time lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from kemo import outputs, storage
from kemo.lease import STALE_S, Lease

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def root_for(where: str, tmp_path, request) -> str:
    return str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"


@pytest.fixture
def counted_reads(monkeypatch):
    """Every read of a file's bytes through kemo.storage, by path: what a commit must not do to data files."""
    reads: list[str] = []
    for name in ("read_bytes", "read_parquet", "read_parquet_columns"):
        real = getattr(storage, name)

        def counting(uri, *args, _real=real, **kwargs):
            reads.append(uri)
            return _real(uri, *args, **kwargs)

        monkeypatch.setattr(storage, name, counting)
    return reads


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parts_receipts_commit_and_read_back(where, tmp_path, request, counted_reads):
    root = root_for(where, tmp_path, request)
    out = outputs.Output(root, "test")
    a = outputs.write_part(root, "parts", pa.table({"k": ["b", "a"]}), ["b", "a"])
    b = outputs.write_part(root, "parts", pa.table({"k": ["c"]}), ["c"])
    assert a.path == f"parts/{outputs.part_name(['a', 'b'])}"  # named after its rows, whatever their order
    assert set(outputs.parts(root, "parts")) == {a.path.split("/")[1], b.path.split("/")[1]}
    counted_reads.clear()
    manifest = out.commit([a, b], {"k": 1}, {"setup": 1})
    assert counted_reads == []  # the commit hashes the bytes it is handed: it reads no file back
    assert [f["path"] for f in manifest["files"]] == [a.path, b.path, outputs.CONFIG]
    counted_reads.clear()
    assert out.committed()["files"] == manifest["files"]
    assert counted_reads == [out.path(outputs.COMMIT)]  # the manifest, then one listing: no data file read
    assert sorted(out.read_table("parts", None, pa.schema([("k", pa.string())])).column("k").to_pylist()) == \
        ["a", "b", "c"]
    assert out.current({"setup": 1}) is not None and out.current({"setup": 2}) is None
    with pytest.raises(ValueError, match="holds a 'test' output, not 'labels'"):
        outputs.Output(root, "labels").committed()
    storage.write_bytes(out.path(a.path), b"truncated")
    with pytest.raises(ValueError, match="missing or changed"):
        out.committed()
    out.uncommit()
    with pytest.raises(FileNotFoundError):
        out.committed()


def test_content_key_follows_the_data_files_never_the_time_or_the_config(tmp_path):
    root = str(tmp_path / "out")
    out = outputs.Output(root, "test")
    part = outputs.write_part(root, "parts", pa.table({"k": ["a"]}), ["a"])
    first = out.commit([part, outputs.write_json(root, outputs.SUMMARY, {"seconds": 1.0})], {"workers": 1})
    time.sleep(1.1)
    second = out.commit([part, outputs.write_json(root, outputs.SUMMARY, {"seconds": 9.0})], {"workers": 4})
    assert first["committed_at"] != second["committed_at"]
    assert first["content_sha256"] == second["content_sha256"]
    other = outputs.write_part(root, "parts", pa.table({"k": ["a"], "v": [1]}), ["a"])
    assert out.commit([other], {"workers": 1})["content_sha256"] != first["content_sha256"]


def test_a_part_without_its_receipt_is_not_there(tmp_path):
    """A writer killed between the part and its receipt leaves a file that resume must not count."""
    root = str(tmp_path / "out")
    kept = outputs.write_part(root, "parts", pa.table({"k": ["a"]}), ["a"])
    storage.write_parquet(pa.table({"k": ["b"]}), storage.join(root, "parts", outputs.part_name(["b"])))
    assert list(outputs.parts(root, "parts")) == [kept.path.split("/")[1]]


def test_claim_refuses_another_setup_and_is_written_once(tmp_path):
    out = outputs.Output(str(tmp_path / "out"), "test")
    assert not out.check_claim({"a": (1, 2)})
    out.claim({"a": (1, 2)})
    mtime = os.stat(out.path(outputs.RUN)).st_mtime_ns
    time.sleep(0.01)
    out.claim({"a": (1, 2)})  # a tuple reads back as a list: still the same setup, and nothing rewritten
    assert os.stat(out.path(outputs.RUN)).st_mtime_ns == mtime
    with pytest.raises(ValueError, match="another setup .differs in a."):
        out.claim({"a": (1, 3)})


def test_an_earlier_fingerprint_without_a_later_key_is_another_setup_and_an_old_part_is_refused(tmp_path):
    """kemo keeps no compatibility with its unreleased development versions: a claim without a key this version
    fingerprints is another setup, and a part without a column of the contract is refused in one line."""
    out = outputs.Output(str(tmp_path / "out"), "test")
    out.claim({"a": 1})
    with out.lease():
        out.commit([out.write_json("summary.json", {"n": 1}), out.claim_receipt()], {}, {"a": 1})
    assert out.current({"a": 1, "links": "inside"}) is None
    with pytest.raises(ValueError, match="differs in links.*use a new --output"):
        out.check_claim({"a": 1, "links": "inside"})
    part = outputs.write_part(str(tmp_path / "out"), "parts", pa.table({"k": ["a"]}), ["a"])
    schema = pa.schema([("k", pa.string()), ("v", pa.int64())])
    with pytest.raises(outputs.Damaged, match="has no v column: it was written by an earlier version of kemo"):
        outputs.read_files([str(tmp_path / "out" / part.path)], None, schema)
    assert outputs.read_files([str(tmp_path / "out" / part.path)], ["k"], schema).column("k").to_pylist() == ["a"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_is_refused_with_the_holders_name(where, tmp_path, request):
    root = root_for(where, tmp_path, request)
    out = outputs.Output(root, "test")
    with out.lease() as held:
        with pytest.raises(outputs.OutputBusy, match=f"being written by run {held.body['run']} .pid {os.getpid()}"):
            with outputs.Output(root, "test").lease():
                pass
        held.check()
    assert not storage.exists(out.path(outputs.LEASE))  # released at the end
    with out.lease():  # and free for the next run
        pass


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_runs_lease_is_taken_over_and_logged(where, tmp_path, request, caplog):
    root = root_for(where, tmp_path, request)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kemo import outputs\n"
         f"with outputs.Output({root!r}, 'test').lease():\n    print('held', flush=True)\n    time.sleep(600)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(outputs.OutputBusy, match=f"pid {holder.pid}"):  # alive: refused
            with outputs.Output(root, "test").lease():
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    left = json.loads(storage.read_bytes(storage.join(root, outputs.LEASE)))
    assert left["pid"] == holder.pid  # killed: it never released
    with caplog.at_level("WARNING", logger="kemo.outputs"):
        with outputs.Output(root, "test").lease() as taken:
            assert json.loads(storage.read_bytes(storage.join(root, outputs.LEASE)))["run"] == taken.body["run"]
    assert f"took over the lease of run {left['run']}" in caplog.text and "its process is gone" in caplog.text


def test_a_lease_not_renewed_for_too_long_is_stale_even_on_another_host(tmp_path):
    root = str(tmp_path / "out")
    stale = {"run": "elsewhere", "host": "another-host", "pid": 1, "started_at": "-", "renewed_at": "-",
             "renewed_unix": time.time() - STALE_S - 5}
    storage.write_bytes(storage.join(root, outputs.LEASE), json.dumps(stale).encode())
    with outputs.Output(root, "test").lease() as taken:
        assert taken.body["run"] != "elsewhere"
    fresh = {**stale, "renewed_unix": time.time()}
    storage.write_bytes(storage.join(root, outputs.LEASE), json.dumps(fresh).encode())
    with pytest.raises(outputs.OutputBusy, match="run elsewhere .pid 1 on another-host"):
        with outputs.Output(root, "test").lease():
            pass


def test_renewal_keeps_the_lease_and_notices_a_takeover(tmp_path):
    uri = str(tmp_path / "out" / outputs.LEASE)
    lease = Lease(uri, renew_s=0.05)
    lease.acquire()
    try:
        first = json.loads(storage.read_bytes(uri))["renewed_unix"]
        time.sleep(0.3)
        assert json.loads(storage.read_bytes(uri))["renewed_unix"] > first and lease.lost is None
        storage.write_bytes(uri, json.dumps({"run": "usurper"}).encode())  # another run replaced it
        time.sleep(0.3)
        assert lease.lost and json.loads(storage.read_bytes(uri))["run"] == "usurper"
        with pytest.raises(outputs.OutputBusy, match="stops without writing more"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(storage.read_bytes(uri))["run"] == "usurper"  # a lost lease is not deleted


def test_a_renewing_lease_is_never_absent_for_a_newcomer(tmp_path):
    """Renewal swaps the file in place: an exclusive create racing it never finds the name free."""
    uri = str(tmp_path / "out" / outputs.LEASE)
    lease = Lease(uri, renew_s=0.001)
    lease.acquire()
    try:
        deadline, attempts = time.time() + 1.5, 0
        while time.time() < deadline:
            assert storage.create_exclusive(uri, b"newcomer") == (False, None)
            attempts += 1
        renewed = json.loads(storage.read_bytes(uri))["renewed_unix"]
        assert lease.lost is None and attempts > 100 and renewed > time.time() - 1
    finally:
        lease.release()
    assert not os.path.exists(uri) and os.listdir(tmp_path / "out") == []  # released, no temporary file left


def test_release_never_deletes_a_lease_another_run_took_over(tmp_path):
    uri = str(tmp_path / "out" / outputs.LEASE)
    lease = Lease(uri, renew_s=3600)
    lease.acquire()
    data, version = storage.read_with_version(uri)
    assert storage.replace_if_version(uri, json.dumps({"run": "taker"}).encode(), version)[0]
    lease.release()  # it had not noticed: it must still leave the taker's lease alone
    assert json.loads(storage.read_bytes(uri))["run"] == "taker"


@pytest.fixture
def proxied(s3_bucket, moto_endpoint, monkeypatch):
    """The test's bucket reached through a :class:`FaultProxy`."""
    from tests.faultproxy import FaultProxy

    proxy = FaultProxy(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy, f"s3://{s3_bucket}/out"
    finally:
        proxy.close()


def test_a_lease_whose_create_or_renewal_answer_was_lost_knows_its_own_write(proxied):
    """On S3 a conditional PUT whose answer is lost is retried, and the retry gets 412: the lease reads the file and
    finds its own token there, at creation and at renewal alike (not "being written by" itself, not lost)."""
    proxy, root = proxied
    held = Lease(storage.join(root, outputs.LEASE), renew_s=3600)
    proxy.lose("If-None-Match")
    held.acquire()
    try:
        assert proxy.lost and proxy.lost[0].startswith("PUT") and held.version
        proxy.lose("If-Match")
        held.check()  # a renewal, whose answer is lost: still ours
        assert len(proxy.lost) == 2 and held.lost is None
        assert json.loads(storage.read_bytes(storage.join(root, outputs.LEASE))) == held.body
    finally:
        held.release()
    assert not storage.exists(storage.join(root, outputs.LEASE))


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_lease(proxied):
    proxy, root = proxied
    proxy.strip = True
    outputs._HONOURED.clear()
    with pytest.raises(ValueError, match=f"S3 store at {proxy.endpoint} ignores conditional writes"):
        with outputs.Output(root, "test").lease():
            pass
    assert listing_of(root) == []  # the probe left nothing, and no lease was taken
    proxy.strip = False
    with outputs.Output(root, "test").lease():  # an honest store: the same output is fine
        pass


def listing_of(root: str) -> list[str]:
    from kemo import listing

    try:
        return [e.rel for e in listing.list_files(root)]
    except FileNotFoundError:
        return []


def test_a_lease_deleted_under_a_run_is_reported_as_such(tmp_path):
    uri = str(tmp_path / "out" / outputs.LEASE)
    held = Lease(uri, renew_s=3600)
    held.acquire()
    os.remove(uri)
    with pytest.raises(outputs.OutputBusy, match="lease file was deleted while it ran"):
        held.check()
    held.release()


def test_damaged_control_files_are_named_and_a_rerun_repairs_them(tmp_path):
    root = str(tmp_path / "out")
    out = outputs.Output(root, "test")

    def commit() -> None:
        out.claim({"a": 1})
        with out.lease():
            part = outputs.write_part(root, "parts", pa.table({"k": ["a"]}), ["a"])
            out.commit([part, out.write_json("summary.json", {"n": 1}), out.claim_receipt()], {}, {"a": 1})

    commit()
    assert out.verify() == []
    commit_json = os.path.join(root, outputs.COMMIT)
    open(commit_json, "w").write('{"kind": "test", "files": [')  # a truncated write
    with pytest.raises(outputs.Damaged, match=f"{commit_json} is damaged .JSONDecodeError"):
        out.read_table("parts", None, pa.schema([("k", pa.string())]))
    assert out.current({"a": 1}) is None and out.check_claim({"a": 1})  # to a writer: uncommitted
    commit()  # the same command again: committed anew
    assert out.read_table("parts", None, pa.schema([("k", pa.string())])).column("k").to_pylist() == ["a"]
    # a damaged claim: written anew where the intact commit says this setup made the output, else refused
    run_json = os.path.join(root, outputs.RUN)
    open(run_json, "w").write("{")
    assert out.check_claim({"a": 1}) is False
    out.claim({"a": 1})
    assert storage.read_json(run_json) == {"a": 1}
    open(run_json, "w").write("{")
    with pytest.raises(outputs.Damaged, match=f"{run_json} is damaged.*use a new --output"):
        out.check_claim({"a": 2})
    # a summary changed at the same size: the commit is not current; verify names every changed file
    storage.write_json(run_json, {"a": 1})
    summary = os.path.join(root, "summary.json")
    open(summary, "w").write(open(summary).read().replace("1", "2"))
    part = next(e for e in os.listdir(os.path.join(root, "parts")))
    data = open(os.path.join(root, "parts", part), "rb").read()
    open(os.path.join(root, "parts", part), "wb").write(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    assert out.current({"a": 1}) is None
    assert sorted(m.split(":")[0] for m in out.verify()) == sorted(["summary.json", f"parts/{part}"])


def test_a_damaged_receipt_makes_its_part_count_as_unwritten(tmp_path):
    root = str(tmp_path / "out")
    part = outputs.write_part(root, "parts", pa.table({"k": ["a"]}), ["a"])
    name = part.path.rsplit("/", 1)[-1]
    open(os.path.join(root, "_receipts", "parts", f"{name}.json"), "w").write("{")
    assert outputs.parts(root, "parts") == {}
    assert outputs.sweep(root, "parts") == {} and os.listdir(os.path.join(root, "parts")) == []


def test_jobs_verify_names_a_file_changed_at_the_same_size(tmp_path):
    root = str(tmp_path / "out")
    out = outputs.Output(root, "test")
    out.claim({"a": 1})
    with out.lease():
        part = outputs.write_part(root, "parts", pa.table({"k": ["a"]}), ["a"])
        out.commit([part, out.claim_receipt()], {}, {"a": 1})
    verify = [sys.executable, "jobs/verify.py", "--output", root]
    intact = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert (intact.returncode, intact.stdout) == (0, "intact\n")
    path = os.path.join(root, part.path)
    data = bytearray(open(path, "rb").read())
    data[10] ^= 1
    open(path, "wb").write(bytes(data))
    changed = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 1 and changed.stdout.splitlines() == [
        f"{root}: {part.path}: SHA-256 {outputs.Receipt.of('', bytes(data)).sha256}, committed {part.sha256}",
        "1 files missing or changed"]


def test_a_failed_write_leaves_no_temporary_and_the_next_run_sweeps_a_killed_writers(tmp_path, monkeypatch):
    import builtins

    root = tmp_path / "out"
    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if ".tmp-" in str(path) and "w" in mode:
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(root / "summary.json"), b"{}")
    monkeypatch.undo()
    assert os.listdir(root) == []
    (root / "parts").mkdir()
    (root / "parts" / "part-1.parquet.tmp-0123abcd").write_bytes(b"half")  # what a killed writer leaves
    (root / "summary.json.tmp-89abcdef").write_bytes(b"{")
    with outputs.Output(str(root), "test").lease():
        assert sorted(os.listdir(root)) == ["_lease.json", "parts"] and os.listdir(root / "parts") == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_committed_file_is_appended_to_and_its_receipt_hashes_the_whole(where, tmp_path, request):
    root = root_for(where, tmp_path, request)
    out = outputs.Output(root, "test")
    manifest = out.commit([out.write_file("a.csv", b"k\n1\n")], {})
    (entry,) = [f for f in manifest["files"] if f["path"] == "a.csv"]
    receipt = out.append(out.appendable(entry), b"2\n3\n")
    assert storage.read_bytes(out.path("a.csv")) == b"k\n1\n2\n3\n"
    assert receipt == outputs.Receipt.of("a.csv", b"k\n1\n2\n3\n")
    out.commit([receipt], {})
    assert out.verify() == []
    assert out.appendable(entry) is None  # no longer what that commit says: the caller writes it whole
    storage.delete(out.path("a.csv"))
    assert out.appendable(entry) is None


def test_parts_are_written_in_row_groups_and_a_gallery_reads_only_those_of_its_rows(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from kemo import views

    crops = [os.urandom(40_000) for _ in range(200)]  # incompressible, as JPEG crops are
    receipt = outputs.write_part(str(tmp_path), "shards", pa.table({"k": range(200), "crop": crops}), ["x"])
    path = str(tmp_path / receipt.path)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    assert 5 <= groups <= 12  # ~1 MiB each
    read: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: read.append(g) or real(self, g, **kw))
    assert views.crops_at(path, [3, 150, 4]) == {3: crops[3], 4: crops[4], 150: crops[150]}
    assert len(read) == 2
