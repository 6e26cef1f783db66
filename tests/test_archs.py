"""archs: every registered model gives logits and its feature vector, on grey and colour inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import archs
from archs import ARCHS, build_model

# docs/design.md section 3; an arch missing here still gets every generic check below.
FEATURE_DIMS = {"lenet5": 120, "lenet5_half": 60, "resnet18": 512, "mlp": 256}
BATCH = 2


def batch(channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_features_and_backward(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=5)
    x = batch(in_channels)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        both = model(x, return_features=True)
    assert logits.shape == (BATCH, 5)
    assert isinstance(both, tuple) and len(both) == 2
    logits2, features = both
    assert isinstance(model.feature_dim, int)
    if name in FEATURE_DIMS:
        assert model.feature_dim == FEATURE_DIMS[name]
    assert features.shape == (BATCH, model.feature_dim)
    assert torch.equal(logits2, logits)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()

    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 4]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(ARCHS))
def test_defaults_build(name):
    model = build_model(name)
    # an MLP's first weight has one column per pixel, so it says its channels itself
    channels = getattr(model, "in_channels", None) or \
        model.state_dict()[next(k for k in model.state_dict() if k.endswith("weight"))].shape[1]
    with torch.no_grad():
        assert model.eval()(batch(channels)).shape == (BATCH, 10)


@pytest.mark.parametrize("name", ["lenet5", "lenet5_half"])
def test_lenet_features_feed_the_head(name):
    model = build_model(name, in_channels=1, num_classes=5).eval()
    with torch.no_grad():
        logits, features = model(batch(1), return_features=True)
        assert torch.equal(model.head(features), logits)
    assert (features >= 0).all()  # the feature is taken after the ReLU


def test_resnet_features_feed_the_classifier():
    model = build_model("resnet18", in_channels=3, num_classes=5).eval()
    with torch.no_grad():
        logits, features = model(batch(3), return_features=True)
        assert torch.allclose(model.fc(features), logits)


def layer_shapes(model: nn.Module) -> tuple[list, list]:
    convs = [(m.in_channels, m.out_channels, m.kernel_size) for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    return convs, linears


def test_lenet5_layers():
    convs, linears = layer_shapes(build_model("lenet5", in_channels=1, num_classes=10))
    assert convs == [(1, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))]
    assert linears == [(120, 84), (84, 10)]
    assert sum(p.numel() for p in build_model("lenet5").parameters()) == 61706  # the classic LeNet-5 count


def test_lenet5_half_layers():
    convs, linears = layer_shapes(build_model("lenet5_half", in_channels=3, num_classes=5))
    assert convs == [(3, 3, (5, 5)), (3, 8, (5, 5)), (8, 60, (5, 5))]
    assert linears == [(60, 42), (42, 5)]


def test_resnet18_layers():
    model = build_model("resnet18", in_channels=1, num_classes=7)
    convs, linears = layer_shapes(model)
    assert convs[0] == (1, 64, (3, 3))  # CIFAR stem: 3x3, no max-pool
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert len([c for c in convs if c[2] == (3, 3)]) == 17  # stem + 8 blocks x 2
    assert linears == [(512, 7)]


def test_mlp_layers():
    convs, linears = layer_shapes(build_model("mlp"))
    assert convs == [] and linears == [(784, 256), (256, 10)]  # 32x32 padded MNIST, cropped back to 28x28
    _, linears = layer_shapes(build_model("mlp", in_channels=3, num_classes=5, widths=[400, 200], crop=0))
    assert linears == [(3 * 32 * 32, 400), (400, 200), (200, 5)]


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError) as err:
        build_model("vgg16")
    assert "'vgg16'" in str(err.value)
    for name in ARCHS:
        assert name in str(err.value)


def test_bad_arch_arguments():
    with pytest.raises(ValueError, match="lenet5"):
        build_model("lenet5", in_channels=1, hidden=3)


def test_registry_is_the_public_one():
    assert archs.ARCHS is ARCHS and {"lenet5", "lenet5_half", "resnet18"} <= set(ARCHS)


@pytest.mark.parametrize("depth,blocks", [(18, 8), (34, 16)])
@pytest.mark.parametrize("width,channels", [(1, [64, 128, 256, 512]), (0.125, [8, 16, 32, 64])])
def test_resnet_family_depths_and_widths(depth, blocks, width, channels):
    model = build_model("resnet", in_channels=3, num_classes=5, depth=depth, width=width)
    assert len(model.blocks) == blocks and model.stage_widths == channels and model.feature_dim == channels[-1]
    assert [b.conv2.out_channels for b in model.blocks if b.projection is not None] == channels[1:]
    with torch.no_grad():
        logits, features = model.eval()(batch(3), return_features=True)
    assert logits.shape == (BATCH, 5) and torch.allclose(model.fc(features), logits)


@pytest.mark.parametrize("batch_norm,bias", [(True, False), (False, False), (False, True), (True, True)])
def test_resnet_norms_and_biases(batch_norm, bias):
    model = build_model("resnet", depth=18, width=0.125, batch_norm=batch_norm, bias=bias)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batch_norm
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == bias for c in convs)


def test_resnet18_keeps_its_checkpoint_names():
    # the routing experts' checkpoints name body.N and fc: the family's default is the same network
    assert list(build_model("resnet18").state_dict()) == list(build_model("resnet").state_dict())


def test_resnet_bad_width_and_depth():
    with pytest.raises(ValueError, match="width"):
        build_model("resnet", width=0.3)
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet", depth=50)
