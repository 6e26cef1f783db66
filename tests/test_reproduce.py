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
    parents = {s.label for s in reproduce.fusion_steps(cfg) if s.stage == "experts"}
    assert {s.label for s in steps if s.stage == "experts"} == needed | parents
    assert [s.label for s in steps if s.stage == "merge"] == [*cfg.tables, *cfg.fusion]
    assert all(s.fusion for s in steps if s.label in parents or s.label in cfg.fusion)


def test_profiles_differ_in_seeds_budgets_and_results():
    quick, cpu, paper = (reproduce.load_config([f"profile={p}"]) for p in ("quick", "cpu", "paper"))
    assert 2 <= len(quick.seeds) <= 3 and paper.seeds == config.PAPER_SEEDS
    assert quick.results_dir != paper.results_dir
    # the paper profile is config.py's budgets (its gates only standardise the detector gate on another source)
    assert (paper.expert, paper.dafl) == (config.ExpertTraining(), config.DaflTraining())
    assert paper.gate == config.GateTraining(detector_stats="synthetic:inversion")
    assert quick.expert.epochs == 2 and cpu.expert == config.ExpertTraining()


def test_cpu3_profile_is_the_cpu_profile_at_a_third_seed_without_generators():
    """cpu3's rows must be comparable with cpu's: the same budgets and recipe files, cpu's seeds first, and no
    generators step (it trains real-data gates only, and a generators step with nothing to make would stop it)."""
    cpu, cpu3 = (reproduce.load_config([f"profile={p}"]) for p in ("cpu", "cpu3"))
    assert cpu3.seeds[:2] == cpu.seeds and len(cpu3.seeds) == 3
    assert (cpu3.expert, cpu3.dafl, cpu3.inversion, cpu3.gate) == (cpu.expert, cpu.dafl, cpu.inversion, cpu.gate)
    # the same parents' recipes; only a table's own arguments (fusion_kd's wider T sweep) may differ
    assert all(cpu3.fusion[t]["files"] == cpu.fusion[t]["files"] for t in cpu3.fusion)
    assert set(cpu3.tables) <= set(cpu.tables)
    steps = reproduce.plan(cpu3)
    assert not [s for s in steps if s.stage == "generators"]
    assert {s.label for s in steps if s.stage == "gates"} == set(cpu3.problems)


def test_cpu_profile_generators_are_the_cpu_budget_file():
    cpu = reproduce.load_config(["profile=cpu"])
    assert cpu.dafl == config.parse_args(config.GanConfig, [str(REPO_ROOT / "experiments" / "gan_cpu.yaml")]).dafl


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_repeat_no_default(profile):
    """A profile holds only what differs from config.py's defaults, so editing a default reaches the pipeline."""
    raw = config.load_yaml(REPO_ROOT / "experiments" / "profiles" / f"{profile}.yaml")
    for name, section in config.SECTIONS.items():
        repeated = {k: v for k, v in raw.get(name, {}).items() if getattr(section(), k) == v}
        assert not repeated, f"{profile}.yaml repeats defaults of {name}: {repeated}"


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
        "logit_rules_disjoint_mnist", "multipass_disjoint_mnist", "gates_disjoint_mnist", "synthesis_disjoint_mnist",
        "detectors_disjoint_mnist", "fewshot_disjoint_mnist"]


@pytest.mark.parametrize("argv, message", [
    (["profile=nope"], "unknown profile 'nope'; choices: "),
    (["only_problems=[nope]"], "unknown problem(s) ['nope']"),
    (["expert.epochz=2"], "did you mean 'epochs'"),
    (["expert.epochs=-1"], "expert.epochs=-1 is out of range"),
    (["seeds=[]"], "seeds is empty"),
    (["device=gpu"], "is not a device"),
    (["problems={disjoint_mnist: {gann: []}}"], "unknown key(s) ['gann']"),
    (["fusion={fusion_quick: {merges: []}}"], "unknown key(s) ['merges']; choices: files, merge, gan, pan"),
])
def test_bad_arguments_stop_before_any_work(argv, message):
    with pytest.raises(config.ConfigError, match=None) as err:
        reproduce.plan(reproduce.load_config(argv))
    assert message in str(err.value)


def test_a_step_may_not_change_a_settings_section():
    cfg = reproduce.load_config(["profile=quick", "problems={disjoint_mnist: {pan: [gate.epochs=4]}}",
                                 "only_problems=[disjoint_mnist]"])
    with pytest.raises(config.ConfigError, match="set settings sections in the profile"):
        reproduce.plan(cfg)


def test_a_table_whose_problem_is_not_run_is_an_error():
    cfg = reproduce.load_config(["profile=quick"])
    cfg.problems.pop("mnist_cifar10")
    with pytest.raises(config.ConfigError, match="needs problem"):
        reproduce.plan(cfg)


def test_a_fusion_entry_passes_its_merge_arguments_to_the_table_step_alone():
    """cpu3 widens fusion_kd's sweep to three temperatures (issue 30) through `merge`; the parents' steps must not
    see it, and the table's file must not win over it."""
    steps = reproduce.plan(reproduce.load_config(["profile=cpu3"]))
    table = [s for s in steps if s.stage == "merge" and s.label == "fusion_kd"]
    assert len(table) == 1
    assert table[0].args.index("experiments/fusion_kd.yaml") < [
        i for i, a in enumerate(table[0].args) if a.startswith("strategies=")][0]
    swept = reproduce.parse_strategies(reproduce.parse_step(table[0], [1]).strategies)
    assert {c.param("kd_temperature") for c in swept if c.name == "distil"} == {2.0, 4.0, 8.0}
    # the override repeats fusion_kd.yaml's rule list: it must stay that list with T widened, or cpu3's table would
    # drift from cpu's silently when the file changes
    plain = reproduce.parse_strategies(config.load_yaml(REPO_ROOT / "experiments" / "fusion_kd.yaml")["strategies"])
    assert {c.label for c in swept if c.name != "distil" or c.param("kd_temperature") == 4.0} == {c.label for c in plain}
    parents = [s for s in steps if s.stage == "experts" and "vgg" in s.label and "fusion_cnn_full" in " ".join(s.args)]
    assert parents and not any(a.startswith("strategies=") for s in parents for a in s.args)


def test_the_quick_profile_has_a_small_residual_fusion_table():
    """Its parents train on 5,000 images at the profile's 2 epochs with the residual recipe's lr (the file's
    settings, then the profile's sections), and merge reads the same recipe, so it finds them."""
    cfg = reproduce.load_config(["profile=quick"])
    steps = [s for s in reproduce.plan(cfg) if s.fusion and "fusion_resnet_small.yaml" in " ".join(s.args)]
    assert [s.stage for s in steps] == ["experts", "experts", "merge"] and steps[-1].label == "fusion_resnet_quick"
    train = reproduce.parse_step(steps[0], cfg.seeds, reproduce.shared_args(cfg, "experts", cfg.seeds, False))
    assert (train.expert.epochs, train.expert.train_limit, train.expert.lr) == (2, 5000, 0.05)
    assert train.arch == "resnet" and train.arch_kwargs["depth"] == 18
    table = reproduce.parse_step(steps[-1], cfg.seeds, reproduce.shared_args(cfg, "merge", cfg.seeds, False))
    assert table.expert == train.expert and table.test_limit == 1000


def test_reused_steps_keep_the_time_their_work_took():
    earlier = [{"stage": "experts", "step": "a", "seeds": [1], "wall_s": 30.0, "reused": False, "device": "cpu"}]
    now = [{"stage": "experts", "step": "a", "seeds": [1], "wall_s": 0.1, "reused": True, "device": "cpu"},
           {"stage": "experts", "step": "b", "seeds": [1], "wall_s": 0.2, "reused": True, "device": "cpu"}]
    kept = reproduce.keep_work_timings(earlier, now)
    assert [t["wall_s"] for t in kept] == [30.0, 0.2]


# ---------------------------------------------------------------- end to end on a tiny fake root

TINY_TABLES = ["logit_rules_disjoint_mnist", "multipass_disjoint_mnist", "gates_disjoint_mnist",
               "synthesis_disjoint_mnist", "universal_mnist_cifar10"]


def tiny_config(root: Path, tmp_path: Path, **changes) -> config.ReproduceConfig:
    cfg = config.ReproduceConfig(
        profile="tiny", seeds=[1, 2], synthesizers=["dafl", "inversion", "dafl+inversion"],
        inversion=config.InversionSettings(images=16, steps=2, batch_size=16),
        expert=config.ExpertTraining(epochs=1, train_limit=120),
        dafl=config.DaflTraining(epochs=1, iters_per_epoch=2, batch_size=8, width=8, images=24),
        gate=config.GateTraining(epochs=1, noise_samples=24, detector_stats="synthetic:inversion"),
        problems={"disjoint_mnist": {},
                  "mnist_cifar10": {"pan": ["gate_types=[universal,detectors]", "regimes=[real,synthetic]"]}},
        tables={t: [] for t in TINY_TABLES},
        scaling={"tiny series": ["disjoint_mnist", "mnist_cifar10"]},
        data_dir=str(root), ckpt_dir=str(tmp_path / "ckpt"), results_dir=str(tmp_path / "results"), device="cpu")
    return dataclasses.replace(cfg, **changes)  # replaces whole mappings (overrides would merge them)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.pt"))}


def test_pipeline_end_to_end_then_resume_after_deleting_a_stage(make_fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may depend on starting in the repository
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=12).root
    tables = {**{t: [] for t in TINY_TABLES}, "detectors_disjoint_mnist": [], "fewshot_disjoint_mnist": [
        "strategies=[naive, {name: [energy, knn], stats: [real:10, real:50]}, {name: gate_hard, gate: feature, "
        "regime: real}]"]}
    cfg = tiny_config(root, tmp_path, fusion={"fusion_noniid2": {}}, tables=tables,
                      targets=[{"problem": "disjoint_mnist", "best": "best data-free rule", "than": "naive", "by": 2},
                               {"problem": "mnist_dir2_mlp", "best": "fusion: neuron interpolation",
                                "than": "fusion: OTFusion", "by": 0}])
    summary = reproduce.main(cfg)

    results, ckpt = tmp_path / "results", tmp_path / "ckpt"
    # every synthesizer's sets, and gates of each synthesizer and of the mixture
    assert {p.parent.name for p in (ckpt / "synthetic").rglob("*.pt")} == {"dafl", "inversion"}
    assert {"synthetic_dafl", "synthetic_inversion", "synthetic_dafl+inversion"} <= {
        p.name for p in (ckpt / "gates" / "disjoint_mnist").iterdir()}
    report = (results / "report.md").read_text()
    for section in ("## Best rule of each family", "## Scaling with the number of experts", "## Experts",
                    "## How much real data does routing need", "## Detectors: the same detector with statistics",
                    "### detectors_disjoint_mnist (disjoint_mnist)",
                    "## Data-free synthesis", "## Why a synthetic set transfers", "## Gate membership",
                    "### gates_disjoint_mnist",
                    "| setting | tta_mean | tta_voting |", "## Wall time"):
        assert section in report
    assert summary["outputs"]["report"] == str(results / "report.md")
    steps = reproduce.plan(cfg)
    timings = read_rows(results / "timings.jsonl")
    assert len(timings) == len(steps) and not any(t["reused"] for t in timings)  # every step: all seeds at once
    # each stage's result file holds every seed, not just the last one run
    assert sorted({r["seed"] for r in read_rows(results / "merge" / "gates_disjoint_mnist.jsonl")}) == [1, 2]
    assert sorted(r["seed"] for r in read_rows(results / "experts" / "first5_mnist_lenet5.jsonl")) == [1, 2]
    families = {r["family"] for r in read_rows(results / "families.jsonl")}
    assert {"oracle (bound)", "logit statistics", "multi-pass mean", "gates, data-free", "data-free calibration",
            "universal gate, data-free, unseen experts"} <= families
    # the fusion table ran in the same pipeline: its parents, then the table, picked on the selection half
    assert {"mnist_dir2_p0 mlp-2d99de32", "mnist_dir2_p1 mlp-2d99de32"} <= {s.label for s in reproduce.plan(cfg)}
    fusion_families = {r["family"] for r in read_rows(results / "families.jsonl") if r["problem"] == "mnist_dir2_mlp"}
    assert {"fusion: OTFusion", "fusion: neuron interpolation", "ensembles"} <= fusion_families
    # the answer and the targets are written by code, from picks on the selection half
    answer, _, target_lines = (results / "answer.md").read_text().partition("## Targets")
    assert "| `disjoint_mnist` |" in answer and "| `mnist_cifar10` |" in answer and "mnist_dir2_mlp" not in answer
    assert "| `mnist_dir2_mlp` | at least +0 points |" in target_lines
    targets = read_rows(results / "targets.jsonl")
    assert [t["problem"] for t in targets] == ["disjoint_mnist", "mnist_dir2_mlp"]
    assert all(t["met"] in (True, False) and t["best_rule"] for t in targets)
    assert summary["outputs"]["figures"] == {"training_experts": "figures/training_experts.png",
                                             "training_generators": "figures/training_generators.png",
                                             "training_gates": "figures/training_gates.png",
                                             "families": "figures/families.png",
                                             "samples_dafl": "figures/samples_dafl.png",
                                             "samples_inversion": "figures/samples_inversion.png",
                                             "msp_disjoint_mnist": "figures/msp_disjoint_mnist.png",
                                             "msp_mnist_cifar10": "figures/msp_mnist_cifar10.png",
                                             "real_data_disjoint_mnist": "figures/real_data_disjoint_mnist.png"}
    for name in summary["outputs"]["figures"].values():
        assert (results / name).read_bytes()[:4] == b"\x89PNG"

    before = mtimes(ckpt)
    for path in [*(ckpt / "generators").glob("first5_mnist_*"), *(ckpt / "synthetic").rglob("first5_mnist_*")]:
        path.unlink()  # the interruption: one expert's generators and synthetic sets are gone
    reproduce.main(cfg)
    after = mtimes(ckpt)
    changed = {k for k in before if after.get(k) != before[k]}
    # only the deleted files are made again; remade by the same recipe from the same expert, they hold the
    # same weights and images (digests), so the gates trained on them stay valid and are reused
    assert changed and all(k.startswith(("generators/first5_mnist", "synthetic/dafl/first5_mnist",
                                         "synthetic/inversion/first5_mnist")) for k in changed), changed
    assert set(after) == set(before)
    timings = {(t["stage"], t["step"]): t for t in read_rows(results / "timings.jsonl")}
    assert not timings[("generators", "disjoint_mnist")]["reused"]
    assert timings[("experts", "mnist lenet5")]["wall_s"] > 0


def retrained_differently(path: Path) -> None:
    """Stand in for a synthetic set made again with other images (same recipe): change one pixel."""
    import torch

    from synthesis import save_set

    stored = torch.load(path, weights_only=True)
    images = stored["images"].clone()
    images[0, 0, 0, 0] ^= 1
    save_set(path, images, {k: v for k, v in stored["meta"].items() if k != "digest"})


def test_a_retrained_upstream_file_makes_exactly_its_downstream_stale(make_fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=12).root
    cfg = tiny_config(root, tmp_path, problems={"disjoint_mnist": {}}, tables={"gates_disjoint_mnist": []},
                      scaling={}, seeds=[1])
    reproduce.main(cfg)
    ckpt = tmp_path / "ckpt"
    before = mtimes(ckpt)
    [remade] = (ckpt / "synthetic" / "dafl").glob("first5_mnist_*")
    retrained_differently(remade)
    summary_rows = read_rows(tmp_path / "results" / "merge" / "gates_disjoint_mnist.jsonl")
    reproduce.main(cfg)
    after = mtimes(ckpt)
    changed = {k for k in before if after.get(k) != before[k]}
    downstream = ("gates/disjoint_mnist/synthetic_dafl", "gates/disjoint_mnist/noise_dafl")
    assert all(k.startswith((str(remade.relative_to(ckpt)), *downstream)) for k in changed), changed
    assert all(any(k.startswith(d) for k in changed) for d in downstream)  # every data-free gate redone
    assert not any(k.startswith(("experts/", "gates/disjoint_mnist/real")) for k in changed)
    # the rows that read the redone gates are recomputed, the others reused
    rows = {r["strategy"]: r for r in read_rows(tmp_path / "results" / "merge" / "gates_disjoint_mnist.jsonl")}
    old = {r["strategy"]: r for r in summary_rows}
    for label, row in rows.items():
        reads_redone = "regime=synthetic" in label or "regime=noise" in label
        assert (row["key"] != old[label]["key"]) == reads_redone, label


def test_a_changed_default_reaches_the_pipeline_and_keeps_the_old_checkpoints(make_fake_root, tmp_path,
                                                                              monkeypatch):
    """Edit a default in config.py (here: expert epochs): the next run trains new experts beside the old ones;
    going back to the old default reuses the old files."""
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=0).root
    tiny = dict(problems={"disjoint_mnist": {"pan": ["regimes=[real]", "gate_types=[universal]"]}},
                tables={"logit_rules_disjoint_mnist": []}, scaling={}, seeds=[1])

    def run_with_default_epochs(epochs: int) -> dict[str, int]:
        monkeypatch.setattr(config.ExpertTraining, "__init__", _default(config.ExpertTraining, epochs=epochs))
        cfg = dataclasses.replace(tiny_config(root, tmp_path, **tiny), expert=config.ExpertTraining(train_limit=120))
        reproduce.main(cfg)
        return mtimes(tmp_path / "ckpt" / "experts")

    first = run_with_default_epochs(1)
    rows = read_rows(tmp_path / "results" / "experts" / "first5_mnist_lenet5.jsonl")
    second = run_with_default_epochs(2)
    assert set(first) < set(second) and all(second[k] == first[k] for k in first)  # old files untouched
    stored = {read_checkpoint_epochs(tmp_path / "ckpt" / "experts" / k) for k in second}
    assert stored == {1, 2}
    assert read_rows(tmp_path / "results" / "experts" / "first5_mnist_lenet5.jsonl") != rows
    third = run_with_default_epochs(1)
    assert third == second  # back to the old setting: everything reused, nothing retrained


def _default(cls, **defaults):
    """An __init__ for dataclass ``cls`` whose defaults are changed to ``defaults`` (an edit of config.py)."""
    original = cls.__init__

    def init(self, **kwargs):
        original(self, **{**defaults, **kwargs})
    return init


def read_checkpoint_epochs(path: Path) -> int:
    import torch

    return torch.load(path, weights_only=True)["meta"]["recipe"]["epochs"]


def test_deterministic_runs_give_identical_rows(make_fake_root, tmp_path):
    root = make_fake_root(squares=True, n_mnist_train=200, n_mnist_test=60, n_cifar=0).root
    tiny = dict(problems={"disjoint_mnist": {}}, tables={"gates_disjoint_mnist": [], "multipass_disjoint_mnist": []},
                scaling={}, seeds=[1], deterministic=True)
    rows = []
    for run in ("a", "b"):
        cfg = dataclasses.replace(tiny_config(root, tmp_path / run, **tiny))
        reproduce.main(cfg)
        rows.append({table: [stable(r, tmp_path / run) for r in read_rows(tmp_path / run / "results" / "merge" / f"{table}.jsonl")]
                     for table in tiny["tables"]})
    assert rows[0] == rows[1]


VOLATILE = ("time_s", "expert_time_s", "config", "config_digest")


def stable(row: dict, run_dir: Path) -> dict:
    """A row without its timings, and with the run's own folder taken out of paths."""
    text = json.dumps({k: v for k, v in row.items() if k not in VOLATILE}).replace(str(run_dir), "RUN")
    return json.loads(text)


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


@pytest.mark.parametrize("profile", ["quick", "cpu", "experiments/profiles/quick.yaml"])
def test_predict_takes_the_profile_that_made_the_experts_and_gates(profile):
    """profile=NAME (or its file) in predict.py finds the checkpoints make reproduce PROFILE=NAME made: the same
    expert and gate files as the pipeline's own steps, without rebuilding its overrides (issue 28, item 2)."""
    from artifacts import Layout, experts_of

    pipeline = reproduce.load_config([f"profile={Path(profile).stem}"])
    gates = next(s for s in reproduce.plan(pipeline) if s.stage == "gates" and s.label == "disjoint_mnist")
    stage = reproduce.parse_step(gates, pipeline.seeds, reproduce.shared_args(pipeline, "gates", pipeline.seeds,
                                                                              False))
    mine = config.parse_args(config.PredictConfig, ["problem=disjoint_mnist", f"profile={profile}"])
    seed = pipeline.seeds[0]
    for expert in experts_of(mine.problems["disjoint_mnist"]):
        assert Layout(mine).expert_path(expert, seed) == Layout(stage).expert_path(expert, seed)
    assert Layout(mine).gate_path("disjoint_mnist", "real", "universal", None, seed) == \
        Layout(stage).gate_path("disjoint_mnist", "real", "universal", None, seed)
    # the other arguments override the profile, wherever it stands
    assert config.parse_args(config.PredictConfig, ["expert.epochs=7", f"profile={profile}"]).expert.epochs == 7


def test_an_unknown_profile_in_predict_is_one_line_with_the_choices():
    with pytest.raises(config.ConfigError, match="unknown profile 'qiuck'; choices: .*quick"):
        config.parse_args(config.PredictConfig, ["profile=qiuck"])
