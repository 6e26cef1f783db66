"""LeNet5 as the paper uses it on 32x32 inputs, its half-width variant, and a batch-norm variant."""
from __future__ import annotations

import torch
import torch.nn as nn


class LeNet5(nn.Module):
    """conv(C->6,5) ReLU pool -> conv(6->16,5) ReLU pool -> conv(16->120,5) ReLU = feature -> fc 84 -> fc K.

    ``half=True`` halves every width: channels 3/8/60, fully connected 60 -> 42 -> K. ``batchnorm=True`` puts
    a BatchNorm2d after every convolution (before its ReLU): an expert that ships running statistics of its
    activations, which the data-free detectors and DeepInversion read (docs/design.md section 4).
    """

    channels_last = True  # its 5x5 convolutions run about a quarter faster so on CPU (common.fast_memory_format)

    def __init__(self, in_channels: int = 1, num_classes: int = 10, half: bool = False,
                 batchnorm: bool = False) -> None:
        super().__init__()
        c1, c2, feat, hidden = (3, 8, 60, 42) if half else (6, 16, 120, 84)
        self.feature_dim = feat

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 5), *([nn.BatchNorm2d(outputs)] if batchnorm else []), nn.ReLU()]

        self.convs = nn.Sequential(*block(in_channels, c1), nn.MaxPool2d(2), *block(c1, c2), nn.MaxPool2d(2),
                                   *block(c2, feat), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.convs(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits
