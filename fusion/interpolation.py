"""Neuron-interpolation fusion (Luenam et al. 2025): group the parents' neurons, fit each fused level to the groups.

Level by level: every parent's pre-activations on a few hundred samples (each parent through its
own network); neurons grouped by Hungarian matching (HF, two parents) or weighted k-means (KF, any
number); a group's target is the importance-weighted mean of its members' pre-activations; the
fused level is fitted to the targets from the fused network's own previous level. Output neuron c
of every parent forms group c. Importance is one non-negative vector per level per parent, output
layer included: uniform, or conductance.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from archs.mlp import MLP
from fusion._common import Layers, check_parents, flat_samples, layers_of, linear, pre_acts, to_mlp

KMEANS_MAX_ITER = 100


# ---------------------------------------------------------------- importance scores

def uniform_importance(model: MLP) -> list[Tensor]:
    """Importance 1 for every neuron of every level (hidden layers and output layer)."""
    return [torch.ones(layer.out_features, dtype=torch.float64) for layer in model.layers]


def conductance_importance(model: MLP, samples: Tensor, layer: int, steps: int = 16) -> Tensor:
    """Mean absolute conductance of each neuron of ``model.layers[layer]`` (its pre-activation).

    Conductance (Dhamdhere et al. 2019) towards the logit of the class the model predicts for each
    sample, from the all-zero baseline: a right Riemann sum over ``steps`` points of the straight
    path, ``sum_k dF/dz(alpha_k x) * (z(alpha_k x) - z(alpha_{k-1} x))``. Written here, in float64
    over all path points in one batch, with Captum's ``LayerConductance`` as the reference it is
    tested against (the two Riemann sums converge to the same integral); for bias-free ReLU
    networks the activation pattern is constant along the path and the sum is exact (gradient
    times pre-activation).
    """
    if not 0 <= layer < len(model.layers):
        raise ValueError(f"layer={layer} is not a level of this MLP (0..{len(model.layers) - 1})")
    layers = layers_of(model)
    alphas = torch.arange(steps + 1, dtype=torch.float64) / steps
    h = alphas[:, None, None] * flat_samples(model, samples)  # [steps + 1, N, D]
    with torch.enable_grad():
        for i, (w, b) in enumerate(layers):
            z = linear(h, w, b)
            if i == layer:
                z = z.detach().requires_grad_()
                z_layer = z
            h = F.relu(z) if i < len(layers) - 1 else z
        pred = h[-1].argmax(1)  # the class predicted on the sample itself (alpha = 1)
        target = h.gather(2, pred[None, :, None].expand(steps + 1, -1, 1)).sum()
        grad = torch.autograd.grad(target, z_layer)[0]
    conductance = (grad[1:] * (z_layer[1:] - z_layer[:-1]).detach()).sum(0)  # [N, width]
    return conductance.abs().mean(0)


def _importance(parents: Sequence[MLP], importance: Sequence[Sequence[Tensor]] | None) -> list[list[Tensor]]:
    if importance is None:
        return [uniform_importance(p) for p in parents]
    if len(importance) != len(parents):
        raise ValueError(f"importance has {len(importance)} entries for {len(parents)} parents")
    scores = []
    for k, (parent, per_layer) in enumerate(zip(parents, importance)):
        widths = [layer.out_features for layer in parent.layers]
        per_layer = [torch.as_tensor(s).detach().double().cpu() for s in per_layer]
        if [tuple(s.shape) for s in per_layer] != [(w,) for w in widths]:
            raise ValueError(f"importance of parent {k} must be one vector per level of sizes {widths}, "
                             f"got shapes {[list(s.shape) for s in per_layer]}")
        if any(not torch.isfinite(s).all() or (s < 0).any() for s in per_layer):
            raise ValueError(f"importance of parent {k} has negative or non-finite scores")
        scores.append(per_layer)
    return scores


# ---------------------------------------------------------------- grouping and fitting

def _group_means(acts: Tensor, weights: Tensor, groups: Tensor, k: int) -> Tensor:
    """``[N, k]``: importance-weighted mean of the columns of ``acts`` in each group.

    A group whose members all have importance 0 falls back to the plain mean. Groups must not be empty.
    """
    onehot = F.one_hot(groups, k).double()  # [P, k]
    mass = weights @ onehot
    weighted = (acts * weights) @ onehot / mass
    plain = acts @ onehot / onehot.sum(0)
    return torch.where(mass > 0, weighted, plain)


def _hungarian_groups(acts: list[Tensor], match: str) -> Tensor:
    """Parent A's neuron i forms group i; parent B's neuron joins the group of the A neuron it is matched to."""
    a, b = acts
    if match == "correlation":
        # a constant neuron has no correlation with anything: its standardised column becomes 0
        za = (a - a.mean(0)) / a.std(0).clamp_min(1e-12)
        zb = (b - b.mean(0)) / b.std(0).clamp_min(1e-12)
        cost = -(za.T @ zb) / len(a)
    else:
        cost = torch.cdist(a.T, b.T, compute_mode="donot_use_mm_for_euclid_dist")
    rows, cols = linear_sum_assignment(cost.numpy())
    groups_b = torch.empty(b.shape[1], dtype=torch.long)
    groups_b[torch.from_numpy(cols)] = torch.from_numpy(rows)
    return torch.cat([torch.arange(a.shape[1]), groups_b])


def _kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices of ``k`` distinct seed points, each drawn with probability proportional to its squared
    distance from the seeds so far (importance is left out of the seeding; the Lloyd steps use it)."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    d2 = ((points - points[chosen[0]]) ** 2).sum(1)
    while len(chosen) < k:
        if d2.sum() > 0:
            nxt = int(torch.multinomial(d2, 1, generator=generator))
        else:  # fewer distinct points than groups: take the next point not chosen yet
            nxt = next(i for i in range(len(points)) if i not in chosen)
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((points - points[nxt]) ** 2).sum(1))
    return torch.tensor(chosen)


def _weighted_kmeans(points: Tensor, weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Group index of every row of ``points`` ``[P, N]``: Lloyd's algorithm with importance-weighted centres."""
    if k > len(points):
        raise ValueError(f"cannot group {len(points)} neurons into {k} non-empty groups")
    centres = points[_kmeans_plus_plus(points, k, generator)]
    groups = None
    for _ in range(KMEANS_MAX_ITER):
        dist = torch.cdist(points, centres, compute_mode="donot_use_mm_for_euclid_dist")
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        far = dist.gather(1, new[:, None]).squeeze(1)
        for c in (counts == 0).nonzero().flatten().tolist():
            # an empty group takes the point farthest from its centre among groups that can spare one
            i = int(torch.where(counts[new] > 1, far, -1.0).argmax())
            counts[new[i]] -= 1
            counts[c] = 1
            new[i], far[i] = c, 0.0
        if groups is not None and torch.equal(new, groups):
            break
        groups = new
        centres = _group_means(points.T, weights, groups, k).T
    return groups


def _least_squares(h: Tensor, target: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Fit ``target ~ h @ w.T + b`` by least squares, taking the minimum-norm solution.

    With fewer samples than inputs (a few hundred samples, 784 pixels) the system is
    under-determined: every exact solution reproduces the targets on the fusion samples, so fusing a
    network with itself gives back the same function there. The SVD-based 'gelsd' driver picks the
    unique minimum-norm one, deliberately, instead of whatever a QR driver would return.
    """
    a = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if bias else h
    sol = torch.linalg.lstsq(a, target, driver="gelsd").solution
    return (sol[:-1].T.contiguous(), sol[-1].clone()) if bias else (sol.T.contiguous(), None)


def _adam_refine(h: Tensor, target: Tensor, group_weights: Tensor, w: Tensor, b: Tensor | None,
                 steps: int, lr: float) -> tuple[Tensor, Tensor | None]:
    """Adam on the importance-weighted MSE to the targets, from the least-squares fit; keeps the best iterate.

    Keeping the best iterate matters: the least-squares start already minimises this loss on these
    samples (the loss separates over neurons), and Adam's normalised steps would otherwise jitter
    around it at the scale of ``lr``.
    """
    total = group_weights.sum()
    weights = group_weights / total if total > 0 else torch.full_like(group_weights, 1 / len(group_weights))
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    params = [w] if b is None else [w, b]
    optimiser = torch.optim.Adam(params, lr=lr)
    best_loss, best = float("inf"), (w, b)
    with torch.enable_grad():
        for step in range(steps + 1):
            loss = (linear(h, w, b) - target).pow(2).mean(0) @ weights
            if loss.item() < best_loss:
                best_loss, best = loss.item(), (w.detach().clone(), None if b is None else b.detach().clone())
            if step == steps:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return best


def _neuron_interpolation(parents: Sequence[MLP], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None,
                          widths: Sequence[int], grouping: Callable[[list[Tensor], Tensor, int], Tensor],
                          steps: int = 0, lr: float = 0.0) -> MLP:
    """Fit the fused MLP level by level to group targets; ``grouping(level_acts, weights, width)`` forms the groups.

    Targets come from each parent's own network; the inputs of level l are the fused network's own
    activations at level l - 1 on the same samples, so each level corrects for the ones before it.
    """
    x = flat_samples(parents[0], samples)
    acts = [pre_acts(layers_of(p), x) for p in parents]
    scores = _importance(parents, importance)
    bias = parents[0].bias
    fused: Layers = []
    h = x
    for level in range(len(widths) + 1):
        level_acts = [a[level] for a in acts]
        weights = torch.cat([s[level] for s in scores])
        if level < len(widths):
            width = widths[level]
            groups = grouping(level_acts, weights, width)
        else:  # output neuron c of every parent is class c
            width = parents[0].num_classes
            groups = torch.arange(width).repeat(len(parents))
        target = _group_means(torch.cat(level_acts, 1), weights, groups, width)
        w, b = _least_squares(h, target, bias)
        if steps:
            w, b = _adam_refine(h, target, weights @ F.one_hot(groups, width).double(), w, b, steps, lr)
        fused.append((w, b))
        h = F.relu(linear(h, w, b))
    return to_mlp(parents[0], widths, fused)


def hungarian_fusion(parents: Sequence[MLP], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
                     match: str = "correlation") -> MLP:
    """HF: two parents of equal widths; pair B's neurons with A's by the Hungarian algorithm, fit each level.

    Pairs are matched on the pre-activations over ``samples`` (``match='correlation'`` maximises the
    total correlation, ``'euclidean'`` minimises the total distance). Permuting B's hidden units only
    reorders the columns of its pre-activations, so matching columns level by level is the same as
    permuting B as one goes. Each pair's target is the importance-weighted mean of its two
    pre-activations; each fused level is a least-squares fit from the fused previous level.
    """
    check_parents(parents, "hungarian_fusion", count=2, same_widths=True)
    if match not in ("correlation", "euclidean"):
        raise ValueError(f"match must be 'correlation' or 'euclidean', got {match!r}")
    return _neuron_interpolation(parents, samples, importance, parents[0].widths,
                                 lambda level_acts, weights, width: _hungarian_groups(level_acts, match))


def _kmeans_grouping(seed: int) -> Callable[[list[Tensor], Tensor, int], Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def grouping(level_acts: list[Tensor], weights: Tensor, width: int) -> Tensor:
        return _weighted_kmeans(torch.cat(level_acts, 1).T, weights, width, generator)

    return grouping


def _fused_widths(parents: Sequence[MLP], widths: Sequence[int] | None) -> list[int]:
    if widths is None:
        return list(parents[0].widths)
    if len(widths) != len(parents[0].widths):
        raise ValueError(f"widths {list(widths)} must give one width per hidden layer ({len(parents[0].widths)})")
    return [int(w) for w in widths]


def kf_linear(parents: Sequence[MLP], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
              widths: Sequence[int] | None = None, seed: int = 0) -> MLP:
    """KF-linear: any number of parents of equal depth; group all neurons of a level by weighted k-means.

    Each neuron is its pre-activation vector over ``samples``, weighted by its importance (uniform by
    default); k-means++ seeding draws from a generator seeded with ``seed``. A group's target is the
    importance-weighted mean of its members; each fused level is a least-squares fit from the fused
    previous level. The fused widths default to the first parent's.
    """
    check_parents(parents, "kf_linear", same_depth=True)
    return _neuron_interpolation(parents, samples, importance, _fused_widths(parents, widths), _kmeans_grouping(seed))


def kf_gradient(parents: Sequence[MLP], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
                widths: Sequence[int] | None = None, steps: int = 200, lr: float = 1e-2, seed: int = 0) -> MLP:
    """KF-gradient: ``kf_linear``'s groups and targets, each level then trained by Adam from the least-squares fit.

    The loss is the MSE to the group targets, each fused neuron weighted by its group's total
    importance. The best iterate is kept, so each level's loss on the fusion samples is never above
    the least-squares fit's. That fit already minimises this loss (it separates over neurons), so
    Adam can only gain by rounding: on the fusion samples kf_gradient matches kf_linear.
    """
    check_parents(parents, "kf_gradient", same_depth=True)
    return _neuron_interpolation(parents, samples, importance, _fused_widths(parents, widths), _kmeans_grouping(seed),
                                 steps=steps, lr=lr)
