"""CLAFusion (Nguyen et al. 2022): fuse networks of different depths by cross-layer alignment, then OTFusion.

Hidden levels of the shallower parent are mapped to hidden levels of the deeper one (least-cost
strictly increasing map, first and last matched, convolutions only to convolutions at the same
resolution); identity levels fill the unmatched positions, which leaves the shallower network's
function unchanged; OTFusion does the rest.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fusion.cka import linear_cka
from fusion.depths import deep_first
from fusion.levels import (Aligned, Level, Levels, check_parents, hidden_widths, inputs_of, levels_of, pre_acts,
                           to_network)
from fusion.transport import align_by_ot


def stages(model: nn.Module) -> list[int]:
    """Per hidden level, the resolution it works at: how many max-pools come before a convolution, -1 for a
    Linear layer. CLAFusion matches layers of one stage only, so that identity layers keep every map's size."""
    out, pools = [], 0
    for level in levels_of(model)[:-1]:
        out.append(pools if level.conv else -1)
        pools += level.pool
    return out


def layer_cost_matrix(deep: nn.Module, shallow: nn.Module, samples: Tensor | None = None, kind: str = "cka") -> Tensor:
    """``[n, m]`` cost of matching shallow hidden level i to deep hidden level j.

    ``kind="cka"``: 1 - linear CKA of their pre-activations on ``samples``; ``kind="width"``:
    |width difference| / larger width. Levels of different stages (``stages``) cost infinity.
    """
    if kind == "cka":
        if samples is None:
            raise ValueError("layer_cost_matrix with kind='cka' needs samples")
        x = inputs_of(deep, samples)
        deep_acts, shallow_acts = pre_acts(levels_of(deep), x)[:-1], pre_acts(levels_of(shallow), x)[:-1]
        cost = torch.tensor([[1 - linear_cka(s, d) for d in deep_acts] for s in shallow_acts], dtype=torch.float64)
    elif kind == "width":
        cost = torch.tensor([[abs(s - d) / max(s, d) for d in hidden_widths(deep)] for s in hidden_widths(shallow)],
                            dtype=torch.float64)
    else:
        raise ValueError(f"layer cost kind must be 'cka' or 'width', got {kind!r}")
    other_stage = torch.tensor(stages(shallow))[:, None] != torch.tensor(stages(deep))[None, :]
    return cost.masked_fill(other_stage, float("inf"))


def align_layers(cost: Tensor) -> list[int]:
    """Least-cost strictly increasing map a: [n] -> [m] with a[0] = 0 and a[n-1] = m-1 (dynamic programming).

    ``cost[i, j]`` is the cost of matching shallow hidden layer i to deep hidden layer j; n <= m; an
    infinite cost forbids the match.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    n, m = cost.shape
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m shallow/deep hidden layers, got cost of shape {[n, m]}")
    if n == 1 and m > 1:
        raise ValueError("one hidden layer cannot be matched to both the first and the last hidden layer")
    # best[i, j]: least cost of mapping shallow layers 0..i with a[i] = j; a[0] = 0 is forced
    best = torch.full((n, m), float("inf"), dtype=torch.float64)
    came_from = torch.zeros((n, m), dtype=torch.long)
    best[0, 0] = cost[0, 0]
    for i in range(1, n):
        for j in range(i, m):
            prev = int(best[i - 1, :j].argmin())
            best[i, j] = best[i - 1, prev] + cost[i, j]
            came_from[i, j] = prev
    if not torch.isfinite(best[n - 1, m - 1]):
        raise ValueError("no strictly increasing layer map matches the first and last hidden layers and keeps every "
                         "layer at its resolution: the parents must pool the same number of times")
    mapping = [m - 1]
    for i in range(n - 1, 0, -1):
        mapping.append(int(came_from[i, mapping[-1]]))
    return mapping[::-1]


def _flatten_positions(levels: Levels) -> int:
    """Spatial positions per channel where the network flattens its last map (1 if it has no convolution)."""
    first_linear = next(i for i, level in enumerate(levels) if not level.conv)
    return levels[first_linear].weight.shape[1] // levels[first_linear - 1].width if first_linear else 1


def identity_level(position: Level, previous: Level, bias: bool, flatten_positions: int) -> Level:
    """A level computing the identity on the non-negative outputs of ``previous``, shaped like the deep parent's
    level ``position`` (a convolution keeps the map's size only with odd kernels and 'same' padding)."""
    if position.conv:
        kh, kw = position.weight.shape[2:]
        if kh % 2 == 0 or kw % 2 == 0 or position.padding != (kh - 1) // 2 or kh != kw:
            raise ValueError(f"cannot insert an identity convolution shaped like a {kh}x{kw} kernel with padding "
                             f"{position.padding}: it would change the map's size")
        width = previous.width
        weight = torch.zeros(width, width, kh, kw, dtype=torch.float64)
        weight[:, :, kh // 2, kw // 2] = torch.eye(width, dtype=torch.float64)
        return Level(weight, torch.zeros(width, dtype=torch.float64) if bias else None, position.padding, position.pool)
    # right after the flatten: one neuron per channel and position
    width = previous.width * flatten_positions if previous.conv else previous.width
    return Level(torch.eye(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64) if bias else None)


def _check_same_pools(deep: nn.Module, shallow: nn.Module) -> None:
    pools = [sum(level.pool for level in levels_of(p)) for p in (deep, shallow)]
    if pools[0] != pools[1]:
        raise ValueError(f"the deeper parent max-pools {pools[0]} times and the shallower {pools[1]}: CLAFusion needs "
                         "parents that pool the same number of times, so that their maps meet the flatten at one size")


def insert_identity_layers(model: nn.Module, deep: nn.Module, mapping: Sequence[int]) -> nn.Module:
    """A network as deep as ``deep`` computing ``model``'s function: hidden level i of ``model`` moves to
    position ``mapping[i]`` of ``deep``'s hidden levels, and every unmatched position gets an identity level.

    An identity after a ReLU is exact, since its inputs are non-negative (``mapping[0]`` must be 0: the raw
    inputs can be negative). An identity cannot change width, so each inserted level keeps the width of
    the level it follows (a Linear right after the flatten: one neuron per channel and position), not
    the deep network's width at that position; OT alignment copes with the width difference. Identity
    convolutions take the kernel shape of ``deep``'s convolution at their position, and every
    convolution takes ``deep``'s pools: a 2x2 max-pool commutes with an identity convolution, so moving
    a pool past inserted identities within one stage leaves the function unchanged.
    """
    _check_same_pools(deep, model)
    model_levels, deep_levels = levels_of(model), levels_of(deep)
    m = len(deep_levels) - 1
    if len(mapping) != len(model_levels) - 1:
        raise ValueError(f"mapping {list(mapping)} needs one entry per hidden level of the model "
                         f"({hidden_widths(model)})")
    if mapping[0] != 0 or any(a >= b for a, b in zip(mapping, mapping[1:])) or mapping[-1] >= m:
        raise ValueError(f"mapping {list(mapping)} must start at 0 and increase strictly below {m}")
    model_stages, deep_stages = stages(model), stages(deep)
    if any(model_stages[i] != deep_stages[p] for i, p in enumerate(mapping)):
        raise ValueError(f"mapping {list(mapping)} matches levels of different stages (model {model_stages}, deep "
                         f"{deep_stages}); identity layers cannot change a map's size")
    position = {p: i for i, p in enumerate(mapping)}
    bias = model_levels[0].bias is not None
    new_levels: Levels = []
    for p in range(m):
        if p in position:
            level = model_levels[position[p]]
            new_levels.append(replace(level, pool=deep_levels[p].pool) if level.conv else level)
        else:
            new_levels.append(identity_level(deep_levels[p], new_levels[-1], bias, _flatten_positions(deep_levels)))
    new_levels.append(model_levels[-1])
    return to_network(model, new_levels)


def clafusion(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
              ot_cost: str = "activation", target: int | None = None) -> nn.Module:
    """CLAFusion of two networks of possibly different depths: ``align_across_layers``, then average."""
    return align_across_layers(parents, samples, cost, ot_cost, target).network()


def align_across_layers(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
                        ot_cost: str = "activation", target: int | None = None) -> Aligned:
    """CLAFusion's alignment of two networks of possibly different depths: align layers, balance depths, then
    align by OT.

    The layer map minimises ``layer_cost_matrix(kind=cost)`` among maps that keep every layer at its
    stage; the shallower parent gets identity levels at the unmatched positions
    (``insert_identity_layers``); the two are aligned by OT (``ot_cost``: 'activation' or 'weight') to the
    parent ``target`` (None: the deeper one), so the fused network has the deeper parent's depth and the target's
    widths (a shallower target's inserted levels: the width of the level each follows). Equal depths go straight
    to OT alignment, with ``parents[0]`` as anchor unless ``target`` says otherwise. ResNets:
    ``fusion.residual_depth`` (blocks aligned within stages, identity blocks).
    """
    check_parents(parents, "clafusion", count=2)
    order, anchor = deep_first(parents, lambda p: len(levels_of(p)), target)
    deep, shallow = (parents[k] for k in order)
    if len(levels_of(shallow)) < len(levels_of(deep)):
        _check_same_pools(deep, shallow)
        mapping = align_layers(layer_cost_matrix(deep, shallow, samples, kind=cost))
        shallow = insert_identity_layers(shallow, deep, mapping)
    return align_by_ot([deep, shallow], samples, cost=ot_cost, anchor=anchor)
