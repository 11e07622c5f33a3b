"""The classifier registry: every model trains a step on CPU; K-EmotionNet's 54 weighted layers; initial weights."""

import pytest
import torch

from kemo.classifier import MODELS, create_model, kemotionnet, load_initial_weights, weighted_layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.rand(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_kemotionnet_has_54_weighted_layers_and_the_rule_counts_resnet18_as_18():
    assert weighted_layers(create_model("kemotionnet")) == 54  # 1 stem + 2 × (3 + 4 + 16 + 3) + 1 fc
    assert weighted_layers(create_model("resnet18")) == 18
    assert weighted_layers(create_model("vgg19")) == 19
    assert weighted_layers(kemotionnet(blocks=[2, 2, 2, 2])) == 18
    with pytest.raises(ValueError, match="four stages"):
        kemotionnet(blocks=[3, 4, 16])
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
