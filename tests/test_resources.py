"""kemo.resources: the automatic actor-pool knobs, filled from the nodes that will run the actors, and the refusal of
a request that no node can hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kemo.preprocess import PreprocessConfig
from kemo.resources import Node, _bootstrap_node_types, resolve_resources


def cfg(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(input="i", output="o", **kwargs)


def knobs(r: PreprocessConfig) -> tuple:
    return r.gpus_per_actor, r.decoders, r.actors, r.batch_size, r.calls_per_actor


def test_cpu_only_cluster_one_decoder_per_actor_an_actor_per_cpu():
    assert knobs(resolve_resources(cfg(), [Node("a", 8, 0)])) == (0.0, 1, 8, 16, 1)
    assert knobs(resolve_resources(cfg(), [Node("head", 0, 0), Node("w1", 2, 0), Node("w2", 4, 0)]))[2] == 6


def test_gpu_nodes_one_actor_per_gpu_with_its_own_nodes_share_of_decoders():
    # two nodes of 8 CPUs and a GPU: 7 decoders each, one CPU spare on each node for the rest
    assert knobs(resolve_resources(cfg(), [Node("a", 8, 1), Node("b", 8, 1)])) == (1.0, 7, 2, 64, 2)
    assert resolve_resources(cfg(), [Node("a", 64, 1)]).decoders == 8  # never more than 8 a GPU
    # a head of 8 CPUs beside a g5.xlarge (4 CPUs, 1 GPU): the GPU node's share, 3, not the cluster's 11
    assert knobs(resolve_resources(cfg(), [Node("head", 8, 0), Node("g5", 4, 1)]))[:3] == (1.0, 3, 1)
    # the smallest GPU node decides: 4-GPU node of 48 CPUs (11 each) and a 1-GPU node of 4 (3)
    assert resolve_resources(cfg(), [Node("g5.12x", 48, 4), Node("g5.x", 4, 1)]).decoders == 3


def test_a_mixed_cluster_with_a_small_gpu_node_gets_a_request_it_can_place():
    """A 2-CPU node without a GPU and a 1-CPU node with one: the old cluster-wide rule asked {CPU: 2, GPU: 1}."""
    r = resolve_resources(cfg(), [Node("cpu", 2, 0), Node("gpu", 1, 1)])
    assert knobs(r)[:3] == (1.0, 1, 1)


def test_a_request_no_node_can_hold_is_refused_with_the_request_and_the_nodes():
    nodes = [Node("10.0.0.1", 2, 0), Node("10.0.0.2", 1, 1)]
    with pytest.raises(ValueError) as e:
        resolve_resources(cfg(decoders=2), nodes)
    assert "2 CPU and 1 GPU" in str(e.value) and "10.0.0.1 (2 CPU, 0 GPU); 10.0.0.2 (1 CPU, 1 GPU)" in str(e.value)
    with pytest.raises(ValueError, match="0.5 GPU"):
        resolve_resources(cfg(gpus_per_actor=0.5, decoders=3), nodes)
    # a node type the autoscaler can start counts: the request waits for it, as it should
    r = resolve_resources(cfg(decoders=2), [*nodes, Node("node type gpu", 8, 1, launchable=True)])
    assert (r.decoders, r.actors) == (2, 1)


def test_an_autoscaling_cluster_with_no_gpu_node_up_yet_sizes_actors_for_its_gpu_node_type():
    r = resolve_resources(cfg(), [Node("head", 0, 0), Node("node type gpu", 8, 1, launchable=True)])
    assert knobs(r)[:3] == (1.0, 7, 1)
    # a node type whose CPUs the config does not say: one decoder, placeable, whatever the order of the nodes
    unknown = Node("node type gpu", float("inf"), 1, launchable=True)
    for nodes in ([Node("head", 4, 0), unknown], [unknown, Node("head", 4, 0)]):
        assert knobs(resolve_resources(cfg(), nodes))[:2] == (1.0, 1)
    assert resolve_resources(cfg(), [unknown, Node("g5", 4, 1)]).decoders == 3  # the known one decides


def test_a_gpu_node_without_cpus_runs_no_actor_and_does_not_turn_gpu_actors_on():
    r = resolve_resources(cfg(), [Node("gpu head", 0, 1), Node("w", 4, 0)])
    assert knobs(r)[:3] == (0.0, 1, 4)


def test_cluster_nodes_lists_the_alive_nodes_and_ray_ups_node_types(ray_local, tmp_path, monkeypatch):
    from kemo import resources

    monkeypatch.setattr(resources, "BOOTSTRAP_CONFIG", str(tmp_path / "absent.json"))
    assert resources.cluster_nodes() == [Node(resources.cluster_nodes()[0].name, 2, 0)]  # ray_local: 2 CPUs
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps({"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0}, "gpu": {"resources": {"GPU": 1, "CPU": 8},
                                                                     "max_workers": 8}}}))
    monkeypatch.setattr(resources, "BOOTSTRAP_CONFIG", str(path))
    assert resources.cluster_nodes()[1:] == [Node("node type gpu", 8, 1, True)]
    assert resources.connect() == resources.cluster_nodes()  # connected already: the same Ray, not a new one


def test_given_values_are_kept():
    r = resolve_resources(cfg(decoders=3, actors=5, batch_size=7, gpus_per_actor=0.5, calls_per_actor=4),
                          [Node("a", 8, 1), Node("b", 8, 1)])
    assert knobs(r) == (0.5, 3, 5, 7, 4)
    assert resolve_resources(cfg(gpus_per_actor=0), [Node("a", 4, 1)]).actors == 4  # CPU actors on a GPU cluster


def test_the_node_types_of_a_ray_up_head(tmp_path):
    """What `ray up` leaves on the head (JSON, CPUs filled in from the instance types), as cluster.yaml shapes it."""
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps({"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "gpu": {"resources": {"GPU": 1, "CPU": 8}, "max_workers": 8},
        "gpu4": {"resources": {"GPU": 4}, "max_workers": 2},
        "off": {"resources": {"CPU": 4}, "max_workers": 0}}}))
    assert _bootstrap_node_types(str(path)) == [Node("node type gpu", 8, 1, True),
                                                Node("node type gpu4", float("inf"), 4, True)]
    assert _bootstrap_node_types(str(tmp_path / "none.yaml")) == []


def test_local_paths_are_refused_where_work_on_other_nodes_would_need_them():
    from kemo.resources import check_shared

    check_shared({"--output": "/data/out"}, 1, "x")  # one node: its disk is everyone's
    check_shared({"--output": "s3://b/out", "--weights": None}, 3, "x")
    with pytest.raises(ValueError, match=r"--input /data/in is a local path but the cluster has 2 nodes .*: actors on "
                                         r"other nodes cannot read it; give an s3:// URI"):
        check_shared({"--output": "s3://b/out", "--input": "/data/in"}, 2, "actors on other nodes cannot read it")


def test_an_embedded_ray_that_misses_its_start_deadline_is_tried_again_then_refused_in_one_line(monkeypatch):
    """On a loaded machine an embedded node may time out during start-up: tried again, and after the last try a
    one-line Stopped (what jobs print), not Ray's traceback; a configuration error is not retried."""
    import ray

    from kemo import resources
    from kemo.config import Stopped

    tries, started = [], []
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "restored after the test")  # an embedded start names its own
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(resources, "cluster_nodes", lambda: ["node"])

    def init(failures: int, error: Exception):
        def fake(**options: object) -> None:  # embedded_options(): an embedded start's dashboard, named
            tries.append(1)
            if len(tries) <= failures:
                raise error
            started.append(1)
        return fake

    monkeypatch.setattr(ray, "init", init(2, RuntimeError("The current node timed out during startup.")))
    assert resources.connect() == ["node"] and len(tries) == 3
    tries.clear()
    started.clear()
    monkeypatch.setattr(ray, "init", init(5, RuntimeError("The current node timed out during startup.\nmore")))
    with pytest.raises(Stopped, match=r"^Ray did not start \(3 tries\): The current node timed out during startup.; "):
        resources.connect()
    tries.clear()
    monkeypatch.setattr(ray, "init", init(5, ValueError("bad address")))
    with pytest.raises(Stopped, match=r"\(1 tries\): bad address"):
        resources.connect()
    assert len(tries) == 1


def test_an_embedded_start_is_planned_whole_and_keeps_a_niceness_the_user_chose(monkeypatch):
    """Starting: a new local instance (``address="local"``, even if a cluster appears before ``ray.init``), its own
    dashboard port named for the state API, workers at the job's priority unless the user exported
    ``RAY_worker_niceness``; joining a cluster: no options at all (Ray refuses ``_system_config`` there)."""
    import ray._private.services as services

    from kemo.resources import embedded_options

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "restored after the test")
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr: None)
    options = embedded_options(dashboard=False)
    assert options["address"] == "local" and options["include_dashboard"] is False
    assert options["_system_config"] == {"worker_niceness": 0}
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{options['dashboard_port']}"
    monkeypatch.setenv("RAY_worker_niceness", "19")
    assert "_system_config" not in embedded_options(dashboard=True)
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr: "127.0.0.1:6379")
    assert embedded_options(dashboard=True) == {}


BESIDE_ANOTHER = """
import os
os.nice(3)  # the job runs below the test's priority; its Ray's workers must follow it, not add Ray's 15

import ray
from kemo.resources import connect

connect()

@ray.remote
class Probe:
    def ping(self):
        return 1

@ray.remote
def state_of(actor_id):  # what Ray Train's PlacementGroupCleaner asks, once a second, from a worker
    from ray.util.state import get_actor
    return get_actor(actor_id, timeout=30).state

@ray.remote
def niceness():
    import os
    return os.nice(0)

probe = Probe.remote()
ray.get(probe.ping.remote())
print("STATE", ray.get(state_of.remote(probe._actor_id.hex())))
print("NICE", os.nice(0), ray.get(niceness.remote()), ray.get(probe.__ray_call__.remote(lambda _: os.nice(0))))
"""


@pytest.mark.slow
def test_an_embedded_ray_beside_another_asks_its_own_state_api_and_works_at_the_jobs_priority(ray_local):
    """Two kemo jobs on one machine: with ray_local running, a job's embedded Ray answers a worker's state query
    about its own actor (Ray alone raises "Found multiple active Ray instances", or asks the other instance, whose
    answer "no such actor" makes the cleaner remove a live run's placement group). Its tasks and actors run at the
    job's own niceness (the test's + 3), not 15 more, which starved them beside other work."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_worker_niceness")}
    proc = subprocess.run([sys.executable, "-c", BESIDE_ANOTHER], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STATE ALIVE" in proc.stdout
    job, task, actor = map(int, proc.stdout.split("NICE ")[1].split())
    assert "multiple active Ray instances" not in proc.stdout + proc.stderr
    assert job == min(19, os.nice(0) + 3) and task == job and actor == job
    if job == 19:  # Linux's floor: Ray's 15 more would read the same
        pytest.skip("the test runs at nice 16 or above, where the job's workers cannot be told from Ray's default")
