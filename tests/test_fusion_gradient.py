"""KF-gradient as the neuron-interpolation authors describe it (fusion/gradient.py, ``kf_gradient(variant=authors)``):
unlike this codebase's KF-gradient it moves away from KF-linear on chains, its output-level distillation brings the
fused network's prediction closer to the parents' mean prediction, its perturbation is seeded, and its settings are
checked at config load."""
from __future__ import annotations

import pytest
import torch

import fusion
from archs.mlp import MLP
from archs.vgg import VGG
from config import ConfigError, MergeConfig, parse_args
from conftest import REPO_ROOT
from strategies import FusionInputs, MergeInputs, check_fusion, parse_strategies


def mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 4, [10, 8], True, 8, 0).double().eval()


def vgg(seed: int) -> VGG:
    torch.manual_seed(seed)
    return VGG(1, 4, (4, "M", 6, "M"), (8,), bias=True, img_size=8).double().eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def kl_to_parents(network, parents, x) -> float:
    with torch.no_grad():
        return float(fusion.output_kl(network(x), fusion.parents_mean_log_probs([p(x) for p in parents])))


@pytest.mark.parametrize("make", [mlp, vgg])
def test_the_authors_variant_differs_from_kf_linear_on_chains(make):
    parents, x = [make(0), make(1), make(2)], images(60, 3)
    linear = fusion.kf_linear(parents, x)
    ours = fusion.kf_gradient(parents, x)
    authors = fusion.kf_gradient(parents, x, authors=fusion.AuthorsGradient())
    test = images(30, 4)
    # this codebase's KF-gradient is KF-linear on a chain (the least-squares start is the optimum it keeps) ...
    torch.testing.assert_close(ours(test), linear(test), rtol=1e-6, atol=1e-6)
    # ... the authors' is not
    assert (authors(test) - linear(test)).abs().max() > 1e-3
    # without steps and without distillation it is the least-squares fit again: the difference is its training
    plain = fusion.kf_gradient(parents, x, authors=fusion.AuthorsGradient(steps=0, distil=False))
    torch.testing.assert_close(plain(test), linear(test), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [mlp, vgg])
def test_output_distillation_brings_the_prediction_to_the_parents_mean(make):
    parents, x = [make(0), make(1)], images(60, 3)
    with_kd = fusion.kf_gradient(parents, x, authors=fusion.AuthorsGradient(distil=True))
    without = fusion.kf_gradient(parents, x, authors=fusion.AuthorsGradient(distil=False))
    # the hidden levels are trained alike, so the output level alone makes the difference
    assert kl_to_parents(with_kd, parents, x) < 0.9 * kl_to_parents(without, parents, x)
    assert kl_to_parents(with_kd, parents, x) < kl_to_parents(fusion.kf_linear(parents, x), parents, x)


def test_the_perturbation_is_seeded():
    parents, x, test = [mlp(0), mlp(1)], images(60, 3), images(30, 4)
    a, b, c, still = (fusion.kf_gradient(parents, x, authors=fusion.AuthorsGradient(perturb=p, seed=s))
                      for p, s in ((0.1, 0), (0.1, 0), (0.1, 1), (0.0, 0)))
    torch.testing.assert_close(a(test), b(test), rtol=0, atol=0)
    assert not torch.allclose(a(test), c(test)) and not torch.allclose(a(test), still(test))
    with pytest.raises(ValueError, match="perturb >= 0"):
        fusion.AuthorsGradient(perturb=-0.1)
    with pytest.raises(ValueError, match="own steps and learning rates"):
        fusion.kf_gradient(parents, x, lr=0.1, authors=fusion.AuthorsGradient())


def test_the_rule_runs_the_variant_and_keeps_the_old_labels():
    parents, x = [mlp(0), mlp(1)], images(60, 3)
    test = images(30, 4)
    seen = []

    def predict(network):
        seen.append(network)
        with torch.no_grad():
            return network(test).argmax(1)

    with torch.no_grad():
        logits = [p(test) for p in parents]
    inputs = MergeInputs(logits, [torch.arange(4)] * 2, fusion=FusionInputs(
        parents, x, torch.ones(2, 4), predict, lambda: (x, torch.zeros(len(x), dtype=torch.long)), seed=5))
    (call,) = parse_strategies([{"name": "kf_gradient", "variant": "authors", "perturb": 0.05}])
    assert call.label == "kf_gradient(importance=uniform,ridge=0.0,variant=authors,perturb=0.05)"
    assert call(inputs).row["fusion_samples"] == 60
    expected = fusion.kf_gradient(parents, x, seed=5, authors=fusion.AuthorsGradient(perturb=0.05, seed=5))
    torch.testing.assert_close(seen[-1](test), expected(test), rtol=0, atol=0)
    # rows made before the variant existed keep their labels
    assert parse_strategies(["kf_gradient"])[0].label == "kf_gradient(importance=uniform,ridge=0.0)"


@pytest.mark.parametrize("params, words", [
    ({"perturb": 0.1}, ["perturb", "variant=authors"]),
    ({"variant": "authors", "perturb": -1}, ["perturb", "0 or more"]),
    ({"variant": "author"}, ["variant", "authors"]),
])
def test_bad_settings_fail_at_config_load_in_one_line(params, words):
    with pytest.raises(ConfigError) as err:
        parse_strategies([{"name": "kf_gradient", **params}])
    assert "\n" not in str(err.value) and all(word in str(err.value) for word in words), str(err.value)


def test_the_authors_variant_refuses_resnets_at_config_load():
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / name) for name in
                                   ("fusion_parents.yaml", "fusion_resnet.yaml", "fusion_resnet_depths.yaml")])
    (call,) = parse_strategies([{"name": "kf_gradient", "variant": "authors"}])
    with pytest.raises(ConfigError, match="chains of levels"):
        check_fusion(call, cfg.problem, cfg.problems[cfg.problem])
