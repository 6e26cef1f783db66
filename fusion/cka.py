"""Linear CKA (Kornblith et al. 2019): how alike two layers' representations of the same samples are."""
from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two activation matrices with the same rows (samples); 0 if either is constant.

    Feature maps are flattened per sample. Computed through the samples' Gram matrices when there are
    more features than samples (a convolution's map), which gives the same value at a fraction of the cost.
    """
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x, y = x - x.mean(0), y - y.mean(0)
    if max(x.shape[1], y.shape[1]) > len(x):
        gram_x, gram_y = x @ x.T, y @ y.T
        norm_x, norm_y = torch.linalg.norm(gram_x), torch.linalg.norm(gram_y)
        if norm_x == 0 or norm_y == 0:
            return 0.0
        return float((gram_x * gram_y).sum() / (norm_x * norm_y))
    norm_x, norm_y = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        return 0.0
    return float(torch.linalg.norm(y.T @ x) ** 2 / (norm_x * norm_y))
