"""Weight-space fusion as merge strategies: shared-label problems, fusion rows, self-fusion, errors, experiments."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import config
import data
import merge
import problems
import train_source_networks as tsn
from artifacts import ExpertId, Layout
from common import CheckpointError, read_rows
from config import ConfigError, MergeConfig, TrainConfig, parse_args
from conftest import REPO_ROOT, SHARD_PROBLEMS_YAML, SHARD_TASKS_YAML, Forbidden, build_fake_root
from problems import Problem, build_problem
from strategies import NO_EXPERT, REGISTRY, Decision, MergeInputs, check_fusion, parse_strategies

SEED = 1
EXPERT = ["expert.epochs=1", "expert.batch_size=32", "expert.lr=0.05"]
WIDE, MID, DEEP = {"widths": [16]}, {"widths": [16, 8]}, {"widths": [16, 8, 8]}
PROBLEMS_YAML = SHARD_PROBLEMS_YAML + """\
  twice:  # one checkpoint as both parents
    shared_labels: true
    experts:
      - {task: s_p0, arch: mlp, arch_kwargs: {widths: [16]}}
      - {task: s_p0, arch: mlp, arch_kwargs: {widths: [16]}}
  depths:
    shared_labels: true
    experts:
      - {task: s_p0, arch: mlp, arch_kwargs: {widths: [16, 8, 8]}}
      - {task: s_p1, arch: mlp, arch_kwargs: {widths: [16, 8]}}
  lenets:
    shared_labels: true
    experts: [{task: s_p0}, {task: s_p1}]
  mixed:
    shared_labels: true
    experts: [{task: s_p0}, {task: s_p1, arch: mlp, arch_kwargs: {widths: [16]}}]
  vggs:
    shared_labels: true
    experts:
      - {task: s_p0, arch: vgg, arch_kwargs: {layers: [4, M, 6, 6, M], hidden: [8, 8]}}
      - {task: s_p1, arch: vgg, arch_kwargs: {layers: [4, M, 6, M], hidden: [8]}}
"""
# every fusion rule with every parameter value, beside two routing rules
FUSION = ("[vanilla_avg,{name: otfusion, cost: weight},{name: otfusion, cost: activation},hf,"
          "{name: kf_linear, importance: uniform},{name: kf_linear, importance: conductance},"
          "{name: kf_gradient, importance: uniform},{name: kf_gradient, importance: conductance},"
          "{name: clafusion, finetune_epochs: 0},{name: clafusion, finetune_epochs: 1},ensemble,ensemble_weighted,"
          "naive,energy]")
READS_SAMPLES = {"otfusion(cost=activation)", "hf(ridge=0.0)", "kf_linear(importance=uniform,ridge=0.0)",
                 "kf_linear(importance=conductance,ridge=0.0)", "kf_gradient(importance=uniform,ridge=0.0)",
                 "kf_gradient(importance=conductance,ridge=0.0)", "clafusion(finetune_epochs=0)",
                 "clafusion(finetune_epochs=1)"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fake MNIST root (squares whose position is the digit) and MLP parents on its two shards.

    1800 training images, 900 per shard, so self-fusion of a shard parent can read 850 samples of its
    own training set: more than the 784 inputs (+ bias), which makes the least-squares fits of
    neuron-interpolation fusion exact, so they give the parent back on every image, not only on the samples."""
    base = tmp_path_factory.mktemp("fusion_merge")
    fake = build_fake_root(base / "data", n_mnist_train=1800, n_mnist_test=100, squares=True, n_cifar=0)
    (base / "tasks.yaml").write_text(SHARD_TASKS_YAML)
    (base / "problems.yaml").write_text(PROBLEMS_YAML)
    for task, kwargs in (("s_p0", WIDE), ("s_p1", WIDE), ("s_p0", DEEP), ("s_p1", MID)):
        tsn.main(parse_args(TrainConfig, [
            str(base / "tasks.yaml"), f"dataset={task}", "arch=mlp", f"arch_kwargs={kwargs}", f"seeds=[{SEED}]",
            *EXPERT, "device=cpu", f"data_dir={fake.root}",
            f"ckpt_dir={base / 'ckpt'}", f"results_dir={base / 'train_results'}"]))
    yield {"base": base, "root": fake.root, "ckpt": base / "ckpt", "digits": torch.from_numpy(fake.mnist["test"][1])}
    data._load_cached.cache_clear()


def merge_cfg(env, results_dir, problem: str, strategies: str, *extra: str) -> MergeConfig:
    return parse_args(MergeConfig, [
        str(env["base"] / "tasks.yaml"), str(env["base"] / "problems.yaml"), f"problem={problem}",
        f"strategies={strategies}", f"seeds=[{SEED}]", f"data_dir={env['root']}", f"ckpt_dir={env['ckpt']}",
        f"results_dir={results_dir}", "device=cpu", *EXPERT, *extra])


def layout(env) -> Layout:
    return Layout(merge_cfg(env, env["base"], "shard", "[naive]"))


def rows_by_label(summary: dict) -> dict[str, dict]:
    return {r["strategy"]: r for r in read_rows(summary["outputs"]["jsonl"])}


def trained_acc(env, task: str, kwargs: dict) -> float:
    path = layout(env).expert_path(ExpertId(task, "mlp", kwargs), SEED)
    return torch.load(path, weights_only=True)["meta"]["row"]["test_acc"]


# ---------------------------------------------------------------- shared-label problems

def test_a_shared_label_problem_holds_the_test_set_once_with_identity_labels(env):
    cfg = merge_cfg(env, env["base"] / "unused", "shard", "[naive]")
    problem = build_problem("shard", cfg.problems["shard"], cfg.tasks, str(env["root"]))
    assert problem.shared_labels and problem.num_classes == 10
    assert torch.equal(problem.labels, env["digits"].long())  # all 100 test images, once
    assert [m.tolist() for m in problem.label_maps] == [list(range(10))] * 2
    assert problem.names == ["s_p0", "s_p1"]
    assert problem.arch_kwargs == [WIDE, WIDE]
    assert problem.expert_paths(layout(env), SEED) == [layout(env).expert_path(ExpertId(t, "mlp", WIDE), SEED)
                                                       for t in ("s_p0", "s_p1")]
    with pytest.raises(ValueError, match="owner_domain"):
        problem.domain  # noqa: B018 -- a routing domain does not exist here


def test_the_domain_of_a_sample_is_the_parent_owning_its_class(env):
    cfg = merge_cfg(env, env["base"] / "unused", "shard", "[naive]")
    problem = build_problem("shard", cfg.problems["shard"], cfg.tasks, str(env["root"]))
    counts = problem.class_counts(layout(env), SEED)
    assert counts.shape == (2, 10) and (counts[0, 5:] == 0).all() and (counts[1, :5] == 0).all()
    assert torch.equal(problem.owner_domain(counts), (env["digits"] >= 5).long())


def test_owner_domain_takes_the_most_data_and_breaks_ties_to_the_lowest_index():
    problem = Problem("p", ["a", "b", "c"], ["mlp"] * 3, [], [problems.Domain(torch.tensor([]), torch.tensor(
        [0, 1, 2, 3]), -1)], 4, {}, shared_labels=True)
    counts = torch.tensor([[5, 1, 3, 0],
                           [2, 7, 3, 0],
                           [1, 1, 1, 0]])
    assert problem.owner_domain(counts).tolist() == [0, 1, 0, 0]


def test_experts_of_one_task_get_distinct_names():
    problem = Problem("p", ["m", "m", "m", "x"], ["mlp"] * 4, [], [], 10, {},
                      arch_kwargs=[WIDE, MID, WIDE, {}])
    wide, mid = tsn.arch_tag("mlp", WIDE), tsn.arch_tag("mlp", MID)
    assert problem.names == [f"m_{wide}#0", f"m_{mid}", f"m_{wide}#2", "x"]


def test_shared_labels_need_one_label_space(tmp_path):
    cfg = parse_args(MergeConfig, ["problem=mixed", "problems.mixed.experts=[{task: mnist}, {task: first5_mnist}]",
                                   "problems.mixed.shared_labels=true"])
    with pytest.raises(ConfigError) as err:  # before any data is read: the root does not exist
        build_problem("mixed", cfg.problems["mixed"], cfg.tasks, str(tmp_path / "no_data"))
    assert "shared_labels" in str(err.value) and "first5_mnist" in str(err.value)


# ---------------------------------------------------------------- fusion rules through merge.py

@pytest.mark.pot
def test_every_fusion_rule_on_sharded_parents(env, tmp_path):
    summary = merge.main(merge_cfg(env, tmp_path, "shard", FUSION, "fusion_samples=50"))
    rows = rows_by_label(summary)
    digits = env["digits"]
    n0, n1 = int((digits < 5).sum()), int((digits >= 5).sum())
    experts = [rows["expert:s_p0"], rows["expert:s_p1"]]
    # a parent's own test set is the whole one, as the trainer scored it
    for row, task in zip(experts, ("s_p0", "s_p1")):
        assert row["acc"] == pytest.approx(trained_acc(env, task, WIDE), abs=1e-6)
    fusion_labels = [c.label for c in parse_strategies(config.parse_args(MergeConfig, [f"strategies={FUSION}"])
                                                       .strategies) if REGISTRY[c.name].fusion]
    assert len(fusion_labels) == 12
    for label in fusion_labels:
        row = rows[label]
        assert row["n"] == 100 and 0 <= row["acc"] <= 1
        assert row["routing_acc"] is None  # no sample was routed to an expert
        assert row["routing_counts"] == {"s_p0": 0, "s_p1": 0}
        assert row["fusion_samples"] == (50 if label in READS_SAMPLES else 0)
        assert 0 <= row["fuse_time_s"] <= row["time_s"]
        weighted = (n0 * row["acc_per_domain"]["s_p0"] + n1 * row["acc_per_domain"]["s_p1"]) / (n0 + n1)
        assert row["acc"] == pytest.approx(weighted, abs=1e-6)
    # fine-tuning read the union of the parents' training sets: the whole fake training set
    assert rows["clafusion(finetune_epochs=1)"]["finetune_images"] == 1800
    assert rows["clafusion(finetune_epochs=0)"]["finetune_images"] == 0
    # the oracle routes each digit to the parent that learnt it, as in disjoint_mnist
    oracle = rows["oracle"]
    assert oracle["routing_acc"] == 1.0 and oracle["routing_counts"] == {"s_p0": n0, "s_p1": n1}
    assert rows["naive"]["routing_acc"] is not None and 0 <= rows["naive"]["routing_acc"] <= 1
    report = Path(summary["outputs"]["report"]).read_text()
    assert "| vanilla_avg |" in report and "n/a" in report


@pytest.mark.pot
def test_the_issue_30_rules_write_their_rows_through_merge(env, tmp_path):
    """distil (its three starts), rebasin and the authors' KF-gradient run through merge.py like every fusion rule,
    and their rows say what they read: training images seen and epochs, fusion samples."""
    rules = ("[{name: distil, init: [fused, student, scratch], kd_epochs: 1},rebasin,"
             "{name: kf_gradient, variant: authors}]")
    rows = rows_by_label(merge.main(merge_cfg(env, tmp_path, "shard", rules, "fusion_samples=50")))
    for init, samples in (("fused", 50), ("student", 0), ("scratch", 0)):
        row = rows[f"distil(student=1,init={init},kd_epochs=1,kd_alpha=0.9,kd_temperature=4.0)"]
        assert 0 <= row["acc"] <= 1 and row["routing_acc"] is None
        assert row["kd_epochs"] == 1 and row["kd_images"] == 1800 and row["teacher"] == 0  # the whole training set
        assert row["fusion_samples"] == samples
    assert rows["rebasin(iterations=100)"]["fusion_samples"] == 0  # weight matching reads no image
    assert rows["kf_gradient(importance=uniform,ridge=0.0,variant=authors)"]["fusion_samples"] == 50


@pytest.mark.pot
def test_fusing_one_network_with_itself_gives_it_back(env, tmp_path):
    rules = ("[vanilla_avg,{name: otfusion, cost: weight},{name: otfusion, cost: activation},hf,kf_linear,ensemble,"
             "{name: otfusion, cost: activation, repair: true},rebasin]")
    summary = merge.main(merge_cfg(env, tmp_path, "twice", rules, "fusion_samples=850"))
    rows = rows_by_label(summary)
    name = f"s_p0_{tsn.arch_tag('mlp', WIDE)}"
    parent = trained_acc(env, "s_p0", WIDE)
    assert rows[f"expert:{name}#0"]["acc"] == rows[f"expert:{name}#1"]["acc"] == pytest.approx(parent, abs=1e-6)
    for label in ("vanilla_avg", "otfusion(cost=weight)", "otfusion(cost=activation)", "hf(ridge=0.0)",
                  "kf_linear(importance=uniform,ridge=0.0)", "ensemble", "otfusion(cost=activation,repair=True)",
                  "rebasin(iterations=100)"):
        assert rows[label]["acc"] == pytest.approx(parent, abs=1e-6), label
    assert rows["kf_linear(importance=uniform,ridge=0.0)"]["fusion_samples"] == 850
    # REPAIR of a network with itself changes nothing, and its row says so layer by layer
    repaired = rows["otfusion(cost=activation,repair=True)"]
    assert repaired["fusion_samples"] == 850 and len(repaired["repair_std_ratio_before"]) == len(WIDE["widths"])
    assert repaired["repair_std_ratio_before"] == pytest.approx([1.0] * len(WIDE["widths"]), abs=1e-5)
    assert repaired["repair_std_ratio_after"] == pytest.approx([1.0] * len(WIDE["widths"]), abs=1e-5)


@pytest.mark.pot
def test_self_fusion_predicts_exactly_like_the_parent(env):
    """Sharper than accuracy: the same prediction on every test image, including the digits the shard
    parent never saw (where what it answers is arbitrary)."""
    cfg = merge_cfg(env, env["base"] / "unused", "twice", "[naive]", "fusion_samples=850")
    problem = build_problem("twice", cfg.problems["twice"], cfg.tasks, str(env["root"]))
    models, formats = problem.load_experts(Layout(cfg), SEED, torch.device("cpu"))
    counts = problem.class_counts(Layout(cfg), SEED)
    fusion = merge.build_fusion_inputs(cfg, problem, models, formats, counts, SEED, torch.device("cpu"))
    assert len(fusion.samples) == 850  # more than the 785 unknowns of a first-layer neuron
    parent = fusion.predict(models[0])
    assert len(set(parent[env["digits"] >= 5].tolist())) > 1  # not one constant answer on the unseen digits
    inputs = MergeInputs([], problem.label_maps, fusion=fusion)
    for rule in ("vanilla_avg", "otfusion", {"name": "otfusion", "cost": "activation"}, "hf", "kf_linear",
                 "ensemble", "ensemble_weighted"):
        (call,) = parse_strategies([rule])
        assert torch.equal(call(inputs).pred, parent), call.label


def test_clafusion_fuses_parents_of_different_depths(env, tmp_path):
    rules = "[{name: clafusion, finetune_epochs: 0},{name: clafusion, finetune_epochs: 1},ensemble]"
    rows = rows_by_label(merge.main(merge_cfg(env, tmp_path, "depths", rules, "fusion_samples=50")))
    assert all(0 <= rows[label]["acc"] <= 1 for label in
               ("clafusion(finetune_epochs=0)", "clafusion(finetune_epochs=1)", "ensemble"))
    with pytest.raises(ValueError, match="clafusion"):  # parameter averaging needs one shape
        merge.main(merge_cfg(env, tmp_path / "avg", "depths", "[vanilla_avg]"))


def test_fusion_rows_are_cached_per_number_of_fusion_samples(env, tmp_path):
    first = merge.main(merge_cfg(env, tmp_path, "shard", "[kf_linear]", "fusion_samples=40"))
    again = merge.main(merge_cfg(env, tmp_path, "shard", "[kf_linear]", "fusion_samples=40"))
    assert first["made"] == 4 and again["made"] == 0  # the two parents' own rows, the rule and the oracle
    other = merge.main(merge_cfg(env, tmp_path, "shard", "[kf_linear]", "fusion_samples=30"))
    assert other["made"] == 1 and other["why_made"] == {"settings changed": 1}
    assert rows_by_label(other)["kf_linear(importance=uniform,ridge=0.0)"]["fusion_samples"] == 30


def test_fusion_samples_are_real_training_images_drawn_from_the_parents_data(env):
    cfg = merge_cfg(env, env["base"] / "unused", "shard", "[naive]", "fusion_samples=60")
    problem = build_problem("shard", cfg.problems["shard"], cfg.tasks, str(env["root"]))
    models, formats = problem.load_experts(Layout(cfg), SEED, torch.device("cpu"))
    counts = problem.class_counts(Layout(cfg), SEED)
    fusion = merge.build_fusion_inputs(cfg, problem, models, formats, counts, SEED, torch.device("cpu"))
    again = merge.build_fusion_inputs(cfg, problem, models, formats, counts, SEED, torch.device("cpu"))
    assert fusion.samples.shape == (60, 1, 32, 32) and torch.equal(fusion.samples, again.samples)
    train = data.load_task(config.TaskSpec("mnist"), "train", env["root"])
    pool = data.prepare_input(data.to_unit(train.images), formats[0]).flatten(1)
    # every sample is one of the training images; both shards contribute
    same = (fusion.samples.flatten(1)[:, None] == pool[None]).all(dim=2)  # [samples, training images]
    assert (same.sum(1) == 1).all()
    matches = same.int().argmax(1)
    assert len(set(matches.tolist())) == 60  # drawn without replacement
    assert {int(d) < 5 for d in train.labels[matches]} == {True, False}
    images, labels = fusion.training_data()
    assert len(images) == 1800 and torch.equal(torch.sort(labels).values, torch.sort(train.labels).values)


def test_a_fused_decision_routes_nothing():
    problem = Problem("p", ["a", "b"], ["mlp"] * 2, [torch.arange(3)] * 2, [], 3, {}, shared_labels=True)
    labels, domain = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1, 1])
    select = torch.tensor([True, False, True, False])
    scored = merge.score(Decision(torch.tensor([0, 1, 1, 2]), torch.full((4,), NO_EXPERT)), problem, labels, domain,
                         select)
    assert scored["acc"] == 0.75 and scored["routing_acc"] is None
    assert scored["routing_counts"] == {"a": 0, "b": 0}
    assert scored["acc_per_domain"] == {"a": 1.0, "b": 0.5}
    assert (scored["acc_select"], scored["acc_report"], scored["n_report"]) == (0.5, 1.0, 2)
    routed = merge.score(Decision(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1, 1])), problem, labels, domain,
                         select)
    assert routed["routing_acc"] == 0.75 and routed["routing_counts"] == {"a": 1, "b": 3}


def test_fusion_rows_are_keyed_by_every_module_of_fusion():
    """A fusion row's key covers the whole package: a module moved or added under fusion/ must stay in the key."""
    modules = {f"fusion/{path.name}" for path in (REPO_ROOT / "fusion").glob("*.py")}
    for name, strategy in REGISTRY.items():
        if strategy.fusion is not None:
            assert modules <= set(strategy.code), (name, sorted(modules - set(strategy.code)))
            assert all((REPO_ROOT / path).is_file() for path in strategy.code), name


# ---------------------------------------------------------------- clear errors before any work

def forbid_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise Forbidden("no data may be loaded")

    monkeypatch.setattr(merge, "build_problem", forbidden)
    monkeypatch.setattr(merge, "plan_seed", forbidden)


@pytest.mark.parametrize("problem, rule, words", [
    ("disjoint_mnist", "vanilla_avg", ["shared_labels: true", "routing problem"]),
    ("disjoint_mnist", "ensemble", ["shared_labels: true"]),
    ("mixed", "kf_linear", ["one of the archs", "lenet5", "mlp", "all the same", "ensemble"]),
    ("mixed", "otfusion", ["one of the archs"]),
])
def test_fusion_rules_refuse_problems_they_cannot_fuse(env, tmp_path, monkeypatch, problem, rule, words):
    forbid_work(monkeypatch)
    with pytest.raises(ConfigError) as err:
        merge.main(merge_cfg(env, tmp_path, problem, f"[{rule}]"))
    assert all(word in str(err.value) for word in [repr(rule), *words])
    assert not (tmp_path / "merge").exists()


def test_missing_parents_name_the_command_with_their_arch_kwargs(env, tmp_path):
    with pytest.raises(CheckpointError) as err:
        merge.main(merge_cfg(env, tmp_path, "twice", "[vanilla_avg]", f"ckpt_dir={tmp_path / 'empty'}"))
    (command,) = [line.strip() for line in str(err.value).splitlines() if "train_source_networks.py" in line]
    files = f"{env['base'] / 'tasks.yaml'} {env['base'] / 'problems.yaml'}"  # the hint repeats the YAML files read
    assert command.startswith(f"python train_source_networks.py {files} dataset=s_p0 arch=mlp arch_kwargs=")
    assert f"seeds=[{SEED}] expert.epochs=1" in command  # one checkpoint serves both parents: named once
    kwargs = command.split("arch_kwargs=")[1].split("' ")[0].strip("'")
    assert parse_args(TrainConfig, [f"arch_kwargs={kwargs}"]).arch_kwargs == WIDE


def test_hf_refuses_more_than_two_parents():
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / "fusion_parents.yaml"),
                                   str(REPO_ROOT / "experiments" / "fusion_noniid4.yaml")])
    with pytest.raises(ConfigError, match="exactly 2"):
        check_fusion(parse_strategies(["hf"])[0], cfg.problem, cfg.problems[cfg.problem])


@pytest.mark.pot
def test_convolutional_parents_fuse_through_merge(env, tmp_path):
    """LeNet5 parents on the two shards go through every fusion rule that fits parents of one shape; VGGs of two
    depths through CLAFusion; each parent alone is a row of its own."""
    for task in ("s_p0", "s_p1"):
        tsn.main(parse_args(TrainConfig, [
            str(env["base"] / "tasks.yaml"), f"dataset={task}", f"seeds=[{SEED}]", *EXPERT,
            "device=cpu", f"data_dir={env['root']}", f"ckpt_dir={tmp_path / 'ckpt'}",
            f"results_dir={tmp_path / 'train_results'}"]))
    for task, kwargs in (("s_p0", "{layers: [4, M, 6, 6, M], hidden: [8, 8]}"),
                         ("s_p1", "{layers: [4, M, 6, M], hidden: [8]}")):
        tsn.main(parse_args(TrainConfig, [
            str(env["base"] / "tasks.yaml"), f"dataset={task}", "arch=vgg", f"arch_kwargs={kwargs}", f"seeds=[{SEED}]",
            *EXPERT, "device=cpu", f"data_dir={env['root']}", f"ckpt_dir={tmp_path / 'ckpt'}",
            f"results_dir={tmp_path / 'train_results'}"]))
    rules = ("[{name: parent, index: 0},{name: parent, index: 1},vanilla_avg,{name: otfusion, cost: activation},hf,"
             "{name: kf_gradient, importance: conductance},ensemble,ensemble_weighted]")
    rows = rows_by_label(merge.main(merge_cfg(env, tmp_path, "lenets", rules, "fusion_samples=30",
                                              f"ckpt_dir={tmp_path / 'ckpt'}")))
    for label in ("vanilla_avg", "otfusion(cost=activation)", "hf(ridge=0.0)",
                  "kf_gradient(importance=conductance,ridge=0.0)", "ensemble", "ensemble_weighted"):
        assert 0 <= rows[label]["acc"] <= 1 and rows[label]["routing_acc"] is None, label
    for k, task in enumerate(("s_p0", "s_p1")):  # a parent alone scores what its own row scores
        assert rows[f"parent(index={k},finetune_epochs=0)"]["acc"] == rows[f"expert:{task}"]["acc"]
    assert rows["kf_gradient(importance=conductance,ridge=0.0)"]["fusion_samples"] == 30
    rules = "[{name: clafusion, finetune_epochs: 1},{name: parent, index: 1, finetune_epochs: 1}]"
    rows = rows_by_label(merge.main(merge_cfg(env, tmp_path / "vgg", "vggs", rules, "fusion_samples=30",
                                              f"ckpt_dir={tmp_path / 'ckpt'}")))
    assert 0 <= rows["clafusion(finetune_epochs=1)"]["acc"] <= 1
    tuned = rows["parent(index=1,finetune_epochs=1)"]  # the control: the parent after the same fine-tuning
    assert tuned["finetune_images"] == 1800 and 0 <= tuned["acc"] <= 1
    with pytest.raises(ValueError, match="index=2 is not a parent"):
        merge.main(merge_cfg(env, tmp_path / "bad", "lenets", "[{name: parent, index: 2}]",
                             f"ckpt_dir={tmp_path / 'ckpt'}"))


# ---------------------------------------------------------------- the experiment files

FUSION_YAMLS = ["fusion_clafusion.yaml", "fusion_noniid2.yaml", "fusion_noniid4.yaml", "fusion_noniid8.yaml",
                "fusion_shard2.yaml"]


@pytest.mark.pot
@pytest.mark.parametrize("name", FUSION_YAMLS)
def test_fusion_experiments_parse_and_fit_their_problems(name):
    path = REPO_ROOT / "experiments" / name
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / "fusion_parents.yaml"), str(path)])
    spec = cfg.problems[cfg.problem]
    assert spec.shared_labels and cfg.seeds == [770597, 600522, 416719]
    assert all(e.task in cfg.tasks and e.arch == "mlp" for e in spec.experts)
    calls = parse_strategies(cfg.strategies)
    assert any(REGISTRY[c.name].fusion for c in calls)
    for call in calls:
        check_fusion(call, cfg.problem, spec)
    header = path.read_text().split("\nproblem:")[0]
    assert "python train_source_networks.py" in header and "python merge.py" in header and name in header
    # the header's training command names the same arch_kwargs as the problem, so merge.py finds the checkpoints
    for expert in spec.experts:
        widths = ", ".join(map(str, expert.arch_kwargs["widths"]))
        assert f"widths: [{widths}], bias: {str(expert.arch_kwargs['bias']).lower()}" in header


def test_the_fusion_experiments_cover_the_design():
    def problem_of(name):
        cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / "fusion_parents.yaml"),
                                       str(REPO_ROOT / "experiments" / name)])
        return cfg, cfg.problems[cfg.problem], [c.label for c in parse_strategies(cfg.strategies)]

    cfg, spec, labels = problem_of("fusion_clafusion.yaml")
    assert [e.arch_kwargs for e in spec.experts] == [{"widths": [400, 200, 100, 50, 25], "bias": False},
                                                    {"widths": [400, 200, 100], "bias": False}]
    assert labels == ["parent(index=0,finetune_epochs=0)", "parent(index=1,finetune_epochs=0)", "ensemble",
                      "clafusion(finetune_epochs=0)", "clafusion(finetune_epochs=1)",
                      "parent(index=0,finetune_epochs=1)", "parent(index=1,finetune_epochs=1)"]
    for k in (2, 4, 8):
        cfg, spec, labels = problem_of(f"fusion_noniid{k}.yaml")
        assert [e.task for e in spec.experts] == [f"mnist_dir{k}_p{i}" for i in range(k)]
        assert all(e.arch_kwargs == {"widths": [256], "bias": True} for e in spec.experts)
        assert ("hf(ridge=0.0)" in labels) == (k == 2) and "kf_gradient(importance=conductance,ridge=0.0)" in labels
        assert {"vanilla_avg", "otfusion(cost=activation)", "ensemble_weighted", "naive", "oracle"} <= set(labels)
    cfg, spec, labels = problem_of("fusion_shard2.yaml")
    assert [cfg.tasks[e.task].split for e in spec.experts] == ["shard", "shard"]
    assert {"hf(ridge=0.0)", "energy", "max_softmax", "naive", "oracle",
            "kf_linear(importance=conductance,ridge=0.0)"} <= set(labels)


CNN_YAMLS = {"fusion_cnn_noniid2.yaml": "fusion_cnn.yaml", "fusion_cnn_noniid4.yaml": "fusion_cnn.yaml",
             "fusion_cnn_shard2.yaml": "fusion_cnn.yaml", "fusion_cnn_clafusion.yaml": "fusion_cnn_full.yaml",
             "fusion_lenet_shard2.yaml": None}


@pytest.mark.pot
@pytest.mark.parametrize("name, recipe", CNN_YAMLS.items())
def test_cnn_fusion_experiments_parse_and_name_their_recipe(name, recipe):
    files = [REPO_ROOT / "experiments" / f for f in ("fusion_parents.yaml", recipe, name) if f]
    cfg = parse_args(MergeConfig, [str(f) for f in files])
    spec = cfg.problems[cfg.problem]
    assert spec.shared_labels and cfg.seeds == [770597, 600522, 416719]
    assert all(e.task in cfg.tasks and e.arch in ("vgg", "lenet5") for e in spec.experts)
    calls = parse_strategies(cfg.strategies)
    for call in calls:
        check_fusion(call, cfg.problem, spec)
    labels = [c.label for c in calls]
    assert [f"parent(index={k},finetune_epochs=0)" for k in range(len(spec.experts))] == labels[:len(spec.experts)]
    header = (REPO_ROOT / "experiments" / name).read_text().split("\nproblem:")[0]
    assert "python train_source_networks.py" in header and "python merge.py" in header and name in header
    assert recipe is None or recipe in header
    for expert in spec.experts:  # the training command names the arch_kwargs the problem reads
        if expert.arch_kwargs:
            layers = ", ".join(map(str, expert.arch_kwargs["layers"]))
            assert f"{{layers: [{layers}], hidden: {expert.arch_kwargs['hidden']}}}" in header
    # one command makes every table: each is an entry of the paper profile (the cpu one leaves out two; its header says)
    assert name.removesuffix(".yaml") in config.load_yaml(REPO_ROOT / "experiments" / "profiles" / "paper.yaml")["fusion"]
