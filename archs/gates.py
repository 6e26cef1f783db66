"""Gating networks (PANs): binary classifiers reading one expert's activations (docs/design.md section 4).

Both keep the per-dimension mean and std of their training inputs as buffers and standardise with
them: raw feature vectors span very different scales across experts and dimensions, and plain SGD
at the paper's learning rate trains slowly on unscaled inputs. Defaults (0 and 1) leave inputs as
they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Standardised(nn.Module):
    """A gate's network behind the standardisation of its inputs (stacked.py stacks every gate through it)."""

    def __init__(self, in_features: int, net: nn.Module) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.net = net

    def fit_standardisation(self, inputs: torch.Tensor) -> None:
        """Set the buffers from the training inputs.

        A unit silent in training (a ReLU feature that never fired on generated images) has std 0;
        dividing by a tiny std would let that one unit decide the gate wherever it fires at test
        time, so every std is floored at a tenth of the median std across dimensions.
        """
        std = inputs.std(dim=0)
        scale = std.median()
        floor = 0.1 * scale if scale > 0 else torch.ones((), device=std.device)
        self.input_mean.copy_(inputs.mean(dim=0))
        self.input_std.copy_(std.clamp(min=floor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)


class PAN(Standardised):
    """Pattern attribution network: Linear(in, 80) ReLU Linear(80, 60) ReLU Linear(60, 2)."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features, nn.Sequential(
            nn.Linear(in_features, 80), nn.ReLU(), nn.Linear(80, 60), nn.ReLU(), nn.Linear(60, 2)))


class AgnosticPAN(Standardised):
    """A PAN over a few architecture-free statistics: Linear(in, 80) ReLU 50 ReLU 20 ReLU Linear(20, 2)."""

    def __init__(self, in_features: int = 3) -> None:
        super().__init__(in_features, nn.Sequential(
            nn.Linear(in_features, 80), nn.ReLU(), nn.Linear(80, 50), nn.ReLU(),
            nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 2)))
