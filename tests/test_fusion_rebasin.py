"""Git Re-Basin weight matching (fusion/weight_matching.py, the ``rebasin`` rule): a permuted copy of a network is
found again exactly, a network fused with itself is itself, three parents fuse, weight matching never lowers its
objective, and what it cannot fuse fails before any work."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fusion
from archs.lenet import LeNet5
from archs.mlp import MLP
from archs.resnet import ResNet
from archs.vgg import VGG
from config import ConfigError, MergeConfig, parse_args
from conftest import REPO_ROOT
from fusion.levels import Levels, levels_of, to_network
from fusion.weight_matching import permuted, weight_matching
from strategies import check_fusion, parse_strategies

EXACT = dict(rtol=0, atol=1e-12)


def mlp(seed: int, bias: bool = True) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 3, [12, 10, 8], bias, 8, 0).double().eval()


def vgg(seed: int) -> VGG:
    torch.manual_seed(seed)
    return VGG(2, 3, (4, "M", 6, 5, "M"), (7,), bias=True, img_size=8).double().eval()


def lenet(seed: int) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(1, 3, half=True).double().eval()


CHAINS = {"mlp": (mlp, 1), "mlp_no_bias": (lambda seed: mlp(seed, bias=False), 1), "vgg": (vgg, 2),
          "lenet5": (lenet, 1)}


def inputs_for(model: nn.Module, channels: int) -> torch.Tensor:
    side = 32 if isinstance(model, LeNet5) else 8
    return torch.randn(20, channels, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def shuffled(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every hidden level's neurons in a random order: the same function, other weights."""
    levels = levels_of(model)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(level.width, generator=g) for level in levels[:-1]]
    return to_network(model, permuted(levels, perms))


def assert_same_levels(a: Levels, b: Levels) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.weight, y.weight, **EXACT)
        assert (x.bias is None) == (y.bias is None)
        if x.bias is not None:
            torch.testing.assert_close(x.bias, y.bias, **EXACT)


def objective(a: Levels, b: Levels) -> float:
    return sum(float((x.weight * y.weight).sum()) + (0.0 if x.bias is None else float(x.bias @ y.bias))
               for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(CHAINS))
def test_a_permuted_copy_is_found_again_exactly(name):
    make, channels = CHAINS[name]
    original = make(0)
    copy_ = shuffled(original, seed=1)
    x = inputs_for(original, channels)
    # the copy computes the same function with other weights: there is something to undo
    torch.testing.assert_close(copy_(x), original(x), rtol=1e-10, atol=1e-10)
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(levels_of(copy_), levels_of(original)))
    alignment = fusion.align("rebasin", [original, copy_])
    assert_same_levels(alignment.parents[1], levels_of(original))
    fused = fusion.rebasin([original, copy_])
    assert_same_levels(levels_of(fused), levels_of(original))
    torch.testing.assert_close(fused(x), original(x), **EXACT)


@pytest.mark.parametrize("name", list(CHAINS))
def test_self_fusion_is_the_network(name):
    make, channels = CHAINS[name]
    original = make(0)
    fused = fusion.rebasin([original, copy.deepcopy(original)])
    assert_same_levels(levels_of(fused), levels_of(original))
    x = inputs_for(original, channels)
    torch.testing.assert_close(fused(x), original(x), **EXACT)


def test_three_parents_each_matched_to_the_first():
    original = vgg(0)
    x = inputs_for(original, 2)
    # two permuted copies: every one is matched back onto the first, so their mean is the first
    fused = fusion.rebasin([original, shuffled(original, 1), shuffled(original, 2)])
    torch.testing.assert_close(fused(x), original(x), **EXACT)
    # three unrelated networks: a network of the first's shape, each of the others permuted onto it
    parents = [vgg(0), vgg(1), vgg(2)]
    alignment = fusion.align("rebasin", parents)
    assert len(alignment.parents) == 3
    for k in (1, 2):  # permuting changes no function
        torch.testing.assert_close(to_network(parents[0], alignment.parents[k])(x), parents[k](x), rtol=1e-10,
                                   atol=1e-10)
    assert [lv.weight.shape for lv in levels_of(alignment.network())] == [lv.weight.shape for lv in
                                                                         levels_of(parents[0])]


@pytest.mark.parametrize("name", list(CHAINS))
def test_weight_matching_raises_the_summed_inner_products(name):
    make, _ = CHAINS[name]
    a, b = levels_of(make(0)), levels_of(make(1))
    matched = permuted(b, weight_matching(a, b))
    assert objective(a, matched) > objective(a, b)
    # one more sweep from the answer finds nothing better: coordinate descent stopped at a fixed point
    again = weight_matching(a, matched)
    assert all(torch.equal(p, torch.arange(len(p))) for p in again)


def test_what_rebasin_cannot_fuse_fails_before_any_work():
    with pytest.raises(ConfigError) as err:
        parse_strategies([{"name": "rebasin", "iterations": 0}])
    assert "iterations" in str(err.value) and "\n" not in str(err.value)
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / name) for name in
                                   ("fusion_parents.yaml", "fusion_resnet.yaml", "fusion_resnet_depths.yaml")])
    with pytest.raises(ConfigError, match="chains of levels"):
        check_fusion(parse_strategies(["rebasin"])[0], cfg.problem, cfg.problems[cfg.problem])
    torch.manual_seed(0)
    resnets = [ResNet(2, 3, depth=18, width=0.0625).eval() for _ in range(2)]
    with pytest.raises(ValueError, match="not ResNets"):
        fusion.rebasin(resnets)
    with pytest.raises(ValueError, match="identical hidden widths"):
        fusion.rebasin([mlp(0), MLP(1, 3, [12, 10, 6], True, 8, 0).double()])
