"""Training data for the classifiers: committed crop shards → Ray Data datasets of decoded photos, never in the driver.

The driver reads only the small columns of the shards (which photos are usable, per split and class: the report,
a few bytes a photo); the JPEG crops are read, filtered, put in order and decoded by Ray Data tasks on whichever nodes
have CPUs, and Ray Train's workers pull their share (``ray.train.get_dataset_shard``). Usable = status ``ok``, a known
label (not -1), at least ``min_agree`` annotators behind it; what was left out and why is counted in the report.

Order: every photo gets a key, a keyed hash of its ``image_id``, and each split is sorted by it and cut into blocks
of :data:`BLOCK_ROWS`: a global shuffle that depends on the photos alone (not on the shards' row order, which varies
between preprocessing runs, nor on Ray's task timing), so every execution of a split streams the same rows in the same
blocks, Ray Train's ``streaming_split`` hands each worker the same share, and a resumed run sees what an uninterrupted
one saw. Epochs differ by a seeded local shuffle buffer in each worker (:mod:`kemo.classifier.train`).

Decode once (``--cache``): ``memory`` materialises the decoded train and val splits in Ray's object store (spread over
the nodes that decoded them) for every epoch and every run of these shards; ``none`` re-reads and re-decodes each epoch
on CPU tasks (a 224² crop decodes and resizes in about a millisecond); ``auto`` caches when the decoded splits take at
most :data:`CACHE_SHARE` of the object stores of the alive nodes with CPUs (a CPU-less head runs no task, so holds no
block; node types an autoscaler has not started yet are not counted).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kemo import outputs, storage
from kemo.classes import CLASS_NAMES
from kemo.classifier.metrics import Agreement, annotator_agreement
from kemo.classifier.transform import resize_square
from kemo.schema import SPLITS

log = logging.getLogger(__name__)
SMALL = ["image_id", "split", "label", "agree_n", "status"]  # what the driver reads (and the votes): no pixels
VOTES = "votes"  # the annotators' votes (kemo.schema.CARRIED)
READ = [*SMALL, "crop"]
BLOCK_ROWS = 128  # rows per block after ordering: small blocks split evenly over workers and shuffle well locally
CACHES = ("auto", "memory", "none")
CACHE_SHARE = 0.5  # of the cluster's object store: the rest is for Ray Data's own blocks in flight and the workers
ORDER_SEED = 0  # the splits' order is one for every run of the same shards, so one cache serves them all


def decode_crop(data: bytes | None, size: int) -> np.ndarray | None:
    """A crop's JPEG → (size, size, 3) uint8 RGB, or None when it does not decode."""
    image = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR_RGB) if data else None
    return None if image is None else resize_square(image, size)


def usable(table: pa.Table, min_agree: int) -> tuple[np.ndarray, list[str]]:
    """Per row: whether it trains (status ok, a known label, ``min_agree`` annotators) and, if not, why. One rule for
    the driver's report and the read tasks."""
    status = table.column("status").to_numpy(zero_copy_only=False)
    label = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False)
    agree = table.column("agree_n").fill_null(0).to_numpy(zero_copy_only=False)
    reasons = np.where(status != "ok", np.char.add("status ", status.astype(str)),
                       np.where(label < 0, "unknown label",
                                np.where(agree < min_agree, f"fewer than {min_agree} annotators agree", "")))
    return reasons == "", reasons.tolist()


def vote_distribution(votes: list[list[int] | None], labels: list[int]) -> np.ndarray:
    """(n, classes) float32: each photo's share of known votes per class (-1, 알수없음 or missing, is no vote), the
    target of ``--target votes``; a photo without a known vote gets its label one-hot."""
    out = np.zeros((len(labels), len(CLASS_NAMES)), np.float32)
    for i, (v, y) in enumerate(zip(votes, labels)):
        known = [c for c in (v or []) if 0 <= c < len(CLASS_NAMES)]
        for c in known or [y]:
            out[i, c] += 1
    return out / out.sum(1, keepdims=True)


def order_keys(image_ids: list[str], seed: int = ORDER_SEED) -> np.ndarray:
    """A keyed 64-bit hash of each ``image_id``: the position of the photo in its split's order."""
    key = seed.to_bytes(8, "little", signed=True)
    return np.asarray([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little",
                                      signed=True) for i in image_ids], np.int64)


@dataclass
class SplitCount:
    photos: int
    per_class: dict[str, int]  # kemo.classes order


@dataclass
class CacheDecision:
    """Whether the decoded train and val splits are kept in Ray's object store, and why."""

    cache: str  # --cache
    cached: bool
    decoded_train_val_gb: float
    object_store_gb: float
    crops_that_do_not_decode: dict[str, int] = field(default_factory=dict)  # split → crops left out


@dataclass
class DataReport:
    """What training uses of a crop output: rows read, photos per split and class, what was left out and why, the
    annotators' own agreement on the test photos, and (once the splits are made) the cache decision."""

    shards: str
    rows: int
    image_size: int
    min_agree: int
    left_out: dict[str, int]  # reason → rows
    splits: dict[str, SplitCount]
    annotators: Agreement
    # the index's test photos, whatever their crop became (a known label, min_agree annotators): what every row of
    # Table 5 is scored on, a photo without a usable crop counting as wrong; their image_ids' hash tells whether two
    # crop outputs share them
    test_photos: int
    test_photos_sha256: str
    cache: CacheDecision | None = None


@dataclass
class TrainingData:
    """A committed crop output, planned for training: which shard files, which photos, and the report. Pixels stay
    in the shards until a Ray Data task reads them."""

    shards: str
    files: list[str]
    image_size: int
    min_agree: int
    counts: dict[str, list[int]]  # split → photos per class, kemo.classes order
    report: DataReport
    voted: int = 0  # usable training photos with at least one known vote

    def check_votes(self) -> None:
        if not self.voted:  # e.g. preprocessed from a manifest without votes: every target would be the one-hot
            raise ValueError(f"no training photo of {self.shards} has a known annotator vote (its input had none): "
                             "--target votes would train on the majority label alone; use --target majority")

    def photos(self, split: str) -> int:
        return sum(self.counts[split])

    def decoded_bytes(self, splits: tuple[str, ...] = ("train", "val")) -> int:
        return sum(self.photos(s) for s in splits) * self.image_size ** 2 * 3


def _read_small(uri: str) -> pa.Table:
    """The small columns of one shard file; a file without one of them (the votes: written by an earlier kemo) is
    refused in one line (:func:`kemo.outputs.read_files`)."""
    return outputs.read_files([uri], [*SMALL, VOTES])


def _scored(table: pa.Table, min_agree: int) -> list[str]:
    """The image_ids of the test photos of ``table`` that a report scores: a known label that ``min_agree``
    annotators chose, whatever their crop's status."""
    label = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False)
    agree = table.column("agree_n").fill_null(0).to_numpy(zero_copy_only=False)
    test = np.asarray(table.column("split").to_pylist(), object) == "test"
    return table.filter(pa.array(test & (label >= 0) & (agree >= min_agree))).column("image_id").to_pylist()


def plan(shards: str, image_size: int = 224, min_agree: int = 2) -> TrainingData:
    """Read the small columns of a committed crop output (never its crops) and count what each split trains on."""
    files = outputs.Output(shards, outputs.CROPS).files("shards")
    left_out: Counter[str] = Counter()
    counts = {s: [0] * len(CLASS_NAMES) for s in SPLITS}
    rows, test_votes, voted, test_ids = 0, [], 0, []
    for uri in files:
        table = _read_small(uri)
        rows += table.num_rows
        test_ids += _scored(table, min_agree)
        ok, reasons = usable(table, min_agree)
        split = table.column("split").to_pylist()
        label = table.column("label").fill_null(-1).to_pylist()
        for good, why, s, y, v in zip(ok.tolist(), reasons, split, label, table.column(VOTES).to_pylist()):
            if not good:
                left_out[why] += 1
            elif s in counts:
                counts[s][y] += 1
                if s == "test":
                    test_votes.append(v)
                elif s == "train" and v and any(x >= 0 for x in v):
                    voted += 1
            else:
                left_out[f"split {s}"] += 1
    # the test photos' own ceiling: how often one annotator matches the other two
    report = DataReport(shards, rows, image_size, min_agree, dict(sorted(left_out.items())),
                        {s: SplitCount(sum(c), dict(zip(CLASS_NAMES, c))) for s, c in counts.items()},
                        replace(annotator_agreement(test_votes), split="test"), len(test_ids),
                        hashlib.sha256("\n".join(sorted(test_ids)).encode()).hexdigest())
    return TrainingData(shards, files, image_size, min_agree, counts, report, voted)


def read_usable(batch: dict[str, np.ndarray], split: str, min_agree: int, block_rows: int, votes: bool = False
                ) -> Iterator[pa.Table]:
    """Ray Data task: one shard file (a row of ``uri``) → its usable rows of ``split`` as (order, label, crop), and
    with ``votes`` each photo's vote distribution (:func:`vote_distribution`)."""
    for uri in batch["uri"]:
        table = storage.read_parquet_columns(str(uri), READ + ([VOTES] if votes else []))
        ok, _ = usable(table, min_agree)
        table = table.filter(pc.and_(pa.array(ok), pc.equal(table.column("split"), split)))
        for start in range(0, table.num_rows, block_rows):
            chunk = table.slice(start, block_rows)
            columns = {"order": order_keys(chunk.column("image_id").to_pylist()),
                       "label": chunk.column("label").cast(pa.int64()), "crop": chunk.column("crop")}
            if votes:
                dist = vote_distribution(chunk.column(VOTES).to_pylist(), chunk.column("label").to_pylist())
                columns[VOTES] = pa.FixedSizeListArray.from_arrays(pa.array(dist.ravel()), len(CLASS_NAMES))
            yield pa.table(columns)


def decode_batch(batch: pa.Table, size: int) -> dict[str, np.ndarray]:
    """Ray Data task: JPEG crops → ``image`` (n, size, size, 3) uint8 RGB, ``label`` and ``key`` (the photo's order
    key, which names it in tests' traces) as int64. A crop that does not
    decode (preprocessing wrote it, so a damaged shard) is dropped with a warning."""
    pixels = [decode_crop(b, size) for b in batch.column("crop").to_pylist()]
    good = [i for i, p in enumerate(pixels) if p is not None]
    if len(good) < len(pixels):
        log.warning("%d crops do not decode; left out", len(pixels) - len(good))
    images = np.stack([pixels[i] for i in good]) if good else np.empty((0, size, size, 3), np.uint8)
    out = {"image": images, "label": batch.column("label").to_numpy()[good],
           "key": batch.column("order").to_numpy()[good]}
    if VOTES in batch.column_names:  # (n, classes) float32 vote shares
        flat = batch.column(VOTES).combine_chunks().flatten().to_numpy()
        out[VOTES] = flat.reshape(-1, len(CLASS_NAMES))[good]
    return out


def split_dataset(data: TrainingData, split: str, block_rows: int = BLOCK_ROWS, votes: bool = False) -> Any:
    """One split as a Ray Data dataset of ``image``, ``label`` and ``key`` (and ``votes``, the vote shares, with
    ``votes``), in its fixed order (see the module's doc), in blocks of ``block_rows``."""
    import ray

    photos = data.photos(split)
    ds = ray.data.from_items([{"uri": u} for u in data.files], override_num_blocks=max(1, len(data.files)))
    ds = ds.map_batches(read_usable, fn_kwargs={"split": split, "min_agree": data.min_agree,
                                                "block_rows": block_rows, "votes": votes},
                        batch_size=1, batch_format="numpy")
    # sorted by the keyed hash, then cut into equal blocks by row count: the same blocks at every execution
    ds = ds.sort("order").repartition(max(1, math.ceil(photos / block_rows)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": data.image_size}, batch_size=block_rows,
                        batch_format="pyarrow")
    # without it the decode tasks' blocks come out in the order they finish, and a materialised split (the cache)
    # would hold its blocks in an order of the moment
    ds.context.execution_options.preserve_order = True
    return ds


def arrays_dataset(images: np.ndarray, labels: np.ndarray) -> Any:
    """Photos already in memory ((N, S, S, 3) uint8, (N,) labels) as a split like :func:`split_dataset`'s, in blocks
    of :data:`BLOCK_ROWS`, keyed by position: for the benchmark, whose photos are generated in the process."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    return ray.data.from_arrow([
        pa.table({"image": ArrowTensorArray.from_numpy(images[i:i + BLOCK_ROWS]),
                  "label": pa.array(labels[i:i + BLOCK_ROWS], pa.int64()),
                  "key": pa.array(np.arange(i, min(i + BLOCK_ROWS, len(labels))), pa.int64())})
        for i in range(0, len(labels), BLOCK_ROWS)])


def cache_decision(cache: str, decoded_bytes: int, object_store_bytes: float) -> bool:
    """Whether to keep the decoded splits in the object store: ``memory`` yes, ``none`` no, ``auto`` when they take
    at most :data:`CACHE_SHARE` of it."""
    if cache not in CACHES:
        raise ValueError(f"--cache must be one of {', '.join(CACHES)}, not {cache!r}")
    return cache == "memory" or (cache == "auto" and decoded_bytes <= CACHE_SHARE * object_store_bytes)


def datasets(data: TrainingData, cache: str, train: bool = True) -> tuple[dict[str, Any], CacheDecision]:
    """The train, val and test datasets of planned crops, train and val materialised when cached; and what was
    decided (written into the report). The train split carries the vote shares where the shards have votes (28
    bytes a photo), so one cache serves both training targets. Without ``train`` (only calibrating finished runs)
    the train split is left out."""
    import ray

    # the stores of the nodes that can run the decode tasks, where the cached blocks will live (not a CPU-less head)
    store = float(sum(n["Resources"].get("object_store_memory", 0) for n in ray.nodes()
                      if n["Alive"] and n["Resources"].get("CPU", 0) > 0))
    cached = cache_decision(cache, data.decoded_bytes(), store)
    out = {s: split_dataset(data, s, votes=s == "train") for s in SPLITS if train or s != "train"}
    decision = CacheDecision(cache, cached, round(data.decoded_bytes() / 1e9, 3), round(store / 1e9, 3))
    if cached:
        for s in [s for s in ("train", "val") if s in out]:
            out[s] = out[s].materialize()
            decoded = out[s].count()
            if not decoded:
                raise ValueError(f"{data.shards}: none of the {data.photos(s)} {s} crops decodes: damaged shards?")
            if decoded != data.photos(s):
                decision.crops_that_do_not_decode[s] = data.photos(s) - decoded
    log.info("training data of %s: %s", data.shards, decision)
    return out, decision
