"""cluster.yaml: valid by Ray 2.60's own cluster-config validation (no AWS calls), and linted for the safety rules
of DESIGN §7–8 and issue 7 — each lint rule shown to fire on a config that breaks it."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shlex
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
RAY_PORTS = (22, 6379, 8265, 10001)  # SSH, GCS, dashboard + job server, Ray client
WORLD = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
# Instance families with NVIDIA GPUs, and the GPU count of the sizes we suggest (others: family check only).
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en")
GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4, "g5.24xlarge": 4,
        "g5.48xlarge": 8, "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1, "g6.12xlarge": 4,
        "g6.24xlarge": 4, "g6.48xlarge": 8, "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.12xlarge": 4}
# Credentials as literal text: AWS access key ids, names of secret fields, an inline Ray token, a bare 64-hex token.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret/session field": re.compile(r"(?i)aws_?(secret_access_key|access_key_id|session_token)"),
    "inline Ray token": re.compile(r"RAY_AUTH_TOKEN(?!_PATH)"),
    "64-hex token": re.compile(r"\b[0-9a-f]{64}\b"),
}


def load() -> tuple[dict[str, Any], str]:
    with open(CLUSTER_YAML, encoding="utf-8") as f:
        text = f.read()
    return yaml.safe_load(text), text


def docker_env(options: list[str]) -> dict[str, str]:
    """The ``--env K=V`` / ``-e K=V`` assignments of docker run options."""
    env, words = {}, [w for opt in options for w in shlex.split(opt)]
    for i, w in enumerate(words):
        value = None
        if w in ("--env", "-e") and i + 1 < len(words):
            value = words[i + 1]
        elif w.startswith("--env="):
            value = w[len("--env="):]
        if value and "=" in value:
            k, v = value.split("=", 1)
            env[k] = v
    return env


def _permissions(node: Any):
    """Every dict that looks like an EC2 IpPermission, wherever it sits in the config."""
    if isinstance(node, dict):
        if "IpRanges" in node or "Ipv6Ranges" in node:
            yield node
        for v in node.values():
            yield from _permissions(v)
    elif isinstance(node, list):
        for v in node:
            yield from _permissions(v)


def _opens_to_world(perm: dict[str, Any]) -> list[int]:
    cidrs = [r.get("CidrIp") for r in perm.get("IpRanges", [])] + \
            [r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])]
    if not any(c and any(ipaddress.ip_network(c, strict=False).prefixlen == 0 and
                         ipaddress.ip_network(c, strict=False).version == w.version for w in WORLD) for c in cidrs):
        return []
    if str(perm.get("IpProtocol", "")) == "-1":
        return list(RAY_PORTS)
    lo, hi = int(perm.get("FromPort", -1)), int(perm.get("ToPort", -1))
    return [p for p in RAY_PORTS if lo <= p <= hi]


def lint(config: dict[str, Any], text: str | None = None) -> list[str]:
    """Problems found, each as ``rule: detail``; empty when the config keeps every rule."""
    text = yaml.safe_dump(config, allow_unicode=True) if text is None else text
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        return [f"head: head_node_type {head!r} is not a node type"]

    res = types[head].get("resources", {})
    if res.get("CPU", None) != 0 or res.get("GPU", 0) != 0:
        problems.append(f"head-no-work: head type {head} must declare resources CPU 0 (and no GPU), has {res}")
    if config.get("min_workers", 0):
        problems.append("min-workers: global min_workers must be 0")

    for name, nt in types.items():
        nc = nt.get("node_config", {})
        profile = nc.get("IamInstanceProfile") or {}
        if not (profile.get("Arn") or profile.get("Name")):
            problems.append(f"instance-profile: node type {name} has no IamInstanceProfile")
        meta = nc.get("MetadataOptions") or {}
        if meta.get("HttpTokens") != "required" or int(meta.get("HttpPutResponseHopLimit", 1)) < 2 \
                or meta.get("HttpEndpoint", "enabled") != "enabled":
            problems.append(f"imdsv2: node type {name} must require IMDSv2 tokens with hop limit >= 2, has {meta}")
        if not nc.get("SecurityGroupIds"):
            problems.append(f"security-group: node type {name} has no SecurityGroupIds, so Ray would create its "
                            "default group, which opens SSH to 0.0.0.0/0")
        if name == head:
            continue
        if nt.get("min_workers", 0) != 0:
            problems.append(f"min-workers: node type {name} must scale from zero, has min_workers "
                            f"{nt.get('min_workers')}")
        itype = str(nc.get("InstanceType", ""))
        gpus = nt.get("resources", {}).get("GPU", 0)
        if itype.split(".")[0] not in GPU_FAMILIES:
            problems.append(f"gpu-worker: worker type {name} has instance type {itype!r}, not a GPU instance")
        if gpus < 1 or (itype in GPUS and GPUS[itype] != gpus):
            problems.append(f"gpu-worker: worker type {name} declares GPU {gpus} for {itype} "
                            f"({GPUS.get(itype, '?')} GPUs)")
    worker_gpus = [t.get("resources", {}).get("GPU", 0) for n, t in types.items() if n != head]
    if 1 not in worker_gpus or not any(g >= 2 for g in worker_gpus):
        problems.append(f"gpu-worker: need a 1-GPU type (preprocess, label) and a multi-GPU type (train), "
                        f"have {worker_gpus}")

    for perm in _permissions(config):
        ports = _opens_to_world(perm)
        if ports:
            problems.append(f"open-ingress: {perm} opens {ports} to the internet")

    docker = config.get("docker") or {}
    images = [docker.get("image"), docker.get("head_image"), docker.get("worker_image")] + \
             [(t.get("docker") or {}).get("worker_image") for t in types.values()]
    if docker.get("image") != IMAGE or any(i not in (None, IMAGE) for i in images):
        problems.append(f"image: every node must run {IMAGE}, config names {[i for i in images if i]}")

    env = docker_env(docker.get("run_options", []))
    for k, v in {"RAY_AUTH_MODE": "token", "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False"}.items():
        if env.get(k) != v:
            problems.append(f"env: docker.run_options must set {k}={v} in every container, sets {env.get(k)!r}")
    overrides = [docker.get("head_run_options", []), docker.get("worker_run_options", [])] + \
                [(t.get("docker") or {}).get("worker_run_options", []) for t in types.values()]
    for opts in overrides:
        for k, v in docker_env(opts).items():
            if k in ("RAY_AUTH_MODE", "YOLO_OFFLINE", "YOLO_AUTOINSTALL") and v != env.get(k):
                problems.append(f"env: per-node run options override {k}={v}")
    if re.search(r"RAY_AUTH_MODE=(?!token\b)", text):
        problems.append("env: RAY_AUTH_MODE is set to something other than token")
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    mounts = config.get("file_mounts") or {}
    mount = next((r for r in mounts if token_path.startswith(r.rstrip("/") + "/")), None)
    if mount is None:
        problems.append(f"token: RAY_AUTH_TOKEN_PATH {token_path!r} is not inside a file_mounts directory")
    elif not str(mounts[mount]).startswith(("~", "/")):
        problems.append(f"token: the token comes from {mounts[mount]!r}, a path in the checkout; keep it outside")

    if "aws_credentials" in (config.get("provider") or {}):
        problems.append("credentials: provider.aws_credentials embeds AWS keys; use instance profiles")
    for what, pattern in SECRET_PATTERNS.items():
        m = pattern.search(text)
        if m:
            problems.append(f"credentials: {what} in the file: {m.group(0)[:8]}…")
    return problems


def test_ray_validates_cluster_yaml():
    """What `ray up` runs before it talks to AWS: prepare_config (merge Ray's AWS defaults.yaml, docker checks,
    per-type worker bounds) then validate_config (ray-schema.json and the cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config, _ = load()
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(unknown_top_level_key=1),
    lambda c: c["available_node_types"]["gpu"].update(min_worker=0),  # a typo of min_workers
    lambda c: c.update(head_node_type="nope"),
    lambda c: c["docker"].update(run_option=["--env A=1"]),
], ids=["unknown-key", "typo-in-node-type", "missing-head-type", "typo-in-docker"])
def test_ray_validation_can_fail(mutate):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config, _ = load()
    mutate(config)
    with pytest.raises(Exception):  # noqa: B017 — jsonschema.ValidationError or ValueError, as `ray up` raises
        validate_config(prepare_config(config))


def test_cluster_yaml_keeps_every_rule():
    config, text = load()
    assert lint(config, text) == []
    assert lint(config) == []  # the re-dumped form the mutations below are linted in


def _drop_profile(c):
    del c["available_node_types"]["gpu4"]["node_config"]["IamInstanceProfile"]


def _open(port_from, port_to, proto="tcp", v6=False):
    rng = {"Ipv6Ranges": [{"CidrIpv6": "::/0"}]} if v6 else {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    return lambda c: c["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(
        {"FromPort": port_from, "ToPort": port_to, "IpProtocol": proto, **rng})


def _env(option):
    return lambda c: c["docker"]["run_options"].append(option)


def _set(path, value):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


FAKE_KEY_ID = "AKIA" + "EXAMPLEEXAMPLE12"  # built here so that secret scanners do not flag this file
FAKE_SECRET = "x" * 40
BROKEN = {
    "head-schedules-work": (_set(["available_node_types", "head", "resources"], {}), "head-no-work"),
    "head-has-cpus": (_set(["available_node_types", "head", "resources"], {"CPU": 4}), "head-no-work"),
    "no-instance-profile": (_drop_profile, "instance-profile"),
    "empty-instance-profile": (_set(["available_node_types", "head", "node_config", "IamInstanceProfile"], {}),
                               "instance-profile"),
    "imdsv1-allowed": (_set(["available_node_types", "gpu", "node_config", "MetadataOptions", "HttpTokens"],
                            "optional"), "imdsv2"),
    "hop-limit-1": (_set(["available_node_types", "head", "node_config", "MetadataOptions",
                          "HttpPutResponseHopLimit"], 1), "imdsv2"),
    "no-metadata-options": (_delete(["available_node_types", "gpu4", "node_config", "MetadataOptions"]), "imdsv2"),
    "ray-default-security-group": (_delete(["available_node_types", "gpu", "node_config", "SecurityGroupIds"]),
                                   "security-group"),
    "gcs-to-world": (_open(6379, 6379), "open-ingress"),
    "dashboard-to-world-v6": (_open(8265, 8265, v6=True), "open-ingress"),
    "client-port-in-range": (_open(10000, 10010), "open-ingress"),
    "ssh-to-world": (_open(22, 22), "open-ingress"),
    "all-traffic-to-world": (_open(-1, -1, proto="-1"), "open-ingress"),
    "worker-min-1": (_set(["available_node_types", "gpu", "min_workers"], 1), "min-workers"),
    "global-min-workers": (_set(["min_workers"], 2), "min-workers"),
    "cpu-worker": (_set(["available_node_types", "gpu", "node_config", "InstanceType"], "m5.2xlarge"), "gpu-worker"),
    "gpu-count-of-another-size": (_set(["available_node_types", "gpu4", "node_config", "InstanceType"],
                                       "g5.2xlarge"), "gpu-worker"),
    "gpu-not-declared": (_set(["available_node_types", "gpu", "resources"], {}), "gpu-worker"),
    "no-multi-gpu-type": (_delete(["available_node_types", "gpu4"]), "gpu-worker"),
    "unpinned-image": (_set(["docker", "image"], "rayproject/ray:latest-gpu"), "image"),
    "other-worker-image": (_set(["docker", "worker_image"], "rayproject/ray:2.59.0-py311-gpu"), "image"),
    "no-token-auth": (_set(["docker", "run_options"], ["--ulimit nofile=65536:65536"]), "env"),
    "auth-disabled-for-workers": (_set(["docker", "worker_run_options"], ["--env RAY_AUTH_MODE=disabled"]), "env"),
    "yolo-online": (_set(["docker", "run_options"], [o for o in load()[0]["docker"]["run_options"]
                                                     if "YOLO_OFFLINE" not in o]), "env"),
    "token-not-mounted": (_set(["file_mounts"], {}), "token"),
    "token-in-checkout": (_set(["file_mounts", "/home/ray/.kemo-ray-auth"], "./auth"), "token"),
    "aws-credentials-in-provider": (_set(["provider", "aws_credentials"], {"region_name": "us-west-2"}),
                                    "credentials"),
    "access-key-in-env": (_env(f"--env AWS_ACCESS_KEY_ID={FAKE_KEY_ID}"), "credentials"),
    "secret-in-env": (_env(f"--env AWS_SECRET_ACCESS_KEY={FAKE_SECRET}"), "credentials"),
    "inline-ray-token": (_env("--env RAY_AUTH_TOKEN=" + "ab" * 32), "credentials"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_rule_fires(case):
    mutate, rule = BROKEN[case]
    config, _ = load()
    mutate(config)
    problems = lint(config)
    assert any(p.startswith(rule + ":") for p in problems), problems


@pytest.mark.parametrize("mutate", [
    _env("--shm-size=10.24gb"),
    lambda c: c["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}),
    lambda c: c["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(
        {"FromPort": 443, "ToPort": 443, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
    _set(["available_node_types", "gpu", "node_config", "InstanceType"], "g6.2xlarge"),
], ids=["other-docker-option", "ssh-from-one-address", "https-to-world", "g6-instead-of-g5"])
def test_rules_allow_safe_changes(mutate):
    config, _ = load()
    mutate(config)
    assert lint(config) == []


def test_a_secret_in_a_comment_is_found():
    config, text = load()
    assert lint(config, text + f"\n# aws_secret_access_key = {FAKE_SECRET}\n")
    assert lint(config, text + f"\n# {FAKE_KEY_ID}\n")


def test_setup_installs_exactly_the_pinned_dependencies():
    """The nodes install pyproject.toml's [project].dependencies, no more, no fewer, with the same specifiers."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pinned = tomllib.load(f)["project"]["dependencies"]
    config, _ = load()
    installs = [shlex.split(c) for c in config["setup_commands"] if c.split()[:2] == ["pip", "install"]]
    assert len(installs) == 1, config["setup_commands"]
    requested = [w for w in installs[0][2:] if not w.startswith("-")]

    def key(spec: str):
        r = Requirement(spec)
        return canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier), str(r.marker or "")

    assert sorted(map(key, requested)) == sorted(map(key, pinned))
    # opencv-python-headless would share cv2 with opencv-python; it must be removed before, not after, the install
    steps = [" ".join(c.split()[:2]) for c in config["setup_commands"]]
    assert "pip uninstall" in steps and steps.index("pip uninstall") < steps.index("pip install")


def test_every_placeholder_is_listed_in_the_edit_section():
    """A user edits what the header lists; every <PLACEHOLDER> in a value must be there, and vice versa."""
    config, text = load()
    values = set(re.findall(r"<([A-Z_]+)>", yaml.safe_dump(config)))
    header = text.split("\n\n", 1)[0]
    edit = header[header.index("# EDIT"):].split("#\n", 1)[0]
    listed = set(re.findall(r"^#\s+<([A-Z_]+)>", edit, flags=re.M))
    assert values and values == listed, (values, listed)
