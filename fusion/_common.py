"""Shared plumbing of the fusion methods: parent checks, weights as float64 tensors, building the fused MLP.

A network is handled as ``Layers``: one ``(weight [out, in], bias [out] or None)`` pair per level
(hidden layers, then the output layer), in float64 on the CPU. The problems are small, and float32
least squares would blur the exactness the tests check; ``to_mlp`` gives the result the dtype and
device of the parent it is modelled on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from archs.mlp import MLP

Layers = list[tuple[Tensor, Tensor | None]]


def check_parents(parents: Sequence[MLP], method: str, count: int | None = None,
                  same_depth: bool = False, same_widths: bool = False) -> None:
    if count is not None and len(parents) != count:
        raise ValueError(f"{method} fuses exactly {count} parents, got {len(parents)}")
    if not parents:
        raise ValueError(f"{method} needs at least one parent")
    if not all(isinstance(p, MLP) for p in parents):
        raise ValueError(f"{method} fuses MLPs (archs/mlp.py), got {[type(p).__name__ for p in parents]}")
    first = parents[0]
    for k, parent in enumerate(parents[1:], 1):
        for attr in ("in_channels", "img_size", "crop", "num_classes", "bias"):
            if getattr(parent, attr) != getattr(first, attr):
                raise ValueError(f"{method}: parent {k} has {attr}={getattr(parent, attr)}, parent 0 has "
                                 f"{getattr(first, attr)}; parents must read the same inputs, predict the same "
                                 "classes, and all have biases or none")
        if same_widths and parent.widths != first.widths:
            raise ValueError(f"{method} needs identical hidden widths, but parent 0 has {first.widths} and parent "
                             f"{k} has {parent.widths}; fuse parents whose widths differ with otfusion, and "
                             "parents whose depths differ with clafusion")
        if same_depth and len(parent.widths) != len(first.widths):
            raise ValueError(f"{method} needs parents of the same depth, but parent 0 has hidden widths "
                             f"{first.widths} and parent {k} has {parent.widths}; use clafusion")


def layers_of(model: MLP) -> Layers:
    return [(layer.weight.detach().double().cpu(),
             None if layer.bias is None else layer.bias.detach().double().cpu()) for layer in model.layers]


def to_mlp(template: MLP, widths: Sequence[int], layers: Layers) -> MLP:
    """A new MLP reading inputs like ``template``, with the given hidden widths and weights."""
    param = next(template.parameters())
    model = MLP(template.in_channels, template.num_classes, widths, template.bias, template.img_size, template.crop)
    model.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for layer, (w, b) in zip(model.layers, layers):
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
    return model.train(template.training)


def flat_samples(template: MLP, samples: Tensor) -> Tensor:
    return template.flat_inputs(samples).detach().double().cpu()


def linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return h @ w.T if b is None else h @ w.T + b


def pre_acts(layers: Layers, x: Tensor) -> list[Tensor]:
    """Every level's pre-activation ``[N, width]`` on flat inputs ``x``."""
    outs = []
    h = x
    for w, b in layers:
        outs.append(linear(h, w, b))
        h = F.relu(outs[-1])
    return outs


def mean_layers(aligned: Sequence[Layers]) -> Layers:
    return [(torch.stack([p[i][0] for p in aligned]).mean(0),
             None if aligned[0][i][1] is None else torch.stack([p[i][1] for p in aligned]).mean(0))
            for i in range(len(aligned[0]))]
