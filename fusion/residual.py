"""Residual networks (archs/resnet.py) in weight-space fusion: their channel spaces, vanilla averaging and OTFusion.

A ResNet is not a chain of levels: a block adds its input to its branch's output, channel by channel, so the
channels of a block's output are its input's channels. Its channels therefore fall into *spaces*, sets of
channels that move together:

- a stream: the stem's output and the output of every identity-skip block after it, up to the next block
  with a projection shortcut, which starts a new stream (defined by its 1x1 shortcut convolution);
- a block's middle: its first convolution's outputs, which only its second convolution reads.

Every parameter has the space of its rows (a convolution's output channels, a batch norm's vectors and
running statistics) and maybe the space of its columns (a convolution's input channels, the classifier's
inputs). Aligning a parent to the anchor is one transport per space, found where the space is defined (the
stem, a block's first convolution, a projection shortcut: "aligned like a convolution"), and applied to every
parameter that reads or writes the space, so a block's output and its skip share one transport. Batch norm
moves with its channels (its affine vectors and running statistics are mixed by the same transport);
``reset_norm_statistics`` optionally resets the fused network's running statistics to the fusion samples'
instead. That reset is not REPAIR (fusion/residual_repair.py), which sets each channel's output statistics to
its parents'.

Weight cost compares a space's channels by the incoming weights of its defining convolution with the batch norm
folded in (the affine map a channel computes in eval mode), after the previous spaces' transports; activation
cost by their pre-activations (a stream's: the block's sum before its ReLU) on the samples. Networks are
handled in float64 and in contiguous memory format (oneDNN's channels-last strided 1x1 convolutions have been
seen to crash on CPUs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from archs.resnet import BasicBlock, ResNet
from fusion.levels import SAMPLE_CHUNK, columns
from fusion.ot import check_otfusion_args, distances, emd_transport

NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Space:
    """Channels that move together: defined by convolution ``conv`` (and its norm ``norm``), reading space
    ``reads`` (None: the images); their pre-activation is the sum of the outputs of the modules ``acts``."""

    name: str
    conv: str
    norm: str
    reads: str | None
    acts: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    spaces: list[Space]  # in the order the data meets them
    axes: dict[str, tuple[str | None, str | None]]  # state-dict entry -> (space of its rows, of its columns)


def is_resnet(parents: Sequence[nn.Module]) -> bool:
    return any(isinstance(p, ResNet) for p in parents)


def check_resnets(parents: Sequence[nn.Module], method: str, count: int | None = None, same_depth: bool = True,
                  same_widths: bool = False) -> None:
    """One-line errors for ResNet parents a fusion method cannot take together."""
    if count is not None and len(parents) != count:
        raise ValueError(f"{method} fuses exactly {count} parents, got {len(parents)}")
    if not parents or not all(isinstance(p, ResNet) for p in parents):
        raise ValueError(f"{method}: parents must all be ResNets (archs/resnet.py) or all other fusable networks, got "
                         f"{[type(p).__name__ for p in parents]}")
    first = parents[0]
    for k, parent in enumerate(parents[1:], 1):
        kind = (parent.in_channels, parent.num_classes, parent.batch_norm, parent.bias)
        if kind != (first.in_channels, first.num_classes, first.batch_norm, first.bias):
            raise ValueError(f"{method}: parent {k} reads {parent.in_channels} channels, predicts {parent.num_classes} "
                             f"classes, batch_norm={parent.batch_norm}, bias={parent.bias}; parent 0 "
                             f"{first.in_channels}, {first.num_classes}, {first.batch_norm}, {first.bias}; they "
                             "must agree")
        if same_depth and parent.depth != first.depth:
            raise ValueError(f"{method} needs ResNets of one depth, but parent 0 is a ResNet{first.depth} and parent "
                             f"{k} a ResNet{parent.depth}; use clafusion for parents of different depths")
        if same_widths and parent.stage_widths != first.stage_widths:
            raise ValueError(f"{method} needs identical widths, but parent 0 has {first.stage_widths} and parent {k} "
                             f"{parent.stage_widths}; fuse ResNets of different widths with otfusion")


def plan_of(model: ResNet) -> Plan:
    """The channel spaces of ``model`` and the spaces every one of its parameters reads and writes."""
    spaces: list[Space] = []
    axes: dict[str, tuple[str | None, str | None]] = {}

    def define(space: Space) -> None:
        spaces.append(space)
        axes[f"{space.conv}.weight"] = (space.name, space.reads)
        writes(space.conv, space.norm, space.name)

    def writes(conv: str, norm: str, space: str) -> None:
        if model.bias:
            axes[f"{conv}.bias"] = (space, None)
        if model.batch_norm:
            axes.update({f"{norm}.{entry}": (space, None) for entry in NORM_ENTRIES})

    define(Space("stem", "body.0", "body.1", None, ("body.1",)))
    stream = "stem"
    for i, block in enumerate(model.body):
        if not isinstance(block, BasicBlock):
            continue
        p = f"body.{i}"
        define(Space(f"{p}.mid", f"{p}.conv1", f"{p}.bn1", stream, (f"{p}.bn1",)))
        if block.projection is not None:
            define(Space(f"{p}.out", f"{p}.shortcut.0", f"{p}.shortcut.1", stream, (f"{p}.bn2", f"{p}.shortcut")))
            stream = f"{p}.out"
        axes[f"{p}.conv2.weight"] = (stream, f"{p}.mid")
        writes(f"{p}.conv2", f"{p}.bn2", stream)
    axes["fc.weight"] = (None, stream)
    axes["fc.bias"] = (None, None)
    return Plan(spaces, axes)


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().double().cpu().contiguous() for k, v in model.state_dict().items()}


def space_activations(model: nn.Module, x: Tensor, plan: Plan, extra: Sequence[str] = ()) -> dict[str, Tensor]:
    """Each space's pre-activation on ``x`` (float64, on the CPU), and the outputs of the modules ``extra``, from one forward
    pass of ``model`` in contiguous memory format."""
    wanted = {name for space in plan.spaces for name in space.acts} | set(extra)
    outputs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach().double().cpu()))
        for name in wanted]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(x.to(device=param.device, dtype=param.dtype).contiguous())
    finally:
        for hook in hooks:
            hook.remove()
    acts = {space.name: sum(outputs[name] for name in space.acts) for space in plan.spaces}
    return acts | {name: outputs[name] for name in extra}


def norm_eps(model: nn.Module) -> float:
    return next((m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)), 0.0)


def folded(state: dict[str, Tensor], conv: str, norm: str, eps: float) -> tuple[Tensor, Tensor | None]:
    """A convolution with its eval-mode batch norm folded in: the weight and bias of the affine map a channel
    computes (bias None when the network has neither biases nor batch norm)."""
    weight, bias = state[f"{conv}.weight"], state.get(f"{conv}.bias")
    if f"{norm}.weight" not in state:
        return weight, bias
    scale = state[f"{norm}.weight"] / (state[f"{norm}.running_var"] + eps).sqrt()
    shift = state[f"{norm}.bias"] - state[f"{norm}.running_mean"] * scale
    return weight * scale[:, None, None, None], shift if bias is None else bias * scale + shift


def _carried(weight: Tensor, transport: Tensor | None) -> Tensor:
    """A weight's input channels re-expressed in the anchor's basis (``transport``: [parent width, anchor width])."""
    return weight if transport is None else torch.einsum("oi...,ij->oj...", weight, transport)


def _points(state: dict[str, Tensor], space: Space, transports: dict[str, Tensor], eps: float) -> Tensor:
    weight, bias = folded(state, space.conv, space.norm, eps)
    points = _carried(weight, transports.get(space.reads)).flatten(1)
    return points if bias is None else torch.cat([points, bias[:, None]], 1)


def transported(state: dict[str, Tensor], plan: Plan, transports: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every parameter of ``plan`` with its rows and columns moved into the anchor's channels."""
    out = {}
    for name, (rows, cols) in plan.axes.items():
        tensor = state[name]
        if cols is not None:
            tensor = _carried(tensor, transports[cols])
        if rows is not None:
            tensor = torch.einsum("ij,i...->j...", transports[rows], tensor)
        out[name] = tensor
    return out


def align(state: dict[str, Tensor], anchor_state: dict[str, Tensor], plan: Plan, eps: float,
          acts: dict[str, Tensor] | None = None, anchor_acts: dict[str, Tensor] | None = None,
          positions: str = "flatten") -> dict[str, Tensor]:
    """A parent's parameters in the anchor's channels: one exact OT plan per space, in the order of ``plan``."""
    transports: dict[str, Tensor] = {}
    for space in plan.spaces:
        if acts is None:
            points, anchor_points = _points(state, space, transports, eps), _points(anchor_state, space, {}, eps)
        else:
            points = columns(acts[space.name], positions).T
            anchor_points = columns(anchor_acts[space.name], positions).T
        transports[space.name] = emd_transport(distances(points, anchor_points))
    return transported(state, plan, transports)


def with_state(template: ResNet, state: dict[str, Tensor]) -> ResNet:
    """A copy of ``template`` (its widths, dtype and device, contiguous) holding ``state`` where given."""
    model = copy.deepcopy(template).to(memory_format=torch.contiguous_format)
    own = model.state_dict()
    model.load_state_dict({k: state[k].to(v.dtype) if k in state else v for k, v in own.items()})
    return model.eval()


@dataclass(frozen=True)
class AlignedStates:
    """ResNet parents' parameters re-expressed in ``template``'s channels: fusing them is averaging them
    (``network``), and REPAIR reads each one's channel statistics (fusion/residual_repair.py)."""

    template: ResNet
    parents: list[dict[str, Tensor]]

    def network(self) -> ResNet:
        """The parameter-wise mean (batch-norm statistics averaged too)."""
        return with_state(self.template, {k: torch.stack([s[k] for s in self.parents]).mean(0)
                                          for k in plan_of(self.template).axes})


def align_as_they_are(parents: Sequence[nn.Module]) -> AlignedStates:
    """ResNets of one depth and width, their channels left where they are (vanilla averaging)."""
    check_resnets(parents, "vanilla_avg", same_widths=True)
    return AlignedStates(parents[0], [state_of(p) for p in parents])


def vanilla_avg(parents: Sequence[nn.Module]) -> ResNet:
    """Parameter-wise mean of ResNets of one depth and width (batch-norm statistics averaged too)."""
    return align_as_they_are(parents).network()


def otfusion(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
             positions: str = "flatten") -> ResNet:
    """OTFusion of ResNets of one depth: ``align_by_ot``, then average."""
    return align_by_ot(parents, samples, cost, anchor, positions).network()


def align_by_ot(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
                positions: str = "flatten") -> AlignedStates:
    """Every ResNet parent's channel spaces aligned to ``parents[anchor]``'s by exact OT (OTFusion before its
    average)."""
    check_resnets(parents, "otfusion")
    check_otfusion_args(parents, samples, cost, anchor, positions)
    plan = plan_of(parents[anchor])
    eps = norm_eps(parents[anchor])
    anchor_state = state_of(parents[anchor])
    anchor_acts = space_activations(parents[anchor], samples, plan) if cost == "activation" else None
    aligned = []
    for k, parent in enumerate(parents):
        state = state_of(parent)
        acts = space_activations(parent, samples, plan) if cost == "activation" and k != anchor else None
        aligned.append(state if k == anchor else align(state, anchor_state, plan, eps, acts, anchor_acts, positions))
    return AlignedStates(parents[anchor], aligned)


def reset_norm_statistics(model: nn.Module, samples: Tensor) -> nn.Module:
    """``model`` with every batch norm's running mean and variance reset to those of ``samples`` (each layer's
    statistics under the batch statistics of the layers before it, as training computes them)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError(f"resetting batch-norm statistics needs batch norms, and this {type(model).__name__} has "
                         "none (a ResNet with batch_norm: false)")
    momenta = [m.momentum for m in norms]
    param = next(model.parameters())
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the chunks, not an exponential one
    model.train()
    with torch.no_grad():
        for chunk in samples.to(device=param.device, dtype=param.dtype).contiguous().split(4 * SAMPLE_CHUNK):
            model(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
