"""Neuron interpolation (HF, KF-linear, KF-gradient; fusion/interpolation.py) of ResNets, a residual block as a level.

The stem, then every block, then the classifier, in order; each level's neurons are its output channels. A
block's channels are grouped where their space is defined (fusion/residual.py): its middle channels by their
pre-activations after its first convolution, its output channels, for a projection block, by the block's sum
before its ReLU; an identity-skip block writes the stream it reads, so its output channels keep the stream's
groups. A group's target is the (uniformly weighted) mean of its members' pre-activations, each parent run
through its own network; the fused network reads its own previous level's output.

A single convolution has a closed-form fit (least squares over every sample and position, through the normal
equations of its input patches); a block has none, since its two convolutions sit on either side of a ReLU.
KF-linear (and HF) fits it in closed form piece by piece: the first convolution to the middle groups' targets,
then the second (jointly with the projection shortcut, or to the target minus the skip) from the fused
middle channels. KF-gradient starts there and trains the whole block by Adam on the weighted MSE of its output
before the ReLU, end to end through the inner ReLU, keeping the best iterate: this is where KF-gradient differs
from KF-linear on a ResNet (on a chain of levels the least-squares fit already minimises that loss, and the two
match). The fused network has parent 0's widths, kernels and flags; with batch norm, a fused norm is the identity
holding the fitted bias (weight 1, bias b, running mean 0, running variance 1 - eps).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from archs.resnet import BasicBlock, ResNet
from fusion.fitting import best_of_adam, least_squares
from fusion.grouping import Grouping, group_means, hungarian_grouping, kmeans_grouping, normalised
from fusion.levels import POSITIONS, SAMPLE_CHUNK, columns
from fusion.residual import check_resnets, norm_eps, plan_of, space_activations, with_state

# KF-gradient's Adam per block: every step runs the block over every sample and position, so fewer steps than a
# chain's 200 keep a ResNet18's fusion within seconds to a minute on a CPU core; a smaller rate than a chain's
# 1e-2 suits convolution kernels whose weights are ~0.1 (the best iterate is kept either way)
BLOCK_STEPS = 50
BLOCK_LR = 1e-3


def _patches(h: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """``[n * positions, channels * kernel^2]``: the input patches a convolution reads, rows in ``columns``' order."""
    windows = F.pad(h, (padding,) * 4).unfold(2, kernel, stride).unfold(3, kernel, stride)  # [n, C, H, W, k, k]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, h.shape[1] * kernel * kernel)


def fit_convs(parts: Sequence[tuple[Tensor, int, int, int]], target: Tensor, bias: bool,
              ridge: float = 0.0) -> tuple[list[Tensor], Tensor | None]:
    """Convolutions ``(inputs, kernel, stride, padding)`` whose outputs (and one shared bias) add up to ``target``
    ``[N * positions, width]`` in least squares (ridge ``ridge`` x the mean squared norm of an input row), through
    the normal equations accumulated over chunks of samples; the minimum-norm solution."""
    n = len(parts[0][0])
    rows = len(target) // n
    gram = cross = None
    for start in range(0, n, SAMPLE_CHUNK):
        blocks = [_patches(h[start:start + SAMPLE_CHUNK], k, s, p) for h, k, s, p in parts]
        if bias:
            blocks.append(torch.ones(len(blocks[0]), 1, dtype=target.dtype))
        a = torch.cat(blocks, 1)
        y = target[start * rows:start * rows + len(a)]
        gram = a.T @ a if gram is None else gram + a.T @ a
        cross = a.T @ y if cross is None else cross + a.T @ y
    penalty = ridge * gram.diagonal().sum() / len(target)
    sol = torch.linalg.lstsq(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), cross, driver="gelsd").solution
    weights, offset = [], 0
    for h, k, _, _ in parts:
        size = h.shape[1] * k * k
        weights.append(sol[offset:offset + size].T.reshape(target.shape[1], h.shape[1], k, k).contiguous())
        offset += size
    return weights, sol[-1].clone() if bias else None


def block_output(h: Tensor, p: dict[str, Tensor | None], stride: int) -> tuple[Tensor, Tensor]:
    """A fused block's middle (after its ReLU) and its output before the final ReLU, from its folded weights."""
    mid = F.relu(F.conv2d(h, p["w1"], p["b1"], stride, 1))
    skip = h if p["ws"] is None else F.conv2d(h, p["ws"], None, stride)
    return mid, F.conv2d(mid, p["w2"], p["b2"], 1, 1) + skip


def _targets(acts: list[Tensor], grouping: Grouping | None, groups: Tensor | None, width: int,
             positions: str) -> tuple[Tensor, Tensor, Tensor]:
    """Groups of the parents' channels (from ``grouping`` over their ``positions`` columns, unless ``groups`` is
    given), each group's mean column over every sample and position, and the groups' normalised weights."""
    weights = torch.ones(sum(a.shape[1] for a in acts), dtype=torch.float64)  # uniform importance
    if groups is None:
        groups = grouping([columns(a, positions) for a in acts], weights, width)
    target = group_means(torch.cat([columns(a) for a in acts], 1), weights, groups, width)
    return groups, target, normalised(weights @ F.one_hot(groups, width).double())


def _refine(h: Tensor, p: dict[str, Tensor | None], stride: int, target: Tensor, group_weights: Tensor,
            steps: int, lr: float, dtype: torch.dtype) -> dict[str, Tensor | None]:
    """KF-gradient's step: Adam on the block's weighted output MSE, in the parents' precision; the best iterate."""
    names = [k for k, v in p.items() if v is not None]
    h_, target_, w_ = h.to(dtype), target.to(dtype), group_weights.to(dtype)

    def loss_of(*values: Tensor) -> Tensor:
        _, out = block_output(h_, {**p, **dict(zip(names, values))}, stride)
        return (columns(out) - target_).pow(2).mean(0) @ w_

    best = best_of_adam([p[k].to(dtype) for k in names], loss_of, steps, lr)
    return {**p, **{k: v.double() for k, v in zip(names, best)}}


def interpolate(parents: Sequence[ResNet], samples: Tensor, grouping: Grouping, steps: int = 0, lr: float = 1e-2,
                positions: str = "flatten", ridge: float = 0.0) -> ResNet:
    """Fit a ResNet shaped like ``parents[0]`` level by level (stem, blocks, classifier) to group targets."""
    template = parents[0]
    plan = plan_of(template)
    blocks = [(f"body.{i}", b) for i, b in enumerate(template.body) if isinstance(b, BasicBlock)]
    extra = [name for p, _ in blocks for name in (f"{p}.bn2", f"{p}.shortcut")] + ["fc"]
    x = samples.detach().double().cpu().contiguous()
    acts = [space_activations(parent, x, plan, extra) for parent in parents]
    bias = template.bias or template.batch_norm
    dtype = next(template.parameters()).dtype
    fused: dict[str, Tensor | None] = {}

    groups, target, _ = _targets([a["stem"] for a in acts], grouping, None, template.stem.out_channels, positions)
    (fused["body.0"],), fused["body.0.bias"] = fit_convs([(x, 3, 1, 1)], target, bias, ridge)
    h = F.relu(F.conv2d(x, fused["body.0"], fused["body.0.bias"], 1, 1))
    stream = groups
    for p, block in blocks:
        stride = block.conv1.stride[0]
        _, target, _ = _targets([a[f"{p}.mid"] for a in acts], grouping, None, block.conv1.out_channels, positions)
        (w1,), b1 = fit_convs([(h, 3, stride, 1)], target, bias, ridge)
        mid = F.relu(F.conv2d(h, w1, b1, stride, 1))
        outs = [a[f"{p}.bn2"] + a[f"{p}.shortcut"] for a in acts]
        width = block.conv2.out_channels
        if block.projection is not None:  # a new stream: grouped here, fitted with the shortcut
            stream, target, group_weights = _targets(outs, grouping, None, width, positions)
            (w2, ws), b2 = fit_convs([(mid, 3, 1, 1), (h, 1, stride, 0)], target, bias, ridge)
        else:  # the stream's groups; the skip adds the fused input itself
            _, target, group_weights = _targets(outs, None, stream, width, positions)
            (w2,), b2 = fit_convs([(mid, 3, 1, 1)], target - columns(h), bias, ridge)
            ws = None
        params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "ws": ws}
        if steps:
            params = _refine(h, params, stride, target, group_weights, steps, lr, dtype)
        fused.update({f"{p}.conv1": params["w1"], f"{p}.conv1.bias": params["b1"], f"{p}.conv2": params["w2"],
                      f"{p}.conv2.bias": params["b2"], f"{p}.shortcut.0": params["ws"]})
        h = F.relu(block_output(h, params, stride)[1])
    pooled = h.mean((2, 3))
    logits = [a["fc"] for a in acts]
    classes = torch.arange(template.num_classes).repeat(len(parents))
    target = group_means(torch.cat(logits, 1), torch.ones(len(classes), dtype=torch.float64), classes,
                          template.num_classes)
    fc_weight, fc_bias = least_squares(pooled, target, True, ridge)
    return with_state(template, {"fc.weight": fc_weight, "fc.bias": fc_bias} | _as_state(template, fused))


def _as_state(template: ResNet, fused: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """Folded weights and biases as ``template``'s entries: a bias goes to the convolution when it has one, else
    to its batch norm, made the identity around it."""
    state: dict[str, Tensor] = {}
    eps = norm_eps(template)
    norms = {"body.0": "body.1"}  # each convolution's norm
    norms |= {conv: conv.replace("conv", "bn") for conv in fused if conv.endswith(("conv1", "conv2"))}
    norms |= {conv: conv[:-1] + "1" for conv in fused if conv.endswith("shortcut.0")}
    for conv, norm in norms.items():
        weight = fused[conv]
        if weight is None:
            continue
        state[f"{conv}.weight"] = weight
        b = fused.get(f"{conv}.bias")
        b = torch.zeros(len(weight), dtype=torch.float64) if b is None else b
        if template.bias:
            state[f"{conv}.bias"] = b
        if template.batch_norm:
            state |= {f"{norm}.weight": torch.ones_like(b), f"{norm}.bias": b if not template.bias else b * 0,
                      f"{norm}.running_mean": torch.zeros_like(b), f"{norm}.running_var": torch.full_like(b, 1 - eps)}
    return state


def _checked(parents: Sequence[nn.Module], method: str, importance: Sequence[Sequence[Tensor]] | None,
             widths: Sequence[int] | None, positions: str, count: int | None = None) -> None:
    """What the chains' neuron interpolation takes and a ResNet's does not, refused in one line before any work."""
    check_resnets(parents, method, count=count, same_widths=count == 2)
    if importance is not None or widths is not None:
        raise ValueError(f"{method} fuses ResNets with uniform importance into parent 0's widths; leave importance "
                         "and widths unset")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def hungarian_fusion(parents: Sequence[nn.Module], samples: Tensor,
                     importance: Sequence[Sequence[Tensor]] | None = None, match: str = "correlation",
                     positions: str = "flatten", ridge: float = 0.0) -> ResNet:
    """HF of two ResNets of one depth and width: Hungarian pairs of channels, a block as a level."""
    grouping = hungarian_grouping(match)
    _checked(parents, "hungarian_fusion", importance, None, positions, count=2)
    return interpolate(parents, samples, grouping, positions=positions, ridge=ridge)


def kf_linear(parents: Sequence[nn.Module], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
              widths: Sequence[int] | None = None, seed: int = 0, positions: str = "flatten",
              ridge: float = 0.0) -> ResNet:
    """KF-linear of ResNets of one depth: k-means groups of every parent's channels, blocks fitted piece by piece."""
    _checked(parents, "kf_linear", importance, widths, positions)
    return interpolate(parents, samples, kmeans_grouping(seed), positions=positions, ridge=ridge)


def kf_gradient(parents: Sequence[nn.Module], samples: Tensor, importance: Sequence[Sequence[Tensor]] | None = None,
                widths: Sequence[int] | None = None, steps: int | None = None, lr: float | None = None,
                seed: int = 0, positions: str = "flatten", ridge: float = 0.0) -> ResNet:
    """KF-gradient of ResNets: ``kf_linear``'s fit, each block then trained end to end by Adam (``steps`` at ``lr``
    per block; None: ``BLOCK_STEPS`` at ``BLOCK_LR``)."""
    _checked(parents, "kf_gradient", importance, widths, positions)
    return interpolate(parents, samples, kmeans_grouping(seed), BLOCK_STEPS if steps is None else steps,
                       BLOCK_LR if lr is None else lr, positions, ridge)
