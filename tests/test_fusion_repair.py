"""REPAIR (fusion/repair.py, fusion/residual_repair.py): after it, every fused channel's pre-activation has its
aligned parents' mean standard deviation and mean on the samples; REPAIR of a network fused with itself changes
nothing; the per-layer std ratio shows the collapse before and none after; the batch-norm reset's old name fails at
config load naming the new one."""
from __future__ import annotations

import pytest
import torch

import fusion
from archs.lenet import LeNet5
from archs.mlp import MLP
from archs.resnet import ResNet
from archs.vgg import VGG
from config import ConfigError
from conftest import tiny_resnet
from fusion.levels import levels_of, pre_acts
from fusion.repair import channel_stats
from fusion.residual import plan_of, space_activations, with_state
from fusion.residual_repair import outputs
from strategies import parse_strategies

pytestmark = pytest.mark.pot
CLOSE = dict(rtol=1e-9, atol=1e-9)


def mlp(seed: int, widths=(12, 10), bias: bool = True) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 3, list(widths), bias, 8, 0).double().eval()


def vgg(seed: int, layers=(4, "M", 6, "M")) -> VGG:
    torch.manual_seed(seed)
    return VGG(2, 3, layers, (5,), bias=True, img_size=8).double().eval()


def lenet(seed: int) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(1, 3, half=True).double().eval()


def resnet(seed: int, depth: int = 18, batch_norm: bool = True, bias: bool = False) -> ResNet:
    return tiny_resnet(seed, 3, depth, batch_norm, bias)


def images(n: int, channels: int, side: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


CHAINS = {"mlp": (lambda seed: mlp(seed), 1), "vgg": (lambda seed: vgg(seed), 2), "lenet5": (lenet, 1)}


def chain_targets(alignment, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each hidden level's target, computed here from the aligned parents' own pre-activations."""
    per_parent = [pre_acts(levels, x)[:-1] for levels in alignment.parents]
    out = []
    for level in range(len(per_parent[0])):
        stats = [channel_stats(acts[level]) for acts in per_parent]
        out.append((sum(s[0] for s in stats) / len(stats), sum(s[1] for s in stats) / len(stats)))
    return out


@pytest.mark.parametrize("arch", list(CHAINS))
@pytest.mark.parametrize("method", ["vanilla_avg", "otfusion", "clafusion"])
def test_repaired_chain_channels_have_their_parents_statistics(arch, method):
    make, channels = CHAINS[arch]
    side = 32 if arch == "lenet5" else 8
    x = images(40, channels, side)
    parents = [make(0), make(1)]
    alignment = fusion.align(method, parents, x)
    network, ratios = fusion.repaired(alignment, x)
    inputs = x if arch != "mlp" else parents[0].flat_inputs(x).double()
    own = [channel_stats(z) for z in pre_acts(levels_of(network), inputs)[:-1]]
    targets = chain_targets(alignment, inputs)
    assert len(own) == len(targets) == len(ratios["repair_std_ratio_after"]) > 0
    for (mean, std), (target_mean, target_std) in zip(own, targets):
        torch.testing.assert_close(mean, target_mean, **CLOSE)
        torch.testing.assert_close(std, target_std, **CLOSE)
    # averaging two unrelated networks collapses the variance (Jordan et al.'s diagnostic), REPAIR undoes it
    assert min(ratios["repair_std_ratio_before"]) < 0.9
    assert ratios["repair_std_ratio_after"] == pytest.approx([1.0] * len(own), abs=1e-9)
    # the output level is left as it is: REPAIR rescales hidden channels only
    assert torch.equal(levels_of(network)[-1].weight, levels_of(alignment.network())[-1].weight)


def test_a_level_without_bias_gets_its_parents_std_and_keeps_its_own_mean_direction():
    x = images(40, 1)
    parents = [mlp(0, bias=False), mlp(1, bias=False)]
    alignment = fusion.align("otfusion", parents, x)
    network, _ = fusion.repaired(alignment, x)
    inputs = parents[0].flat_inputs(x).double()
    for (_, std), (_, target_std) in zip([channel_stats(z) for z in pre_acts(levels_of(network), inputs)[:-1]],
                                         chain_targets(alignment, inputs)):
        torch.testing.assert_close(std, target_std, **CLOSE)
    assert all(level.bias is None for level in levels_of(network))


@pytest.mark.parametrize("make", [lambda: mlp(0), lambda: vgg(0), lambda: lenet(0), lambda: resnet(0),
                                  lambda: resnet(0, batch_norm=False), lambda: resnet(0, batch_norm=False, bias=True)],
                         ids=["mlp", "vgg", "lenet5", "resnet_bn", "resnet_plain", "resnet_bias"])
def test_repair_of_a_network_fused_with_itself_is_a_no_op(make):
    parent = make()
    channels = 2 if isinstance(parent, (VGG, ResNet)) else 1
    x = images(30, channels, 32 if isinstance(parent, LeNet5) else 8)
    network, ratios = fusion.repaired(fusion.align("otfusion", [parent, make()], x, cost="activation"), x)
    own, want = network.state_dict(), parent.state_dict()
    assert own.keys() == want.keys()
    for key in own:
        torch.testing.assert_close(own[key].double(), want[key].double(), rtol=0, atol=1e-10, msg=key)
    assert ratios["repair_std_ratio_before"] == pytest.approx([1.0] * len(ratios["repair_std_ratio_before"]), abs=1e-9)


@pytest.mark.parametrize("batch_norm,bias", [(True, False), (False, False), (False, True)], ids=["bn", "plain", "bias"])
@pytest.mark.parametrize("method", ["vanilla_avg", "otfusion", "clafusion", "rebasin"])
def test_repaired_resnet_convolutions_have_their_parents_statistics(method, batch_norm, bias):
    x = images(20, 2)
    deep = 34 if method == "clafusion" else 18
    parents = [resnet(0, deep, batch_norm, bias), resnet(1, 18, batch_norm, bias)]
    alignment = fusion.align(method, parents, x)
    network, ratios = fusion.repaired(alignment, x)
    names = [out for out, _ in outputs(alignment.template)]
    acts = space_activations(network, x, plan_of(network), names)
    parent_acts = [space_activations(with_state(alignment.template, state), x, plan_of(network), names)
                   for state in alignment.parents]
    for name in names:
        mean, std = channel_stats(acts[name])
        stats = [channel_stats(a[name]) for a in parent_acts]
        torch.testing.assert_close(std, sum(s[1] for s in stats) / len(stats), **CLOSE, msg=name)
        if batch_norm or bias:  # without either a channel's mean cannot be moved
            torch.testing.assert_close(mean, sum(s[0] for s in stats) / len(stats), **CLOSE, msg=name)
    assert len(ratios["repair_std_ratio_before"]) == len(names)
    assert min(ratios["repair_std_ratio_before"]) < 0.9
    assert ratios["repair_std_ratio_after"] == pytest.approx([1.0] * len(names), abs=1e-9)


def test_std_ratios_is_the_diagnostic_alone():
    x = images(40, 1)
    alignment = fusion.align("vanilla_avg", [mlp(0), mlp(1)], x)
    averaged = alignment.network()
    _, ratios = fusion.repaired(alignment, x)
    assert fusion.std_ratios(averaged, alignment, x) == ratios["repair_std_ratio_before"]
    with pytest.raises(ValueError, match="averaging method"):
        fusion.align("kf_linear", [mlp(0), mlp(1)], x)


def test_the_batch_norm_reset_is_renamed_and_its_old_name_says_so():
    with pytest.raises(ConfigError, match="norm_stats=recomputed is now norm_stats=reset"):
        parse_strategies([{"name": "otfusion", "norm_stats": "recomputed"}])
    with pytest.raises(ConfigError, match="choose one"):
        parse_strategies([{"name": "clafusion", "norm_stats": "reset", "repair": True}])
    labels = [c.label for c in parse_strategies(["vanilla_avg", {"name": "otfusion", "repair": True},
                                                 "clafusion(finetune_epochs=1,repair=False)"])]
    # repair off by default leaves the labels (and the rows keyed by them) as they were
    assert labels == ["vanilla_avg", "otfusion(cost=weight,repair=True)", "clafusion(finetune_epochs=1)"]
