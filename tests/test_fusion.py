"""fusion.py: every method gives a network back from itself, permutations are undone, layer maps are optimal."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from archs import build_model
from archs.mlp import MLP
from fusion import (align_layers, class_share_weights, clafusion, conductance_importance, ensemble_softmax, finetune,
                    hungarian_fusion, insert_identity_layers, kf_gradient, kf_linear, layer_cost_matrix, linear_cka,
                    otfusion, uniform_importance, vanilla_avg)

IMG = 4  # 1 x 4 x 4 images, no crop: 16 inputs
CLASSES = 4
TIGHT = dict(rtol=0, atol=1e-9)  # parents are float64, so the fused networks are float64 too


def make_mlp(widths=(12, 8), seed: int = 0, bias: bool = True, classes: int = CLASSES) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, classes, widths, bias=bias, img_size=IMG, crop=0).double().eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, IMG, IMG, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def permute_hidden(model: MLP, seed: int) -> MLP:
    """The same function with each hidden layer's units shuffled (rows, and the next layer's columns)."""
    permuted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, nxt in zip(permuted.layers[:-1], permuted.layers[1:]):
            perm = torch.randperm(layer.out_features, generator=generator)
            layer.weight.copy_(layer.weight[perm])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[perm])
            nxt.weight.copy_(nxt.weight[:, perm])
    return permuted


def same_weights(a: MLP, b: MLP, atol: float = 1e-12) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=0, atol=atol) for k in sa)


# ---------------------------------------------------------------- the MLP

def test_mlp_shapes_crop_and_features():
    torch.manual_seed(0)
    model = MLP(in_channels=3, num_classes=5, widths=[7, 6], img_size=8, crop=2).eval()
    assert model.in_features == 3 * 4 * 4 and model.feature_dim == 6
    assert [(m.in_features, m.out_features) for m in model.layers] == [(48, 7), (7, 6), (6, 5)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        assert logits.shape == (2, 5) and features.shape == (2, 6) and (features >= 0).all()
        assert torch.equal(model(x), logits)
        assert torch.equal(model.layers[-1](features), logits)
        border = x.clone()
        border[..., :2, :] = 9.0
        border[..., :, -2:] = -9.0
        assert torch.equal(model(border), logits)  # the cropped border is never read
        assert torch.allclose(model(x[..., 2:6, 2:6].flatten(1)), logits)  # flat inputs skip the crop
        pre = model.pre_activations(x)
    assert [p.shape for p in pre] == [(2, 7), (2, 6), (2, 5)]
    assert torch.equal(pre[-1], logits) and torch.equal(F.relu(pre[-2]), features)
    with pytest.raises(ValueError, match="48"):
        model(torch.randn(2, 47))
    with pytest.raises(ValueError, match="hidden layer"):
        MLP(widths=[])


def test_mlp_registry_defaults_read_padded_mnist():
    model = build_model("mlp", widths=[20, 10], bias=False)
    assert model.in_features == 784 and model.widths == [20, 10] and model.layers[0].bias is None
    assert build_model("mlp")(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- every method gives a network back from itself

SELF_FUSIONS = {
    "vanilla_avg": lambda ps, x: vanilla_avg(ps),
    "otfusion_weight": lambda ps, x: otfusion(ps),
    "otfusion_activation": lambda ps, x: otfusion(ps, x, cost="activation"),
    "hungarian_correlation": lambda ps, x: hungarian_fusion(ps, x),
    "hungarian_euclidean": lambda ps, x: hungarian_fusion(ps, x, match="euclidean"),
    "kf_linear": lambda ps, x: kf_linear(ps, x),
    "kf_linear_three_copies": lambda ps, x: kf_linear(ps + [copy.deepcopy(ps[0])], x),
    "kf_gradient": lambda ps, x: kf_gradient(ps, x, steps=30),
    "clafusion": lambda ps, x: clafusion(ps, x),
    "clafusion_weight": lambda ps, x: clafusion(ps, x, cost="width", ot_cost="weight"),
}


@pytest.mark.parametrize("n_samples", [200, 10], ids=["overdetermined", "underdetermined"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("method", list(SELF_FUSIONS))
def test_self_fusion_is_the_same_function(method, bias, n_samples):
    net = make_mlp(bias=bias)
    before = copy.deepcopy(net.state_dict())
    x = images(n_samples)  # 10 samples < 16 inputs: the least-squares fits are under-determined
    fused = SELF_FUSIONS[method]([net, copy.deepcopy(net)], x)
    assert isinstance(fused, MLP) and fused is not net and fused.widths == net.widths
    assert next(fused.parameters()).dtype == torch.float64
    torch.testing.assert_close(out(fused, x), out(net, x), **TIGHT)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the parent is untouched


@pytest.mark.pot
def test_self_fusion_is_not_trivially_true():
    net = make_mlp()
    x = images(200)
    other = make_mlp(seed=5)
    for fused in (kf_linear([net, other], x), hungarian_fusion([net, other], x), otfusion([net, other])):
        assert not torch.allclose(out(fused, x), out(net, x), atol=1e-3)


# ---------------------------------------------------------------- permutations are undone

@pytest.mark.parametrize("cost", ["weight", "activation"])
@pytest.mark.parametrize("anchor", [0, 1])
def test_otfusion_undoes_a_permutation(cost, anchor):
    net = make_mlp()
    permuted = permute_hidden(net, seed=3)
    x = images(200)
    assert not same_weights(net, permuted)
    torch.testing.assert_close(out(permuted, x), out(net, x), **TIGHT)
    fused = otfusion([net, permuted], x, cost=cost, anchor=anchor)
    assert same_weights(fused, [net, permuted][anchor])  # aligned to the anchor's unit order, exactly
    assert not torch.allclose(out(vanilla_avg([net, permuted]), x), out(net, x), atol=1e-3)  # without alignment


@pytest.mark.parametrize("match", ["correlation", "euclidean"])
def test_hungarian_fusion_undoes_a_permutation(match):
    net = make_mlp()
    permuted = permute_hidden(net, seed=4)
    fused = hungarian_fusion([net, permuted], images(200), match=match)
    fresh = images(50, seed=9)  # enough samples for a unique least-squares fit: the same function everywhere
    torch.testing.assert_close(out(fused, fresh), out(net, fresh), rtol=0, atol=1e-8)


def test_hungarian_importance_weights_the_pair_targets():
    a, b = make_mlp(seed=0), make_mlp(seed=1)
    x = images(200)
    only_a = [uniform_importance(a), [torch.zeros_like(s) for s in uniform_importance(b)]]
    torch.testing.assert_close(out(hungarian_fusion([a, b], x, importance=only_a), x), out(a, x), **TIGHT)
    with pytest.raises(ValueError, match="negative"):
        hungarian_fusion([a, b], x, importance=[uniform_importance(a), [-s for s in uniform_importance(b)]])


# ---------------------------------------------------------------- k-means fusion

def test_kf_fuses_many_parents_into_given_widths():
    parents = [make_mlp(seed=s) for s in range(3)] + [make_mlp((10, 9), seed=7)]
    x = images(100)
    fused = kf_linear(parents, x, widths=[6, 5])
    assert fused.widths == [6, 5] and torch.isfinite(out(fused, x)).all()
    assert same_weights(kf_linear(parents, x, widths=[6, 5]), fused, atol=0)  # seeded: deterministic
    assert same_weights(kf_gradient(parents, x, widths=[6, 5], steps=0), fused, atol=0)
    with pytest.raises(ValueError, match="one width per hidden layer"):
        kf_linear(parents, x, widths=[6])


def test_kf_gradient_keeps_the_least_squares_optimum():
    # the level loss separates over neurons, so least squares already minimises it on the samples;
    # Adam from there must not wander off (it would, at the scale of lr, without the best-iterate guard)
    parents = [make_mlp(seed=s) for s in range(2)]
    x = images(30)
    linear, gradient = kf_linear(parents, x), kf_gradient(parents, x, steps=50, lr=0.05)
    torch.testing.assert_close(out(gradient, x), out(linear, x), rtol=0, atol=1e-8)


# ---------------------------------------------------------------- importance

def test_conductance_is_gradient_times_activation_for_bias_free_nets():
    net = make_mlp((9, 7), seed=2, bias=False)
    x = images(40)
    for layer in range(3):
        pre = net.pre_activations(x)
        z = pre[layer].detach().requires_grad_()
        h = z
        for i in range(layer, len(net.layers)):
            if i > layer:
                h = net.layers[i](F.relu(h))
        pred = h.argmax(1)
        grad = torch.autograd.grad(h.gather(1, pred[:, None]).sum(), z)[0]
        expected = (grad * z).abs().mean(0)
        torch.testing.assert_close(conductance_importance(net, x, layer, steps=3), expected.detach())


def test_output_conductance_is_the_logit_change_from_the_baseline():
    net = make_mlp(seed=3)
    x = images(60)
    logits, base = out(net, x), out(net, torch.zeros_like(x[:1]))
    pred = logits.argmax(1)
    expected = torch.zeros(CLASSES, dtype=torch.float64)
    expected.index_add_(0, pred, (logits - base).gather(1, pred[:, None]).squeeze(1).abs())
    torch.testing.assert_close(conductance_importance(net, x, len(net.layers) - 1), expected / len(x))
    with pytest.raises(ValueError, match="level"):
        conductance_importance(net, x, 3)


def test_conductance_importance_plugs_into_kf():
    parents = [make_mlp(seed=s) for s in range(2)]
    x = images(50)
    scores = [[conductance_importance(p, x, i) for i in range(len(p.layers))] for p in parents]
    assert all((s >= 0).all() and s.shape == (layer.out_features,) for p, ss in zip(parents, scores)
               for s, layer in zip(ss, p.layers))
    fused = kf_linear(parents, x, importance=scores)
    assert torch.isfinite(out(fused, x)).all()
    assert not same_weights(fused, kf_linear(parents, x), atol=1e-6)


# ---------------------------------------------------------------- CLAFusion

def brute_force_cost(cost: torch.Tensor) -> float:
    n, m = cost.shape
    maps = ([0, *middle, m - 1] for middle in itertools.combinations(range(1, m - 1), n - 2))
    return min(sum(float(cost[i, j]) for i, j in enumerate(a)) for a in maps)


@pytest.mark.parametrize("n,m", [(n, m) for n in range(2, 5) for m in range(n, 7)])
def test_align_layers_is_optimal(n, m):
    generator = torch.Generator().manual_seed(100 * n + m)
    for _ in range(25):
        cost = torch.rand(n, m, generator=generator, dtype=torch.float64)
        mapping = align_layers(cost)
        assert len(mapping) == n and mapping[0] == 0 and mapping[-1] == m - 1
        assert all(a < b for a, b in zip(mapping, mapping[1:]))
        assert sum(float(cost[i, j]) for i, j in enumerate(mapping)) == pytest.approx(brute_force_cost(cost), abs=1e-12)


def test_align_layers_follows_a_cheap_path_and_rejects_bad_shapes():
    cost = torch.ones(3, 5, dtype=torch.float64)
    cost[1, 3] = 0.0
    assert align_layers(cost) == [0, 3, 4]
    assert align_layers(torch.rand(4, 4)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        align_layers(torch.rand(3, 2))
    with pytest.raises(ValueError):
        align_layers(torch.rand(1, 3))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mapping", [[0, 2], [0, 4], [0, 1], [0, 3]])
def test_insert_identity_layers_keeps_the_function(bias, mapping):
    net = make_mlp(bias=bias)
    deeper = insert_identity_layers(net, make_mlp((12, 11, 10, 9, 8), seed=3), mapping)
    assert len(deeper.widths) == 5 and deeper.widths[0] == 12
    assert [deeper.widths[p] for p in mapping] == net.widths
    x = images(100, seed=2) * 3  # negative inputs too: they never reach an identity layer
    torch.testing.assert_close(out(deeper, x), out(net, x), **TIGHT)
    with pytest.raises(ValueError, match="start at 0"):
        insert_identity_layers(net, make_mlp((12, 11, 10)), [1, 2])


@pytest.mark.parametrize("ot_cost", ["activation", "weight"])
def test_clafusion_of_a_net_with_its_deepened_self(ot_cost):
    net = make_mlp()
    deeper = insert_identity_layers(net, make_mlp((12, 12, 8)), [0, 2])
    x = images(200)
    for parents in ([net, deeper], [deeper, net]):
        fused = clafusion(parents, x, ot_cost=ot_cost)
        assert fused.widths == [12, 12, 8]
        torch.testing.assert_close(out(fused, x), out(net, x), **TIGHT)


def test_clafusion_of_different_depths_and_the_layer_costs():
    shallow, deep = make_mlp((12, 8), seed=0), make_mlp((10, 9, 8, 6), seed=1)
    x = images(100)
    cka = layer_cost_matrix(deep, shallow, x)
    assert cka.shape == (2, 4) and ((cka >= -1e-12) & (cka <= 1)).all()
    torch.testing.assert_close(layer_cost_matrix(deep, shallow, kind="width")[0],
                               torch.tensor([2 / 12, 3 / 12, 4 / 12, 6 / 12], dtype=torch.float64))
    fused = clafusion([shallow, deep], x)
    assert fused.widths == deep.widths and torch.isfinite(out(fused, x)).all()


def test_linear_cka():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0]
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ rotation + 2) == pytest.approx(1.0)  # invariant to rotation, scale, shift
    assert linear_cka(x, torch.randn(300, 4, generator=generator, dtype=torch.float64)) < 0.1
    assert linear_cka(x, torch.ones(300, 3)) == 0.0


# ---------------------------------------------------------------- errors

@pytest.mark.pot
def test_mismatched_parents_are_rejected():
    net, wider, deeper = make_mlp(), make_mlp((13, 8)), make_mlp((12, 8, 6))
    x = images(20)
    with pytest.raises(ValueError, match="identical hidden widths.*otfusion.*clafusion"):
        vanilla_avg([net, wider])
    with pytest.raises(ValueError, match="exactly 2 parents"):
        hungarian_fusion([net, net, net], x)
    with pytest.raises(ValueError, match="clafusion"):
        otfusion([net, deeper])
    with pytest.raises(ValueError, match="predicts 3 classes"):
        otfusion([net, make_mlp(classes=3)])
    with pytest.raises(ValueError, match="needs samples"):
        otfusion([net, net], cost="activation")
    with pytest.raises(ValueError, match="MLPs"):
        vanilla_avg([net, torch.nn.Linear(3, 3)])
    assert otfusion([net, wider], anchor=1).widths == [13, 8]


# ---------------------------------------------------------------- ensembles and fine-tuning

def test_ensembles():
    parents = [make_mlp(seed=s) for s in range(3)]
    x = images(20)
    probs = torch.stack([F.softmax(out(p, x), 1) for p in parents])
    torch.testing.assert_close(ensemble_softmax(parents, x), probs.mean(0))
    torch.testing.assert_close(ensemble_softmax(parents, x, torch.tensor([1.0, 0.0, 0.0])), probs[0])
    counts = torch.tensor([[10, 0, 5, 0], [30, 2, 5, 0], [0, 0, 10, 0]])
    weights = class_share_weights(counts)
    torch.testing.assert_close(weights.sum(0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    torch.testing.assert_close(weights[:, 3], torch.full((3,), 1 / 3, dtype=torch.float64))
    mixed = torch.einsum("kc,knc->nc", weights, probs)
    torch.testing.assert_close(ensemble_softmax(parents, x, weights), mixed / mixed.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="shape"):
        ensemble_softmax(parents, x, torch.ones(2))


def test_finetune_fits_and_leaves_the_model_alone():
    net = make_mlp()
    before = copy.deepcopy(net.state_dict())
    x = images(64)
    labels = out(make_mlp(seed=9), x).argmax(1)
    tuned = finetune(net, x, labels, epochs=20, lr=0.05, batch_size=16)
    assert F.cross_entropy(out(tuned, x), labels) < F.cross_entropy(out(net, x), labels)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_conductance_agrees_with_captums_layer_conductance():
    captum_attr = pytest.importorskip("captum.attr", reason="captum (pinned in requirements.txt) is not installed")
    torch.manual_seed(0)
    net = MLP(in_channels=1, num_classes=4, widths=[6, 5], bias=True, img_size=4, crop=0).double().eval()
    x = torch.randn(30, 16, dtype=torch.float64)
    target = net(x).argmax(1)
    for layer in range(len(net.layers)):
        reference = captum_attr.LayerConductance(net, net.layers[layer]).attribute(
            x, baselines=torch.zeros_like(x), target=target, n_steps=512, method="riemann_right").abs().mean(0)
        ours = conductance_importance(net, x, layer, steps=512)
        # two right Riemann sums of the same path integral: they differ by O(1/steps)
        torch.testing.assert_close(ours, reference, atol=2e-3 * reference.abs().max().item(), rtol=0)
