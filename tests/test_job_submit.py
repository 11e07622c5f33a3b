"""`ray job submit --working-dir .` end to end, as users run kemo on a cluster: a two-node Ray 2.60 cluster started with
`ray start` and token authentication (a CPU-less head, like cluster.yaml's), S3 on a moto server reached through the
job's runtime environment only, generated photos; the nodes are stopped by their process groups afterwards. The tests
share one cluster, one bucket, one uploaded corpus and its crops (one preprocess job): each test writes under its own
prefix."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import psutil
import pytest

from kemo import listing, storage
from kemo.data import aihub
from kemo.data.synth import SynthConfig, generate
from kemo.preprocess import read_crops

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)  # nodes, drivers and the CLI all run this interpreter
RAY = os.path.join(VENV_BIN, "ray")
MARK = "KEMO_TEST_RAY_CLUSTER"  # inherited by every process of the test cluster: how teardown finds leftovers
START_TIMEOUT_S = 180  # two nodes on two busy cores: 20 s alone, 60 s under load
JOB_TIMEOUT_S = 240
NODE_SETTINGS = {
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops a node now, not after 30 s
    # idle workers kept a minute, not a second (tests/conftest.py says why); the nodes get no other RAY_ setting of
    # this process
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    # workers at the nodes' own priority, as kemo's embedded Ray runs them (kemo.resources.embedded_options): this
    # cluster shares its machine with the suite and other work, where Ray's default nice 15 starves its jobs; a real
    # cluster's nodes run Ray alone, and keep Ray's default
    "RAY_worker_niceness": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This process's environment without Ray or AWS settings: the cluster gets S3 settings only through a job's
    runtime environment, as on AWS, and never sees another engineer's RAY_ADDRESS or token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


@dataclass
class LocalCluster:
    address: str  # the job server (dashboard), http://127.0.0.1:PORT
    gcs: str
    token: str
    token_path: str
    temp_dir: str
    marker: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def client_env(self, token: bool = True) -> dict[str, str]:
        """What a user exports before `ray job submit` (cluster.yaml's header): token mode and the token file."""
        env = _clean_env()
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        return env

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def alive_nodes(self) -> int:
        try:
            data = json.loads(self.get("/api/v0/nodes?limit=10"))
        except OSError:
            return 0
        return sum(1 for n in data["data"]["result"]["result"] if n["state"] == "ALIVE")


def _start_node(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    # `ray start --block` in its own session: the node's GCS, raylet, dashboard and workers share its process
    # group, which teardown signals as a whole (never `ray stop`: that stops every Ray instance on the machine).
    with open(log_path, "ab") as log:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: list[str], timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Ray node exited ({p.returncode}) before {what}:\n" + _tails(logs))
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}:\n" + _tails(logs))


def _tails(logs: list[str]) -> str:
    out = []
    for path in logs:
        with open(path, errors="replace") as f:
            out.append(f"--- {path}\n" + "".join(f.readlines()[-20:]))
    return "\n".join(out)


def _marked(marker: str) -> list[psutil.Process]:
    """Processes of this machine that carry the cluster's marker in their environment (only ours can)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == marker:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _stop(cluster: LocalCluster) -> list[str]:
    """Stop exactly the processes this test started: each node's process group (worker node first), then anything
    else that carries the marker (a job driver runs in its own session). Returns what needed a hard kill."""
    for p in reversed(cluster.procs):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    hard = []
    deadline = time.monotonic() + 30
    for p in reversed(cluster.procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hard.append(f"ray start pid {p.pid}")
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    gone, alive = psutil.wait_procs(_marked(cluster.marker), timeout=10)
    for p in alive:
        hard.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    return hard


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with no CPUs (drivers only, as in cluster.yaml), a worker node with 2 CPUs and one with 1 CPU and a
    declared GPU (Ray lets a CPU machine declare one): a mixed cluster, where jobs with default flags must size
    their actors for the GPU node itself. Token auth on all three."""
    temp = str(tmp_path_factory.mktemp("ray"))
    own_temp = None
    if len(temp) > 38:  # Ray's unix sockets live under it, and socket paths end at ~107 characters
        temp = own_temp = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path = os.path.join(temp, "auth_token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(token)
    marker = uuid.uuid4().hex
    env = _clean_env()
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, MARK: marker, **NODE_SETTINGS,
                "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False"})
    dash = _free_port()
    c = LocalCluster(address=f"http://127.0.0.1:{dash}", gcs="", token=token, token_path=token_path,
                     temp_dir=temp, marker=marker)
    # one temp dir per node, as on separate machines: nodes sharing one share the runtime_resources folder where
    # each node unpacks a job's working dir, and one node's runtime-env agent then deletes or replaces the folder
    # that a driver on the other runs in (seen as FileNotFoundError from os.getcwd() in the driver)
    head_temp, worker_temp, gpu_temp = os.path.join(temp, "h"), os.path.join(temp, "w"), os.path.join(temp, "g")
    logs = [os.path.join(temp, "head.log"), os.path.join(temp, "worker.log"), os.path.join(temp, "gpu.log")]
    try:
        c.procs.append(_start_node(
            ["--head", "--port", str(_free_port()), "--num-cpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--object-store-memory", str(200 * 2**20), "--temp-dir", head_temp], env, logs[0]))
        address_file = os.path.join(head_temp, "ray_current_cluster")  # the head writes its GCS address here
        _wait("the head's GCS address", lambda: os.path.exists(address_file) and open(address_file).read().strip(),
              c.procs, logs)
        c.gcs = open(address_file).read().strip()
        c.procs.append(_start_node(
            ["--address", c.gcs, "--num-cpus", "2", "--dashboard-agent-listen-port", str(_free_port()),
             "--object-store-memory", str(200 * 2**20), "--temp-dir", worker_temp], env, logs[1]))
        c.procs.append(_start_node(
            ["--address", c.gcs, "--num-cpus", "1", "--num-gpus", "1", "--dashboard-agent-listen-port",
             str(_free_port()), "--object-store-memory", str(200 * 2**20), "--temp-dir", gpu_temp], env, logs[2]))
        _wait("three alive nodes", lambda: c.alive_nodes() == 3, c.procs, logs)
        yield c
    finally:
        hard = _stop(c)
        leftovers = _marked(marker)
        if own_temp:
            shutil.rmtree(own_temp, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster survived teardown: {leftovers}"
        if hard:
            print(f"test cluster: hard-killed {hard}")


def submit(cluster: LocalCluster, entrypoint: list[str], env_vars: dict[str, str] | None = None,
           submission_id: str | None = None) -> tuple[str, str]:
    """`ray job submit --working-dir .` from the repository root, as the README says; (final status, output)."""
    sid = submission_id or f"kemo-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", cluster.address, "--submission-id", sid, "--working-dir", "."]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    done = subprocess.run([*cmd, "--", *entrypoint], env=cluster.client_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)
    # the CLI waited for the job to end; its final status, from the job server's REST API (with the token)
    return json.loads(cluster.get(f"/api/jobs/{sid}"))["status"], done.stdout + done.stderr


def s3_env(endpoint: str) -> dict[str, str]:
    """What reaches the job from `--runtime-env-json`: the S3 endpoint and (moto's) credentials; on AWS only
    AWS_DEFAULT_REGION would be given, the instance profiles supply the rest."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def test_job_server_wants_the_token(cluster, tmp_path):
    """Without the token, or with another one, the job server refuses the submission; so does its REST API."""
    wrong = tmp_path / "other_token"
    wrong.write_text(secrets.token_hex(32))
    for env, refusal in ((cluster.client_env(token=False), "Authentication required"),
                         ({**cluster.client_env(), "RAY_AUTH_TOKEN_PATH": str(wrong)}, "Authentication failed")):
        done = subprocess.run([RAY, "job", "submit", "--address", cluster.address, "--", "python", "-c",
                               "print('never runs')"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and refusal in output and "never runs" not in output, output
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(cluster.address + "/api/jobs/", timeout=10)
    assert e.value.code == 401
    assert not [j for j in json.loads(cluster.get("/api/jobs/")) if "never runs" in j["entrypoint"]]


def test_working_dir_ships_kemo(cluster):
    """The driver imports kemo from the uploaded working directory, not from this checkout's editable install:
    on a cluster the code comes only from `--working-dir .`."""
    status, output = submit(cluster, ["python", "-c", "import kemo, os; print('KEMO_AT', os.path.dirname("
                                      "os.path.dirname(kemo.__file__)), os.environ.get('YOLO_OFFLINE'))"])
    assert status == "SUCCEEDED", output
    where, offline = re.search(r"KEMO_AT (\S+) (\S+)", output).groups()
    assert os.path.realpath(where) != os.path.realpath(ROOT)
    assert "working_dir_files" in where and offline == "1"


@pytest.fixture(scope="module")
def corpus_on_s3(module_bucket, module_upload, tmp_path_factory):
    """A generated corpus, uploaded once: (local root, its photos' relative paths, its S3 prefix)."""
    cfg = SynthConfig(out=str(tmp_path_factory.mktemp("corpus")), per_class=12, seed=12, size="320x240", jobs=2)
    generate(cfg)
    photos = {unicodedata.normalize("NFC", os.path.relpath(os.path.join(d, n), cfg.out).replace(os.sep, "/"))
              for d, _, names in os.walk(cfg.out) for n in names if n.lower().endswith((".jpg", ".jpeg"))}
    module_upload(cfg.out, "corpus")
    return cfg.out, photos, f"s3://{module_bucket}/corpus"


@pytest.fixture(scope="module")
def crops_on_s3(cluster, corpus_on_s3, module_bucket, moto_endpoint):
    """jobs/preprocess.py run once on the cluster, from the S3 corpus to S3 crop shards (32² crops, what the training
    test trains on): (final status, output, the shards' URI)."""
    out = f"s3://{module_bucket}/crops"
    status, output = submit(cluster, ["python", "jobs/preprocess.py", "--input", corpus_on_s3[2], "--output", out,
                                      "--detector", "annotations", "--crop-size", "32"], s3_env(moto_endpoint))
    return status, output, out


def test_preprocess_job(corpus_on_s3, crops_on_s3):
    _, photos, _ = corpus_on_s3
    status, output, out = crops_on_s3
    assert status == "SUCCEEDED", output[-4000:]
    manifest = aihub.load_manifest(f"{out}/index")  # indexed by the job from the S3 root
    crops = read_crops(out, ["image_id", "status", "error", "crop"])
    ids = crops.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == manifest.num_rows == len(photos)  # one row per input photo
    assert set(ids) == photos
    statuses = crops.column("status").to_pylist()
    assert statuses == ["ok"] * len(ids), [(i, s, e) for i, s, e in
                                          zip(ids, statuses, crops.column("error").to_pylist()) if s != "ok"]
    assert all(c[:2] == b"\xff\xd8" for c in crops.column("crop").to_pylist())  # JPEG bytes


def test_a_request_no_node_can_hold_is_refused_in_seconds(cluster, corpus_on_s3, moto_endpoint, module_bucket):
    """Two decoders beside a GPU: no node of this cluster has both, so the job says so and ends, instead of waiting
    for ever as Ray would; nothing is written."""
    out = f"s3://{module_bucket}/refused"
    sid = f"kemo-test-{uuid.uuid4().hex[:8]}"
    status, output = submit(cluster, ["python", "jobs/preprocess.py", "--input", corpus_on_s3[2],
                                      "--output", out, "--detector", "annotations", "--decoders", "2"],
                            s3_env(moto_endpoint), submission_id=sid)
    assert status == "FAILED", output[-3000:]
    assert "each actor asks for 2 CPU and 1 GPU, and no node can hold that" in output, output[-3000:]
    assert "(2 CPU, 0 GPU)" in output and "(1 CPU, 1 GPU)" in output
    job = json.loads(cluster.get(f"/api/jobs/{sid}"))
    seconds = (job["end_time"] - job["start_time"]) / 1000  # the job's own time, from its start
    print(f"refused in {seconds:.1f} s: " + next(line for line in output.splitlines() if "each actor asks" in line))
    assert seconds < 30, job  # start-up, imports and the S3 index on a loaded 2-core machine: not a wait for ever
    assert not [e.rel for e in listing.list_files(f"s3://{module_bucket}") if e.rel.startswith("refused/")]


def test_label_job(cluster, corpus_on_s3, moto_endpoint, module_bucket, module_upload, tmp_path):
    """Batch-label an S3 prefix with a checkpoint on S3: one row per file, a class for each photo, and a file that
    is not a photo still gets its row."""
    import torch

    from kemo.classes import CLASS_NAMES
    from kemo.classifier.checkpoint import save_checkpoint
    from kemo.classifier.registry import create_model
    from kemo.label_store import read_labels

    root, photos, _ = corpus_on_s3
    new = tmp_path / "new"
    new.mkdir()
    for rel in sorted(photos)[:6]:
        shutil.copy(os.path.join(root, rel), new / f"photo {len(os.listdir(new))}.jpg")
    (new / "notes.txt").write_text("not a photo")
    module_upload(str(new), "new")
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "ckpt"), create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet",
                    {"blocks": [1, 1, 1, 1]}, image_size=64)
    module_upload(str(tmp_path / "ckpt"), "ckpt")  # actors on either node read it: S3, not this machine's disk
    out = f"s3://{module_bucket}/labels"
    status, output = submit(cluster, ["python", "jobs/label.py", "--input", f"s3://{module_bucket}/new",
                                      "--output", out, "--checkpoint", f"s3://{module_bucket}/ckpt",
                                      "--detector", "none", "--crop-size", "64"], s3_env(moto_endpoint))
    assert status == "SUCCEEDED", output[-4000:]
    labels = read_labels(out)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in labels.to_pylist()}
    assert labels.num_rows == len(rows) == 7  # one row per file
    assert rows.pop("notes.txt")["status"] == "decode_error"
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        assert r["label_name"] == CLASS_NAMES[r["label"]] and len(r["probs"]) == len(CLASS_NAMES)
        assert abs(sum(r["probs"]) - 1) < 1e-3 and r["detector"] == "none"


# jobs/train.py as a user runs it, with the train loop of tests/seams.py installed first: each of the two workers
# writes the photos (order keys) it trained on per epoch to S3, what the test checks against the shards, and waits as
# the second epoch begins, so that the run is still training when the test takes its node away.
TRACED = """
import runpy
import sys
from kemo.classifier import train
from tests import seams
train.train_loop = seams.traced(sys.argv[1], hold=2)
sys.argv = sys.argv[2:]
runpy.run_path("jobs/train.py", run_name="__main__")
"""


def _train_keys(shards: str) -> set[int]:
    from kemo.classifier.data import order_keys, usable

    table = read_crops(shards, ["image_id", "split", "label", "agree_n", "status"])
    ok, _ = usable(table, 2)
    ids = [i for i, good, s in zip(table.column("image_id").to_pylist(), ok, table.column("split").to_pylist())
           if good and s == "train"]
    return set(order_keys(ids).tolist())


def _registered(runs: str) -> list[str]:
    """Ray Train's checkpoint snapshots under ``runs``: a checkpoint a new driver resumes from is registered there,
    not merely uploaded."""
    try:
        return [e.rel for e in listing.list_files(runs) if e.rel.endswith("checkpoint_manager_snapshot.json")]
    except FileNotFoundError:  # no run has written anything yet
        return []


def _restart_worker_node(cluster: LocalCluster) -> None:
    """The 2-CPU worker node again (the test killed it), with its own temp dir as before."""
    env = _clean_env()
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster.token_path, MARK: cluster.marker,
                **NODE_SETTINGS})
    log = os.path.join(cluster.temp_dir, "worker.log")
    cluster.procs[1] = _start_node(
        ["--address", cluster.gcs, "--num-cpus", "2", "--dashboard-agent-listen-port", str(_free_port()),
         "--object-store-memory", str(200 * 2**20), "--temp-dir", os.path.join(cluster.temp_dir, "w2")], env, log)
    _wait("three alive nodes again", lambda: cluster.alive_nodes() == 3, cluster.procs, [log])


def _traced(trace: str, epoch: int) -> bool:
    return all(storage.exists(f"{trace}/epoch{epoch}-rank{r}.json") for r in (0, 1))


def test_training_across_the_cluster_on_s3(cluster, crops_on_s3, moto_endpoint, module_bucket):
    """Crops on S3 → jobs/train.py --workers 2 --cache none: two Ray Train workers fed by Ray Data, the photos re-read
    from S3 and decoded on the nodes every epoch; the workers' shares of the train split are disjoint, equal and
    together the split (less at most one photo, for equal steps). After the first of its two epochs the run, into an
    S3 output, loses the 2-CPU node: with nowhere to put its two workers it ends within its --capacity-timeout, saying
    so; once the node is back, the same jobs/train.py command, as a user runs it (no tracing, the default --cache: the
    cache is no part of a run's identity), resumes from the latest checkpoint, finishes and commits the report."""
    status, output, shards = crops_on_s3
    assert status == "SUCCEEDED", output[-4000:]
    bucket = f"s3://{module_bucket}"
    # the start timeout also bounds the first start of the group (actors importing torch on a loaded machine):
    # generous, so that only the lost node can spend it
    out, trace, timeout = f"{bucket}/classify", f"{bucket}/trace", 40
    train_args = ["jobs/train.py", "--shards", shards, "--output", out, "--models", "resnet18", "--seeds", "1",
                  "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--workers", "2",
                  "--cpus-per-worker", "1", "--checkpoint-every", "1", "--capacity-timeout", str(timeout)]
    submit_head = [RAY, "job", "submit", "--address", cluster.address, "--working-dir", ".",
                   "--runtime-env-json", json.dumps({"env_vars": s3_env(moto_endpoint)}), "--"]
    first = subprocess.Popen([*submit_head, "python", "-c", TRACED, trace, *train_args, "--cache", "none"],
                             env=cluster.client_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (_traced(trace, 1) and _registered(f"{out}/runs")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-4000:]
        time.sleep(0.5)
    os.killpg(cluster.procs[1].pid, signal.SIGTERM)  # the 2-CPU node goes: 1 CPU left for two 1-CPU workers
    cluster.procs[1].wait(timeout=60)
    killed = time.monotonic()
    output = first.communicate(timeout=JOB_TIMEOUT_S)[0]
    waited = time.monotonic() - killed
    print(f"capacity lost: the job ended {waited:.0f} s after the node, --capacity-timeout {timeout}")
    assert first.returncode != 0 and "no node could hold 2 training worker(s)" in output, output[-4000:]
    assert "it resumes from the latest checkpoint" in output and waited < timeout + 45
    assert re.search(r"\bcached'?\s*[:=]\s*False", output), output[-4000:]  # the shares below: the uncached path's
    assert not storage.exists(f"{out}/_commit.json")

    train = _train_keys(shards)
    a, b = (storage.read_json(f"{trace}/epoch1-rank{r}.json") for r in (0, 1))
    print(f"epoch 1: {len(a['keys'])} + {len(b['keys'])} of {len(train)} train photos, on nodes {a['node'][:8]} and "
          f"{b['node'][:8]}")
    assert len(a["keys"]) == len(b["keys"]) == len(train) // 2
    assert not set(a["keys"]) & set(b["keys"]) and len(set(a["keys"])) == len(a["keys"])
    assert set(a["keys"]) | set(b["keys"]) <= train and len(train) - 2 * len(a["keys"]) <= 1

    _restart_worker_node(cluster)
    status, output = submit(cluster, ["python", *train_args], s3_env(moto_endpoint))
    assert status == "SUCCEEDED", output[-4000:]
    epochs = [int(m) for m in re.findall(r"resnet18 seed 0 epoch (\d+)/2", output)]
    assert epochs and set(epochs) == {2}, epochs  # resumed at the second epoch, not started over
    report = storage.read_json(f"{out}/report.json")
    (run,) = report["runs"]
    history = json.loads(storage.read_bytes(f"{out}/results/{run['name']}.json"))["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert storage.exists(f"{out}/_commit.json")
