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


def dafl_terms(logits: torch.Tensor, features: torch.Tensor, entropy_base: float = 10.0) -> dict[str, torch.Tensor]:
    """DAFL's three loss terms on the expert's outputs for a batch of generated images."""
    mean_prob = logits.softmax(dim=1).mean(dim=0)
    return {"one_hot": F.cross_entropy(logits, logits.argmax(dim=1)),
            # -H(mean_prob) in log base `entropy_base`: minimising it balances the classes
            "info_entropy": (mean_prob * torch.log(mean_prob + 1e-12)).sum() / math.log(entropy_base),
            "activation": features.abs().mean()}


def dafl_loss(logits: torch.Tensor, features: torch.Tensor, oh_weight: float, ie_weight: float,
              a_weight: float, entropy_base: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DAFL's generator loss on the expert's outputs for a batch of generated images, and its terms."""
    terms = dafl_terms(logits, features, entropy_base)
    loss = oh_weight * terms["one_hot"] + ie_weight * terms["info_entropy"] - a_weight * terms["activation"]
    return loss, {name: value.item() for name, value in terms.items()}


def build_generator(dafl: config.DaflTraining, channels: int) -> tuple[nn.Module, dict]:
    kwargs = {"latent_dim": dafl.latent_dim, "out_channels": channels, "img_size": 32, "width": dafl.width,
              "bn_eps": dafl.bn_eps}
    return build_model("generator", **kwargs), kwargs


def train_generator(expert: nn.Module, generator: nn.Module, dafl: config.DaflTraining, noise_seed: int,
                    device: torch.device, desc: str, resume: Resume | None = None) -> list[dict]:
    """Adam on the DAFL loss: ``generator`` learns against the frozen ``expert``; returns a log, one entry per
    epoch: the loss and its terms on the epoch's last batch, and the expert's mean confidence (max softmax) on it,
    the generator's analogue of accuracy (how surely the expert gives its images a class). With ``resume`` a killed run continues from its last saved epoch."""
    optimiser = torch.optim.Adam(generator.parameters(), lr=dafl.lr)
    noise = make_generator(noise_seed, device)
    expert.eval().requires_grad_(False)
    saver = Saver(resume, generator, optimiser, noise)
    log: list[dict] = saver.restore()
    generator.train()
    for epoch in progress(range(len(log), dafl.epochs), desc=desc, leave=False, initial=len(log),
                          total=dafl.epochs, unit="epoch"):
        for _ in range(dafl.iters_per_epoch):
            z = torch.randn(dafl.batch_size, dafl.latent_dim, generator=noise, device=device)
            logits, features = expert(generator(z), return_features=True)
            terms = dafl_terms(logits, features, dafl.entropy_base)
            loss = dafl.oh_weight * terms["one_hot"] + dafl.ie_weight * terms["info_entropy"] - \
                dafl.a_weight * terms["activation"]
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        log.append({"epoch": epoch, "loss": loss.item(), **{name: value.item() for name, value in terms.items()},
                    "confidence": logits.detach().softmax(dim=1).amax(dim=1).mean().item()})
        saver.epoch_done(log, dafl.epochs)
    return log


def train_generators(experts: list[nn.Module], generators: list[nn.Module], dafl: config.DaflTraining,
                     noise_seeds: list[int], device: torch.device, desc: str,
                     resumes: list[Resume | None]) -> list[list[dict]]:
    """``train_generator`` for many (expert, generator) pairs of one architecture at once, as one stacked
    generator against one stacked expert (stacked.py): pair i is trained as it would be alone, with its own
    noise, within floating-point tolerance. Returns the logs."""
    from stacked import stack, unstack_into
    from training import StackedSaver

    for expert in experts:
        expert.eval().requires_grad_(False)
    noises = [make_generator(seed, device) for seed in noise_seeds]
    saver = StackedSaver(resumes, generators, noises)
    logs = saver.restore()
    if len({len(log) for log in logs}) > 1:  # resumed at different epochs: one at a time
        return [train_generator(e, g, dafl, s, device, desc, r)
                for e, g, s, r in zip(experts, generators, noise_seeds, resumes)]
    network, frozen = stack(generators), stack(experts).eval().requires_grad_(False)
    optimiser = torch.optim.Adam(network.parameters(), lr=dafl.lr)
    saver.restore_optimiser(optimiser)
    network.train()
    for epoch in progress(range(len(logs[0]), dafl.epochs), desc=desc, leave=False, initial=len(logs[0]),
                          total=dafl.epochs, unit="epoch"):
        for _ in range(dafl.iters_per_epoch):
            z = torch.stack([torch.randn(dafl.batch_size, dafl.latent_dim, generator=noise, device=device)
                             for noise in noises])
            logits, features = frozen(network(z), return_features=True)
            terms = [dafl_terms(logits[i], features[i], dafl.entropy_base) for i in range(len(generators))]
            losses = torch.stack([dafl.oh_weight * t["one_hot"] + dafl.ie_weight * t["info_entropy"]
                                  - dafl.a_weight * t["activation"] for t in terms])
            optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimiser.step()
        confidence = logits.detach().softmax(dim=2).amax(dim=2).mean(dim=1).tolist()
        for log, loss, parts, sure in zip(logs, losses.tolist(), terms, confidence):
            log.append({"epoch": epoch, "loss": loss, **{name: value.item() for name, value in parts.items()},
                        "confidence": sure})
        saver.epoch_done(network, optimiser, logs, dafl.epochs)
    unstack_into(network, generators)
    return logs


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
