"""Fully connected ReLU network, the architecture the weight-space fusion methods work on (docs/design.md section 8)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """crop ``crop`` border pixels, flatten -> (Linear, ReLU) per hidden width -> Linear K.

    The images arrive padded to ``img_size`` (MNIST 28 -> 32), so the default ``crop=2`` gives the
    784 inputs of the original digits. ``self.layers`` holds every Linear, hidden layers first and
    the output layer last, so fusion code reads ``model.layers[i].weight``. The feature vector is the
    last hidden activation, after its ReLU.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (256,),
                 bias: bool = True, img_size: int = 32, crop: int = 2) -> None:
        super().__init__()
        if not widths:
            raise ValueError("an MLP needs at least one hidden layer (widths is empty)")
        if not 0 <= 2 * crop < img_size:
            raise ValueError(f"crop={crop} leaves nothing of a {img_size}x{img_size} image")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.widths, self.bias = [int(w) for w in widths], bias
        self.img_size, self.crop = img_size, crop
        self.in_features = in_channels * (img_size - 2 * crop) ** 2
        self.feature_dim = self.widths[-1]
        dims = [self.in_features, *self.widths, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))

    def flat_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` images -> cropped and flattened ``[N, D]``; already flat ``[N, D]`` passes through."""
        image_shape = (self.in_channels, self.img_size, self.img_size)
        if x.dim() == 4 and tuple(x.shape[1:]) == image_shape:
            c = self.crop
            return x[..., c:self.img_size - c, c:self.img_size - c].flatten(1)
        if x.dim() == 2 and x.shape[1] == self.in_features:
            return x
        raise ValueError(f"MLP expects [N, {', '.join(map(str, image_shape))}] images or [N, {self.in_features}] "
                         f"flat inputs, got {list(x.shape)}")

    def pre_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output before its ReLU: one ``[N, width]`` per hidden layer, then the logits."""
        outs = []
        h = self.flat_inputs(x)
        for i, layer in enumerate(self.layers):
            outs.append(layer(h))
            if i < len(self.layers) - 1:
                h = F.relu(outs[-1])
        return outs

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = self.flat_inputs(x)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        logits = self.layers[-1](h)
        return (logits, h) if return_features else logits
