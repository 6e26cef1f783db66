"""REPAIR (Jordan et al. 2023; fusion/repair.py says what it is) for ResNets (archs/resnet.py).

A ResNet's convolutions are renormalised one by one, each at its output with its norm (the stem, every block's
two convolutions and its projection shortcut, before the skip is added), as Jordan et al. renormalise every
convolution of their ResNets. A channel's target is the mean over the aligned parents of that channel's mean
and standard deviation there. One forward pass over the samples measures and corrects each output in the order
the data meets them, so every correction sees the corrected outputs before it. The correction is folded into
the norm's affine (weight s * gamma, bias s * (beta - own mean) + target mean) for networks with batch norm, into
the convolution's weights and bias for networks without; without either, only the standard deviation is set.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor

from archs.resnet import BasicBlock, ResNet
from fusion.repair import Repaired, Stats, channel_stats
from fusion.residual import AlignedStates, plan_of, space_activations, state_of, with_state


def outputs(model: ResNet) -> list[tuple[str, str]]:
    """``(output module, convolution)`` of every renormalised convolution, in the order the data meets them: the
    output module is the convolution's norm (an identity without batch norm)."""
    points = [("body.1", "body.0")]
    for i, block in enumerate(model.body):
        if isinstance(block, BasicBlock):
            p = f"body.{i}"
            points += [(f"{p}.bn1", f"{p}.conv1"), (f"{p}.bn2", f"{p}.conv2")]
            if block.projection is not None:
                points.append((f"{p}.shortcut.1", f"{p}.shortcut.0"))
    return points


def _stats(model: ResNet, x: Tensor, names: Sequence[str]) -> dict[str, Stats]:
    acts = space_activations(model, x, plan_of(model), names)
    return {name: channel_stats(acts[name]) for name in names}


def parent_targets(alignment: AlignedStates, x: Tensor) -> dict[str, Stats]:
    """Per renormalised output, each channel's target: the aligned parents' mean channel mean and std on ``x``."""
    names = [out for out, _ in outputs(alignment.template)]
    per_parent = [_stats(with_state(alignment.template, state), x, names) for state in alignment.parents]
    return {name: (torch.stack([p[name][0] for p in per_parent]).mean(0),
                   torch.stack([p[name][1] for p in per_parent]).mean(0)) for name in names}


def repair(alignment: AlignedStates, samples: Tensor) -> Repaired:
    """The fused ResNet of ``alignment`` (the aligned parents' mean) after REPAIR on ``samples``, and its std
    ratios before and after."""
    template = alignment.template
    x = samples.detach().double().cpu().contiguous()
    targets = parent_targets(alignment, x)
    fused = alignment.network()
    shifts = template.batch_norm or template.bias  # where a channel's mean can be moved
    measured: dict[str, tuple[Tensor, Tensor]] = {}  # output -> (own mean, scale)

    def renormalise(name: str, output: Tensor) -> Tensor:
        own_mean, own_std = channel_stats(output)
        mean, std = targets[name]
        scale = torch.where(own_std > 0, std / own_std.clamp_min(torch.finfo(own_std.dtype).tiny), 1.0)
        measured[name] = (own_mean, scale)
        view = (1, -1, 1, 1)
        return (output - own_mean.view(view)) * scale.view(view) + mean.view(view) if shifts \
            else output * scale.view(view)

    # measured in float64 on the CPU, with the targets, whatever the parents' precision and device
    probe = copy.deepcopy(fused).to("cpu", torch.float64)
    modules = dict(probe.named_modules())
    hooks = [modules[name].register_forward_hook(lambda module, inputs, output, name=name: renormalise(name, output))
             for name in targets]
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for hook in hooks:
            hook.remove()
    state = state_of(fused)
    for out, conv in outputs(template):
        own_mean, scale = measured[out]
        mean = targets[out][0]
        if template.batch_norm:
            state[f"{out}.weight"] = state[f"{out}.weight"] * scale
            state[f"{out}.bias"] = (state[f"{out}.bias"] - own_mean) * scale + mean
        else:
            state[f"{conv}.weight"] = state[f"{conv}.weight"] * scale.view(-1, 1, 1, 1)
            if template.bias:
                state[f"{conv}.bias"] = (state[f"{conv}.bias"] - own_mean) * scale + mean
    network = with_state(template, state)
    return Repaired(network, _ratios(fused, x, targets), _ratios(network, x, targets))


def _ratios(network: ResNet, x: Tensor, targets: dict[str, Stats]) -> list[float]:
    own = _stats(copy.deepcopy(network).double(), x, list(targets))
    return [float(own[name][1].mean() / targets[name][1].mean()) for name in targets]


def std_ratios(network: ResNet, alignment: AlignedStates, samples: Tensor) -> list[float]:
    """Per renormalised output, the mean standard deviation of ``network``'s channels over that of their targets:
    Jordan et al.'s variance-collapse diagnostic; 1 where nothing collapsed."""
    x = samples.detach().double().cpu().contiguous()
    return _ratios(network, x, parent_targets(alignment, x))
