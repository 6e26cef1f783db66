"""Time one DAFL generator step at the paper's size: batch 512, full width (128), latent 100, against LeNet5.

    python bench/bench_dafl_step.py [--device cuda] [--steps 50] [--seeds 1] [--out FILE]

A step is the generator's forward pass, the frozen expert's forward pass, the DAFL loss, its backward pass
and an Adam update (dafl.train_generators, the stage's own loop, timed over ``--steps`` steps after warm-up).
With ``--seeds N`` the N seeds' generators run as one stacked network. Target (issue 11, on an H200): under
10 ms per step. The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from summary import finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

import config
from archs import build_model
from common import resolve_device
from dafl import build_generator, train_generators

TARGET_MS = 10.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    experts = [build_model("lenet5", in_channels=1, num_classes=5).to(device) for _ in range(args.seeds)]
    generators = [build_generator(config.DaflTraining(), 1)[0].to(device) for _ in range(args.seeds)]
    timing = config.DaflTraining(epochs=1, iters_per_epoch=args.steps)
    train_generators(experts, generators, config.DaflTraining(epochs=1, iters_per_epoch=3), list(range(args.seeds)),
                     device, "warm-up", [None] * args.seeds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_generators(experts, generators, timing, list(range(args.seeds)), device, "timed", [None] * args.seeds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / args.steps
    verdict = "meets" if ms < TARGET_MS else "misses"
    print(f"DAFL step, batch 512, width 128, {args.seeds} seed(s) stacked, {device}: {ms:.2f} ms "
          f"(target under {TARGET_MS:g} ms per step: {verdict})")
    summary = {"device": str(device), "torch": torch.__version__, "seeds": args.seeds, "ms_per_step": ms,
               "target_ms": TARGET_MS, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    table = markdown(["device", "seeds stacked", "ms per step", f"target (under {TARGET_MS:g} ms)"],
                     [[summary["gpu"] or str(device), str(args.seeds), f"{ms:.2f}", verdict]],
                     f"`python bench/bench_dafl_step.py --steps {args.steps} --seeds {args.seeds}`: DAFL at the paper's "
                     f"size (batch 512, width 128), torch {torch.__version__}.")
    return finish(summary, "dafl_step", table, args.out)


if __name__ == "__main__":
    main()
