"""Train the experts: one classifier per (task, arch, seed), with the paper's hyperparameters by default.

    python train_source_networks.py dataset=mnist arch=lenet5 seeds=[0,1] epochs=2 data_dir=DATA

The parents of weight-space fusion train here too: ``arch=mlp arch_kwargs='{widths: [400, 200, 100],
bias: false}'`` on tasks that keep one part of a split of MNIST (experiments/fusion_parents.yaml).

The training set lives on the device as one normalised float tensor and batches are sliced from a
seeded permutation, so an epoch does no per-image Python work. Each seed's checkpoint is written
atomically to ``ckpt_dir``; a rerun skips seeds whose checkpoint exists (``force=true`` retrains).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from archs import ARCHS, build_model
from common import (cli, derive_seed, load_model, make_generator, mean_std, print_summary, progress,
                    resolve_device, reuse_checkpoint, save_checkpoint, seed_everything, write_rows)
from data import (InputFormat, check_split, get_source, load_task, prepare_input, task_classes, task_identity,
                  to_unit)

# The settings that decide what a checkpoint holds; a rerun with other values must not reuse it.
# (arch_kwargs and the task's identity join them in training_settings.)
TRAINING_KEYS = ("arch", "epochs", "lr", "momentum", "weight_decay", "batch_size", "train_limit")


def arch_tag(arch: str, arch_kwargs: dict | None = None) -> str:
    """The arch part of an expert's file names: ``arch`` alone when there are no extra arguments (the
    names checkpoints have always had), else ``arch-`` and 8 hex digits of a hash of the arguments, so
    MLPs of different shapes trained on one task sit side by side (the checkpoint holds the arguments)."""
    if not arch_kwargs:
        return arch
    digest = hashlib.sha256(json.dumps(arch_kwargs, sort_keys=True).encode()).hexdigest()
    return f"{arch}-{digest[:8]}"


def expert_path(ckpt_dir: str | Path, task: str, arch: str, seed: int, arch_kwargs: dict | None = None) -> Path:
    return Path(ckpt_dir) / "experts" / f"{task}_{arch_tag(arch, arch_kwargs)}_seed{seed}.pt"


def expert_command(task: str, arch: str, seeds: int | list[int], arch_kwargs: dict | None = None) -> str:
    """The command that creates expert checkpoints, for error messages elsewhere."""
    seeds = [seeds] if isinstance(seeds, int) else seeds
    extra = f" arch_kwargs='{json.dumps(arch_kwargs)}'" if arch_kwargs else ""  # JSON is YAML flow syntax
    return f"python train_source_networks.py dataset={task} arch={arch}{extra} seeds=[{','.join(map(str, seeds))}]"


def train_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                     lr: float, momentum: float, weight_decay: float, batch_size: int, seed: int,
                     desc: str = "epochs", class_weight: torch.Tensor | None = None) -> list[float]:
    """SGD with cross-entropy on pre-normalised ``inputs``; returns the mean training loss per epoch."""
    if inputs.dim() == 4:  # channels-last convolutions train LeNet about 15% faster on CPU
        model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    order = make_generator(seed, "cpu")
    losses = []
    model.train()
    for _ in progress(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(inputs), generator=order).to(inputs.device)
        total = torch.zeros((), device=inputs.device)
        for start in range(0, len(inputs), batch_size):
            batch = perm[start:start + batch_size]
            loss = F.cross_entropy(model(inputs[batch]), labels[batch], weight=class_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.detach() * len(batch)
        losses.append(total.item() / len(inputs))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> float:
    model.eval()
    correct = sum((model(inputs[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(inputs), batch_size))
    return correct / max(len(inputs), 1)


def training_settings(cfg: config.TrainConfig) -> dict:
    """What a checkpoint's ``meta["settings"]`` must equal for a rerun to reuse it."""
    task = cfg.tasks[cfg.dataset]
    settings = {key: getattr(cfg, key) for key in TRAINING_KEYS}
    settings["batch_size"] = cfg.batch_size or get_source(task.source).batch_size
    if cfg.arch_kwargs:  # absent when empty, so checkpoints from before arch_kwargs existed still match
        settings["arch_kwargs"] = cfg.arch_kwargs
    settings["task"] = task_identity(cfg.dataset, task)
    return settings


def model_kwargs(cfg: config.TrainConfig) -> dict:
    """The arch's arguments: input channels and class count from the task, then ``cfg.arch_kwargs``."""
    task = cfg.tasks[cfg.dataset]
    return {"in_channels": get_source(task.source).channels, "num_classes": len(task_classes(task)),
            **cfg.arch_kwargs}


def train_expert(cfg: config.TrainConfig, seed: int, train, test, device: torch.device) -> dict:
    settings = training_settings(cfg)
    path = expert_path(cfg.ckpt_dir, cfg.dataset, cfg.arch, seed, cfg.arch_kwargs)
    fmt = InputFormat.of(train.source)
    # training images per class of the task: later ensembles weight each parent by its share of a class
    row_extra = {"arch_kwargs": cfg.arch_kwargs,
                 "class_counts": torch.bincount(train.labels, minlength=len(train.classes)).tolist()}
    row = reuse_checkpoint(path, settings, cfg.force, cfg.replace_stale)
    if row is not None:
        if row.get("test_limit", "unknown") != cfg.test_limit:  # accuracy measured on another test subset
            model = load_model(path, expect_arch=cfg.arch, device=device)[0]
            row = {**row, "test_limit": cfg.test_limit, "test_acc": accuracy(
                model, prepare_input(to_unit(test.images, device), fmt), test.labels.to(device))}
        # rows stored before these fields existed get them from the (same) training data
        return {**row, **row_extra, "resumed": True}
    arch_kwargs = model_kwargs(cfg)
    seed_everything(derive_seed(seed, cfg.dataset, cfg.arch, "init"), cfg.deterministic)
    model = build_model(cfg.arch, **arch_kwargs).to(device)
    start = time.perf_counter()
    losses = train_classifier(
        model, prepare_input(to_unit(train.images, device), fmt), train.labels.to(device),
        epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        batch_size=settings["batch_size"], seed=derive_seed(seed, cfg.dataset, "order"),
        desc=f"seed {seed}")
    train_time = time.perf_counter() - start
    test_acc = accuracy(model, prepare_input(to_unit(test.images, device), fmt), test.labels.to(device))
    row = {"task": cfg.dataset, "arch": cfg.arch, "seed": seed, "test_acc": test_acc, "test_limit": cfg.test_limit,
           "final_train_loss": losses[-1] if losses else None, "train_time_s": train_time,
           "device": str(device), "checkpoint": str(path), **row_extra, "resumed": False}
    meta = {"task": settings["task"], "classes": train.classes, "input_format": fmt.as_dict(),
            "settings": settings, "train_losses": losses, "row": row}
    save_checkpoint(path, model, cfg.arch, arch_kwargs, config.to_dict(cfg), meta)
    return row


def check_arch_kwargs(cfg: config.TrainConfig) -> None:
    """Fail before any data loads when ``arch_kwargs`` cannot build ``cfg.arch``."""
    if not cfg.arch_kwargs:
        return
    reserved = sorted({"in_channels", "num_classes"} & set(cfg.arch_kwargs))
    if reserved:
        raise config.ConfigError(f"arch_kwargs may not set {', '.join(reserved)}: the trainer takes them "
                                 f"from the task")
    try:
        build_model(cfg.arch, **model_kwargs(cfg))
    except ValueError as err:
        raise config.ConfigError(f"arch_kwargs {cfg.arch_kwargs} do not fit arch {cfg.arch!r}: {err}") from None


def main(cfg: config.TrainConfig) -> dict:
    if cfg.dataset not in cfg.tasks:
        raise config.ConfigError(f"unknown dataset {cfg.dataset!r}; choices: {', '.join(cfg.tasks)} "
                                 f"(define more under `tasks` in a YAML file)")
    if cfg.arch not in ARCHS:
        raise config.ConfigError(f"unknown arch {cfg.arch!r}; choices: {', '.join(ARCHS)}")
    check_arch_kwargs(cfg)
    check_split(cfg.tasks[cfg.dataset], cfg.dataset)
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    task = cfg.tasks[cfg.dataset]
    train = load_task(task, "train", cfg.data_dir, cfg.train_limit)
    test = load_task(task, "test", cfg.data_dir, cfg.test_limit)
    rows = [train_expert(cfg, seed, train, test, device)
            for seed in progress(cfg.seeds, desc=f"{cfg.dataset} {cfg.arch} seeds")]
    stem = Path(cfg.results_dir) / "experts" / f"{cfg.dataset}_{arch_tag(cfg.arch, cfg.arch_kwargs)}"
    outputs = write_rows(stem, [{**row, "config": config.to_dict(cfg)} for row in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    mean, std = mean_std(r["test_acc"] for r in rows)
    summary = {"task": cfg.dataset, "arch": cfg.arch, "test_acc": {str(r["seed"]): r["test_acc"] for r in rows},
               "mean": mean, "std": std, "trained": sum(not r["resumed"] for r in rows),
               "resumed": sum(r["resumed"] for r in rows), "outputs": outputs}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, config.TrainConfig)
