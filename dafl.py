"""DAFL (Chen et al. ICCV 2019): a generator trained from noise against one frozen expert, and its samples.

As the reference implementation defines it: the loss is the one-hot cross-entropy against the expert's own
argmax, plus ``ie_weight`` x the information entropy of the batch-mean softmax in log base ``entropy_base``
(10), minus ``a_weight`` x the mean absolute feature activation; the generator's BatchNorm layers after its
convolutions use eps 0.8; and samples are drawn as DAFL draws them for its student, with the generator in
training mode (batch statistics), a batch of ``batch_size`` at a time. No real image is read. The generator
speaks its expert's normalised input space; ``sample_images`` turns its output back into [0,1] pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from archs import build_model
from common import make_generator, progress
from data import InputFormat
from training import Resume, Saver


def dafl_loss(logits: torch.Tensor, features: torch.Tensor, oh_weight: float, ie_weight: float,
              a_weight: float, entropy_base: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DAFL's generator loss on the expert's outputs for a batch of generated images."""
    one_hot = F.cross_entropy(logits, logits.argmax(dim=1))
    mean_prob = logits.softmax(dim=1).mean(dim=0)
    # -H(mean_prob) in log base `entropy_base`: minimising it balances the classes
    info_entropy = (mean_prob * torch.log(mean_prob + 1e-12)).sum() / math.log(entropy_base)
    activation = features.abs().mean()
    loss = oh_weight * one_hot + ie_weight * info_entropy - a_weight * activation
    return loss, {"one_hot": one_hot.item(), "info_entropy": info_entropy.item(), "activation": activation.item()}


def build_generator(dafl: config.DaflTraining, channels: int) -> tuple[nn.Module, dict]:
    kwargs = {"latent_dim": dafl.latent_dim, "out_channels": channels, "img_size": 32, "width": dafl.width,
              "bn_eps": dafl.bn_eps}
    return build_model("generator", **kwargs), kwargs


def train_generator(expert: nn.Module, fmt: InputFormat, dafl: config.DaflTraining, noise_seed: int,
                    device: torch.device, desc: str, resume: Resume | None = None) -> tuple[nn.Module, list[dict]]:
    """Adam on the DAFL loss against the frozen ``expert``; returns the generator and a log (one entry per
    epoch). With ``resume`` a killed run continues from its last saved epoch."""
    generator = build_generator(dafl, fmt.channels)[0].to(device)
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
            loss, parts = dafl_loss(logits, features, dafl.oh_weight, dafl.ie_weight, dafl.a_weight,
                                    dafl.entropy_base)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        log.append({"epoch": epoch, "loss": loss.item(), **parts})
        saver.epoch_done(log, dafl.epochs)
    return generator, log


@torch.no_grad()
def sample_images(generator: nn.Module, fmt: InputFormat, n: int, seed: int, device: torch.device,
                  batch_size: int, mode: str = "train") -> torch.Tensor:
    """``n`` generated images as [0,1] pixels: the generator speaks its expert's normalised space, so undo that
    normalisation and clamp, which lets any expert read them in its own format.

    ``mode="train"`` draws as DAFL does, with batch statistics in whole batches of ``batch_size`` (the last
    batch is drawn whole and cut), so every image sees the statistics of a batch of the size the generator was
    trained with; ``mode="eval"`` uses the running statistics. The generator's mode is restored after."""
    noise = make_generator(seed, device)
    mean = torch.tensor(fmt.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std, device=device).view(1, -1, 1, 1)
    latent = generator.project.in_features
    was_training = generator.training
    generator.train(mode == "train")
    chunks = []
    for start in range(0, n, batch_size):
        z = torch.randn(batch_size, latent, generator=noise, device=device)
        chunks.append((generator(z)[:n - start] * std + mean).clamp(0, 1))
    generator.train(was_training)
    return torch.cat(chunks)
