"""CLAFusion (Nguyen et al. 2022): fuse MLPs of different depths by cross-layer alignment, then OTFusion.

Hidden layers of the shallower parent are mapped to hidden layers of the deeper one (least-cost
strictly increasing map, first and last matched); identity layers fill the unmatched positions,
which leaves the shallower network's function unchanged; OTFusion does the rest.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from archs.mlp import MLP
from fusion._common import Layers, check_parents, flat_samples, layers_of, pre_acts, to_mlp
from fusion.transport import otfusion


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two activation matrices with the same rows (samples); 0 if either is constant."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    norm_x, norm_y = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        return 0.0
    return float(torch.linalg.norm(y.T @ x) ** 2 / (norm_x * norm_y))


def layer_cost_matrix(deep: MLP, shallow: MLP, samples: Tensor | None = None, kind: str = "cka") -> Tensor:
    """``[n, m]`` cost of matching shallow hidden layer i to deep hidden layer j.

    ``kind="cka"``: 1 - linear CKA of their pre-activations on ``samples``; ``kind="width"``:
    |width difference| / larger width.
    """
    if kind == "cka":
        if samples is None:
            raise ValueError("layer_cost_matrix with kind='cka' needs samples")
        x = flat_samples(deep, samples)
        deep_acts, shallow_acts = pre_acts(layers_of(deep), x)[:-1], pre_acts(layers_of(shallow), x)[:-1]
        return torch.tensor([[1 - linear_cka(s, d) for d in deep_acts] for s in shallow_acts], dtype=torch.float64)
    if kind == "width":
        return torch.tensor([[abs(s - d) / max(s, d) for d in deep.widths] for s in shallow.widths],
                            dtype=torch.float64)
    raise ValueError(f"layer cost kind must be 'cka' or 'width', got {kind!r}")


def align_layers(cost: Tensor) -> list[int]:
    """Least-cost strictly increasing map a: [n] -> [m] with a[0] = 0 and a[n-1] = m-1 (dynamic programming).

    ``cost[i, j]`` is the cost of matching shallow hidden layer i to deep hidden layer j; n <= m.
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
    mapping = [m - 1]
    for i in range(n - 1, 0, -1):
        mapping.append(int(came_from[i, mapping[-1]]))
    return mapping[::-1]


def insert_identity_layers(model: MLP, deep_widths: Sequence[int], mapping: Sequence[int]) -> MLP:
    """A deeper MLP computing the same function: hidden layer i of ``model`` moves to position
    ``mapping[i]`` of ``len(deep_widths)`` hidden layers, and every unmatched position gets an identity layer.

    An identity Linear after a ReLU layer is exact, since its inputs are non-negative (``mapping[0]``
    must be 0: the raw inputs can be negative). An identity cannot change width, so each inserted
    layer keeps the width of the layer it follows, not the deep network's width at that position;
    OT alignment copes with the width difference. Only ``len(deep_widths)`` is used.
    """
    m = len(deep_widths)
    if len(mapping) != len(model.widths):
        raise ValueError(f"mapping {list(mapping)} needs one entry per hidden layer of the model ({model.widths})")
    if mapping[0] != 0 or any(a >= b for a, b in zip(mapping, mapping[1:])) or mapping[-1] >= m:
        raise ValueError(f"mapping {list(mapping)} must start at 0 and increase strictly below {m}")
    layers = layers_of(model)
    position = {p: i for i, p in enumerate(mapping)}
    new_layers: Layers = []
    widths: list[int] = []
    for p in range(m):
        if p in position:
            new_layers.append(layers[position[p]])
            widths.append(model.widths[position[p]])
        else:
            width = widths[-1]
            new_layers.append((torch.eye(width, dtype=torch.float64),
                               torch.zeros(width, dtype=torch.float64) if model.bias else None))
            widths.append(width)
    new_layers.append(layers[-1])
    return to_mlp(model, widths, new_layers)


def clafusion(parents: Sequence[MLP], samples: Tensor | None, cost: str = "cka", ot_cost: str = "activation") -> MLP:
    """CLAFusion of two MLPs of possibly different depths: align layers, balance depths, then OTFusion.

    The layer map minimises ``layer_cost_matrix(kind=cost)``; the shallower parent gets identity
    layers at the unmatched positions (``insert_identity_layers``) and is fused by ``otfusion``
    (``ot_cost``: 'activation' or 'weight') with the deeper parent as anchor, so the fused MLP has
    the deeper parent's widths. Equal depths go straight to OTFusion with ``parents[0]`` as anchor.
    """
    check_parents(parents, "clafusion", count=2)
    deep, shallow = sorted(parents, key=lambda p: -len(p.widths))  # stable: equal depths keep their order
    if len(shallow.widths) < len(deep.widths):
        mapping = align_layers(layer_cost_matrix(deep, shallow, samples, kind=cost))
        shallow = insert_identity_layers(shallow, deep.widths, mapping)
    return otfusion([deep, shallow], samples, cost=ot_cost, anchor=0)


def finetune(model: nn.Module, images: Tensor, labels: Tensor, epochs: int = 1, lr: float = 1e-2,
             batch_size: int = 64, momentum: float = 0.9, seed: int = 0) -> nn.Module:
    """A copy of ``model`` after a few epochs of SGD on cross-entropy (the optional CLAFusion fine-tuning step)."""
    tuned = copy.deepcopy(model).train()
    optimiser = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers often hold no_grad while they evaluate fused models
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = F.cross_entropy(tuned(images[idx]), labels[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    return tuned.eval()
