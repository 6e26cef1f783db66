"""Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa, ICLR 2023) for chains of levels (MLPs, VGGs,
LeNet5s): permute every other parent's hidden neurons (channels) onto the first parent's, then average.

A permutation of a level's neurons leaves the network's function unchanged when the next level's inputs move with
them. Weight matching looks for the permutations that make parent B's weights as close as possible to parent A's,
i.e. that maximise the sum over levels of the inner products <W_l^A, P_l W_l^B P_{l-1}^T> (biases included). That
objective couples neighbouring levels, so it is maximised by coordinate descent: one level's permutation at a time,
the others held, is a linear assignment problem (its incoming weights after the previous level's permutation, and
its outgoing weights after the next level's), solved exactly (``scipy.optimize.linear_sum_assignment``); the levels
are visited in a seeded random order, and sweeps repeat until none changes a permutation or ``iterations`` ran.
It reads no data. A channel's incoming weights are its whole kernel; its outgoing weights, every kernel position (or
every flattened position, across the flatten) of the next level that reads it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fusion.levels import Aligned, Level, Levels, carry_transport, check_parents, levels_of, transport_out

ITERATIONS = 100  # sweeps over the levels at most; weight matching usually settles within a few
TOLERANCE = 1e-12  # relative gain below which a new assignment is a tie with the current one


def _matrix(perm: Tensor) -> Tensor:
    """The ``[B width, A width]`` 0/1 matrix putting B's neuron ``perm[i]`` at position i (levels.py's transports)."""
    plan = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    plan[perm, torch.arange(len(perm))] = 1.0
    return plan


def _incoming(level: Level) -> Tensor:
    """One row per neuron: its incoming weights flattened, its bias as an extra column."""
    w = level.weight.flatten(1)
    return w if level.bias is None else torch.cat([w, level.bias[:, None]], 1)


def _outgoing(level: Level, width: int) -> Tensor:
    """``[width, rest]``: for each neuron of the level before ``level``, every weight of ``level`` that reads it
    (over output neurons and kernel or flattened positions)."""
    w = level.weight
    blocks = w.reshape(len(w), width, -1)  # [out, width, kernel positions or flattened positions (1 for a Linear)]
    return blocks.transpose(0, 1).reshape(width, -1)


def _level_cost(a: Levels, b: Levels, perms: list[Tensor], i: int) -> Tensor:
    """``[A width, B width]``: how much B's neuron j agrees with A's neuron i at hidden level i, the permutations of
    the levels before and after held."""
    b_in = b[i] if i == 0 else carry_transport(b[i], _matrix(perms[i - 1]))
    score = _incoming(a[i]) @ _incoming(b_in).T
    after = b[i + 1]
    if i + 1 < len(perms):  # the next level is hidden too: its neurons are permuted already
        after = transport_out(after, _matrix(perms[i + 1]))
    width = a[i].width
    return score + _outgoing(a[i + 1], width) @ _outgoing(after, width).T


def weight_matching(a: Levels, b: Levels, iterations: int = ITERATIONS, seed: int = 0) -> list[Tensor]:
    """Per hidden level, the permutation of B's neurons onto A's (``perm[i]``: B's neuron at A's position i) found by
    coordinate descent on the summed weight inner products, from the identity."""
    if iterations < 1:
        raise ValueError(f"rebasin needs iterations >= 1, got {iterations}")
    perms = [torch.arange(level.width) for level in a[:-1]]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        changed = False
        for i in torch.randperm(len(perms), generator=generator).tolist():
            cost = _level_cost(a, b, perms, i)
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            perm = torch.from_numpy(cols)[torch.from_numpy(rows).argsort()]
            new, old = (float(cost[torch.arange(len(p)), p].sum()) for p in (perm, perms[i]))
            # only a strictly better assignment counts as a change: ties and rounding would otherwise never settle
            if new > old + TOLERANCE * abs(old):
                perms[i], changed = perm, True
        if not changed:
            break
    return perms


def permuted(levels: Levels, perms: Sequence[Tensor]) -> Levels:
    """``levels`` with hidden level i's neurons reordered by ``perms[i]`` and every next level's inputs with them:
    the same function."""
    out: Levels = []
    for i, level in enumerate(levels):
        if i > 0:
            level = carry_transport(level, _matrix(perms[i - 1]))
        out.append(transport_out(level, _matrix(perms[i])) if i < len(perms) else level)
    return out


def align_by_weight_matching(parents: Sequence[nn.Module], iterations: int = ITERATIONS, seed: int = 0) -> Aligned:
    """Every parent's neurons permuted onto the first parent's by weight matching (each against the first alone);
    their average is the fused network (``Aligned.network``). Parents of one architecture: same depth and widths."""
    check_parents(parents, "rebasin", same_depth=True, same_widths=True)
    anchor = levels_of(parents[0])
    aligned = [anchor]
    for parent in parents[1:]:
        levels = levels_of(parent)
        aligned.append(permuted(levels, weight_matching(anchor, levels, iterations, seed)))
    return Aligned(parents[0], aligned)


def rebasin(parents: Sequence[nn.Module], iterations: int = ITERATIONS, seed: int = 0) -> nn.Module:
    """Git Re-Basin weight matching of two or more parents, then their average."""
    return align_by_weight_matching(parents, iterations, seed).network()
