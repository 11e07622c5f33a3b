"""What each actor of a Ray Data pool reserves, how the automatic values are filled from the nodes that will run the
actors, and the refusal of a request that no node can hold."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TypeVar

from kemo import storage
from kemo.config import Stopped, at_least

log = logging.getLogger(__name__)
R = TypeVar("R", bound="ActorResources")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head node


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

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        for flag in ("batch_size", "actors", "decoders", "calls_per_actor"):
            at_least(f"--{flag.replace('_', '-')}", getattr(self, flag), 0)  # 0: automatic
        if self.gpus_per_actor != -1:
            at_least("--gpus-per-actor", self.gpus_per_actor, 0)  # -1: automatic
        at_least("--decode-pixels", self.decode_pixels, 1)


@dataclass(frozen=True)
class Node:
    """What one node offers an actor: an alive node, or a node type that the cluster's autoscaler can start."""

    name: str  # "node <id> at <IP>", or "node type <name>" for one the autoscaler can start
    cpus: float
    gpus: float
    launchable: bool = False

    def holds(self, cpus: float, gpus: float) -> bool:
        return self.cpus >= cpus and self.gpus >= gpus

    def __str__(self) -> str:
        return f"{self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


def cluster_nodes() -> list[Node]:
    """The alive nodes, then the worker node types the autoscaler may start (from the cluster config it publishes,
    which Ray Train reads too); none on a fixed cluster or an embedded Ray."""
    import ray

    nodes = [Node(f"node {n.get('NodeID', '?')[:8]} at {n.get('NodeManagerAddress', '?')}",
                  float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive")]
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # no autoscaler state on this Ray: a fixed cluster
        config = None
    for group in (config.node_group_configs if config else []):
        if group.max_count != 0:
            nodes.append(Node(f"node type {group.name}", float(group.resources.get("CPU", 0)),
                              float(group.resources.get("GPU", 0)), launchable=True))
    if not config or not config.node_group_configs:
        nodes += _bootstrap_node_types(os.path.expanduser(BOOTSTRAP_CONFIG))
    return nodes


def _bootstrap_node_types(path: str) -> list[Node]:
    """The worker node types of the cluster config that `ray up` leaves on the head node (where `ray job submit`
    runs drivers) for its autoscaler: JSON despite the name, with each type's CPUs filled in from its instance type
    (a count still missing is unknown: inf)."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(config, dict):
        return []
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head or not isinstance(spec, dict) or not spec.get("max_workers"):
            continue
        res = spec.get("resources") or {}
        out.append(Node(f"node type {name}", float(res.get("CPU", math.inf)), float(res.get("GPU", 0)),
                        launchable=True))
    return out


def connect(dashboard: bool = True) -> list[Node]:
    """Ray, for a job that has work for it: the instance this process is already connected to (a test's, a caller's),
    else ``ray.init()``: the cluster that ``RAY_ADDRESS`` or ``ray job submit`` names, or an embedded one (with its
    dashboard unless ``dashboard`` is False). Jobs call it once they know they have work, so a refusal or a rerun with
    nothing to do answers without starting Ray. Returns the nodes that can run actors (:func:`cluster_nodes`)."""
    import ray

    for attempt in range(1, START_ATTEMPTS + 1):
        if ray.is_initialized():
            break
        try:
            ray.init(**embedded_options(dashboard))
        except Exception as e:  # an embedded node on a loaded machine may miss Ray's start-up deadline
            ray.shutdown()  # what a failed start left behind, before the next try
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if attempt == START_ATTEMPTS or not _transient_start_failure(e):
                raise Stopped(f"Ray did not start ({attempt} tries): {first}; run the same command again (a killed "
                              "run resumes)") from None
            log.warning("Ray did not start (%s); trying again (%d of %d)", first, attempt + 1, START_ATTEMPTS)
    return cluster_nodes()


START_ATTEMPTS = 3


def embedded_options(dashboard: bool) -> dict[str, object]:
    """``ray.init`` options that keep an embedded Ray to itself when other Ray instances run on the machine.

    Ray Train starts a PlacementGroupCleaner actor with every fit, which asks the state API once a second whether the
    run's controller lives. Given no address, the state API looks for *any* local Ray: with two embedded instances
    (two kemo jobs on one machine) it finds both and raises "Found multiple active Ray instances" (a traceback a
    second in the console), or asks the other instance's dashboard, which knows no such controller, and the cleaner
    then removes the placement group of a run still training. An embedded start therefore puts its dashboard on a
    port chosen here and names it in ``RAY_API_SERVER_ADDRESS``, which the state API reads before searching; Ray's
    processes inherit it from this one. Joining a cluster (``RAY_ADDRESS``, ``ray job submit``, a local ``ray start``)
    changes nothing: that cluster's processes have their own environment.

    Its workers also run at the priority of the process that started it. Ray raises every worker's nice value by 15,
    so that a cluster node's raylet stays ahead of the work; on a machine that other work keeps busy, an embedded Ray's
    workers (which hold all of a job's work) then got ~4% of a core each beside a plain CPU-bound process, and a fit
    crawled. A job at nice 0 gets its fair share; ``nice -n 10 python jobs/…`` still puts the whole job in the
    background, and a ``RAY_worker_niceness`` the user exported is kept. The address is ``"local"``: ``ray.init``
    then starts the instance planned here even if a ``ray start`` appears in between."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if canonicalize_bootstrap_address(None) is not None:  # ray.init() will join an existing cluster
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    options: dict[str, object] = {"address": "local", "include_dashboard": dashboard, "dashboard_port": port}
    if "RAY_worker_niceness" not in os.environ:  # Ray's _system_config would override the user's own
        options["_system_config"] = {"worker_niceness": 0}
    return options


def _transient_start_failure(e: Exception) -> bool:
    """A start-up that may succeed when tried again: a timeout of the node's start, not a configuration error."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or isinstance(e, (TimeoutError, ConnectionError))


def resolve_resources(cfg: R, nodes: list[Node]) -> R:
    """Fill the automatic resource knobs from the nodes that will run the actors, then check that one can.

    A GPU actor's CPUs come from the GPU nodes themselves, the smallest of them (one CPU a GPU node keeps for the
    rest: writers, Ray's own): never from cluster-wide totals, where CPU-only nodes and the head would promise CPUs
    that no GPU node has. Node types an autoscaler can start count as nodes. A request that no node can hold is
    refused here, naming the request and the nodes, instead of waiting for ever. Any config with these fields.
    """
    gpu_nodes = [n for n in nodes if n.gpus >= 1 and n.cpus >= 1]  # a GPU with no CPU beside it runs no actor
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if gpu_nodes else 0.0)
    if cfg.decoders:
        decoders = cfg.decoders
    elif gpa:
        # up to 8 decoders per GPU actor, within its share of its node (g5.xlarge: 4 vCPUs, 1 GPU → 3)
        # a node type whose CPUs the cluster config leaves unknown (inf) says nothing: 1 decoder where none is known
        shares = [n.cpus // max(1, int(n.gpus // gpa)) - 1 for n in nodes
                  if n.gpus >= gpa and n.cpus and math.isfinite(n.cpus)]
        decoders = max(1, min(8, int(min(shares)))) if shares else 1
    else:
        decoders = 1
    alive = [n for n in nodes if not n.launchable]
    if cfg.actors:
        actors = cfg.actors
    elif gpa:
        actors = max(1, sum(min(int(n.gpus // gpa), int(n.cpus // decoders)) for n in alive if n.holds(decoders, gpa)))
    else:
        actors = max(1, sum(int(n.cpus // decoders) for n in alive))
    check_placeable(decoders, gpa, nodes, "actor", "--decoders or --gpus-per-actor")
    batch = cfg.batch_size or (64 if gpa else 16)
    calls = cfg.calls_per_actor or (2 if gpa else 1)
    return dataclasses.replace(cfg, gpus_per_actor=gpa, decoders=decoders, actors=actors, batch_size=batch,
                               calls_per_actor=calls)


def check_placeable(cpus: float, gpus: float, nodes: list[Node], what: str, flags: str) -> None:
    """Refuse a request for each ``what`` (an actor, a training worker) that no node, alive or launchable, can hold:
    Ray would only warn that the job may hang for ever."""
    if not any(n.holds(cpus, gpus) for n in nodes):
        raise ValueError(f"each {what} asks for {cpus:g} CPU and {gpus:g} GPU, and no node can hold that: "
                         f"{'; '.join(map(str, nodes)) or 'no nodes'}. Change {flags}, or add a node that can")


def check_shared(paths: dict[str, str | None], nodes: int, why: str) -> None:
    """A local path is one machine's disk: with more than one node (``nodes``: the alive nodes and the node types an
    autoscaler can start), every path that work on other nodes reads or writes must be on S3. ``paths``: flag → the
    path given (None: not given); ``why``: what would go wrong, for the message."""
    if nodes <= 1:
        return
    for flag, uri in paths.items():
        if uri and not storage.is_s3(uri):
            raise ValueError(f"{flag} {uri} is a local path but the cluster has {nodes} nodes (or node types it can "
                             f"start): {why}; give an s3:// URI")
