"""The classifier networks: every one trains a step on CPU; K-EmotionNet's 54 weighted layers and its stage layout."""

import pytest
import torch

from kemo.classifier.networks import kemotionnet, weighted_layers
from kemo.classifier.registry import MODELS, create_model


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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_network_is_torchvisions_weight_for_weight_under_the_same_seed(name):
    """kemo writes the networks out (importing torchvision costs every model-building process seconds): the same
    seed must give torchvision's weights under the same state-dict keys, and the same outputs."""
    import torchvision.models as tv
    from torchvision.models.resnet import BasicBlock, ResNet

    reference = {"kemotionnet": lambda: ResNet(BasicBlock, [3, 4, 16, 3], num_classes=7),
                 "resnet18": lambda: tv.resnet18(weights=None, num_classes=7),
                 "vgg19": lambda: tv.vgg19(weights=None, num_classes=7),
                 "vgg19_bn": lambda: tv.vgg19_bn(weights=None, num_classes=7)}[name]
    torch.manual_seed(3)
    ours = create_model(name, num_classes=7).eval()
    torch.manual_seed(3)
    theirs = reference().eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
