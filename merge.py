"""Evaluate combination rules on a problem, for every configured seed.

    python merge.py problem=disjoint_mnist strategies=[naive,std_lower,energy,oracle] seeds=[0,1,2] data_dir=DATA

Each seed's experts run once on the combined test set; every logit rule reads those logits, and
each multi-pass setting runs the experts on its augmented copies once for both of its combiners.
On a problem with shared labels (fusion parents) the weight-space fusion rules build one network
from the experts, reading ``fusion_samples`` real training images drawn from the union of the
parents' training sets; their rows record that count (``fusion_samples``, 0 for rules that read
weights only), any fine-tuning data, and the time to fuse apart from evaluation (``fuse_time_s``).

Every row scores its rule on the whole combined test set and on its two seeded halves (``acc_select``,
``acc_report``): tables that pick the best of several rules pick on the selection half and report the
other (report.best_of_families). Gate rules also say, per evaluated expert, whether the gate was trained
on that very expert checkpoint (``gate_experts``; ``unseen`` when none of them) and how well its gate
tells the expert's own test images from the others (membership accuracy).

Rows (one per strategy and seed, plus the experts' own accuracies) go to ``RESULTS_DIR/merge/NAME.{jsonl,csv}``
(``results_dir``: runs/ by default, which git ignores; the pipeline writes results/PROFILE) with the config, and a
Markdown report to ``NAME.md``. Each row is also appended, as soon as it is computed, to
``RESULTS_DIR/merge/NAME/seedS.jsonl``; a rerun reuses a stored row only when its key matches:
the rule and the settings it depends on, the digests of the expert and gate files it read, and the source
of the code that computes it (``row_key``). The summary counts reused rows and says why others were made. A run
with another rule list keeps the table's rows of earlier runs of the same problem and settings (``keep_rows``),
and says how many it kept and how many it replaced. Experts, synthetic sets or gates it does not find stop it with
the commands that make them, or, with ``make_missing=true``, are made by those commands first.
"""
from __future__ import annotations

import cli
import config

ARGS = cli.arguments(__name__, __doc__, config.MergeConfig)  # --help and bad arguments answer before torch loads

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from artifacts import Layout, code_digest, digest_of, recipe_key, tally  # noqa: E402
from augments import TTA_SETTINGS, apply_augment  # noqa: E402
from common import (append_row, atomic_write_text, derive_seed, make_generator,  # noqa: E402
                    mean_std, print_summary, progress, read_checkpoint, read_rows, resolve_device, source_commit,
                    write_rows)
from errors import UserError  # noqa: E402
from data import InputFormat, load_task, prepare_input, to_unit  # noqa: E402
from detector_stats import LOGIT_DETECTORS, detection_metrics, expert_views  # noqa: E402
from expert_files import FEATURE_TYPES, require  # noqa: E402
from gating import SHARED_GATES, gate_paths, gate_runner, wanted_gates  # noqa: E402
from problems import (Problem, build_problem, expert_activations, expert_class_counts, expert_logits,  # noqa: E402
                      run_stacked, test_batches, test_batches_with_units)
from stacked import resolve_stacking, stack, stackable  # noqa: E402
from report import merge_report  # noqa: E402
from runners import (check_detectors, detector_gate_inputs, detector_runner, sets_read, synthesizer_of,  # noqa: E402
                     synthetic_runner)
from strategies import (BASE_CODE, NO_EXPERT, REGISTRY, Decision, FusionInputs,  # noqa: E402
                        MergeInputs, StrategyCall, check_class_counts, check_fusion, parse_strategies,
                        with_gate_statistics)
from synthesis import components  # noqa: E402


SELECTION_SEED = "selection half"  # names the seeded split of every combined test set into two halves


def selection_half(domain: torch.Tensor, problem_name: str) -> torch.Tensor:
    """A bool mask of the selection half of a combined test set: within each domain (expert), a seeded
    random half of its samples, so both halves hold every domain in the same proportion."""
    generator = make_generator(derive_seed(SELECTION_SEED, problem_name))
    mask = torch.zeros(len(domain), dtype=torch.bool)
    for k in domain.unique().tolist():
        members = torch.nonzero(domain == k).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:len(members) // 2]]
        mask[chosen] = True
    return mask


def score(decision: Decision, problem: Problem, labels: torch.Tensor, domain: torch.Tensor,
          select: torch.Tensor) -> dict:
    """Accuracy overall, on the selection and report halves and per domain, routing accuracy and routing
    counts of one decision.

    A rule that routes no sample (a fused network answers them all) has no routing accuracy: it is
    None (null in JSON, empty in CSV), and its routing counts are 0."""
    correct = decision.pred.cpu() == labels
    chosen = decision.expert.cpu()
    routed = chosen != NO_EXPERT
    counts = torch.bincount(chosen[routed], minlength=len(problem.tasks))
    return {
        "acc": correct.float().mean().item(),
        "acc_select": correct[select].float().mean().item(),
        "acc_report": correct[~select].float().mean().item(),
        "n_report": int((~select).sum()),
        "acc_per_domain": {t: correct[domain == k].float().mean().item() for k, t in enumerate(problem.names)},
        "routing_acc": (chosen == domain).float().mean().item() if routed.any() else None,
        "routing_counts": {t: int(counts[k]) for k, t in enumerate(problem.names)},
        "fallbacks": 0 if decision.fallback is None else int(decision.fallback.sum()),
    }


def problem_key(spec: config.ProblemSpec, tasks: dict[str, config.TaskSpec]) -> dict:
    """A problem as the row keys see it: its experts and their tasks."""
    return {"experts": [config.to_dict(e) for e in spec.experts], "shared_labels": spec.shared_labels,
            "tasks": {e.task: config.to_dict(tasks[e.task]) for e in spec.experts}}


def row_key(settings: dict, upstream: dict, code: tuple[str, ...]) -> dict:
    """What a cached row was computed from, in three parts that say why a row must be recomputed."""
    return {"settings": recipe_key(settings), "upstream": recipe_key(upstream), "code": code_digest(code)}


def why_recompute(latest: dict | None, key: dict) -> str:
    """Why no stored row fits ``key``: compared with the latest row stored for the same strategy."""
    if latest is None:
        return "no stored row"
    for part, why in (("code", "code changed"), ("settings", "settings changed"), ("upstream", "upstream retrained")):
        if latest.get("key", {}).get(part) != key[part]:
            return why
    return "no stored row"


class ExpertRuns:
    """Every expert of several seeds on the combined test set and on its augmented copies, computed once for
    all those seeds. Where ``stack_seeds`` resolves to stacking, expert k of every seed runs as one stacked network
    on each batch (stacked.py), each seed on its own augmented copy drawn from its own generator, so a seed gets
    the logits it would get alone. Each TTA setting draws from a generator seeded by the seed, the problem and the
    setting, so results do not depend on which rules run first."""

    def __init__(self, cfg: config.MergeConfig, problem: Problem, seeds: list[int], device: torch.device,
                 with_views: bool = False) -> None:
        self.problem, self.seeds, self.device, self.batch_size = problem, seeds, device, cfg.batch_size
        self.with_views = with_views  # detectors read them: one unstacked pass takes views and activations at once
        self._views: dict[int, list] = {}
        layout = Layout(cfg)
        self.experts = {seed: problem.load_experts(layout, seed, device) for seed in seeds}
        self.formats = self.experts[seeds[0]][1]
        positions = [[self.experts[seed][0][k] for seed in seeds] for k in range(len(problem.experts))]
        together = resolve_stacking(cfg.stack_seeds, "merge", device) and len(seeds) > 1
        self.stacks = ([stack(models).eval() for models in positions]
                       if together and all(stackable(m) for m in positions) else None)
        self._activations: dict[int, list] = {}
        self._passes: dict[str, dict[int, list]] = {}
        self.times: dict[str, float] = {}  # seconds per seed: the original pass ("") and each setting's

    def activations(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every expert's (logits, features) on the combined test set."""
        if not self._activations:
            start = time.perf_counter()
            if self.with_views:
                self._views = {seed: expert_views(*self.experts[seed], functools.partial(
                    test_batches, self.problem, self.device, self.batch_size), model_features=True)
                    for seed in self.seeds}
                self._activations = {seed: [(v.logits, v.model_features) for v in views]
                                     for seed, views in self._views.items()}
            elif self.stacks is None:
                self._activations = {seed: expert_activations(self.problem, *self.experts[seed], self.device,
                                                              self.batch_size) for seed in self.seeds}
            else:
                batches = (x.unsqueeze(0).expand(len(self.seeds), *x.shape)
                           for x in test_batches(self.problem, self.device, self.batch_size))
                stacked = run_stacked(self.stacks, self.formats, batches, features=True)
                self._activations = {seed: [(lo[i], fe[i]) for lo, fe in stacked] for i, seed in enumerate(self.seeds)}
            self.times[""] = (time.perf_counter() - start) / len(self.seeds)
        return self._activations[seed]

    def views(self, seed: int) -> list:
        """Every expert's detectors.ExpertView of the combined test set (taken with the activations when the table
        has detector rules, else on first use)."""
        if not self._views.get(seed):
            self._views[seed] = expert_views(*self.experts[seed], functools.partial(
                test_batches, self.problem, self.device, self.batch_size))
        return self._views[seed]

    def passes(self, seed: int, setting: str) -> list[list[torch.Tensor]]:
        """Logits per pass (pass 0 = the original images) per expert, for a TTA setting."""
        if setting not in self._passes:
            start = time.perf_counter()
            self._passes[setting] = {s: [[lo for lo, _ in self.activations(s)]] for s in self.seeds}
            generators = [make_generator(derive_seed(s, self.problem.name, "tta", setting), self.device)
                          for s in self.seeds]
            for name, params in TTA_SETTINGS[setting]:
                if self.stacks is None:
                    for s, generator in zip(self.seeds, generators):
                        augment = lambda x, unit, g=generator: apply_augment(name, x, g, unit, **params)  # noqa: E731
                        self._passes[setting][s].append(expert_logits(self.problem, *self.experts[s], self.device,
                                                                      self.batch_size, augment))
                    continue
                batches = (torch.stack([apply_augment(name, x, g, unit, **params) for g in generators])
                           for x, unit in test_batches_with_units(self.problem, self.device, self.batch_size))
                stacked = run_stacked(self.stacks, self.formats, batches)
                for i, s in enumerate(self.seeds):
                    self._passes[setting][s].append([lo[i] for lo, _ in stacked])
            self.times[setting] = (time.perf_counter() - start) / len(self.seeds)
        return self._passes[setting][seed]


def gate_files(layout: Layout, problem: Problem, call: StrategyCall, seed: int) -> list[Path]:
    """The gate checkpoint each expert's column reads, for a gating strategy (none for other strategies).
    ``gates_from`` takes the gates of another problem (the universal gate: one file for every expert)."""
    if call.param("regime") is None:
        return []
    return gate_paths(layout, problem, call.param("gate"), call.param("regime"), call.param("gates_from"), seed,
                      synthesizer_of(call))


def set_files(layout: Layout, problem: Problem, call: StrategyCall, seed: int) -> list[Path]:
    """The synthetic image sets a rule reads: a calibration's, a detector's with a synthetic source, the detector
    gate's statistics source (none for other strategies)."""
    synthesizer = sets_read(call, layout.gate)
    if synthesizer is None:
        return []
    return [layout.synthetic_path(part, e, seed) for part in components(synthesizer) for e in problem.experts]


def gate_identity(paths: list[Path], problem: Problem, expert_digests: list[str], probs: torch.Tensor,
                  domain: torch.Tensor) -> dict:
    """Per evaluated expert: was its gate trained on this very expert checkpoint (``seen``), and how well does
    the gate tell the expert's own test images from the others (``membership_acc``)? ``unseen``: none seen."""
    trained_on = [{d for name, d in read_checkpoint(p)["meta"]["upstream"].items() if name.startswith("expert:")}
                  for p in paths]
    experts = {name: {"seen": digest in seen, "membership_acc": ((probs[:, k].cpu() > 0.5) == (domain == k))
                      .float().mean().item()}
               for k, (name, digest, seen) in enumerate(zip(problem.names, expert_digests, trained_on))}
    return {"gate_experts": experts, "unseen": not any(e["seen"] for e in experts.values())}


def pseudo_label_quality(rows: torch.Tensor, experts: torch.Tensor, domain: torch.Tensor, names: list[str]) -> dict:
    """How right the routes a rule gave its own fit inputs were (the confident set of self-training, the clusters'
    owners): their routing accuracy, and per expert the share of the inputs given to it that are its own (purity;
    None where it was given none). Evaluation only: the rule never saw the domain."""
    truth = domain.cpu()[rows.cpu()]
    experts = experts.cpu()
    purity = {name: ((truth[experts == k] == k).float().mean().item() if (experts == k).any() else None)
              for k, name in enumerate(names)}
    return {"n": len(rows), "routing_acc": (truth == experts).float().mean().item(), "purity": purity,
            "counts": {name: int((experts == k).sum()) for k, name in enumerate(names)}}


def build_fusion_inputs(cfg: config.MergeConfig, problem: Problem, models: list[nn.Module],
                        formats: list[InputFormat], class_counts: torch.Tensor, seed: int,
                        device: torch.device) -> FusionInputs:
    """What the fusion rules read: the parents, ``cfg.fusion_samples`` real training images and a predictor.

    The samples are drawn, with a generator seeded by the seed and the problem, from the union of the
    parents' training sets, each loaded as the trainer loaded it (its part of a split, its
    ``expert.train_limit``); parents trained on one set share it. All parents of a shared-labels problem
    learn one source, so they read one input format."""
    fmt = formats[0]
    sets = [load_task(problem.specs[task], "train", cfg.data_dir, cfg.expert.train_limit)
            for task in dict.fromkeys(problem.tasks)]
    images, labels = torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets])
    generator = make_generator(derive_seed(seed, problem.name, "fusion samples"))
    chosen = torch.randperm(len(images), generator=generator)[:cfg.fusion_samples]

    @torch.no_grad()
    def predict(network) -> torch.Tensor:
        # shared labels: an expert's local class is the global class
        scores = [network(prepare_input(x, fmt)) for x in test_batches(problem, device, cfg.batch_size)]
        return torch.cat(scores).argmax(dim=1).cpu()

    @functools.cache
    def training_data() -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_input(to_unit(images, device), fmt), labels.to(device)

    return FusionInputs(list(models), prepare_input(to_unit(images[chosen], device), fmt),
                        class_counts, predict, training_data, seed=derive_seed(seed, problem.name, "fusion"))


@dataclass
class SeedPlan:
    """One seed's rows: their keys, the rows stored under them, and why the others must be computed."""

    seed: int
    keys: dict[str, dict]
    rows: dict[str, dict]
    reasons: dict[str, str]
    stored: dict[tuple[str, str], dict]
    expert_digests: list[str]

    @property
    def todo(self) -> dict[str, dict]:
        return {label: key for label, key in self.keys.items() if label not in self.rows}


def plan_seed(cfg: config.MergeConfig, problem: Problem, calls: list[StrategyCall], seed: int,
              cache_path: Path) -> SeedPlan:
    """Which rows of one seed (experts' own accuracies first, then every call) are stored under their
    current key, and why the others must be computed."""
    layout = Layout(cfg)
    expert_digests = [layout.expert_digest(e, seed) for e in problem.experts]
    common = {"problem": problem_key(cfg.problems[cfg.problem], cfg.tasks), "test_limit": cfg.test_limit,
              "batch_size": cfg.batch_size}
    keys = {f"expert:{name}": row_key(common, {"experts": expert_digests}, BASE_CODE) for name in problem.names}
    for call in calls:
        gates = [digest_of(p) for p in dict.fromkeys(gate_files(layout, problem, call, seed))]
        sets = [digest_of(p) for p in set_files(layout, problem, call, seed)]
        settings = {**common, "strategy": call.label, "params": call.params,
                    **({"fusion_samples": cfg.fusion_samples} if REGISTRY[call.name].fusion else {})}
        upstream = {"experts": expert_digests, "gates": gates, **({"sets": sets} if sets else {})}
        keys[call.label] = row_key(settings, upstream, REGISTRY[call.name].code)
    history = read_rows(cache_path)  # every row stored for this seed, of any settings
    stored = {(r["strategy"], json.dumps(r.get("key"), sort_keys=True)): r for r in history}
    latest = {r["strategy"]: r for r in history}  # the last row of each label says why a row is stale
    rows, reasons = {}, {}
    for label, key in keys.items():
        row = None if cfg.force else stored.get((label, json.dumps(key, sort_keys=True)))
        if row is not None:
            rows[label], reasons[label] = row, "reused"
        else:
            reasons[label] = "force=true" if cfg.force else why_recompute(latest.get(label), key)
    return SeedPlan(seed, keys, rows, reasons, stored, expert_digests)


def finish_seed(plan: SeedPlan, computed: dict[str, dict], cache_path: Path) -> list[dict]:
    """One seed's rows in order; the cache rewritten to hold the computed rows beside every stored one (rows
    of other settings, and of strategies not asked for this time, stay stored)."""
    if computed:
        plan.rows.update(computed)
        plan.stored.update({(label, json.dumps(r["key"], sort_keys=True)): r for label, r in computed.items()})
        atomic_write_text(cache_path, "".join(json.dumps(r) + "\n" for r in plan.stored.values()))
    return [plan.rows[label] for label in plan.keys]


def compute_rows(cfg: config.MergeConfig, problem: Problem, calls: list[StrategyCall], plan: SeedPlan,
                 runs: ExpertRuns, device: torch.device, cache_path: Path) -> dict[str, dict]:
    """The rows of ``plan.todo`` (experts' own accuracies and ``calls``) from the experts' runs, each appended
    to the cache as soon as it is done (an interrupted seed keeps them)."""
    layout, seed, keys, expert_digests = Layout(cfg), plan.seed, plan.todo, plan.expert_digests
    models, formats = runs.experts[seed]
    labels = problem.labels
    class_counts = problem.class_counts(layout, seed, cfg.data_dir) if problem.shared_labels else None
    domain = problem.owner_domain(class_counts) if problem.shared_labels else problem.domain
    select = selection_half(domain, problem.name)
    activations = runs.activations(seed)
    logits = [lo for lo, _ in activations]
    base = {"problem": cfg.problem, "name": cfg.name or cfg.problem, "seed": seed, "device": str(device),
            "n": len(labels), "commit": source_commit()}
    rows = {}

    def finish(label: str, row: dict) -> None:
        rows[label] = {**base, "strategy": label, **row, "key": keys[label]}
        append_row(cache_path, rows[label])

    for k, name in enumerate(problem.names):
        if f"expert:{name}" not in keys:
            continue
        # an expert's own test set: its part of the combined one, or all of it when labels are shared
        own = torch.ones_like(domain, dtype=torch.bool) if problem.shared_labels else domain == k
        local_correct = problem.label_maps[k][logits[k][own.to(device)].argmax(1).cpu()] == labels[own]
        finish(f"expert:{name}", {"kind": "expert", "acc": local_correct.float().mean().item()})

    scorer = detector_runner(layout, problem, models, formats, logits, seed, device,
                             functools.partial(test_batches, problem, device, cfg.batch_size), cfg.data_dir,
                             cfg.force, functools.partial(runs.views, seed))
    inputs = MergeInputs(logits, problem.label_maps, domain.to(device),
                         run_passes=functools.partial(runs.passes, seed),
                         run_gates=gate_runner(layout, problem, activations, seed, device,
                                               detector_gate_inputs(scorer, logits, cfg.gate.detector_stats)),
                         run_synthetic=synthetic_runner(layout, problem, models, formats, seed, device),
                         run_detector=scorer, features=[fe for _, fe in activations], select=select,
                         seed=derive_seed(seed, problem.name, "unlabeled"))
    rules = progress(calls, desc=f"{base['name']} seed {seed}", unit="rule", leave=False)
    for call in rules:
        rules.set_postfix_str(call.label)  # which rule is running (on a terminal) or just finished (in a log)
        setting = call.param("setting")
        if setting is not None:  # expert passes, timed apart from the rule
            inputs.passes(setting)
        if REGISTRY[call.name].fusion is not None and inputs.fusion is None:  # built once, for the first fusion rule
            inputs.fusion = build_fusion_inputs(cfg, problem, models, formats, class_counts, seed, device)
        start = time.perf_counter()
        decision = call(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rule_time = time.perf_counter() - start
        extra = {}
        if call.param("regime") is not None:
            paths = gate_files(layout, problem, call, seed)
            probs = inputs.gates(call.param("gate"), call.param("regime"), call.param("gates_from"),
                                 call.param("synthesizer"))
            extra = gate_identity(paths, problem, expert_digests, probs, domain)
        if call.name == "oracle":  # on shared labels it routes to each class's owner parent: report.oracle_name
            extra = {"shared_labels": problem.shared_labels}
        if REGISTRY[call.name].detector:  # how well each expert's score tells its own images (OpenOOD's metrics)
            params = {k: v for k, v in call.params.items() if k not in ("stats", "standardise")}
            scores = inputs.detector(call.name, call.param("stats"), call.param("standardise") or "zscore", params)
            extra = {"detection": detection_metrics(scores.raw, domain, problem.names)}
        if decision.scores is not None:  # a router fitted on the selection half: judged on the report half
            extra["detection"] = detection_metrics(decision.scores[~select], domain[~select], problem.names)
        if decision.pseudo is not None and len(decision.pseudo[0]):
            extra["pseudo_labels"] = pseudo_label_quality(*decision.pseudo, domain, problem.names)
        finish(call.label, {"kind": "strategy", "rule": call.name, "params": call.params,
                            **score(decision, problem, labels, domain, select), **decision.row, **extra,
                            "time_s": rule_time, "expert_time_s": runs.times[""] + runs.times.get(setting, 0.0),
                            "stacked_seeds": len(runs.seeds) if runs.stacks is not None else 1})
    return rows


def check_gates_from(calls: list[StrategyCall], problems: dict[str, config.ProblemSpec]) -> None:
    """``gates_from`` must name a problem, and only the universal gate serves experts of another problem
    (a per-expert gate belongs to its own problem's expert)."""
    for call in calls:
        source = call.param("gates_from")
        if not source:
            continue
        if source not in problems:
            raise config.ConfigError(f"strategy {call.label}: gates_from={source!r} is not a problem; choices: "
                                     f"{', '.join(problems)}")
        if call.param("gate") not in SHARED_GATES:
            raise config.ConfigError(f"strategy {call.label}: gates_from applies to the universal gate only (a "
                                     f"{call.param('gate')} gate belongs to one expert of its own problem)")


TABLE_KEYS = ("strategies", "keep_rows", "make_missing")  # settings of the table, not of its rows: rows omit them
REPO = Path(__file__).resolve().parent


def make_missing(cfg: config.MergeConfig, commands: list[str]) -> None:
    """Run ``commands`` (Layout.missing_commands), each stage script in its own process as a user would (stage scripts
    never import each other), with this run's data root, folders, device and determinism; a failure stops the run
    with its command (the stage's own error is printed above it)."""
    local = {"data_dir": cfg.data_dir, "ckpt_dir": cfg.ckpt_dir, "results_dir": cfg.results_dir,
             "device": cfg.device, "deterministic": str(cfg.deterministic).lower()}
    for command in commands:
        words = shlex.split(command)
        takes = {f.name for f in dataclasses.fields(config.STAGE_CONFIGS[words[1]])}
        print(f"make_missing: {command}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / words[1]), *words[2:],
                               *(f"{key}={value}" for key, value in local.items() if key in takes)])
        if done.returncode:
            raise UserError(f"make_missing: `{command}` failed (exit status {done.returncode}; its error is above)")


def with_earlier_rows(rows: list[dict], previous: list[dict], recorded: dict, seeds: list[int],
                      keep: bool) -> tuple[list[dict], dict, str]:
    """The table's rows: per seed, this run's ``rows``, then (with ``keep``) the rows of earlier runs in the table
    as it was (``previous``) of the same problem and settings (the same ``recorded`` config) whose rule this run
    did not compute, so a run with another rule list adds to a table instead of replacing it. Also how many earlier
    rows were kept and how many replaced, and a line saying so (empty when neither)."""
    same = json.dumps(recorded["config"], sort_keys=True, default=str)
    ours = {(r["seed"], r["strategy"]) for r in rows}
    others = [r for r in previous if (r["seed"], r["strategy"]) not in ours]
    kept = [r for r in others if keep and json.dumps(r.get("config"), sort_keys=True) == same]
    table = [r for seed in dict.fromkeys([*seeds, *(r["seed"] for r in kept)])
             for r in [*(r for r in rows if r["seed"] == seed), *(r for r in kept if r["seed"] == seed)]]
    lines = []
    if kept:
        labels = ", ".join(dict.fromkeys(r["strategy"] for r in kept))
        lines.append(f"kept {len(kept)} rows of earlier runs of this table with the same problem and settings: "
                     f"{labels}")
    if len(others) > len(kept):
        why = ("keep_rows=false" if not keep else "they were made with other settings; rerunning those settings "
               "reads them back from the per-seed caches")
        lines.append(f"replaced {len(others) - len(kept)} rows of an earlier run of this table ({why})")
    return table, {"kept": len(kept), "replaced": len(others) - len(kept)}, "; ".join(lines)


def main(cfg: config.MergeConfig) -> dict:
    config.check(cfg)
    config.check_names(cfg)
    calls = with_gate_statistics(parse_strategies(cfg.strategies), cfg.gate.detector_stats)
    if "oracle" not in [c.label for c in calls]:  # the bound goes beside every table
        calls.append(parse_strategies(["oracle"])[0])
    counts = expert_class_counts(cfg.problem, cfg.problems[cfg.problem], cfg.tasks)
    for call in calls:
        check_fusion(call, cfg.problem, cfg.problems[cfg.problem])
        check_class_counts(call, cfg.problem, counts)
    check_gates_from(calls, cfg.problems)
    check_detectors(calls, cfg.problem, cfg.problems[cfg.problem], cfg.tasks)
    for call in calls:
        if call.param("gate") in FEATURE_TYPES:
            require(cfg.problem, cfg.problems[cfg.problem], features=f"strategy {call.label}")
    config.print_config(cfg)
    device = resolve_device(cfg.device)
    layout = Layout(cfg)
    problem = build_problem(cfg.problem, cfg.problems[cfg.problem], cfg.tasks, cfg.data_dir, cfg.test_limit)
    wanted = problem.wanted_experts(layout, cfg.seeds)
    wanted += [w for seed in cfg.seeds for c in calls if c.param("regime") is not None
               for w in wanted_gates(layout, problem, c.param("gate"), c.param("regime"), c.param("gates_from"), seed,
                                     synthesizer_of(c))]
    wanted += [layout.wanted_set(cfg.problem, part, e, seed) for seed in cfg.seeds for c in calls
               if sets_read(c, cfg.gate) for part in components(sets_read(c, cfg.gate)) for e in problem.experts]
    if (error := layout.missing_error(wanted)) is not None:
        if not cfg.make_missing:
            raise error
        make_missing(cfg, layout.missing_commands(wanted))
    name = cfg.name or cfg.problem
    out = Path(cfg.results_dir) / "merge"
    caches = {seed: out / name / f"seed{seed}.jsonl" for seed in cfg.seeds}
    plans = {seed: plan_seed(cfg, problem, calls, seed, caches[seed]) for seed in cfg.seeds}
    todo = [seed for seed in cfg.seeds if plans[seed].todo]
    views = any(REGISTRY[c.name].detector and (c.param("stats") or c.name not in LOGIT_DETECTORS) for c in calls)
    runs = ExpertRuns(cfg, problem, todo, device, with_views=views) if todo else None
    rows, reasons = [], []
    for seed in progress(cfg.seeds, desc=f"{name} seeds"):
        plan = plans[seed]
        computed = compute_rows(cfg, problem, [c for c in calls if c.label in plan.todo], plan, runs, device,
                                caches[seed]) if plan.todo else {}
        rows += finish_seed(plan, computed, caches[seed])
        reasons += list(plan.reasons.values())
    recorded = config.row_config(cfg, table_keys=TABLE_KEYS)
    rows, earlier, line = with_earlier_rows([{**r, **recorded} for r in rows], read_rows(out / f"{name}.jsonl"),
                                            recorded, cfg.seeds, cfg.keep_rows)
    if line:
        print(line, flush=True)
    outputs = write_rows(out / name, rows)
    outputs["report"] = str(out / f"{name}.md")
    atomic_write_text(outputs["report"], merge_report(rows, title=f"{name} ({cfg.problem})"))
    outputs["config"] = str(out / f"{name}.config.yaml")
    config.save(cfg, outputs["config"])
    accuracy = {}
    for call in calls:
        mean, std = mean_std(r["acc"] for r in rows if r["strategy"] == call.label)
        accuracy[call.label] = {"mean": mean, "std": std}
    summary = {"problem": cfg.problem, "name": name, "seeds": cfg.seeds, "acc": accuracy, "outputs": outputs,
               **tally(reasons), "earlier_rows": earlier}
    print_summary(summary)
    return summary


if __name__ == "__main__":
    cli.run(main, ARGS)
