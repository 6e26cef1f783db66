"""Git Re-Basin weight matching (fusion/weight_matching.py, fusion/residual_weight_matching.py for ResNets, the
``rebasin`` rule): a permuted copy of a network is found again exactly, a network fused with itself is itself, three
parents fuse, weight matching never lowers its objective, and what it cannot fuse fails before any work."""
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
from conftest import REPO_ROOT, tiny_resnet
from fusion import residual_weight_matching
from fusion.levels import Levels, levels_of, to_network
from fusion.residual import Plan, plan_of, state_of, with_state
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
    with pytest.raises(ValueError, match="identical hidden widths"):
        fusion.rebasin([mlp(0), MLP(1, 3, [12, 10, 6], True, 8, 0).double()])


# ---------------------------------------------------------------- ResNets: one permutation per channel space

RESNET_FLAGS = [(True, False), (True, True), (False, False), (False, True)]  # (batch_norm, bias)
RESNET_IDS = ["bn", "bn_bias", "plain", "bias"]
STATISTICS = (".running_mean", ".running_var")


def resnet(seed: int, depth: int = 18, batch_norm: bool = True, bias: bool = False) -> ResNet:
    return tiny_resnet(seed, 3, depth, batch_norm, bias)


def resnet_inputs() -> torch.Tensor:
    return torch.randn(20, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def shuffled_resnet(model: ResNet, seed: int) -> tuple[ResNet, dict[str, torch.Tensor]]:
    """``model`` with every channel space in a random order (the same function, other weights), shuffled by hand
    rather than by the module under test; and per space the order: the copy's channel i is the original's
    ``order[i]``."""
    plan = plan_of(model)
    state = state_of(model)
    g = torch.Generator().manual_seed(seed)
    order = {space.name: torch.randperm(len(state[f"{space.conv}.weight"]), generator=g) for space in plan.spaces}
    shuffled = {}
    for name, (rows, cols) in plan.axes.items():
        tensor = state[name]
        if rows is not None:
            tensor = tensor[order[rows]]
        if cols is not None:
            tensor = tensor[:, order[cols]]
        shuffled[name] = tensor
    return with_state(model, shuffled), order


def resnet_objective(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], plan: Plan) -> float:
    """Weight matching's objective: the summed inner products of every entry but the running statistics."""
    return sum(float((a[name] * b[name]).sum()) for name in plan.axes if not name.endswith(STATISTICS))


@pytest.mark.parametrize("batch_norm,bias", RESNET_FLAGS, ids=RESNET_IDS)
@pytest.mark.parametrize("depth", [18, 34])
def test_a_permuted_resnet_is_found_again_exactly(depth, batch_norm, bias):
    original = resnet(0, depth, batch_norm, bias)
    copy_, order = shuffled_resnet(original, seed=1)
    x = resnet_inputs()
    # the copy computes the same function with other weights: there is something to undo
    torch.testing.assert_close(copy_(x), original(x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fusion.vanilla_avg([original, copy_])(x), original(x))
    plan = plan_of(original)
    perms = residual_weight_matching.weight_matching(state_of(original), state_of(copy_), plan)
    assert perms.keys() == {space.name for space in plan.spaces}
    for name, perm in perms.items():  # every shuffle undone: the copy's channel perm[i] is the original's i
        assert torch.equal(order[name][perm], torch.arange(len(perm))), name
    alignment = fusion.align("rebasin", [original, copy_])
    want = state_of(original)
    for name, tensor in alignment.parents[1].items():
        torch.testing.assert_close(tensor, want[name], **EXACT, msg=name)
    fused = fusion.rebasin([original, copy_])
    assert type(fused) is ResNet
    assert torch.allclose(fused(x), original(x), **EXACT)


@pytest.mark.parametrize("batch_norm,bias", RESNET_FLAGS, ids=RESNET_IDS)
def test_resnet_self_fusion_is_the_network(batch_norm, bias):
    original = resnet(0, 18, batch_norm, bias)
    fused = fusion.rebasin([original, copy.deepcopy(original)])
    own, want = fused.state_dict(), original.state_dict()
    assert own.keys() == want.keys()
    for name in own:
        torch.testing.assert_close(own[name], want[name], **EXACT, msg=name)


@pytest.mark.parametrize("batch_norm,bias", RESNET_FLAGS, ids=RESNET_IDS)
def test_resnet_weight_matching_never_lowers_its_objective(batch_norm, bias):
    match = residual_weight_matching
    plan = plan_of(resnet(0, 18, batch_norm, bias))
    a, b = (state_of(resnet(seed, 18, batch_norm, bias)) for seed in (0, 1))
    # one seed visits the spaces in one order, so k sweeps are the first k of any longer run
    values = [resnet_objective(a, b, plan)] + [
        resnet_objective(a, match.permuted(b, plan, match.weight_matching(a, b, plan, iterations)), plan)
        for iterations in range(1, 7)]
    assert values[1] > values[0]
    assert all(later >= earlier for earlier, later in zip(values, values[1:])), values
    # one more run from the answer finds nothing better: coordinate descent stopped at a fixed point
    matched = match.permuted(b, plan, match.weight_matching(a, b, plan))
    assert resnet_objective(a, matched, plan) >= values[-1]
    assert all(torch.equal(p, torch.arange(len(p))) for p in match.weight_matching(a, matched, plan).values())
    # the running statistics move with their channels, but they are measured, not learnt: not matched
    assert set(plan.axes) - set(match.matched_entries(plan)) == {n for n in plan.axes if n.endswith(STATISTICS)}


def test_three_resnets_each_matched_to_the_first():
    original = resnet(0)
    x = resnet_inputs()
    # two permuted copies: every one is matched back onto the first, so their mean is the first
    fused = fusion.rebasin([original, shuffled_resnet(original, 1)[0], shuffled_resnet(original, 2)[0]])
    torch.testing.assert_close(fused(x), original(x), **EXACT)
    # three unrelated networks: each of the others permuted onto the first, with its own function
    parents = [resnet(0), resnet(1), resnet(2)]
    alignment = fusion.align("rebasin", parents)
    assert len(alignment.parents) == 3
    for k in (1, 2):
        torch.testing.assert_close(with_state(parents[0], alignment.parents[k])(x), parents[k](x), rtol=1e-10,
                                   atol=1e-10)
    fused = alignment.network()
    assert type(fused) is ResNet and fused.stage_widths == parents[0].stage_widths
    assert not torch.allclose(fused(x), fusion.vanilla_avg(parents)(x))  # the permutations moved something


def test_what_rebasin_cannot_fuse_of_resnets_fails_before_any_work(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("weight matching started")

    monkeypatch.setattr(residual_weight_matching, "weight_matching", started)
    parent = resnet(0)
    wider = ResNet(2, 3, depth=18, width=0.125).double()
    for other, words in ((wider, "identical widths"), (resnet(1, depth=34), "clafusion"),
                         (resnet(1, batch_norm=False), "batch_norm")):
        for run in (lambda: fusion.rebasin([parent, other]), lambda: fusion.align("rebasin", [parent, other])):
            with pytest.raises(ValueError, match=words) as err:
                run()
            assert "\n" not in str(err.value) and "rebasin" in str(err.value)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="iterations"):
        fusion.rebasin([parent, resnet(1)], iterations=0)
    # a problem of ResNets is no longer refused at config load
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / name) for name in
                                   ("fusion_parents.yaml", "fusion_resnet.yaml", "fusion_resnet_full.yaml")])
    assert all(e.arch == "resnet" for e in cfg.problems[cfg.problem].experts)
    check_fusion(parse_strategies(["rebasin"])[0], cfg.problem, cfg.problems[cfg.problem])
