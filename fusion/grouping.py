"""Grouping the parents' neurons for neuron interpolation: Hungarian matching (HF) or weighted k-means (KF), and
each group's importance-weighted mean, the target its fused neuron is fitted to.

A grouping is a function ``(columns, importance, width) -> groups``: ``columns`` holds every parent's neurons of one
level as columns (one row per sample, or per sample and position), ``importance`` one weight per neuron of all
parents in that order, and ``groups`` each neuron's group index in ``0..width - 1``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fusion.ot import distances

KMEANS_MAX_ITER = 100
MATCHES = ("correlation", "euclidean")
Grouping = Callable[[list[Tensor], Tensor, int], Tensor]


def group_means(acts: Tensor, weights: Tensor, groups: Tensor, k: int) -> Tensor:
    """``[N, k]``: importance-weighted mean of the columns of ``acts`` in each group.

    A group whose members all have importance 0 falls back to the plain mean. Groups must not be empty.
    """
    onehot = F.one_hot(groups, k).double()  # [P, k]
    mass = weights @ onehot
    weighted = (acts * weights) @ onehot / mass
    plain = acts @ onehot / onehot.sum(0)
    return torch.where(mass > 0, weighted, plain)


def normalised(group_weights: Tensor) -> Tensor:
    """Weights summing to 1 (uniform when they are all 0): how much each fused neuron's error counts."""
    total = group_weights.sum()
    return group_weights / total if total > 0 else torch.full_like(group_weights, 1 / len(group_weights))


def hungarian_groups(acts: list[Tensor], match: str) -> Tensor:
    """Parent A's neuron i forms group i; parent B's neuron joins the group of the A neuron it is matched to."""
    a, b = acts
    if match == "correlation":
        # a constant neuron has no correlation with anything: its standardised column becomes 0
        za = (a - a.mean(0)) / a.std(0).clamp_min(1e-12)
        zb = (b - b.mean(0)) / b.std(0).clamp_min(1e-12)
        cost = -(za.T @ zb) / len(a)
    else:
        cost = distances(a.T, b.T)
    rows, cols = linear_sum_assignment(cost.numpy())
    groups_b = torch.empty(b.shape[1], dtype=torch.long)
    groups_b[torch.from_numpy(cols)] = torch.from_numpy(rows)
    return torch.cat([torch.arange(a.shape[1]), groups_b])


def hungarian_grouping(match: str) -> Grouping:
    """HF's grouping of two parents' neurons (``match``: 'correlation' or 'euclidean'), checked before any work."""
    if match not in MATCHES:
        raise ValueError(f"match must be 'correlation' or 'euclidean', got {match!r}")
    return lambda level_columns, weights, width: hungarian_groups(level_columns, match)


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


def weighted_kmeans(points: Tensor, weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Group index of every row of ``points`` ``[P, N]``: Lloyd's algorithm with importance-weighted centres."""
    if k > len(points):
        raise ValueError(f"cannot group {len(points)} neurons into {k} non-empty groups")
    centres = points[_kmeans_plus_plus(points, k, generator)]
    groups = None
    for _ in range(KMEANS_MAX_ITER):
        dist = distances(points, centres)
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
        centres = group_means(points.T, weights, groups, k).T
    return groups


def kmeans_grouping(seed: int) -> Grouping:
    """KF's grouping: weighted k-means over every parent's neurons, k-means++ seeded from ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def grouping(level_columns: list[Tensor], weights: Tensor, width: int) -> Tensor:
        points = torch.cat(level_columns, 1).T  # [neurons, rows]
        if points.shape[1] > points.shape[0]:
            # a channel's vector over every sample and position is long (400 x 1024 for CIFAR maps); the rows of
            # R from points.T = QR keep every distance between neurons in as many coordinates as there are
            # neurons, and k-means only reads distances and weighted means
            points = torch.linalg.qr(points.T, mode="r").R.T
        return weighted_kmeans(points, weights, width, generator)

    return grouping
