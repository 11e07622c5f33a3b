"""What each actor of a Ray Data pool reserves, and how the automatic values are filled from the cluster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

R = TypeVar("R", bound="ActorResources")


@dataclass(kw_only=True)
class ActorResources:
    """The actor pool of a photo job: how many actors, what each holds, how much work each takes per call."""

    batch_size: int = field(default=0, metadata={"help": "photos per actor call = detector batch; 0 = 16 CPU, 64 GPU"})
    actors: int = field(default=0, metadata={"help": "actor pool size; 0 = one per GPU, else CPUs / decoders"})
    decoders: int = field(default=0, metadata={"help": "CPU decoder threads (and CPUs) per actor; 0 = 1 CPU, 8 GPU"})
    gpus_per_actor: float = field(default=-1, metadata={"help": "GPUs per actor; -1 = 1 when the cluster has GPUs"})
    calls_per_actor: int = field(default=0, metadata={
        "help": "batches in flight per actor, so decoding overlaps the models; 0 = 2 with GPUs, else 1"})
    decode_pixels: int = field(default=64_000_000, metadata={
        "help": "pixels an actor's decoder threads decode at once (~10 bytes each): a larger photo decodes alone"})


def connect() -> dict[str, float]:
    """Ray, for a job that has work for it: the instance this process is already connected to (a test's, a caller's),
    else ``ray.init()``: the cluster that ``RAY_ADDRESS`` or ``ray job submit`` names, or an embedded one. Jobs call
    it once they know they have work, so a refusal or a rerun with nothing to do answers without starting Ray.
    Returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.cluster_resources()


def resolve_resources(cfg: R, cluster: dict[str, float]) -> R:
    """Fill the automatic resource knobs from the cluster's resources (the nodes up now: on an autoscaling cluster
    that has not scaled up yet, give --gpus-per-actor and --decoders explicitly). Any config with these fields."""
    gpus = int(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if gpus else 0.0)
    # up to 8 decoders per GPU, but never more CPUs than a GPU's share of the node (g5.xlarge: 4 vCPUs, 1 GPU)
    decoders = cfg.decoders or (max(1, min(8, cpus // max(gpus, 1) - 1)) if gpa else 1)
    if cfg.actors:
        actors = cfg.actors
    elif gpa:
        actors = max(1, int(gpus / gpa))
    else:
        actors = max(1, cpus // decoders)
    batch = cfg.batch_size or (64 if gpa else 16)
    calls = cfg.calls_per_actor or (2 if gpa else 1)
    return dataclasses.replace(cfg, gpus_per_actor=gpa, decoders=decoders, actors=actors, batch_size=batch,
                               calls_per_actor=calls)
