"""kemo.resources: the automatic actor-pool knobs, filled from the cluster's resources."""

from __future__ import annotations

from kemo.preprocess import PreprocessConfig
from kemo.resources import resolve_resources


def cfg(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(input="i", output="o", **kwargs)


def test_cpu_only_cluster_one_decoder_per_actor_an_actor_per_cpu():
    r = resolve_resources(cfg(), {"CPU": 8})
    assert (r.gpus_per_actor, r.decoders, r.actors, r.batch_size, r.calls_per_actor) == (0.0, 1, 8, 16, 1)


def test_gpu_cluster_one_actor_per_gpu_with_its_share_of_decoders():
    r = resolve_resources(cfg(), {"CPU": 16, "GPU": 2})
    # 16 CPUs over 2 GPUs leave 8 a GPU: 7 decoders, one CPU spare for the rest of the node
    assert (r.gpus_per_actor, r.decoders, r.actors, r.batch_size, r.calls_per_actor) == (1.0, 7, 2, 64, 2)
    assert resolve_resources(cfg(), {"CPU": 64, "GPU": 1}).decoders == 8  # never more than 8 a GPU


def test_given_values_are_kept():
    r = resolve_resources(cfg(decoders=3, actors=5, batch_size=7, gpus_per_actor=0.5, calls_per_actor=4),
                          {"CPU": 16, "GPU": 2})
    assert (r.gpus_per_actor, r.decoders, r.actors, r.batch_size, r.calls_per_actor) == (0.5, 3, 5, 7, 4)
    assert resolve_resources(cfg(gpus_per_actor=0), {"CPU": 4, "GPU": 1}).actors == 4  # CPU actors on a GPU cluster
