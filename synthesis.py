"""Data-free synthesis: DAFL generators trained against one frozen expert, their samples and their quality.

No real image is read here. The generator speaks its expert's normalised input space; ``sample_images``
turns its output back into [0,1] pixels, which any expert then reads in its own format.
"""
from __future__ import annotations

import io
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import config
from archs import build_model
from common import make_generator, progress
from data import InputFormat, prepare_input
from training import Resume, Saver

GRID_SAMPLES = 64


def dafl_loss(logits: torch.Tensor, features: torch.Tensor, oh_weight: float, ie_weight: float,
              a_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DAFL's generator loss on the expert's outputs for a batch of generated images."""
    one_hot = F.cross_entropy(logits, logits.argmax(dim=1))
    mean_prob = logits.softmax(dim=1).mean(dim=0)
    info_entropy = (mean_prob * torch.log(mean_prob + 1e-12)).sum()  # -H: minimising balances classes
    activation = features.abs().mean()
    loss = oh_weight * one_hot + ie_weight * info_entropy - a_weight * activation
    return loss, {"one_hot": one_hot.item(), "info_entropy": info_entropy.item(), "activation": activation.item()}


def train_generator(expert: nn.Module, fmt: InputFormat, dafl: config.DaflTraining, noise_seed: int,
                    device: torch.device, desc: str, resume: Resume | None = None) -> tuple[nn.Module, list[dict]]:
    """Adam on the DAFL loss against the frozen ``expert``; returns the generator (eval mode) and a log
    (one entry per epoch). With ``resume`` a killed run continues from its last saved epoch."""
    generator = build_model("generator", latent_dim=dafl.latent_dim, out_channels=fmt.channels,
                            img_size=32, width=dafl.width).to(device)
    optimiser = torch.optim.Adam(generator.parameters(), lr=dafl.lr)
    noise = make_generator(noise_seed, device)
    expert.eval().requires_grad_(False)
    saver = Saver(resume, generator, optimiser, noise)
    log: list[dict] = saver.restore()
    generator.train()
    for epoch in progress(range(len(log), dafl.epochs), desc=desc, leave=False, initial=len(log),
                          total=dafl.epochs):
        for _ in range(dafl.iters_per_epoch):
            z = torch.randn(dafl.batch_size, dafl.latent_dim, generator=noise, device=device)
            logits, features = expert(generator(z), return_features=True)
            loss, parts = dafl_loss(logits, features, dafl.oh_weight, dafl.ie_weight, dafl.a_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        log.append({"epoch": epoch, "loss": loss.item(), **parts})
        saver.epoch_done(log, dafl.epochs)
    return generator.eval(), log


@torch.no_grad()
def sample_images(generator: nn.Module, fmt: InputFormat, n: int, seed: int, device: torch.device,
                  batch_size: int = 1024) -> torch.Tensor:
    """``n`` generated images as [0,1] pixels: the generator speaks its expert's normalised space, so
    undo that normalisation and clamp, which lets any expert read them in its own format."""
    noise = make_generator(seed, device)
    mean = torch.tensor(fmt.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std, device=device).view(1, -1, 1, 1)
    latent = generator.project.in_features
    chunks = []
    for start in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - start), latent, generator=noise, device=device)
        chunks.append((generator(z) * std + mean).clamp(0, 1))
    return torch.cat(chunks)


@torch.no_grad()
def sample_quality(expert: nn.Module, fmt: InputFormat, images: torch.Tensor,
                   other_expert: nn.Module | None) -> dict:
    """Class balance and confidence of the expert on samples, and another seed's agreement with it."""
    logits = expert(prepare_input(images, fmt))
    probs = logits.softmax(dim=1)
    labels = probs.argmax(dim=1)
    share = torch.bincount(labels, minlength=probs.shape[1]).float() / len(labels)
    entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
    quality = {"class_share": share.tolist(), "balance": entropy / math.log(probs.shape[1]),
               "mean_confidence": probs.max(dim=1).values.mean().item(), "cross_seed_agreement": None}
    if other_expert is not None:
        other = other_expert(prepare_input(images, fmt)).argmax(dim=1)
        quality["cross_seed_agreement"] = (other == labels).float().mean().item()
    return quality


def png_grid(images: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    save_image(images, buffer, format="png", nrow=8, padding=1)
    return buffer.getvalue()
