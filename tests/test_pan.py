"""train_pan.py end to end on tiny experts and generators (fake data root), and merge.py's gate rules on them.

docs/design.md section 4: "Gating networks", "The data question" (regimes real, synthetic, noise; the
data-free ones read no real training image) and "Universal gate" (one gate per problem, regime and seed).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import config
import data
import merge
import problems
import train_gan
import train_pan
from artifacts import ExpertId, Layout
from common import CheckpointError, load_model, read_rows
from config import ConfigError, MergeConfig, PanConfig, parse_args
from detector_stats import GATE_DETECTORS
from gating import GATE_TYPES, REGIMES, SHARED_GATES, gate_inputs
from strategies import parse_strategies, with_gate_statistics
from conftest import guard_training_splits
from test_gan import ARCH, DAFL, EXPERT, SEEDS, TASKS, Forbidden, copy_experts, gan_cfg, mtimes, train_experts

SYNTHETIC = 80  # dafl.images (test_gan's DAFL): images in each expert's stored set
NOISE = 48  # noise_samples
TRAIN_LIMIT = 60  # real regime: first 60 training images of each task
TEST_LIMIT = 32  # 32 test digits of 0-4 and all 30 of 5-9: the two domains differ in size
# the detector gate standardises its scores on the DAFL sets: the module makes no inversion sets
GATE = ["gate.epochs=2", f"gate.noise_samples={NOISE}", f"gate.train_limit={TRAIN_LIMIT}", "gate.detector_stats=synthetic:dafl"]
SECTIONS = [*EXPERT, *DAFL, *GATE]  # the settings every stage must agree on to find each other's files
PAN_PROFILE = [*SECTIONS, f"test_limit={TEST_LIMIT}"]
E = len(TASKS)
CPU = torch.device("cpu")
GATE_STRATEGIES = ("[{name: gate_hard, gate: feature, regime: synthetic},"
                   "{name: gate_confident, gate: logits, regime: noise},"
                   "{name: gate_soft, gate: agnostic_logits, regime: synthetic},"
                   "{name: gate_hard, gate: universal, regime: synthetic, gates_from: disjoint_mnist}]")




def listed(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def pan_cfg(env, ckpt: Path, results: Path, *extra: str, seeds=SEEDS, regimes=REGIMES,
            gate_types=GATE_TYPES) -> PanConfig:
    return parse_args(PanConfig, [
        "problem=disjoint_mnist", f"seeds={listed(seeds)}", f"regimes={listed(regimes)}",
        f"gate_types={listed(gate_types)}", *PAN_PROFILE, "device=cpu", f"data_dir={env['root']}",
        f"ckpt_dir={ckpt}", f"results_dir={results}", *extra])


def merge_cfg(env, ckpt: Path, results: Path, strategies: str, *extra: str, seeds=SEEDS) -> MergeConfig:
    return parse_args(MergeConfig, [
        "problem=disjoint_mnist", f"strategies={strategies}", f"seeds={listed(seeds)}", f"test_limit={TEST_LIMIT}",
        *SECTIONS, "device=cpu", f"data_dir={env['root']}", f"ckpt_dir={ckpt}", f"results_dir={results}", *extra])


def layout(ckpt: Path, *extra: str) -> Layout:
    return Layout(parse_args(PanConfig, [*SECTIONS, f"ckpt_dir={ckpt}", *extra]))


def gate_file(ckpt: Path, regime: str, gate_type: str, task: str, seed: int, problem: str = "disjoint_mnist",
              extra: list[str] = ()) -> Path:
    serves = None if gate_type in SHARED_GATES else TASKS.index(task)
    return layout(ckpt, *extra).gate_path(problem, regime, gate_type, serves, seed)


def all_gate_files(ckpt: Path, regimes=REGIMES, gate_types=GATE_TYPES, seeds=SEEDS,
                   extra: list[str] = ()) -> list[Path]:
    """Every gate checkpoint train_pan should write: per (regime, type, expert), one universal per regime."""
    return list(dict.fromkeys(gate_file(ckpt, r, t, task, s, extra=extra)
                              for s in seeds for r in regimes for t in gate_types for task in TASKS))


def without(row: dict, *keys: str) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny experts and generators for SEEDS (once for the module)."""
    env = train_experts(tmp_path_factory.mktemp("pan"))
    with contextlib.redirect_stdout(io.StringIO()):
        train_gan.main(gan_cfg(env["ckpt"], env["base"] / "gan_results"))
    labels = env["arrays"]["mnist"]["train"][1]
    # training images per task in the real regime
    env["n_train"] = [min(TRAIN_LIMIT, int((labels < 5).sum())), min(TRAIN_LIMIT, int((labels >= 5).sum()))]
    test = env["arrays"]["mnist"]["test"][1]
    env["n_test"] = [min(TEST_LIMIT, int((test < 5).sum())), min(TEST_LIMIT, int((test >= 5).sum()))]
    yield env
    data._load_cached.cache_clear()


@pytest.fixture(scope="module")
def pan_run(env):
    """train_pan.main once: every regime and gate type, both seeds, into the module's checkpoints."""
    results = env["base"] / "pan_results"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train_pan.main(pan_cfg(env, env["ckpt"], results))
    return {"summary": summary, "out": out.getvalue(), "results": results,
            "rows": read_rows(summary["outputs"]["jsonl"])}


@pytest.fixture(scope="module")
def test_activations(env, pan_run):
    """Per seed: the problem and every expert's (logits, features) on the combined test set."""
    cfg = pan_cfg(env, env["ckpt"], env["base"] / "unused")
    problem = problems.build_problem("disjoint_mnist", cfg.problems["disjoint_mnist"], cfg.tasks, str(env["root"]),
                                     TEST_LIMIT)
    acts = {}
    for seed in SEEDS:
        models, formats = problem.load_experts(layout(env["ckpt"]), seed, CPU)
        acts[seed] = problems.expert_activations(problem, models, formats, CPU)
    return problem, acts


def gate_probabilities(path: Path, gate_type: str, activations) -> torch.Tensor:
    """[N]: the gate's probability of 'mine' for each test sample, computed here from the checkpoint."""
    gate, _ = load_model(path)
    with torch.no_grad():
        return gate(gate_inputs(gate_type, *activations)).softmax(dim=1)[:, 1]


# ---------------------------------------------------------------- train_pan.main end to end

def test_gates_rows_and_summary(env, pan_run, test_activations):
    summary, rows, ckpt = pan_run["summary"], pan_run["rows"], env["ckpt"]
    problem, acts = test_activations
    n_rows = len(SEEDS) * len(REGIMES) * len(GATE_TYPES) * E
    assert summary["problem"] == "disjoint_mnist" and summary["seeds"] == SEEDS
    n_gates = len(SEEDS) * len(REGIMES) * ((len(GATE_TYPES) - len(SHARED_GATES)) * E + len(SHARED_GATES))
    assert summary["made"] == n_gates and summary["reused"] == 0
    assert json.loads(pan_run["out"].strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    stem = pan_run["results"] / "gates" / "disjoint_mnist"
    assert summary["outputs"] == {"jsonl": f"{stem}.jsonl", "csv": f"{stem}.csv", "config": f"{stem}.config.yaml"}

    # exactly the expected checkpoints: one per (regime, type, expert, seed), one universal per (regime, seed)
    expected = all_gate_files(ckpt)
    assert len(expected) == len(SEEDS) * len(REGIMES) * ((len(GATE_TYPES) - len(SHARED_GATES)) * E + len(SHARED_GATES))
    assert sorted(map(str, (ckpt / "gates").rglob("*.pt"))) == sorted(map(str, expected))

    assert len(rows) == n_rows
    assert {(r["seed"], r["regime"], r["gate_type"], r["expert"]) for r in rows} == \
           {(s, reg, t, task) for s in SEEDS for reg in REGIMES for t in GATE_TYPES for task in TASKS}
    n_in = dict(zip(TASKS, env["n_test"]))
    assert torch.bincount(problem.domain).tolist() == env["n_test"] and env["n_test"][0] != env["n_test"][1]
    for row in rows:
        task, gate_type = row["expert"], row["gate_type"]
        path = gate_file(ckpt, row["regime"], gate_type, task, row["seed"])
        assert row["checkpoint"] == str(path) and row["arch"] == ARCH and row["resumed"] is False
        stored = torch.load(path, weights_only=True)
        meta = stored["meta"]
        assert (meta["problem"], meta["regime"], meta["gate_type"]) == ("disjoint_mnist", row["regime"], gate_type)
        assert meta["experts"] == (TASKS if gate_type in SHARED_GATES else [task])
        in_features = {"feature": 120, "logits": 5, "detectors": len(GATE_DETECTORS)}.get(gate_type, 3)
        assert stored["arch"] == ("pan" if gate_type in ("feature", "logits") else "agnostic_pan")
        assert stored["arch_kwargs"] == {"in_features": in_features}
        assert not torch.equal(stored["state_dict"]["input_std"], torch.ones(in_features))  # standardised

        # membership on the real combined test set, recomputed here from the checkpoint
        for key in ("membership_acc", "true_positive_rate", "true_negative_rate"):
            assert 0 <= row[key] <= 1
        if gate_type == "detectors":  # reads detector scores, not these activations: test_detector_stats checks it
            continue
        k = TASKS.index(task)
        says_in = gate_probabilities(path, gate_type, acts[row["seed"]][k]) > 0.5
        is_in = problem.domain == k
        assert row["membership_acc"] == pytest.approx((says_in == is_in).float().mean().item(), abs=1e-6)
        assert row["true_positive_rate"] == pytest.approx(says_in[is_in].float().mean().item(), abs=1e-6)
        assert row["true_negative_rate"] == pytest.approx((~says_in[~is_in]).float().mean().item(), abs=1e-6)
        n_out = len(is_in) - n_in[task]
        assert row["membership_acc"] == pytest.approx(
            (n_in[task] * row["true_positive_rate"] + n_out * row["true_negative_rate"]) / len(is_in), abs=1e-6)

    # one universal gate serves every expert of its regime and seed
    for seed in SEEDS:
        for regime in REGIMES:
            universal = {r["checkpoint"] for r in rows if r["gate_type"] == "universal"
                         and r["regime"] == regime and r["seed"] == seed}
            assert universal == {str(gate_file(ckpt, regime, "universal", "", seed))}
    names = {"real": "real", "synthetic": "synthetic_dafl", "noise": "noise_dafl"}  # regime and synthesizer
    assert set(summary["membership_acc"]) == {f"{names[r]}/{t}" for r in REGIMES for t in GATE_TYPES}
    for key, value in summary["membership_acc"].items():
        group = [r["membership_acc"] for r in rows if f"{names[r['regime']]}/{r['gate_type']}" == key]
        assert value == pytest.approx(sum(group) / len(group))


def expected_counts(regime: str, gate_type: str, task: str, n_train: list[int]) -> tuple[int, int]:
    """(positives, negatives) of a gate's training set, by docs/design.md's definition of each regime."""
    def per_expert(k: int) -> tuple[int, int]:
        if regime == "real":  # real images of every expert; positives are expert k's
            return n_train[k], sum(n_train) - n_train[k]
        if regime == "synthetic":  # own generator vs the other generators and noise
            return SYNTHETIC, (E - 1) * SYNTHETIC + NOISE
        return SYNTHETIC, NOISE  # noise: own generator vs noise only

    experts = range(E) if gate_type in SHARED_GATES else [TASKS.index(task)]  # a shared gate pools all experts
    return sum(per_expert(k)[0] for k in experts), sum(per_expert(k)[1] for k in experts)


def test_training_counts_follow_the_regime(env, pan_run):
    assert env["n_train"] == [TRAIN_LIMIT, TRAIN_LIMIT]  # train_limit bites: each task has 100 images
    for row in pan_run["rows"]:
        positives, negatives = expected_counts(row["regime"], row["gate_type"], row["expert"], env["n_train"])
        assert (row["train_positives"], row["train_negatives"]) == (positives, negatives), row["checkpoint"]
    # spot values, so the helper above cannot drift with the code
    by_key = {(r["regime"], r["gate_type"], r["expert"]): r for r in pan_run["rows"] if r["seed"] == SEEDS[0]}
    assert by_key[("synthetic", "feature", "first5_mnist")]["train_negatives"] == 80 + 48
    assert by_key[("noise", "logits", "last5_mnist")]["train_negatives"] == 48
    assert by_key[("synthetic", "universal", "first5_mnist")]["train_positives"] == 2 * 80
    assert by_key[("real", "universal", "last5_mnist")]["train_negatives"] == 2 * 60


def test_data_free_regimes_read_no_training_data(env, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, s) for t in TASKS for s in SEEDS])
    shutil.copytree(env["ckpt"] / "synthetic", ckpt / "synthetic")
    splits = []
    guard_training_splits(monkeypatch, ((data, "load_source"), (data, "load_task"), (data, "_load_cached"),
                                        (train_pan, "load_task"), (problems, "load_task")), "a data-free regime", splits)
    summary = train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", regimes=["synthetic", "noise"]))
    assert summary["made"] == len(SEEDS) * 2 * ((len(GATE_TYPES) - len(SHARED_GATES)) * E + len(SHARED_GATES))
    assert "test" in splits and set(splits) == {"test"}  # the test split, for evaluation only
    assert len(all_gate_files(ckpt, regimes=["synthetic", "noise"])) == len(list((ckpt / "gates").rglob("*.pt")))

    # the guard does catch a training-set read
    with pytest.raises(Forbidden):
        train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", regimes=["real"], gate_types=["logits"]))


def test_rerun_trains_nothing_and_touches_no_gate(env, pan_run, monkeypatch):
    files = all_gate_files(env["ckpt"])
    before = mtimes(files)

    def forbidden(*args, **kwargs):
        raise Forbidden("a rerun must not build training data or train")

    for name in ("train_gates", "synthetic_sets", "real_sets", "activations_on"):
        monkeypatch.setattr(train_pan, name, forbidden)
    summary = train_pan.main(pan_cfg(env, env["ckpt"], pan_run["results"]))
    assert summary["made"] == 0 and summary["reused"] == len(files)
    assert mtimes(files) == before
    again = read_rows(summary["outputs"]["jsonl"])
    assert [without(r, "resumed", "config") for r in again] == [without(r, "resumed", "config")
                                                                 for r in pan_run["rows"]]
    assert all(r["resumed"] is True for r in again)
    assert summary["membership_acc"] == pytest.approx(pan_run["summary"]["membership_acc"])


def test_other_settings_train_beside_and_force_retrains(env, pan_run, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(env["ckpt"], ckpt)
    files = all_gate_files(ckpt)
    retrained = all_gate_files(ckpt, regimes=["synthetic"], gate_types=["feature", "universal"], seeds=[1])
    before = mtimes(files)
    trained = []
    original = train_pan.train_gates

    def counting(cfg, pending):
        trained.extend(gate.gate_type for gate in pending)
        return original(cfg, pending)

    monkeypatch.setattr(train_pan, "train_gates", counting)
    # other settings: new gates beside the old ones, which stay as they were
    summary = train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", "gate.epochs=3", regimes=["synthetic"],
                                     gate_types=["feature"], seeds=[1]))
    assert summary["made"] == E and summary["why_made"] == {"no checkpoint": E}
    assert mtimes(files) == before
    new = [layout(ckpt, "gate.epochs=3").gate_path("disjoint_mnist", "synthetic", "feature", k, 1) for k in range(E)]
    assert all(p.is_file() and p not in files for p in new)

    trained.clear()
    summary = train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", "force=true", regimes=["synthetic"],
                                     gate_types=["feature", "universal"], seeds=[1]))
    assert sorted(trained) == ["feature"] * E + ["universal"]
    assert summary["made"] == E + 1 and summary["why_made"] == {"force=true": E + 1}
    after = mtimes(files)
    assert {p for p in before if before[p] != after[p]} == set(map(str, retrained))


def test_missing_generators_name_the_gan_command(env, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, s) for t in TASKS for s in SEEDS])

    def forbidden(*args, **kwargs):
        raise Forbidden("nothing may be trained")

    with monkeypatch.context() as patch:
        patch.setattr(train_pan, "train_gates", forbidden)
        for regimes in (["synthetic"], ["noise"], ["real", "noise"]):
            with pytest.raises(CheckpointError) as err:
                train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", regimes=regimes))
            message = str(err.value)
            for seed in SEEDS:
                assert f"python train_gan.py problem=disjoint_mnist seeds=[{seed}] synthesizers=[dafl]" in message
        assert not (tmp_path / "results").exists() and not (ckpt / "gates").exists()

        # only the missing seed is named
        (ckpt / "synthetic" / "dafl").mkdir(parents=True)
        for task in TASKS:
            shutil.copy(layout(env["ckpt"]).synthetic_path("dafl", ExpertId(task, ARCH, {}), 1),
                        ckpt / "synthetic" / "dafl")
        with pytest.raises(CheckpointError) as err:
            train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", regimes=["synthetic"]))
        assert "python train_gan.py problem=disjoint_mnist seeds=[2]" in str(err.value)
        assert "seeds=[1]" not in str(err.value)

    # the real regime needs no synthetic set
    shutil.rmtree(ckpt / "synthetic")
    summary = train_pan.main(pan_cfg(env, ckpt, tmp_path / "results", regimes=["real"], gate_types=["logits"],
                                     seeds=[2]))
    assert summary["made"] == E


def test_missing_experts_name_the_training_command(env, tmp_path):
    with pytest.raises(CheckpointError) as err:
        train_pan.main(pan_cfg(env, tmp_path / "empty", tmp_path / "results", regimes=["real"]))
    for task in TASKS:
        assert f"python train_source_networks.py dataset={task} arch={ARCH} seeds=[1,2]" in str(err.value)


@pytest.mark.parametrize("key,bad", [("gate_types", "[feature,universl]"), ("regimes", "[synthetic,synthetc]")])
def test_unknown_gate_type_or_regime_is_a_config_error(env, tmp_path, monkeypatch, key, bad):
    def forbidden(*args, **kwargs):
        raise Forbidden("no data may be loaded")

    monkeypatch.setattr(train_pan, "build_problem", forbidden)
    with pytest.raises(ConfigError) as err:
        train_pan.main(pan_cfg(env, env["ckpt"], tmp_path / "results", f"{key}={bad}"))
    message = str(err.value)
    assert bad.strip("[]").split(",")[1] in message
    assert all(choice in message for choice in (GATE_TYPES if key == "gate_types" else REGIMES))
    assert not (tmp_path / "results").exists()


def test_a_rerun_on_another_test_subset_measures_membership_again(env, pan_run, tmp_path):
    cfg = pan_cfg(env, env["ckpt"], tmp_path / "results", "test_limit=null", regimes=["synthetic"],
                  gate_types=["logits", "feature"], seeds=[1])
    rows = read_rows(train_pan.main(cfg)["outputs"]["jsonl"])
    problem = problems.build_problem("disjoint_mnist", cfg.problems["disjoint_mnist"], cfg.tasks,
                                     str(env["root"]))  # the whole test set this time
    models, formats = problem.load_experts(layout(env["ckpt"]), 1, CPU)
    acts = problems.expert_activations(problem, models, formats, CPU)
    measured = []
    for row in rows:
        k = TASKS.index(row["expert"])
        says_in = gate_probabilities(Path(row["checkpoint"]), row["gate_type"], acts[k]) > 0.5
        measured.append((says_in == (problem.domain == k)).float().mean().item())
    assert [r["membership_acc"] for r in rows] == pytest.approx(measured, abs=1e-6)


# ---------------------------------------------------------------- merge.py with gate rules

def test_merge_with_gate_strategies(env, pan_run, test_activations, tmp_path):
    problem, acts = test_activations
    ckpt = env["ckpt"]
    summary = merge.main(merge_cfg(env, ckpt, tmp_path, GATE_STRATEGIES))
    calls = parse_strategies(yaml.safe_load(GATE_STRATEGIES))
    labels = [c.label for c in calls]
    assert list(summary["acc"]) == labels + ["oracle"]
    rows = read_rows(summary["outputs"]["jsonl"])
    n = len(problem.labels)
    column_expert = torch.cat([torch.full((len(m),), k) for k, m in enumerate(problem.label_maps)])
    column_class = torch.cat(problem.label_maps)
    for seed in SEEDS:
        by_label = {r["strategy"]: r for r in rows if r["seed"] == seed}
        logits = [lo for lo, _ in acts[seed]]
        own_pred = torch.stack([m[o.argmax(dim=1)] for o, m in zip(logits, problem.label_maps)], dim=1)
        naive_column = torch.cat(logits, dim=1).argmax(dim=1)
        for call in calls:
            row = by_label[call.label]
            gate_type, regime = call.param("gate"), call.param("regime")
            source = call.param("gates_from") or "disjoint_mnist"
            paths = [gate_file(ckpt, regime, gate_type, t, seed, source) for t in TASKS]
            probs = torch.stack([gate_probabilities(p, gate_type, a) for p, a in zip(paths, acts[seed])], dim=1)
            # the rule, recomputed here from the gate checkpoints
            fallbacks = 0
            if call.name == "gate_hard":
                says_yes = probs > 0.5
                single = says_yes.sum(dim=1) == 1
                expert = torch.where(single, says_yes.int().argmax(dim=1), column_expert[naive_column])
                pred = torch.where(single, own_pred.gather(1, expert.unsqueeze(1)).squeeze(1),
                                   column_class[naive_column])
                fallbacks = int((~single).sum())
            elif call.name == "gate_confident":
                expert = probs.argmax(dim=1)
                pred = own_pred.gather(1, expert.unsqueeze(1)).squeeze(1)
            else:  # gate_soft
                mixture = torch.cat([probs[:, k:k + 1] * o.softmax(dim=1) for k, o in enumerate(logits)], dim=1)
                column = mixture.argmax(dim=1)
                expert, pred = column_expert[column], column_class[column]
            assert isinstance(row["fallbacks"], int) and row["fallbacks"] == fallbacks
            counts = torch.bincount(expert, minlength=E).tolist()
            assert row["routing_counts"] == dict(zip(TASKS, counts)) and sum(counts) == n
            assert row["acc"] == pytest.approx((pred == problem.labels).float().mean().item(), abs=1e-6)
            assert row["routing_acc"] == pytest.approx((expert == problem.domain).float().mean().item(), abs=1e-6)
            # the gates were trained on these very experts: seen, by checkpoint identity
            assert row["unseen"] is False and all(e["seen"] for e in row["gate_experts"].values())
            for k, task in enumerate(TASKS):
                membership = ((probs[:, k] > 0.5) == (problem.domain == k)).float().mean().item()
                assert row["gate_experts"][task]["membership_acc"] == pytest.approx(membership, abs=1e-6)
        assert by_label["oracle"]["fallbacks"] == 0


def test_merge_names_the_missing_gates_before_any_evaluation(env, pan_run, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    copy_experts(env["ckpt"], ckpt, [(t, s) for t in TASKS for s in SEEDS])
    shutil.copytree(env["ckpt"] / "gates" / "disjoint_mnist" / "synthetic_dafl",
                    ckpt / "gates" / "disjoint_mnist" / "synthetic_dafl")

    def forbidden(*args, **kwargs):
        raise Forbidden("no evaluation may start")

    monkeypatch.setattr(problems.Problem, "load_experts", forbidden)
    monkeypatch.setattr(merge, "expert_activations", forbidden)
    monkeypatch.setattr(merge, "plan_seed", forbidden)
    strategies = ("[{name: gate_hard, gate: feature, regime: synthetic},"
                  "{name: gate_soft, gate: feature, regime: real},"
                  "{name: gate_confident, gate: universal, regime: synthetic, gates_from: mnist_cifar10}]")
    with pytest.raises(CheckpointError) as err:
        merge.main(merge_cfg(env, ckpt, tmp_path / "results", strategies))
    message = str(err.value)
    for seed in SEEDS:
        assert (f"python train_pan.py problem=disjoint_mnist regimes=[real] gate_types=[feature] "
                f"seeds=[{seed}]") in message
        assert (f"python train_pan.py problem=mnist_cifar10 regimes=[synthetic] gate_types=[universal] "
                f"seeds=[{seed}] synthesizers=[dafl]") in message
    assert "regimes=[synthetic] gate_types=[feature]" not in message  # those gates are there
    assert "train_source_networks" not in message
    assert not (tmp_path / "results").exists()


def test_seen_or_unseen_is_decided_by_checkpoint_identity_not_by_problem_name(env, pan_run, tmp_path):
    """A gate trained on disjoint_mnist, used on a problem that shares one of its expert checkpoints, has seen
    that expert: the row is only partly unseen. With none of its checkpoints, it is unseen. The problems here
    have three experts, the gate's own problem two: one universal gate serves them all."""
    import train_source_networks

    tasks = {"low": [0, 1, 2, 3, 4], "mid": [5, 6], "top": [7, 8, 9]}
    extra = [f"tasks.{t}.source=mnist" for t in tasks] + [f"tasks.{t}.classes={c}" for t, c in tasks.items()]
    extra += ["problems.mixed.experts=[{task: first5_mnist}, {task: mid}, {task: top}]",
              "problems.fresh.experts=[{task: low}, {task: mid}, {task: top}]"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(env["ckpt"], ckpt)
    with contextlib.redirect_stdout(io.StringIO()):
        for task in tasks:  # experts of other tasks: other checkpoints, even for the classes of first5_mnist
            train_source_networks.main(parse_args(config.TrainConfig, [
                f"dataset={task}", f"seeds={listed(SEEDS)}", *EXPERT, "device=cpu", f"data_dir={env['root']}",
                f"ckpt_dir={ckpt}", f"results_dir={tmp_path / 'experts'}", *extra[:6]]))
    rule = "[{name: gate_hard, gate: universal, regime: real, gates_from: disjoint_mnist}]"
    label = "gate_hard(gate=universal,regime=real,gates_from=disjoint_mnist)"
    status = {}
    for problem in ("mixed", "fresh"):
        with contextlib.redirect_stdout(io.StringIO()):
            summary = merge.main(merge_cfg(env, ckpt, tmp_path / problem, rule, f"problem={problem}", *extra))
        rows = [r for r in read_rows(summary["outputs"]["jsonl"]) if r["strategy"] == label]
        status[problem] = {name: e["seen"] for name, e in rows[0]["gate_experts"].items()}
        assert all(r["unseen"] == (problem == "fresh") for r in rows)
        assert all(sum(r["routing_counts"].values()) == r["n"] for r in rows)  # every sample routed to one of 3
        assert all(0 <= e["membership_acc"] <= 1 for r in rows for e in r["gate_experts"].values())
    assert status == {"mixed": {"first5_mnist": True, "mid": False, "top": False},
                      "fresh": {"low": False, "mid": False, "top": False}}



def test_stacked_gates_train_as_each_gate_alone(env, tmp_path):
    """Every seed's gates of one shape trained as one stacked network end as each trained alone."""
    runs = {}
    for name, stacked in (("together", "true"), ("apart", "false")):
        ckpt = tmp_path / name
        shutil.copytree(env["ckpt"], ckpt, ignore=shutil.ignore_patterns("gates"))
        train_pan.main(pan_cfg(env, ckpt, tmp_path / f"r_{name}", f"gate.stack_seeds={stacked}",
                               regimes=["real", "synthetic"]))
        runs[name] = ckpt
    files = all_gate_files(runs["together"], regimes=["real", "synthetic"], extra=["gate.stack_seeds=true"])
    alone = all_gate_files(runs["apart"], regimes=["real", "synthetic"], extra=["gate.stack_seeds=false"])
    assert files and len(files) == len(alone)
    for together, apart in zip(files, alone):
        a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (together, apart))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=f"{together.name} {key}")


# ---------------------------------------------------------------- the data-free guard over the registry (issue 27)

def data_free_calls() -> list[str]:
    """Every registered rule in every parameterisation the report counts as data-free (training-free rules with
    their defaults, detectors on synthetic or shipped statistics, calibration, gates of every type trained on
    synthetic images or noise), and the rules fitted on the unlabeled test inputs, which read no training image and
    no label either; fusion rules (they read their parents' training images) and the oracle aside."""
    import report
    from strategies import REGISTRY
    entries = []
    for name, strategy in REGISTRY.items():
        if strategy.fusion is not None or name == "oracle":
            continue
        if strategy.detector:
            # bn_gaussian reads a batch-norm layer, which these LeNet5 experts lack (refused at config load)
            entries += [] if name == "bn_gaussian" else [f"{name}(stats=synthetic:dafl)"]
            entries += [f"{name}(stats=shipped)"] if name == "input_gaussian" else []
        elif "regime" in strategy.params:
            entries += [f"{name}(gate={gate},regime={regime}"
                        + (",gates_from=disjoint_mnist)" if gate in SHARED_GATES else ")")
                        for gate in GATE_TYPES for regime in ("synthetic", "noise")]
        else:
            entries.append(name)
    data_free = report.ANSWER_GROUPS["best data-free rule"]
    # each is counted as data-free, with the statistics source merge.py writes in, or the test guards the wrong rules
    for call in with_gate_statistics(parse_strategies(entries), "synthetic:dafl"):
        row = {"rule": call.name, "params": call.params, "gate_experts": {t: {"seen": True} for t in TASKS}}
        assert report.family(row) in data_free or report.family(row).startswith("unlabeled inputs"), call.label
    return entries


def test_no_data_free_rule_reads_a_training_image_or_a_test_label(env, pan_run, tmp_path, monkeypatch):
    """Every data-free rule of the registry through merge.py: any read of a training split fails, and so does any
    read of the test labels or the true domain while a rule runs (merge.py reads them after, to score it)."""
    running = []
    guard_training_splits(monkeypatch, ((data, "load_source"), (data, "load_task"), (data, "_load_cached"),
                                        (problems, "load_task"), (merge, "load_task")), "a data-free rule")
    for attribute in ("labels", "domain"):
        real = getattr(problems.Problem, attribute)

        def unreadable(self, real=real, attribute=attribute):
            if running:
                raise Forbidden(f"a rule read the problem's {attribute} while it ran")
            return real.fget(self)
        monkeypatch.setattr(problems.Problem, attribute, property(unreadable))
    call_rule = merge.StrategyCall.__call__

    def watched(self, inputs):
        running.append(self.label)
        try:
            return call_rule(self, inputs) if self.name == "oracle" else call_rule(self, without_domain(inputs))
        finally:
            running.pop()
    monkeypatch.setattr(merge.StrategyCall, "__call__", watched)
    entries = data_free_calls()
    summary = merge.main(merge_cfg(env, env["ckpt"], tmp_path / "results", "[" + ",".join(entries) + "]"))
    rows = [r for r in read_rows(summary["outputs"]["jsonl"]) if r.get("kind") == "strategy"]
    assert len(rows) == (len(entries) + 1) * len(SEEDS)  # every rule and the oracle, for every seed


def without_domain(inputs):
    """A copy of MergeInputs whose true domain is gone: a rule that reads it fails."""
    import dataclasses
    return dataclasses.replace(inputs, domain=None)
