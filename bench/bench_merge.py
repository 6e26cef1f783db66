"""Time merge.py on disjoint_mnist for many seeds: all logit rules, and the ten multi-pass settings.

    python bench/bench_merge.py [--seeds 10] [--data-dir DATA]

Targets (issue 3, 2 CPU cores): all logit-only rules for 10 seeds under 30 s; the ten multi-pass
settings with both combiners for 10 seeds under 2 minutes. Evaluation time does not depend on how
well the experts were trained, so the benchmark trains its own quick experts (one short epoch) into
a temporary folder. The baseline, timed in the same run on one seed, is the original scripts'
pattern: the experts re-run on the test set for every rule rather than once per seed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch

import merge
import train_source_networks
from artifacts import Layout
from augments import TTA_SETTINGS
from common import resolve_device
from config import DATA_DIR_ENV, LOGIT_RULES, MergeConfig, TrainConfig, apply_overrides
from problems import build_problem, expert_logits
from strategies import MergeInputs, parse_strategies

from summary import finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

TARGETS_S = {"logit rules": 30.0, "multi-pass": 120.0}


def quiet(fn, *args):
    """Run ``fn`` with its printed config and summary swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


QUICK_EXPERTS = {"epochs": 1, "train_limit": 4096}  # the expert section of the experts timed here


def train_quick_experts(seeds: list[int], data_dir: str, ckpt_dir: str) -> None:
    for task in ("first5_mnist", "last5_mnist"):
        cfg = apply_overrides(TrainConfig(), {"dataset": task, "seeds": seeds, "expert": QUICK_EXPERTS,
                                              "data_dir": data_dir, "ckpt_dir": ckpt_dir,
                                              "results_dir": ckpt_dir, "device": "cpu"})
        quiet(train_source_networks.main, cfg)


def timed_merge(cfg: MergeConfig) -> float:
    start = time.perf_counter()
    quiet(merge.main, cfg)
    return time.perf_counter() - start


def baseline_logit_rules(cfg: MergeConfig, seed: int) -> float:
    """One seed, the experts re-run on the whole test set before every rule."""
    device = resolve_device(cfg.device)
    problem = build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, cfg.data_dir)
    models, formats = problem.load_experts(Layout(cfg), seed, device)
    start = time.perf_counter()
    for call in parse_strategies(cfg.strategies):
        logits = expert_logits(problem, models, formats, device, cfg.batch_size)
        call(MergeInputs(logits, problem.label_maps, problem.domain))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "./data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="the JSON summary (default results/bench/merge_DEVICE.json)")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        train_quick_experts(seeds, args.data_dir, tmp)
        base = {"problem": "disjoint_mnist", "seeds": seeds, "data_dir": args.data_dir, "ckpt_dir": tmp,
                "results_dir": tmp, "device": args.device, "force": True, "expert": QUICK_EXPERTS}
        logit_cfg = apply_overrides(MergeConfig(), {**base, "name": "bench_logit", "strategies": LOGIT_RULES})
        tta = [{"name": rule, "setting": s} for s in TTA_SETTINGS for rule in ("tta_mean", "tta_voting")]
        tta_cfg = apply_overrides(MergeConfig(), {**base, "name": "bench_tta", "strategies": tta})
        times = {"logit rules": timed_merge(logit_cfg), "multi-pass": timed_merge(tta_cfg)}
        baseline_one_seed = baseline_logit_rules(logit_cfg, seeds[0])
    ours_per_seed = times["logit rules"] / len(seeds)
    print(f"torch {torch.__version__} | device {resolve_device(args.device)} | threads {torch.get_num_threads()} "
          f"| cpus {os.cpu_count()} | disjoint_mnist, {len(seeds)} seeds")
    for what, seconds in times.items():
        verdict = "meets" if seconds < TARGETS_S[what] else "misses"
        print(f"{what:12s} {seconds:7.1f} s for {len(seeds)} seeds  (target {TARGETS_S[what]:.0f} s: {verdict})")
    print(f"logit rules per seed: {ours_per_seed:.2f} s; experts re-run per rule (baseline): "
          f"{baseline_one_seed:.2f} s; ratio {baseline_one_seed / ours_per_seed:.2f}x")
    summary = {"seeds": len(seeds), "seconds": times, "targets_s": TARGETS_S,
               "baseline_logit_rules_one_seed_s": baseline_one_seed, "ours_logit_rules_per_seed_s": ours_per_seed,
               "torch": torch.__version__, "device": str(resolve_device(args.device)),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    rows = [[what, f"{seconds:.1f}", f"under {TARGETS_S[what]:.0f} s", "met" if seconds < TARGETS_S[what] else "**missed**"]
            for what, seconds in times.items()]
    table = markdown([f"disjoint_mnist, {len(seeds)} seeds", "seconds", "target", ""], rows,
                     f"Logit rules per seed {ours_per_seed:.2f} s against {baseline_one_seed:.2f} s with the experts re-run "
                     f"for every rule (the original scripts' pattern): {baseline_one_seed / ours_per_seed:.1f}x. "
                     f"`python bench/bench_merge.py --seeds {len(seeds)}`; {resolve_device(args.device)}, "
                     f"{torch.get_num_threads()} threads, torch {torch.__version__}.")
    return finish(summary, "merge", table, args.out)


if __name__ == "__main__":
    main()
