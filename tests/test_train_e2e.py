"""train_source_networks.main end to end: on a tiny synthetic data root (always), and on real MNIST (when present)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import train_source_networks as tsn
import training
from archs.mlp import MLP
from artifacts import ExpertId, Layout, arch_tag
from common import load_model, read_rows
from config import ConfigError, TaskSpec, TrainConfig, parse_args
from data import InputFormat, load_task, prepare_input, to_unit

SUMMARY_KEYS = {"task", "arch", "test_acc", "mean", "std", "made", "reused", "why_made", "outputs"}
SETTINGS = ["expert.epochs=2", "expert.batch_size=20", "expert.lr=0.05"]


@pytest.fixture
def squares(make_fake_root):
    """200 training and 100 test 'digits': a bright square whose position encodes the class."""
    return make_fake_root(squares=True, n_cifar=0)


def train(fake, tmp_path, *extra, ckpt="ckpt", results="results"):
    argv = [f"data_dir={fake.root}", f"ckpt_dir={tmp_path / ckpt}", f"results_dir={tmp_path / results}",
            "dataset=mnist", "arch=lenet5", "seeds=[1,2]", *SETTINGS, "device=cpu", "deterministic=true", *extra]
    return tsn.main(parse_args(TrainConfig, argv))


def expert_file(ckpt: Path, task: str, arch: str, seed: int, arch_kwargs: dict | None = None, *extra: str) -> Path:
    """Where train() with ``extra`` arguments puts the expert."""
    cfg = parse_args(TrainConfig, [f"ckpt_dir={ckpt}", *SETTINGS, *extra])
    return Layout(cfg).expert_path(ExpertId(task, arch, arch_kwargs or {}), seed)


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_summary_checkpoints_and_results(squares, tmp_path, capsys):
    summary = train(squares, tmp_path)
    out = capsys.readouterr().out

    assert set(summary) == SUMMARY_KEYS
    assert summary["task"] == "mnist" and summary["arch"] == "lenet5"
    assert summary["made"] == 2 and summary["reused"] == 0 and summary["why_made"] == {"no checkpoint": 2}
    assert set(summary["test_acc"]) == {"1", "2"}
    accs = list(summary["test_acc"].values())
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert summary["mean"] == pytest.approx(sum(accs) / 2)
    assert summary["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert summary["mean"] > 0.3  # the squares are easy: well above chance (0.1) after 20 steps

    # the last printed line is the summary as JSON
    last = out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert "expert: {epochs: 2, lr: 0.05, batch_size: 20}" in out  # what differs from the defaults, first

    test = load_task(TrainConfig().tasks["mnist"], "test", squares.root, download=False)
    for seed in (1, 2):
        path = expert_file(tmp_path / "ckpt", "mnist", "lenet5", seed)
        assert path.is_file()
        raw = torch.load(path, weights_only=True)
        assert raw["arch"] == "lenet5" and raw["arch_kwargs"] == {"in_channels": 1, "num_classes": 10}
        assert raw["meta"]["recipe"]["epochs"] == 2 and raw["meta"]["recipe"]["batch_size"] == 20
        assert raw["meta"]["row"]["test_acc"] == summary["test_acc"][str(seed)]
        history = raw["meta"]["row"]["history"]
        assert [e["epoch"] for e in history] == [0, 1] and all(0 <= e["acc"] <= 1 and e["loss"] > 0 for e in history)
        assert raw["config"]["seeds"] == [1, 2]
        model, ckpt = load_model(path, expect_arch="lenet5")
        fmt = InputFormat.from_dict(ckpt["meta"]["input_format"])
        assert fmt == InputFormat.of("mnist")
        with torch.no_grad():
            predictions = model(prepare_input(to_unit(test.images), fmt)).argmax(1)
        assert (predictions == test.labels).float().mean().item() == pytest.approx(summary["test_acc"][str(seed)])

    outputs = summary["outputs"]
    for key in ("jsonl", "csv", "config"):
        assert Path(outputs[key]).is_file()
    assert outputs["config"].endswith(".config.yaml")
    rows = read_rows(outputs["jsonl"])
    assert [r["seed"] for r in rows] == [1, 2]
    assert [r["test_acc"] for r in rows] == accs
    assert all(r["config"]["expert"]["lr"] == 0.05 for r in rows)
    with open(outputs["csv"], newline="") as f:
        assert [int(r["seed"]) for r in csv.DictReader(f)] == [1, 2]
    saved = parse_args(TrainConfig, [outputs["config"]])
    assert saved.seeds == [1, 2] and saved.expert.lr == 0.05
    # where this machine keeps its data is no part of the record (issue 27): the reader's default fills it
    assert "data_dir" not in Path(outputs["config"]).read_text() and saved.data_dir == TrainConfig().data_dir


def test_rerun_resumes_without_rewriting(squares, tmp_path):
    first = train(squares, tmp_path)
    paths = [expert_file(tmp_path / "ckpt", "mnist", "lenet5", s) for s in (1, 2)]
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = train(squares, tmp_path)
    assert again["made"] == 0 and again["reused"] == 2
    assert again["test_acc"] == first["test_acc"]
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert all(r["resumed"] for r in read_rows(again["outputs"]["jsonl"]))
    # a new seed beside the stored ones trains only that seed
    more = train(squares, tmp_path, "seeds=[1,2,3]")
    assert more["made"] == 1 and more["reused"] == 2


def test_changed_settings_train_beside_and_going_back_reuses(squares, tmp_path):
    train(squares, tmp_path)
    path = expert_file(tmp_path / "ckpt", "mnist", "lenet5", 1)
    before, stamp = state(path), path.stat().st_mtime_ns
    changed = train(squares, tmp_path, "expert.epochs=3")
    assert changed["made"] == 2 and changed["reused"] == 0
    new = expert_file(tmp_path / "ckpt", "mnist", "lenet5", 1, None, "expert.epochs=3")
    assert new != path and new.is_file() and path.stat().st_mtime_ns == stamp  # side by side
    assert torch.load(new, weights_only=True)["meta"]["recipe"]["epochs"] == 3
    back = train(squares, tmp_path)
    assert back["made"] == 0 and back["reused"] == 2 and path.stat().st_mtime_ns == stamp
    forced = train(squares, tmp_path, "force=true")
    assert forced["made"] == 2 and forced["why_made"] == {"force=true": 2}
    assert all(torch.equal(before[k], v) for k, v in state(path).items())  # deterministic: the same weights


def test_same_seed_gives_identical_weights(squares, tmp_path):
    a = train(squares, tmp_path, "seeds=[1]", ckpt="a", results="ra")
    b = train(squares, tmp_path, "seeds=[1]", ckpt="b", results="rb")
    assert a["test_acc"] == b["test_acc"]
    weights_a = state(expert_file(tmp_path / "a", "mnist", "lenet5", 1))
    weights_b = state(expert_file(tmp_path / "b", "mnist", "lenet5", 1))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # and the seed matters
    train(squares, tmp_path, "seeds=[2]", ckpt="a", results="ra")
    weights_2 = state(expert_file(tmp_path / "a", "mnist", "lenet5", 2))
    assert any(not torch.equal(weights_a[k], weights_2[k]) for k in weights_a)


def test_task_defined_in_the_config(squares, tmp_path):
    summary = train(squares, tmp_path, "tasks.pair.source=mnist", "tasks.pair.classes=[7,3]", "dataset=pair",
                    "seeds=[1]", "arch=lenet5_half")
    assert summary["task"] == "pair" and summary["made"] == 1
    path = expert_file(tmp_path / "ckpt", "pair", "lenet5_half", 1, None, "tasks.pair.source=mnist",
                       "tasks.pair.classes=[7,3]")
    model, ckpt = load_model(path, expect_arch="lenet5_half")
    assert ckpt["arch_kwargs"] == {"in_channels": 1, "num_classes": 2}
    assert ckpt["meta"]["classes"] == [7, 3]
    assert ckpt["meta"]["recipe"]["task"] == {"name": "pair", "source": "mnist", "classes": [7, 3]}
    assert 0.0 <= summary["test_acc"]["1"] <= 1.0


def test_unknown_dataset_lists_choices(tmp_path):
    cfg = parse_args(TrainConfig, ["dataset=mnits", f"data_dir={tmp_path}", f"ckpt_dir={tmp_path / 'c'}",
                                   f"results_dir={tmp_path / 'r'}", "device=cpu"])
    with pytest.raises(ConfigError) as err:
        tsn.main(cfg)
    for name in ("'mnits'", "mnist", "first5_mnist", "last5_mnist", "cifar10"):
        assert name in str(err.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_unknown_arch_fails_before_loading_data(tmp_path):
    cfg = parse_args(TrainConfig, ["arch=vgg16", f"data_dir={tmp_path / 'no_data'}", "device=cpu"])
    with pytest.raises(ValueError) as err:  # not a DataError: the data root is empty
        tsn.main(cfg)
    assert "'vgg16'" in str(err.value) and "lenet5" in str(err.value)


def test_resumed_accuracy_follows_test_limit(squares, tmp_path):
    train(squares, tmp_path, "seeds=[1]", "test_limit=10")
    again = train(squares, tmp_path, "seeds=[1]")
    path = expert_file(tmp_path / "ckpt", "mnist", "lenet5", 1)
    model, _ = load_model(path)
    test = load_task(TrainConfig().tasks["mnist"], "test", squares.root, download=False)
    with torch.no_grad():
        acc = (model(prepare_input(to_unit(test.images), InputFormat.of("mnist"))).argmax(1) == test.labels)
    assert again["test_acc"]["1"] == pytest.approx(acc.float().mean().item())


# ---------------------------------------------------------------- fusion parents: MLPs with arch_kwargs, split tasks

MLP_KWARGS = {"widths": [24, 12], "bias": False}
DIR_PART1 = ["tasks.dir2_p1.source=mnist", "tasks.dir2_p1.split=dirichlet", "tasks.dir2_p1.parts=2",
             "tasks.dir2_p1.part=1", "dataset=dir2_p1"]


def test_mlp_parent_of_a_dirichlet_part_trains_and_reloads(squares, tmp_path):
    summary = train(squares, tmp_path, *DIR_PART1, "arch=mlp", "arch_kwargs={widths: [24, 12], bias: false}",
                    "seeds=[1]")
    assert summary["made"] == 1 and summary["arch"] == "mlp"
    path = expert_file(tmp_path / "ckpt", "dir2_p1", "mlp", 1, MLP_KWARGS, *DIR_PART1[:-1])
    assert path.is_file() and path.name.startswith("dir2_p1_mlp-") and path.name.endswith("_seed1.pt")
    assert path != expert_file(tmp_path / "ckpt", "dir2_p1", "mlp", 1, None, *DIR_PART1[:-1])
    model, ckpt = load_model(path, expect_arch="mlp")
    assert isinstance(model, MLP) and model.widths == [24, 12] and model.layers[0].bias is None
    assert ckpt["arch_kwargs"] == {"in_channels": 1, "num_classes": 10, **MLP_KWARGS}
    assert ckpt["meta"]["recipe"]["arch_kwargs"] == MLP_KWARGS
    assert ckpt["meta"]["task"] == ckpt["meta"]["recipe"]["task"] == {
        "name": "dir2_p1", "source": "mnist", "classes": None, "split": "dirichlet", "parts": 2, "part": 1,
        "alpha": [1.0, 5.0], "split_seed": 0}
    # trained on its part only, scored on the whole test set
    part = load_task(TaskSpec("mnist", split="dirichlet", parts=2, part=1), "train", squares.root, download=False)
    row = read_rows(summary["outputs"]["jsonl"])[0]
    assert row["class_counts"] == torch.bincount(part.labels, minlength=10).tolist()
    assert 0 < sum(row["class_counts"]) < 200 and row["arch_kwargs"] == MLP_KWARGS
    assert ckpt["meta"]["row"]["class_counts"] == row["class_counts"]
    assert Path(summary["outputs"]["jsonl"]).name == f"dir2_p1_{arch_tag('mlp', MLP_KWARGS)}.jsonl"
    test = load_task(TaskSpec("mnist"), "test", squares.root, download=False)
    with torch.no_grad():
        predictions = model(prepare_input(to_unit(test.images), InputFormat.of("mnist"))).argmax(1)
    assert (predictions == test.labels).float().mean().item() == pytest.approx(summary["test_acc"]["1"])
    # a rerun reuses it; another shape on the same part gets its own file rather than a clash
    again = train(squares, tmp_path, *DIR_PART1, "arch=mlp", "arch_kwargs={widths: [24, 12], bias: false}",
                  "seeds=[1]")
    assert again["reused"] == 1 and again["made"] == 0
    other = train(squares, tmp_path, *DIR_PART1, "arch=mlp", "arch_kwargs={widths: [16]}", "seeds=[1]")
    assert other["made"] == 1
    assert expert_file(tmp_path / "ckpt", "dir2_p1", "mlp", 1, {"widths": [16]}, *DIR_PART1[:-1]).is_file()


def test_a_task_name_reused_for_another_part_trains_its_own_expert(squares, tmp_path):
    first = train(squares, tmp_path, *DIR_PART1, "arch=mlp", "arch_kwargs={widths: [8]}", "seeds=[1]")
    second = train(squares, tmp_path, *DIR_PART1, "tasks.dir2_p1.part=0", "arch=mlp", "arch_kwargs={widths: [8]}",
                   "seeds=[1]")
    assert first["made"] == second["made"] == 1  # the other part is another recipe, never the first's file
    assert len(list((tmp_path / "ckpt" / "experts").glob("dir2_p1_mlp-*_seed1.pt"))) == 2


def test_shard_parents_see_disjoint_classes_with_full_heads(squares, tmp_path):
    counts = []
    for part in (0, 1):
        summary = train(squares, tmp_path, "tasks.s.source=mnist", "tasks.s.split=shard", "tasks.s.parts=2",
                        f"tasks.s.part={part}", "dataset=s", "arch=mlp", "arch_kwargs={widths: [8]}",
                        "seeds=[1]", ckpt=f"ckpt{part}", results=f"results{part}")
        counts.append(read_rows(summary["outputs"]["jsonl"])[0]["class_counts"])
        _, ckpt = load_model(summary_checkpoint(summary))
        assert ckpt["arch_kwargs"]["num_classes"] == 10
    assert counts[0][5:] == [0] * 5 and counts[1][:5] == [0] * 5
    full = torch.bincount(load_task(TaskSpec("mnist"), "train", squares.root, download=False).labels, minlength=10)
    assert [a + b for a, b in zip(*counts)] == full.tolist()


def summary_checkpoint(summary: dict) -> Path:
    return Path(read_rows(summary["outputs"]["jsonl"])[0]["checkpoint"])


def test_an_interrupted_expert_resumes_and_ends_with_the_uninterrupted_weights(squares, tmp_path, monkeypatch):
    """Kill a 4-epoch run after the state of its second epoch is saved; the rerun continues from there and
    ends with exactly the weights of a run that was never interrupted."""
    whole = train(squares, tmp_path, "seeds=[1]", "expert.epochs=4", ckpt="whole", results="rw")
    saves = []
    original = training.Resume.save

    def killed_after_two(self, state):
        original(self, state)
        saves.append(len(state["log"]))
        if len(saves) == 2:
            raise KeyboardInterrupt  # the kill, right after the state is on disk

    with monkeypatch.context() as patch:
        patch.setattr(training.Resume, "save", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            train(squares, tmp_path, "seeds=[1]", "expert.epochs=4", ckpt="cut", results="rc")
    path = expert_file(tmp_path / "cut", "mnist", "lenet5", 1, None, "expert.epochs=4")
    assert not path.exists() and path.with_name(path.stem + ".resume.pt").is_file()
    epochs_run = []
    original_train, original_stacked = training.train_classifier, training.train_classifiers

    def counting(*args, **kwargs):  # one seed alone (stack_seeds auto on CPU)
        log = original_train(*args, **kwargs)
        epochs_run.append(len(log))
        return log

    def counting_stacked(*args, **kwargs):
        logs = original_stacked(*args, **kwargs)
        epochs_run.extend(len(log) for log in logs)
        return logs

    monkeypatch.setattr(tsn, "train_classifier", counting)
    monkeypatch.setattr(tsn, "train_classifiers", counting_stacked)
    resumed = train(squares, tmp_path, "seeds=[1]", "expert.epochs=4", ckpt="cut", results="rc")
    assert resumed["made"] == 1 and epochs_run == [4]
    assert not path.with_name(path.stem + ".resume.pt").exists()  # cleared once the checkpoint is written
    reference = state(expert_file(tmp_path / "whole", "mnist", "lenet5", 1, None, "expert.epochs=4"))
    assert all(torch.equal(reference[k], v) for k, v in state(path).items())
    assert resumed["test_acc"] == whole["test_acc"]
    assert torch.load(path, weights_only=True)["meta"]["row"]["history"] == \
        torch.load(expert_file(tmp_path / "whole", "mnist", "lenet5", 1, None, "expert.epochs=4"),
                   weights_only=True)["meta"]["row"]["history"]


def test_a_resume_state_of_other_work_is_ignored(tmp_path):
    resume = training.Resume(tmp_path / "x.resume.pt", "recipe-a")
    resume.save({"log": [1.0]})
    assert resume.load()["log"] == [1.0]
    assert training.Resume(resume.path, "recipe-b").load() is None
    resume.path.write_bytes(b"not a torch file")
    assert resume.load() is None


@pytest.mark.parametrize("arch, kwargs, words", [
    ("lenet5", "{widths: [8]}", ["'lenet5'", "widths"]),
    ("mlp", "{num_classes: 3}", ["may not set num_classes"]),
    ("mlp", "{widths: []}", ["at least one hidden layer"]),
])
def test_bad_arch_kwargs_fail_before_loading_data(tmp_path, arch, kwargs, words):
    cfg = parse_args(TrainConfig, [f"arch={arch}", f"arch_kwargs={kwargs}", f"data_dir={tmp_path / 'no_data'}",
                                   f"ckpt_dir={tmp_path / 'c'}", "device=cpu"])
    with pytest.raises(ConfigError) as err:  # not a DataError: the data root is empty
        tsn.main(cfg)
    for word in words:
        assert word in str(err.value)


def test_expert_command_carries_arch_kwargs_and_settings():
    layout = Layout(parse_args(TrainConfig, []))
    assert layout.expert_command(ExpertId("mnist", "lenet5", {}), [1, 2]) == \
        "python train_source_networks.py dataset=mnist arch=lenet5 seeds=[1,2]"
    command = layout.expert_command(ExpertId("p", "mlp", MLP_KWARGS), [3])
    kwargs_arg = command.split("arch_kwargs=")[1].split("' ")[0].strip("'")
    assert parse_args(TrainConfig, [f"arch_kwargs={kwargs_arg}"]).arch_kwargs == MLP_KWARGS
    assert arch_tag("mlp", {}) == "mlp"
    assert arch_tag("mlp", {"bias": False, "widths": [24, 12]}) == arch_tag("mlp", MLP_KWARGS)
    assert arch_tag("mlp", {"widths": [24, 13], "bias": False}) != arch_tag("mlp", MLP_KWARGS)


# ---------------------------------------------------------------- real data (skipped without a data root)

def test_real_first5_mnist_learns(data_dir, tmp_path):
    # 2048 training images; batch 32 x 2 epochs (128 SGD steps at the paper's lr 0.01) reaches about 0.96-0.97
    # on 1000 test images over seeds 0-2 (batch 128 x 1 epoch, only 16 steps, stays near 0.35-0.55).
    summary = tsn.main(parse_args(TrainConfig, [
        "dataset=first5_mnist", "arch=lenet5", "seeds=[0]", "expert.epochs=2", "expert.batch_size=32",
        "expert.train_limit=2048", "test_limit=1000", f"data_dir={data_dir}", f"ckpt_dir={tmp_path / 'ckpt'}",
        f"results_dir={tmp_path / 'results'}", "device=cpu", "deterministic=true"]))
    assert summary["made"] == 1
    assert summary["test_acc"]["0"] > 0.9



def test_stacked_seeds_train_as_each_seed_alone(squares, tmp_path):
    """Seeds trained together (one stacked network) end with the weights each seed gets trained alone."""
    together = train(squares, tmp_path, "seeds=[1,2,3]", "expert.stack_seeds=true", ckpt="together", results="rt")
    apart = train(squares, tmp_path, "seeds=[1,2,3]", "expert.stack_seeds=false", ckpt="apart", results="ra")
    assert together["made"] == apart["made"] == 3
    for seed in (1, 2, 3):
        a = state(expert_file(tmp_path / "together", "mnist", "lenet5", seed, None, "expert.stack_seeds=true"))
        b = state(expert_file(tmp_path / "apart", "mnist", "lenet5", seed, None, "expert.stack_seeds=false"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
    assert together["test_acc"] == pytest.approx(apart["test_acc"], abs=0.02)
    rows = read_rows(together["outputs"]["jsonl"])
    assert all(r["stacked_seeds"] == 3 for r in rows)
