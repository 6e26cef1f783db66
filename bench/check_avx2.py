"""Issue 27: the narrow ResNet that hung oneDNN's AVX2 kernels in channels-last, trained through the project's own
trainer many times with oneDNN and ATen held to AVX2 (what a CPU without AVX-512 runs), in the memory format the
project now picks (common.fast_memory_format) and, as the control, forced into channels-last.

    python bench/check_avx2.py [--runs 10] [--control-runs 5] [--timeout 60]

Each run is a fresh process (the hang showed in some processes and not in others); a run past the timeout counts
as hung. Writes results/bench/avx2_narrow_resnet_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from summary import finish, markdown  # noqa: E402

TRAINING = ["dataset=cifar10", "arch=resnet", "arch_kwargs={depth: 18, width: 0.0625}", "expert.epochs=1",
            "expert.train_limit=1024", "expert.batch_size=32", "force=true"]
# the control: the same command with ResNets declared channels-last, as every convolution ran before the fix
FORCED = ("import sys, runpy; import archs.resnet as r; r.ResNet.channels_last = True; "
          "sys.argv = ['train_source_networks.py', *sys.argv[1:]]; runpy.run_path('train_source_networks.py', "
          "run_name='__main__')")


def run_once(seed: int, forced: bool, timeout: float, folder: str) -> tuple[str, float]:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    args = [*TRAINING, f"seeds=[{seed}]", f"ckpt_dir={folder}/ckpt", f"results_dir={folder}/results"]
    command = [sys.executable, "-c", FORCED, *args] if forced else [sys.executable, "train_source_networks.py", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=timeout)
        outcome = "passed" if done.returncode == 0 else f"failed (rc {done.returncode})"
    except subprocess.TimeoutExpired:
        outcome = "hung"
    return outcome, time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--control-runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, forced, runs in (("project's memory format", False, args.runs),
                                   ("forced channels-last (control)", True, args.control_runs)):
            outcomes = [run_once(seed, forced, args.timeout, folder) for seed in range(1, runs + 1)]
            results[name] = {"runs": runs, "passed": sum(o == "passed" for o, _ in outcomes),
                             "hung": sum(o == "hung" for o, _ in outcomes), "outcomes": [o for o, _ in outcomes],
                             "seconds": [round(s, 1) for _, s in outcomes]}
            print(name, results[name])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, oneDNN held to AVX2"
    summary = {"results": results, "timeout_s": args.timeout, "machine": machine, "device": "cpu"}
    rows = [[name, str(r["runs"]), str(r["passed"]), str(r["hung"]), str(r["runs"] - r["passed"] - r["hung"]),
             f"{min(r['seconds']):.1f}-{max(r['seconds']):.1f}"] for name, r in results.items()]
    table = markdown(["ResNet18 at width 1/16, 1 epoch on 1,024 CIFAR-10 images", "runs", "passed",
                      f"hung (> {args.timeout:.0f} s)", "failed", "seconds per run"], rows,
                     f"`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, each run a fresh process of "
                     f"`train_source_networks.py {' '.join(TRAINING[:3])} ...`; {machine}. "
                     f"`python bench/check_avx2.py --runs {args.runs} --control-runs {args.control_runs}`.")
    return finish(summary, "avx2_narrow_resnet", table, args.out)


if __name__ == "__main__":
    main()
