"""Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa, ICLR 2023) for ResNets (archs/resnet.py): permute
every other parent's channels onto the first parent's, one permutation per channel space (fusion/residual.py),
then average.

A space's channels move together (a block's output with its skip), so permuting a space's rows in every entry
that writes it and its columns in every entry that reads it leaves the network's function unchanged. Weight
matching looks for the permutations that maximise the summed inner products <A_e, B_e with its rows and columns
permuted> over the state-dict entries e of ``plan_of`` (weights, biases, batch norms' weight and bias; running
means and variances are statistics of the data, not weights: they move with their channels but are not matched).
As for chains (fusion/weight_matching.py), an entry that reads one space and writes another couples the two, so the
objective is maximised by coordinate descent: one space's permutation, the others held, is a linear assignment
problem (``scipy.optimize.linear_sum_assignment``) solved exactly; the spaces are visited in a seeded random order,
and sweeps repeat until none changes a permutation or ``iterations`` ran. It reads no data. The permutations are
generic over ``Plan.axes``: nothing here knows what a block is.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from archs.resnet import ResNet
from fusion.residual import AlignedStates, Plan, check_resnets, plan_of, state_of, transported

ITERATIONS = 100  # sweeps over the spaces at most; weight matching usually settles within a few
TOLERANCE = 1e-12  # relative gain below which a new assignment is a tie with the current one
STATISTICS = ("running_mean", "running_var")  # batch-norm entries that are measured, not learnt

Axes = dict[str, tuple[str | None, str | None]]


def matched_entries(plan: Plan) -> Axes:
    """The entries of ``plan`` whose inner products weight matching maximises: all but the running statistics."""
    return {name: axes for name, axes in plan.axes.items() if name.rsplit(".", 1)[-1] not in STATISTICS}


def _by_rows(tensor: Tensor) -> Tensor:
    """``[rows, rest]``: one row per output channel, everything it holds flattened."""
    return tensor.reshape(len(tensor), -1)


def _by_columns(tensor: Tensor) -> Tensor:
    """``[columns, rest]``: one row per input channel, every weight that reads it (over outputs and kernel)."""
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1)


def _space_score(a: dict[str, Tensor], b: dict[str, Tensor], entries: Axes, perms: dict[str, Tensor],
                 space: str) -> Tensor:
    """``[A width, B width]``: how much B's channel j agrees with A's channel i in ``space``, every other space's
    permutation held (an entry never reads and writes one space, so its other axis is always held)."""
    width = len(perms[space])
    score = torch.zeros(width, width, dtype=torch.float64)
    for name, (rows, cols) in entries.items():
        if rows == space:
            held = b[name] if cols is None else b[name][:, perms[cols]]
            score += _by_rows(a[name]) @ _by_rows(held).T
        if cols == space:
            held = b[name] if rows is None else b[name][perms[rows]]
            score += _by_columns(a[name]) @ _by_columns(held).T
    return score


def weight_matching(a: dict[str, Tensor], b: dict[str, Tensor], plan: Plan, iterations: int = ITERATIONS,
                    seed: int = 0) -> dict[str, Tensor]:
    """Per space of ``plan``, the permutation of state ``b``'s channels onto state ``a``'s (``perm[i]``: B's channel
    at A's position i) found by coordinate descent on the summed weight inner products, from the identity."""
    if iterations < 1:
        raise ValueError(f"rebasin needs iterations >= 1, got {iterations}")
    entries = matched_entries(plan)
    names = [space.name for space in plan.spaces]
    perms = {space.name: torch.arange(len(a[f"{space.conv}.weight"])) for space in plan.spaces}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            name = names[i]
            score = _space_score(a, b, entries, perms, name)
            rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
            perm = torch.from_numpy(cols)[torch.from_numpy(rows).argsort()]
            new, old = (float(score[torch.arange(len(p)), p].sum()) for p in (perm, perms[name]))
            # only a strictly better assignment counts as a change: ties and rounding would otherwise never settle
            if new > old + TOLERANCE * abs(old):
                perms[name], changed = perm, True
        if not changed:
            break
    return perms


def permuted(state: dict[str, Tensor], plan: Plan, perms: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every space's channels reordered by ``perms`` (rows and columns alike): the same function."""
    transports = {}
    for name, perm in perms.items():
        # residual.transported's [parent width, anchor width] plan that puts B's channel perm[i] at position i
        transports[name] = torch.zeros(len(perm), len(perm), dtype=torch.float64)
        transports[name][perm, torch.arange(len(perm))] = 1.0
    return transported(state, plan, transports)


def align_by_weight_matching(parents: Sequence[nn.Module], iterations: int = ITERATIONS,
                             seed: int = 0) -> AlignedStates:
    """Every ResNet parent's channels permuted onto the first parent's by weight matching (each against the first
    alone); their average is the fused network (``AlignedStates.network``). Parents of one depth and widths."""
    check_resnets(parents, "rebasin", same_widths=True)
    plan = plan_of(parents[0])
    anchor = state_of(parents[0])
    aligned = [anchor]
    for parent in parents[1:]:
        state = state_of(parent)
        aligned.append(permuted(state, plan, weight_matching(anchor, state, plan, iterations, seed)))
    return AlignedStates(parents[0], aligned)


def rebasin(parents: Sequence[nn.Module], iterations: int = ITERATIONS, seed: int = 0) -> ResNet:
    """Git Re-Basin weight matching of two or more ResNets, then their average (batch-norm statistics too)."""
    return align_by_weight_matching(parents, iterations, seed).network()
