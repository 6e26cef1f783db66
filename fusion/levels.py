"""A network as a list of levels: parent checks, pre-activations, moving channels, building the fused network.

A network is handled as ``Levels``: one ``Level`` per layer with weights (hidden layers, then the output
layer), in float64 on the CPU. A level is a Linear (weight ``[out, in]``) or a Conv2d (weight
``[out, in, kh, kw]``): either way its neurons are the output rows (channels), followed by a ReLU and, for
convolutions, maybe a 2x2 max-pool. A Linear level after a convolution reads the flattened map in
PyTorch's channel-major order (input ``c * positions + p``), so a channel's positions move with it.
Parents are MLPs (archs/mlp.py), VGGs (archs/vgg.py) or LeNet5s (archs/lenet.py); the problems are small,
and float32 least squares would blur the exactness the tests check, so the fused network gets the dtype
and device of the parent it is modelled on only at the end (``to_network``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from archs.lenet import LeNet5
from archs.mlp import MLP
from archs.vgg import VGG, vgg_with

FUSABLE = (MLP, VGG, LeNet5)
POSITIONS = ("flatten", "pool")  # how a channel's activations over positions become one vector (``columns``)
SAMPLE_CHUNK = 64  # samples per batch where float64 activations of a convolution would not fit in memory at once


@dataclass(frozen=True)
class Level:
    weight: Tensor  # [out, in] or [out, in, kh, kw]
    bias: Tensor | None
    padding: int = 0  # convolutions only
    pool: bool = False  # a 2x2 max-pool follows the ReLU (convolutions only)

    @property
    def conv(self) -> bool:
        return self.weight.dim() == 4

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def with_weights(self, weight: Tensor, bias: Tensor | None) -> Level:
        return replace(self, weight=weight, bias=bias)

    def shape_key(self) -> tuple:
        """What two parents' levels at one position must share to be fused: kind, kernel, padding, pool."""
        return ("conv", *self.weight.shape[2:], self.padding, self.pool) if self.conv else ("linear",)


Levels = list[Level]


def weighted_modules(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    """The Conv2d and Linear layers of a fusable network in the order the data meets them."""
    if isinstance(model, MLP):
        return list(model.layers)
    if isinstance(model, VGG):
        return [*model.convs, *model.linears]
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # LeNet5: convs, then head


def _pools(model: nn.Module) -> list[bool]:
    if isinstance(model, VGG):
        return list(model.pool_after)
    if isinstance(model, LeNet5):
        pools: list[bool] = []
        for module in model.convs:
            if isinstance(module, nn.Conv2d):
                pools.append(False)
            elif isinstance(module, nn.MaxPool2d):
                pools[-1] = True
        return pools
    return []


def levels_of(model: nn.Module) -> Levels:
    pools = _pools(model)
    levels = []
    for i, module in enumerate(weighted_modules(model)):
        weight = module.weight.detach().double().cpu()
        bias = None if module.bias is None else module.bias.detach().double().cpu()
        if isinstance(module, nn.Conv2d):
            levels.append(Level(weight, bias, int(module.padding[0]), pools[i]))
        else:
            levels.append(Level(weight, bias))
    return levels


def hidden_widths(model: nn.Module) -> list[int]:
    """The widths of every level but the output: neurons of hidden Linear layers, channels of convolutions."""
    return [level.width for level in levels_of(model)[:-1]]


def _input_signature(model: nn.Module) -> tuple:
    if isinstance(model, MLP):
        return ("mlp", model.in_channels, model.img_size, model.crop, model.bias)
    if isinstance(model, VGG):
        return ("conv", model.in_channels, model.img_size, model.bias)
    return ("conv", model.convs[0].in_channels, None, True)


def check_parents(parents: Sequence[nn.Module], method: str, count: int | None = None,
                  same_depth: bool = False, same_widths: bool = False) -> None:
    if count is not None and len(parents) != count:
        raise ValueError(f"{method} fuses exactly {count} parents, got {len(parents)}")
    if not parents:
        raise ValueError(f"{method} needs at least one parent")
    if not all(isinstance(p, FUSABLE) for p in parents):
        raise ValueError(f"{method} fuses MLPs, VGGs and LeNet5s (archs/mlp.py, archs/vgg.py, archs/lenet.py), "
                         f"got {[type(p).__name__ for p in parents]}")
    first = parents[0]
    first_levels = levels_of(first)
    for k, parent in enumerate(parents[1:], 1):
        if type(parent) is not type(first) or _input_signature(parent) != _input_signature(first):
            raise ValueError(f"{method}: parent {k} is a {type(parent).__name__} reading {_input_signature(parent)}, "
                             f"parent 0 a {type(first).__name__} reading {_input_signature(first)}; parents must be "
                             "of one architecture family, read the same inputs, and all have biases or none")
        levels = levels_of(parent)
        if levels[-1].width != first_levels[-1].width:
            raise ValueError(f"{method}: parent {k} predicts {levels[-1].width} classes, parent 0 "
                             f"{first_levels[-1].width}; parents must predict the same classes")
        if same_widths and [lv.width for lv in levels] != [lv.width for lv in first_levels]:
            raise ValueError(f"{method} needs identical hidden widths, but parent 0 has {hidden_widths(first)} and "
                             f"parent {k} has {hidden_widths(parent)}; fuse parents whose widths differ with "
                             "otfusion, and parents whose depths differ with clafusion")
        if same_depth and [lv.shape_key() for lv in levels] != [lv.shape_key() for lv in first_levels]:
            raise ValueError(f"{method} needs parents of the same depth and layer kinds, but parent 0 has hidden "
                             f"widths {hidden_widths(first)} and parent {k} has {hidden_widths(parent)} (or their "
                             "kernels or pools differ); use clafusion for parents of different depths")


def inputs_of(template: nn.Module, samples: Tensor) -> Tensor:
    """What the first level reads, in float64 on the CPU: MLPs crop and flatten, convolutional networks take images."""
    if isinstance(template, MLP):
        return template.flat_inputs(samples).detach().double().cpu()
    return samples.detach().double().cpu()


def apply_level(level: Level, h: Tensor) -> Tensor:
    """The level's pre-activation on ``h`` (a Linear after a convolution reads the flattened map)."""
    if level.conv:
        return F.conv2d(h, level.weight, level.bias, padding=level.padding)
    return F.linear(h.flatten(1) if h.dim() > 2 else h, level.weight, level.bias)


def activate(level: Level, z: Tensor) -> Tensor:
    """The level's output as the next level reads it: ReLU, then the max-pool if it has one."""
    h = F.relu(z)
    return F.max_pool2d(h, 2) if level.pool else h


def pre_acts(levels: Levels, x: Tensor) -> list[Tensor]:
    """Every level's pre-activation on inputs ``x``: ``[N, width]`` or ``[N, channels, H, W]``."""
    outs = []
    h = x
    for level in levels:
        outs.append(apply_level(level, h))
        h = activate(level, outs[-1])
    return outs


def columns(acts: Tensor, positions: str = "flatten") -> Tensor:
    """``[rows, neurons]``: a neuron's activation vector, one row per sample, or for a convolution per sample and
    position (``positions='flatten'``) or per sample averaged over positions (``'pool'``)."""
    if acts.dim() == 2:
        return acts
    if positions == "pool":
        return acts.mean((2, 3))
    return acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])


def carry_transport(level: Level, transport: Tensor) -> Level:
    """``level`` with its incoming weights re-expressed in the basis ``transport`` ``[parent width, anchor width]``
    maps the previous level's neurons to (its column j: the mix of the parent's neurons that becomes neuron j).

    Convolutions mix their input channels; a Linear after a convolution mixes whole channels of the flattened
    map, every spatial position alike."""
    w = level.weight
    width = transport.shape[0]
    if w.dim() == 4:
        return level.with_weights(torch.einsum("oikl,ij->ojkl", w, transport), level.bias)
    if w.shape[1] == width:
        return level.with_weights(w @ transport, level.bias)
    positions = w.shape[1] // width
    moved = torch.einsum("oip,ij->ojp", w.reshape(len(w), width, positions), transport)
    return level.with_weights(moved.reshape(len(w), -1), level.bias)


def transport_out(level: Level, transport: Tensor) -> Level:
    """``level``'s neurons mixed into the anchor's: new neuron j = sum_i transport[i, j] * neuron i."""
    w = torch.einsum("ij,i...->j...", transport, level.weight)
    return level.with_weights(w, None if level.bias is None else transport.T @ level.bias)


def mean_levels(aligned: Sequence[Levels]) -> Levels:
    def mean(tensors: Sequence[Tensor | None]) -> Tensor | None:
        return None if tensors[0] is None else torch.stack(list(tensors)).mean(0)

    return [levels[0].with_weights(mean([lv.weight for lv in levels]), mean([lv.bias for lv in levels]))
            for levels in zip(*aligned)]


@dataclass(frozen=True)
class Aligned:
    """Parents re-expressed in the channels of one network, ``template``'s widths: fusing them is averaging them
    (``network``), and REPAIR reads each one's channel statistics (fusion/repair.py)."""

    template: nn.Module
    parents: list[Levels]

    def network(self) -> nn.Module:
        return to_network(self.template, mean_levels(self.parents))


def to_network(template: nn.Module, levels: Levels) -> nn.Module:
    """A new network reading inputs like ``template``, with the levels' widths, pools and weights.

    MLPs and VGGs take any widths and depth; a LeNet5's are fixed, so its levels must keep them."""
    widths = [level.width for level in levels[:-1]]
    if isinstance(template, MLP):
        model = MLP(template.in_channels, template.num_classes, widths, template.bias, template.img_size, template.crop)
    elif isinstance(template, VGG):
        convs = [level for level in levels if level.conv]
        model = vgg_with(template, [lv.width for lv in convs], [lv.pool for lv in convs], widths[len(convs):])
    elif widths == hidden_widths(template) and len(levels) == len(weighted_modules(template)):
        model = copy.deepcopy(template)
    else:
        raise ValueError(f"a {type(template).__name__} has fixed widths {hidden_widths(template)}; cannot build one "
                         f"with widths {widths}")
    param = next(template.parameters())
    model.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for module, level in zip(weighted_modules(model), levels):
            module.weight.copy_(level.weight)
            if level.bias is not None:
                module.bias.copy_(level.bias)
    return model.train(template.training)
