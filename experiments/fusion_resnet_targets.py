"""The issue's targets and the best of each family (picked on the selection half, reported on the other) for the
residual fusion tables' rows, as report.py computes them for a profile:

    python experiments/fusion_resnet_targets.py results/fusion_resnet/merge/*.jsonl > results/fusion_resnet/targets.md
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import report  # noqa: E402
from common import read_rows  # noqa: E402

# the cpu profile's targets of issue 20 (experiments/profiles/cpu.yaml)
TARGETS = [
    {"problem": "cifar10_resnet_depths", "best": "fusion: CLAFusion", "than": "parents", "chance": 10,
     "of_the_way": 0.5},
    {"problem": "cifar10_resnet_depths", "best": "fusion: CLAFusion, fine-tuned", "than": "parents", "by": 1},
    {"problem": "cifar10_resnet_depths", "best": "fusion: CLAFusion, fine-tuned",
     "than": "parents, fine-tuned (the control)", "by": 0.5},
    {"problem": "cifar10_dir4_resnet", "best": "fusion: neuron interpolation", "than": "fusion: OTFusion", "by": 2},
]


def main(paths: list[str]) -> str:
    rows_by_problem = {}
    for path in paths:
        rows = [r for r in read_rows(path) if r.get("kind") == "strategy"]
        rows_by_problem[rows[0]["problem"]] = rows
    parts = [f"### {problem}\n\n" + report.families_table(report.best_of_families(rows))
             for problem, rows in rows_by_problem.items()]
    targets = [t for t in TARGETS if t["problem"] in rows_by_problem]
    parts.append("### targets\n\n" + report.targets_table(report.target_rows(targets, rows_by_problem)))
    return "\n".join(parts)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
