"""Time the detectors for one LeNet5 expert: its view of N inputs, the statistics fitted on them, and every
detector scoring N test inputs.

    python bench/bench_detectors.py [--sizes 1000,10000] [--device cpu] [--threads 1] [--out FILE]

Target (issue 22): the statistics of one LeNet5 expert on 1,000-10,000 images (observe + fit_statistics) in
under 5 s on the 2-core CPU. Timings do not depend on what the expert learnt, so it is an untrained LeNet5 on
random normalised 32x32 grey images. ODIN, which runs the model forward, backward and forward again, is timed
on the same inputs. The last line is a JSON summary, also written to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from summary import finish  # bench/ is on sys.path when a benchmark runs as a script

from archs import build_model
from common import resolve_device
from detectors import DETECTORS, fit_statistics, observe, score

TARGET_FIT_S = 5.0


def timed(fn):
    """``fn()``'s result and its wall time, with queued GPU work finished inside the timing."""
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="numbers of images, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1, num_classes=5).eval().to(device)
    observe(model, [torch.randn(8, 1, 32, 32, device=device)])  # warm-up: first calls load kernels
    rows = {}
    for n in (int(s) for s in args.sizes.split(",")):
        images = torch.randn(n, 1, 32, 32, device=device)
        view, observe_s = timed(lambda: observe(model, images.split(1000), keep_inputs=True))
        stats, fit_s = timed(lambda: fit_statistics(view))
        scoring = {name: round(timed(lambda: score(name, view, stats))[1], 4)
                   for name in DETECTORS if name != "bn_gaussian"}  # LeNet5 has no batch norm
        rows[n] = {"observe_s": round(observe_s, 3), "fit_statistics_s": round(fit_s, 3),
                   "statistics_s": round(observe_s + fit_s, 3), "score_s": scoring}
        print(f"N={n}: observe {observe_s:.2f} s + fit {fit_s:.2f} s (target {TARGET_FIT_S} s); scoring "
              + ", ".join(f"{name} {t:.3f}" for name, t in scoring.items()))
    return finish({"device": str(device), "threads": args.threads, "target_statistics_s": TARGET_FIT_S,
                   "sizes": rows, "met": all(r["statistics_s"] < TARGET_FIT_S for r in rows.values())}, args.out)


if __name__ == "__main__":
    main()
