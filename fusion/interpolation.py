"""Neuron-interpolation fusion (Luenam et al. 2025): group the parents' neurons, fit each fused level to the groups.

Level by level: every parent's pre-activations on a few hundred samples (each parent through its
own network); neurons grouped by Hungarian matching (HF, two parents) or weighted k-means (KF, any
number); a group's target is the importance-weighted mean of its members' pre-activations; the
fused level is fitted to the targets from the fused network's own previous level. Output neuron c
of every parent forms group c. Importance is one non-negative vector per level per parent, output
layer included: uniform, or conductance.

A convolution's channel is a neuron: it is grouped by its pre-activations at every sample and position
(or averaged over positions, ``positions='pool'``), its group's target is a map, and the fused
convolution is fitted to the target maps by least squares over every sample and position (through the
normal equations of the image patches, since the patch matrix of a few hundred CIFAR images has
hundreds of thousands of rows).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fusion.fitting import least_squares
from fusion.gradient import NO_REFINEMENT, AuthorsGradient, LinearInit, Refine, Refiner
from fusion.grouping import Grouping, group_means, hungarian_grouping, kmeans_grouping, normalised
from fusion.levels import (POSITIONS, SAMPLE_CHUNK, Level, Levels, activate, apply_level, check_parents, columns,
                           hidden_widths, inputs_of, levels_of, pre_acts, to_network)

CHAIN_STEPS = 200  # KF-gradient's Adam steps per level of a chain (each step is one pass of a level over the samples)
CHAIN_LR = 1e-2


# ---------------------------------------------------------------- importance scores

def uniform_importance(model: nn.Module) -> list[Tensor]:
    """Importance 1 for every neuron (channel) of every level (hidden layers and output layer)."""
    return [torch.ones(level.width, dtype=torch.float64) for level in levels_of(model)]


def conductance_importance(model: nn.Module, samples: Tensor, layer: int | None = None,
                           steps: int = 16) -> Tensor | list[Tensor]:
    """Mean absolute conductance of each neuron of level ``layer`` (its pre-activation; a channel's summed over
    its positions), or with ``layer=None`` one such vector per level, all from one pass.

    Conductance (Dhamdhere et al. 2019) towards the logit of the class the model predicts for each
    sample, from the all-zero baseline: a right Riemann sum over ``steps`` points of the straight
    path, ``sum_k dF/dz(alpha_k x) * (z(alpha_k x) - z(alpha_{k-1} x))``. Written here, over all path
    points of a chunk of samples at once, with Captum's ``LayerConductance`` as the reference it is
    tested against (the two Riemann sums converge to the same integral); for bias-free ReLU
    networks the activation pattern is constant along the path and the sum is exact (gradient
    times pre-activation).
    """
    levels = levels_of(model)
    if layer is not None and not 0 <= layer < len(levels):
        raise ValueError(f"layer={layer} is not a level of this network (0..{len(levels) - 1})")
    # float64 like the rest of fusion/, except for convolutional networks, which run in their own precision:
    # importance needs no float64 there, and float64 convolutions are several times slower on CPUs
    dtype = next(model.parameters()).dtype if any(level.conv for level in levels) else torch.float64
    levels = [level.with_weights(level.weight.to(dtype), None if level.bias is None else level.bias.to(dtype))
              for level in levels]
    x = inputs_of(model, samples).to(dtype)
    totals = [torch.zeros(level.width, dtype=torch.float64) for level in levels]
    for chunk in x.split(SAMPLE_CHUNK):  # every path point of a chunk at once; chunks bound the memory
        for total, conductance in zip(totals, sample_conductance(levels, chunk, steps)):
            total += conductance.abs().sum(0).double()
    scores = [total / len(x) for total in totals]
    return scores if layer is None else scores[layer]


def sample_conductance(levels: Levels, x: Tensor, steps: int) -> list[Tensor]:
    """Per level, ``[n, width]``: each sample's conductance of each neuron, from one forward and backward pass."""
    alphas = torch.arange(steps + 1, dtype=x.dtype) / steps
    h = (alphas.view(-1, *[1] * x.dim()) * x).flatten(0, 1)  # [(steps + 1) * n, ...]
    zs = []
    with torch.enable_grad():
        h.requires_grad_()  # so that every level's pre-activation is in the graph, biases or not
        for i, level in enumerate(levels):
            zs.append(apply_level(level, h))
            h = activate(level, zs[-1]) if i < len(levels) - 1 else zs[-1]
        logits = h.view(steps + 1, len(x), -1)
        pred = logits[-1].argmax(1)  # the class predicted on the sample itself (alpha = 1)
        target = logits.gather(2, pred[None, :, None].expand(steps + 1, -1, 1)).sum()
        grads = torch.autograd.grad(target, zs)
    out = []
    for z, grad in zip(zs, grads):
        z_path = z.detach().view(steps + 1, len(x), *z.shape[1:])
        conductance = (grad.view_as(z_path)[1:] * (z_path[1:] - z_path[:-1])).sum(0)  # [n, width, (H, W)]
        out.append(conductance.flatten(2).sum(2) if conductance.dim() > 2 else conductance)
    return out


def _importance(parents: Sequence[nn.Module], importance: Sequence[Sequence[Tensor]] | None) -> list[list[Tensor]]:
    if importance is None:
        return [uniform_importance(p) for p in parents]
    if len(importance) != len(parents):
        raise ValueError(f"importance has {len(importance)} entries for {len(parents)} parents")
    scores = []
    for k, (parent, per_layer) in enumerate(zip(parents, importance)):
        widths = [level.width for level in levels_of(parent)]
        per_layer = [torch.as_tensor(s).detach().double().cpu() for s in per_layer]
        if [tuple(s.shape) for s in per_layer] != [(w,) for w in widths]:
            raise ValueError(f"importance of parent {k} must be one vector per level of sizes {widths}, "
                             f"got shapes {[list(s.shape) for s in per_layer]}")
        if any(not torch.isfinite(s).all() or (s < 0).any() for s in per_layer):
            raise ValueError(f"importance of parent {k} has negative or non-finite scores")
        scores.append(per_layer)
    return scores


# ---------------------------------------------------------------- fitting a level

def _fit_linear(h: Tensor, target: Tensor, template: Level, group_weights: Tensor, refine: Refine | None,
                ridge: float) -> Level:
    """A Linear level fitted to ``target`` ``[N, width]`` from inputs ``h`` (least squares, then ``refine`` if given,
    on the same objective: the weighted MSE plus the ridge penalty)."""
    h = h.flatten(1)
    w, b = least_squares(h, target, template.bias is not None, ridge)
    if refine is not None:
        weights = normalised(group_weights)
        per_row = ridge * (h.pow(2).sum() + (len(h) if b is not None else 0)) / len(h) / len(h)

        def loss_of(w: Tensor, b: Tensor | None = None) -> Tensor:
            norm = w.pow(2).sum(1) + (0 if b is None else b.pow(2))
            return ((F.linear(h, w, b) - target).pow(2).mean(0) + per_row * norm) @ weights

        w, *rest = refine([w] if b is None else [w, b], loss_of)
        b = rest[0] if rest else None
    return template.with_weights(w, b)


def _patches(h: Tensor, template: Level, bias: bool) -> Tensor:
    """``[n * positions, in * kh * kw (+ 1)]``: every input patch a stride-1 convolution like ``template`` reads,
    rows in the order of ``columns`` (sample, then position), columns in the order of a flattened kernel.

    Cut from strided views of the padded maps instead of ``F.unfold``, which is about three times
    slower in float64 on the CPU and gives the same matrix."""
    kh, kw = template.weight.shape[2:]
    pad = template.padding
    windows = F.pad(h, (pad, pad, pad, pad)).unfold(2, kh, 1).unfold(3, kw, 1)  # [n, in, H, W, kh, kw]
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, h.shape[1] * kh * kw)
    return torch.cat([patches, torch.ones(len(patches), 1, dtype=h.dtype)], 1) if bias else patches


def _fit_conv(h: Tensor, target: Tensor, template: Level, width: int, group_weights: Tensor,
              refine: Refine | None, ridge: float) -> Level:
    """A convolution like ``template`` with ``width`` channels fitted to ``target`` ``[N * positions, width]``.

    The least-squares problem over every patch is solved through its normal equations, accumulated over
    chunks of samples: ``gram = A^T A`` is only ``in * kh * kw + 1`` square. The minimum-norm solution of
    the normal equations is the minimum-norm least-squares solution. The gradient variants (``refine``) run Adam on
    the same weighted MSE written through ``gram``, so a step costs no pass over the patches.
    """
    bias = template.bias is not None
    rows_per_sample = len(target) // len(h)
    gram = cross = None
    for i, chunk in enumerate(h.split(SAMPLE_CHUNK)):
        a = _patches(chunk, template, bias)
        y = target[i * SAMPLE_CHUNK * rows_per_sample:][:len(a)]
        gram = a.T @ a if gram is None else gram + a.T @ a
        cross = a.T @ y if cross is None else cross + a.T @ y
    count = len(target)
    penalty = ridge * gram.diagonal().sum() / count  # ridge x the mean squared norm of a patch, as for a Linear
    gram = gram + penalty * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.lstsq(gram, cross, driver="gelsd").solution  # [in * kh * kw (+ 1), width]
    if refine is not None:  # the weighted MSE plus the ridge penalty, through the (penalised) Gram matrix
        weights, square = normalised(group_weights), target.pow(2).sum(0)
        sol, = refine([sol], lambda s: (((s * (gram @ s)).sum(0) - 2 * (s * cross).sum(0) + square) / count)
                      @ weights)
    kernel = sol[:-1] if bias else sol
    weight = kernel.T.reshape(width, h.shape[1], *template.weight.shape[2:]).contiguous()
    return template.with_weights(weight, sol[-1].clone() if bias else None)


def _neuron_interpolation(parents: Sequence[nn.Module], samples: Tensor,
                          importance: Sequence[Sequence[Tensor]] | None, widths: Sequence[int],
                          grouping: Grouping, refiner: Refiner = NO_REFINEMENT,
                          positions: str = "flatten", ridge: float = 0.0) -> nn.Module:
    """Fit the fused network level by level to group targets; ``grouping(level_columns, weights, width)`` forms
    the groups from each parent's ``columns`` of the level (``positions``: how a channel's map becomes one);
    ``refiner`` refines each least-squares fit by gradient steps (fusion/gradient.py; by default it does not).

    Targets come from each parent's own network; the inputs of level l are the fused network's own
    activations at level l - 1 on the same samples, so each level corrects for the ones before it.
    The fused network keeps the first parent's kernels and pools.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be 0 or more, got {ridge}")
    x = inputs_of(parents[0], samples)
    acts = [pre_acts(levels_of(p), x) for p in parents]
    scores = _importance(parents, importance)
    templates = levels_of(parents[0])
    fused: Levels = []
    h = x
    for level, template in enumerate(templates):
        weights = torch.cat([s[level] for s in scores])
        flat = [columns(a[level]) for a in acts]  # a copy of every map: made once, read by grouping and targets
        if level < len(widths):
            width = widths[level]
            groups = grouping(flat if positions == "flatten" else [columns(a[level], positions) for a in acts],
                              weights, width)
        else:  # output neuron c of every parent is class c
            width = template.width
            groups = torch.arange(width).repeat(len(parents))
        target = group_means(torch.cat(flat, 1), weights, groups, width)
        group_weights = weights @ F.one_hot(groups, width).double()
        last = level == len(templates) - 1
        refine = refiner.refine(level, last)
        if template.conv:
            fused.append(_fit_conv(h, target, template, width, group_weights, refine, ridge))
        else:
            fused.append(_fit_linear(h, target, template, group_weights, refine, ridge))
        if last:
            fused[-1] = refiner.output(level, h, fused[-1], [a[level] for a in acts])
        h = activate(fused[-1], apply_level(fused[-1], h))
    return to_network(parents[0], fused)


def hungarian_fusion(parents: Sequence[nn.Module], samples: Tensor,
                     importance: Sequence[Sequence[Tensor]] | None = None, match: str = "correlation",
                     positions: str = "flatten", ridge: float = 0.0) -> nn.Module:
    """HF: two parents of equal widths; pair B's neurons with A's by the Hungarian algorithm, fit each level.

    Pairs are matched on the pre-activations over ``samples`` (``match='correlation'`` maximises the
    total correlation, ``'euclidean'`` minimises the total distance; a channel's values at every position
    count as samples, or their mean with ``positions='pool'``). Permuting B's hidden units only
    reorders the columns of its pre-activations, so matching columns level by level is the same as
    permuting B as one goes. Each pair's target is the importance-weighted mean of its two
    pre-activations; each fused level is a least-squares fit from the fused previous level.
    """
    grouping = hungarian_grouping(match)
    check_parents(parents, "hungarian_fusion", count=2, same_widths=True, same_depth=True)
    return _neuron_interpolation(parents, samples, importance, hidden_widths(parents[0]), grouping,
                                 positions=positions, ridge=ridge)


def _fused_widths(parents: Sequence[nn.Module], widths: Sequence[int] | None) -> list[int]:
    own = hidden_widths(parents[0])
    if widths is None:
        return own
    if len(widths) != len(own):
        raise ValueError(f"widths {list(widths)} must give one width per hidden layer ({len(own)}; a convolution's "
                         "width is its channel count)")
    return [int(w) for w in widths]


def kf_linear(parents: Sequence[nn.Module], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
              widths: Sequence[int] | None = None, seed: int = 0, positions: str = "flatten",
              ridge: float = 0.0) -> nn.Module:
    """KF-linear: any number of parents of equal depth; group all neurons of a level by weighted k-means.

    Each neuron is its pre-activation vector over ``samples`` (a channel's: over samples and positions,
    or averaged over positions with ``positions='pool'``), weighted by its importance (uniform by
    default); k-means++ seeding draws from a generator seeded with ``seed``. A group's target is the
    importance-weighted mean of its members; each fused level is a least-squares fit from the fused
    previous level. The fused widths (one per convolution and hidden Linear layer) default to the first
    parent's. ``ridge > 0`` fits every level by ridge regression instead (``fitting.least_squares`` says how it
    is scaled); 0 is the plain minimum-norm least-squares fit. ResNets: fusion/residual_fit.py, a block a level.
    """
    check_parents(parents, "kf_linear", same_depth=True)
    return _neuron_interpolation(parents, samples, importance, _fused_widths(parents, widths), kmeans_grouping(seed),
                                 positions=positions, ridge=ridge)


def kf_gradient(parents: Sequence[nn.Module], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
                widths: Sequence[int] | None = None, steps: int | None = None, lr: float | None = None,
                seed: int = 0, positions: str = "flatten", ridge: float = 0.0,
                authors: AuthorsGradient | None = None) -> nn.Module:
    """KF-gradient: ``kf_linear``'s groups and targets, each level then trained by Adam from the least-squares fit.

    ``steps`` and ``lr`` (None: ``CHAIN_STEPS`` at ``CHAIN_LR``) are Adam's per level (for a ResNet's blocks,
    ``residual_fit.kf_gradient`` has its own).

    The loss is the MSE to the group targets, each fused neuron weighted by its group's total
    importance. The best iterate is kept, so each level's loss on the fusion samples is never above
    the least-squares fit's. That fit already minimises this loss (it separates over neurons), so
    Adam can only gain by rounding: on the fusion samples kf_gradient matches kf_linear. On ResNets a residual
    block is a level with no closed-form fit, and Adam trains it end to end from the piecewise least-squares
    start (fusion/residual_fit.py): there the two differ.

    ``authors``: the variant as the neuron-interpolation authors describe it instead (``gradient.AuthorsGradient``:
    its own steps and learning rates, the last iterate, optional perturbation, the output level distilled towards
    the parents' mean output); ``steps`` and ``lr`` must then be None.
    """
    check_parents(parents, "kf_gradient", same_depth=True)
    if authors is not None and (steps is not None or lr is not None):
        raise ValueError("kf_gradient: the authors' variant has its own steps and learning rates (AuthorsGradient); "
                         "leave steps and lr unset")
    refiner = authors if authors is not None else LinearInit(CHAIN_STEPS if steps is None else steps,
                                                             CHAIN_LR if lr is None else lr)
    return _neuron_interpolation(parents, samples, importance, _fused_widths(parents, widths), kmeans_grouping(seed),
                                 refiner, positions=positions, ridge=ridge)
