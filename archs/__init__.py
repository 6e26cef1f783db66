"""Model registry: ``build_model(name, in_channels=..., num_classes=...)``.

Every model's ``forward(x, return_features=False)`` returns logits, or ``(logits, features)`` with
the feature vector that feature-reading gates consume (docs/design.md section 3).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from archs.gates import PAN, AgnosticPAN
from archs.generator import Discriminator, Generator
from archs.lenet import LeNet5
from archs.mlp import MLP
from archs.resnet import ResNet, ResNet18
from archs.vgg import VGG

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lambda in_channels=1, num_classes=10: LeNet5(in_channels, num_classes),
    "lenet5_half": lambda in_channels=1, num_classes=10: LeNet5(in_channels, num_classes, half=True),
    "lenet5_bn": lambda in_channels=1, num_classes=10: LeNet5(in_channels, num_classes, batchnorm=True),
    "resnet18": lambda in_channels=3, num_classes=10: ResNet18(in_channels, num_classes),
    # depth (18, 34), width (fraction of 64-128-256-512), batch_norm and bias pass through (archs/resnet.py)
    "resnet": lambda in_channels=3, num_classes=10, **kw: ResNet(in_channels, num_classes, **kw),
    # widths, bias, img_size and crop pass through (archs/mlp.py); fusion builds MLPs of any widths.
    "mlp": lambda in_channels=1, num_classes=10, **kw: MLP(in_channels, num_classes, **kw),
    # layers (VGG notation, 'M' a max-pool), hidden, bias and img_size pass through (archs/vgg.py).
    "vgg": lambda in_channels=3, num_classes=10, **kw: VGG(in_channels, num_classes, **kw),
}
# Gates and generators are built through the same registry, with their own arguments.
AUX_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "pan": PAN,
    "agnostic_pan": AgnosticPAN,
    "generator": Generator,
    "discriminator": Discriminator,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; keyword arguments pass through (mostly ints, MLP widths a list).

    Unknown names fail with the list of choices."""
    table = {**ARCHS, **AUX_ARCHS}
    if name not in table:
        raise ValueError(f"unknown arch {name!r}; choices: {', '.join(table)}")
    try:
        return table[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for arch {name!r}: {err}") from None
