"""Test-side seams for the classifier's Ray Train loop: wrappers of ``kemo.classifier.train.train_loop`` that a test
installs with ``monkeypatch.setattr(train, "train_loop", ...)`` before ``fit``. Ray Train pickles the wrapper to its
worker processes (this module is importable there: Ray puts the driver's working directory on their path), where it
watches the worker's train share pass by (one pass an epoch) and then runs the real loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from kemo import storage
from kemo.classifier import train


class _Passes:
    """A Ray Data shard whose every pass (epoch n, 1-based) calls ``before(n)`` first and ``after(n, keys)`` once it
    is consumed (``keys``: the photos' order keys, in the order they came)."""

    def __init__(self, shard: Any, start: int, before: Callable[[int], None],
                 after: Callable[[int, list[int]], None]):
        self.shard, self.before, self.after, self.passes = shard, before, after, start

    def iter_torch_batches(self, **options: Any) -> Iterator[dict[str, Any]]:
        self.passes += 1
        n = self.passes
        self.before(n)
        keys: list[int] = []
        for batch in self.shard.iter_torch_batches(**options):
            keys.extend(batch["key"].tolist())
            yield batch
        self.after(n, keys)


def _start() -> int:
    """The epochs the run's latest checkpoint has done (0 without one): where the worker resumes."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, train.TRAIN_STATE), map_location="cpu", weights_only=True)["epoch"] + 1


def _watching(before: Callable[[int, int], None], after: Callable[[int, int, list[int]], None]
              ) -> Callable[[dict[str, Any]], None]:
    """A train loop whose train share calls ``before(epoch, rank)`` and ``after(epoch, rank, keys)`` (1-based)."""

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        real = ray.train.get_dataset_shard
        rank, start = ray.train.get_context().get_world_rank(), _start()

        def shard(name: str) -> Any:
            if name != "train":
                return real(name)
            return _Passes(real(name), start, lambda n: before(n, rank), lambda n, keys: after(n, rank, keys))

        ray.train.get_dataset_shard = shard
        try:
            train.train_loop(config)
        finally:
            ray.train.get_dataset_shard = real

    return loop


def traced(folder: str, hold: int | None = None) -> Callable[[dict[str, Any]], None]:
    """A train loop whose workers write ``epoch<k>-rank<r>.json`` (node id and the order keys of the photos trained
    on) into ``folder``. With ``hold``, each worker waits as epoch ``hold`` begins until it is stopped: a test that
    kills the run's node meanwhile knows that the run cannot have finished first."""

    def wait(epoch: int, rank: int) -> None:
        while epoch == hold:
            time.sleep(0.5)

    def write(epoch: int, rank: int, keys: list[int]) -> None:
        import ray

        storage.write_json(storage.join(folder, f"epoch{epoch}-rank{rank}.json"),
                           {"node": ray.get_runtime_context().get_node_id(), "keys": keys})

    return _watching(wait, write)


def failing_once(epoch: int, rank: int, marker: str) -> Callable[[dict[str, Any]], None]:
    """A train loop whose worker ``rank`` dies without warning as epoch ``epoch`` (0-based) begins, once: ``marker``
    (a file) records that it did."""

    def fail(n: int, r: int) -> None:
        if n - 1 == epoch and r == rank and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    return _watching(fail, lambda n, r, keys: None)
