"""REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023) for
chains of levels (MLPs, VGGs, LeNet5s).

Averaging aligned parents shrinks activations: a fused neuron averages parents' neurons that are correlated but
not equal, so its pre-activation varies less than theirs, and the collapse compounds with depth (Jordan et al.'s
"variance collapse"). REPAIR rescales every hidden neuron (channel) of the fused network so that its
pre-activation's mean and standard deviation on the samples equal the mean of its aligned parents' neurons'
(each parent run through its own aligned network; the mean, since the fusion averages the parents alike). Level
by level, since rescaling one level changes what the next one reads: the fused level's own statistics are
measured on the already repaired levels before it. The correction is folded into the level's weights and bias
(scale s = target std / own std on the outgoing weights, bias s * (b - own mean) + target mean). A level
without a bias can only be scaled: its standard deviation is set, its mean follows. The output level (the
logits) is left as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fusion.levels import (Aligned, Level, Levels, activate, apply_level, columns, inputs_of, levels_of, mean_levels,
                           pre_acts, to_network)

Stats = tuple[Tensor, Tensor]  # per channel: mean, standard deviation


@dataclass(frozen=True)
class Repaired:
    """A repaired network and the per-layer std ratio fused / parents before and after REPAIR (``std_ratios``)."""

    network: nn.Module
    ratio_before: list[float]
    ratio_after: list[float]


def channel_stats(z: Tensor) -> Stats:
    """Mean and (population) standard deviation of each channel of ``z``, over samples (and positions)."""
    flat = columns(z)
    return flat.mean(0), flat.std(0, correction=0)


def parent_targets(alignment: Aligned, x: Tensor) -> list[Stats]:
    """Per hidden level, each fused channel's target: the mean over the aligned parents of their channel's mean
    and standard deviation on ``x``."""
    per_parent = [[channel_stats(z) for z in pre_acts(levels, x)[:-1]] for levels in alignment.parents]
    return [(torch.stack([p[i][0] for p in per_parent]).mean(0), torch.stack([p[i][1] for p in per_parent]).mean(0))
            for i in range(len(per_parent[0]))]


def _renormalised(level: Level, z: Tensor, target: Stats) -> Level:
    """``level`` whose pre-activation ``z`` gets the target mean (if it has a bias) and standard deviation."""
    own_mean, own_std = channel_stats(z)
    mean, std = target
    # a constant channel has nothing to scale: it only takes the target mean
    scale = torch.where(own_std > 0, std / own_std.clamp_min(torch.finfo(own_std.dtype).tiny), 1.0)
    weight = level.weight * scale.view(-1, *[1] * (level.weight.dim() - 1))
    bias = None if level.bias is None else (level.bias - own_mean) * scale + mean
    return level.with_weights(weight, bias)


def repaired_levels(alignment: Aligned, x: Tensor, targets: list[Stats]) -> Levels:
    """The aligned parents' mean, every hidden level renormalised to its ``targets`` on inputs ``x``."""
    out: Levels = []
    h = x
    for i, level in enumerate(mean_levels(alignment.parents)):
        if i < len(targets):
            level = _renormalised(level, apply_level(level, h), targets[i])
        out.append(level)
        h = activate(level, apply_level(level, h))
    return out


def repair(alignment: Aligned, samples: Tensor) -> Repaired:
    """The fused network of ``alignment`` (the aligned parents' mean) after REPAIR on ``samples``, and its std
    ratios before and after."""
    x = inputs_of(alignment.template, samples)
    targets = parent_targets(alignment, x)
    network = to_network(alignment.template, repaired_levels(alignment, x, targets))
    return Repaired(network, _ratios(alignment.network(), x, targets), _ratios(network, x, targets))


def _ratios(network: nn.Module, x: Tensor, targets: list[Stats]) -> list[float]:
    own = [channel_stats(z) for z in pre_acts(levels_of(network), x)[:-1]]
    return [float(std.mean() / target_std.mean()) for (_, std), (_, target_std) in zip(own, targets)]


def std_ratios(network: nn.Module, alignment: Aligned, samples: Tensor) -> list[float]:
    """Per hidden level, the mean standard deviation of ``network``'s channels over that of their targets (the
    aligned parents' channels): Jordan et al.'s variance-collapse diagnostic; 1 where nothing collapsed."""
    x = inputs_of(alignment.template, samples)
    return _ratios(network, x, parent_targets(alignment, x))
