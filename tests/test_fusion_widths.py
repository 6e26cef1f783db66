"""Parents of different widths (issue 30, item 2): OTFusion and CLAFusion fuse into the widths of a named target
parent (``target``), through transport plans between layers of unequal widths; MLPs and ResNets."""
from __future__ import annotations

import pytest
import torch

import fusion
from archs.mlp import MLP
from archs.resnet import ResNet
from archs.vgg import VGG
from config import ConfigError, MergeConfig, parse_args
from conftest import REPO_ROOT
from fusion.levels import levels_of
from fusion.ot import emd_transport
from strategies import check_fusion, parse_strategies

pytestmark = pytest.mark.pot


def mlp(seed: int, widths) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 3, list(widths), True, 8, 0).double().eval()


def resnet(seed: int, depth: int, width: float) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(2, 3, depth=depth, width=width, batch_norm=True, bias=False).double().eval()


def images(n: int, channels: int) -> torch.Tensor:
    return torch.randn(n, channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def widths(model: MLP) -> list[int]:
    return [level.width for level in levels_of(model)]


@pytest.mark.parametrize("n,m", [(12, 4), (4, 12), (10, 7)])
def test_a_plan_between_unequal_widths_mixes_every_parent_neuron_into_the_target(n, m):
    cost = torch.rand(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(n * m))
    plan = emd_transport(cost)
    assert plan.shape == (n, m) and (plan >= 0).all()
    # each target neuron is a convex mix of parent neurons; each parent neuron gives all of its uniform mass
    torch.testing.assert_close(plan.sum(0), torch.ones(m, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(1), torch.full((n,), m / n, dtype=torch.float64))


@pytest.mark.parametrize("cost", ["weight", "activation"])
@pytest.mark.parametrize("target", [0, 1])
def test_otfusion_takes_the_target_parents_widths(cost, target):
    x = images(40, 1)
    parents = [mlp(0, (16, 12)), mlp(1, (6, 4))]
    alignment = fusion.align("otfusion", parents, x, cost=cost, anchor=target)
    fused = alignment.network()
    assert widths(fused) == widths(parents[target])
    # the target is the anchor, untouched; the other parent is re-expressed in its neurons
    for level, own in zip(alignment.parents[target], levels_of(parents[target])):
        assert torch.equal(level.weight, own.weight) and torch.equal(level.bias, own.bias)
    assert [lv.weight.shape for lv in alignment.parents[1 - target]] == [lv.weight.shape for lv in
                                                                         levels_of(parents[target])]
    # a network fused with itself into its own widths is itself, whichever copy is the target
    self_fused = fusion.otfusion([parents[target], mlp(target, (16, 12) if target == 0 else (6, 4))], x, cost,
                                 anchor=target)
    torch.testing.assert_close(self_fused(x), parents[target](x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("target", [0, 1])
def test_a_double_width_vgg_and_a_half_width_vgg_fuse_into_either_shape(target):
    x = images(20, 2)
    torch.manual_seed(0)
    double = VGG(2, 3, (8, "M", 12, "M"), (10,), bias=True, img_size=8).double().eval()
    torch.manual_seed(1)
    half = VGG(2, 3, (2, "M", 3, "M"), (5,), bias=True, img_size=8).double().eval()
    parents = [double, half]
    fused, ratios = fusion.repaired(fusion.align("otfusion", parents, x, cost="activation", anchor=target), x)
    # every level, the Linear after the flatten included, takes the target's shape
    assert [lv.weight.shape for lv in levels_of(fused)] == [lv.weight.shape for lv in levels_of(parents[target])]
    assert ratios["repair_std_ratio_after"] == pytest.approx([1.0] * 3, abs=1e-9)


def test_clafusion_fuses_into_the_shallower_narrower_parents_widths():
    x = images(40, 1)
    deep, shallow = mlp(0, (16, 12, 10)), mlp(1, (6, 4))
    assert widths(fusion.clafusion([deep, shallow], x)) == widths(deep)
    into_shallow = fusion.clafusion([deep, shallow], x, target=1)
    # the deeper parent's depth; the shallower parent's widths, an inserted level keeping the width before it
    assert len(widths(into_shallow)) == len(widths(deep)) and set(widths(into_shallow)[:-1]) <= {6, 4}
    assert widths(into_shallow)[-1] == 3
    with pytest.raises(ValueError, match="target=2 is not a parent index"):
        fusion.clafusion([deep, shallow], x, target=2)


def test_resnets_of_different_widths_fuse_into_the_targets_widths_with_repair():
    x = images(16, 2)
    wide34, narrow18 = resnet(0, 34, 0.125), resnet(1, 18, 0.0625)
    for target, expected in ((None, wide34.stage_widths), (0, wide34.stage_widths), (1, narrow18.stage_widths)):
        alignment = fusion.align("clafusion", [wide34, narrow18], x, target=target)
        fused, ratios = fusion.repaired(alignment, x)
        assert fused.depth == 34 and fused.stage_widths == expected
        assert ratios["repair_std_ratio_after"] == pytest.approx([1.0] * len(ratios["repair_std_ratio_after"]),
                                                                 abs=1e-9)
    same_depth = fusion.otfusion([resnet(0, 18, 0.125), narrow18], x, "activation", anchor=1)
    assert same_depth.stage_widths == narrow18.stage_widths


def test_a_target_that_is_not_a_parent_fails_at_config_load():
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / f)
                                   for f in ("fusion_parents.yaml", "fusion_resnet_depths.yaml")])
    spec = cfg.problems[cfg.problem]
    check_fusion(parse_strategies([{"name": "clafusion", "target": 1}])[0], cfg.problem, spec)
    with pytest.raises(ConfigError, match="target=2 is not a parent"):
        check_fusion(parse_strategies([{"name": "clafusion", "target": 2}])[0], cfg.problem, spec)
    labels = [c.label for c in parse_strategies(["otfusion(cost=activation,target=1)", "clafusion"])]
    assert labels == ["otfusion(cost=activation,target=1)", "clafusion(finetune_epochs=0)"]
