"""Vanilla averaging and OTFusion (Singh & Jaggi 2020) of chains of levels (MLPs, VGGs, LeNet5s): align neurons
(channels) by exact optimal transport, then average. ResNets: fusion/residual.py."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fusion.levels import (Aligned, Level, Levels, carry_transport, check_parents, columns, inputs_of, levels_of,
                           pre_acts, transport_out)
from fusion.ot import check_otfusion_args, distances, emd_transport


def align_as_they_are(parents: Sequence[nn.Module]) -> Aligned:
    """Parents with identical widths and layers, their neurons left where they are (vanilla averaging)."""
    check_parents(parents, "vanilla_avg", same_widths=True, same_depth=True)
    return Aligned(parents[0], [levels_of(p) for p in parents])


def vanilla_avg(parents: Sequence[nn.Module]) -> nn.Module:
    """Parameter-wise mean of parents with identical widths and layers (no alignment of neurons)."""
    return align_as_they_are(parents).network()


def _points(level: Level) -> Tensor:
    """One row per neuron: its incoming weights (a convolution's kernel flattened), the bias as an extra column."""
    w = level.weight.flatten(1)
    return w if level.bias is None else torch.cat([w, level.bias[:, None]], 1)


def _ot_align(levels: Levels, anchor: Levels, acts: list[Tensor] | None = None,
              anchor_acts: list[Tensor] | None = None, positions: str = "flatten") -> Levels:
    """``levels`` re-expressed in ``anchor``'s neuron basis; weight cost, or activation cost when acts are given."""
    aligned: Levels = []
    transport = None  # the inputs are shared, so the first level's input channels need no transport
    for i, (level, anchor_level) in enumerate(zip(levels, anchor)):
        if transport is not None:
            level = carry_transport(level, transport)
        if i == len(levels) - 1:
            aligned.append(level)  # output neurons are the classes, already aligned
            break
        if acts is None:
            points, anchor_points = _points(level), _points(anchor_level)
        else:
            points, anchor_points = columns(acts[i], positions).T, columns(anchor_acts[i], positions).T
        transport = emd_transport(distances(points, anchor_points))
        aligned.append(transport_out(level, transport))
    return aligned


def otfusion(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
             positions: str = "flatten") -> nn.Module:
    """OTFusion: align every parent to ``parents[anchor]`` by exact OT, layer by layer (``align_by_ot``), then
    average."""
    return align_by_ot(parents, samples, cost, anchor, positions).network()


def align_by_ot(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
                positions: str = "flatten") -> Aligned:
    """Every parent aligned to ``parents[anchor]`` by exact OT, layer by layer (OTFusion before its average).

    ``cost="weight"`` compares neurons by their incoming weights (a convolution's kernel flattened, the
    bias as an extra column), after the previous layer's transport; ``cost="activation"`` by their
    pre-activations on ``samples``, each parent run through its own network (a channel's values at every
    position, ``positions="flatten"``, or averaged over positions, ``"pool"``). Widths may differ; the
    fused network has the anchor's widths.
    """
    check_parents(parents, "otfusion", same_depth=True)
    check_otfusion_args(parents, samples, cost, anchor, positions)
    anchor_levels = levels_of(parents[anchor])
    x = inputs_of(parents[anchor], samples) if cost == "activation" else None
    anchor_acts = None if x is None else pre_acts(anchor_levels, x)
    aligned = []
    for k, parent in enumerate(parents):
        levels = levels_of(parent)
        if k == anchor:
            aligned.append(levels)
        else:
            aligned.append(_ot_align(levels, anchor_levels, None if x is None else pre_acts(levels, x), anchor_acts,
                                     positions))
    return Aligned(parents[anchor], aligned)
