"""Output-space baselines for fusion: (class-)weighted ensembles of the parents' softmax outputs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def ensemble_softmax(parents: Sequence[nn.Module], x: Tensor, weights: Tensor | None = None) -> Tensor:
    """``[N, C]`` weighted mean of the parents' softmax outputs, renormalised to sum to 1 per sample.

    ``weights``: None (equal), ``[K]`` per parent, or ``[K, C]`` per parent and class (e.g.
    ``class_share_weights``); the renormalisation is a no-op for per-parent weights summing to 1.
    The parents run as they are: put them in eval mode first.
    """
    with torch.no_grad():
        probs = torch.stack([F.softmax(p(x), dim=-1) for p in parents])  # [K, N, C]
    k, _, c = probs.shape
    w = torch.full((k,), 1 / k) if weights is None else torch.as_tensor(weights)
    w = w.to(dtype=probs.dtype, device=probs.device)
    if w.shape == (k,):
        mixed = torch.einsum("k,knc->nc", w, probs)
    elif w.shape == (k, c):
        mixed = torch.einsum("kc,knc->nc", w, probs)
    else:
        raise ValueError(f"weights must have shape [{k}] or [{k}, {c}], got {list(w.shape)}")
    return mixed / mixed.sum(1, keepdim=True)


def class_share_weights(class_counts: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """``[K, C]``: parent k's weight for class c is its share of the training samples of class c.

    ``class_counts[k][c]`` is how many samples of class c parent k was trained on; a class no parent
    saw gets equal weights, so every column sums to 1.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 2 or (counts < 0).any():
        raise ValueError(f"class_counts must be a [parents, classes] table of non-negative counts, got {counts}")
    total = counts.sum(0)
    return torch.where(total > 0, counts / total, 1 / counts.shape[0])
