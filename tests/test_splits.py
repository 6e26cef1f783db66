"""Tasks that keep one part of a split of their training set (data.split_parts): the parents of weight-space fusion."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from archs import build_model
from common import CheckpointError, save_checkpoint
from config import ConfigError, TaskSpec, TrainConfig, parse_args
from data import InputFormat, check_split, load_task, split_alpha, split_parts, task_identity
from problems import Problem
from artifacts import Layout

REPO_ROOT = Path(__file__).resolve().parent.parent


def dirichlet(parts: int, **kwargs) -> TaskSpec:
    return TaskSpec("mnist", split="dirichlet", parts=parts, **kwargs)


def shard(parts: int, classes: list[int] | None = None) -> TaskSpec:
    return TaskSpec("mnist", classes, split="shard", parts=parts)


def shuffled_labels(per_class: int, n_classes: int = 10, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(per_class * n_classes) % n_classes
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def counts(task: TaskSpec, labels: torch.Tensor, n_classes: int = 10) -> np.ndarray:
    """Training samples per (class, part)."""
    return np.stack([np.bincount(labels[p].numpy(), minlength=n_classes) for p in split_parts(task, labels)], 1)


# ---------------------------------------------------------------- partitions

@pytest.mark.parametrize("task", [dirichlet(2), dirichlet(4), dirichlet(8), dirichlet(3, alpha=[0.1, 0.1, 0.1]),
                                  shard(2), shard(3), shard(2, [7, 3, 5])],
                         ids=["dir2", "dir4", "dir8", "dir3_sparse", "shard2", "shard3", "shard2_subset"])
def test_parts_partition_the_training_set_exactly(task):
    n_classes = 10 if task.classes is None else len(task.classes)
    labels = shuffled_labels(37, n_classes)
    parts = split_parts(task, labels)
    assert len(parts) == task.parts
    for p in parts:
        assert p.dtype == torch.int64
        assert torch.equal(p, p.sort().values)  # dataset order within a part
    everything = torch.cat(parts)
    assert len(everything) == len(labels)  # no sample in two parts ...
    assert torch.equal(everything.sort().values, torch.arange(len(labels)))  # ... and none left out


def test_dirichlet_is_deterministic_and_follows_split_seed():
    labels = shuffled_labels(50)
    first, again = split_parts(dirichlet(4), labels), split_parts(dirichlet(4), labels)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = split_parts(dirichlet(4, split_seed=1), labels)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_dirichlet_default_alpha_is_linspace_1_to_5():
    assert split_alpha(dirichlet(4)) == pytest.approx([1, 7 / 3, 11 / 3, 5])
    assert split_alpha(dirichlet(2)) == [1.0, 5.0]
    assert split_alpha(dirichlet(2, alpha=[2, 3])) == [2.0, 3.0]


def test_dirichlet_shares_are_uneven_and_follow_alpha():
    table = counts(dirichlet(4), shuffled_labels(2000))
    shares = table / table.sum(1, keepdims=True)  # [class, part]
    assert (table.sum(1) == 2000).all()
    # non-IID: a part's share differs from class to class ...
    assert (shares.max(0) - shares.min(0) > 0.1).all()
    # ... and alpha = linspace(1, 5, 4) gives the last part far more data than the first (expected 5x)
    assert table[:, 3].sum() > 2 * table[:, 0].sum()
    assert (table.sum(0) > 0).all()


def test_dirichlet_shares_a_class_alike_in_any_task_of_its_source():
    """The seed names the source class, so digit 7 is cut the same way in a 10-class and a 2-class task."""
    labels10 = shuffled_labels(40)
    labels2 = labels10[(labels10 == 7) | (labels10 == 3)]
    local2 = (labels2 == 3).long()  # classes [7, 3]: 7 -> 0, 3 -> 1
    ten = counts(dirichlet(3), labels10)
    two = counts(TaskSpec("mnist", [7, 3], split="dirichlet", parts=3), local2, n_classes=2)
    assert (two[0] == ten[7]).all() and (two[1] == ten[3]).all()


def test_shard_deals_contiguous_class_groups():
    labels = shuffled_labels(20)
    for task, groups in ((shard(2), [range(0, 5), range(5, 10)]),
                         (shard(3), [range(0, 4), range(4, 7), range(7, 10)])):
        for part, group in zip(split_parts(task, labels), groups):
            assert set(labels[part].tolist()) == set(group)
            assert len(part) == 20 * len(group)


# ---------------------------------------------------------------- load_task

@pytest.fixture
def squares(make_fake_root):
    return make_fake_root(squares=True, n_cifar=0)


def test_load_task_keeps_its_part_the_label_space_and_the_whole_test_set(squares):
    full_train = load_task(TaskSpec("mnist"), "train", squares.root, download=False)
    full_test = load_task(TaskSpec("mnist"), "test", squares.root, download=False)
    for make in (dirichlet, shard):
        parts = [load_task(dataclasses.replace(make(2), part=i), "train", squares.root, download=False)
                 for i in range(2)]
        assert sum(len(p.labels) for p in parts) == len(full_train.labels)
        assert all(p.classes == list(range(10)) for p in parts)  # the head stays 10-way
        keep = split_parts(make(2), full_train.labels)
        for p, index in zip(parts, keep):
            assert torch.equal(p.images, full_train.images[index]) and torch.equal(p.labels, full_train.labels[index])
        test = load_task(make(2), "test", squares.root, download=False)
        assert torch.equal(test.images, full_test.images) and torch.equal(test.labels, full_test.labels)
    shard1 = load_task(TaskSpec("mnist", split="shard", parts=2, part=1), "train", squares.root, download=False)
    assert set(shard1.labels.tolist()) == {5, 6, 7, 8, 9}


def test_limit_applies_to_the_part(squares):
    task = TaskSpec("mnist", split="dirichlet", parts=2, part=1)
    whole = load_task(task, "train", squares.root, download=False)
    short = load_task(task, "train", squares.root, limit=7, download=False)
    assert torch.equal(short.images, whole.images[:7])


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("spec, words", [
    (dict(split="iid"), ["'iid'", "full", "dirichlet", "shard"]),
    (dict(split="dirichlet", parts=4, part=4), ["part 4", "parts=4", "0..3"]),
    (dict(split="shard", parts=2, part=-1), ["part -1", "0..1"]),
    (dict(split="dirichlet", parts=0), ["parts must be at least 1"]),
    (dict(split="dirichlet", parts=3, alpha=[1.0, 2.0]), ["alpha has 2 values", "parts=3"]),
    (dict(split="dirichlet", parts=2, alpha=[1.0, 0.0]), ["positive", "[1.0, 0.0]"]),
    (dict(parts=4), ["split: full", "parts"]),
    (dict(split_seed=3), ["split: full", "split_seed"]),
    (dict(split="shard", parts=2, alpha=[1.0, 1.0]), ["alpha", "only to split: dirichlet"]),
    (dict(split="shard", parts=3, classes=[1, 2]), ["2 classes", "parts=3"]),
])
def test_bad_split_settings_are_config_errors(squares, spec, words):
    task = TaskSpec("mnist", **spec)
    with pytest.raises(ConfigError) as err:
        check_split(task, "my_task")
    assert "'my_task'" in str(err.value)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ConfigError):  # loading either split refuses it as well
        load_task(task, "test", squares.root, download=False)


def test_split_tasks_from_the_command_line():
    cfg = parse_args(TrainConfig, ["tasks.p.source=mnist", "tasks.p.split=dirichlet", "tasks.p.part=3",
                                   "tasks.p.parts=4", "tasks.p.alpha=[1,1,2,2]", "tasks.p.split_seed=5"])
    assert cfg.tasks["p"] == TaskSpec("mnist", None, "dirichlet", 4, 3, [1.0, 1.0, 2.0, 2.0], 5)
    assert all(isinstance(a, float) for a in cfg.tasks["p"].alpha)
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, ["tasks.p.source=mnist", "tasks.p.parts=two"])
    assert "tasks.p.parts" in str(err.value)


def test_fusion_parents_yaml_defines_every_part():
    cfg = parse_args(TrainConfig, [str(REPO_ROOT / "experiments" / "fusion_parents.yaml")])
    expected = {f"mnist_dir{k}_p{i}": ("mnist", "dirichlet", k, i) for k in (2, 4, 8) for i in range(k)}
    expected.update({f"mnist_shard2_p{i}": ("mnist", "shard", 2, i) for i in range(2)})
    expected.update({f"cifar10_dir{k}_p{i}": ("cifar10", "dirichlet", k, i) for k in (2, 4) for i in range(k)})
    expected.update({f"cifar10_shard2_p{i}": ("cifar10", "shard", 2, i) for i in range(2)})
    for name, (source, split, parts, part) in expected.items():
        task = cfg.tasks[name]
        assert (task.source, task.classes, task.split, task.parts, task.part, task.alpha) == \
            (source, None, split, parts, part, None)
        check_split(task, name)
    # all of CIFAR-10 under two names: two residual parents of one arch on the full data (fusion_resnet_full.yaml)
    full = {"cifar10_a", "cifar10_b"}
    assert all((cfg.tasks[n].source, cfg.tasks[n].classes, cfg.tasks[n].split) == ("cifar10", None, "full") for n in full)
    assert set(cfg.tasks) - set(TrainConfig().tasks) == set(expected) | full


# ---------------------------------------------------------------- task identity (checkpoint meta)

def test_task_identity_is_unchanged_without_a_split():
    assert task_identity("first5_mnist", TaskSpec("mnist", [0, 1, 2, 3, 4])) == \
        {"name": "first5_mnist", "source": "mnist", "classes": [0, 1, 2, 3, 4]}
    assert task_identity("mnist", TaskSpec("mnist")) == {"name": "mnist", "source": "mnist", "classes": None}


def test_task_identity_of_a_split_names_the_part():
    assert task_identity("d", dirichlet(2, part=1, split_seed=4)) == {
        "name": "d", "source": "mnist", "classes": None, "split": "dirichlet", "parts": 2, "part": 1,
        "alpha": [1.0, 5.0], "split_seed": 4}
    assert task_identity("s", shard(2)) == {"name": "s", "source": "mnist", "classes": None, "split": "shard",
                                            "parts": 2, "part": 0}
    with pytest.raises(ConfigError):
        task_identity("bad", dirichlet(2, part=2))


def test_an_experts_split_is_part_of_its_recipe(tmp_path):
    """A changed split (here the Dirichlet alpha) names another expert file, so an expert trained on other
    data is never loaded in its place; load_experts also compares the stored task with the config's."""
    specs = {"old": TaskSpec("mnist", [0, 1]), "part": TaskSpec("mnist", [2, 3], split="dirichlet", parts=2)}
    layout = Layout(TrainConfig(ckpt_dir=str(tmp_path), tasks=specs))
    problem = Problem("p", list(specs), ["lenet5", "lenet5"], [], [], 4, specs)
    for name, spec in specs.items():
        model = build_model("lenet5", in_channels=1, num_classes=2)
        save_checkpoint(layout.expert_path(problem.experts[list(specs).index(name)], 0), model, "lenet5",
                        {"in_channels": 1, "num_classes": 2}, {},
                        {"task": task_identity(name, spec), "input_format": InputFormat.of("mnist").as_dict()})
    models, _ = problem.load_experts(layout, 0, torch.device("cpu"))
    assert len(models) == 2
    changed = {**specs, "part": TaskSpec("mnist", [2, 3], split="dirichlet", parts=2, alpha=[1.0, 1.0])}
    other = Layout(TrainConfig(ckpt_dir=str(tmp_path), tasks=changed))
    assert other.expert_path(problem.experts[1], 0) != layout.expert_path(problem.experts[1], 0)
    assert other.expert_path(problem.experts[0], 0) == layout.expert_path(problem.experts[0], 0)
    with pytest.raises(CheckpointError) as err:
        Problem("p", list(specs), ["lenet5", "lenet5"], [], [], 4, changed).load_experts(other, 0, torch.device("cpu"))
    assert "does not exist" in str(err.value) and "python train_source_networks.py dataset=part" in str(err.value)
