"""Evaluate combination rules on a problem, for every configured seed.

    python merge.py problem=disjoint_mnist strategies=[naive,std_lower,energy,oracle] seeds=[0,1,2] data_dir=DATA

Each seed's experts run once on the combined test set; every logit rule reads those logits, and
each multi-pass setting runs the experts on its augmented copies once for both of its combiners.
On a problem with shared labels (fusion parents) the weight-space fusion rules build one network
from the experts, reading ``fusion_samples`` real training images drawn from the union of the
parents' training sets; their rows record that count (``fusion_samples``, 0 for rules that read
weights only), any fine-tuning data, and the time to fuse apart from evaluation (``fuse_time_s``).
Rows (one per strategy and seed, plus the experts' own accuracies) go to
``results/merge/NAME.{jsonl,csv}`` with the config, and a Markdown report to ``NAME.md``. Rows of a
seed are kept in ``results/merge/NAME/seedS.jsonl``, so a rerun computes only what is missing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

import config
from augments import TTA_SETTINGS, apply_augment
from common import (CheckpointError, atomic_write_text, cli, derive_seed, load_model, make_generator, mean_std,
                    print_summary, progress, read_checkpoint, read_rows, resolve_device, write_rows)
from data import InputFormat, load_task, prepare_input, to_unit
from gating import gate_command, gate_inputs, gate_path, in_domain_probability
from problems import Problem, build_problem, expert_activations, expert_logits, test_batches
from report import merge_report
from strategies import (NO_EXPERT, REGISTRY, Decision, FusionInputs, MergeInputs, StrategyCall, check_fusion,
                        parse_strategies)


def score(decision: Decision, problem: Problem, labels: torch.Tensor, domain: torch.Tensor) -> dict:
    """Accuracy overall and per domain, routing accuracy and routing counts of one decision.

    A rule that routes no sample (a fused network answers them all) has no routing accuracy: it is
    None (null in JSON, empty in CSV), and its routing counts are 0."""
    correct = decision.pred.cpu() == labels
    chosen = decision.expert.cpu()
    routed = chosen != NO_EXPERT
    counts = torch.bincount(chosen[routed], minlength=len(problem.tasks))
    return {
        "acc": correct.float().mean().item(),
        "acc_per_domain": {t: correct[domain == k].float().mean().item() for k, t in enumerate(problem.names)},
        "routing_acc": (chosen == domain).float().mean().item() if routed.any() else None,
        "routing_counts": {t: int(counts[k]) for k, t in enumerate(problem.names)},
        "fallbacks": 0 if decision.fallback is None else int(decision.fallback.sum()),
    }


def task_key(spec: config.TaskSpec) -> dict:
    """A task as the fingerprint sees it; a whole-data task keeps its pre-split form, so rows cached
    before tasks could be split stay valid."""
    fields = config.to_dict(spec)
    return fields if spec.split != "full" else {"source": spec.source, "classes": spec.classes}


def problem_key(spec: config.ProblemSpec) -> dict:
    """A problem as the fingerprint sees it: fields added later appear only when they differ from their
    defaults, so rows cached before they existed stay valid."""
    experts = [{"task": e.task, "arch": e.arch, **({"arch_kwargs": e.arch_kwargs} if e.arch_kwargs else {})}
               for e in spec.experts]
    return {"experts": experts, **({"shared_labels": True} if spec.shared_labels else {})}


def fingerprint(problem: Problem, cfg: config.MergeConfig, seed: int) -> str:
    """Identifies what a seed's rows were computed from: problem, test subset and expert weights (and,
    with shared labels, the number of fusion samples)."""
    experts = [read_checkpoint(p)["meta"].get("row") for p in problem.expert_paths(cfg.ckpt_dir, seed)]
    spec = {"problem": problem_key(cfg.problems[cfg.problem]), "test_limit": cfg.test_limit,
            "tasks": {t: task_key(cfg.tasks[t]) for t in problem.tasks}, "experts": experts}
    if problem.shared_labels:
        spec["fusion_samples"] = cfg.fusion_samples
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pass_runner(problem: Problem, models, formats, logits: list[torch.Tensor], device, seed: int,
                batch_size: int):
    """``run_passes(setting)``: the experts' logits on the original (``logits``) and each augmented copy.

    Each setting draws from its own generator, so results do not depend on which rules run first."""
    def run_passes(setting: str) -> list[list[torch.Tensor]]:
        generator = make_generator(derive_seed(seed, problem.name, "tta", setting), device)
        passes = [logits]
        for name, params in TTA_SETTINGS[setting]:
            augment = lambda x, name=name, params=params: apply_augment(name, x, generator, **params)  # noqa: E731
            passes.append(expert_logits(problem, models, formats, device, batch_size, augment))
        return passes
    return run_passes


def gate_files(cfg: config.MergeConfig, problem: Problem, call: StrategyCall, seed: int) -> list[Path]:
    """The gate checkpoints a gating strategy reads for ``seed`` (none for other strategies)."""
    if call.param("regime") is None:
        return []
    source = call.param("gates_from") or problem.name
    return list(dict.fromkeys(gate_path(cfg.ckpt_dir, source, call.param("regime"), call.param("gate"), t, a, seed, kw)
                              for t, a, kw in zip(problem.tasks, problem.archs, problem.arch_kwargs)))


def gate_runner(cfg: config.MergeConfig, problem: Problem, activations, seed: int, device: torch.device):
    """``run_gates(gate, regime, gates_from)``: every expert's gate probability on the test set."""
    def run_gates(gate_type: str, regime: str, gates_from: str) -> torch.Tensor:
        source = gates_from or problem.name
        columns = []
        for task, arch, kwargs, (logits, features) in zip(problem.tasks, problem.archs, problem.arch_kwargs,
                                                          activations):
            path = gate_path(cfg.ckpt_dir, source, regime, gate_type, task, arch, seed, kwargs)
            gate = load_model(path, hint=gate_command(source, regime, gate_type, seed), device=device)[0]
            columns.append(in_domain_probability(gate, gate_inputs(gate_type, logits, features)))
        return torch.stack(columns, dim=1)
    return run_gates


def build_fusion_inputs(cfg: config.MergeConfig, problem: Problem, models: list[nn.Module],
                        formats: list[InputFormat], class_counts: torch.Tensor, seed: int,
                        device: torch.device) -> FusionInputs:
    """What the fusion rules read: the parents, ``cfg.fusion_samples`` real training images and a predictor.

    The samples are drawn, with a generator seeded by the seed and the problem, from the union of the
    parents' training sets, each loaded as the trainer loaded it (its part of a split, its
    ``train_limit``); parents trained on one set share it. All parents of a shared-labels problem
    learn one source, so they read one input format."""
    fmt = formats[0]
    parts = dict.fromkeys(zip(problem.tasks, problem.train_limits(cfg.ckpt_dir, seed)))
    sets = [load_task(problem.specs[task], "train", cfg.data_dir, limit) for task, limit in parts]
    images, labels = torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets])
    generator = make_generator(derive_seed(seed, problem.name, "fusion samples"))
    chosen = torch.randperm(len(images), generator=generator)[:cfg.fusion_samples]

    @torch.no_grad()
    def predict(network) -> torch.Tensor:
        # shared labels: an expert's local class is the global class
        scores = [network(prepare_input(x, fmt)) for x in test_batches(problem, device, cfg.batch_size)]
        return torch.cat(scores).argmax(dim=1).cpu()

    @functools.cache
    def training_data() -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_input(to_unit(images, device), fmt), labels.to(device)

    return FusionInputs(list(models), prepare_input(to_unit(images[chosen], device), fmt),
                        class_counts, predict, training_data, seed=derive_seed(seed, problem.name, "fusion"))


def inputs_key(paths: list[Path]) -> list:
    """Identifies the gate files a row was computed from, so retrained gates invalidate it."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.exists()]


def evaluate_seed(cfg: config.MergeConfig, problem: Problem, calls: list[StrategyCall], seed: int,
                  device: torch.device, cache_path: Path) -> tuple[list[dict], bool]:
    """The rows of one seed, and whether any had to be computed (False: all came from the cache)."""
    key = fingerprint(problem, cfg, seed)
    gate_keys = {c.label: inputs_key(gate_files(cfg, problem, c, seed)) for c in calls}
    cached = {} if cfg.force else {r["strategy"]: r for r in read_rows(cache_path) if r["fingerprint"] == key
                                   and r.get("gates", []) == gate_keys.get(r["strategy"], [])}
    wanted = [f"expert:{t}" for t in problem.names] + [c.label for c in calls]
    if all(label in cached for label in wanted):
        return [cached[label] for label in wanted], False

    models, formats = problem.load_experts(cfg.ckpt_dir, seed, device)
    labels = problem.labels
    class_counts = problem.class_counts(cfg.ckpt_dir, seed, cfg.data_dir) if problem.shared_labels else None
    domain = problem.owner_domain(class_counts) if problem.shared_labels else problem.domain
    start = time.perf_counter()
    activations = expert_activations(problem, models, formats, device, cfg.batch_size)
    logits = [lo for lo, _ in activations]
    logits_time = time.perf_counter() - start
    base = {"problem": cfg.problem, "name": cfg.name or cfg.problem, "seed": seed, "fingerprint": key,
            "device": str(device), "n": len(labels)}
    rows = {}
    for k, name in enumerate(problem.names):
        # an expert's own test set: its part of the combined one, or all of it when labels are shared
        own = torch.ones_like(domain, dtype=torch.bool) if problem.shared_labels else domain == k
        local_correct = problem.label_maps[k][logits[k][own.to(device)].argmax(1).cpu()] == labels[own]
        rows[f"expert:{name}"] = {**base, "kind": "expert", "strategy": f"expert:{name}",
                                  "acc": local_correct.float().mean().item()}

    inputs = MergeInputs(logits, problem.label_maps, domain.to(device),
                         run_passes=pass_runner(problem, models, formats, logits, device, seed, cfg.batch_size),
                         run_gates=gate_runner(cfg, problem, activations, seed, device))
    pass_times: dict[str, float] = {}
    for call in calls:
        if call.label in cached:
            rows[call.label] = cached[call.label]
            continue
        setting = call.param("setting")
        if setting is not None and setting not in pass_times:  # expert passes, timed apart from the rule
            start = time.perf_counter()
            inputs.passes(setting)
            pass_times[setting] = time.perf_counter() - start
        if REGISTRY[call.name].fusion is not None and inputs.fusion is None:  # built once, for the first fusion rule
            inputs.fusion = build_fusion_inputs(cfg, problem, models, formats, class_counts, seed, device)
        start = time.perf_counter()
        decision = call(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rule_time = time.perf_counter() - start
        rows[call.label] = {**base, "kind": "strategy", "strategy": call.label, "rule": call.name,
                            "params": call.params, "gates": gate_keys[call.label],
                            **score(decision, problem, labels, domain), **decision.row,
                            "time_s": rule_time,
                            "expert_time_s": logits_time + pass_times.get(setting, 0.0)}
    result = [rows[label] for label in wanted]
    kept = {**cached, **rows}  # rows cached for strategies not asked for this time stay cached
    atomic_write_text(cache_path, "".join(json.dumps(r) + "\n" for r in kept.values()))
    return result, True


def main(cfg: config.MergeConfig) -> dict:
    if cfg.problem not in cfg.problems:
        raise config.ConfigError(f"unknown problem {cfg.problem!r}; choices: {', '.join(cfg.problems)}")
    calls = parse_strategies(cfg.strategies)
    if "oracle" not in [c.label for c in calls]:  # the bound goes beside every table
        calls.append(parse_strategies(["oracle"])[0])
    for call in calls:
        check_fusion(call, cfg.problem, cfg.problems[cfg.problem])
    if cfg.fusion_samples < 1 and any(REGISTRY[c.name].fusion for c in calls):
        raise config.ConfigError(f"fusion_samples must be at least 1, got {cfg.fusion_samples}")
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    problem = build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, cfg.data_dir, cfg.test_limit)
    missing = problem.missing_experts(cfg.ckpt_dir, cfg.seeds)
    missing += [gate_command(c.param("gates_from") or cfg.problem, c.param("regime"), c.param("gate"), seed)
                for seed in cfg.seeds for c in calls for p in gate_files(cfg, problem, c, seed) if not p.exists()]
    if missing:
        raise CheckpointError("checkpoints are missing under "
                              f"{cfg.ckpt_dir}; create them with:\n  " + "\n  ".join(dict.fromkeys(missing)))
    name = cfg.name or cfg.problem
    out = Path(cfg.results_dir) / "merge"
    rows, computed = [], 0
    for seed in progress(cfg.seeds, desc=f"{name} seeds"):
        seed_rows, was_computed = evaluate_seed(cfg, problem, calls, seed, device, out / name / f"seed{seed}.jsonl")
        rows += seed_rows
        computed += was_computed
    outputs = write_rows(out / name, [{**r, "config": config.to_dict(cfg)} for r in rows])
    outputs["report"] = str(out / f"{name}.md")
    atomic_write_text(outputs["report"], merge_report(rows, title=f"{name} ({cfg.problem})"))
    outputs["config"] = str(out / f"{name}.config.yaml")
    config.save(cfg, outputs["config"])
    accuracy = {}
    for call in calls:
        mean, std = mean_std(r["acc"] for r in rows if r["strategy"] == call.label)
        accuracy[call.label] = {"mean": mean, "std": std}
    summary = {"problem": cfg.problem, "name": name, "seeds": cfg.seeds, "acc": accuracy, "outputs": outputs,
               "computed": computed, "resumed": len(cfg.seeds) - computed}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli(main, config.MergeConfig)
