"""The photo jobs' actor pool: the driver's preparation before it starts, and the Ray Data map through it.

Preprocessing and labelling start their pools the same way: the detector's weights loaded once in the driver, Ray
connected, the actors sized for the nodes that will run them, every path the actors read checked to be shared by
them; then the pending photos, in blocks of the batch size, mapped through a pool of class UDFs (one actor call a
block), never more actors than blocks, so a run of a few photos loads its models once.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pyarrow as pa

from kemo.detector.registry import verify_detector
from kemo.resources import check_shared, connect, resolve_resources
from kemo.settings import PhotoSettings

C = TypeVar("C", bound=PhotoSettings)


def prepare(cfg: C, shared: dict[str, str | None], why: str) -> C:
    """``cfg`` with its actors sized for the cluster, after everything that can refuse the run has: weights that do
    not load, a request no node can hold, or a local ``shared`` path (flag → path) on a cluster of several nodes
    (``why`` says what would go wrong). Connects to Ray (or starts it) only here, when there is work."""
    verify_detector(cfg)  # weights that do not load fail here, before the lease or any file is written
    nodes = connect()
    cfg = resolve_resources(cfg, nodes)
    check_shared(shared, len(nodes), why)  # node types the autoscaler can start count: actors may go there
    return cfg


def map_photos(pending: pa.Table, udf: type, kwargs: dict[str, Any], cfg: PhotoSettings) -> Any:
    """The Ray Dataset of ``udf(**kwargs)`` applied to ``pending`` (photo rows), ``cfg.batch_size`` at a time, in a
    pool of at most ``cfg.actors`` actors holding ``cfg.decoders`` CPUs and ``cfg.gpus_per_actor`` GPUs each."""
    import ray

    blocks = [pending.slice(i, cfg.batch_size) for i in range(0, pending.num_rows, cfg.batch_size)]
    actors = max(1, min(cfg.actors, len(blocks)))
    return ray.data.from_arrow(blocks).map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                           enable_true_multi_threading=cfg.calls_per_actor > 1),
        num_cpus=cfg.decoders, num_gpus=cfg.gpus_per_actor or None)
