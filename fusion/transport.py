"""Vanilla averaging and OTFusion (Singh & Jaggi 2020): align neurons (channels) by exact optimal transport, then
average."""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fusion._common import (POSITIONS, Level, Levels, carry_transport, check_parents, columns, inputs_of, levels_of,
                            mean_levels, pre_acts, to_network, transport_out)

EMD_MAX_ITER = 10_000_000  # POT's default (1e5) can stop early on 400-neuron layers; the result is then not optimal


def vanilla_avg(parents: Sequence[nn.Module]) -> nn.Module:
    """Parameter-wise mean of parents with identical widths and layers (no alignment of neurons)."""
    from fusion import residual  # imported here: residual.py builds on this module
    if residual.is_resnet(parents):
        return residual.vanilla_avg(parents)
    check_parents(parents, "vanilla_avg", same_widths=True, same_depth=True)
    return to_network(parents[0], mean_levels([levels_of(p) for p in parents]))


def _emd_transport(cost: Tensor) -> Tensor:
    """Exact EMD plan between uniform marginals, each column scaled to sum to 1.

    Column j then holds the convex combination of the parent's neurons that becomes anchor neuron j;
    between layers of equal width the plan is a permutation (a vertex of the Birkhoff polytope).
    """
    import ot  # imported here: the rest of the project runs where POT is not installed (POT_MISSING says so)

    plan = torch.from_numpy(ot.emd(ot.unif(cost.shape[0]), ot.unif(cost.shape[1]), cost.numpy(),
                                   numItermax=EMD_MAX_ITER))
    return plan / plan.sum(0)


def _pot_installed() -> bool:
    try:
        return importlib.util.find_spec("ot") is not None
    except ValueError:  # sys.modules["ot"] set to None: as good as missing
        return False


HAS_POT = _pot_installed()
POT_MISSING = ("POT is not installed, and OTFusion and CLAFusion align neurons with its exact EMD: pip install POT "
               "(pinned in requirements.txt)")


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
        # exact distances: the matrix-product shortcut leaves ~1e-8 where identical neurons should give 0
        cost = torch.cdist(points, anchor_points, compute_mode="donot_use_mm_for_euclid_dist")
        transport = _emd_transport(cost)
        aligned.append(transport_out(level, transport))
    return aligned


def check_otfusion_args(parents: Sequence[nn.Module], samples: Tensor | None, cost: str, anchor: int,
                        positions: str) -> None:
    """The arguments every OTFusion (chains of levels or ResNets) accepts, checked before any work."""
    if cost not in ("weight", "activation"):
        raise ValueError(f"otfusion cost must be 'weight' or 'activation', got {cost!r}")
    if positions not in POSITIONS:
        raise ValueError(f"otfusion positions must be one of {POSITIONS}, got {positions!r}")
    if cost == "activation" and samples is None:
        raise ValueError("otfusion with cost='activation' needs samples")
    if not 0 <= anchor < len(parents):
        raise ValueError(f"anchor={anchor} is not a parent index (0..{len(parents) - 1})")


def otfusion(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
             positions: str = "flatten") -> nn.Module:
    """OTFusion: align every parent to ``parents[anchor]`` by exact OT, layer by layer, then average.

    ``cost="weight"`` compares neurons by their incoming weights (a convolution's kernel flattened, the
    bias as an extra column), after the previous layer's transport; ``cost="activation"`` by their
    pre-activations on ``samples``, each parent run through its own network (a channel's values at every
    position, ``positions="flatten"``, or averaged over positions, ``"pool"``). Widths may differ; the
    fused network has the anchor's widths. ResNets go to ``fusion.residual.otfusion`` (a block's output shares
    its skip's transport).
    """
    from fusion import residual  # imported here: residual.py builds on this module
    if residual.is_resnet(parents):
        return residual.otfusion(parents, samples, cost, anchor, positions)
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
    return to_network(parents[anchor], mean_levels(aligned))
