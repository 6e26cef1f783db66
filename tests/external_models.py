"""A classifier defined outside archs/, importable as ``external_models:TinyMLP`` (tests/ is on sys.path):
the tests save it as TorchScript, as a torch.export program and as a state dict, and use it as a file expert."""
from __future__ import annotations

import torch
import torch.nn as nn


class TinyMLP(nn.Module):
    """Flatten -> Linear -> ReLU (``body``: the feature layer) -> Linear (``head``: the logits)."""

    def __init__(self, in_features: int = 784, hidden: int = 32, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
