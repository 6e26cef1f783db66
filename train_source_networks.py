"""Train the experts: one classifier per (task, arch, seed), with the paper's hyperparameters by default.

    python train_source_networks.py dataset=mnist arch=lenet5 seeds=[0,1] expert.epochs=2 data_dir=DATA

The parents of weight-space fusion train here too: ``arch=mlp arch_kwargs='{widths: [400, 200, 100],
bias: false}'`` on tasks that keep one part of a split of MNIST (experiments/fusion_parents.yaml).

The training set lives on the device as one normalised float tensor and batches are sliced from a
seeded permutation, so an epoch does no per-image Python work. Each seed's checkpoint is written
atomically under a name that carries its recipe's key (artifacts.py); a rerun reuses it, and a killed
run continues from its last saved epoch (training.Resume). ``force=true`` retrains.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import config
from archs import ARCHS, build_model
from artifacts import ExpertId, Layout, arch_tag, check_reuse, recipe_key, tally
from common import (cli, derive_seed, load_model, mean_std, print_summary, progress, resolve_device,
                    save_checkpoint, seed_everything, write_rows)
from data import InputFormat, check_split, get_source, load_task, prepare_input, task_classes, to_unit
from training import Resume, accuracy, train_classifier


def model_kwargs(cfg: config.TrainConfig) -> dict:
    """The arch's arguments: input channels and class count from the task, then ``cfg.arch_kwargs``."""
    task = cfg.tasks[cfg.dataset]
    return {"in_channels": get_source(task.source).channels, "num_classes": len(task_classes(task)),
            **cfg.arch_kwargs}


def train_expert(cfg: config.TrainConfig, seed: int, train, test, device: torch.device) -> tuple[dict, str]:
    """The row of one seed's expert, trained or reused, and why it was made (or "reused")."""
    layout = Layout(cfg)
    expert = ExpertId(cfg.dataset, cfg.arch, dict(cfg.arch_kwargs))
    recipe = layout.expert_recipe(expert)
    path = layout.expert_path(expert, seed)
    fmt = InputFormat.of(train.source)
    reuse = check_reuse(path, recipe, upstream={}, force=cfg.force)
    if reuse.reused:
        row = reuse.meta["row"]
        if row.get("test_limit", "unknown") != cfg.test_limit:  # accuracy measured on another test subset
            model = load_model(path, expect_arch=cfg.arch, device=device)[0]
            row = {**row, "test_limit": cfg.test_limit, "test_acc": accuracy(
                model, prepare_input(to_unit(test.images, device), fmt), test.labels.to(device))}
        return {**row, "resumed": True}, reuse.why
    seed_everything(derive_seed(seed, cfg.dataset, cfg.arch, "init"), cfg.deterministic)
    model = build_model(cfg.arch, **model_kwargs(cfg)).to(device)
    resume = Resume.beside(path, recipe_key(recipe))
    start = time.perf_counter()
    losses = train_classifier(
        model, prepare_input(to_unit(train.images, device), fmt), train.labels.to(device),
        epochs=cfg.expert.epochs, lr=cfg.expert.lr, momentum=cfg.expert.momentum,
        weight_decay=cfg.expert.weight_decay, batch_size=recipe["batch_size"],
        seed=derive_seed(seed, cfg.dataset, "order"), desc=f"seed {seed}", resume=resume)
    train_time = time.perf_counter() - start
    test_acc = accuracy(model, prepare_input(to_unit(test.images, device), fmt), test.labels.to(device))
    row = {"task": cfg.dataset, "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "seed": seed,
           "test_acc": test_acc, "test_limit": cfg.test_limit, "final_train_loss": losses[-1] if losses else None,
           "train_time_s": train_time, "device": str(device), "checkpoint": str(path),
           # training images per class: ensembles weight each parent by its share of a class
           "class_counts": torch.bincount(train.labels, minlength=len(train.classes)).tolist(), "resumed": False}
    meta = {"task": recipe["task"], "classes": train.classes, "input_format": fmt.as_dict(), "recipe": recipe,
            "upstream": {}, "train_losses": losses, "row": row}
    save_checkpoint(path, model, cfg.arch, model_kwargs(cfg), config.to_dict(cfg), meta)
    resume.clear()
    return row, reuse.why


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
    config.check(cfg)
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
    train = load_task(task, "train", cfg.data_dir, cfg.expert.train_limit)
    test = load_task(task, "test", cfg.data_dir, cfg.test_limit)
    done = [train_expert(cfg, seed, train, test, device)
            for seed in progress(cfg.seeds, desc=f"{cfg.dataset} {cfg.arch} seeds")]
    rows = [row for row, _ in done]
    stem = Path(cfg.results_dir) / "experts" / f"{cfg.dataset}_{arch_tag(cfg.arch, cfg.arch_kwargs)}"
    outputs = write_rows(stem, [{**row, "config": config.to_dict(cfg)} for row in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    mean, std = mean_std(r["test_acc"] for r in rows)
    summary = {"task": cfg.dataset, "arch": cfg.arch, "test_acc": {str(r["seed"]): r["test_acc"] for r in rows},
               "mean": mean, "std": std, **tally([why for _, why in done]), "outputs": outputs}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, lambda: config.parse_args(config.TrainConfig))
