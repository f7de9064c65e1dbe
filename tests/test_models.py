import importlib.resources

import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size,classes", [(3, 32, 10), (1, 16, 7)])
def test_every_registry_model_gives_logits_of_the_right_shape(name, channels, size, classes):
    model = build_model(name, num_classes=classes, in_channels=channels, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.rand(3, channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_general_wideresnet_name_and_width_multiplier():
    small = build_model("wideresnet-16-2", 10, 3, 0.5)
    full = build_model("wideresnet-16-2", 10, 3, 1.0)
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters()) / 3


def test_bad_model_arguments_are_user_errors():
    with pytest.raises(RobustEdgeError, match="valid models: .*mobilenetv2"):
        build_model("resnet19")
    with pytest.raises(RobustEdgeError, match="6n\\+4"):
        build_model("wideresnet-33-10")
    with pytest.raises(RobustEdgeError, match="num_classes"):
        build_model("resnet18", num_classes=1)


def test_resnet18_loads_pyautoattack_checkpoint_strictly_and_matches_reference_logits():
    from pyautoattack.examples.resnet import ResNet18

    path = importlib.resources.files("pyautoattack") / "examples" / "model_test.pt"
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    ours = build_model("resnet18")
    ours.load_state_dict(state, strict=True)
    reference = ResNet18()
    reference.load_state_dict(state, strict=True)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(x) - reference.eval()(x)).abs().max().item()
    assert diff < 1e-5


def test_community_parameter_names():
    wrn = build_model("wrn34_10", width=0.125).state_dict()
    # TRADES' model_cifar_wrn.pt layout, including the unused sub_block1
    for key in ("conv1.weight", "block1.layer.0.convShortcut.weight", "sub_block1.layer.4.conv2.weight",
                "block3.layer.4.bn2.running_var", "bn1.weight", "fc.bias"):
        assert key in wrn
    r56 = build_model("resnet56").state_dict()  # chenyaofo/pytorch-cifar-models layout
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer3.8.bn2.bias", "fc.weight"):
        assert key in r56
    assert sum(1 for k in r56 if k.endswith("conv1.weight")) == 1 + 27
    mnv2 = build_model("mobilenetv2").state_dict()  # kuangliu layout
    for key in ("layers.0.shortcut.0.weight", "layers.16.conv3.weight", "conv2.weight", "linear.weight"):
        assert key in mnv2
    assert mnv2["conv2.weight"].shape == (1280, 320, 1, 1)


def test_normalisation_lives_inside_the_model_but_not_in_its_state_dict():
    model = build_model("resnet20", normalization=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])).eval()
    plain = build_model("resnet20").eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - 0.5) / 0.25), atol=1e-5)
    assert not any("input_" in k for k in model.state_dict())
