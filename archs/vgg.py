"""VGG-style convolutional network without batch norm, the convolutional parents of weight-space fusion (docs/design.md
section 8).

Without batch norm every layer is a plain affine map followed by a ReLU, so a channel is a neuron as in an
MLP and the fusion methods can permute, average and refit channels without running statistics to carry.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

POOL = "M"  # VGG's notation: a 2x2 max-pool between convolutions


def parse_layers(layers: Sequence[int | str]) -> tuple[list[int], list[bool]]:
    """``[16, 'M', 32, 'M']`` -> conv widths ``[16, 32]`` and, per conv, whether a max-pool follows it."""
    widths: list[int] = []
    pool_after: list[bool] = []
    for entry in layers:
        if entry == POOL:
            if not widths or pool_after[-1]:
                raise ValueError(f"VGG layers {list(layers)}: every 'M' must follow a convolution width")
            pool_after[-1] = True
        elif isinstance(entry, int) and not isinstance(entry, bool) and entry > 0:
            widths.append(entry)
            pool_after.append(False)
        else:
            raise ValueError(f"VGG layers {list(layers)}: {entry!r} is neither a positive width nor 'M'")
    if not widths:
        raise ValueError("a VGG needs at least one convolution (layers has no width)")
    return widths, pool_after


class VGG(nn.Module):
    """(conv 3x3 padding 1, ReLU[, max-pool 2]) per entry of ``layers`` -> flatten -> (Linear, ReLU) per ``hidden``
    width -> Linear K; no batch norm, no dropout.

    ``self.convs`` and ``self.linears`` hold the layers fusion reads (``self.pool_after[i]``: a 2x2
    max-pool follows conv i); the flatten keeps PyTorch's channel-major order, so the first Linear's
    input ``c * positions + p`` is channel c at spatial position p. The feature vector is the last
    hidden activation (the flattened convolution output when ``hidden`` is empty).
    """

    channels_last = True  # trains about a fifth faster so on CPU (common.fast_memory_format)

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 layers: Sequence[int | str] = (16, "M", 32, "M", 64, "M"), hidden: Sequence[int] = (128,),
                 bias: bool = True, img_size: int = 32) -> None:
        super().__init__()
        widths, pool_after = parse_layers(layers)
        side = img_size // 2 ** sum(pool_after)
        if side < 1:
            raise ValueError(f"VGG layers {list(layers)} pool a {img_size}x{img_size} image below one pixel")
        self.in_channels, self.num_classes, self.img_size, self.bias = in_channels, num_classes, img_size, bias
        self.layers_spec = list(layers)
        self.conv_widths, self.pool_after = widths, pool_after
        self.hidden = [int(h) for h in hidden]
        self.positions = side * side  # spatial positions per channel at the flatten
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=bias)
                                   for a, b in zip([in_channels, *widths[:-1]], widths))
        dims = [widths[-1] * self.positions, *self.hidden, num_classes]
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.feature_dim = dims[-2]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.img_size:
            raise ValueError(f"VGG expects [N, {self.in_channels}, {self.img_size}, {self.img_size}] images, "
                             f"got {list(x.shape)}")
        h = x
        for conv, pool in zip(self.convs, self.pool_after):
            h = F.relu(conv(h))
            if pool:
                h = F.max_pool2d(h, 2)
        h = h.flatten(1)
        for linear in self.linears[:-1]:
            h = F.relu(linear(h))
        logits = self.linears[-1](h)
        return (logits, h) if return_features else logits


def vgg_with(template: VGG, conv_widths: Sequence[int], pool_after: Sequence[bool], hidden: Sequence[int]) -> VGG:
    """A VGG reading inputs like ``template`` with the given convolution widths, pools and hidden widths."""
    layers: list[int | str] = []
    for width, pool in zip(conv_widths, pool_after):
        layers += [int(width), POOL] if pool else [int(width)]
    return VGG(template.in_channels, template.num_classes, layers, hidden, template.bias, template.img_size)
