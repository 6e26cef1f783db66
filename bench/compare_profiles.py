"""Do two profiles' runs agree on the seeds they share? For every merge table both wrote, the rows of one seed and
one strategy label in both: are their upstream keys (the expert and parent checkpoints' digests) equal, and their
report-half accuracies? The cpu3 profile repeats the cpu profile's two seeds with its settings, so on one machine
every shared row should agree to the digit (a rule whose code changed in between keeps its label, and its
accuracy shows whether the change moved it). Writes results/bench/compare_A_B_cpu.{json,md}.

    python bench/compare_profiles.py results/cpu results/cpu3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from summary import finish, markdown  # noqa: E402

from common import read_rows  # noqa: E402


def rows_by_seed_and_label(path: Path) -> dict[tuple[int, str], dict]:
    return {(r["seed"], r["strategy"]): r for r in read_rows(path)}


def accuracy(row: dict) -> float:
    """The report half's accuracy where the row has one (rules), else the whole set's (an expert's own)."""
    return row.get("acc_report", row["acc"])


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a profile's results folder, e.g. results/cpu")
    parser.add_argument("second", type=Path, help="another one, e.g. results/cpu3")
    args = parser.parse_args()
    missing = [str(p) for p in (args.first, args.second) if not (p / "merge").is_dir()]
    if missing:
        raise SystemExit(f"no merge/ folder under {', '.join(missing)}: name a profile's results folder "
                         f"(make reproduce PROFILE=NAME writes results/NAME)")
    tables, rows = [], []
    for path in sorted((args.second / "merge").glob("*.jsonl")):
        other = args.first / "merge" / path.name
        if not other.exists():
            continue
        first, second = rows_by_seed_and_label(other), rows_by_seed_and_label(path)
        shared = [k for k in second if k in first]
        same_upstream = sum(first[k]["key"]["upstream"] == second[k]["key"]["upstream"] for k in shared)
        gaps = [abs(accuracy(first[k]) - accuracy(second[k])) * 100 for k in shared]
        seeds = sorted({seed for seed, _ in shared})
        tables.append({"table": path.stem, "rows": len(shared), "seeds": seeds, "same_upstream": same_upstream,
                       "same_accuracy": sum(g == 0 for g in gaps), "max_gap_points": max(gaps, default=0.0)})
        rows.append([path.stem, str(len(shared)), ", ".join(map(str, seeds)), str(same_upstream),
                     str(tables[-1]["same_accuracy"]), f"{tables[-1]['max_gap_points']:.4f}"])
    total = [sum(t[k] for t in tables) for k in ("rows", "same_upstream", "same_accuracy")]
    rows.append(["all", *(f"**{n}**" for n in total[:1]), "", *(f"**{n}**" for n in total[1:]),
                 f"**{max((t['max_gap_points'] for t in tables), default=0.0):.4f}**"])
    a, b = args.first.name, args.second.name
    summary = {"first": str(args.first), "second": str(args.second), "tables": tables, "rows": total[0],
               "same_upstream": total[1], "same_accuracy": total[2], "device": "cpu"}
    table = markdown(["table", "rows in both (seed, rule)", "seeds", "same upstream key", "same accuracy",
                      "largest difference (points)"], rows,
                     f"`python bench/compare_profiles.py {args.first} {args.second}`: the rows of {a} and {b} of one "
                     f"seed and one rule; upstream key = the digests of the checkpoints the row read.")
    return finish(summary, f"compare_{a}_{b}", table)


if __name__ == "__main__":
    main()
