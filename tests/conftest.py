"""Shared fixtures: a moto S3 server over real HTTP (started and stopped by handle) and generated corpora."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import boto3
import pytest

from kemo.data.synth import SynthConfig, generate

# Set before torch or Ray starts, for this process and every process the tests start (Ray's workers and nodes, jobs):
# - OpenMP threads sleep when they wait instead of spinning: on a machine whose cores other work also uses, torch's
#   spinning threads of two processes took turns at 1-3 photos/s where one thread trains at 40;
# - Ray keeps an idle worker process for a minute rather than one second: every fit and every Ray Data run starts
#   tasks in bursts, and a worker started anew costs ~2.5 s of CPU (26 starts in one small fit, 16 with this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")


def pytest_configure(config: pytest.Config) -> None:
    # `make test` starts one of its two pytest processes in the background, where a non-interactive shell leaves
    # SIGINT ignored: Ctrl-C must stop that one too, through its fixtures' teardown (its test cluster, Ray, moto)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on loopback, as Ray's own tests use: the real pyarrow and boto3 HTTP paths, no patching."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto server exited") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ray_local(moto_endpoint):
    """One local Ray instance for the session (ray.init → ray.shutdown; each start costs ~10 s of both cores, and no
    test needs a fresh one); its workers inherit the moto endpoint and test credentials, because Ray workers take the
    environment of the process that started Ray."""
    import ray

    from kemo.resources import embedded_options

    env = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "RAY_API_SERVER_ADDRESS"]}
    os.environ.update(env)
    # kept to itself as a job's embedded Ray is (kemo.resources.embedded_options): the test cluster of
    # tests/test_job_submit.py runs beside it, and Ray Train's placement-group cleaner must not ask that one's state API
    ctx = ray.init(num_cpus=2, log_to_driver=False, **embedded_options(dashboard=False))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _new_bucket(endpoint: str, mp: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, with the environment (through ``mp``) pointing kemo's S3 code at it."""
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    bucket = f"kemo-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    return bucket


def _uploader(endpoint: str, bucket: str):
    """upload(local_root, prefix) copies a local tree into ``bucket`` with boto3; returns the object count."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def upload(local_root: str, prefix: str) -> int:
        n = 0
        for dirpath, _, names in os.walk(local_root):
            for name in names:
                path = os.path.join(dirpath, name)
                s3.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local_root).replace(os.sep, '/')}")
                n += 1
        return n

    return upload


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket for one test, with the environment pointing kemo's S3 code at it."""
    return _new_bucket(moto_endpoint, monkeypatch)


@pytest.fixture
def upload_tree(s3_bucket, moto_endpoint):
    """upload(local_root, prefix) into the test's bucket."""
    return _uploader(moto_endpoint, s3_bucket)


@pytest.fixture(scope="module")
def module_bucket(moto_endpoint):
    """One bucket for a whole module, for tests that share what an expensive step wrote there (each test writes
    under its own prefix); the environment points kemo's S3 code at it until the module ends."""
    with pytest.MonkeyPatch.context() as mp:
        yield _new_bucket(moto_endpoint, mp)


@pytest.fixture(scope="module")
def module_upload(module_bucket, moto_endpoint):
    """upload(local_root, prefix) into the module's bucket."""
    return _uploader(moto_endpoint, module_bucket)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A generated corpus with every kind of defect, small photos: (root, config)."""
    cfg = SynthConfig(out=str(tmp_path_factory.mktemp("corpus")), per_class=30, seed=3, size="320x240",
                      orphans=2, missing=3, jobs=2)
    generate(cfg)
    return cfg.out, cfg


@pytest.fixture(scope="session")
def yolo_weights(corpus_index, tmp_path_factory):
    """Face weights from a real ultralytics YOLO built from its YAML, trained briefly on generated photos (CPU)."""
    from ultralytics import YOLO

    from kemo.detector.export import ExportConfig
    from kemo.detector.export import run as export

    work = tmp_path_factory.mktemp("yolo")
    export(ExportConfig(input=corpus_index, output=str(work / "data"), counts=(48, 16, 0), max_side=320))
    data = str(work / "data" / "data.yaml")
    model = YOLO("yolo11n.yaml")
    model.train(data=data, epochs=2, imgsz=224, batch=16, device="cpu", workers=0, plots=False, amp=False,
                project=str(work / "runs"), name="face", exist_ok=True, verbose=False, seed=0)
    path = work / "runs" / "face" / "weights" / "last.pt"
    assert path.exists()
    return str(path)


@pytest.fixture(scope="session")
def corpus_index(corpus, tmp_path_factory):
    """The generated corpus, indexed once: an index output directory."""
    from kemo.data import aihub

    root, _ = corpus
    out = str(tmp_path_factory.mktemp("index"))
    aihub.run(aihub.IndexConfig(root=root, output=out))
    return out


@pytest.fixture(scope="session")
def annotation_crops(corpus_index, ray_local, tmp_path_factory):
    """Crop shards of the generated corpus cut at the annotators' boxes (64² crops), cut once for the session: no test
    writes into them, and test_classifier_experiment asserts that a rerun leaves every file of them as it was."""
    from kemo import preprocess

    out = str(tmp_path_factory.mktemp("crops") / "annotations")
    preprocess.run(preprocess.PreprocessConfig(input=corpus_index, output=out, detector="annotations", crop_size=64))
    return out


@pytest.fixture(scope="module")
def small_kemotionnet(tmp_path_factory) -> str:
    """A small K-EmotionNet checkpoint (blocks 1,1,1,1, 48²) with random weights, seeded: the label tests' classifier,
    whose labels must equal what it says on the training path's pixels. One per module: a test may change its meta."""
    import torch

    from kemo.classifier.checkpoint import save_checkpoint
    from kemo.classifier.registry import create_model

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(path, create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet", {"blocks": [1, 1, 1, 1]},
                    image_size=48)
    return path
