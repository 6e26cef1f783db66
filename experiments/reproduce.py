"""Reproduce the paper with one command: experts -> generators -> gates -> every merge table -> report.

    python experiments/reproduce.py                  # the quick profile (2 CPU cores, minutes)
    python experiments/reproduce.py profile=paper    # 10 seeds at the paper's budgets, for a GPU
    python experiments/reproduce.py profile=cpu only_problems=[disjoint_mnist]

A profile (``experiments/profiles/NAME.yaml``) lists the seeds, what its budgets change from the
defaults of config.py (the settings sections, which every stage that reads them gets), the problems and the
merge tables. Every step calls a stage script's ``main`` in-process for all seeds at once, under a single
progress bar, so a stage trains and evaluates its seeds together where its models stack. The stage scripts reuse checkpoints and cached rows whose recipe
and upstream files are unchanged (artifacts.py), so a rerun after an interruption redoes only what is
missing or stale, and a changed setting trains beside the old files instead of over them. Run from the
repository root. ``write_script=true`` writes ``experiments/reproduce_PROFILE.sh``: the same steps as
shell commands, for running stages by hand.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import config  # noqa: E402

def load_config(argv: list[str] | None = None) -> config.ReproduceConfig:
    """``profile=NAME`` (default quick) loads experiments/profiles/NAME.yaml; other arguments override it."""
    argv = sys.argv[1:] if argv is None else argv
    name = config.parse_args(config.ReproduceConfig, [a for a in argv if a.startswith("profile=")]).profile
    return config.parse_args(config.ReproduceConfig, [str(config.profile_path(name)), *argv])


# --help and bad arguments answer before torch loads
ARGS = cli.arguments(__name__, __doc__, config.ReproduceConfig, load_config)

import figures  # noqa: E402
from artifacts import arch_tag, code_digest  # noqa: E402
from common import (atomic_write_text, hidden_inner_progress, print_summary, progress, read_rows,  # noqa: E402
                    resolve_device, write_rows)
from experiments.steps import STAGES, Step, parse_step, run_step, shared_args, timing_row  # noqa: E402
from report import (REAL_COUNTS_X, UNLABELED_X, answer_rows, answer_table, best_of_families,  # noqa: E402
                    real_data_curves, reproduction_report, resolve, scaling_rows, target_rows, targets_table,
                    unlabeled_curve)
from strategies import BASE_CODE, REGISTRY, parse_strategies  # noqa: E402
from synthesis import components  # noqa: E402

NO_FIGURES = "matplotlib is not installed"
PROBLEM_STAGE_KEYS = {"gan": "generators", "pan": "gates"}
FUSION_PARENTS = "experiments/fusion_parents.yaml"  # the tasks (splits of MNIST and CIFAR-10) fusion parents learn
FUSION_KEYS = ("files", "merge", *PROBLEM_STAGE_KEYS)




def plan(cfg: config.ReproduceConfig) -> list[Step]:
    """The steps of a profile in pipeline order; every step's arguments are parsed here, so a bad
    argument stops the run before any work."""
    known = config.MergeConfig().problems
    problems = [p for p in cfg.problems if not cfg.only_problems or p in cfg.only_problems]
    unknown = [p for p in [*cfg.problems, *cfg.only_problems] if p not in known]
    if unknown:
        raise config.ConfigError(f"unknown problem(s) {unknown}; choices: {', '.join(known)}")
    for problem, extra in cfg.problems.items():
        bad = [k for k in extra if k not in PROBLEM_STAGE_KEYS]
        if bad:
            raise config.ConfigError(f"problems.{problem}: unknown key(s) {bad}; choices: {', '.join(PROBLEM_STAGE_KEYS)}")
    experts = dict.fromkeys((e.task, e.arch) for p in problems for e in known[p].experts)
    steps = [Step("experts", f"{task} {arch}", [f"dataset={task}", f"arch={arch}"]) for task, arch in experts]
    made = list(dict.fromkeys(part for name in cfg.synthesizers for part in components(name)))
    synthesizers = {"gan": f"synthesizers=[{','.join(made)}]", "pan": f"synthesizers=[{','.join(cfg.synthesizers)}]"}
    for key, stage in PROBLEM_STAGE_KEYS.items():
        if stage == "generators" and not made:  # a profile of real-data gates only has nothing to synthesise
            continue
        steps += [Step(stage, p, [*cfg.problems[p].get(key, []), f"problem={p}", synthesizers[key]]) for p in problems]
    for table, extra in cfg.tables.items():
        args = [f"experiments/{table}.yaml", *extra]
        table_cfg = parse_step(Step("merge", table, args), cfg.seeds)
        needs = {table_cfg.problem} | {c.param("gates_from") for c in parse_strategies(table_cfg.strategies)} - {None, ""}
        if needs <= set(problems):
            steps.append(Step("merge", table, args))
        elif not cfg.only_problems:
            raise config.ConfigError(f"table {table} needs problem(s) {sorted(needs - set(problems))}; add them "
                                     f"under `problems`")
    steps = sorted(unique(steps + fusion_steps(cfg)), key=lambda s: list(STAGES).index(s.stage))  # stable
    generated = {s.label for s in steps if s.stage == "generators"}
    for step in steps:
        stage_cfg = parse_step(step, cfg.seeds)
        # a gate of the synthetic regime trains on the problem's generators: without their step the run would stop
        # at the gates, an hour in
        if step.stage == "gates" and "synthetic" in stage_cfg.regimes and step.label not in generated:
            raise config.ConfigError(f"gates step {step.label!r} trains synthetic-regime gates, but no generators "
                                     f"step makes their images; add `gan: []` to its fusion entry (or drop "
                                     f"`synthetic` from its regimes)")
        if step.fusion:
            continue
        changed = [name for name, section in config.SECTIONS.items()
                   if hasattr(stage_cfg, name) and getattr(stage_cfg, name) != section()]
        if changed:  # every stage must agree on them, so they are the profile's, not one step's
            raise config.ConfigError(f"{step.stage} step {step.label!r} sets {', '.join(changed)}; set settings "
                                     f"sections in the profile (top-level keys {', '.join(config.SECTIONS)}), "
                                     f"so every stage reads the same")
    return steps


def fusion_steps(cfg: config.ReproduceConfig) -> list[Step]:
    """The steps of every fusion table of the profile: its parents (the experts of its problem, each trained with
    the table's recipe files), generators and gates where the entry asks, and the table itself."""
    steps = []
    for table, entry in cfg.fusion.items():
        bad = [k for k in entry if k not in FUSION_KEYS]
        if bad:
            raise config.ConfigError(f"fusion.{table}: unknown key(s) {bad}; choices: {', '.join(FUSION_KEYS)}")
        files = [FUSION_PARENTS, *entry.get("files", [])]
        # `merge`: arguments of the table step alone, after the table's file, so a profile can widen one table's
        # sweep without changing the rows that other profiles read from the same file
        merge_args = [*files, f"experiments/{table}.yaml", f"name={table}", *entry.get("merge", [])]
        table_cfg = parse_step(Step("merge", table, merge_args), cfg.seeds)
        if cfg.only_problems and table_cfg.problem not in cfg.only_problems:
            continue
        for e in table_cfg.problems[table_cfg.problem].experts:
            shape = [f"arch_kwargs={json.dumps(e.arch_kwargs)}"] if e.arch_kwargs else []
            steps.append(Step("experts", f"{e.task} {arch_tag(e.arch, e.arch_kwargs)}",
                              [*files, f"dataset={e.task}", f"arch={e.arch}", *shape], fusion=True))
        steps += [Step(stage, table_cfg.problem, [*files, f"experiments/{table}.yaml", *entry[key],
                                                  f"problem={table_cfg.problem}"], fusion=True)
                  for key, stage in PROBLEM_STAGE_KEYS.items() if key in entry]
        steps.append(Step("merge", table, merge_args, fusion=True))
    return steps


def unique(steps: list[Step]) -> list[Step]:
    """Each step once (a parent shared by two fusion tables trains once); one label with two different
    argument lists would write one rows file twice, so it is an error."""
    out: dict[tuple[str, str], Step] = {}
    for step in steps:
        seen = out.setdefault((step.stage, step.label), step)
        if seen.args != step.args:
            raise config.ConfigError(f"two {step.stage} steps named {step.label!r} differ: {seen.args} vs {step.args}")
    return list(out.values())


def script_path(profile: str) -> Path:
    return REPO / "experiments" / f"reproduce_{profile}.sh"


def render_script(cfg: config.ReproduceConfig, steps: list[Step]) -> str:
    """The profile's steps as shell commands (all seeds at once), then the report."""
    lines = ["#!/usr/bin/env bash",
             f"# The {cfg.profile} profile, stage by stage. Generated by",
             f"#   python experiments/reproduce.py profile={cfg.profile} write_script=true",
             "# from experiments/profiles/" + f"{cfg.profile}.yaml; do not edit. Run from the repository root;",
             "# the data root is $MOE_DATA_DIR (default ./data), the device cuda when available.",
             "set -euo pipefail",
             'PY="${PYTHON:-python}"']
    for step in steps:
        args = [*step.args, *shared_args(cfg, step.stage, cfg.seeds, force=False)]
        lines.append(" ".join(['"$PY"', step.script, *map(shlex.quote, args)]))
    lines.append(f'"$PY" experiments/reproduce.py profile={cfg.profile} report_only=true')
    return "\n".join(lines) + "\n"


def keep_work_timings(previous: list[dict], current: list[dict]) -> list[dict]:
    """This run's timings, except that a step which only reused finished work keeps the time its
    work took in an earlier run, so the table reports the cost of the work, not of the check."""
    earlier = {(t["stage"], t["step"], str(t.get("seeds"))): t for t in previous if not t["reused"]}
    return [earlier.get((t["stage"], t["step"], str(t["seeds"])), t) if t["reused"] else t for t in current]


def dependencies(cfg: config.ReproduceConfig, steps: list[Step]) -> list[set[int]]:
    """The profile's dependency graph: for each step, the indices of the steps whose artifacts it reads. Experts
    read nothing; a problem's synthesis reads its experts; its gates its experts and synthetic sets; a table its
    problem's experts, sets and gates, and the gates of every problem its rules take gates from."""
    parsed = [parse_step(step, cfg.seeds) for step in steps]
    trained, made = {}, {"generators": {}, "gates": {}}
    for i, (step, stage_cfg) in enumerate(zip(steps, parsed)):
        if step.stage == "experts":
            trained[(stage_cfg.dataset, stage_cfg.arch, json.dumps(stage_cfg.arch_kwargs, sort_keys=True))] = i
        elif step.stage in made:
            made[step.stage][stage_cfg.problem] = i
    graph = []
    for step, stage_cfg in zip(steps, parsed):
        if step.stage == "experts":
            graph.append(set())
            continue
        spec = stage_cfg.problems[stage_cfg.problem]
        needs = {trained[key] for e in spec.experts
                 if (key := (e.task, e.arch, json.dumps(e.arch_kwargs, sort_keys=True))) in trained}
        reads = {"generators": [], "gates": ["generators"], "merge": ["generators", "gates"]}[step.stage]
        needs |= {made[stage][stage_cfg.problem] for stage in reads if stage_cfg.problem in made[stage]}
        if step.stage == "merge":  # another problem's gates, for the rules that take them from there
            needs |= {made["gates"][source] for call in parse_strategies(stage_cfg.strategies)
                      if (source := call.param("gates_from")) and source in made["gates"]}
        graph.append(needs)
    return graph


def run_pipeline(cfg: config.ReproduceConfig, steps: list[Step], log_path: Path) -> list[dict]:
    """Every step under one bar, each for all seeds at once: a stage trains (or evaluates) its seeds
    together where its models stack (stacked.py). ``launcher=ray`` runs the same steps as Ray tasks instead."""
    if cfg.launcher == "ray":
        from experiments.ray_launcher import run_graph  # Ray is imported only when asked for

        return run_graph(cfg, steps, dependencies(cfg, steps))
    device = str(resolve_device(cfg.device))
    timings = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, hidden_inner_progress():
        bar = progress(steps, outer=True, desc="reproduce", unit="step")
        for step in bar:
            bar.set_postfix_str(f"{step.stage}: {step.label}")
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                summary = run_step(step, cfg, cfg.seeds, cfg.force)
            timings.append(timing_row(step, cfg.seeds, time.perf_counter() - start, summary, device))
    return timings


def build_report(cfg: config.ReproduceConfig, steps: list[Step]) -> dict:
    """results/PROFILE/report.md (+ CSV summaries and PNG figures) from the rows the stages wrote."""
    results = Path(cfg.results_dir)
    known = config.MergeConfig().problems
    problems = list(dict.fromkeys(s.label for s in steps if s.stage == "gates"))
    experts_rows = [r for s in steps if s.stage == "experts"
                    for r in read_rows(results / "experts" / f"{s.label.replace(' ', '_')}.jsonl")]
    generator_rows = list({(r["synthesizer"], r["task"], r["arch"], r["seed"]): r for p in problems
                           for r in read_rows(results / "gan" / f"{p}.jsonl")}.values())
    gates = {p: read_rows(results / "gates" / f"{p}.jsonl") for p in problems}
    diagnostics = {p: rows for p in problems if (rows := read_rows(results / "gates" / f"{p}_synthesis.jsonl"))}
    tables = {s.label: read_rows(results / "merge" / f"{s.label}.jsonl") for s in steps if s.stage == "merge"}
    timings = read_rows(results / "timings.jsonl")
    series = {name: [p for p in members if p in problems] for name, members in cfg.scaling.items()}
    series = {name: members for name, members in series.items() if len(members) > 1}
    experts_per_problem = {p: len(known[p].experts) for p in problems if p in known}

    rows_by_problem: dict[str, list[dict]] = {}
    for rows in tables.values():
        for r in rows:
            rows_by_problem.setdefault(r["problem"], []).append(r)
    best = {p: best_of_families(rows) for p, rows in rows_by_problem.items()}
    outputs = write_rows(results / "families", [b for rows in best.values() for b in rows])
    outputs["answer"] = write_answer(cfg, results, rows_by_problem)
    scaling = scaling_rows(series, rows_by_problem, experts_per_problem)
    if scaling:
        outputs["scaling"] = write_rows(results / "scaling", [
            {k: v if not isinstance(v, dict) else {"best": v["best"], "mean": v["mean"], "std": v["std"]}
             for k, v in r.items()} for r in scaling])["csv"]
    figures = draw_figures(results, best, generator_rows, diagnostics, experts_rows,
                           [r for rows in gates.values() for r in rows], rows_by_problem)
    outputs["figures"] = figures
    header = "\n".join([
        f"# Reproduction report: profile `{cfg.profile}`", "",
        f"Written by `python experiments/reproduce.py profile={cfg.profile}`; seeds {cfg.seeds}; "
        f"result rows beside this file. Figures: {'PNG files in figures/' if figures else 'not drawn (' + NO_FIGURES + ')'}.",
        "", provenance(tables)])
    text = reproduction_report(header, tables, series, experts_per_problem, experts_rows, generator_rows, gates,
                               timings, figures, diagnostics)
    outputs["report"] = str(results / "report.md")
    atomic_write_text(outputs["report"], text)
    return outputs


def stale_rows(tables: dict[str, list[dict]]) -> list[dict]:
    """The merge rows whose code key differs from the current code's (a rule or the scoring changed since they
    were made): the report names them, so rows of two versions of the code are never silently mixed."""
    stale: dict[tuple[str, str], dict] = {}
    for table, rows in tables.items():
        for r in rows:
            registered = REGISTRY.get(r.get("rule", "")) if r.get("kind") == "strategy" else None
            code = BASE_CODE if r.get("kind") == "expert" else registered.code if registered else None
            now = code_digest(code) if code else "rule no longer registered"
            if r.get("key", {}).get("code") != now:
                entry = stale.setdefault((table, r["strategy"]), {"table": table, "row": r["strategy"], "seeds": []})
                entry["seeds"].append(r["seed"])
    return list(stale.values())


def provenance(tables: dict[str, list[dict]]) -> str:
    """Which commits the merge rows were made at (common.source_commit), and which rows are stale."""
    commits = Counter(r.get("commit", "not recorded") for rows in tables.values() for r in rows)
    made = "; ".join(f"`{c}` ({n} rows)" for c, n in commits.most_common()) or "no rows"
    lines = [f"Merge rows made at commit {made}."]
    stale = stale_rows(tables)
    if not stale:
        return lines[0] + " Every row's code key matches the code of this checkout.\n"
    lines += ["", f"**{len(stale)} rows were made by other code than this checkout's** (a rerun of the profile "
              "remakes them):", "", "| table | row | seeds |", "|---|---|---|"]
    lines += [f"| {s['table']} | {s['row']} | {len(s['seeds'])} |" for s in stale]
    return "\n".join(lines) + "\n"


def curve_panels(experts: list[dict], generators: list[dict], gates: list[dict]) -> dict[str, dict]:
    """Per stage, its training histories for figures.training_curves: panel -> line -> one history per run.
    Experts: one line per task and arch. Generators: one per expert (DAFL). Gates: one panel per regime, one line
    per gate type, over experts and problems (a gate's rows share its history: counted once). Rows written
    before histories were recorded are left out."""
    stages: dict[str, dict[str, dict[str, list]]] = {"experts": {}, "generators": {}, "gates": {}}
    for r in experts:
        if r.get("history"):
            line = f"{r['task']} ({r['arch']})"
            stages["experts"].setdefault("experts", {}).setdefault(line, []).append(r["history"])
    for r in generators:
        if r.get("history"):
            stages["generators"].setdefault("DAFL generators", {}).setdefault(r["task"], []).append(r["history"])
    seen = set()
    for r in gates:
        if r.get("history") and r["checkpoint"] not in seen:
            seen.add(r["checkpoint"])
            regime = r["regime"] if r.get("synthesizer") is None else f"{r['regime']} ({r['synthesizer']})"
            stages["gates"].setdefault(f"gates, {regime}", {}).setdefault(r["gate_type"], []).append(r["history"])
    return {stage: panels for stage, panels in stages.items() if panels}


CURVE_METRICS = {"experts": (("loss", "acc"), ("training loss", "training accuracy")),
                 "generators": (("loss", "confidence"), ("DAFL loss (last batch)", "expert's mean confidence")),
                 "gates": (("loss", "acc"), ("training loss", "training accuracy (in/out)"))}


def write_answer(cfg: config.ReproduceConfig, results: Path, rows_by_problem: dict[str, list[dict]]) -> str:
    """results/PROFILE/answer.md: the answer table over the routing problems and the profile's targets, both
    from rules picked on the selection half and reported on the other (report.answer_rows, report.target_rows);
    their rows in answer.{jsonl,csv} and targets.{jsonl,csv}."""
    routing = {p: rows for p, rows in rows_by_problem.items() if p in cfg.problems}
    answer = answer_rows(routing)
    targets = target_rows(cfg.targets, rows_by_problem)
    write_rows(results / "answer", answer)
    parts = [f"# The answer: profile `{cfg.profile}`", "",
             f"Written by `python experiments/reproduce.py profile={cfg.profile}` from the merge rows beside it.", "",
             "## Does data-free routing beat the training-free rules?", "", answer_table(answer)]
    if targets:
        write_rows(results / "targets", targets)
        parts += ["## Targets", "", targets_table(targets)]
    atomic_write_text(results / "answer.md", "\n".join(parts))
    return str(results / "answer.md")


def draw_figures(results: Path, best: dict[str, list[dict]], generator_rows: list[dict],
                 diagnostics: dict[str, list[dict]], experts: list[dict] = (),
                 gates: list[dict] = (), rows_by_problem: dict[str, list[dict]] | None = None) -> dict[str, str]:
    """The family bars, one figure of sample grids per synthesizer, one of max-softmax curves per problem, and
    one of training curves per stage (experts, generators, gates)."""
    if not figures.available():
        return {}
    drawn = {}
    for stage, panels in curve_panels(experts, generator_rows, gates).items():
        metrics, labels = CURVE_METRICS[stage]
        figures.training_curves(panels, metrics, results / "figures" / f"training_{stage}.png", labels)
        drawn[f"training_{stage}"] = f"figures/training_{stage}.png"
    if best:
        figures.family_bars(best, results / "figures" / "families.png")
        drawn["families"] = "figures/families.png"
    first_seed = {}
    for r in generator_rows:
        first_seed.setdefault((r["synthesizer"], r["task"], r["arch"]), r)
    for synthesizer in dict.fromkeys(key[0] for key in first_seed):
        grids = [(f"{task} ({arch}), seed {r['seed']}", results / "gan" / synthesizer / Path(r["grid"]).name)
                 for (name, task, arch), r in first_seed.items() if name == synthesizer]
        grids = [(title, path) for title, path in grids if path.is_file()]
        if grids:
            figures.sample_grid_figure(grids, results / "figures" / f"samples_{synthesizer}.png")
            drawn[f"samples_{synthesizer}"] = f"figures/samples_{synthesizer}.png"
    for problem, rows in diagnostics.items():
        figures.msp_figure(rows, results / "figures" / f"msp_{problem}.png")
        drawn[f"msp_{problem}"] = f"figures/msp_{problem}.png"
    for problem, rows in (rows_by_problem or {}).items():
        unlabeled = unlabeled_curve(rows)
        if not any((r.get("params") or {}).get("stats", "").startswith("real:") for r in rows) and \
                not any(unlabeled):
            continue
        baselines = {label: resolve(rows, label) for label in ("naive", "oracle")}
        figures.real_data_figure(real_data_curves(rows), REAL_COUNTS_X,
                                 *(b["mean"] if b else None for b in baselines.values()),
                                 f"{problem}: how much real data does routing need",
                                 results / "figures" / f"real_data_{problem}.png", unlabeled, UNLABELED_X)
        drawn[f"real_data_{problem}"] = f"figures/real_data_{problem}.png"
    return drawn


def main(cfg: config.ReproduceConfig) -> dict:
    steps = plan(cfg)
    if cfg.write_script:
        path = script_path(cfg.profile)
        atomic_write_text(path, render_script(cfg, steps))
        path.chmod(0o755)
        print_summary({"profile": cfg.profile, "script": str(path)})
        return {"script": str(path)}
    config.print_config(cfg)
    results = Path(cfg.results_dir)
    start = time.perf_counter()
    if not cfg.report_only:
        timings = run_pipeline(cfg, steps, results / "logs" / "reproduce.log")
        write_rows(results / "timings", keep_work_timings(read_rows(results / "timings.jsonl"), timings))
    outputs = build_report(cfg, steps)
    config.save(cfg, results / "reproduce.config.yaml")
    print(f"report: {outputs['report']} (tables, CSV and figures under {results}/)")
    summary = {"profile": cfg.profile, "seeds": cfg.seeds, "steps": len(steps),
               "wall_s": time.perf_counter() - start, "outputs": outputs}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
