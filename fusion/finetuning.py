"""Training a fused network (or a parent, the control) on real training data: a few epochs of SGD, on
cross-entropy (fine-tuning) or on any loss of a batch's logits (knowledge distillation, ``distil.py``)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# a batch's loss from the network's logits on it and the batch's indices into the training images
BatchLoss = Callable[[Tensor, Tensor], Tensor]


def finetune(model: nn.Module, images: Tensor, labels: Tensor, epochs: int = 1, lr: float = 1e-2,
             batch_size: int = 64, momentum: float = 0.9, seed: int = 0, loss: BatchLoss | None = None) -> nn.Module:
    """A copy of ``model`` after a few epochs of SGD on cross-entropy (the optional CLAFusion fine-tuning step), or
    on ``loss(logits, batch indices)``. Batches are slices of a permutation drawn from ``seed`` alone, so two
    networks trained with one seed see the same images in the same order."""
    if loss is None:
        def loss(logits: Tensor, idx: Tensor) -> Tensor:
            return F.cross_entropy(logits, labels[idx])
    tuned = copy.deepcopy(model).train()
    optimiser = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers often hold no_grad while they evaluate fused models
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=generator).split(batch_size):
                batch_loss = loss(tuned(images[idx]), idx)
                optimiser.zero_grad()
                batch_loss.backward()
                optimiser.step()
    return tuned.eval()
