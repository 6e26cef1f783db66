"""Train data-free generators: one per expert per seed, each against *its own* expert (DAFL).

    python train_gan.py problem=disjoint_mnist seeds=[770597] experiments/gan_cpu.yaml

The expert is frozen in eval mode; the generator learns from noise to produce inputs the expert
classifies confidently (one-hot cross-entropy against its own argmax), spread over its classes
(information entropy of the batch-mean softmax) and that excite its features (mean absolute
feature activation). No real image is read. Per generator: a checkpoint (its name carries the key of its
recipe: section ``dafl`` and its expert's recipe), a PNG grid of samples from fixed noise, and quality
figures measured without real data: the class balance of the expert's predictions on samples, its mean
confidence, and how often an expert of another seed agrees with this expert's labels. A killed run
continues from its last saved epoch.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import config
from artifacts import ExpertId, Layout, check_reuse, digest_of, experts_of, recipe_key, tally
from common import (CheckpointError, atomic_write_bytes, cli, derive_seed, load_model, mean_std, print_summary,
                    progress, resolve_device, save_checkpoint, seed_everything, write_rows)
from data import InputFormat
from synthesis import GRID_SAMPLES, png_grid, sample_images, sample_quality, train_generator
from training import Resume


def other_seed_expert(layout: Layout, expert: ExpertId, seed: int) -> Path | None:
    """An expert of the same recipe but another seed, to check that samples carry the class this expert
    gives them rather than exploiting its particular weights (evaluation only)."""
    mine = layout.expert_path(expert, seed)
    stem = mine.name.rsplit("_seed", 1)[0]
    others = sorted(p for p in mine.parent.glob(f"{stem}_seed*.pt") if p != mine)
    return others[0] if others else None


def train_one(cfg: config.GanConfig, expert: ExpertId, seed: int, device: torch.device) -> tuple[dict, str]:
    """The generator of ``expert`` of ``seed``: trained, or reused from its checkpoint; and why it was made."""
    layout = Layout(cfg)
    path = layout.generator_path(expert, seed)
    expert_file = layout.expert_path(expert, seed)
    model, ckpt = load_model(expert_file, expect_arch=expert.arch, hint=layout.expert_command(expert, [seed]),
                             device=device)
    recipe = layout.generator_recipe(expert)
    upstream = {"expert": digest_of(expert_file)}
    fmt = InputFormat.from_dict(ckpt["meta"]["input_format"])
    grid = Path(cfg.results_dir) / "gan" / f"{path.stem}.png"
    fixed_noise = derive_seed(seed, expert.task, "fixed noise")
    reuse = check_reuse(path, recipe, upstream, cfg.force)
    if reuse.reused:
        if not grid.is_file():  # results moved or deleted: draw the same samples again from the checkpoint
            generator = load_model(path, expect_arch="generator", device=device)[0]
            images = sample_images(generator, fmt, cfg.eval_samples, fixed_noise, device)
            atomic_write_bytes(grid, png_grid(images[:GRID_SAMPLES]))
        return {**reuse.meta["row"], "grid": str(grid), "resumed": True}, reuse.why
    seed_everything(derive_seed(seed, expert.task, expert.arch, "generator"), cfg.deterministic)
    resume = Resume.beside(path, recipe_key(recipe) + upstream["expert"])
    start = time.perf_counter()
    generator, log = train_generator(model, fmt, cfg.dafl, derive_seed(seed, f"{expert.task} seed {seed}", "noise"),
                                     device, desc=f"{expert.task} seed {seed}", resume=resume)
    train_time = time.perf_counter() - start
    images = sample_images(generator, fmt, cfg.eval_samples, fixed_noise, device)
    other_path = other_seed_expert(layout, expert, seed)
    other = load_model(other_path, device=device)[0] if other_path else None
    quality = sample_quality(model, fmt, images, other)
    atomic_write_bytes(grid, png_grid(images[:GRID_SAMPLES]))
    row = {"task": expert.task, "arch": expert.arch, **({"arch_kwargs": expert.arch_kwargs} if expert.arch_kwargs else {}),
           "seed": seed, "expert_checkpoint": str(expert_file), **quality,
           "other_expert": str(other_path) if other_path else None, "final_loss": log[-1] if log else None,
           "train_time_s": train_time, "device": str(device), "grid": str(grid), "checkpoint": str(path),
           "resumed": False}
    meta = {"task": expert.task, "expert_arch": expert.arch, "input_format": fmt.as_dict(), "recipe": recipe,
            "upstream": upstream, "log": log, "row": row}
    arch_kwargs = {"latent_dim": cfg.dafl.latent_dim, "out_channels": fmt.channels, "img_size": 32,
                   "width": cfg.dafl.width}
    save_checkpoint(path, generator, "generator", arch_kwargs, config.to_dict(cfg), meta)
    resume.clear()
    return row, reuse.why


def main(cfg: config.GanConfig) -> dict:
    config.check(cfg)
    if cfg.problem not in cfg.problems:
        raise config.ConfigError(f"unknown problem {cfg.problem!r}; choices: {', '.join(cfg.problems)}")
    layout = Layout(cfg)
    experts = list(dict.fromkeys(experts_of(cfg.problems[cfg.problem])))  # one checkpoint named twice: one generator
    tasks = [e.task for e in experts]
    names = [e.task if tasks.count(e.task) == 1 else e.tag for e in experts]
    missing = [layout.expert_command(e, [s]) for e in experts for s in cfg.seeds
               if not layout.expert_path(e, s).exists()]
    if missing:
        raise CheckpointError("expert checkpoints are missing; create them with:\n  "
                              + "\n  ".join(dict.fromkeys(missing)))
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    rows, row_names, reasons = [], [], []
    for seed in progress(cfg.seeds, desc=f"{cfg.problem} generators"):
        for name, expert in zip(names, experts):
            row, why = train_one(cfg, expert, seed, device)
            rows.append(row)
            row_names.append(name)
            reasons.append(why)
    stem = Path(cfg.results_dir) / "gan" / cfg.problem
    outputs = write_rows(stem, [{**r, "config": config.to_dict(cfg)} for r in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    summary = {"problem": cfg.problem, "seeds": cfg.seeds, "outputs": outputs, **tally(reasons)}
    for name in names:  # the task, with the arch tag where experts share a task
        group = [r for r, n in zip(rows, row_names) if n == name]
        summary[name] = {key: mean_std(r[key] for r in group)[0] for key in ("balance", "mean_confidence")}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, lambda: config.parse_args(config.GanConfig))
