"""What reproduces to the digit and what does not (issue 27): the quick profile's first steps (LeNet5 experts for
disjoint_mnist and mnist_cifar10 at 2 epochs, two seeds, then the paper's logit rules and the oracle) run three
times from empty folders on this machine: twice as it is, and once with oneDNN and ATen held to AVX2 (the kernels
a CPU without AVX-512 runs: CI's and many users' machines).

    python bench/cross_isa.py

Writes results/bench/cross_isa_cpu.{json,md}: every rule's accuracy per run, and the largest difference between
the two plain runs (same machine, same code: expected 0) and between plain and AVX2 (another kernel path).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from summary import finish, markdown  # noqa: E402

SEEDS = "[770597,600522]"
EXPERTS = [("first5_mnist", "lenet5"), ("last5_mnist", "lenet5"), ("mnist", "lenet5"), ("cifar10", "lenet5")]
PROBLEMS = ["disjoint_mnist", "mnist_cifar10"]
RULES = "[naive,std_lower,ratio,thirdQ,max_softmax,energy,neg_entropy,oracle]"
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run(folder: Path, extra_env: dict) -> dict[str, float]:
    """Experts then the logit rules in ``folder``; label -> mean accuracy (%) over the seeds."""
    env = {**os.environ, **extra_env}
    common = [f"seeds={SEEDS}", "expert.epochs=2", f"ckpt_dir={folder}/ckpt", f"results_dir={folder}/results"]
    for task, arch in EXPERTS:
        subprocess.run([sys.executable, "train_source_networks.py", f"dataset={task}", f"arch={arch}", *common],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    accuracies = {}
    for problem in PROBLEMS:
        done = subprocess.run([sys.executable, "merge.py", f"problem={problem}", f"strategies={RULES}", *common],
                              cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        accuracies |= {f"{problem} {label}": 100 * value["mean"] for label, value in summary["acc"].items()}
    return accuracies


def main() -> dict:
    runs = {}
    for name, extra in (("plain", {}), ("plain again", {}), ("AVX2", AVX2)):
        with tempfile.TemporaryDirectory() as folder:
            runs[name] = run(Path(folder), extra)
            print(name, runs[name], flush=True)
    labels = list(runs["plain"])
    same = max(abs(runs["plain"][k] - runs["plain again"][k]) for k in labels)
    across = max(abs(runs["plain"][k] - runs["AVX2"][k]) for k in labels)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    summary = {"runs": runs, "max_diff_same_machine": same, "max_diff_avx2": across, "machine": machine,
               "device": "cpu"}
    rows = [[label, *(f"{runs[r][label]:.4f}" for r in runs)] for label in labels]
    table = markdown(["rule (mean of 2 seeds, % on the combined test set)", *runs], rows,
                     f"Largest difference: {same:.4f} points between the two plain runs (same machine, same code), "
                     f"{across:.4f} points between plain and AVX2-only kernels. `python bench/cross_isa.py`; "
                     f"{machine}; experts at 2 epochs, seeds {SEEDS}.")
    return finish(summary, "cross_isa", table)


if __name__ == "__main__":
    main()
