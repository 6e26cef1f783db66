"""report.py: the Markdown table of merge rows (golden output) and the command line on .jsonl files."""
from __future__ import annotations

from pathlib import Path

import pytest

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
        "| synthesizer | expert | seeds | class balance | mean confidence | realism: other seed agrees | time (s) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| dafl | mnist (lenet5) | 2 | 95.00 ± 7.07 | 80.00 ± 0.00 | 50.00 ± 0.00 | 10 |\n")
    gate_rows = [{"regime": "real", "gate_type": "feature", "expert": e, "seed": s, "membership_acc": a}
                 for e, s, a in (("a", 1, 0.9), ("a", 2, 0.8), ("b", 1, 0.7), ("b", 2, 0.7))]
    assert report.gates_report(gate_rows) == (
        "| regime | gate type | a in/out acc | b in/out acc |\n"
        "|---|---|---|---|\n"
        "| real | feature | 85.00 ± 7.07 | 70.00 ± 0.00 |\n")
    paths = [write_rows(tmp_path / name, rows)["jsonl"] for name, rows in (("g", gan_rows), ("p", gate_rows))]
    assert report.main(paths) == report.generators_report(gan_rows) + "\n" + report.gates_report(gate_rows)


# ---------------------------------------------------------------- the reproduction report

def rule_row(problem, seed, rule, acc, select=None, seen=(True, True), **params):
    """A strategy row; ``select`` is its accuracy on the selection half (default: ``acc``, which is then the
    report half's too); gate rows say which of the two experts (a, b) their gate has seen."""
    label = rule + (f"({','.join(f'{k}={v}' for k, v in params.items() if v != '')})" if params else "")
    n = 100 if rule.startswith("tta_") else 1000
    row = {"problem": problem, "seed": seed, "kind": "strategy", "strategy": label, "rule": rule,
           "params": params, "acc": acc, "acc_select": acc if select is None else select, "acc_report": acc,
           "acc_per_domain": {"a": acc, "b": acc}, "routing_acc": acc, "time_s": 0.001, "n": n, "n_report": n // 2}
    if rule.startswith("gate_"):
        row["gate_experts"] = {e: {"seen": s, "membership_acc": 0.8} for e, s in zip("ab", seen)}
    return row


def problem_tables(problem: str, shift: float) -> dict[str, list[dict]]:
    """Rows of a logit, a multi-pass, a gates and a universal table over two seeds."""
    logit, multipass, gates, universal = [], [], [], []
    for seed, noise in ((1, 0.01), (2, -0.01)):
        def acc(value):
            return round(value - shift + noise, 4)
        naive = rule_row(problem, seed, "naive", acc(0.90))
        logit += [naive, rule_row(problem, seed, "std_lower", acc(0.10)), rule_row(problem, seed, "energy", acc(0.91)),
                  rule_row(problem, seed, "max_softmax", acc(0.89)), rule_row(problem, seed, "oracle", acc(0.99))]
        multipass += [naive] + [rule_row(problem, seed, rule, acc(value), setting=setting)
                                for rule, setting, value in (("tta_mean", "flips", 0.80), ("tta_voting", "flips", 0.85),
                                                             ("tta_mean", "gaussian_1", 0.88))]
        for regime, base in (("real", 0.97), ("synthetic", 0.92), ("noise", 0.70)):
            for gate in ("feature", "universal"):
                gates += [rule_row(problem, seed, rule, acc(base - 0.01 * i), gate=gate, regime=regime, gates_from="")
                          for i, rule in enumerate(("gate_hard", "gate_confident", "gate_soft"))]
        universal += [naive, rule_row(problem, seed, "gate_hard", acc(0.88), seen=(False, False), gate="universal",
                                      regime="synthetic", gates_from="other_problem"),
                      rule_row(problem, seed, "gate_hard", acc(0.89), seen=(True, False), gate="universal",
                               regime="synthetic", gates_from="third_problem")]
        # picked on the selection half: the multi-pass rule that looks best there is not the best on the report half
        multipass.append(rule_row(problem, seed, "tta_voting", acc(0.82), select=acc(0.95), setting="sharpen_1"))
    return {f"logit_rules_{problem}": logit, f"multipass_{problem}": multipass, f"gates_{problem}": gates,
            f"universal_{problem}": universal}


def test_reproduction_report_golden():
    tables = {**problem_tables("two", 0.0), **problem_tables("five", 0.05)}
    experts = [{"task": "mnist", "arch": "lenet5", "seed": s, "test_acc": a, "device": "cpu"}
               for s, a in ((1, 0.98), (2, 0.99))]
    generators = [{"synthesizer": name, "task": "mnist", "arch": "lenet5", "seed": s, "balance": 0.9,
                   "mean_confidence": 0.8, "cross_seed_agreement": 0.5, "train_time_s": 10.0}
                  for name in ("dafl", "inversion") for s in (1, 2)]
    diagnostics = {"two": [{"synthesizer": name, "expert": "a", "seed": s, "frechet_distance": fd,
                            "mean_msp": {"synthetic": 0.99, "real_in": 0.97, "real_out": 0.7}}
                           for name, fd in (("dafl", 30.0), ("inversion", 12.0)) for s in (1, 2)]}
    gates = {"two": [{"regime": "real", "gate_type": "feature", "expert": "a", "seed": s, "membership_acc": 0.9}
                     for s in (1, 2)]
             + [{"regime": "synthetic", "synthesizer": "inversion", "gate_type": t, "expert": "a", "seed": s,
                 "membership_acc": acc} for t, acc in (("feature", 0.6), ("universal", 0.8)) for s in (1, 2)]}
    timings = [{"stage": stage, "step": "x", "seed": s, "wall_s": wall, "reused": reused, "device": "cpu"}
               for stage, s, wall, reused in (("experts", 1, 10.0, False), ("experts", 2, 12.5, False),
                                              ("merge", 1, 3.0, True), ("merge", 2, 1.25, False))]
    text = report.reproduction_report(
        "# Report\n", tables, {"series": ["two", "five", "missing"]}, {"two": 2, "five": 5}, experts, generators,
        gates, timings, {"families": "figures/families.png", "samples_dafl": "figures/samples_dafl.png",
                         "msp_two": "figures/msp_two.png"}, diagnostics)
    golden = Path(__file__).parent / "golden" / "reproduction_report.md"
    assert text == golden.read_text()


def test_families_classify_every_kind_of_rule():
    def fam(rule, problem="p", seen=(True, True), **params):
        row = rule_row(problem, 1, rule, 0.5, seen=seen, **params)
        return report.family(row)

    assert fam("oracle") == "oracle (bound)"
    assert fam("max_logit") == fam("naive") == fam("thirdQ_original") == "logit statistics"
    assert fam("energy") == "OOD scores"
    assert fam("tta_voting", setting="flips") == "multi-pass voting"
    assert fam("gate_soft", gate="logits", regime="synthetic", gates_from="") == "gates, data-free"
    assert fam("gate_hard", gate="universal", regime="noise", gates_from="") == "gates, noise negatives"
    assert fam("gate_hard", gate="universal", regime="real", gates_from="p") == "universal gate, real data"
    # seen or unseen is the gate's training experts' identity, not the problem's name
    assert fam("gate_hard", seen=(False, False), gate="universal", regime="synthetic", gates_from="q") == (
        "universal gate, data-free, unseen experts")
    assert fam("gate_hard", seen=(True, False), gate="universal", regime="synthetic", gates_from="q") == (
        "universal gate, data-free, some experts unseen")
    assert fam("gate_hard", seen=(True, True), gate="universal", regime="real", gates_from="q") == (
        "universal gate, real data")
    assert fam("something_new") is None
    # REPAIR rows apart from the method without it (a target compares the two); fine-tuned rows stay fine-tuned
    assert fam("otfusion", cost="weight") == "fusion: OTFusion"
    assert fam("otfusion", cost="weight", repair=True) == "fusion: OTFusion + REPAIR"
    assert fam("clafusion", finetune_epochs=0, repair=True) == "fusion: CLAFusion + REPAIR"
    assert fam("clafusion", finetune_epochs=1, repair=True) == "fusion: CLAFusion, fine-tuned"
    assert all(fam(rule, repair=True) in report.FAMILIES for rule in ("vanilla_avg", "otfusion", "rebasin", "clafusion"))


def test_best_of_a_family_is_the_highest_mean_and_counts_a_rule_once():
    rows = [rule_row("p", s, rule, acc) for s in (1, 2) for rule, acc in (("naive", 0.9), ("ratio", 0.5))]
    rows += rows[:2]  # the same seed's naive row from a second table
    best = report.best_of_families(rows)
    assert [(b["family"], b["best"], b["seeds"]) for b in best] == [("logit statistics", "naive", 2)]


def test_the_best_of_a_family_is_picked_on_the_selection_half_and_reported_on_the_other():
    rows = [rule_row("p", s, "naive", 0.90, select=0.80) for s in (1, 2)]
    rows += [rule_row("p", s, "ratio", 0.70, select=0.85) for s in (1, 2)]  # looks better where it is picked
    (best,) = report.best_of_families(rows)
    assert best["best"] == "ratio" and best["mean"] == pytest.approx(0.70) and best["select_mean"] == 0.85
    assert best["n"] == 500  # the report half's images


# ---------------------------------------------------------------- picks on the selection half

def picked(label, rule, params, select, report_acc, seed=1, problem="p", **extra):
    """A strategy row with its two halves' accuracies (what every pick reads)."""
    return {"problem": problem, "seed": seed, "kind": "strategy", "strategy": label, "rule": rule, "params": params,
            "acc": (select + report_acc) / 2, "acc_select": select, "acc_report": report_acc, "n_report": 10,
            "routing_acc": 0.5, **extra}


def test_a_pick_reads_the_selection_half_and_reports_the_other():
    rows = [picked("energy", "energy", {"stats": ""}, 0.9, 0.6), picked("gen(gamma=0.1)", "gen", {"gamma": 0.1}, 0.8, 0.95)]
    best = report.pick(report.strategy_rows(rows))
    assert best["best"] == "energy" and best["mean"] == pytest.approx(0.6)  # the higher report half is not chosen


def test_detector_rows_fall_into_families_by_their_source():
    def fam(rule, stats=""):
        return report.family({"rule": rule, "params": {"stats": stats}})
    assert fam("gen") == fam("energy") == "OOD scores"
    assert fam("knn", "synthetic:inversion") == fam("input_gaussian", "shipped") == "detectors, data-free statistics"
    assert fam("energy", "real:200") == "detectors, 200 real images per expert"
    assert report.family({"rule": "gate_hard", "params": {"gate": "feature", "regime": "real:50"}}) == \
        "gates, 50 real images per expert"


def test_the_answer_and_a_target_come_from_picks_on_the_selection_half():
    rows = [picked("naive", "naive", {}, 0.70, 0.70, seed=s) for s in (1, 2)]
    rows += [picked("calibrated(score=energy)", "calibrated", {}, 0.80, 0.71, seed=s) for s in (1, 2)]
    rows += [picked("knn(k=10,stats=synthetic:inversion)", "knn", {"stats": "synthetic:inversion"}, 0.75, 0.79,
                    seed=s) for s in (1, 2)]
    [answer] = report.answer_rows({"p": rows})
    assert answer["best data-free rule"]["best"] == "calibrated(score=energy)"  # 0.80 on the selection half
    assert answer["data-free gain over naive"]["mean"] == pytest.approx(0.01)
    [target] = report.target_rows([{"problem": "p", "best": "best data-free rule", "than": "naive", "by": 2}],
                                  {"p": rows})
    assert target["met"] is False and target["value"] == pytest.approx(1.0)
    assert "`p`" in report.answer_table([answer]) and "**missed**" in report.targets_table([target])


def test_real_data_curves_pick_each_point_among_its_own_rules():
    rows = [picked("energy(stats=real:200)", "energy", {"stats": "real:200"}, 0.8, 0.8),
            picked("knn(k=10,stats=real:200)", "knn", {"stats": "real:200"}, 0.9, 0.85),
            picked("knn(k=10,stats=synthetic:dafl)", "knn", {"stats": "synthetic:dafl"}, 0.6, 0.6),
            picked("gate_hard(gate=feature,regime=real)", "gate_hard", {"gate": "feature", "regime": "real"}, 0.95, 0.9)]
    curves = report.real_data_curves(rows)
    at = dict(zip(report.REAL_COUNTS_X, curves["best detector"]))
    assert at["200"]["best"] == "knn(k=10,stats=real:200)" and at["0"]["best"] == "knn(k=10,stats=synthetic:dafl)"
    assert dict(zip(report.REAL_COUNTS_X, curves["calibration"]))["200"]["best"] == "energy(stats=real:200)"
    assert dict(zip(report.REAL_COUNTS_X, curves["gates"]))["all"]["mean"] == pytest.approx(0.9)
    assert at["10"] is None and "not run" in report.real_data_table(curves)


def test_the_source_table_sets_each_sources_auroc_beside_the_frechet_distance():
    detection = {"a": {"auroc": 0.9, "fpr95": 0.3}}
    rows = [picked("knn(k=10,stats=real:200)", "knn", {"stats": "real:200"}, 0.8, 0.8, detection=detection),
            picked("knn(k=10,stats=synthetic:inversion)", "knn", {"stats": "synthetic:inversion"}, 0.7, 0.7,
                   detection={"a": {"auroc": 0.6, "fpr95": 0.8}})]
    text = report.source_table(rows, [{"synthesizer": "inversion", "expert": "a", "frechet_distance": 12.5}])
    assert "| knn(k=10) | a | 60.0 | 90.0 | 12.5 |" in text


# ---------------------------------------------------------------- families from the registry (issue 27)

def registered_variants(name: str) -> list[dict]:
    """Parameters of a registered rule as tables run it: its defaults, and for a detector its statistics sources."""
    from strategies import REGISTRY
    strategy = REGISTRY[name]
    defaults = {k: default for k, (_, default) in strategy.params.items()}
    if strategy.detector:
        return [defaults | {"stats": s} for s in ("synthetic:dafl", "real:200")]
    if "regime" in strategy.params:
        return [defaults | {"gate": g, "regime": r, "stats": "synthetic:dafl" if g == "detectors" else ""}
                for g in ("feature", "universal", "detectors") for r in ("synthetic", "noise", "real", "real:50")]
    return [defaults]


def test_every_registered_rule_falls_into_a_family():
    from strategies import REGISTRY
    for name in REGISTRY:
        for params in registered_variants(name):
            assert report.family(rule_row("p", 1, name, 0.5, **params)) is not None, (name, params)


def test_a_detector_gate_on_real_statistics_is_never_data_free():
    data_free = report.ANSWER_GROUPS["best data-free rule"]

    def fam(stats, regime="synthetic"):
        return report.family(rule_row("p", 1, "gate_hard", 0.5, gate="detectors", regime=regime, stats=stats))
    assert fam("synthetic:dafl") == "detector gate, data-free" and fam("synthetic:dafl") in data_free
    assert fam("real:200") == "detector gate, data-free with 200 real images per expert"
    assert fam("real:200") not in data_free and fam("real:all", "noise") not in data_free
    assert fam("") == "detector gate, statistics not recorded" and fam("") not in data_free
    # a real-statistics gate far ahead on both halves still does not win the data-free column
    rows = [rule_row("p", s, "naive", 0.70) for s in (1, 2)]
    rows += [rule_row("p", s, "gate_hard", 0.99, gate="detectors", regime="synthetic", stats="real:200")
             for s in (1, 2)]
    [answer] = report.answer_rows({"p": rows})
    assert answer["best data-free rule"]["best"] == "naive"


def test_the_oracle_of_shared_labels_is_not_called_a_bound():
    row = rule_row("p", 1, "oracle", 0.5)
    assert report.family(row) == "oracle (bound)"
    assert report.family({**row, "shared_labels": True}) == report.OWNER_ROUTING
    assert "(bound)" not in report.merge_report([{**row, "shared_labels": True}], "t")
