"""experiments/reproduce.py: profiles and their plans, the generated batch scripts, and the whole
pipeline end to end on a tiny fake data root, including resume after a stage's outputs are deleted."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import config
from common import read_rows
from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "experiments" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up by name
spec.loader.exec_module(reproduce)

PROFILES = sorted(p.stem for p in (REPO_ROOT / "experiments" / "profiles").glob("*.yaml"))


def test_the_three_profiles_exist():
    assert {"quick", "cpu", "paper"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_plans_in_pipeline_order(profile):
    cfg = reproduce.load_config([f"profile={profile}"])
    steps = reproduce.plan(cfg)
    stages = [s.stage for s in steps]
    assert stages == sorted(stages, key=list(reproduce.STAGES).index)
    problems = config.MergeConfig().problems
    needed = {f"{e.task} {e.arch}" for p in cfg.problems for e in problems[p].experts}
    assert {s.label for s in steps if s.stage == "experts"} == needed
    assert [s.label for s in steps if s.stage == "merge"] == list(cfg.tables)


def test_profiles_differ_in_seeds_and_places():
    quick, paper = (reproduce.load_config([f"profile={p}"]) for p in ("quick", "paper"))
    assert 2 <= len(quick.seeds) <= 3 and paper.seeds == config.PAPER_SEEDS
    assert quick.ckpt_dir != paper.ckpt_dir and quick.results_dir != paper.results_dir


@pytest.mark.parametrize("profile", PROFILES)
def test_committed_batch_script_matches_the_profile(profile):
    cfg = reproduce.load_config([f"profile={profile}"])
    path = reproduce.script_path(profile)
    assert path.is_file(), f"run: python experiments/reproduce.py profile={profile} write_script=true"
    assert path.read_text() == reproduce.render_script(cfg, reproduce.plan(cfg)), (
        f"{path.name} is out of date; regenerate it with: python experiments/reproduce.py "
        f"profile={profile} write_script=true")


def test_key_value_arguments_override_the_profile():
    cfg = reproduce.load_config(["profile=quick", "seeds=[1]", "only_problems=[disjoint_mnist]"])
    assert cfg.seeds == [1] and cfg.profile == "quick"
    steps = reproduce.plan(cfg)
    assert {s.label for s in steps if s.stage == "experts"} == {"first5_mnist lenet5", "last5_mnist lenet5"}
    # tables of other problems, and the universal table that needs mnist_cifar10's gates, drop out
    assert [s.label for s in steps if s.stage == "merge"] == [
        "logit_rules_disjoint_mnist", "multipass_disjoint_mnist", "gates_disjoint_mnist"]


@pytest.mark.parametrize("argv, message", [
    (["profile=nope"], "unknown profile 'nope'; choices: "),
    (["only_problems=[nope]"], "unknown problem(s) ['nope']"),
    (["experts=[epochz=2]"], "did you mean 'epochs'"),
    (["problems={disjoint_mnist: {gann: []}}"], "unknown key(s) ['gann']"),
])
def test_bad_arguments_stop_before_any_work(argv, message):
    with pytest.raises(config.ConfigError, match=None) as err:
        reproduce.plan(reproduce.load_config(argv))
    assert message in str(err.value)


def test_a_table_whose_problem_is_not_run_is_an_error():
    cfg = reproduce.load_config(["profile=quick"])
    cfg.problems.pop("mnist_cifar10")
    with pytest.raises(config.ConfigError, match="needs problem"):
        reproduce.plan(cfg)


def test_reused_steps_keep_the_time_their_work_took():
    earlier = [{"stage": "experts", "step": "a", "seed": 1, "wall_s": 30.0, "reused": False, "device": "cpu"}]
    now = [{"stage": "experts", "step": "a", "seed": 1, "wall_s": 0.1, "reused": True, "device": "cpu"},
           {"stage": "experts", "step": "b", "seed": 1, "wall_s": 0.2, "reused": True, "device": "cpu"}]
    kept = reproduce.keep_work_timings(earlier, now)
    assert [t["wall_s"] for t in kept] == [30.0, 0.2]


# ---------------------------------------------------------------- end to end on a tiny fake root

TINY_TABLES = ["logit_rules_disjoint_mnist", "multipass_disjoint_mnist", "gates_disjoint_mnist",
               "universal_mnist_cifar10"]


def tiny_config(root: Path, tmp_path: Path, **changes) -> config.ReproduceConfig:
    cfg = config.ReproduceConfig(
        profile="tiny", seeds=[1, 2],
        experts=["experiments/experts.yaml", "epochs=1", "train_limit=120"],
        gan=["epochs=1", "iters_per_epoch=2", "batch_size=8", "width=8", "eval_samples=16"],
        pan=["epochs=1", "synthetic_samples=24", "noise_samples=24"],
        problems={"disjoint_mnist": {}, "mnist_cifar10": {"pan": ["gate_types=[universal]", "regimes=[real,synthetic]"]}},
        tables={t: [] for t in TINY_TABLES},
        scaling={"tiny series": ["disjoint_mnist", "mnist_cifar10"]},
        data_dir=str(root), ckpt_dir=str(tmp_path / "ckpt"), results_dir=str(tmp_path / "results"), device="cpu")
    return dataclasses.replace(cfg, **changes)  # replaces whole mappings (overrides would merge them)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.pt"))}


def test_pipeline_end_to_end_then_resume_after_deleting_a_stage(make_fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may depend on starting in the repository
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=12).root
    cfg = tiny_config(root, tmp_path)
    summary = reproduce.main(cfg)

    results, ckpt = tmp_path / "results", tmp_path / "ckpt"
    report = (results / "report.md").read_text()
    for section in ("## Best rule of each family", "## Scaling with the number of experts", "## Experts",
                    "## Data-free generators", "## Gate membership", "### gates_disjoint_mnist",
                    "| setting | tta_mean | tta_voting |", "## Wall time"):
        assert section in report
    assert summary["outputs"]["report"] == str(results / "report.md")
    steps = reproduce.plan(cfg)
    timings = read_rows(results / "timings.jsonl")
    assert len(timings) == len(steps) * len(cfg.seeds) and not any(t["reused"] for t in timings)
    # each stage's result file holds every seed, not just the last one run
    assert sorted({r["seed"] for r in read_rows(results / "merge" / "gates_disjoint_mnist.jsonl")}) == [1, 2]
    assert sorted(r["seed"] for r in read_rows(results / "experts" / "first5_mnist_lenet5.jsonl")) == [1, 2]
    families = {r["family"] for r in read_rows(results / "families.jsonl")}
    assert {"oracle (bound)", "logit statistics", "multi-pass mean", "gates, data-free",
            "universal gate, data-free, unseen experts"} <= families
    assert summary["outputs"]["figures"] == {"families": "figures/families.png",
                                             "gan_samples": "figures/gan_samples.png"}
    for name in summary["outputs"]["figures"].values():
        assert (results / name).read_bytes()[:4] == b"\x89PNG"

    before = mtimes(ckpt)
    for path in (ckpt / "generators").glob("first5_mnist_*"):
        path.unlink()  # the interruption: one expert's generators are gone
    reproduce.main(cfg)
    after = mtimes(ckpt)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed, "the deleted generators were not rebuilt"
    # the generators and the gates trained on their samples (data-free and noise regimes) are redone
    downstream = ("gates/disjoint_mnist/synthetic", "gates/disjoint_mnist/noise")
    assert all(k.startswith(("generators/first5_mnist", *downstream)) for k in changed), changed
    assert all(any(k.startswith(d) for k in changed) for d in downstream)
    assert not any(k.startswith(("experts/", "gates/disjoint_mnist/real", "gates/mnist_cifar10")) for k in changed)
    timings = {(t["stage"], t["step"], t["seed"]): t for t in read_rows(results / "timings.jsonl")}
    assert not timings[("generators", "disjoint_mnist", 1)]["reused"]
    assert timings[("experts", "mnist lenet5", 1)]["wall_s"] > 0


def test_report_only_rebuilds_the_report_without_running_stages(make_fake_root, tmp_path, monkeypatch):
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=12).root
    cfg = tiny_config(root, tmp_path, problems={"disjoint_mnist": {}}, tables={"logit_rules_disjoint_mnist": []},
                      scaling={})
    reproduce.main(cfg)
    (tmp_path / "results" / "report.md").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("report_only must not run a stage")

    monkeypatch.setattr(reproduce, "run_step", forbidden)
    reproduce.main(dataclasses.replace(cfg, report_only=True))
    report = (tmp_path / "results" / "report.md").read_text()
    assert "### logit_rules_disjoint_mnist (disjoint_mnist)" in report


def test_a_failing_stage_names_the_step(make_fake_root, tmp_path):
    root = make_fake_root(squares=True, n_cifar=0).root  # no CIFAR-10 files
    cfg = tiny_config(root, tmp_path, problems={"mnist_cifar10": {}}, tables={}, scaling={})
    with pytest.raises(Exception) as err:
        reproduce.main(cfg)
    assert "experts step 'cifar10 lenet5'" in str(err.value)


def test_summary_line_is_json(make_fake_root, tmp_path, capsys):
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=0).root
    cfg = tiny_config(root, tmp_path, problems={"disjoint_mnist": {}}, tables={"logit_rules_disjoint_mnist": []},
                      scaling={}, seeds=[3])
    reproduce.main(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("report: ")
    assert json.loads(lines[-1])["profile"] == "tiny"
