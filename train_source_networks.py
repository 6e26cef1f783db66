"""Train the experts: one classifier per (task, arch, seed), with the paper's hyperparameters by default.

    python train_source_networks.py dataset=mnist arch=lenet5 seeds=[0,1] expert.epochs=2 data_dir=DATA

The parents of weight-space fusion train here too: ``arch=mlp arch_kwargs='{widths: [400, 200, 100],
bias: false}'`` on tasks that keep one part of a split of MNIST (experiments/fusion_parents.yaml).

The training set lives on the device as one normalised float tensor and batches are sliced from a
seeded permutation, so an epoch does no per-image Python work. The seeds are trained together as one stacked
network (stacked.py) where that is faster on the device (``expert.stack_seeds``: auto, true or false), each
from its own initialisation and batch order, as it would be trained alone. Each seed's checkpoint is written atomically
under a name that carries its recipe's key (artifacts.py); a rerun reuses it, and a killed run continues
from its last saved epoch (training.Resume). ``force=true`` retrains.
"""
from __future__ import annotations

import cli
import config

ARGS = cli.arguments(__name__, __doc__, config.TrainConfig)  # --help and bad arguments answer before torch loads

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from archs import ARCHS, build_model  # noqa: E402
from artifacts import ExpertId, Layout, arch_tag, check_reuse, made_meanwhile, recipe_key, tally  # noqa: E402
from common import (derive_seed, load_model, mean_std, print_summary, resolve_device, save_checkpoint,  # noqa: E402
                    seed_everything, write_rows)
from data import InputFormat, check_split, get_source, load_task, prepare_input, task_classes, to_unit  # noqa: E402
from training import Resume, accuracy, train_classifier, train_classifiers, why_made  # noqa: E402


def model_kwargs(cfg: config.TrainConfig) -> dict:
    """The arch's arguments: input channels and class count from the task, then ``cfg.arch_kwargs``."""
    task = cfg.tasks[cfg.dataset]
    return {"in_channels": get_source(task.source).channels, "num_classes": len(task_classes(task)),
            **cfg.arch_kwargs}


def reused_row(cfg: config.TrainConfig, seed: int, test, device: torch.device) -> tuple[dict | None, str]:
    """The stored row of one seed's expert when its checkpoint can be reused (accuracy measured again on
    another test subset), else None; and why it is reused or must be made."""
    layout = Layout(cfg)
    expert = ExpertId(cfg.dataset, cfg.arch, dict(cfg.arch_kwargs))
    path = layout.expert_path(expert, seed)
    recipe = layout.expert_recipe(expert)
    reuse = check_reuse(path, recipe, upstream={}, force=cfg.force)
    if not reuse.reused:
        return None, why_made(reuse.why, Resume.beside(path, recipe_key(recipe)))
    row = reuse.meta["row"]
    if row.get("test_limit", "unknown") != cfg.test_limit:  # accuracy measured on another test subset
        model = load_model(path, expect_arch=cfg.arch, device=device)[0]
        fmt = InputFormat.of(test.source)
        row = {**row, "test_limit": cfg.test_limit, "test_acc": accuracy(
            model, prepare_input(to_unit(test.images, device), fmt), test.labels.to(device))}
    return {**row, "resumed": True}, reuse.why


def train_experts(cfg: config.TrainConfig, seeds: list[int], train, test, device: torch.device) -> list[dict]:
    """Train the experts of ``seeds`` (together as one stacked network when ``expert.stack_seeds`` resolves so,
    each from its own
    initialisation, batch order and resumable state) and write one checkpoint per seed; returns their rows."""
    layout = Layout(cfg)
    expert = ExpertId(cfg.dataset, cfg.arch, dict(cfg.arch_kwargs))
    recipe = layout.expert_recipe(expert)
    fmt = InputFormat.of(train.source)
    models = []
    for seed in seeds:
        seed_everything(derive_seed(seed, cfg.dataset, cfg.arch, "init"), cfg.deterministic)
        models.append(build_model(cfg.arch, **model_kwargs(cfg)).to(device))
    paths = [layout.expert_path(expert, seed) for seed in seeds]
    resumes = [Resume.beside(path, recipe_key(recipe)) for path in paths]
    inputs, labels = prepare_input(to_unit(train.images, device), fmt), train.labels.to(device)
    settings = dict(epochs=cfg.expert.epochs, lr=cfg.expert.lr, momentum=cfg.expert.momentum,
                    weight_decay=cfg.expert.weight_decay, batch_size=recipe["batch_size"])
    orders = [derive_seed(seed, cfg.dataset, "order") for seed in seeds]
    stacked = layout.stacked("experts")
    start = time.perf_counter()
    if stacked:
        histories = train_classifiers(models, inputs, labels, seeds=orders, desc=f"seeds {seeds}", resumes=resumes,
                                      **settings)
    else:
        histories = [train_classifier(m, inputs, labels, seed=order, desc=f"seed {seed}", resume=resume, **settings)
                     for m, order, seed, resume in zip(models, orders, seeds, resumes)]
    train_time = (time.perf_counter() - start) / len(seeds)  # per seed: stacked seeds share the time
    test_inputs = prepare_input(to_unit(test.images, device), fmt)
    rows = []
    for seed, model, path, history, resume in zip(seeds, models, paths, histories, resumes):
        row = {"task": cfg.dataset, "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "seed": seed,
               "test_acc": accuracy(model, test_inputs, test.labels.to(device)), "test_limit": cfg.test_limit,
               "final_train_loss": history[-1]["loss"] if history else None, "train_time_s": train_time,
               "history": history,  # per epoch: mean training loss and accuracy (report.py draws the curves)
               "stacked_seeds": len(seeds) if stacked else 1, "device": str(device), "checkpoint": str(path),
               # training images per class: ensembles weight each parent by its share of a class
               "class_counts": torch.bincount(train.labels, minlength=len(train.classes)).tolist(),
               "resumed": False}
        meta = {"task": recipe["task"], "classes": train.classes, "input_format": fmt.as_dict(), "recipe": recipe,
                "upstream": {}, "row": row}
        other = None if cfg.force else made_meanwhile(path, recipe, {})
        if other is None:
            save_checkpoint(path, model, cfg.arch, model_kwargs(cfg), config.to_dict(cfg), meta)
        resume.clear()
        rows.append(row if other is None else {**other["row"], "resumed": True})
    return rows


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
    config.check_names(cfg)
    if cfg.arch not in ARCHS:
        raise config.ConfigError(f"unknown arch {cfg.arch!r}; choices: {', '.join(ARCHS)}")
    check_arch_kwargs(cfg)
    check_split(cfg.tasks[cfg.dataset], cfg.dataset)
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    task = cfg.tasks[cfg.dataset]
    train = load_task(task, "train", cfg.data_dir, cfg.expert.train_limit)
    test = load_task(task, "test", cfg.data_dir, cfg.test_limit)
    reused = {seed: reused_row(cfg, seed, test, device) for seed in cfg.seeds}
    todo = [seed for seed, (row, _) in reused.items() if row is None]
    trained = dict(zip(todo, train_experts(cfg, todo, train, test, device))) if todo else {}
    rows = [trained[seed] if seed in trained else reused[seed][0] for seed in cfg.seeds]
    stem = Path(cfg.results_dir) / "experts" / f"{cfg.dataset}_{arch_tag(cfg.arch, cfg.arch_kwargs)}"
    outputs = write_rows(stem, [{**row, **config.row_config(cfg)} for row in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    mean, std = mean_std(r["test_acc"] for r in rows)
    summary = {"task": cfg.dataset, "arch": cfg.arch, "test_acc": {str(r["seed"]): r["test_acc"] for r in rows},
               "mean": mean, "std": std, **tally([why for _, why in reused.values()]), "outputs": outputs}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
