"""Many models of one architecture as one network: every seed of a stage trained or run in a single pass.

``stack(models)`` turns S models of the same architecture and shape into one module whose convolutions are
grouped convolutions over the seeds' channels (``groups=S``) and whose linear layers are batched matrix
products, so one forward pass computes all S models, each on its own batch. Parameters of seed s are slices
of the stacked ones and gradients stay separate, so element-wise optimisers (SGD with momentum, Adam) update
each seed exactly as they would update it alone; ``unstack`` gives each seed's state dict back.

Why hand-written rather than torch.func.vmap: on 2 CPU cores vmap over LeNet5 training steps measured about
4x slower than training the seeds one after another, while channels-last grouped convolutions measured about
2x faster (bench/bench_vectorised.py prints the ratios). vmap remains the way for architectures not listed here.

Layouts: image tensors are ``[B, S*C, H, W]`` (seed-major channels); vectors are ``[S, B, D]``.
Supported: LeNet5 (and half width), MLP, the DAFL generator, the gates (PAN, AgnosticPAN).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.gates import Standardised
from archs.generator import Generator
from archs.lenet import LeNet5
from archs.mlp import MLP
from common import resolve_device


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """``[S, B, C, H, W]`` per-seed images -> ``[B, S*C, H, W]``, channels-last (faster grouped convolutions)."""
    s, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, s * c, h, w).contiguous(memory_format=torch.channels_last)


def from_channels(x: torch.Tensor, seeds: int) -> torch.Tensor:
    """``[B, S*C, H, W]`` -> ``[S, B, C, H, W]``."""
    b, sc, h, w = x.shape
    return x.reshape(b, seeds, sc // seeds, h, w).permute(1, 0, 2, 3, 4)


class GroupedConv(nn.Module):
    """S Conv2d layers of one shape as one convolution with ``groups=S``."""

    def __init__(self, convs: list[nn.Conv2d]) -> None:
        super().__init__()
        first = convs[0]
        self.seeds, self.stride, self.padding = len(convs), first.stride, first.padding
        self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
        self.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs])) if first.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.seeds)

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        weights = self.weight.detach().chunk(self.seeds)
        biases = self.bias.detach().chunk(self.seeds) if self.bias is not None else [None] * self.seeds
        return [{"weight": w, **({"bias": b} if b is not None else {})} for w, b in zip(weights, biases)]


class BatchedLinear(nn.Module):
    """S Linear layers of one shape as a batched matrix product on ``[S, B, in]``."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]))
        self.bias = (nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]))
                     if linears[0].bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out + self.bias.unsqueeze(1) if self.bias is not None else out

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        biases = self.bias.detach() if self.bias is not None else [None] * len(self.weight)
        return [{"weight": w, **({"bias": b} if b is not None else {})} for w, b in zip(self.weight.detach(), biases)]


class GroupedBatchNorm(nn.Module):
    """S BatchNorm2d layers as one over S*C channels: per-channel statistics are per seed already."""

    def __init__(self, norms: list[nn.BatchNorm2d]) -> None:
        super().__init__()
        first = norms[0]
        self.seeds = len(norms)
        self.norm = nn.BatchNorm2d(first.num_features * len(norms), eps=first.eps, momentum=first.momentum,
                                   affine=first.affine)
        with torch.no_grad():
            for name in ("running_mean", "running_var"):
                getattr(self.norm, name).copy_(torch.cat([getattr(n, name) for n in norms]))
            self.norm.num_batches_tracked.copy_(first.num_batches_tracked)
            if first.affine:
                self.norm.weight.copy_(torch.cat([n.weight for n in norms]))
                self.norm.bias.copy_(torch.cat([n.bias for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        parts = {name: tensor.detach().chunk(self.seeds) for name, tensor in self.norm.state_dict().items()
                 if name != "num_batches_tracked"}
        tracked = self.norm.num_batches_tracked.detach().clone()
        return [{**{name: chunks[s] for name, chunks in parts.items()}, "num_batches_tracked": tracked}
                for s in range(self.seeds)]


def grouped(layers: list[nn.Module]) -> nn.Module:
    """The stacked form of one layer position across seeds (activations and pools need none)."""
    first = layers[0]
    if isinstance(first, nn.Conv2d):
        return GroupedConv(layers)
    if isinstance(first, nn.Linear):
        return BatchedLinear(layers)
    if isinstance(first, nn.BatchNorm2d):
        return GroupedBatchNorm(layers)
    if isinstance(first, (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.Upsample, nn.Tanh, nn.Flatten)):
        return first
    raise TypeError(f"no stacked form for {type(first).__name__}")


class StackedSequential(nn.Module):
    """An nn.Sequential of S models, position by position. A ReLU followed by a max-pool runs after it
    instead: max and ReLU commute exactly (ReLU is monotone), and the ReLU then touches a quarter of the
    values, which saves about a tenth of a LeNet training step on CPU."""

    def __init__(self, sequentials: list[nn.Sequential]) -> None:
        super().__init__()
        layers = [grouped([s[i] for s in sequentials]) for i in range(len(sequentials[0]))]
        names = [name for name, _ in sequentials[0].named_children()]
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
                names[i], names[i + 1] = names[i + 1], names[i]
        self.layers = nn.ModuleList(layers)
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def unstack(self, seeds: int) -> list[dict[str, torch.Tensor]]:
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(seeds)]
        for name, layer in zip(self.names, self.layers):
            if hasattr(layer, "unstack"):
                for state, part in zip(states, layer.unstack()):
                    state.update({f"{name}.{k}": v for k, v in part.items()})
        return states


class StackedLeNet(nn.Module):
    """S LeNet5 experts: ``forward(x [S, B, C, 32, 32])`` -> logits ``[S, B, K]`` (and features ``[S, B, F]``)."""

    def __init__(self, models: list[LeNet5]) -> None:
        super().__init__()
        self.seeds = len(models)
        self.convs = StackedSequential([m.convs[:-1] for m in models])  # all but the Flatten
        self.head = StackedSequential([m.head for m in models])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        out = self.convs(to_channels(x))  # [B, S*F, 1, 1]
        features = out.reshape(out.shape[0], self.seeds, -1).transpose(0, 1)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        convs, head = self.convs.unstack(self.seeds), self.head.unstack(self.seeds)
        return [{**{f"convs.{k}": v for k, v in c.items()}, **{f"head.{k}": v for k, v in h.items()}}
                for c, h in zip(convs, head)]


class StackedMLP(nn.Module):
    def __init__(self, models: list[MLP]) -> None:
        super().__init__()
        self.seeds = len(models)
        self.flat_inputs = models[0].flat_inputs  # a bound method: the template is not a submodule
        self.layers = nn.ModuleList(BatchedLinear([m.layers[i] for m in models]) for i in range(len(models[0].layers)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = torch.stack([self.flat_inputs(part) for part in x])
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        logits = self.layers[-1](h)
        return (logits, h) if return_features else logits

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(self.seeds)]
        for i, layer in enumerate(self.layers):
            for state, part in zip(states, layer.unstack()):
                state.update({f"layers.{i}.{k}": v for k, v in part.items()})
        return states


class StackedPAN(nn.Module):
    """S gates (PAN or AgnosticPAN) of one shape, each with its own input standardisation: ``[S, B, D]``."""

    def __init__(self, models: list[Standardised]) -> None:
        super().__init__()
        self.seeds = len(models)
        self.register_buffer("input_mean", torch.stack([m.input_mean for m in models]).unsqueeze(1))
        self.register_buffer("input_std", torch.stack([m.input_std for m in models]).unsqueeze(1))
        self.net = StackedSequential([m.net for m in models])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        return [{"input_mean": self.input_mean[s, 0], "input_std": self.input_std[s, 0],
                 **{f"net.{k}": v for k, v in state.items()}} for s, state in enumerate(self.net.unstack(self.seeds))]


class StackedGenerator(nn.Module):
    """S DAFL generators: ``forward(z [S, B, latent])`` -> images ``[S, B, C, 32, 32]``."""

    def __init__(self, models: list[Generator]) -> None:
        super().__init__()
        first = models[0]
        self.seeds, self.width, self.init_size = len(models), first.width, first.init_size
        self.project = BatchedLinear([m.project for m in models])
        self.body = StackedSequential([m.body for m in models])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s, b, _ = z.shape
        x = self.project(z).reshape(s, b, self.width, self.init_size, self.init_size)
        return from_channels(self.body(to_channels(x)), s)

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        project = self.project.unstack()
        return [{**{f"project.{k}": v for k, v in p.items()}, **{f"body.{k}": v for k, v in b.items()}}
                for p, b in zip(project, self.body.unstack(self.seeds))]


STACKED = ((LeNet5, StackedLeNet), (MLP, StackedMLP), (Standardised, StackedPAN), (Generator, StackedGenerator))


def stackable(models: list[nn.Module]) -> bool:
    """Whether ``models`` (one architecture, one shape) have a stacked form here."""
    kinds = {type(m) for m in models}
    if len(kinds) != 1 or not any(isinstance(models[0], kind) for kind, _ in STACKED):
        return False
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in models}
    return len(shapes) == 1


def stack(models: list[nn.Module]) -> nn.Module:
    """The stacked form of ``models`` (checked by ``stackable``); its parameters are copies of theirs."""
    if not stackable(models):
        raise TypeError(f"cannot stack {sorted({type(m).__name__ for m in models})} models of different shapes")
    for kind, stacked in STACKED:
        if isinstance(models[0], kind):
            return stacked(models).to(next(models[0].parameters()).device)
    raise AssertionError("unreachable")


def unstack_into(stacked: nn.Module, models: list[nn.Module]) -> None:
    """Copy each seed's slice of ``stacked`` back into its model."""
    for model, state in zip(models, stacked.unstack()):
        model.load_state_dict({k: v.clone() for k, v in state.items()})


# stage -> device type -> whether ``stack_seeds: auto`` stacks: the path bench/bench_vectorised.py measured
# faster (results/bench/vectorised_cpu.json). On CPU, LeNet5's convolutions are compute-bound, and grouped ones
# leave the cache, so experts and DAFL generators train faster one seed at a time; the tiny gates gain from
# stacking (one Python step for all), as does evaluation. On CUDA every stage stacks (one launch for all seeds).
AUTO_STACKING = {"experts": {"cpu": False, "cuda": True}, "generators": {"cpu": False, "cuda": True},
                 "gates": {"cpu": True, "cuda": True}, "merge": {"cpu": True, "cuda": True}}


def resolve_stacking(setting: str, stage: str, device: torch.device | str) -> bool:
    """Whether ``stage`` runs its seeds as one stacked network: ``stack_seeds`` true or false as given; ``auto``
    as AUTO_STACKING says for the device's type."""
    if setting != "auto":
        return setting == "true"
    kind = resolve_device(device).type if isinstance(device, str) else device.type
    return AUTO_STACKING[stage].get(kind, False)
