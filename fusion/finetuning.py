"""Fine-tuning a fused network (or a parent, the control) on real training data: a few epochs of SGD."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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
