"""The labelling actor's lean path: checkpoints load into models built uninitialised (no random initialisation, no
second copy), torch's threads held to the actor's CPU share, and the benchmark's per-phase breakdown of the actor."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kemo.benchmark.label import ALL_STAGES, label_ceilings
from kemo.classifier.checkpoint import load_checkpoint, save_checkpoint
from kemo.classifier.registry import MODELS, create_model
from kemo.data import synth
from kemo.label import LabelConfig
from kemo.resources import Node, resolve_resources
from tests.photos import jpeg, scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_tensor_of_a_registered_model_is_in_its_state_dict(name):
    """A model built uninitialised takes its tensors from the state dict alone (assign): a buffer left out of it
    (non-persistent) would keep what its constructor made, a parameter its garbage."""
    with torch.device("meta"):
        model = create_model(name)
    held = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    assert held <= set(model.state_dict())


def test_a_loaded_checkpoint_is_the_saved_model_in_fp32(tmp_path):
    torch.manual_seed(0)
    model = create_model("kemotionnet", blocks=[1, 1, 1, 1]).eval()
    save_checkpoint(str(tmp_path / "fp32"), model, "kemotionnet", {"blocks": [1, 1, 1, 1]}, image_size=32)
    half = copy.deepcopy(model).half()
    save_checkpoint(str(tmp_path / "fp16"), half, "kemotionnet", {"blocks": [1, 1, 1, 1]}, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    for folder in ("fp32", "fp16"):
        loaded, _ = load_checkpoint(str(tmp_path / folder))
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert not loaded.training and not any(t.is_meta for t in tensors)
        assert {t.dtype for t in loaded.parameters()} == {torch.float32}  # as a copy into a built model holds them
        saved = (model if folder == "fp32" else half).state_dict()
        for k, a in loaded.state_dict().items():
            assert torch.equal(a, saved[k].to(a.dtype)), k
        if folder == "fp32":
            with torch.inference_mode():
                assert torch.equal(loaded(x), model(x))


def _checkpoint(path) -> str:
    torch.manual_seed(0)
    save_checkpoint(str(path), create_model("kemotionnet", blocks=[1, 1, 1, 1]), "kemotionnet",
                    {"blocks": [1, 1, 1, 1]}, image_size=32)
    return str(path)


def test_the_actor_holds_torch_to_its_cpu_share(tmp_path):
    """In a fresh process, as in a Ray worker: intra- and inter-op threads are the actor's decoders, not the node's
    cores."""
    cfg = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=_checkpoint(tmp_path / "c"),
                      detector="haar", decoders=1)
    code = ("import json, sys, torch; from kemo.label_photos import LabelPhotos; "
            "LabelPhotos(json.loads(sys.argv[1]), 1.0, None); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]


def test_the_label_ceilings_cover_every_phase_of_the_actor(tmp_path):
    rows = []
    for i in range(4):
        img = scene(320, 240)
        synth.draw_face(img, (100, 60, 200, 180), i, synth._person(i, 0), np.random.default_rng(i))
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg(img))
        rows.append({"uri": str(path)})
    cfg = LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=_checkpoint(tmp_path / "c"),
                      detector="haar", batch_size=2)
    threads = torch.get_num_threads()
    report = label_ceilings(rows, resolve_resources(cfg, [Node("node", 2, 0)]), {"CPU": 2})
    assert torch.get_num_threads() == threads  # restored for the plain loop
    ms, ceilings = report["ms_per_photo_one_core"], report["ceilings_photos_per_s"]
    assert list(ms) == ["read", "decode", "detect", "crop", "classifier input", "classify", "rows to Arrow"]
    assert all(v >= 0 for v in ms.values()) and report["on_gpu"] == []
    assert set(ceilings) == {*ms, ALL_STAGES}
    assert ceilings[ALL_STAGES] <= min(v for k, v in ceilings.items() if k != ALL_STAGES)
