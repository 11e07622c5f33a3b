"""Model creation by name: unknown names refused; a user's initial weights copied where names and shapes match."""

import pytest
import torch

from kemo.classifier.registry import create_model, load_initial_weights


def test_an_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_initial_weights_copy_what_matches_and_skip_another_head(tmp_path):
    source = create_model("resnet18", num_classes=1000)  # like an ImageNet file a user has
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model("resnet18", num_classes=7)
    got = load_initial_weights(model, str(path))
    assert got["skipped"] == ["fc.bias", "fc.weight"] and got["missing"] == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.weight.shape == (7, 512)
    deeper = create_model("kemotionnet")
    partial = load_initial_weights(deeper, str(path))  # ResNet18's tensors cover only part of K-EmotionNet
    assert len(partial["missing"]) > len(partial["loaded"]) > 0
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_initial_weights(model, str(tmp_path / "other.pt"))
