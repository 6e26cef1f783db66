"""report.py: the Markdown table of merge rows (golden output) and the command line on .jsonl files."""
from __future__ import annotations

import report
from common import read_rows, write_rows
from report import merge_report, pct

DOMAINS = ("first5_mnist", "last5_mnist")


def expert(seed, task, acc):
    return {"problem": "disjoint_mnist", "seed": seed, "kind": "expert", "strategy": f"expert:{task}", "acc": acc}


def strategy(seed, label, acc, first5, last5, routing, time_s):
    return {"problem": "disjoint_mnist", "seed": seed, "kind": "strategy", "strategy": label,
            "rule": label.split("(")[0], "acc": acc, "acc_per_domain": dict(zip(DOMAINS, (first5, last5))),
            "routing_acc": routing, "routing_counts": {"first5_mnist": 5, "last5_mnist": 5}, "fallbacks": 0,
            "time_s": time_s, "expert_time_s": 1.0, "n": 10}


# two seeds, rows in the order merge.py writes them: experts, then the strategies with the oracle last
ROWS = [
    expert(1, "first5_mnist", 0.99), expert(1, "last5_mnist", 0.98),
    strategy(1, "naive", 0.9, 0.95, 0.85, 0.9, 0.001),
    strategy(1, "tta_voting(setting=flips)", 0.5, 0.6, 0.4, 0.55, 0.0004),
    strategy(1, "oracle", 0.975, 0.99, 0.96, 1.0, 0.00001),
    expert(2, "first5_mnist", 0.97), expert(2, "last5_mnist", 0.96),
    strategy(2, "naive", 0.8, 0.85, 0.75, 0.9, 0.003),
    strategy(2, "tta_voting(setting=flips)", 0.7, 0.8, 0.6, 0.75, 0.0002),
    strategy(2, "oracle", 0.965, 0.97, 0.96, 1.0, 0.00003),
]

GOLDEN = """\
### disjoint_mnist (disjoint_mnist)

2 seed(s); accuracy in % as mean ± std over seeds.

Experts on their own test sets: first5_mnist 98.00 ± 1.41; last5_mnist 97.00 ± 1.41.

| strategy | accuracy | acc first5_mnist | acc last5_mnist | routing acc | rule time (ms) |
|---|---|---|---|---|---|
| oracle (bound) | 97.00 ± 0.71 | 98.00 ± 1.41 | 96.00 ± 0.00 | 100.00 ± 0.00 | 0.0 |
| naive | 85.00 ± 7.07 | 90.00 ± 7.07 | 80.00 ± 7.07 | 90.00 ± 0.00 | 2.0 |
| tta_voting(setting=flips) | 60.00 ± 14.14 | 70.00 ± 14.14 | 50.00 ± 14.14 | 65.00 ± 14.14 | 0.3 |
"""


def test_merge_report_golden():
    assert merge_report(ROWS, title="disjoint_mnist (disjoint_mnist)") == GOLDEN


def test_seed_order_does_not_matter():
    shuffled = ROWS[5:] + ROWS[:5]  # seed 2 first: same labels in the same first-seen order
    assert merge_report(shuffled, title="disjoint_mnist (disjoint_mnist)") == GOLDEN


def test_one_seed_without_experts():
    rows = [strategy(7, "energy", 0.5, 0.25, 0.75, 0.5, 0.0125), strategy(7, "oracle", 0.75, 1.0, 0.5, 1.0, 0.5)]
    assert merge_report(rows, title="t") == (
        "### t\n"
        "\n"
        "1 seed(s); accuracy in % as mean ± std over seeds.\n"
        "\n"
        "| strategy | accuracy | acc first5_mnist | acc last5_mnist | routing acc | rule time (ms) |\n"
        "|---|---|---|---|---|---|\n"
        "| oracle (bound) | 75.00 ± 0.00 | 100.00 ± 0.00 | 50.00 ± 0.00 | 100.00 ± 0.00 | 500.0 |\n"
        "| energy | 50.00 ± 0.00 | 25.00 ± 0.00 | 75.00 ± 0.00 | 50.00 ± 0.00 | 12.5 |\n")


def test_pct_is_mean_and_sample_std_in_percent():
    assert pct([0.5]) == "50.00 ± 0.00"
    assert pct([0.1, 0.2, 0.3]) == "20.00 ± 10.00"


def test_report_main_on_jsonl_files(tmp_path, capsys):
    config = {"problem": "disjoint_mnist", "seeds": [1, 2]}
    paths = write_rows(tmp_path / "disjoint_mnist", [{**r, "config": config} for r in ROWS])
    jsonl = paths["jsonl"]
    assert read_rows(jsonl)[0]["config"] == config
    text = report.main([jsonl])
    assert text == GOLDEN.replace("### disjoint_mnist (disjoint_mnist)", f"### {jsonl}")
    assert capsys.readouterr().out == text + "\n"

    other = write_rows(tmp_path / "one_seed", [r for r in ROWS if r["seed"] == 1])["jsonl"]
    both = report.main([jsonl, other])
    one = merge_report(read_rows(other), title=other)
    assert both == text + "\n" + one
    assert "1 seed(s)" in one and "| naive | 90.00 ± 0.00 | 95.00 ± 0.00 | 85.00 ± 0.00 |" in one


def test_experts_report_golden(tmp_path):
    rows = [{"task": "mnist", "arch": "lenet5", "seed": s, "test_acc": a, "device": "cpu"}
            for s, a in ((1, 0.98), (2, 0.99))]
    rows.append({"task": "cifar10", "arch": "lenet5", "seed": 1, "test_acc": 0.6, "device": "cuda"})
    assert report.experts_report(rows) == (
        "| task | arch | seeds | test accuracy (%) | device |\n"
        "|---|---|---|---|---|\n"
        "| mnist | lenet5 | 2 | 98.50 ± 0.71 | cpu |\n"
        "| cifar10 | lenet5 | 1 | 60.00 ± 0.00 | cuda |\n")
    path = write_rows(tmp_path / "experts", rows)["jsonl"]
    assert report.main([path]).startswith("| task | arch |")


def test_generators_and_gates_reports_golden(tmp_path):
    gan_rows = [{"task": "mnist", "arch": "lenet5", "seed": s, "balance": b, "mean_confidence": 0.8,
                 "cross_seed_agreement": a, "train_time_s": 10.0} for s, b, a in ((1, 0.9, 0.5), (2, 1.0, None))]
    assert report.generators_report(gan_rows) == (
        "| expert | seeds | class balance | mean confidence | other seed agrees | train time (s) |\n"
        "|---|---|---|---|---|---|\n"
        "| mnist (lenet5) | 2 | 95.00 ± 7.07 | 80.00 ± 0.00 | 50.00 ± 0.00 | 10 |\n")
    gate_rows = [{"regime": "real", "gate_type": "feature", "expert": e, "seed": s, "membership_acc": a}
                 for e, s, a in (("a", 1, 0.9), ("a", 2, 0.8), ("b", 1, 0.7), ("b", 2, 0.7))]
    assert report.gates_report(gate_rows) == (
        "| regime | gate type | a in/out acc | b in/out acc |\n"
        "|---|---|---|---|\n"
        "| real | feature | 85.00 ± 7.07 | 70.00 ± 0.00 |\n")
    paths = [write_rows(tmp_path / name, rows)["jsonl"] for name, rows in (("g", gan_rows), ("p", gate_rows))]
    assert report.main(paths) == report.generators_report(gan_rows) + "\n" + report.gates_report(gate_rows)
