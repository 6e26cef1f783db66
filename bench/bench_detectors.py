"""What the detectors cost (issue 22's targets): the statistics of one expert, and a detector table against the logit
rules' table, both on disjoint_mnist with real data.

    python bench/bench_detectors.py [--seeds 2] [--sizes 1000,10000,all] [--data-dir DATA] [--device cpu]

Targets (2-core CPU): the statistics of one LeNet5 expert (its view of the source's images and everything fitted on
them, detector_stats.fitted) under 5 s; a table of ten detector rules (with naive and the oracle, twelve), their statistics fitted on 1,000 real
images per expert included, under 1.5x the time of the table of the twelve logit rules (merge.py, both for the same
seeds, each from an empty cache). Timings do not depend on how well the experts learnt, so they train one short
epoch. The last line is a JSON summary, also written with a Markdown table under results/bench/.
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
from summary import finish, markdown  # bench/ is on sys.path when a benchmark runs as a script

import merge
import train_source_networks
from artifacts import ExpertId, Layout
from common import resolve_device
from config import DATA_DIR_ENV, LOGIT_RULES, MergeConfig, StatisticsSettings, TrainConfig, apply_overrides
from data import load_task
from detector_stats import fitted
from problems import load_expert

TARGET_STATISTICS_S = 5.0
TARGET_TABLE_RATIO = 1.5
QUICK_EXPERTS = {"epochs": 1, "train_limit": 4096}
DETECTOR_RULES = ["naive", "oracle", *(f"{name}(stats=real:1000)" for name in (
    "max_softmax", "energy", "max_logit", "gen", "mahalanobis", "relative_mahalanobis", "knn", "vim", "react",
    "input_gaussian"))]  # twelve rules with naive and the oracle, as many as the logit rules' table


def quiet(fn, cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(cfg)


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sizes", default="1000,10000,all", help="source sizes for one expert's statistics")
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "./data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="the JSON summary (default results/bench/detectors_DEVICE.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    seeds = list(range(1, args.seeds + 1))
    with tempfile.TemporaryDirectory() as tmp:
        common = {"seeds": seeds, "data_dir": args.data_dir, "device": args.device, "ckpt_dir": tmp,
                  "expert": QUICK_EXPERTS}
        for task in ("first5_mnist", "last5_mnist"):
            quiet(train_source_networks.main, apply_overrides(TrainConfig(), {**common, "dataset": task,
                                                                              "results_dir": tmp}))
        base = apply_overrides(MergeConfig(), {**common, "problem": "disjoint_mnist", "results_dir": tmp})
        layout = Layout(base)
        expert = ExpertId("first5_mnist", "lenet5", {})
        model, fmt = load_expert(layout, expert, seeds[0], device, base.tasks["first5_mnist"])
        statistics = {}
        for size in args.sizes.split(","):
            real = load_task(base.tasks["first5_mnist"], "train", args.data_dir, None if size == "all" else int(size))
            _, seconds = timed(lambda: fitted(model, fmt, real.images, real.labels, StatisticsSettings(), 0, device))
            statistics[f"{len(real.images)} images"] = seconds
        tables = {}
        for name, rules in (("logit rules", LOGIT_RULES), ("detectors", DETECTOR_RULES)):
            cfg = apply_overrides(base, {"strategies": rules, "name": name.replace(" ", "_"), "force": True,
                                         "results_dir": str(Path(tmp) / name.replace(" ", "_"))})
            tables[name] = timed(lambda: quiet(merge.main, cfg))[1]
    ratio = tables["detectors"] / tables["logit rules"]
    summary = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "seeds": len(seeds), "statistics_s": statistics, "tables_s": tables,
               "table_ratio": ratio, "targets": {"statistics_s": TARGET_STATISTICS_S, "table_ratio": TARGET_TABLE_RATIO}}
    rows = [[f"statistics of one expert, {what}", f"{s:.2f}", f"under {TARGET_STATISTICS_S:g} s",
             "met" if s < TARGET_STATISTICS_S else "**missed**"] for what, s in statistics.items()]
    rows += [[f"table of the {name} ({len(seeds)} seeds)", f"{s:.1f}", "", ""] for name, s in tables.items()]
    rows.append(["detector table / logit table", f"{ratio:.2f}x", f"under {TARGET_TABLE_RATIO:g}x",
                 "met" if ratio < TARGET_TABLE_RATIO else "**missed**"])
    table = markdown(["what", "seconds", "target", ""], rows,
                     f"`python bench/bench_detectors.py --seeds {args.seeds}`: first5_mnist LeNet5 (its statistics on "
                     f"the first N training images, real); disjoint_mnist tables of twelve rules each, the detector "
                     f"table's statistics fitted on 1,000 real images per expert inside it; {device}, "
                     f"{torch.get_num_threads()} threads, torch {torch.__version__}.")
    return finish(summary, "detectors", table, args.out)


if __name__ == "__main__":
    main()
