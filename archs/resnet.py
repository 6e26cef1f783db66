"""CIFAR ResNets: 3x3 stem without max-pooling, four stages of basic blocks (He et al. 2016, CIFAR variant).

``ResNet(depth, width, batch_norm, bias)``: depth 18 ([2, 2, 2, 2] blocks) or 34 ([3, 4, 6, 3]); ``width`` a
fraction of the stages' 64-128-256-512 channels (1/8 gives 8-16-32-64, small enough for CPU fusion runs);
``batch_norm=False`` puts an identity where each batch norm would be and ``bias`` gives every convolution a
bias, the parents weight-space fusion reads (fusion/residual.py). ``ResNet18`` is the routing experts'
network (full width, batch norm, no biases); every variant keeps its module names (``body.N``, ``fc``), so
its checkpoints load unchanged.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # basic blocks per stage
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


def _norm(planes: int, batch_norm: bool) -> nn.Module:
    # an identity in place of a missing batch norm keeps every module's name, so state dicts line up
    return nn.BatchNorm2d(planes) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 projection (and its norm)
    when the stride or the width changes, else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int, batch_norm: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=bias)
        self.bn1 = _norm(planes, batch_norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = _norm(planes, batch_norm)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # projection when the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=bias), _norm(planes, batch_norm))

    @property
    def projection(self) -> nn.Conv2d | None:
        return self.shortcut[0] if len(self.shortcut) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def stage_widths(width: float) -> list[int]:
    """The four stages' channels at ``width`` (a fraction of 64-128-256-512 that leaves whole channels)."""
    fraction = Fraction(width).limit_denominator(64)
    widths = [w * fraction for w in STAGE_WIDTHS]
    if not 0 < fraction <= 1 or any(w.denominator != 1 for w in widths):
        raise ValueError(f"ResNet width={width} must be a fraction in (0, 1] of 64-128-256-512 channels that leaves "
                         "whole channels, e.g. 1, 0.5, 0.25 or 0.125")
    return [int(w) for w in widths]


class ResNet(nn.Module):
    """CIFAR ResNet of ``depth`` 18 or 34 at ``width``; the feature vector is the pooled output of the last stage."""

    channels_last = True  # trains about 1.5x faster so on CPU, but for the narrowest widths (common.fast_memory_format)

    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = 18, width: float = 1.0,
                 batch_norm: bool = True, bias: bool = False) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"ResNet depth={depth} is not one of {sorted(LAYOUTS)}")
        widths = stage_widths(width)
        self.in_channels, self.num_classes, self.depth, self.width = in_channels, num_classes, depth, width
        self.batch_norm, self.bias, self.stage_widths = batch_norm, bias, widths
        self.feature_dim = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=bias), _norm(widths[0], batch_norm),
                                   nn.ReLU()]
        in_planes = widths[0]
        for blocks, planes, stride in zip(LAYOUTS[depth], widths, STAGE_STRIDES):
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1, batch_norm, bias))
                in_planes = planes
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)
        if not batch_norm:
            # without batch norm every block adds its branch's variance to the stream; shrinking the branches'
            # last convolutions by 1/sqrt(blocks) keeps the logits' scale at initialisation (as Fixup argues)
            with torch.no_grad():
                for block in self.blocks:
                    block.conv2.weight.mul_(len(self.blocks) ** -0.5)

    @property
    def stem(self) -> nn.Conv2d:
        return self.body[0]

    @property
    def stem_norm(self) -> nn.Module:
        return self.body[1]

    @property
    def blocks(self) -> list[BasicBlock]:
        return [m for m in self.body if isinstance(m, BasicBlock)]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.body(x)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


class ResNet18(ResNet):
    """The routing experts' ResNet18: full width, batch norm, no biases in the convolutions."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(in_channels, num_classes)
