"""LeNet5 as the paper uses it on 32x32 inputs, and its half-width variant."""
from __future__ import annotations

import torch
import torch.nn as nn


class LeNet5(nn.Module):
    """conv(C->6,5) ReLU pool -> conv(6->16,5) ReLU pool -> conv(16->120,5) ReLU = feature -> fc 84 -> fc K.

    ``half=True`` halves every width: channels 3/8/60, fully connected 60 -> 42 -> K.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, half: bool = False) -> None:
        super().__init__()
        c1, c2, feat, hidden = (3, 8, 60, 42) if half else (6, 16, 120, 84)
        self.feature_dim = feat
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, feat, 5), nn.ReLU(), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.convs(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits
