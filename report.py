"""Markdown tables from result rows: mean +- std over seeds, with the experts and the oracle beside.

    python report.py [--out tables.md] results/merge/disjoint_mnist.jsonl [more.jsonl ...]
"""
from __future__ import annotations

import sys

from common import atomic_write_text, mean_std, read_rows


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


def experts_report(rows: list[dict]) -> str:
    """One line per (task, arch): test accuracy on the task's own test set, mean ± std over seeds."""
    lines = ["| task | arch | seeds | test accuracy (%) | device |", "|---|---|---|---|---|"]
    for task, arch in dict.fromkeys((r["task"], r["arch"]) for r in rows):
        group = [r for r in rows if (r["task"], r["arch"]) == (task, arch)]
        devices = ", ".join(sorted({r["device"] for r in group}))
        lines.append(f"| {task} | {arch} | {len(group)} | {pct([r['test_acc'] for r in group])} | {devices} |")
    return "\n".join(lines) + "\n"


def generators_report(rows: list[dict]) -> str:
    """Data-free quality of the generators per expert: class balance of the expert's predictions on
    samples (1 = uniform), its mean confidence, and another seed's agreement with its labels."""
    lines = ["| expert | seeds | class balance | mean confidence | other seed agrees | train time (s) |",
             "|---|---|---|---|---|---|"]
    for task, arch in dict.fromkeys((r["task"], r["arch"]) for r in rows):
        group = [r for r in rows if (r["task"], r["arch"]) == (task, arch)]
        agree = [r["cross_seed_agreement"] for r in group if r["cross_seed_agreement"] is not None]
        lines.append(f"| {task} ({arch}) | {len(group)} | {pct([r['balance'] for r in group])} | "
                     f"{pct([r['mean_confidence'] for r in group])} | {pct(agree) if agree else 'n/a'} | "
                     f"{mean_std(r['train_time_s'] for r in group)[0]:.0f} |")
    return "\n".join(lines) + "\n"


def gates_report(rows: list[dict]) -> str:
    """Membership accuracy of the gates on the real combined test set, per regime, type and expert."""
    experts = list(dict.fromkeys(r["expert"] for r in rows))
    lines = ["| regime | gate type | " + " | ".join(f"{e} in/out acc" for e in experts) + " |",
             "|---|---|" + "---|" * len(experts)]
    for regime, gate_type in dict.fromkeys((r["regime"], r["gate_type"]) for r in rows):
        cells = [pct([r["membership_acc"] for r in rows if (r["regime"], r["gate_type"], r["expert"])
                      == (regime, gate_type, e)]) for e in experts]
        lines.append(f"| {regime} | {gate_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> str:
    """Markdown for result files, by the kind of rows each holds."""
    parts = []
    for path in paths:
        rows = read_rows(path)
        if any("kind" in r for r in rows):
            parts.append(merge_report(rows, title=path))
        elif any("membership_acc" in r for r in rows):
            parts.append(gates_report(rows))
        elif any("balance" in r for r in rows):
            parts.append(generators_report(rows))
    expert_rows = [r for p in paths for r in read_rows(p) if "test_acc" in r]
    if expert_rows:
        parts.insert(0, experts_report(expert_rows))
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--out"]:
        atomic_write_text(args[1], main(args[2:]) + "\n")
    else:
        main(args)
