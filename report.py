"""Markdown tables from result rows: mean +- std over seeds, with the experts and the oracle beside.

    python report.py results/merge/disjoint_mnist.jsonl [more.jsonl ...]
"""
from __future__ import annotations

import sys

from common import mean_std, read_rows


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent over seeds."""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def merge_report(rows: list[dict], title: str) -> str:
    """One table of strategies (oracle first) and a line of the experts' own accuracies."""
    experts = [r for r in rows if r.get("kind") == "expert"]
    strategies = [r for r in rows if r.get("kind") == "strategy"]
    labels = list(dict.fromkeys(r["strategy"] for r in strategies))
    labels.sort(key=lambda label: label != "oracle")  # the bound first, the rest in config order
    domains = list(strategies[0]["acc_per_domain"]) if strategies else []
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"### {title}", "", f"{len(seeds)} seed(s); accuracy in % as mean ± std over seeds.", ""]
    expert_parts = [f"{label.removeprefix('expert:')} {pct([r['acc'] for r in experts if r['strategy'] == label])}"
                    for label in dict.fromkeys(r["strategy"] for r in experts)]
    if expert_parts:
        lines += ["Experts on their own test sets: " + "; ".join(expert_parts) + ".", ""]
    header = ["strategy", "accuracy", *[f"acc {d}" for d in domains], "routing acc", "rule time (ms)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        group = [r for r in strategies if r["strategy"] == label]
        name = f"{label} (bound)" if label == "oracle" else label
        cells = [name, pct([r["acc"] for r in group]),
                 *[pct([r["acc_per_domain"][d] for r in group]) for d in domains],
                 pct([r["routing_acc"] for r in group]),
                 f"{1000 * mean_std(r['time_s'] for r in group)[0]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> str:
    text = "\n".join(merge_report(read_rows(p), title=p) for p in paths)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
