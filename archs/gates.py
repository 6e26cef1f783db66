"""Gating networks (PANs): binary classifiers reading one expert's activations (DESIGN.md section 4)."""
from __future__ import annotations

import torch
import torch.nn as nn


class PAN(nn.Module):
    """Pattern attribution network: Linear(in, 80) ReLU Linear(80, 60) ReLU Linear(60, 2)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 80), nn.ReLU(), nn.Linear(80, 60), nn.ReLU(),
                                 nn.Linear(60, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AgnosticPAN(nn.Module):
    """A PAN over a few architecture-free statistics: Linear(in, 80) ReLU 50 ReLU 20 ReLU Linear(20, 2)."""

    def __init__(self, in_features: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 80), nn.ReLU(), nn.Linear(80, 50), nn.ReLU(),
                                 nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
