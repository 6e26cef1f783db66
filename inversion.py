"""Model inversion on pixels: images optimised so that one frozen expert responds to them as to its data.

- ``data_impressions`` (Nayak et al. ICML 2019): each image gets a soft target drawn from a Dirichlet whose
  concentration is beta x the min-max normalised cosine similarity between its class's final-layer weight
  vector and the others', and is optimised so that the expert's softmax at a high temperature matches it.
- ``deep_inversion`` (Yin et al. CVPR 2020), for experts with batch norm: each image gets a target class, and
  the batch's statistics at every BatchNorm layer are pulled to the layer's running statistics.

Both add a total-variation and an L2 image prior, shift the batch by a random jitter (and optionally flip it)
at every step, and optimise [0,1] pixels parametrised as sigmoid(u) with Adam. Only the expert runs, on
many images at once, so this is cheap on a CPU. No real image is read.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from common import make_generator
from data import InputFormat, normalise


def final_linear(model: nn.Module) -> nn.Linear:
    """The layer that produces an expert's logits: its last nn.Linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model inversion needs the expert's final-layer class weights, and it has no nn.Linear")
    return linears[-1]


def class_weights(model: nn.Module) -> torch.Tensor:
    """``[K, D]``: the expert's final-layer class weights; an expert given by file says where they are
    (expert_files.FileExpert.class_weights), others hold them in their last nn.Linear."""
    if hasattr(model, "class_weights"):
        return model.class_weights()
    return final_linear(model).weight


def class_similarity(model: nn.Module) -> torch.Tensor:
    """``[K, K]``: cosine similarity of the final-layer class weight vectors, each row min-max normalised
    to [0, 1] (Nayak et al.'s class similarity matrix: the diagonal is 1)."""
    weights = F.normalize(class_weights(model).detach().float(), dim=1)
    similarity = weights @ weights.T
    low = similarity.min(dim=1, keepdim=True).values
    high = similarity.max(dim=1, keepdim=True).values
    return (similarity - low) / (high - low).clamp(min=1e-12)


def dirichlet_targets(similarity: torch.Tensor, n: int, betas: list[float], seed: int) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """``n`` soft targets and their classes: classes dealt evenly, betas split the images evenly; target of an
    image of class k ~ Dirichlet(beta x similarity[k]) (entries floored so every concentration is positive)."""
    rng = np.random.default_rng(seed)
    k = similarity.shape[0]
    classes = rng.permutation(np.arange(n) % k)
    beta = np.asarray(betas, dtype=float)[np.arange(n) * len(betas) // n]
    concentration = beta[:, None] * np.maximum(similarity.cpu().numpy()[classes], 1e-3)
    targets = np.stack([rng.dirichlet(alpha) for alpha in concentration])
    return torch.from_numpy(targets).float(), torch.from_numpy(classes)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels: a smoothness prior."""
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def optimise_pixels(expert: nn.Module, fmt: InputFormat, n: int, steps: int, lr: float, tv_weight: float,
                    l2_weight: float, jitter: int, flip: bool, seed: int, device: torch.device,
                    task_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``n`` images in [0,1] optimised against ``task_loss(logits)`` plus the image priors, with a random shift
    (and flip) of the whole batch at every step; returns them detached."""
    rng = make_generator(seed, device)
    u = torch.randn(n, fmt.channels, 32, 32, generator=rng, device=device).requires_grad_(True)
    optimiser = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        x = torch.sigmoid(u)
        shown = x
        if jitter:
            dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=rng, device=device).tolist()
            shown = torch.roll(shown, shifts=(dx, dy), dims=(2, 3))
        if flip and torch.rand((), generator=rng, device=device) < 0.5:
            shown = torch.flip(shown, dims=(3,))
        inputs = normalise(shown, fmt)
        loss = task_loss(expert(inputs)) + tv_weight * total_variation(x) + l2_weight * inputs.pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return torch.sigmoid(u).detach()


def data_impressions(expert: nn.Module, fmt: InputFormat, settings: config.InversionSettings, n: int, seed: int,
                     device: torch.device) -> torch.Tensor:
    """``n`` data impressions of ``expert`` as [0,1] images (one batch: the caller splits the work)."""
    expert.eval().requires_grad_(False)
    targets, _ = dirichlet_targets(class_similarity(expert), n, settings.betas, seed)
    targets = targets.to(device)

    def soft_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        return -(targets * F.log_softmax(logits / settings.temperature, dim=1)).sum(dim=1).mean()

    return optimise_pixels(expert, fmt, n, settings.steps, settings.lr, settings.tv_weight, settings.l2_weight,
                           settings.jitter, settings.flip, seed, device, soft_cross_entropy)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def deep_inversion(expert: nn.Module, fmt: InputFormat, settings: config.DeepInversionSettings, n: int, seed: int,
                   device: torch.device) -> torch.Tensor:
    """``n`` DeepInversion images of ``expert`` (which must have BatchNorm layers) as [0,1] images."""
    layers = batchnorm_layers(expert)
    if not layers:
        raise ValueError("deepinversion matches BatchNorm statistics, and this expert has no BatchNorm layer")
    expert.eval().requires_grad_(False)
    num_classes = class_weights(expert).shape[0]
    labels = torch.from_numpy(np.random.default_rng(seed).permutation(np.arange(n) % num_classes)).to(device)
    distances: list[torch.Tensor] = []

    def match_statistics(module, inputs, output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3)) if x.dim() == 4 else x.mean(dim=0)
        var = x.var(dim=(0, 2, 3), unbiased=False) if x.dim() == 4 else x.var(dim=0, unbiased=False)
        distances.append(torch.linalg.vector_norm(mean - module.running_mean)
                         + torch.linalg.vector_norm(var - module.running_var))

    def task_loss(logits: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels) + settings.bn_weight * torch.stack(distances).sum()
        distances.clear()
        return loss

    handles = [layer.register_forward_hook(match_statistics) for layer in layers]
    try:
        return optimise_pixels(expert, fmt, n, settings.steps, settings.lr, settings.tv_weight, settings.l2_weight,
                               settings.jitter, settings.flip, seed, device, task_loss)
    finally:
        for handle in handles:
            handle.remove()
