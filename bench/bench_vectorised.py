"""Time N seeds of a stage trained or evaluated together (stacked.py) against the same N seeds one after another.

    python bench/bench_vectorised.py [--seeds 10] [--parts experts,gates,multipass] [--data-dir DATA] [--device cpu]

Every part runs the same stage script twice in one process, ``stack_seeds=true`` and ``stack_seeds=false``,
into fresh folders, and prints the ratio of the wall times; the targets (issue 11, 2 CPU cores) are: the
experts (LeNet5 on MNIST, the paper's batch 512) at least 2x faster at equal accuracy; every gate of
disjoint_mnist (real and data-free regimes) at least 5x faster; the ten multi-pass settings of
disjoint_mnist with both combiners under 120 s for 10 seeds. The last line is a JSON summary.
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
from summary import finish  # bench/ is on sys.path when a benchmark runs as a script

import merge
import train_gan
import train_pan
import train_source_networks
from augments import TTA_SETTINGS
from common import mean_std, resolve_device
from config import DATA_DIR_ENV, GanConfig, MergeConfig, PanConfig, TrainConfig, apply_overrides

TARGETS = {"experts": ("ratio", 2.0), "gates": ("ratio", 5.0), "multipass": ("stacked seconds", 120.0)}
QUICK_EXPERTS = {"epochs": 1, "train_limit": 4096}  # the experts the gate and merge parts read


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


def both(fn, config_class, base: dict, folder: Path, name: str) -> dict:
    """The stage run stacked and one seed at a time into their own folders; times, ratio, summaries."""
    out = {}
    for stacked in (True, False):
        run = folder / f"{name}_{'stacked' if stacked else 'sequential'}"
        cfg = apply_overrides(config_class(), {**base, "stack_seeds": stacked, "results_dir": str(run / "results"),
                                               "ckpt_dir": base.get("ckpt_dir", str(run / "ckpt"))})
        out["stacked" if stacked else "sequential"] = timed(fn, cfg)
    seconds = {k: v[0] for k, v in out.items()}
    return {"seconds": seconds, "ratio": seconds["sequential"] / seconds["stacked"],
            "summaries": {k: v[1] for k, v in out.items()}}


def bench_experts(seeds: list[int], common: dict, folder: Path, epochs: int) -> dict:
    """LeNet5 MNIST experts at the paper's batch size: time and mean test accuracy of each way."""
    result = both(train_source_networks.main, TrainConfig,
                  {**common, "dataset": "mnist", "expert": {"epochs": epochs}}, folder, "experts")
    result["test_acc"] = {k: mean_std(s["test_acc"].values())[0] for k, s in result["summaries"].items()}
    return result


def prepare_experts(seeds: list[int], common: dict, ckpt: Path) -> None:
    for task in ("first5_mnist", "last5_mnist"):
        quiet(train_source_networks.main, apply_overrides(TrainConfig(), {
            **common, "dataset": task, "expert": QUICK_EXPERTS, "ckpt_dir": str(ckpt), "results_dir": str(ckpt)}))


def bench_gates(seeds: list[int], common: dict, folder: Path) -> dict:
    """Every gate of disjoint_mnist: 5 types x 3 regimes, for every seed (DAFL sets made first, untimed)."""
    ckpt = folder / "gates_ckpt"
    prepare_experts(seeds, common, ckpt)
    dafl = {"epochs": 2, "iters_per_epoch": 20, "batch_size": 64, "width": 16, "images": 4000}
    quiet(train_gan.main, apply_overrides(GanConfig(), {
        **{k: v for k, v in common.items() if k != "data_dir"}, "problem": "disjoint_mnist", "expert": QUICK_EXPERTS,
        "dafl": dafl, "ckpt_dir": str(ckpt), "results_dir": str(ckpt)}))
    base = {**common, "problem": "disjoint_mnist", "expert": QUICK_EXPERTS, "dafl": dafl,
            "gate": {"noise_samples": 4000, "train_limit": 4000}, "test_limit": 1000}
    result = {}
    for stacked in (True, False):  # each way into its own copy of the checkpoints, so neither reuses the other
        run = folder / f"gates_{'stacked' if stacked else 'sequential'}"
        shutil.copytree(ckpt, run)
        cfg = apply_overrides(PanConfig(), {**base, "stack_seeds": stacked, "ckpt_dir": str(run),
                                            "results_dir": str(run / "results")})
        result["stacked" if stacked else "sequential"] = timed(train_pan.main, cfg)[0]
    return {"seconds": result, "ratio": result["sequential"] / result["stacked"]}


def bench_multipass(seeds: list[int], common: dict, folder: Path) -> dict:
    ckpt = folder / "merge_ckpt"
    prepare_experts(seeds, common, ckpt)
    strategies = [{"name": rule, "setting": s} for s in TTA_SETTINGS for rule in ("tta_mean", "tta_voting")]
    return both(merge.main, MergeConfig, {**common, "problem": "disjoint_mnist", "expert": QUICK_EXPERTS,
                                          "strategies": strategies, "force": True, "ckpt_dir": str(ckpt)},
                folder, "multipass")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--parts", default="experts,gates,multipass")
    parser.add_argument("--expert-epochs", type=int, default=1, help="timed epochs of the expert part")
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "./data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    seeds = list(range(1, args.seeds + 1))
    device = resolve_device(args.device)
    common = {"seeds": seeds, "data_dir": args.data_dir, "device": args.device}
    print(f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | cpus {os.cpu_count()} "
          f"| {len(seeds)} seeds", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = {"experts": lambda: bench_experts(seeds, common, folder, args.expert_epochs),
                 "gates": lambda: bench_gates(seeds, common, folder),
                 "multipass": lambda: bench_multipass(seeds, common, folder)}
        for name in args.parts.split(","):
            result = parts[name]()
            results[name] = {k: v for k, v in result.items() if k != "summaries"}
            kind, target = TARGETS[name]
            value = result["ratio"] if kind == "ratio" else result["seconds"]["stacked"]
            verdict = "meets" if (value >= target if kind == "ratio" else value <= target) else "misses"
            extra = f"; test acc {result['test_acc']}" if "test_acc" in result else ""
            print(f"{name:10s} stacked {result['seconds']['stacked']:7.1f} s | one by one "
                  f"{result['seconds']['sequential']:7.1f} s | ratio {result['ratio']:.2f}x "
                  f"(target: {kind} {'>=' if kind == 'ratio' else '<='} {target:g}: {verdict}){extra}", flush=True)
    summary = {"seeds": len(seeds), "device": str(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "results": results}
    return finish(summary, args.out)


if __name__ == "__main__":
    main()
