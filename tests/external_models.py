"""Classifiers defined outside archs/, importable as ``external_models:TinyMLP``, ``external_models:LevelMLP`` and
``external_models:NamedResNet`` (tests/ is on sys.path): the tests save them as TorchScript, as a torch.export program and as state dicts, and use
them as file experts and fusion parents."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class _Block(nn.Module):
    """A basic block under torchvision's names: a projection shortcut is ``downsample``."""

    def __init__(self, inputs: int, planes: int, stride: int, norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes) if norm else nn.Identity()
        self.downsample = None
        if stride != 1 or inputs != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes) if norm else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


class NamedResNet(nn.Module):
    """A CIFAR ResNet18 whose module names are not archs/resnet.py's: ``conv1``/``bn1`` stem, ``layer1``-``layer4``
    of two blocks each, ``linear`` classifier (the residual fusion parents given by file with a rename map)."""

    def __init__(self, base: int = 8, num_classes: int = 10, norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base) if norm else nn.Identity()
        widths, inputs, stages = [base, 2 * base, 4 * base, 8 * base], base, []
        for i, planes in enumerate(widths):
            stages.append(nn.Sequential(_Block(inputs, planes, 1 if i == 0 else 2, norm), _Block(planes, planes, 1, norm)))
            inputs = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
