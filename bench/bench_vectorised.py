"""Time each stage's seeds run together (stacked.py), one after another, and as ``stack_seeds: auto`` picks.

    python bench/bench_vectorised.py [--seeds 3] [--parts experts,generators,gates,merge] [--data-dir DATA]
                                     [--device cpu] [--out results/bench/vectorised_cpu.json]

Every part runs the same stage script three times in one process, into fresh folders: ``stack_seeds=true``,
``false`` and ``auto``, and prints the three wall times, the ratio one-by-one / stacked, and how far auto is
from the faster of the two (the target, issue 18: within 5% on every stage on the machine at hand, which is
what the table stacked.AUTO_STACKING must say for that device). The parts:

- experts: LeNet5 on MNIST at the paper's batch 512 (``--expert-epochs`` epochs), with their test accuracy;
- generators: DAFL generators of disjoint_mnist's two experts for every seed (a short CPU budget);
- gates: every gate of disjoint_mnist (5 types x real and data-free regimes), DAFL sets made first, untimed;
- merge: the ten multi-pass settings of disjoint_mnist with both combiners.

The last line is a JSON summary, also written to ``--out`` (default results/bench/vectorised_DEVICE.json).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from summary import finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

import merge
import train_gan
import train_pan
import train_source_networks
from augments import TTA_SETTINGS
from common import mean_std, resolve_device
from config import DATA_DIR_ENV, GanConfig, MergeConfig, PanConfig, TrainConfig, apply_overrides
from stacked import resolve_stacking

MODES = ("true", "false", "auto")
NAMES = {"true": "stacked", "false": "one by one", "auto": "auto"}
AUTO_TOLERANCE = 0.05  # auto may be at most 5% slower than the faster path
QUICK_EXPERTS = {"epochs": 1, "train_limit": 4096}  # the experts the generator, gate and merge parts read
QUICK_DAFL = {"epochs": 2, "iters_per_epoch": 20, "batch_size": 128, "width": 32, "images": 2000}


def quiet(fn, cfg):
    """Run a stage's ``main`` with its printed config and summary swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(cfg)


def timed(fn, cfg) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = quiet(fn, cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, summary


def setting(stage: str, mode: str) -> dict:
    """The override that sets ``stage``'s stacking to ``mode``: the trained artifacts' sections, or merge's own."""
    section = {"experts": "expert", "generators": "dafl", "gates": "gate"}.get(stage)
    return {section: {"stack_seeds": mode}} if section else {"stack_seeds": mode}


def three_ways(stage: str, fn, config_class, base: dict, folder: Path, prepared: Path | None = None,
               repeats: int = 3) -> dict:
    """The stage run stacked, one seed at a time and as auto picks, each into its own folder (a copy of
    ``prepared``, the checkpoints it reads, when given): the best of ``repeats`` rounds, the order of the three
    rotated each round, after one untimed warm-up run (the first run of a process pays for loading the data
    and for the allocator's first requests, which would favour whichever mode came second)."""
    def run(mode: str, name: str) -> tuple[float, dict]:
        target = folder / f"{stage}_{name}"
        shutil.rmtree(target, ignore_errors=True)
        if prepared is not None:
            shutil.copytree(prepared, target)
        overrides = {**base, "results_dir": str(target / "results"), "ckpt_dir": str(target)}
        for key, value in setting(stage, mode).items():
            overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
        return timed(fn, apply_overrides(config_class(), overrides))

    run("auto", "warm-up")
    out: dict[str, tuple[float, dict]] = {}
    for round_ in range(repeats):
        for mode in MODES[round_ % len(MODES):] + MODES[:round_ % len(MODES)]:
            seconds, summary = run(mode, mode)
            if mode not in out or seconds < out[mode][0]:
                out[mode] = (seconds, summary)
    return out


def prepare_experts(common: dict, ckpt: Path) -> None:
    for task in ("first5_mnist", "last5_mnist"):
        quiet(train_source_networks.main, apply_overrides(TrainConfig(), {
            **common, "dataset": task, "expert": QUICK_EXPERTS, "ckpt_dir": str(ckpt), "results_dir": str(ckpt)}))


def no_data(common: dict) -> dict:
    return {k: v for k, v in common.items() if k != "data_dir"}


def bench_experts(common: dict, folder: Path, epochs: int, rounds: int) -> dict:
    """LeNet5 MNIST experts at the paper's batch size."""
    return three_ways("experts", train_source_networks.main, TrainConfig,
                      {**common, "dataset": "mnist", "expert": {"epochs": epochs}}, folder, repeats=rounds)


def bench_generators(common: dict, folder: Path, rounds: int) -> dict:
    """The DAFL generators of disjoint_mnist's two experts, every seed (experts trained first, untimed)."""
    ckpt = folder / "generators_ckpt"
    prepare_experts(common, ckpt)
    return three_ways("generators", train_gan.main, GanConfig,
                      {**no_data(common), "problem": "disjoint_mnist", "expert": QUICK_EXPERTS, "dafl": QUICK_DAFL},
                      folder, prepared=ckpt, repeats=rounds)


def bench_gates(common: dict, folder: Path, rounds: int) -> dict:
    """Every gate of disjoint_mnist: 5 types x 3 regimes, for every seed (DAFL sets made first, untimed)."""
    ckpt = folder / "gates_ckpt"
    prepare_experts(common, ckpt)
    quiet(train_gan.main, apply_overrides(GanConfig(), {
        **no_data(common), "problem": "disjoint_mnist", "expert": QUICK_EXPERTS, "dafl": QUICK_DAFL,
        "ckpt_dir": str(ckpt), "results_dir": str(ckpt)}))
    return three_ways("gates", train_pan.main, PanConfig,
                      {**common, "problem": "disjoint_mnist", "expert": QUICK_EXPERTS, "dafl": QUICK_DAFL,
                       "gate": {"noise_samples": 4000, "train_limit": 4000}, "test_limit": 1000},
                      folder, prepared=ckpt, repeats=rounds)


def bench_merge(common: dict, folder: Path, rounds: int) -> dict:
    """The ten multi-pass settings of disjoint_mnist with both combiners."""
    ckpt = folder / "merge_ckpt"
    prepare_experts(common, ckpt)
    strategies = [{"name": rule, "setting": s} for s in TTA_SETTINGS for rule in ("tta_mean", "tta_voting")]
    return three_ways("merge", merge.main, MergeConfig, {**common, "problem": "disjoint_mnist",
                                                         "expert": QUICK_EXPERTS, "strategies": strategies},
                      folder, prepared=ckpt, repeats=rounds)


def verdict(stage: str, runs: dict, device: torch.device) -> dict:
    seconds = {NAMES[mode]: runs[mode][0] for mode in MODES}
    faster = min(seconds["stacked"], seconds["one by one"])
    return {"seconds": seconds, "ratio_one_by_one_over_stacked": seconds["one by one"] / seconds["stacked"],
            "auto_picks": NAMES[str(resolve_stacking("auto", stage, device)).lower()],
            "auto_over_faster": seconds["auto"] / faster,
            "auto_within_tolerance": seconds["auto"] <= (1 + AUTO_TOLERANCE) * faster}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per stage (the cpu profile runs 3)")
    parser.add_argument("--parts", default="experts,generators,gates,merge")
    parser.add_argument("--expert-epochs", type=int, default=1, help="timed epochs of the expert part")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the three modes (the best is kept)")
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "./data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="where the JSON summary goes, a Markdown table beside it "
                                                  "(default results/bench/vectorised_DEVICE.json)")
    args = parser.parse_args(argv)
    seeds = list(range(1, args.seeds + 1))
    device = resolve_device(args.device)
    common = {"seeds": seeds, "data_dir": args.data_dir, "device": args.device}
    print(f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | cpus {os.cpu_count()} "
          f"| {len(seeds)} seeds", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = {"experts": lambda: bench_experts(common, folder, args.expert_epochs, args.rounds),
                 "generators": lambda: bench_generators(common, folder, args.rounds),
                 "gates": lambda: bench_gates(common, folder, args.rounds),
                 "merge": lambda: bench_merge(common, folder, args.rounds)}
        for name in args.parts.split(","):
            runs = parts[name]()
            results[name] = verdict(name, runs, device)
            if name == "experts":
                results[name]["test_acc"] = {NAMES[m]: mean_std(runs[m][1]["test_acc"].values())[0] for m in MODES}
            r = results[name]
            print(f"{name:10s} stacked {r['seconds']['stacked']:7.1f} s | one by one {r['seconds']['one by one']:7.1f} s"
                  f" | auto ({r['auto_picks']}) {r['seconds']['auto']:7.1f} s = {r['auto_over_faster']:.3f} x the "
                  f"faster ({'within' if r['auto_within_tolerance'] else 'OUTSIDE'} {AUTO_TOLERANCE:.0%})", flush=True)
    summary = {"seeds": len(seeds), "device": str(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "results": results}
    rows = [[stage, f"{r['seconds']['stacked']:.1f}", f"{r['seconds']['one by one']:.1f}",
             f"{r['ratio_one_by_one_over_stacked']:.2f}x", r["auto_picks"], f"{r['seconds']['auto']:.1f}",
             f"{r['auto_over_faster']:.3f}", "yes" if r["auto_within_tolerance"] else "**no**"]
            for stage, r in results.items()]
    table = markdown(["stage", "stacked (s)", "one by one (s)", "one by one / stacked", "auto picks", "auto (s)",
                      "auto / faster", f"auto within {AUTO_TOLERANCE:.0%}"], rows,
                     f"`python bench/bench_vectorised.py --seeds {args.seeds}`: {len(seeds)} seeds, best of {args.rounds} rounds "
                     f"after a warm-up; {device}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    return finish(summary, "vectorised", table, args.out)


if __name__ == "__main__":
    main()
