"""Fine-tune and evaluate the face detector (the paper's Table 4): the corpus manifest → a person-disjoint YOLO dataset
(:mod:`~kemo.detector.export`; every face of a generated crowd, :mod:`~kemo.data.crowd`) → the starting weights
evaluated on the test split (:mod:`~kemo.detector.evaluate`) → ultralytics training with the stock or YOLO-FaceV2's
loss (:mod:`~kemo.detector.fit`, :mod:`~kemo.detector.loss`; offline, resumable) → ``best.pt`` evaluated → with
``--ablation``, the other losses trained and evaluated alike (:mod:`~kemo.detector.ablation`) → ``best.pt``,
``best.pt.sha256``, ``meta.json``, ``table4.md``, ``config.json`` and, last, ``_commit.json``. Multi-GPU is
ultralytics' own DDP on one node (``--device 0,1``): 3,500 photos train in minutes, Ray Train would add nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from kemo import outputs, storage
from kemo.config import code_version
from kemo.crop import valid_box
from kemo.data.crowd import add_labels, crowd_faces
from kemo.detector import ablation, modules
from kemo.detector.ablation import AblationRow
from kemo.detector.evaluate import Evaluation, eval_device, evaluate, predict, table4
from kemo.detector.export import STAMP, ExportConfig, ExportSummary
from kemo.detector.export import run as export
from kemo.detector.fit import Training
from kemo.detector.loss import LOSSES, LossWeights
from kemo.record import from_dict
from kemo.settings import DetectorSettings, InputSettings

log = logging.getLogger(__name__)
KIND = outputs.DETECTOR
SMOKE = {"images": 40, "epochs": 1, "imgsz": 160}
# ultralytics arguments that kemo sets itself (flags, or where its output goes)
RESERVED = ("data", "epochs", "imgsz", "batch", "device", "workers", "seed", "project", "name", "exist_ok", "resume",
            "model", "mode", "task", "save", "save_dir", "cfg")


@dataclass
class TrainDetectorConfig(DetectorSettings, InputSettings):
    """Fine-tune a face detector on the corpus' annotated faces and report Table 4 (before/after). --weights are the
    face weights to fine-tune, --imgsz the training and evaluation size, --conf the threshold of primary-face recall;
    --device takes 0,1,2,3 for several GPUs."""

    input: str = field(metadata={"help": "AI-Hub root, index output directory or manifest .parquet (local or s3://)"})
    output: str = field(metadata={"help": "output directory (local or s3://)"})
    model: str | None = field(default=None, metadata={
        "help": "train from a model YAML instead: a path, yolo-face-v2.yaml (ours) or an ultralytics name"})
    images: int = field(default=3500, metadata={"help": "photos exported, split 8:1:1 by person (2,800/350/350)"})
    epochs: int = field(default=50, metadata={"help": "training epochs"})
    batch: int = field(default=16, metadata={"help": "batch size (over all GPUs)"})
    workers: int = field(default=8, metadata={"help": "data-loader workers per GPU"})
    max_side: int = field(default=0, metadata={"help": "longer side of exported photos; 0 = 2 × imgsz"})
    seed: int = field(default=0, metadata={"help": "seed of the person split and of training"})
    loss: str = field(default="stock", metadata={
        "help": "stock (ultralytics') or faceV2 (YOLO-FaceV2's: NWD box loss, slide-weighted BCE, repulsion); "
                "--nwd-weight, --slide, --rep-gt, --rep-box override its terms"})
    nwd_weight: float | None = field(default=None, metadata={"help": "share of 1 - NWD in the box loss (faceV2: 0.2)"})
    slide: bool | None = field(default=None, metadata={"help": "slide-weighted classification BCE (faceV2: on)"})
    rep_gt: float | None = field(default=None, metadata={"help": "RepGT weight α (faceV2: 0.5)"})
    rep_box: float | None = field(default=None, metadata={"help": "RepBox weight β (faceV2: 0.5)"})
    ablation: str = field(default="", metadata={
        "help": "also train these losses (comma-separated) on the same data, seed and epochs, a row each in "
                "table4.md: stock, nwd, slide, repulsion, faceV2, or all"})
    train_args: str = field(default="", metadata={"help": "JSON of further ultralytics train arguments"})
    work: str = field(default="", metadata={"help": "local work directory (dataset, ultralytics run); default: "
                                                    "OUTPUT/work for a local output, else ~/.cache/kemo/detector/…"})
    gpus: int = field(default=0, metadata={"help": "jobs/train_detector.py: run as one Ray task holding N GPUs"})
    cpus: int = field(default=4, metadata={"help": "jobs/train_detector.py: CPUs of that Ray task"})
    smoke_test: bool = field(default=False, metadata={"help": f"a quick check: {SMOKE}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detector != "yolo":
            raise ValueError(f"--detector {self.detector}: only the yolo detector is trained")
        if bool(self.weights) == bool(self.model):
            raise ValueError("give exactly one of --weights PATH_OR_URI (face weights to fine-tune) "
                             "or --model YAML (train from a model definition)")
        self.extra_train_args()
        self.loss_weights()
        ablation.variants(self.ablation)

    def loss_weights(self) -> LossWeights:
        """``--loss``'s weights with the term flags given in place of its own."""
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        base = LOSSES[self.loss]
        given = {"nwd": self.nwd_weight, "slide": self.slide, "rep_gt": self.rep_gt, "rep_box": self.rep_box}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})

    def extra_train_args(self) -> dict[str, Any]:
        """``--train-args`` parsed and checked: a JSON object that leaves kemo's own arguments alone."""
        try:
            extra = json.loads(self.train_args) if self.train_args else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--train-args is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--train-args must be a JSON object of ultralytics arguments, got {self.train_args!r}")
        reserved = set(RESERVED) & set(extra)
        if reserved:
            raise ValueError(f"--train-args may not set {sorted(reserved)}: they have their own flags or belong to "
                             "kemo")
        return extra

    def smoke(self) -> TrainDetectorConfig:
        """The config a run uses: with ``smoke_test``, :data:`SMOKE`'s sizes in place of larger ones asked for."""
        if not self.smoke_test:
            return self
        return dataclasses.replace(self, images=min(self.images, SMOKE["images"]), epochs=SMOKE["epochs"],
                                   imgsz=min(self.imgsz, SMOKE["imgsz"]))


@dataclass
class Source:
    """Where training starts: face weights (``kind`` "weights") or a model definition ("model"), by its hash."""

    kind: str
    uri: str
    sha256: str
    name: str


@dataclass
class WeightsFile:
    file: str
    sha256: str
    bytes: int


@dataclass
class TrainingData:
    """The exported dataset trained and tested on."""

    input: str
    dataset: str  # the local work directory's dataset
    counts: dict[str, int]  # photos per split
    persons: dict[str, int]
    export_statuses: dict[str, int]
    every_face: bool  # a generated crowd (kemo.data.crowd): every face labelled, not only the subject
    dataset_sha256: str


@dataclass
class Metrics:
    split: str
    before: Evaluation | None  # None: trained from a model definition, nothing to evaluate before
    after: Evaluation


@dataclass
class DetectorMeta:
    """``meta.json``: the weights written, where training started, on which data, with which loss, how it went,
    Table 4's figures, the loss ablation (empty without ``--ablation``), and what to pass to ``jobs/preprocess.py``
    (``use``)."""

    weights: WeightsFile
    source: Source
    data: TrainingData
    loss: LossWeights
    train: Training
    metrics: Metrics
    ablation: list[AblationRow]
    fingerprint: dict[str, Any]
    config: dict[str, Any]
    versions: dict[str, str]
    seconds: float
    use: str


def split_counts(images: int) -> tuple[int, int, int]:
    """8:1:1, as the paper's 2,800/350/350."""
    train, val = round(images * 0.8), round(images * 0.1)
    return train, val, images - train - val


def photos_to_use(requested: int, boxes: list[Any]) -> int:
    """``--images``, or every photo with a usable face box when there are fewer: a smaller index is split 8:1:1 as
    a whole instead of filling the training split and leaving validation and test empty."""
    return min(requested, sum(valid_box(b) for b in boxes))


def resolve_device(device: str) -> str:
    """ultralytics' device string: ``auto`` (or empty) is every visible GPU (DDP when several), else the CPU."""
    device = device.strip().lower()
    if device not in ("auto", ""):
        return device
    import torch

    n = torch.cuda.device_count()
    return ",".join(str(i) for i in range(n)) if n else "cpu"


def work_dir(cfg: TrainDetectorConfig) -> str:
    if cfg.work:
        return os.path.abspath(cfg.work)
    if not storage.is_s3(cfg.output):
        return os.path.abspath(os.path.join(cfg.output, "work"))
    key = hashlib.sha256(cfg.output.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "kemo", "detector", key)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_source(cfg: TrainDetectorConfig) -> tuple[Source, str]:
    """(where training starts, its local path): face weights (fetched, hash-checked) or a model YAML (resolved
    offline, identified by the hash of its definition)."""
    if cfg.weights:
        from kemo.detector.weights import fetch_weights

        path, sha = fetch_weights(cfg.weights, cfg.weights_sha256)
        return Source("weights", cfg.weights, sha, os.path.basename(cfg.weights)), path
    from ultralytics.nn.tasks import yaml_model_load

    yaml = modules.resolve_yaml(cfg.model)
    try:
        definition = yaml_model_load(yaml)
    except FileNotFoundError:
        raise ValueError(f"model YAML {cfg.model!r} is neither a file, one of ours "
                         f"({', '.join(sorted(os.listdir(modules.CFG_DIR)))}) nor one of ultralytics'") from None
    definition.pop("yaml_file", None)  # the definition itself (with its scale) is what identifies the model
    sha = _sha256(json.dumps(definition, sort_keys=True, default=str).encode())
    return Source("model", cfg.model, sha, os.path.basename(cfg.model)), yaml


def _fingerprint(cfg: TrainDetectorConfig, source: Source, manifest: pa.Table, faces: dict[str, Any] | None
                 ) -> dict[str, Any]:
    # the input settings change the manifest (hashed below) or only which broken photos are left out of the export
    ignored = ("input", "output", "detector", "weights", "weights_sha256", "model", "work", "gpus", "cpus", "workers",
               "device", "max_bytes", "links")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    settings["train_args"] = cfg.extra_train_args()
    return {"settings": settings, "source_sha256": source.sha256,
            # the photos and their boxes (what the detector learns from), whatever the row order
            "manifest_sha256": outputs.table_sha256(manifest.select(["image_id", "uri", "split", "box"]),
                                                    sort_by="image_id"),
            # a generated crowd's other faces, labelled too
            "crowd_sha256": _sha256(json.dumps(faces, sort_keys=True).encode()) if faces else None}


def run(cfg: TrainDetectorConfig) -> DetectorMeta:
    """Export, evaluate, fine-tune, evaluate and commit; returns ``meta.json``'s content."""
    from kemo.data import aihub

    t0 = time.perf_counter()
    cfg = cfg.smoke()
    source, source_path = resolve_source(cfg)
    manifest = aihub.load_or_index(cfg.input, storage.join(cfg.output, "index"), seed=cfg.seed, inputs=cfg)
    faces = crowd_faces(cfg.input)
    fingerprint = _fingerprint(cfg, source, manifest, faces)
    out = outputs.Output(cfg.output, KIND)
    if out.manifest() is not None:
        if out.current(fingerprint) is None:
            raise ValueError(f"{cfg.output} holds a detector trained with other inputs or settings; "
                             "use a new --output")
        log.info("%s already holds this detector: nothing to do", cfg.output)
        return from_dict(DetectorMeta, out.read_json("meta.json"), out.path("meta.json"))
    with out.lease() as lease:
        return _train_and_commit(cfg, out, lease, source, source_path, manifest, faces, fingerprint, t0)


def _export(cfg: TrainDetectorConfig, manifest: pa.Table, faces: dict[str, Any] | None, dataset: str
            ) -> tuple[ExportSummary, str]:
    """(the exported dataset, its hash: the selection, its boxes (index.parquet), the photos' size (the stamp) and a
    generated crowd's other faces, labelled too)."""
    images = photos_to_use(cfg.images, manifest.column("box").to_pylist())
    if images < cfg.images:
        log.warning("%s: %d photos have a face box, fewer than --images %d: splitting those 8:1:1", cfg.input, images,
                    cfg.images)
    exported = export(ExportConfig(input=cfg.input, output=dataset, counts=split_counts(images),
                                   max_side=cfg.max_side or 2 * cfg.imgsz, seed=cfg.seed, max_bytes=cfg.max_bytes),
                      manifest=manifest)
    if min(exported.counts.values()) == 0:
        raise ValueError(f"too few photos with a face box for a train/val/test split: {exported.counts}")
    crowd = add_labels(dataset, faces).encode() if faces else b""
    return exported, _sha256(b"".join(Path(dataset, name).read_bytes() for name in ("index.parquet", STAMP)) + crowd)


def _train_and_commit(cfg: TrainDetectorConfig, out: outputs.Output, lease: outputs.Lease, source: Source,
                      source_path: str, manifest: pa.Table, faces: dict[str, Any] | None, fingerprint: dict[str, Any],
                      t0: float) -> DetectorMeta:
    import torch
    import ultralytics

    work, device = work_dir(cfg), resolve_device(cfg.device)
    dataset = os.path.join(work, "dataset")
    exported, dataset_sha = _export(cfg, manifest, faces, dataset)
    before = None
    if source.kind == "weights":
        before = evaluate(source_path, dataset, "test", cfg.imgsz, device, cfg.conf, work, "before")
    wanted = {"source_sha256": source.sha256, "dataset_sha256": dataset_sha, "epochs": cfg.epochs,
              "imgsz": cfg.imgsz, "batch": cfg.batch, "seed": cfg.seed, "train_args": cfg.extra_train_args()}
    trained, best_path, after = _fit_and_evaluate(cfg, cfg.loss_weights(), wanted, source_path, dataset, work, device)
    rows = _ablation(cfg, wanted, source_path, dataset, work, device, trained, best_path, after) if cfg.ablation \
        else []
    best = Path(best_path).read_bytes()
    sha = _sha256(best)
    meta = DetectorMeta(
        weights=WeightsFile("best.pt", sha, len(best)), source=source,
        data=TrainingData(cfg.input, dataset, exported.counts, exported.persons, exported.statuses, bool(faces),
                          dataset_sha),
        loss=cfg.loss_weights(), train=trained, metrics=Metrics("test", before, after), ablation=rows,
        fingerprint=fingerprint, config=dataclasses.asdict(cfg),
        versions={"kemo": code_version(), "ultralytics": ultralytics.__version__, "torch": torch.__version__},
        seconds=round(time.perf_counter() - t0, 1),
        use=f"jobs/preprocess.py --detector yolo --weights {storage.join(cfg.output, 'best.pt')} "
            f"--weights-sha256 {sha}")
    table = table4(source.name, source.kind == "weights", before, after, "test", exported.persons["test"], cfg.conf)
    if rows:
        table += "\n## Loss ablation\n\n" + ablation.table(rows, "test", cfg.imgsz, cfg.conf)
    out.uncommit()
    files = [out.write_file("best.pt", best),
             out.write_file("best.pt.sha256", f"{sha}  best.pt\n".encode()),
             out.write_json("meta.json", dataclasses.asdict(meta)),
             out.write_file("table4.md", table.encode())]
    lease.check()
    out.commit(files, dataclasses.asdict(cfg), fingerprint)
    log.info("detector committed to %s (best.pt sha256 %s) in %.0f s", cfg.output, sha[:12], meta.seconds)
    return meta


def _fit_and_evaluate(cfg: TrainDetectorConfig, loss: LossWeights, wanted: dict[str, Any], source_path: str,
                      dataset: str, work: str, device: str) -> tuple[Training, str, Evaluation]:
    """(how training went, best.pt's path, its evaluation on the test split) for one loss trained in ``work``."""
    from kemo.detector.fit import fit

    trained, best = fit(wanted, loss, source_path, os.path.join(dataset, "data.yaml"), work, device, cfg.workers)
    return trained, best, evaluate(best, dataset, "test", cfg.imgsz, device, cfg.conf, work, "after")


def _ablation(cfg: TrainDetectorConfig, wanted: dict[str, Any], source_path: str, dataset: str, work: str,
              device: str, trained: Training, best: str, after: Evaluation) -> list[AblationRow]:
    """The ablation's rows: this run's loss (trained already) and every other ``--ablation`` loss, trained alike in
    ``work/ablation/<name>``, in :data:`ablation.VARIANTS`' order."""
    from kemo.detector.fit import run_dir

    main = cfg.loss_weights()
    scales = ablation.input_scales(dataset, "test", cfg.imgsz)

    def row(name: str, loss: LossWeights, trained: Training, best: str, after: Evaluation, work: str) -> AblationRow:
        _, photos = predict(best, dataset, "test", cfg.imgsz, eval_device(device), cfg.conf)
        return AblationRow(name, loss, after, ablation.crowd_recall(photos, scales, cfg.conf),
                           ablation.seconds_per_epoch(run_dir(work)), trained.cpu_seconds_per_epoch, loss == main)

    named = {name: loss for name, loss in ablation.VARIANTS.items() if loss == main} or {"custom": main}
    rows = [row(next(iter(named)), main, trained, best, after, work)]
    for name, loss in ablation.variants(cfg.ablation).items():
        if loss != main:
            variant_work = os.path.join(work, "ablation", name)
            rows.append(row(name, loss, *_fit_and_evaluate(cfg, loss, wanted, source_path, dataset, variant_work,
                                                             device), variant_work))
    order = list(ablation.VARIANTS)
    return sorted(rows, key=lambda r: order.index(r.name) if r.name in order else -1)
