"""Data-free gates on fusion parents: train_gan.py, train_pan.py and merge.py's gate rules on a shared-label
problem of two sharded MLP parents (docs/design.md section 8, "fusion meets routing"), and the file names of
generators and gates, which carry their parent's arch tag."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import config
import data
import merge
import train_gan
import train_pan
import train_source_networks as tsn
from artifacts import ExpertId, Layout, arch_tag
from common import load_model, read_rows
from config import GanConfig, MergeConfig, PanConfig, TrainConfig, parse_args
from conftest import REPO_ROOT, SHARD_PROBLEMS_YAML, SHARD_TASKS_YAML, build_fake_root
from problems import build_problem, expert_activations

SEEDS = [1, 2]
WIDE = {"widths": [16]}
TASKS = ("s_p0", "s_p1")
EXPERT = ["expert.epochs=2", "expert.batch_size=32", "expert.lr=0.05"]
DAFL = ["dafl.epochs=2", "dafl.iters_per_epoch=3", "dafl.batch_size=16", "dafl.width=8", "dafl.images=64"]
GATE = ["gate.epochs=2", "gate.noise_samples=48"]
GATE_RULES = ("[{name: gate_hard, gate: feature, regime: synthetic},"
              "{name: gate_soft, gate: feature, regime: synthetic},"
              "{name: gate_hard, gate: universal, regime: synthetic},"
              "{name: gate_soft, gate: universal, regime: synthetic},"
              "{name: gate_hard, gate: feature, regime: real},"
              "{name: gate_soft, gate: universal, regime: real},naive]")
CPU = torch.device("cpu")


def common_args(env) -> list[str]:
    return [str(env["base"] / "tasks.yaml"), str(env["base"] / "problems.yaml"), "problem=shard", f"seeds={SEEDS}",
            "device=cpu",
            f"ckpt_dir={env['ckpt']}", f"results_dir={env['base'] / 'results'}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two tiny MLP parents (digits 0-4 and 5-9, ten-way heads) for SEEDS, their generators and gates."""
    base = tmp_path_factory.mktemp("fusion_gates")
    fake = build_fake_root(base / "data", n_mnist_train=300, n_mnist_test=80, squares=True, n_cifar=0)
    (base / "tasks.yaml").write_text(SHARD_TASKS_YAML)
    (base / "problems.yaml").write_text(SHARD_PROBLEMS_YAML)
    env = {"base": base, "root": fake.root, "ckpt": base / "ckpt",
           "digits": torch.from_numpy(fake.mnist["test"][1])}
    with contextlib.redirect_stdout(io.StringIO()):
        for task in TASKS:
            tsn.main(parse_args(TrainConfig, [
                str(base / "tasks.yaml"), f"dataset={task}", "arch=mlp", f"arch_kwargs={WIDE}", f"seeds={SEEDS}",
                *EXPERT, "device=cpu", f"data_dir={fake.root}",
                f"ckpt_dir={env['ckpt']}", f"results_dir={base / 'train_results'}"]))
        env["gan"] = train_gan.main(parse_args(GanConfig, [*common_args(env), *EXPERT, *DAFL, "eval_samples=64"]))
        env["pan"] = train_pan.main(parse_args(PanConfig, [
            *common_args(env), *EXPERT, *DAFL, *GATE, "gate_types=[feature,universal]", "regimes=[real,synthetic]",
            f"data_dir={fake.root}"]))
    yield env
    data._load_cached.cache_clear()


def layout(env) -> Layout:
    return Layout(parse_args(MergeConfig, [*common_args(env), *EXPERT, *DAFL, *GATE]))


def test_generators_are_named_like_their_parents(env):
    rows = read_rows(env["gan"]["outputs"]["jsonl"])
    assert len(rows) == len(SEEDS) * 2 and env["gan"]["made"] == 8  # a generator and its set per parent
    tag = arch_tag("mlp", WIDE)
    for row in rows:
        expert = ExpertId(row["task"], "mlp", WIDE)
        path = layout(env).generator_path(expert, row["seed"])
        assert re.fullmatch(rf"{row['task']}_{tag}_[0-9a-f]{{8}}_seed{row['seed']}\.pt", path.name) and path.is_file()
        assert row["generator"] == str(path) and row["arch_kwargs"] == WIDE
        assert row["expert_checkpoint"] == str(layout(env).expert_path(expert, row["seed"]))
        stored = layout(env).synthetic_path("dafl", expert, row["seed"])
        assert row["set"] == str(stored) and stored.name.startswith(f"{row['task']}_{tag}_")
        assert Path(row["grid"]).name == stored.stem + ".png"
        assert row["cross_seed_agreement"] is not None  # the other seed's parent was found under its arch tag
        load_model(path, expect_arch="generator")
    assert {f"dafl/{t}" for t in TASKS} <= set(env["gan"])  # summary per synthesizer and parent


def test_gates_are_named_like_their_parents_and_judged_by_class_ownership(env):
    rows = read_rows(env["pan"]["outputs"]["jsonl"])
    # per seed and regime: two feature gates and one universal gate, each with a row per parent it serves
    assert len(rows) == len(SEEDS) * 2 * (2 + 2) and env["pan"]["made"] == len(SEEDS) * 2 * 3
    assert len({r["checkpoint"] for r in rows}) == len(SEEDS) * 2 * 3
    cfg = parse_args(PanConfig, [*common_args(env), *EXPERT, *DAFL, *GATE, f"data_dir={env['root']}"])
    problem = build_problem("shard", cfg.problems["shard"], cfg.tasks, cfg.data_dir)
    truth = (env["digits"] >= 5).long()  # the parent owning each test image's digit
    for seed in SEEDS:
        assert torch.equal(train_pan.membership_truth(cfg, problem, seed), truth)
        models, formats = problem.load_experts(Layout(cfg), seed, CPU)
        acts = expert_activations(problem, models, formats, CPU)
        for row in (r for r in rows if r["seed"] == seed):
            k = TASKS.index(row["expert"])
            serves = k if row["gate_type"] == "feature" else None
            path = Layout(cfg).gate_path("shard", row["regime"], row["gate_type"], serves, seed)
            assert row["checkpoint"] == str(path) and path.is_file()
            if row["gate_type"] == "feature":
                assert path.name.startswith(f"{row['expert']}_{arch_tag('mlp', WIDE)}_")
                assert row["arch_kwargs"] == WIDE
            gate = load_model(path)[0]
            expected = train_pan.membership(gate, row["gate_type"], acts, truth, k)
            assert row["membership_acc"] == pytest.approx(expected["membership_acc"])
            assert row["true_positive_rate"] == pytest.approx(expected["true_positive_rate"])


def test_real_gates_train_on_each_parents_own_shard(env):
    rows = read_rows(env["pan"]["outputs"]["jsonl"])
    shards = [data.load_task(config.TaskSpec("mnist", split="shard", parts=2, part=p), "train", env["root"])
              for p in (0, 1)]
    assert (shards[0].labels < 5).all() and (shards[1].labels >= 5).all()
    for row in (r for r in rows if r["regime"] == "real" and r["gate_type"] == "feature"):
        k = TASKS.index(row["expert"])
        assert row["train_positives"] == len(shards[k].labels)
        assert row["train_negatives"] == len(shards[1 - k].labels)


def test_merge_runs_the_data_free_gate_rules_on_the_parents(env, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        summary = merge.main(parse_args(MergeConfig, [
            str(env["base"] / "tasks.yaml"), str(env["base"] / "problems.yaml"), "problem=shard",
            f"strategies={GATE_RULES}", f"seeds={SEEDS}", *EXPERT, *DAFL, *GATE,
            f"data_dir={env['root']}", f"ckpt_dir={env['ckpt']}", f"results_dir={tmp_path}", "device=cpu"]))
    rows = read_rows(summary["outputs"]["jsonl"])
    for label in ("gate_hard(gate=feature,regime=synthetic)", "gate_soft(gate=universal,regime=real)"):
        assert label in summary["acc"]
    for row in rows:
        assert row["n"] == len(env["digits"]) and 0 <= row["acc"] <= 1
        if row["strategy"].startswith("gate_"):  # the gates of this problem were trained on these very parents
            assert row["unseen"] is False and all(e["seen"] for e in row["gate_experts"].values())
    oracle = next(r for r in rows if r["strategy"] == "oracle")
    assert oracle["routing_acc"] == 1.0


# ---------------------------------------------------------------- the experiment files

def test_the_cpu_profile_trains_the_gates_the_shard2_table_reads():
    from experiments import reproduce

    cfg = reproduce.load_config(["profile=cpu"])
    steps = reproduce.plan(cfg)
    (step,) = [s for s in steps if s.stage == "gates" and s.label == "mnist_shard2_mlp"]
    # its synthetic-regime gates read DAFL generators of these parents, made by a step before it
    assert [s.stage for s in steps if s.label == "mnist_shard2_mlp"] == ["generators", "gates"]
    files = ["experiments/fusion_parents.yaml", "experiments/fusion_shard2.yaml"]
    assert all(f in step.args for f in files)
    pan = reproduce.parse_step(step, cfg.seeds)
    assert pan.gate_types == ["feature", "universal"] and pan.regimes == ["real", "synthetic"]
    spec = pan.problems[pan.problem]
    assert spec.shared_labels and [e.arch_kwargs for e in spec.experts] == [{"widths": [256], "bias": True}] * 2
    merge_cfg = parse_args(MergeConfig, [str(REPO_ROOT / f) for f in files])
    wanted = {f"{rule}(gate={gate},regime={regime})" for rule in ("gate_hard", "gate_soft")
              for gate in ("feature", "universal") for regime in ("synthetic", "real")}
    labels = {c.label for c in merge.parse_strategies(merge_cfg.strategies)}
    assert wanted <= labels
    # every gate these rows read is one train_pan.py makes
    for call in merge.parse_strategies(merge_cfg.strategies):
        if call.param("regime") is not None:
            assert call.param("gate") in pan.gate_types and call.param("regime") in pan.regimes


def test_synthetic_gates_without_their_generators_stop_the_plan():
    from experiments import reproduce

    cfg = reproduce.load_config(["profile=cpu"])
    cfg.fusion["fusion_shard2"] = {k: v for k, v in cfg.fusion["fusion_shard2"].items() if k != "gan"}
    with pytest.raises(config.ConfigError, match="gan: \\[\\]"):
        reproduce.plan(cfg)


def test_merge_only_keys_stay_errors_on_the_command_line():
    for cls in (GanConfig, PanConfig):
        with pytest.raises(config.ConfigError, match="strategies"):
            parse_args(cls, ["strategies=[naive]"])
