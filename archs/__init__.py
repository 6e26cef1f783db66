"""Model registry: ``build_model(name, in_channels=..., num_classes=...)``.

Every model's ``forward(x, return_features=False)`` returns logits, or ``(logits, features)`` with
the feature vector that feature-reading gates consume (DESIGN.md section 3).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from archs.lenet import LeNet5
from archs.resnet import ResNet18

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lambda in_channels=1, num_classes=10: LeNet5(in_channels, num_classes),
    "lenet5_half": lambda in_channels=1, num_classes=10: LeNet5(in_channels, num_classes, half=True),
    "resnet18": lambda in_channels=3, num_classes=10: ResNet18(in_channels, num_classes),
}


def build_model(name: str, **kwargs: int) -> nn.Module:
    """Build a registered architecture; unknown names fail with the list of choices."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choices: {', '.join(ARCHS)}")
    try:
        return ARCHS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for arch {name!r}: {err}") from None
