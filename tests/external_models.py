"""Classifiers defined outside archs/, importable as ``external_models:TinyMLP`` and ``external_models:LevelMLP``
(tests/ is on sys.path): the tests save them as TorchScript, as a torch.export program and as state dicts, and use
them as file experts and fusion parents."""
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


class LevelMLP(nn.Module):
    """A 784-hidden-classes MLP whose module names are not archs/mlp.py's: hidden layer ``level1.1``, output layer
    ``level2.1`` (the fusion parents given by file with a level map)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.level1 = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden))
        self.level2 = nn.Sequential(nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.level2(self.level1(x))
