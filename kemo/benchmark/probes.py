"""How the benchmark measures: the clock helpers, the machine it ran on, and a sampler of worker memory and GPUs.

The sampler runs as a thread of the driver beside each Ray run: it finds this node's Ray workers by the raylet that
started them (several Ray instances may share a machine), keeps each worker's peak RSS, and polls the GPUs through
NVML or nvidia-smi. Nothing here knows a stage.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MIB = 1 << 20
# Ray processes that are not a run's workers: idle pooled workers, the node's agents, a submitted job's supervisor
NOT_WORKERS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor")


# --------------------------------------------------------------------------------------------------- the clock


def rate(n: int, seconds: float) -> float:
    """Items per second, rounded for the report."""
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def time_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> float:
    """Seconds that ``fn`` takes over every item, one after the other."""
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return time.perf_counter() - t0


def marginal(n_small: int, t_small: float, n: int, t: float) -> float:
    """Photos/s of the photos beyond the first ``n_small``, timed ``t_small`` and ``t`` seconds from the start: fixed
    costs (model load, first-call set-up) fall in the first ``n_small``."""
    return rate(n - n_small, t - t_small)


def data_path_rates(ds: Any, batch_size: int, epochs: int) -> list[float]:
    """Images/s per epoch of a training split through the worker's input path alone (local shuffle buffer,
    ``iter_torch_batches``, the uint8 batch made contiguous), with no model: the most the data path can feed."""
    from kemo.classifier.train import dataset_batches

    rates = []
    for epoch in range(epochs):
        t0, photos = time.perf_counter(), 0
        for images, labels in dataset_batches(ds, batch_size, shuffle_seed=epoch):
            images.contiguous()
            photos += len(labels)
        rates.append(rate(photos, time.perf_counter() - t0))
    return rates


# --------------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(cluster: dict[str, float]) -> dict[str, Any]:
    """This node as the benchmark sees it; ``cores`` and ``gpus`` are what Ray may use."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu": cpu_model(), "cores": int(cluster.get("CPU", os.cpu_count() or 1)),
            "ray_cpus": int(cluster.get("CPU", os.cpu_count() or 1)), "logical_cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "gpu": torch.cuda.get_device_name(0) if cuda else "no GPU", "gpus": int(cluster.get("GPU", 0)),
            "python": platform.python_version()}


# --------------------------------------------------------------------------------------------------- probes


def raylet_pid() -> int | None:
    """This node's raylet: the Ray workers it starts carry its pid as RAY_RAYLET_PID, which tells them apart from
    other Ray instances' workers on the same machine (their parent is not always the raylet)."""
    import psutil
    import ray

    me = ray.get_runtime_context().get_node_id()
    socket = next((n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == me), None)
    for p in psutil.process_iter(["cmdline"]):
        if socket and f"--raylet_socket_name={socket}" in (p.info["cmdline"] or ()):
            return p.pid
    return None


def gpu_probe() -> Callable[[], list[tuple[float, float]]] | None:
    """A function giving (utilisation %, memory used MiB) for each GPU: NVML through pynvml, else nvidia-smi; None
    where there is no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if handles:
            return lambda: [(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                             pynvml.nvmlDeviceGetMemoryInfo(h).used / MIB) for h in handles]
    except Exception:  # no pynvml, or no NVIDIA driver (NVMLError): nvidia-smi may still answer
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def smi() -> list[tuple[float, float]]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return [(float(u), float(m)) for u, m in (line.split(",") for line in out.splitlines() if line.strip())]

    return smi


class Sampler:
    """Peak RSS of each Ray worker process this node runs for the ``with`` block, and the GPUs' utilisation, sampled
    every ``every`` seconds by a thread of the driver. Workers busy before the block (another run's actors) are left
    out, and so are workers that stayed idle; RSS counts the object-store pages a worker touched."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peak: dict[int, int] = {}  # pid → bytes
        self.names: dict[int, str] = {}  # pid → its last title other than NOT_WORKERS: what it was started for
        self.gpu: list[tuple[float, float]] = []
        self.samples = 0
        self._ours: dict[int, bool] = {}
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._raylet = raylet_pid()
        self._probe = gpu_probe()
        # workers busy before the stage began, as they were then; Ray hands an idle worker process on to the next
        # task or actor, so one that changes title has taken work of this stage and counts from then on
        self._before = {pid: title for pid, title, _ in self._scan() if title not in NOT_WORKERS}
        self._thread = threading.Thread(target=self._loop, name="benchmark-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> list[tuple[int, str, int]]:
        """(pid, title, RSS bytes) of this node's Ray worker processes."""
        import psutil

        out = []
        for p in psutil.process_iter(["cmdline"]):
            title = (p.info["cmdline"] or [""])[0]  # Ray sets a worker's whole command line to its title
            if not title.startswith("ray::"):
                continue
            try:
                if p.pid not in self._ours:
                    self._ours[p.pid] = p.environ().get("RAY_RAYLET_PID") == str(self._raylet)
                if self._ours[p.pid]:
                    out.append((p.pid, title, p.memory_info().rss))
            except psutil.Error:  # gone since listed, or not ours to read
                continue
        return out

    def _loop(self) -> None:
        while True:
            for pid, title, rss in self._scan():
                if self._before.get(pid) == title:
                    continue
                self._before.pop(pid, None)
                if title not in NOT_WORKERS:
                    self.names[pid] = re.sub(r"\.\w+$", "", title)  # an actor's title ends in the method it runs
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            if self._probe is not None:
                try:
                    self.gpu += self._probe()
                except Exception as e:  # a failing probe must not end the run it watches
                    log.warning("GPU sampling stopped: %s", e)
                    self._probe = None
            self.samples += 1
            if self._stop.wait(self.every):
                return

    def report(self) -> dict[str, Any]:
        workers = sorted(({"pid": pid, "name": name, "peak_rss_mib": round(self.peak[pid] / MIB, 1)}
                          for pid, name in self.names.items()), key=lambda w: -w["peak_rss_mib"])
        util = [u for u, _ in self.gpu]
        return {"peak_rss_mib": workers[0]["peak_rss_mib"] if workers else None,
                "peak_rss_mib_per_worker": workers, "samples": self.samples,
                "gpu_utilization_pct_mean": round(float(np.mean(util)), 1) if util else None,
                "gpu_utilization_pct_max": max(util) if util else None,
                "gpu_memory_used_mib_max": round(max(m for _, m in self.gpu)) if self.gpu else None}
