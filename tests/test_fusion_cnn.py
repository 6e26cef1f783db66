"""fusion/ on convolutional networks: self-fusion gives the same function, permuted channels are found again (across
the flatten too), identity convolutions keep the function, CLAFusion respects resolutions, conductance adds up."""
from __future__ import annotations

import copy

import pytest
import torch

from archs import build_model
from archs.lenet import LeNet5
from archs.vgg import VGG, parse_layers
from fusion import (clafusion, conductance_importance, hungarian_fusion, insert_identity_layers, kf_gradient, kf_linear,
                    layer_cost_matrix, otfusion, stages, vanilla_avg)
from fusion.levels import levels_of, pre_acts, weighted_modules
from fusion.cross_layer import identity_level
from fusion.interpolation import sample_conductance

IMG = 8
CLASSES = 3
TIGHT = dict(rtol=0, atol=1e-9)  # parents are float64, so the fused networks are float64 too


def make_vgg(layers=(4, "M", 6, "M"), hidden=(5,), seed: int = 0, bias: bool = True) -> VGG:
    torch.manual_seed(seed)
    return VGG(2, CLASSES, layers, hidden, bias=bias, img_size=IMG).double().eval()


def make_lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(1, CLASSES, half=True).double().eval()


def images(n: int, channels: int = 2, side: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-12) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=0, atol=atol) for k in sa)


def permute_channels(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same function with every hidden level's channels (or neurons) shuffled: its rows, and the next level's
    input channels; a Linear after the flatten moves each channel's block of positions."""
    permuted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    modules = weighted_modules(permuted)
    with torch.no_grad():
        for layer, nxt in zip(modules[:-1], modules[1:]):
            perm = torch.randperm(layer.weight.shape[0], generator=generator)
            layer.weight.copy_(layer.weight[perm])
            layer.bias.copy_(layer.bias[perm])
            if isinstance(nxt, torch.nn.Linear) and isinstance(layer, torch.nn.Conv2d):
                positions = nxt.weight.shape[1] // len(perm)
                nxt.weight.copy_(nxt.weight.view(len(nxt.weight), len(perm), positions)[:, perm].flatten(1))
            else:
                nxt.weight.copy_(nxt.weight[:, perm])
    return permuted


# ---------------------------------------------------------------- the VGG

def test_vgg_shapes_registry_and_bad_layers():
    model = build_model("vgg", in_channels=3, num_classes=10, layers=[8, "M", 16, 16, "M"], hidden=[32, 20])
    logits, features = model(torch.randn(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and features.shape == (2, 20) and model.feature_dim == 20
    assert model.positions == 64 and model.linears[0].in_features == 16 * 64
    assert parse_layers([8, "M", 16, 16, "M"]) == ([8, 16, 16], [True, False, True])
    for bad, why in [([], "at least one"), (["M", 8], "must follow"), ([8, "M", "M"], "must follow"),
                     ([8, 0], "neither"), ([8, "X"], "neither")]:
        with pytest.raises(ValueError, match=why):
            VGG(layers=bad)
    with pytest.raises(ValueError, match="below one pixel"):
        VGG(layers=[4, "M", 4, "M", 4, "M"], img_size=4)
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(2, 1, 32, 32))


def test_levels_run_like_the_network():
    for model, x, pools in [(make_vgg(), images(5), [True, True]),
                            (make_lenet(), images(5, channels=1, side=32), [True, True, False])]:
        levels = levels_of(model)
        assert [lv.conv for lv in levels] == [True] * len(pools) + [False, False]
        assert [lv.pool for lv in levels if lv.conv] == pools
        torch.testing.assert_close(pre_acts(levels, x)[-1], out(model, x), **TIGHT)


# ---------------------------------------------------------------- self-fusion and permutations

@pytest.mark.pot
@pytest.mark.parametrize("make", [make_vgg, make_lenet], ids=["vgg", "lenet5"])
def test_self_fusion_gives_the_network_back(make):
    net = make()
    x = images(40, channels=2 if make is make_vgg else 1, side=IMG if make is make_vgg else 32)
    assert same_weights(vanilla_avg([net, net]), net)
    assert same_weights(otfusion([net, net]), net)
    assert same_weights(otfusion([net, net], x, cost="activation"), net)
    assert same_weights(otfusion([net, net], x, cost="activation", positions="pool"), net)
    for fused in (hungarian_fusion([net, net], x), kf_linear([net, net], x), kf_gradient([net, net], x, steps=5),
                  hungarian_fusion([net, net], x, positions="pool")):
        assert type(fused) is type(net)
        torch.testing.assert_close(out(fused, x), out(net, x), rtol=0, atol=1e-7)


@pytest.mark.pot
@pytest.mark.parametrize("make", [make_vgg, make_lenet], ids=["vgg", "lenet5"])
def test_a_permuted_cnn_is_found_again(make):
    net = make()
    permuted = permute_channels(net, seed=5)
    x = images(40, channels=2 if make is make_vgg else 1, side=IMG if make is make_vgg else 32)
    torch.testing.assert_close(out(permuted, x), out(net, x), **TIGHT)  # the same function
    assert not same_weights(permuted, net)
    assert same_weights(otfusion([net, permuted]), net)  # aligned back to the anchor, then averaged
    assert same_weights(otfusion([net, permuted], x, cost="activation"), net)
    torch.testing.assert_close(out(hungarian_fusion([net, permuted], x), x), out(net, x), rtol=0, atol=1e-7)


@pytest.mark.pot
def test_otfusion_of_different_widths_and_averaging_of_different_nets():
    a, b = make_vgg(seed=0), make_vgg(seed=1)
    wide = make_vgg((6, "M", 7, "M"), (8,), seed=2)
    fused = otfusion([a, wide])
    assert fused.conv_widths == [4, 6] and fused.hidden == [5]
    x = images(20)
    assert torch.isfinite(out(fused, x)).all()
    mean = vanilla_avg([a, b])
    torch.testing.assert_close(mean.convs[0].weight, (a.convs[0].weight + b.convs[0].weight) / 2)
    kf = kf_linear([a, b, wide], x, widths=[3, 5, 4])
    assert kf.conv_widths == [3, 5] and kf.hidden == [4] and torch.isfinite(out(kf, x)).all()


def test_cnn_parents_must_match():
    a, x = make_vgg(), images(10)
    with pytest.raises(ValueError, match="identical hidden widths.*clafusion"):
        vanilla_avg([a, make_vgg((4, "M", 6, 6, "M"))])
    with pytest.raises(ValueError, match="same depth and layer kinds"):
        kf_linear([a, make_vgg((4, "M", 6, 6, "M"))], x)
    with pytest.raises(ValueError, match="same depth and layer kinds"):  # same widths, a pool elsewhere
        kf_linear([a, make_vgg((4, 6, "M"), (5,))], x)
    with pytest.raises(ValueError, match="one architecture family"):
        vanilla_avg([a, make_lenet()])
    with pytest.raises(ValueError, match="predicts 4 classes"):
        kf_linear([a, VGG(2, 4, (4, "M", 6, "M"), (5,), img_size=IMG).double()], x)
    with pytest.raises(ValueError, match="positions"):
        kf_linear([a, a], x, positions="max")


# ---------------------------------------------------------------- identity layers and CLAFusion

DEEP = ((4, "M", 6, 6, "M"), (5, 7))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mapping", [[0, 1, 3], [0, 2, 3], [0, 1, 4], [0, 2, 4]])
def test_identity_layers_keep_a_cnns_function(bias, mapping):
    net, deep = make_vgg(bias=bias), make_vgg(*DEEP, seed=1, bias=bias)
    assert stages(net) == [0, 1, -1] and stages(deep) == [0, 1, 1, -1, -1]
    deeper = insert_identity_layers(net, deep, mapping)
    assert deeper.pool_after == deep.pool_after and len(deeper.linears) == 3
    x = images(30, seed=2) * 3  # negative inputs too: they never reach an identity layer
    torch.testing.assert_close(out(deeper, x), out(net, x), **TIGHT)
    with pytest.raises(ValueError, match="different stages"):
        insert_identity_layers(net, deep, [0, 3, 4])


def test_identity_layers_need_a_size_keeping_kernel():
    lenet = levels_of(make_lenet())  # 5x5 kernels without padding shrink the map
    with pytest.raises(ValueError, match="change the map's size"):
        identity_level(lenet[1], lenet[0], bias=True, flatten_positions=1)


@pytest.mark.pot
def test_clafusion_of_cnns_of_different_depths():
    net, deep = make_vgg(seed=0), make_vgg(*DEEP, seed=1)
    x = images(60)
    cost = layer_cost_matrix(deep, net, x)
    assert cost.shape == (3, 5)
    assert torch.isinf(cost[0, 1:]).all() and torch.isinf(cost[1, [0, 3, 4]]).all()
    assert torch.isfinite(cost[2, 3:]).all()
    deepened = insert_identity_layers(net, deep, [0, 1, 4])
    for parents in ([net, deepened], [deepened, net]):  # a net with its own deepened self: the same function
        fused = clafusion(parents, x)
        assert fused.conv_widths == deepened.conv_widths and fused.pool_after == deep.pool_after
        torch.testing.assert_close(out(fused, x), out(net, x), **TIGHT)
    fused = clafusion([net, deep], x)
    assert fused.conv_widths == deep.conv_widths and fused.hidden == deep.hidden
    assert torch.isfinite(out(fused, x)).all()
    with pytest.raises(ValueError, match="pool the same number of times"):
        clafusion([net, make_vgg((4, "M", 6, 6), (5, 7), seed=1)], x)


# ---------------------------------------------------------------- importance

def test_conductance_of_channels_adds_up_to_the_logit():
    """Completeness: for a bias-free ReLU network the activation pattern (and every max-pool's winner) is the same
    all along the path from 0, so each level's conductances add up to the predicted logit exactly."""
    net, x = make_vgg(bias=False), images(12)
    levels = levels_of(net)
    logits = out(net, x)
    predicted = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    for conductance in sample_conductance(levels, x, steps=4):
        torch.testing.assert_close(conductance.sum(1), predicted, rtol=1e-9, atol=1e-9)
    scores = conductance_importance(net, x)
    assert [len(s) for s in scores] == [4, 6, 5, CLASSES] and all((s >= 0).all() for s in scores)
    torch.testing.assert_close(conductance_importance(net, x, layer=1), scores[1])
    with pytest.raises(ValueError, match="not a level"):
        conductance_importance(net, x, layer=9)


def test_ridge_fits_solve_the_penalised_problem_in_both_forms():
    from fusion.fitting import least_squares
    generator = torch.Generator().manual_seed(0)
    for rows in (30, 5):  # more samples than inputs (primal form), fewer (dual form)
        h = torch.randn(rows, 10, generator=generator, dtype=torch.float64)
        target = torch.randn(rows, 3, generator=generator, dtype=torch.float64)
        a = torch.cat([h, torch.ones(rows, 1, dtype=torch.float64)], 1)
        penalty = 0.1 * a.pow(2).sum() / rows
        expected = torch.linalg.solve(a.T @ a + penalty * torch.eye(11, dtype=torch.float64), a.T @ target)
        w, b = least_squares(h, target, bias=True, ridge=0.1)
        torch.testing.assert_close(torch.cat([w.T, b[None]]), expected, **TIGHT)
        plain_w, _ = least_squares(h, target, bias=True)
        assert w.norm() < plain_w.norm()
    net, x = make_vgg(), images(30)
    shrunk = kf_linear([net, net], x, ridge=0.1)
    assert shrunk.linears[0].weight.norm() < kf_linear([net, net], x).linears[0].weight.norm()
    # the gradient variant minimises the same penalised objective, from its minimum: it cannot move away
    torch.testing.assert_close(out(kf_gradient([net, net], x, ridge=0.1, steps=20), x), out(shrunk, x),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ridge must be 0 or more"):
        hungarian_fusion([net, net], x, ridge=-1.0)
