"""Markdown tables from result rows: mean +- std over seeds, with the experts and the oracle beside.

    python report.py [--out tables.md] results/merge/disjoint_mnist.jsonl [more.jsonl ...]
"""
from __future__ import annotations

import sys

from common import atomic_write_text, mean_std, read_rows
from detectors import DETECTORS
from sources import parse_source
from strategies import REGISTRY


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent over seeds."""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def routing_cell(values: list[float | None]) -> str:
    """Routing accuracy over seeds; a rule that routes nothing (weight-space fusion, ensembles) has none."""
    return "n/a" if None in values else pct(values)


# On a problem with shared labels (fusion parents) the oracle routes each sample to the parent that saw the most
# training images of its class: a parent alone or an ensemble can beat that, so it is no bound there
OWNER_ROUTING = "oracle: the class's owner parent (not a bound)"


def oracle_name(row: dict) -> str:
    """What the oracle row measures: the routing bound, or owner routing on shared labels (merge.py marks it)."""
    return OWNER_ROUTING if row.get("shared_labels") else "oracle (bound)"


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
        name = oracle_name(group[0]) if label == "oracle" else label
        cells = [name, pct([r["acc"] for r in group]),
                 *[pct([r["acc_per_domain"][d] for r in group]) for d in domains],
                 routing_cell([r["routing_acc"] for r in group]),
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
    """Data-free quality of the synthetic sets per synthesizer and expert: class balance of the expert's
    predictions on them (1 = uniform), its mean confidence, and the realism score: how often an expert of
    another seed, trained on real data and used only for evaluation, agrees with its labels."""
    lines = ["| synthesizer | expert | seeds | class balance | mean confidence | realism: other seed agrees | "
             "time (s) |", "|---|---|---|---|---|---|---|"]
    for synthesizer, task, arch in dict.fromkeys((r.get("synthesizer", "dafl"), r["task"], r["arch"]) for r in rows):
        group = [r for r in rows if (r.get("synthesizer", "dafl"), r["task"], r["arch"]) == (synthesizer, task, arch)]
        agree = [r["cross_seed_agreement"] for r in group if r["cross_seed_agreement"] is not None]
        lines.append(f"| {synthesizer} | {task} ({arch}) | {len(group)} | {pct([r['balance'] for r in group])} | "
                     f"{pct([r['mean_confidence'] for r in group])} | {pct(agree) if agree else 'n/a'} | "
                     f"{mean_std(r['train_time_s'] for r in group)[0]:.0f} |")
    return "\n".join(lines) + "\n"


def diagnostics_report(rows: list[dict], gates: list[dict]) -> str:
    """Per synthesizer and expert: the Frechet distance of its synthetic set to its real test images in its own
    feature space, its mean max-softmax on synthetic / real own / real other images, and the best membership
    accuracy of its data-free gates on the real test set (evaluation only, diagnostics.py)."""
    lines = ["| synthesizer | expert | Frechet distance | mean max-softmax: synthetic | real, own domain | "
             "real, other domains | best data-free gate membership (type) |", "|---|---|---|---|---|---|---|"]
    for synthesizer, expert in dict.fromkeys((r["synthesizer"], r["expert"]) for r in rows):
        group = [r for r in rows if (r["synthesizer"], r["expert"]) == (synthesizer, expert)]
        msp = [pct([r["mean_msp"][k] for r in group]) for k in ("synthetic", "real_in", "real_out")]
        member: dict[str, list[float]] = {}
        for r in gates:
            if (r.get("synthesizer"), r["regime"], r["expert"]) == (synthesizer, "synthetic", expert):
                member.setdefault(r["gate_type"], []).append(r["membership_acc"])
        best = max(member.items(), key=lambda kv: mean_std(kv[1])[0]) if member else None
        membership = f"{pct(best[1])} ({best[0]})" if best else "n/a"
        fd = mean_std(r["frechet_distance"] for r in group)
        lines.append(f"| {synthesizer} | {expert} | {fd[0]:.1f} ± {fd[1]:.1f} | {' | '.join(msp)} | {membership} |")
    return "\n".join(lines) + "\n"


def gates_report(rows: list[dict]) -> str:
    """Membership accuracy of the gates on the real combined test set, per regime, type and expert."""
    experts = list(dict.fromkeys(r["expert"] for r in rows))
    lines = ["| regime | gate type | " + " | ".join(f"{e} in/out acc" for e in experts) + " |",
             "|---|---|" + "---|" * len(experts)]
    def regime(r: dict) -> str:
        return r["regime"] if r.get("synthesizer") is None else f"{r['regime']} ({r['synthesizer']})"

    for name, gate_type in dict.fromkeys((regime(r), r["gate_type"]) for r in rows):
        cells = [pct([r["membership_acc"] for r in rows if (regime(r), r["gate_type"], r["expert"])
                      == (name, gate_type, e)]) for e in experts]
        lines.append(f"| {name} | {gate_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the reproduction report

# The paper's logit statistics; max_logit is the naive rule written as a score, so it sits here.
LOGIT_STATISTICS = {"naive", "std_lower", "std_higher", "ratio", "overall_ratio", "thirdQ", "thirdQ_original",
                    "max_logit"}
OOD_SCORES = {"max_softmax", "energy", "neg_entropy"}
# every detector rule, from the registry (a newly registered detector joins the tables' picks without an edit here);
# those that read no statistics join the OOD scores when raw
DETECTOR_RULES = {name for name, strategy in REGISTRY.items() if strategy.detector}
PER_SAMPLE_DETECTORS = {name for name in DETECTOR_RULES if not DETECTORS[name].statistics} - OOD_SCORES - LOGIT_STATISTICS
REAL_COUNTS = ("10", "50", "200", "1000", "all")  # the few-shot sources of the tables, in the figure's order
CALIBRATION = {"calibrated"}
REGIME_NAMES = {"real": "real data", "synthetic": "data-free", "noise": "noise negatives"}
# weight-space fusion (docs/design.md section 8): every method its own family; fine-tuned rows apart from the others,
# and rows after REPAIR (repair=true) apart from the method without it, so that a target can compare the two
FUSION_FAMILIES = {"parent": "parents", "vanilla_avg": "fusion: vanilla averaging", "otfusion": "fusion: OTFusion",
                   "hf": "fusion: neuron interpolation", "kf_linear": "fusion: neuron interpolation",
                   "kf_gradient": "fusion: neuron interpolation", "clafusion": "fusion: CLAFusion",
                   "rebasin": "fusion: Git Re-Basin", "ensemble": "ensembles", "ensemble_weighted": "ensembles"}
FINETUNED = {"parents": "parents, fine-tuned (the control)", "fusion: CLAFusion": "fusion: CLAFusion, fine-tuned"}
# routers fitted on the unlabeled test inputs (unlabeled.py): their own regime, never data-free (they read real
# images, the very ones they classify) nor few-shot (they read no label); one family per amount of inputs fitted on
UNLABELED_RULES = {"self_train", "cluster_assign", "entropy_gate", "pseudo_mahalanobis"}
STREAM_COUNTS = ("100", "500", "2000")
UNLABELED_FAMILIES = ["unlabeled inputs, transductive", *(f"unlabeled inputs, stream {n}" for n in STREAM_COUNTS)]
# distil's rows by where the student starts: the fused student and its two controls are picked apart (each its best
# KD weight and temperature on the selection half)
DISTILLED = {"fused": "teacher-student: fused student + KD",
             "student": "teacher-student: KD from the student (control)",
             "scratch": "teacher-student: KD from scratch (control)"}
FAMILIES = ["oracle (bound)", "logit statistics", "OOD scores", "data-free calibration", "multi-pass mean",
            "multi-pass voting",
            "gates, real data", "gates, data-free", "gates, noise negatives",
            "universal gate, real data", "universal gate, data-free",
            "universal gate, real data, some experts unseen", "universal gate, data-free, some experts unseen",
            "universal gate, real data, unseen experts", "universal gate, data-free, unseen experts",
            *(f"detector gate, {regime}{status}" for status in ("", ", some experts unseen", ", unseen experts")
              for regime in ("real data", "data-free")),
            "detectors, data-free statistics",
            *(f"detectors, {n} real images per expert" for n in REAL_COUNTS),
            *(f"gates, {n} real images per expert" for n in REAL_COUNTS if n != "all"),
            *UNLABELED_FAMILIES,
            "parents", *(f"fusion: {method}{repair}" for method in ("vanilla averaging", "OTFusion", "Git Re-Basin")
                         for repair in ("", " + REPAIR")),
            "fusion: neuron interpolation", "fusion: CLAFusion", "fusion: CLAFusion + REPAIR", "ensembles",
            "parents, fine-tuned (the control)",
            "fusion: CLAFusion, fine-tuned", *DISTILLED.values(),
            OWNER_ROUTING]
TRAINING_FREE = ["logit statistics", "OOD scores", "multi-pass mean", "multi-pass voting"]
DATA_FREE_GATES = ["gates, data-free", "universal gate, data-free", "universal gate, data-free, some experts unseen",
                   "universal gate, data-free, unseen experts", "detector gate, data-free",
                   "detector gate, data-free, some experts unseen", "detector gate, data-free, unseen experts"]
# the answer's columns: groups of families whose best rule is picked together on the selection half. Data-free:
# no real training image of any expert is read (training-free rules, synthetic sets, noise)
ANSWER_GROUPS = {"best training-free rule": TRAINING_FREE,
                 "best data-free gate": DATA_FREE_GATES,
                 "best data-free rule": [*TRAINING_FREE, "data-free calibration", "detectors, data-free statistics",
                                         *DATA_FREE_GATES, "gates, noise negatives"],
                 "best detector, 200 real images per expert": ["detectors, 200 real images per expert"],
                 "best rule on unlabeled inputs": UNLABELED_FAMILIES,
                 "gates on real data": ["gates, real data"],
                 "oracle": ["oracle (bound)"]}
SELECTION_NOTE = ("Each family's best rule is picked by its mean accuracy on a seeded selection half of the "
                  "combined test set (half of every expert's test images) and reported on the other half.")


def seen_status(row: dict) -> str:
    """``seen``, ``unseen`` or ``some unseen``: whether the gate was trained on the very expert checkpoints
    it is evaluated on (merge.gate_identity), decided per expert by checkpoint digest, not by problem name."""
    seen = [e["seen"] for e in row["gate_experts"].values()]
    return "seen" if all(seen) else "unseen" if not any(seen) else "some unseen"


def family(row: dict) -> str | None:
    """The family of rules a strategy row belongs to (None for rules outside every family)."""
    rule, params = row["rule"], row.get("params", {})
    if rule == "oracle":
        return oracle_name(row)
    if rule in DETECTOR_RULES and params.get("stats"):
        source = params["stats"]
        return (f"detectors, {source.partition(':')[2]} real images per expert" if source.startswith("real:")
                else "detectors, data-free statistics")
    if rule in PER_SAMPLE_DETECTORS:
        return "OOD scores"
    if rule in LOGIT_STATISTICS:
        return "logit statistics"
    if rule in OOD_SCORES:
        return "OOD scores"
    if rule in CALIBRATION:
        return "data-free calibration"
    if rule in ("tta_mean", "tta_voting"):
        return "multi-pass " + rule.removeprefix("tta_")
    if rule in UNLABELED_RULES:
        fit = params.get("inputs", "selection")
        return "unlabeled inputs, transductive" if fit == "selection" else \
            f"unlabeled inputs, stream {fit.partition(':')[2]}"
    if rule == "distil":
        return DISTILLED[params.get("init", "fused")]
    if rule in FUSION_FAMILIES:
        name = FUSION_FAMILIES[rule]
        if params.get("finetune_epochs"):
            return FINETUNED[name]
        return f"{name} + REPAIR" if params.get("repair") else name
    if rule.startswith("gate_"):
        if params["regime"].startswith("real:"):
            return f"gates, {params['regime'].partition(':')[2]} real images per expert"
        regime = REGIME_NAMES[params["regime"]]
        if params["gate"] == "detectors" and params["regime"] != "real":
            statistics = params.get("stats")  # merge.py writes the source in (strategies.with_gate_statistics)
            if not statistics:  # a row from before the source was recorded: it may have read real images
                return "detector gate, statistics not recorded"
            source = parse_source(statistics)
            if not source.data_free:  # real images read: a few-shot row, whatever the gate was trained on
                return f"detector gate, {regime} with {source.label.partition(':')[2]} real images per expert"
        if params["gate"] not in ("universal", "detectors") or params["regime"] == "noise":
            return f"gates, {regime}"
        status = seen_status(row)
        kind = "universal gate" if params["gate"] == "universal" else "detector gate"
        return f"{kind}, {regime}" + {"seen": "", "unseen": ", unseen experts",
                                      "some unseen": ", some experts unseen"}[status]
    return None


def strategy_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Strategy rows by label, one per seed: a rule that several tables ran (naive) counts once."""
    by_label: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("kind") == "strategy":
            by_label.setdefault(r["strategy"], {}).setdefault(r["seed"], r)
    return {label: list(per_seed.values()) for label, per_seed in by_label.items()}


def pick(groups: dict[str, list[dict]]) -> dict | None:
    """The best of several strategies (label -> one row per seed): the highest mean accuracy on the selection
    half of the test set (``acc_select``), reported by its mean ± std on the other half (``acc_report``), so the
    maximum over the candidates is not biased upward by the pick. None without candidates."""
    best = None
    for label, group in groups.items():
        select = mean_std(r["acc_select"] for r in group)[0]
        if best is None or select > best["select_mean"]:
            mean, std = mean_std(r["acc_report"] for r in group)
            best = {"problem": group[0]["problem"], "best": label, "select_mean": select, "mean": mean, "std": std,
                    "seeds": len(group), "n": group[0].get("n_report")}
    return best


def best_of_families(rows: list[dict]) -> list[dict]:
    """For one problem's rows: the best strategy of each family present, picked on the selection half and
    reported on the other (``pick``)."""
    by_family: dict[str, dict[str, list[dict]]] = {}
    for label, group in strategy_rows(rows).items():
        name = family(group[0])
        if name is not None:
            by_family.setdefault(name, {})[label] = group
    order = [*FAMILIES, *sorted(set(by_family) - set(FAMILIES))]  # a family of another source count goes last
    return [{"family": name, **pick(by_family[name])} for name in order if name in by_family]


def families_table(best: list[dict]) -> str:
    lines = ["| family | best rule (picked on the selection half) | accuracy on the report half (%) | seeds | "
             "test images (report half) |", "|---|---|---|---|---|"]
    lines += [f"| {b['family']} | {b['best']} | {100 * b['mean']:.2f} ± {100 * b['std']:.2f} | {b['seeds']} | "
              f"{b['n']} |" for b in best]
    return "\n".join(lines) + "\n"


def resolve(rows: list[dict], name: str) -> dict | None:
    """A name of the answer's tables and targets: a group of families (ANSWER_GROUPS), one family, or one
    strategy label; its best rule picked on the selection half, with its per-seed rows (``group``)."""
    families = ANSWER_GROUPS.get(name) or ([name] if name in FAMILIES else None)
    groups = strategy_rows(rows)
    candidates = ({label: g for label, g in groups.items() if family(g[0]) in families} if families
                  else {name: groups[name]} if name in groups else {})
    best = pick(candidates)
    return {**best, "group": candidates[best["best"]]} if best else None


def paired_gain(better: dict, reference: dict) -> tuple[float, float]:
    """Mean ± std over seeds of ``better``'s report-half accuracy minus ``reference``'s on the same seed."""
    reference_by_seed = {r["seed"]: r["acc_report"] for r in reference["group"]}
    return mean_std(r["acc_report"] - reference_by_seed[r["seed"]] for r in better["group"]
                    if r["seed"] in reference_by_seed)


def answer_rows(rows_by_problem: dict[str, list[dict]]) -> list[dict]:
    """Per routing problem: naive, the best rule of each answer group (picked on the selection half, reported on
    the other), and the paired gain of the best data-free rule over naive."""
    out = []
    for problem, rows in rows_by_problem.items():
        naive = resolve(rows, "naive")
        if naive is None:
            continue
        cells = {"naive": naive, **{name: resolve(rows, name) for name in ANSWER_GROUPS}}
        free = cells["best data-free rule"]
        gain = paired_gain(free, naive) if free else None
        out.append({"problem": problem, "seeds": naive["seeds"], "n": naive["n"],
                    **{name: {k: v for k, v in cell.items() if k != "group"} if cell else None
                       for name, cell in cells.items()},
                    "data-free gain over naive": {"mean": gain[0], "std": gain[1]} if gain else None})
    return out


ANSWER_COLUMNS = ["naive", *ANSWER_GROUPS]
LABELLED = ("best training-free rule", "best data-free gate", "best data-free rule",
            "best detector, 200 real images per expert", "best rule on unlabeled inputs", "gates on real data")


def answer_table(rows: list[dict]) -> str:
    """The answer as one table: accuracy on the report half (%), mean ± std over seeds; the rule each column
    picked on the selection half in backticks."""
    header = ["problem", *ANSWER_COLUMNS, "best data-free rule - naive (points, paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = []
        for column in ANSWER_COLUMNS:
            cell = r[column]
            text = f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}" if cell else "not run"
            cells.append(text + (f" `{cell['best']}`" if cell and column in LABELLED else ""))
        gain = r["data-free gain over naive"]
        cells.append(f"{100 * gain['mean']:+.2f} ± {100 * gain['std']:.2f}" if gain else "n/a")
        lines.append(f"| `{r['problem']}` | " + " | ".join(cells) + " |")
    seeds = sorted({r["seeds"] for r in rows})
    return "\n".join(lines) + f"\n\nSeeds per problem: {', '.join(map(str, seeds))}. Every column's rule is picked " \
        "on the selection half of the combined test set and reported on the other half.\n"


def target_rows(targets: list[dict], rows_by_problem: dict[str, list[dict]]) -> list[dict]:
    """Each target of a profile, met or missed, from rules picked on the selection half and reported on the other:
    ``{problem, best, than, by}``: best >= than + by points (paired over seeds: the mean gain); or
    ``{problem, best, than, chance, of_the_way}``: best at least that fraction of the way from ``chance`` (%) to
    than. ``best`` and ``than`` name an answer group, a family or a strategy label."""
    out = []
    for target in targets:
        rows = rows_by_problem.get(target["problem"], [])
        best, than = resolve(rows, target["best"]), resolve(rows, target["than"])
        row = {"problem": target["problem"], "best": target["best"], "than": target["than"],
               "best_rule": best["best"] if best else None, "best_acc": 100 * best["mean"] if best else None,
               "than_rule": than["best"] if than else None, "than_acc": 100 * than["mean"] if than else None}
        if best is None or than is None:
            out.append({**row, "target": "not run", "value": None, "met": None})
            continue
        if "of_the_way" in target:
            chance = float(target["chance"])
            value = (100 * best["mean"] - chance) / (100 * than["mean"] - chance)
            out.append({**row, "target": f"at least {target['of_the_way']:.0%} of the way from chance ({chance:g}%)",
                        "value": value, "met": value >= float(target["of_the_way"])})
        else:
            value = 100 * paired_gain(best, than)[0]
            out.append({**row, "target": f"at least {float(target['by']):+g} points", "value": value,
                        "met": value >= float(target["by"])})
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| problem | target | best (picked on the selection half) | accuracy | than | accuracy | measured | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = "n/a" if r["value"] is None else (f"{r['value']:.0%}" if "way" in r["target"]
                                                     else f"{r['value']:+.2f}")
        acc = [f"{v:.2f}" if v is not None else "not run" for v in (r["best_acc"], r["than_acc"])]
        verdict = "not run" if r["met"] is None else "met" if r["met"] else "**missed**"
        best, than = (f"{name}: `{rule}`" if rule else name
                      for name, rule in ((r["best"], r["best_rule"]), (r["than"], r["than_rule"])))
        lines.append(f"| `{r['problem']}` | {r['target']} | {best} | {acc[0]} | {than} | {acc[1]} | {measured} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


SCALING_COLUMNS = {"oracle": "oracle (bound)", "naive": "naive", "best OOD score": "OOD scores",
                   "best data-free gate": "gates, data-free", "universal gate, data-free": "universal gate, data-free",
                   "universal gate, data-free, unseen": "universal gate, data-free, unseen experts"}


def scaling_rows(series: dict[str, list[str]], rows_by_problem: dict[str, list[dict]],
                 experts_per_problem: dict[str, int]) -> list[dict]:
    """How the best rule of each column's family does as a series of problems adds experts."""
    out = []
    for name, problems in series.items():
        for problem in problems:
            rows = rows_by_problem.get(problem, [])
            best = {b["family"]: b for b in best_of_families(rows)}
            naive = strategy_rows(rows).get("naive")
            if naive:  # on the report half, as the families beside it
                best["naive"] = {"best": "naive",
                                 **dict(zip(("mean", "std"), mean_std(r["acc_report"] for r in naive)))}
            out.append({"series": name, "problem": problem, "experts": experts_per_problem.get(problem),
                        **{column: best.get(fam) for column, fam in SCALING_COLUMNS.items()}})
    return out


def scaling_table(rows: list[dict]) -> str:
    header = ["series", "problem", "experts", *SCALING_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{100 * r[c]['mean']:.2f} ± {100 * r[c]['std']:.2f}" if r[c] else "not run"
                 for c in SCALING_COLUMNS]
        lines.append("| " + " | ".join([r["series"], r["problem"], str(r["experts"] or "n/a"), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _pivot(rows: list[dict], key, column, columns: list[str], key_names: list[str]) -> list[str]:
    groups = [g for g in strategy_rows(rows).values() if column(g[0]) in columns]
    keys = list(dict.fromkeys(key(g[0]) for g in groups))
    lines = ["| " + " | ".join(key_names + columns) + " |", "|" + "---|" * (len(key_names) + len(columns))]
    for k in keys:
        cells = []
        for c in columns:
            group = next((g for g in groups if key(g[0]) == k and column(g[0]) == c), None)
            cells.append(pct([r["acc"] for r in group]) if group else "")
        lines.append("| " + " | ".join([*k, *cells]) + " |")
    return lines


def _baselines(rows: list[dict]) -> str:
    groups = strategy_rows(rows)
    parts = [f"{label} {pct([r['acc'] for r in groups[label]])}" for label in ("oracle", "naive", "energy")
             if label in groups]
    return "Baselines: " + "; ".join(parts) + "." if parts else ""


def multipass_table(rows: list[dict], title: str) -> str:
    """The paper's multi-pass table: one line per test-time augmentation setting, mean and voting side by side."""
    seeds = len({r["seed"] for r in rows})
    lines = [f"### {title}", "", f"{seeds} seed(s); accuracy in % as mean ± std over seeds. {_baselines(rows)}".rstrip(),
             ""]
    lines += _pivot(rows, key=lambda r: (r["params"]["setting"],), column=lambda r: r["rule"],
                    columns=["tta_mean", "tta_voting"], key_names=["setting"])
    return "\n".join(lines) + "\n"


def gates_table(rows: list[dict], title: str) -> str:
    """Gates by data regime and gate type (rows) and routing rule (columns)."""
    seeds = len({r["seed"] for r in rows})
    lines = [f"### {title}", "", f"{seeds} seed(s); accuracy in % as mean ± std over seeds. {_baselines(rows)}".rstrip(),
             ""]
    lines += _pivot(rows, key=lambda r: (r["params"]["regime"], r["params"]["gate"],
                                         r["params"].get("gates_from") or "this problem"),
                    column=lambda r: r["rule"], columns=["gate_hard", "gate_confident", "gate_soft"],
                    key_names=["regime", "gate type", "gates trained on"])
    return "\n".join(lines) + "\n"


def synthesis_table(rows: list[dict], title: str) -> str:
    """Data-free gates by synthesizer and gate type (rows) and routing rule (columns), then every other rule
    of the table (calibration rules, baselines, real-data gates) as a strategy table."""
    seeds = len({r["seed"] for r in rows})
    data_free = [r for r in rows if r.get("rule", "").startswith("gate_") and r["params"]["regime"] == "synthetic"]
    lines = [f"### {title}", "", f"{seeds} seed(s); accuracy in % as mean ± std over seeds. {_baselines(rows)}".rstrip(),
             ""]
    lines += _pivot(data_free, key=lambda r: (r["params"].get("synthesizer") or "dafl", r["params"]["gate"]),
                    column=lambda r: r["rule"], columns=["gate_hard", "gate_confident", "gate_soft"],
                    key_names=["synthesizer", "gate type"])
    others = [r for r in rows if r not in data_free]
    return "\n".join(lines) + "\n\n" + merge_report(others, f"{title}: the other rules").replace("### ", "#### ", 1)


def gate_identity_table(rows: list[dict]) -> str:
    """For the universal gate's rows: per evaluated expert, whether the gate was trained on that very
    checkpoint, and its membership accuracy on the expert's own vs other test images (mean ± std, %)."""
    groups = [g for g in strategy_rows(rows).values()
              if g[0].get("gate_experts") and g[0]["params"]["gate"] in ("universal", "detectors")
              and g[0]["rule"] == "gate_hard"]  # one rule per gate: the gates, not the routing, are compared
    if not groups:
        return ""
    experts = list(groups[0][0]["gate_experts"])
    lines = ["| gate | regime | gates trained on | status | "
             + " | ".join(f"{e}: seen? membership acc" for e in experts) + " |", "|---|---|---|---|" + "---|" * len(experts)]
    for group in groups:
        params = group[0]["params"]
        cells = [f"{'seen' if group[0]['gate_experts'][e]['seen'] else 'UNSEEN'}, "
                 f"{pct([r['gate_experts'][e]['membership_acc'] for r in group])}" for e in experts]
        lines.append(f"| {params['gate']} | {params['regime']} | {params.get('gates_from') or 'this problem'} | "
                     f"{seen_status(group[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detectors_table(rows: list[dict], title: str) -> str:
    """Detector rules (and the gates beside them): accuracy and routing accuracy (%), and each expert's
    detection AUROC and FPR at 95% TPR (%; its own test images against the other experts'), mean over seeds."""
    groups = [g for label, g in strategy_rows(rows).items() if label != "oracle"]
    experts = list(dict.fromkeys(e for g in groups for r in g for e in r.get("detection", {})))
    seeds = len({r["seed"] for r in rows})
    header = ["rule", "accuracy", "routing acc", *(f"{e} AUROC / FPR95" for e in experts)]
    lines = [f"### {title}", "", f"{seeds} seed(s); accuracy in % as mean ± std over seeds, AUROC and FPR95 in % "
             f"as means. {_baselines(rows)}".rstrip(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cells = [group[0]["strategy"], pct([r["acc"] for r in group]), routing_cell([r["routing_acc"] for r in group])]
        for e in experts:
            found = [r["detection"][e] for r in group if e in r.get("detection", {})]
            cells.append(f"{100 * mean_std(m['auroc'] for m in found)[0]:.1f} / "
                         f"{100 * mean_std(m['fpr95'] for m in found)[0]:.1f}" if found else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# how much real data routing needs: per real-image count, which rules each curve's best is picked among
REAL_COUNTS_X = ("0", *REAL_COUNTS)  # 0: data-free
CALIBRATION_RULES = ("energy", "max_logit")  # standardised on a source: calibration of the experts' confidence


def real_data_candidates(curve: str, count: str, row: dict) -> bool:
    """Whether a rule's row competes for ``curve``'s point at ``count`` real images per expert."""
    name = family(row)
    if curve == "best detector":
        return name == (f"detectors, {count} real images per expert" if count != "0"
                        else "detectors, data-free statistics") or (count == "0" and name == "OOD scores")
    if curve == "gates":
        wanted = {"0": "gates, data-free", "all": "gates, real data"}.get(count, f"gates, {count} real images per expert")
        return name == wanted
    source = row.get("params", {}).get("stats", "")
    if count == "0":
        return name == "data-free calibration" or (row["rule"] in CALIBRATION_RULES and bool(source)
                                                   and not source.startswith("real:"))
    return row["rule"] in CALIBRATION_RULES and source == f"real:{count}"


def real_data_curves(rows: list[dict]) -> dict[str, list[dict | None]]:
    """Per curve (best detector, gates, calibration), per count of real images per expert (REAL_COUNTS_X), the
    best rule picked on the selection half and reported on the other (None where no rule ran)."""
    groups = strategy_rows(rows)
    return {curve: [pick({label: g for label, g in groups.items() if real_data_candidates(curve, count, g[0])})
                    for count in REAL_COUNTS_X] for curve in ("best detector", "gates", "calibration")}


def real_data_table(curves: dict[str, list[dict | None]]) -> str:
    header = ["real images per expert", *REAL_COUNTS_X]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for curve, points in curves.items():
        lines.append(f"| {curve} | " + " | ".join(f"{100 * p['mean']:.2f} ± {100 * p['std']:.2f}" if p else "not run"
                                                 for p in points) + " |")
    return "\n".join(lines) + "\n"


def is_unlabeled(name: str | None) -> bool:
    """Whether a family is one of routers fitted on unlabeled inputs (a stream of any length included)."""
    return bool(name) and name.startswith("unlabeled inputs, ")


def unlabeled_curve_table(points: list[dict | None]) -> str:
    header = ["unlabeled inputs fitted on", *(f"stream {c}" if c != "selection" else "selection half"
                                              for c in UNLABELED_X)]
    cells = [f"{100 * p['mean']:.2f} ± {100 * p['std']:.2f} `{p['best']}`" if p else "not run" for p in points]
    return "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| best rule | " + " | ".join(cells) + " |\n"


UNLABELED_X = (*STREAM_COUNTS, "selection")  # inputs seen before routing: a stream's first N, or the selection half


def unlabeled_curve(rows: list[dict]) -> list[dict | None]:
    """Per amount of unlabeled inputs fitted on (UNLABELED_X), the best rule fitted on them, picked on the selection
    half and reported on the other (None where no rule ran); each point also says how many inputs that was."""
    groups = strategy_rows(rows)
    points = []
    for count in UNLABELED_X:
        name = "unlabeled inputs, transductive" if count == "selection" else f"unlabeled inputs, stream {count}"
        best = pick({label: g for label, g in groups.items() if family(g[0]) == name})
        points.append({**best, "inputs": groups[best["best"]][0].get("fit_inputs")} if best else None)
    return points


def unlabeled_table(rows: list[dict]) -> str:
    """Where a router fitted on unlabeled inputs stands and which part of it fails: per family, its best rule
    (picked on the selection half), its accuracy on the report half, each expert's routing AUROC on the report
    half, and how right the routes it gave its own fit inputs were (pseudo-label routing accuracy; per expert,
    the share of the inputs given to it that were its own: the confident set's, or the clusters' purity)."""
    groups = strategy_rows(rows)
    names = [*UNLABELED_FAMILIES, *sorted({family(g[0]) for g in groups.values() if is_unlabeled(family(g[0]))}
                                          - set(UNLABELED_FAMILIES))]  # a stream of another length goes last
    experts = list(dict.fromkeys(e for g in groups.values() if is_unlabeled(family(g[0])) for r in g
                                 for e in r.get("detection", {})))
    header = ["family", "best rule (picked on the selection half)", "accuracy, report half (%)",
              *(f"{e} AUROC" for e in experts), "pseudo-label routing acc", *(f"{e} purity" for e in experts)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        best = pick({label: g for label, g in groups.items() if family(g[0]) == name})
        if best is None:
            continue
        group = groups[best["best"]]
        aurocs = [f"{100 * mean_std(r['detection'][e]['auroc'] for r in group)[0]:.1f}"
                  if all(e in r.get("detection", {}) for r in group) else "" for e in experts]
        pseudo = [r["pseudo_labels"] for r in group if r.get("pseudo_labels")]
        routing = f"{100 * mean_std(p['routing_acc'] for p in pseudo)[0]:.1f}" if pseudo else "n/a"
        purity = []
        for e in experts:
            values = [p["purity"][e] for p in pseudo if p["purity"].get(e) is not None]
            purity.append(f"{100 * mean_std(values)[0]:.1f}" if values else "n/a")
        lines.append(f"| {name} | {best['best']} | {100 * best['mean']:.2f} ± {100 * best['std']:.2f} | "
                     + " | ".join([*aurocs, routing, *purity]) + " |")
    return "\n".join(lines) + "\n"


SOURCE_DETECTORS = ("knn(k=10", "mahalanobis(shrinkage=0.1", "vim(")  # label prefixes the source table follows


def source_table(rows: list[dict], diagnostics: list[dict]) -> str:
    """Why data-free detectors fall short, or not: the same detector's AUROC per expert (%, mean over seeds) with
    statistics from each source, beside the Frechet distance of each synthesizer's images to the expert's real
    test images in its feature space (diagnostics.py)."""
    by_setting: dict[tuple[str, str], dict[str, list[float]]] = {}
    for label, group in strategy_rows(rows).items():
        source = group[0].get("params", {}).get("stats", "")
        prefix = next((p for p in SOURCE_DETECTORS if label.startswith(p)), None)
        if not source or prefix is None:
            continue
        for r in group:
            for expert, m in r.get("detection", {}).items():
                name = prefix[:-1] if prefix.endswith("(") else prefix + ")"  # the setting, without its source
                by_setting.setdefault((name, expert), {}).setdefault(source, []).append(m["auroc"])
    if not by_setting:
        return ""
    sources = sorted({s for cells in by_setting.values() for s in cells},
                     key=lambda s: (s.startswith("real:"), s.startswith("real:") and s != "real:all"
                                    and int(s.partition(":")[2]), s))
    frechet = {}
    for d in diagnostics:
        frechet.setdefault((d["synthesizer"], d["expert"]), []).append(d["frechet_distance"])
    synthesizers = sorted({s for s, _ in frechet})
    header = ["detector", "expert", *sources, *(f"Frechet distance, {s}" for s in synthesizers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (detector, expert), cells in by_setting.items():
        aurocs = [f"{100 * mean_std(cells[s])[0]:.1f}" if s in cells else "" for s in sources]
        distances = [f"{mean_std(frechet[(s, expert)])[0]:.1f}" if (s, expert) in frechet else ""
                     for s in synthesizers]
        lines.append("| " + " | ".join([detector, expert, *aurocs, *distances]) + " |")
    return "\n".join(lines) + "\n"


def table_report(name: str, rows: list[dict]) -> str:
    """A merge table in the paper's layout for its kind (named by the experiment file's prefix)."""
    title = f"{name} ({rows[0]['problem']})" if rows else name
    if name.startswith(("detectors_", "fewshot_")):
        return detectors_table(rows, title)
    if name.startswith("multipass_"):
        return multipass_table(rows, title)
    if name.startswith("gates_"):
        return gates_table(rows, title)
    if name.startswith("synthesis_"):
        return synthesis_table(rows, title)
    if name.startswith("unlabeled_"):
        return merge_report(rows, title) + "\n" + unlabeled_table(rows)
    if name.startswith("universal_"):
        identity = gate_identity_table(rows)
        text = merge_report(rows, title)
        return text + ("\nSeen or unseen is decided per expert by checkpoint identity (the gate's training "
                       "experts' weight digests):\n\n" + identity if identity else "")
    return merge_report(rows, title)


def timings_table(timings: list[dict]) -> str:
    """Wall time per stage and in total; steps that reused finished work are counted apart."""
    stages = list(dict.fromkeys(t["stage"] for t in timings))
    lines = ["| stage | steps | reused earlier work | wall time (s) |", "|---|---|---|---|"]
    for stage in stages:
        group = [t for t in timings if t["stage"] == stage]
        lines.append(f"| {stage} | {len(group)} | {sum(t['reused'] for t in group)} | "
                     f"{sum(t['wall_s'] for t in group):.1f} |")
    lines.append(f"| total | {len(timings)} | {sum(t['reused'] for t in timings)} | "
                 f"{sum(t['wall_s'] for t in timings):.1f} |")
    devices = ", ".join(sorted({t["device"] for t in timings}))
    return "\n".join(lines) + f"\n\nDevice: {devices}.\n"


def reproduction_report(header: str, tables: dict[str, list[dict]], series: dict[str, list[str]],
                        experts_per_problem: dict[str, int], experts: list[dict], generators: list[dict],
                        gates: dict[str, list[dict]], timings: list[dict], figures: dict[str, str],
                        diagnostics: dict[str, list[dict]] | None = None) -> str:
    """The whole report of one pipeline run, from its result rows (pure: no file is read)."""
    rows_by_problem: dict[str, list[dict]] = {}
    for rows in tables.values():
        for r in rows:
            rows_by_problem.setdefault(r["problem"], []).append(r)
    parts = [header, "## Best rule of each family", "", SELECTION_NOTE, ""]
    for problem, rows in rows_by_problem.items():
        parts += [f"### {problem}", "", families_table(best_of_families(rows))]
    if "families" in figures:
        parts += [f"![accuracy by family]({figures['families']})", ""]
    if series:
        parts += ["## Scaling with the number of experts", "",
                  "Best rule of each family as a series of problems adds experts (mean ± std in %, on the report "
                  "half; picked on the selection half; naive and the oracle on the report half too).", "",
                  scaling_table(scaling_rows(series, rows_by_problem, experts_per_problem))]
    def curves(stage: str) -> list[str]:
        key = f"training_{stage}"
        return [f"![training curves, {stage}]({figures[key]})", ""] if key in figures else []

    if experts:
        parts += ["## Experts", "", experts_report(experts), *curves("experts")]
    if generators:
        parts += ["## Data-free synthesis", "", generators_report(generators), *curves("generators")]
        parts += [f"![{name.replace('_', ' ')}]({path})" + "\n" for name, path in figures.items()
                  if name.startswith("samples")]
    if diagnostics:
        parts += ["## Why a synthetic set transfers, or not", "",
                  "Measured against real test images, for evaluation only (diagnostics.py): the Frechet distance "
                  "of an expert's features on its synthetic images to those on its own real test images; its mean "
                  "max-softmax on synthetic images, on real images of its own domain and of the other domains; "
                  "and the best membership accuracy among its data-free gates.", ""]
        for problem, rows in diagnostics.items():
            parts += [f"### {problem}", "", diagnostics_report(rows, (gates or {}).get(problem, []))]
            if f"msp_{problem}" in figures:
                parts += [f"![max-softmax distributions, {problem}]({figures[f'msp_{problem}']})", ""]
    fewshot = {p: rows for p, rows in rows_by_problem.items() if any((r.get("params") or {}).get("stats", "")
                                                                      .startswith("real:") for r in rows)}
    if fewshot:
        parts += ["## How much real data does routing need", "",
                  "Per count of real training images per expert (0: data-free), the best detector, the best gate "
                  "and the best calibration (energy or max logit standardised on those images), each picked on the "
                  "selection half and reported on the other (%, mean ± std over seeds).", ""]
        for problem, rows in fewshot.items():
            parts += [f"### {problem}", "", real_data_table(real_data_curves(rows))]
            if f"real_data_{problem}" in figures:
                parts += [f"![real data against accuracy, {problem}]({figures[f'real_data_{problem}']})", ""]
    unlabeled = {p: rows for p, rows in rows_by_problem.items() if any(is_unlabeled(family(r)) for r in rows
                                                                       if r.get("kind") == "strategy")}
    if unlabeled:
        parts += ["## Routing from the unlabeled inputs", "",
                  "Routers fitted on the test inputs themselves, never on a label or a training image: on the whole "
                  "selection half (transductive) or on the first N inputs of a shuffled stream of it; every rule "
                  "picked on the selection half and reported on the other. AUROC per expert on the report half; the "
                  "pseudo-labels are the routes a rule gave its own fit inputs, scored against the true domain.", ""]
        for problem, rows in unlabeled.items():
            parts += [f"### {problem}", "", unlabeled_curve_table(unlabeled_curve(rows)), unlabeled_table(rows)]
            if f"real_data_{problem}" in figures and problem not in fewshot:  # else the figure is shown above
                parts += [f"![unlabeled inputs against accuracy, {problem}]({figures[f'real_data_{problem}']})", ""]
    sources = {p: source_table(rows, (diagnostics or {}).get(p, [])) for p, rows in rows_by_problem.items()}
    if any(sources.values()):
        parts += ["## Detectors: the same detector with statistics from each source", "",
                  "Detection AUROC (%, an expert's own test images against the others', mean over seeds) of one "
                  "detector with statistics from each source, beside the Frechet distance of each synthesizer's "
                  "images to the expert's real test images in its own feature space: where the data-free sources "
                  "fall short, and how far their images are from real ones.", ""]
        parts += [part for problem, text in sources.items() if text for part in (f"### {problem}", "", text)]
    if gates:
        parts += ["## Gate membership accuracy on the real combined test set", ""]
        for problem, rows in gates.items():
            parts += [f"### {problem}", "", gates_report(rows)]
        parts += curves("gates")
    parts += ["## Tables", ""]
    parts += [table_report(name, rows) for name, rows in tables.items() if rows]
    if timings:
        parts += ["## Wall time", "", timings_table(timings)]
    return "\n".join(parts).rstrip("\n") + "\n"


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
