"""Train data-free generators: one per expert per seed, each against *its own* expert (DAFL).

    python train_gan.py problem=disjoint_mnist seeds=[770597] experiments/gan_cpu.yaml

The expert is frozen in eval mode; the generator learns from noise to produce inputs the expert
classifies confidently (one-hot cross-entropy against its own argmax), spread over its classes
(information entropy of the batch-mean softmax) and that excite its features (mean absolute
feature activation). No real image is read. Per generator: a checkpoint, a PNG grid of samples
from fixed noise, and quality figures measured without real data: the class balance of the
expert's predictions on samples, its mean confidence, and how often an expert of another seed
agrees with this expert's labels.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import config
from archs import build_model
from common import (CheckpointError, atomic_write_bytes, cli, derive_seed, load_model, make_generator,
                    mean_std, print_summary, progress, resolve_device, reuse_checkpoint, save_checkpoint,
                    seed_everything, write_rows)
from data import InputFormat, prepare_input
from train_source_networks import arch_tag, expert_command, expert_path

GRID_SAMPLES = 64


def generator_path(ckpt_dir: str | Path, task: str, arch: str, seed: int, arch_kwargs: dict | None = None) -> Path:
    """Named like the expert it trains against: ``arch`` alone without ``arch_kwargs`` (the names
    generators have always had), else the expert's arch tag (train_source_networks.arch_tag)."""
    return Path(ckpt_dir) / "generators" / f"{task}_{arch_tag(arch, arch_kwargs)}_seed{seed}.pt"


def gan_command(problem: str, seeds: list[int]) -> str:
    return f"python train_gan.py problem={problem} seeds=[{','.join(map(str, seeds))}]"


def dafl_loss(logits: torch.Tensor, features: torch.Tensor, oh_weight: float, ie_weight: float,
              a_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DAFL's generator loss on the expert's outputs for a batch of generated images."""
    one_hot = F.cross_entropy(logits, logits.argmax(dim=1))
    mean_prob = logits.softmax(dim=1).mean(dim=0)
    info_entropy = (mean_prob * torch.log(mean_prob + 1e-12)).sum()  # -H: minimising balances classes
    activation = features.abs().mean()
    loss = oh_weight * one_hot + ie_weight * info_entropy - a_weight * activation
    return loss, {"one_hot": one_hot.item(), "info_entropy": info_entropy.item(), "activation": activation.item()}


def train_generator(expert: nn.Module, fmt: InputFormat, cfg: config.GanConfig, seed: int,
                    device: torch.device, desc: str) -> tuple[nn.Module, list[dict]]:
    """Adam on the DAFL loss against the frozen ``expert``; returns the generator (eval mode) and a log."""
    generator = build_model("generator", latent_dim=cfg.latent_dim, out_channels=fmt.channels,
                            img_size=32, width=cfg.width).to(device)
    optimiser = torch.optim.Adam(generator.parameters(), lr=cfg.lr)
    noise = make_generator(derive_seed(seed, desc, "noise"), device)
    expert.eval().requires_grad_(False)
    log = []
    for epoch in progress(range(cfg.epochs), desc=desc, leave=False):
        for _ in range(cfg.iters_per_epoch):
            z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=noise, device=device)
            logits, features = expert(generator(z), return_features=True)
            loss, parts = dafl_loss(logits, features, cfg.oh_weight, cfg.ie_weight, cfg.a_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        log.append({"epoch": epoch, "loss": loss.item(), **parts})
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


def other_seed_expert(ckpt_dir: str | Path, task: str, arch: str, seed: int,
                      arch_kwargs: dict | None = None) -> Path | None:
    """An expert of the same task, arch and arch_kwargs but another seed, to check that samples carry the
    class this expert gives them rather than exploiting its particular weights (evaluation only)."""
    mine = expert_path(ckpt_dir, task, arch, seed, arch_kwargs)
    others = sorted(p for p in mine.parent.glob(f"{task}_{arch_tag(arch, arch_kwargs)}_seed*.pt") if p != mine)
    return others[0] if others else None


def settings_of(cfg: config.GanConfig, expert_row: dict) -> dict:
    keys = ("epochs", "iters_per_epoch", "batch_size", "lr", "latent_dim", "width", "oh_weight",
            "ie_weight", "a_weight", "eval_samples")
    return {**{k: getattr(cfg, k) for k in keys}, "expert": expert_row}


def train_one(cfg: config.GanConfig, task: str, arch: str, seed: int, device: torch.device,
              arch_kwargs: dict | None = None) -> dict:
    """The generator of expert (task, arch, arch_kwargs) of ``seed``: trained, or reused from its checkpoint."""
    path = generator_path(cfg.ckpt_dir, task, arch, seed, arch_kwargs)
    expert_file = expert_path(cfg.ckpt_dir, task, arch, seed, arch_kwargs)
    expert, ckpt = load_model(expert_file, expect_arch=arch, hint=expert_command(task, arch, seed, arch_kwargs),
                              device=device)
    settings = settings_of(cfg, ckpt["meta"]["row"])
    fmt = InputFormat.from_dict(ckpt["meta"]["input_format"])
    grid = Path(cfg.results_dir) / "gan" / f"{task}_{arch_tag(arch, arch_kwargs)}_seed{seed}.png"
    row = reuse_checkpoint(path, settings, cfg.force, cfg.replace_stale)
    if row is not None:
        if not grid.is_file():  # results moved or deleted: draw the same samples again from the checkpoint
            generator = load_model(path, expect_arch="generator", device=device)[0]
            images = sample_images(generator, fmt, cfg.eval_samples, derive_seed(seed, task, "fixed noise"), device)
            atomic_write_bytes(grid, png_grid(images[:GRID_SAMPLES]))
        return {**row, "grid": str(grid), "resumed": True}
    seed_everything(derive_seed(seed, task, arch, "generator"), cfg.deterministic)
    start = time.perf_counter()
    generator, log = train_generator(expert, fmt, cfg, seed, device, desc=f"{task} seed {seed}")
    train_time = time.perf_counter() - start
    images = sample_images(generator, fmt, cfg.eval_samples, derive_seed(seed, task, "fixed noise"), device)
    other_path = other_seed_expert(cfg.ckpt_dir, task, arch, seed, arch_kwargs)
    other = load_model(other_path, device=device)[0] if other_path else None
    quality = sample_quality(expert, fmt, images, other)
    atomic_write_bytes(grid, png_grid(images[:GRID_SAMPLES]))
    row = {"task": task, "arch": arch, **({"arch_kwargs": arch_kwargs} if arch_kwargs else {}), "seed": seed,
           "expert_checkpoint": str(expert_file), **quality, "other_expert": str(other_path) if other_path else None,
           "final_loss": log[-1] if log else None,
           "train_time_s": train_time, "device": str(device), "grid": str(grid), "checkpoint": str(path),
           "resumed": False}
    meta = {"task": task, "expert_arch": arch, "input_format": fmt.as_dict(), "settings": settings,
            "log": log, "row": row}
    arch_kwargs = {"latent_dim": cfg.latent_dim, "out_channels": fmt.channels, "img_size": 32, "width": cfg.width}
    save_checkpoint(path, generator, "generator", arch_kwargs, config.to_dict(cfg), meta)
    return row


def main(cfg: config.GanConfig) -> dict:
    if cfg.problem not in cfg.problems:
        raise config.ConfigError(f"unknown problem {cfg.problem!r}; choices: {', '.join(cfg.problems)}")
    # (name, task, arch, arch_kwargs) per distinct expert: one checkpoint named twice trains one generator
    experts = list({(e.task, arch_tag(e.arch, e.arch_kwargs)): (e.task, e.arch, dict(e.arch_kwargs))
                    for e in cfg.problems[cfg.problem].experts}.values())
    tasks = [t for t, _, _ in experts]
    experts = [(t if tasks.count(t) == 1 else f"{t}_{arch_tag(a, kw)}", t, a, kw) for t, a, kw in experts]
    missing = [expert_command(t, a, s, kw) for _, t, a, kw in experts for s in cfg.seeds
               if not expert_path(cfg.ckpt_dir, t, a, s, kw).exists()]
    if missing:
        raise CheckpointError("expert checkpoints are missing; create them with:\n  "
                              + "\n  ".join(dict.fromkeys(missing)))
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    rows, names = [], []
    for seed in progress(cfg.seeds, desc=f"{cfg.problem} generators"):
        for name, task, arch, kwargs in experts:
            rows.append(train_one(cfg, task, arch, seed, device, kwargs))
            names.append(name)
    stem = Path(cfg.results_dir) / "gan" / cfg.problem
    outputs = write_rows(stem, [{**r, "config": config.to_dict(cfg)} for r in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    summary = {"problem": cfg.problem, "seeds": cfg.seeds, "outputs": outputs,
               "trained": sum(not r["resumed"] for r in rows), "resumed": sum(r["resumed"] for r in rows)}
    for name, *_ in experts:  # the task, with the arch tag where experts share a task
        group = [r for r, n in zip(rows, names) if n == name]
        summary[name] = {key: mean_std(r[key] for r in group)[0] for key in ("balance", "mean_confidence")}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, config.GanConfig)
