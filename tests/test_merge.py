"""merge.py end to end: tiny experts trained on a fake data root, rows, report, determinism, resume, errors."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import config
import merge
import problems
import strategies
import train_source_networks
from artifacts import ExpertId, Layout
from common import CheckpointError, read_rows
from config import (ConfigError, MergeConfig, TrainConfig, changes, digest, load_yaml, parse_args, portable,
                    to_dict)
from conftest import Forbidden
from test_problems import make_data_root

SEEDS = [1, 2]
TASKS = ["first5_mnist", "last5_mnist"]
EXPERT = ["expert.epochs=2", "expert.batch_size=16", "expert.lr=0.02"]
STRATEGIES = "[naive,energy,{name: tta_mean, setting: flips},{name: tta_voting, setting: flips}]"
LABELS = ["naive", "energy", "tta_mean(setting=flips)", "tta_voting(setting=flips)", "oracle"]
TIME_KEYS = ("time_s", "expert_time_s")
CONFIG_KEYS = ("config", "config_digest")  # what a row says of the run that wrote the table, not of itself




@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fake data root and first5/last5 experts for SEEDS trained on it (once for the module)."""
    base = tmp_path_factory.mktemp("merge")
    root, ckpt = base / "data", base / "ckpt"
    # 64 test digits: 34 of 0-4 and 30 of 5-9, so weighted and plain means differ
    arrays = make_data_root(root, n_train=200, n_test=64, n_cifar=0)
    for task in TASKS:  # a few SGD steps: experts well above chance but not perfect
        train_source_networks.main(parse_args(TrainConfig, [
            f"dataset={task}", f"seeds={SEEDS}", *EXPERT, "device=cpu",
            f"data_dir={root}", f"ckpt_dir={ckpt}", f"results_dir={base / 'train_results'}"]))
    digits = arrays["mnist"]["test"][1]
    yield {"root": root, "ckpt": ckpt, "n": [int((digits < 5).sum()), int((digits >= 5).sum())]}
    data._load_cached.cache_clear()


def merge_cfg(env, results_dir, *extra: str, strategies: str = STRATEGIES, seeds=SEEDS) -> MergeConfig:
    return parse_args(MergeConfig, [
        "problem=disjoint_mnist", f"strategies={strategies}", f"seeds={seeds}", f"data_dir={env['root']}",
        f"ckpt_dir={env['ckpt']}", f"results_dir={results_dir}", "device=cpu", *EXPERT, *extra])


def expert_file(env, task: str, seed: int) -> Path:
    return Layout(parse_args(MergeConfig, [f"ckpt_dir={env['ckpt']}", *EXPERT])).expert_path(
        ExpertId(task, "lenet5", {}), seed)


def without_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIME_KEYS and k not in CONFIG_KEYS}


def by_label(rows: list[dict], seed: int) -> dict[str, dict]:
    return {r["strategy"]: r for r in rows if r["seed"] == seed}


# ---------------------------------------------------------------- end to end

def test_merge_end_to_end(env, tmp_path, capsys):
    cfg = merge_cfg(env, tmp_path)
    summary = merge.main(cfg)
    out = capsys.readouterr().out

    # the summary, and the last printed line is that summary as JSON
    assert set(summary) == {"problem", "name", "seeds", "acc", "outputs", "made", "reused", "why_made", "earlier_rows"}
    n_rows = len(SEEDS) * (len(TASKS) + len(LABELS))
    assert summary["made"] == n_rows and summary["reused"] == 0 and summary["why_made"] == {"no stored row": n_rows}
    assert summary["problem"] == summary["name"] == "disjoint_mnist" and summary["seeds"] == SEEDS
    assert list(summary["acc"]) == LABELS  # oracle added automatically, last
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    outputs = summary["outputs"]
    base = tmp_path / "merge" / "disjoint_mnist"
    assert outputs == {"jsonl": f"{base}.jsonl", "csv": f"{base}.csv", "report": f"{base}.md",
                       "config": f"{base}.config.yaml"}
    assert all(Path(p).is_file() for p in outputs.values())
    # the whole config but the machine's paths (issue 27: no machine path in a committed file or a digest)
    assert load_yaml(outputs["config"]) == json.loads(json.dumps(portable(to_dict(cfg))))
    assert str(tmp_path.parent) not in Path(outputs["config"]).read_text()

    # rows: experts then strategies, per seed, each carrying the config's digest and what differs from the
    # defaults (without the table's list of strategies); the whole config is the file beside them
    rows = read_rows(outputs["jsonl"])
    expected_order = [f"expert:{t}" for t in TASKS] + LABELS
    assert [(r["seed"], r["strategy"]) for r in rows] == [(s, label) for s in SEEDS for label in expected_order]
    differs = json.loads(json.dumps({k: v for k, v in portable(changes(cfg)).items() if k != "strategies"}))
    assert all(r["config"] == differs and r["config_digest"] == digest(cfg) for r in rows)
    assert differs["expert"] == {"epochs": 2, "lr": 0.02, "batch_size": 16}
    assert Path(outputs["config"]).read_text().startswith(f"# config digest: {digest(cfg)}\n")
    with open(outputs["csv"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(json.loads(r["config"]) == differs for r in csv_rows)
    assert [r["strategy"] for r in csv_rows] == [r["strategy"] for r in rows]
    assert "routing_counts.first5_mnist" in csv_rows[0] and "acc_per_domain.last5_mnist" in csv_rows[0]

    n0, n1 = env["n"]
    n = n0 + n1
    assert n0 != n1
    expert_accs = [r["acc"] for r in rows if r["kind"] == "expert"]
    assert len(set(expert_accs)) > 1 and 0 < min(expert_accs)  # the weighted-mean checks below can fail
    for seed in SEEDS:
        group = by_label(rows, seed)
        experts = [group[f"expert:{t}"] for t in TASKS]
        # the experts' own accuracy is the one the trainer measured on the same test images
        for task, row in zip(TASKS, experts):
            assert row["kind"] == "expert"
            trained = torch.load(expert_file(env, task, seed), weights_only=True)["meta"]["row"]["test_acc"]
            assert row["acc"] == pytest.approx(trained, abs=1e-6)
        for label in LABELS:
            row = group[label]
            assert row["kind"] == "strategy" and row["n"] == n and row["seed"] == seed
            assert row["rule"] == label.split("(")[0]
            assert sum(row["routing_counts"].values()) == n
            assert list(row["routing_counts"]) == list(row["acc_per_domain"]) == TASKS
            weighted = (n0 * row["acc_per_domain"]["first5_mnist"] + n1 * row["acc_per_domain"]["last5_mnist"]) / n
            assert row["acc"] == pytest.approx(weighted, abs=1e-6)
            # the selection and report halves split every domain in two
            n_report = row["n_report"]
            assert n_report == (n0 - n0 // 2) + (n1 - n1 // 2)
            halves = ((n - n_report) * row["acc_select"] + n_report * row["acc_report"]) / n
            assert row["acc"] == pytest.approx(halves, abs=1e-6)
            assert 0 <= row["routing_acc"] <= 1 and row["time_s"] >= 0 and row["fallbacks"] == 0
        assert group["tta_mean(setting=flips)"]["params"] == {"setting": "flips"}
        oracle = group["oracle"]
        assert oracle["routing_acc"] == 1.0
        assert oracle["routing_counts"] == {"first5_mnist": n0, "last5_mnist": n1}
        assert oracle["acc_per_domain"] == pytest.approx({t: r["acc"] for t, r in zip(TASKS, experts)}, abs=1e-6)
        # docs/design.md section 4: disjoint MNIST oracle = (n1 acc1 + n2 acc2) / (n1 + n2)
        assert oracle["acc"] == pytest.approx((n0 * experts[0]["acc"] + n1 * experts[1]["acc"]) / n, abs=1e-6)
        # a wrong route is a wrong answer, and a right route gives the oracle's answer
        assert group["naive"]["acc"] <= oracle["acc"] + 1e-9
    for label in LABELS:
        accs = [by_label(rows, s)[label]["acc"] for s in SEEDS]
        assert summary["acc"][label]["mean"] == pytest.approx(np.mean(accs))
        assert summary["acc"][label]["std"] == pytest.approx(np.std(accs, ddof=1))

    report = Path(outputs["report"]).read_text()
    assert report.startswith("### disjoint_mnist (disjoint_mnist)")
    assert "oracle (bound)" in report
    assert all(f"| {label} |" in report for label in LABELS[:-1])
    assert "first5_mnist" in report and "last5_mnist" in report

    # per-seed caches
    for seed in SEEDS:
        cached = read_rows(base / f"seed{seed}.jsonl")
        assert [r["strategy"] for r in cached] == expected_order


def test_tta_rows_are_deterministic(env, tmp_path):
    strategies_ = "[{name: tta_voting, setting: gaussian_1},{name: tta_mean, setting: gaussian_1}]"
    first = read_rows(merge.main(merge_cfg(env, tmp_path, "force=true", strategies=strategies_,
                                           seeds=[1]))["outputs"]["jsonl"])
    again = read_rows(merge.main(merge_cfg(env, tmp_path, "force=true", strategies=strategies_,
                                           seeds=[1]))["outputs"]["jsonl"])
    assert [without_times(r) for r in first] == [without_times(r) for r in again]
    # a setting's noise does not depend on which rules ran before it
    reordered = "[naive,{name: tta_mean, setting: gaussian_1},{name: tta_voting, setting: flips}]"
    other = read_rows(merge.main(merge_cfg(env, tmp_path / "other", strategies=reordered,
                                           seeds=[1]))["outputs"]["jsonl"])
    label = "tta_mean(setting=gaussian_1)"
    assert without_times(by_label(other, 1)[label]) == without_times(by_label(first, 1)[label])


def test_rerun_reads_the_cache_and_computes_only_what_is_new(env, tmp_path, monkeypatch):
    first = read_rows(merge.main(merge_cfg(env, tmp_path))["outputs"]["jsonl"])

    def forbidden(*args, **kwargs):
        raise Forbidden("the rerun should have read its rows from the cache")

    # 1. the same config again: no expert is loaded or run, the rows are the stored ones
    with monkeypatch.context() as patch:
        patch.setattr(problems.Problem, "load_experts", forbidden)
        patch.setattr(problems, "expert_logits", forbidden)
        patch.setattr(merge, "expert_logits", forbidden)
        patch.setattr(merge, "expert_activations", forbidden)
        again_summary = merge.main(merge_cfg(env, tmp_path))
        again = read_rows(again_summary["outputs"]["jsonl"])
    assert again_summary["made"] == 0 and again_summary["reused"] == len(first)
    assert [{k: v for k, v in r.items() if k not in CONFIG_KEYS} for r in again] == \
           [{k: v for k, v in r.items() if k not in CONFIG_KEYS} for r in first]  # time_s too: not recomputed

    # 2. one more strategy: only it is computed, from one pass of the experts for all seeds (stacked)
    called, activation_runs = [], []
    original_call, original_activations = strategies.StrategyCall.__call__, merge.run_stacked

    def recording_call(self, inputs):
        called.append(self.label)
        return original_call(self, inputs)

    def counting_activations(*args, **kwargs):
        activation_runs.append(1)
        return original_activations(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(strategies.StrategyCall, "__call__", recording_call)
        patch.setattr(merge, "run_stacked", counting_activations)
        patch.setattr(merge, "expert_activations", forbidden)
        patch.setattr(merge, "expert_logits", forbidden)  # no augmented pass is needed
        more = STRATEGIES[:-1] + ",std_lower]"
        extended = read_rows(merge.main(merge_cfg(env, tmp_path, strategies=more))["outputs"]["jsonl"])
    assert called == ["std_lower"] * len(SEEDS)
    assert activation_runs == [1]
    for seed in SEEDS:
        old, new = by_label(first, seed), by_label(extended, seed)
        assert list(new) == [f"expert:{t}" for t in TASKS] + LABELS[:-1] + ["std_lower", "oracle"]
        for label in LABELS:
            assert {k: v for k, v in new[label].items() if k not in CONFIG_KEYS} == \
                   {k: v for k, v in old[label].items() if k not in CONFIG_KEYS}

    # 3. another test subset is another fingerprint: the cache must not be used
    with monkeypatch.context() as patch:
        patch.setattr(problems.Problem, "load_experts", forbidden)
        with pytest.raises(Forbidden):
            merge.main(merge_cfg(env, tmp_path, "test_limit=5"))


# ---------------------------------------------------------------- errors before any work

def forbid_evaluation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise Forbidden("no evaluation may start")

    monkeypatch.setattr(problems.Problem, "load_experts", forbidden)
    monkeypatch.setattr(merge, "expert_logits", forbidden)
    monkeypatch.setattr(merge, "expert_activations", forbidden)
    monkeypatch.setattr(merge, "plan_seed", forbidden)


def test_missing_checkpoints_name_the_command(env, tmp_path, monkeypatch):
    forbid_evaluation(monkeypatch)
    empty = tmp_path / "empty_ckpt"
    with pytest.raises(CheckpointError) as err:
        merge.main(merge_cfg(env, tmp_path / "results", f"ckpt_dir={empty}"))
    message = str(err.value)
    assert str(empty) in message
    for task in TASKS:
        assert f"python train_source_networks.py dataset={task} arch=lenet5 seeds=[1,2]" in message
    assert not (tmp_path / "results").exists()

    # only what is missing is named
    partial = tmp_path / "partial_ckpt"
    (partial / "experts").mkdir(parents=True)
    for task, seed in (("first5_mnist", 1), ("first5_mnist", 2), ("last5_mnist", 1)):
        source = expert_file(env, task, seed)
        shutil.copy(source, partial / "experts" / source.name)
    with pytest.raises(CheckpointError) as err:
        merge.main(merge_cfg(env, tmp_path / "results", f"ckpt_dir={partial}"))
    message = str(err.value)
    assert "python train_source_networks.py dataset=last5_mnist arch=lenet5 seeds=[2]" in message
    assert "dataset=first5_mnist" not in message


def test_unknown_problem_lists_choices(env, tmp_path):
    with pytest.raises(ConfigError) as err:
        merge.main(merge_cfg(env, tmp_path, "problem=disjoint_mnst"))
    message = str(err.value)
    assert "disjoint_mnst" in message and "choices" in message
    assert all(name in message for name in MergeConfig().problems)


@pytest.mark.parametrize("bad", ["[naive,nave]", "[{name: tta_mean, setting: flip}]", "[naive,naive]"])
def test_bad_strategies_fail_before_loading_data(tmp_path, monkeypatch, bad):
    def forbidden(*args, **kwargs):
        raise Forbidden("no data may be loaded")

    monkeypatch.setattr(merge, "build_problem", forbidden)
    cfg = parse_args(MergeConfig, [f"strategies={bad}", f"data_dir={tmp_path / 'does_not_exist'}",
                                   f"ckpt_dir={tmp_path / 'ckpt'}", f"results_dir={tmp_path / 'results'}",
                                   "device=cpu"])
    with pytest.raises(ConfigError):
        merge.main(cfg)
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- real data

REAL_EXPERT = ["expert.epochs=1", "expert.train_limit=2000", "expert.batch_size=128"]


def test_real_data_small_slice(data_dir, tmp_path):
    """first5/last5 experts trained for one epoch on 2,000 real images each, merged on 500 + 500 test images."""
    ckpt, results = tmp_path / "ckpt", tmp_path / "results"
    for task in TASKS:
        train_source_networks.main(parse_args(TrainConfig, [
            f"dataset={task}", "seeds=[0]", *REAL_EXPERT, "test_limit=500",
            "device=cpu", f"data_dir={data_dir}", f"ckpt_dir={ckpt}", f"results_dir={results}"]))
    summary = merge.main(parse_args(MergeConfig, [
        "problem=disjoint_mnist", "strategies=[naive]", "seeds=[0]", "test_limit=500", "device=cpu", *REAL_EXPERT,
        f"data_dir={data_dir}", f"ckpt_dir={ckpt}", f"results_dir={results}"]))
    assert list(summary["acc"]) == ["naive", "oracle"]
    rows = by_label(read_rows(summary["outputs"]["jsonl"]), 0)
    assert rows["oracle"]["n"] == 1000
    assert rows["oracle"]["routing_counts"] == {"first5_mnist": 500, "last5_mnist": 500}
    for task in TASKS:
        assert rows[f"expert:{task}"]["acc"] > 0.2  # above chance (5 classes) after one short epoch
    assert rows["oracle"]["acc"] == pytest.approx(
        (rows["expert:first5_mnist"]["acc"] + rows["expert:last5_mnist"]["acc"]) / 2, abs=1e-6)
    assert rows["oracle"]["acc"] >= rows["naive"]["acc"]
    assert rows["naive"]["acc"] > 0.1  # better than guessing among 10 classes


# ---------------------------------------------------------------- known bugs (strict: they fail loudly once fixed)

def test_a_name_with_a_dot_keeps_it(env, tmp_path):
    summary = merge.main(merge_cfg(env, tmp_path, "name=lr0.01", strategies="[naive]", seeds=[1]))
    assert summary["outputs"]["jsonl"].endswith("lr0.01.jsonl")
    assert summary["outputs"]["csv"].endswith("lr0.01.csv")


def test_an_expert_of_other_classes_is_refused(env, tmp_path):
    with pytest.raises(CheckpointError):
        merge.main(merge_cfg(env, tmp_path, "tasks.first5_mnist.classes=[4,3,2,1,0]", strategies="[naive]",
                             seeds=[1]))



# ---------------------------------------------------------------- what a cached row is keyed by

def test_a_changed_setting_or_code_recomputes_exactly_the_rows_it_affects(env, tmp_path, monkeypatch):
    strategies_ = "[naive,{name: tta_mean, setting: random_resized_crop}]"
    first = merge.main(merge_cfg(env, tmp_path, strategies=strategies_, seeds=[1]))
    # the evaluation batch decides the random crops: every row is recomputed, and says why
    other_batch = merge.main(merge_cfg(env, tmp_path, "batch_size=7", strategies=strategies_, seeds=[1]))
    assert other_batch["reused"] == 0 and other_batch["why_made"] == {"settings changed": 5}
    back = merge.main(merge_cfg(env, tmp_path, strategies=strategies_, seeds=[1]))
    assert back["made"] == 0 and back["acc"] == first["acc"]  # rows of both settings stay stored
    # editing the augmentations' code recomputes the multi-pass rows only
    original = merge.code_digest
    monkeypatch.setattr(merge, "code_digest", lambda files: original(files) + ("x" if "augments.py" in files else ""))
    edited = merge.main(merge_cfg(env, tmp_path, strategies=strategies_, seeds=[1]))
    assert edited["made"] == 1 and edited["why_made"] == {"code changed": 1}


def test_a_retrained_expert_recomputes_its_rows(env, tmp_path):
    import shutil as sh

    ckpt = tmp_path / "ckpt"
    sh.copytree(env["ckpt"], ckpt)
    cfg = merge_cfg(env, tmp_path / "results", f"ckpt_dir={ckpt}", strategies="[naive]", seeds=[1])
    merge.main(cfg)
    path = Layout(cfg).expert_path(ExpertId("first5_mnist", "lenet5", {}), 1)
    stored = torch.load(path, weights_only=True)
    model = train_source_networks.build_model("lenet5", **stored["arch_kwargs"])
    model.load_state_dict({k: v * 1.01 for k, v in stored["state_dict"].items()})
    train_source_networks.save_checkpoint(path, model, "lenet5", stored["arch_kwargs"], stored["config"],
                                          {k: v for k, v in stored["meta"].items() if k != "digest"})
    again = merge.main(cfg)
    assert again["reused"] == 0 and again["why_made"] == {"upstream retrained": 4}


def test_an_interrupted_seed_keeps_its_finished_rows(env, tmp_path, monkeypatch):
    strategies_ = "[naive,energy,std_higher]"
    original = strategies.StrategyCall.__call__

    def dies_at_energy(self, inputs):
        if self.name == "energy":
            raise KeyboardInterrupt
        return original(self, inputs)

    with monkeypatch.context() as patch:
        patch.setattr(strategies.StrategyCall, "__call__", dies_at_energy)
        with pytest.raises(KeyboardInterrupt):
            merge.main(merge_cfg(env, tmp_path, strategies=strategies_, seeds=[1]))
    cached = [r["strategy"] for r in read_rows(tmp_path / "merge" / "disjoint_mnist" / "seed1.jsonl")]
    assert cached == ["expert:first5_mnist", "expert:last5_mnist", "naive"]
    called = []

    def recording(self, inputs):
        called.append(self.label)
        return original(self, inputs)

    monkeypatch.setattr(strategies.StrategyCall, "__call__", recording)
    summary = merge.main(merge_cfg(env, tmp_path, strategies=strategies_, seeds=[1]))
    assert called == ["energy", "std_higher", "oracle"] and summary["reused"] == 3
    uninterrupted = merge.main(merge_cfg(env, tmp_path / "whole", strategies=strategies_, seeds=[1]))
    assert summary["acc"] == uninterrupted["acc"]


def test_labels_as_the_tables_print_them_are_accepted(env, tmp_path):
    printed = merge.main(merge_cfg(env, tmp_path, strategies="[naive,tta_mean(setting=flips)]", seeds=[1]))
    spelled = merge.main(merge_cfg(env, tmp_path / "b", strategies="[naive,{name: tta_mean, setting: flips}]",
                                   seeds=[1]))
    assert list(printed["acc"]) == list(spelled["acc"]) == ["naive", "tta_mean(setting=flips)", "oracle"]
    assert printed["acc"] == spelled["acc"]


def test_the_selection_half_is_seeded_and_stratified():
    domain = torch.tensor([0] * 11 + [1] * 6)
    mask = merge.selection_half(domain, "p")
    assert torch.equal(mask, merge.selection_half(domain, "p"))
    assert int(mask[domain == 0].sum()) == 5 and int(mask[domain == 1].sum()) == 3
    assert not torch.equal(mask, merge.selection_half(domain, "q"))


def test_multi_pass_noise_reaches_the_experts_in_their_sources_units(env, tmp_path, monkeypatch):
    units = []
    original = merge.apply_augment

    def recording(name, x, generator, unit=None, **params):
        units.append((name, unit))
        return original(name, x, generator, unit, **params)

    monkeypatch.setattr(merge, "apply_augment", recording)
    merge.main(merge_cfg(env, tmp_path, strategies="[{name: tta_mean, setting: gaussian_1}]", seeds=[1]))
    assert units and all(unit == (0.3081,) for name, unit in units)  # MNIST's std: one normalised unit



def test_stacked_seeds_give_the_rows_of_each_seed_alone(env, tmp_path):
    """All seeds' experts run as one stacked network (each seed on its own augmented copies) give every seed
    the rows it gets alone."""
    strategies_ = ("[naive,energy,{name: tta_mean, setting: gaussian_5},{name: tta_voting, setting: poisson_1},"
                   "{name: tta_mean, setting: random_resized_crop}]")
    stacked = read_rows(merge.main(merge_cfg(env, tmp_path / "a", strategies=strategies_))["outputs"]["jsonl"])
    alone = read_rows(merge.main(merge_cfg(env, tmp_path / "b", "stack_seeds=false",
                                           strategies=strategies_))["outputs"]["jsonl"])
    assert len(stacked) == len(alone)
    for a, b in zip(stacked, alone):
        assert a["strategy"] == b["strategy"] and a["seed"] == b["seed"]
        assert a["acc"] == pytest.approx(b["acc"], abs=2 / a["n"]), a["strategy"]  # a near tie may flip a sample
        if a["kind"] == "strategy":
            assert a["stacked_seeds"] == len(SEEDS) and b["stacked_seeds"] == 1


# ---------------------------------------------------------------- issue 28: progress and tables that keep rows

def test_merge_names_each_rule_in_its_progress_lines(env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # stderr is pytest's capture, no terminal: one line per finished rule
    merge.main(merge_cfg(env, tmp_path, seeds=[1]))
    lines = capsys.readouterr().err.splitlines()
    for n, label in enumerate(LABELS, start=1):
        assert any(line.startswith(f"disjoint_mnist seed 1: {n}/{len(LABELS)} rule done in ")
                   and line.endswith(f": {label}") for line in lines), (label, lines)


def test_a_second_run_with_other_rules_keeps_the_earlier_rows_of_the_same_settings(env, tmp_path, capsys):
    merge.main(merge_cfg(env, tmp_path, strategies="[naive,energy]"))
    summary = merge.main(merge_cfg(env, tmp_path, strategies="[std_lower]"))
    out = capsys.readouterr().out
    rows = read_rows(summary["outputs"]["jsonl"])
    for seed in SEEDS:
        assert set(by_label(rows, seed)) == {*(f"expert:{t}" for t in TASKS), "std_lower", "oracle", "naive", "energy"}
    assert summary["earlier_rows"] == {"kept": 2 * len(SEEDS), "replaced": 0}
    assert f"kept {2 * len(SEEDS)} rows of earlier runs of this table with the same problem and settings: " \
           "naive, energy" in out
    report = Path(summary["outputs"]["report"]).read_text()
    assert "energy" in report and "std_lower" in report

    # other settings (another test subset) make another table: the earlier rows are replaced, and it says so
    other = merge.main(merge_cfg(env, tmp_path, "test_limit=20", strategies="[naive]"))
    assert other["earlier_rows"] == {"kept": 0, "replaced": 2 * len(SEEDS)}  # std_lower and energy
    assert "replaced 4 rows of an earlier run of this table (they were made with other settings" in \
           capsys.readouterr().out
    # the pipeline's tables hold exactly their YAML's rules
    assert merge.main(merge_cfg(env, tmp_path, "keep_rows=false", strategies="[std_lower]"))["earlier_rows"] == \
        {"kept": 0, "replaced": len(SEEDS)}


def test_ad_hoc_runs_write_under_an_ignored_folder():
    assert {MergeConfig().results_dir, TrainConfig().results_dir, config.GanConfig().results_dir,
            config.PanConfig().results_dir} == {"runs"}
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().splitlines()
    assert "/runs/" in ignored


# ---------------------------------------------------------------- experts of unequal class counts

UNEQUAL = ["naive", "max_softmax", "energy", "neg_entropy", "gen", "odin", "ash", "scale", "std_higher", "ratio",
           "max_logit", "thirdQ_original"]


def test_a_5_and_a_2_class_expert_through_merge(tmp_path, monkeypatch):
    """mnist5_cifar2 (first5_mnist beside airplane vs automobile) on a fake root: every rule whose scores chance.py
    measures from each expert's chance level runs and routes every image; thirdQ, which assumes one class count,
    is refused in one line before any data is read."""
    data._load_cached.cache_clear()
    root, ckpt = tmp_path / "data", tmp_path / "ckpt"
    make_data_root(root, n_train=200, n_test=40, n_cifar=20)
    for task in ("first5_mnist", "cifar2"):
        train_source_networks.main(parse_args(TrainConfig, [
            f"dataset={task}", "seeds=[1]", *EXPERT, "device=cpu", f"data_dir={root}", f"ckpt_dir={ckpt}",
            f"results_dir={tmp_path / 'train'}"]))
    common = ["problem=mnist5_cifar2", "seeds=[1]", f"data_dir={root}", f"ckpt_dir={ckpt}", "device=cpu", *EXPERT]
    summary = merge.main(parse_args(MergeConfig, [*common, f"results_dir={tmp_path / 'results'}",
                                                  f"strategies=[{','.join(UNEQUAL)}]"]))
    rows = {r.get("rule", r["strategy"]): r for r in read_rows(summary["outputs"]["jsonl"])}
    n = rows["oracle"]["n"]
    assert n == 20 + 4  # 20 test digits 0-4 and 4 CIFAR-10 test images of classes 0 and 1
    assert rows["oracle"]["routing_counts"] == {"first5_mnist": 20, "cifar2": 4}
    for label in UNEQUAL:
        assert sum(rows[label]["routing_counts"].values()) == n and 0 <= rows[label]["acc"] <= 1
    # max_logit compares raw logits (flat logits score alike for any class count): still naive's routes
    assert rows["max_logit"]["routing_counts"] == rows["naive"]["routing_counts"]
    data._load_cached.cache_clear()

    monkeypatch.setattr(merge, "build_problem", lambda *a, **k: (_ for _ in ()).throw(Forbidden("no data")))
    with pytest.raises(ConfigError, match=r"strategy 'thirdQ' assumes experts of one class count.*\[5, 2\].*"
                                          r"thirdQ_original") as caught:
        merge.main(parse_args(MergeConfig, [*common, f"results_dir={tmp_path / 'again'}", "strategies=[thirdQ]"]))
    assert "\n" not in str(caught.value) and not (tmp_path / "again").exists()
