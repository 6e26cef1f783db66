"""Train gating networks (PANs): per expert, gate type, data regime and seed; plus the universal gate.

    python train_pan.py problem=disjoint_mnist regimes=[synthetic] seeds=[770597]

A gate reads its (frozen) expert's activations and says whether the input belongs to that expert.
Regimes (DESIGN.md section 4, "The data question"):
- ``real``: the real training images of every expert; target = the image's own domain (the original
  code's setting, an upper bound). On a problem with shared labels (fusion parents) each parent's real
  images are its own task's training split (its part of a split, e.g. its shard), as the trainer loads it;
- ``synthetic`` (data-free): positives are the expert's activations on its own generator's samples,
  negatives its activations on the other experts' generator samples and on noise;
- ``noise``: positives from the generator, negatives noise only (ablation).
The ``universal`` gate is one gate per problem and seed, trained on softmax statistics pooled over
all the problem's experts, so it can later be used unchanged on experts it never saw.
Every gate's membership accuracy is measured on the real combined test set. With shared labels a test
image belongs to the parent that owns its class (``Problem.owner_domain``: the most training images of
it), as for the oracle in merge.py. Generator and gate files of experts with ``arch_kwargs`` carry their
arch tag, as the experts' own files do.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import config
from archs import build_model
from common import (CheckpointError, cli, derive_seed, load_model, make_generator, print_summary,
                    progress, read_checkpoint, resolve_device, reuse_checkpoint, save_checkpoint,
                    seed_everything, write_rows)
from data import InputFormat, load_task, to_unit
from gating import GATE_TYPES, REGIMES, gate_arch, gate_inputs, gate_path, in_domain_probability
from problems import Problem, build_problem, expert_activations, run_experts
from train_gan import gan_command, generator_path, sample_images
from train_source_networks import train_classifier


@dataclass
class ImageSet:
    """Training images of one origin: expert ``source``'s real data or generator, or noise (-1)."""

    images: torch.Tensor  # uint8 (real) or [0,1] float (generated, noise)
    source: int
    kind: str


def real_sets(cfg: config.PanConfig, problem: Problem) -> list[ImageSet]:
    """Each expert's task's training images (only its part when the task splits its source)."""
    return [ImageSet(load_task(problem.specs[t], "train", cfg.data_dir, cfg.train_limit).images, k, "real")
            for k, t in enumerate(problem.tasks)]


def generated_sets(cfg: config.PanConfig, problem: Problem, seed: int, device: torch.device) -> list[ImageSet]:
    """Each expert's generator samples, plus uniform noise; no real training image is read."""
    sets = []
    for k, (task, arch, kwargs) in enumerate(zip(problem.tasks, problem.archs, problem.arch_kwargs)):
        generator, ckpt = load_model(generator_path(cfg.ckpt_dir, task, arch, seed, kwargs), expect_arch="generator",
                                     hint=gan_command(problem.name, [seed]), device=device)
        fmt = InputFormat.from_dict(ckpt["meta"]["input_format"])
        images = sample_images(generator, fmt, cfg.synthetic_samples, derive_seed(seed, task, "gate samples"), device)
        sets.append(ImageSet(images, k, "generated"))
    channels = max(InputFormat.from_dict(read_checkpoint(p)["meta"]["input_format"]).channels
                   for p in problem.expert_paths(cfg.ckpt_dir, seed))
    noise = torch.rand(cfg.noise_samples, channels, 32, 32, generator=make_generator(derive_seed(seed, "noise")))
    sets.append(ImageSet(noise.to(device), -1, "noise"))
    return sets


def uses(regime: str, expert: int, image_set: ImageSet) -> bool:
    """Whether gate ``expert`` of ``regime`` trains on ``image_set``."""
    if regime == "noise":
        return image_set.source in (expert, -1)
    return True


def activations_on(sets: list[ImageSet], models, formats, device, batch_size: int = 1024):
    """acts[k][s] = expert k's (logits, features) on image set s."""
    acts = [[] for _ in models]
    for image_set in sets:
        batches = (to_unit(image_set.images[i:i + batch_size], device) if image_set.images.dtype == torch.uint8
                   else image_set.images[i:i + batch_size].to(device)
                   for i in range(0, len(image_set.images), batch_size))
        for k, pair in enumerate(run_experts(models, formats, batches, features=True)):
            acts[k].append(pair)
    return acts


def training_data(gate_type: str, regime: str, experts: list[int], sets: list[ImageSet],
                  acts) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate inputs and in-domain targets, pooled over ``experts`` (one for a per-expert gate)."""
    inputs, targets = [], []
    for k in experts:
        for s, image_set in enumerate(sets):
            if uses(regime, k, image_set):
                logits, features = acts[k][s]
                inputs.append(gate_inputs(gate_type, logits, features))
                targets.append(torch.full((len(logits),), int(image_set.source == k), dtype=torch.long))
    return torch.cat(inputs), torch.cat(targets).to(inputs[0].device)


def membership(gate, gate_type: str, test_acts, domain: torch.Tensor, k: int) -> dict:
    """Gate k's in/out accuracy on the real combined test set (in = the sample is expert k's)."""
    logits, features = test_acts[k]
    says_in = in_domain_probability(gate, gate_inputs(gate_type, logits, features)).cpu() > 0.5
    is_in = domain == k
    return {"membership_acc": (says_in == is_in).float().mean().item(),
            "true_positive_rate": says_in[is_in].float().mean().item(),
            "true_negative_rate": (~says_in[~is_in]).float().mean().item()}


def settings_of(cfg: config.PanConfig, regime: str, gate_type: str, upstream: list[dict]) -> dict:
    keys = ("epochs", "lr", "momentum", "batch_size", "balance_classes", "standardise_inputs")
    data_keys = ("train_limit",) if regime == "real" else ("synthetic_samples", "noise_samples")
    return {**{k: getattr(cfg, k) for k in keys + data_keys}, "regime": regime, "gate_type": gate_type,
            "upstream": upstream}


def train_gate(cfg: config.PanConfig, gate_type: str, inputs: torch.Tensor, targets: torch.Tensor,
               seed: int, desc: str):
    arch, kwargs = gate_arch(gate_type, inputs.shape[1])
    seed_everything(seed, cfg.deterministic)
    gate = build_model(arch, **kwargs).to(inputs.device)
    if cfg.standardise_inputs:
        gate.fit_standardisation(inputs)
    counts = torch.bincount(targets, minlength=2).float().clamp(min=1)
    weight = (counts.sum() / (2 * counts)) if cfg.balance_classes else None
    losses = train_classifier(gate, inputs, targets, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=0.0, batch_size=cfg.batch_size, seed=derive_seed(seed, "order"),
                              desc=desc, class_weight=weight)
    return gate, arch, kwargs, losses, counts


def membership_truth(cfg: config.PanConfig, problem: Problem, seed: int) -> torch.Tensor:
    """The expert each combined test sample belongs to: its own domain, or with shared labels the parent
    that owns its class (recorded in the experts' checkpoints)."""
    if problem.shared_labels:
        return problem.owner_domain(problem.class_counts(cfg.ckpt_dir, seed, cfg.data_dir))
    return problem.domain


def train_regime(cfg: config.PanConfig, problem: Problem, regime: str, seed: int, models, formats,
                 test_activations, device, domain: torch.Tensor | None = None) -> list[dict]:
    """All gates of one regime and seed; image sets and activations are built only if a gate is missing.
    ``test_activations()`` gives the experts' activations on the real combined test set (computed on demand);
    ``domain`` the expert each of its samples belongs to (None: ``membership_truth``)."""
    domain = membership_truth(cfg, problem, seed) if domain is None else domain
    upstream = [read_checkpoint(p)["meta"]["row"] for p in problem.expert_paths(cfg.ckpt_dir, seed)]
    if regime != "real":
        upstream += [read_checkpoint(generator_path(cfg.ckpt_dir, t, a, seed, kw))["meta"]["row"]
                     for t, a, kw in zip(problem.tasks, problem.archs, problem.arch_kwargs)]
    jobs = []  # (gate_type, experts the gate serves, path)
    for gate_type in cfg.gate_types:
        if gate_type == "universal":
            jobs.append((gate_type, list(range(len(problem.tasks))),
                         gate_path(cfg.ckpt_dir, problem.name, regime, gate_type, "", "", seed)))
        else:
            jobs += [(gate_type, [k], gate_path(cfg.ckpt_dir, problem.name, regime, gate_type, t, a, seed, kw))
                     for k, (t, a, kw) in enumerate(zip(problem.tasks, problem.archs, problem.arch_kwargs))]
    rows, acts, sets = [], None, None
    for gate_type, experts, path in jobs:
        settings = settings_of(cfg, regime, gate_type, upstream)
        stored = reuse_checkpoint(path, settings, cfg.force, cfg.replace_stale)
        if stored is not None:
            if any(r.get("test_limit", "unknown") != cfg.test_limit for r in stored):  # measured on another subset
                gate = load_model(path, device=device)[0]
                # a gate's rows follow its experts' order
                stored = [{**r, **membership(gate, gate_type, test_activations(), domain, k),
                           "test_limit": cfg.test_limit} for r, k in zip(stored, experts)]
            rows += [{**r, "resumed": True} for r in stored]
            continue
        if acts is None:
            sets = real_sets(cfg, problem) if regime == "real" else generated_sets(cfg, problem, seed, device)
            acts = activations_on(sets, models, formats, device)
        inputs, targets = training_data(gate_type, regime, experts, sets, acts)
        start = time.perf_counter()
        gate, arch, kwargs, losses, counts = train_gate(
            cfg, gate_type, inputs, targets, derive_seed(seed, problem.name, regime, gate_type, *experts),
            desc=f"{regime} {gate_type}")
        train_time = time.perf_counter() - start
        base = {"problem": problem.name, "regime": regime, "gate_type": gate_type, "seed": seed,
                "train_positives": int(counts[1]), "train_negatives": int(counts[0]),
                "final_loss": losses[-1] if losses else None, "train_time_s": train_time,
                "checkpoint": str(path), "device": str(device), "test_limit": cfg.test_limit, "resumed": False}
        gate_rows = [{**base, "expert": problem.tasks[k], "arch": problem.archs[k],
                      **({"arch_kwargs": problem.arch_kwargs[k]} if problem.arch_kwargs[k] else {}),
                      **membership(gate, gate_type, test_activations(), domain, k)} for k in experts]
        meta = {"problem": problem.name, "regime": regime, "gate_type": gate_type,
                "experts": [problem.tasks[k] for k in experts], "settings": settings, "row": gate_rows}
        save_checkpoint(path, gate, arch, kwargs, config.to_dict(cfg), meta)
        rows += gate_rows
    return rows


def main(cfg: config.PanConfig) -> dict:
    if cfg.problem not in cfg.problems:
        raise config.ConfigError(f"unknown problem {cfg.problem!r}; choices: {', '.join(cfg.problems)}")
    for values, choices, key in ((cfg.gate_types, GATE_TYPES, "gate_types"), (cfg.regimes, REGIMES, "regimes")):
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise config.ConfigError(f"unknown {key} {unknown}; choices: {', '.join(choices)}")
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    problem = build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, cfg.data_dir, cfg.test_limit)
    missing = problem.missing_experts(cfg.ckpt_dir, cfg.seeds)
    if any(r != "real" for r in cfg.regimes):
        missing += [gan_command(cfg.problem, [s]) for s in cfg.seeds
                    for t, a, kw in zip(problem.tasks, problem.archs, problem.arch_kwargs)
                    if not generator_path(cfg.ckpt_dir, t, a, s, kw).exists()]
    if missing:
        raise CheckpointError("checkpoints are missing; create them with:\n  " + "\n  ".join(dict.fromkeys(missing)))
    rows = []
    for seed in progress(cfg.seeds, desc=f"{cfg.problem} gates"):
        models, formats = problem.load_experts(cfg.ckpt_dir, seed, device)
        test_activations = functools.cache(lambda: expert_activations(problem, models, formats, device))
        domain = membership_truth(cfg, problem, seed)
        for regime in cfg.regimes:
            rows += train_regime(cfg, problem, regime, seed, models, formats, test_activations, device, domain)
    stem = Path(cfg.results_dir) / "gates" / cfg.problem
    outputs = write_rows(stem, [{**r, "config": config.to_dict(cfg)} for r in rows])
    outputs["config"] = str(stem.with_name(stem.name + ".config.yaml"))
    config.save(cfg, outputs["config"])
    membership_acc = {}
    for r in rows:
        membership_acc.setdefault(f"{r['regime']}/{r['gate_type']}", []).append(r["membership_acc"])
    summary = {"problem": cfg.problem, "seeds": cfg.seeds, "outputs": outputs,
               "membership_acc": {k: sum(v) / len(v) for k, v in membership_acc.items()},
               "trained": sum(not r["resumed"] for r in rows), "resumed": sum(r["resumed"] for r in rows)}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, config.PanConfig)
