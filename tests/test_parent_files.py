"""Fusion parents from files (parent_files.py): state dicts whose module names differ from ours, rebuilt through a level
map; they fuse like the same parents trained here, and what does not fit fails at load in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import merge
import problems
from archs.mlp import MLP
from common import read_rows
from config import ConfigError, ExpertFile, MergeConfig, parse_args
from conftest import SHARD_TASKS_YAML, build_fake_root
from data import InputFormat
from expert_files import ExpertFileError
from external_models import LevelMLP
from fusion import kf_linear
from parent_files import load_fusion_parent

MNIST = InputFormat(1, (0.1307,), (0.3081,))
CLASSES = [str(d) for d in range(10)]
HIDDEN = 16


def save_parent(path, seed: int) -> LevelMLP:
    torch.manual_seed(seed)
    model = LevelMLP(HIDDEN)
    torch.save(model.state_dict(), path)
    return model


def entry(path, **changes) -> ExpertFile:
    spec = ExpertFile(str(path), channels=1, size=28, crop=2, mean=[0.1307], std=[0.3081], classes=CLASSES,
                      model="external_models:LevelMLP", model_kwargs={"hidden": HIDDEN}, levels=["level1.1", "level2.1"])
    return dataclasses.replace(spec, **changes)


def padded(n: int, seed: int = 0) -> torch.Tensor:
    """Normalised MNIST-like inputs as the problems give them: 28x28 digits padded to 32x32."""
    digits = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.pad(digits, (2, 2, 2, 2), value=-0.1307 / 0.3081)


def test_a_level_map_rebuilds_a_foreign_mlp_as_ours(tmp_path):
    model = save_parent(tmp_path / "a.pt", 0)
    parent = load_fusion_parent(entry(tmp_path / "a.pt"), MNIST, "here")
    assert type(parent) is MLP and parent.widths == [HIDDEN] and parent.crop == 2
    x = padded(5)
    with torch.no_grad():
        torch.testing.assert_close(parent(x), model(x[..., 2:30, 2:30]))


def test_parents_from_files_fuse_like_the_same_parents_trained_here(tmp_path):
    for k in range(2):
        save_parent(tmp_path / f"{k}.pt", k)
    files = [load_fusion_parent(entry(tmp_path / f"{k}.pt"), MNIST, "here") for k in range(2)]
    ours = []
    for k in range(2):  # the same weights in this repository's MLP, as train_source_networks.py would have saved them
        mlp = MLP(1, 10, [HIDDEN])
        mlp.load_state_dict({"layers.0.weight": files[k].layers[0].weight, "layers.0.bias": files[k].layers[0].bias,
                             "layers.1.weight": files[k].layers[1].weight, "layers.1.bias": files[k].layers[1].bias})
        ours.append(mlp.eval())
    x, test = padded(300, seed=1), padded(50, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(kf_linear(files, x)(test), kf_linear(ours, x)(test))


@pytest.mark.parametrize("changes, words", [
    ({"levels": ["level1.1", "level3.1"]}, ["level 1 'level3.1' is not a module", "level1.1, level2.1"]),
    ({"levels": ["level2.1", "level1.1"]}, ["level 0 'level2.1' takes 16 inputs", "1x28x28 input gives 784"]),
    ({"levels": ["level1", "level2.1"]}, ["level 0 'level1' is a Sequential"]),
    ({"levels": ["level2.1"]}, ["no hidden level"]),
    ({"levels": None}, ["give levels"]),
    ({"mean": [0.5]}, ["its source's format", "mean [0.1307]"]),
    ({"size": 32}, ["size + 2 x crop must be 32"]),
    ({"model": None}, ["must be a state dict"]),
])
def test_what_does_not_fit_fails_at_load_in_one_line(tmp_path, changes, words):
    save_parent(tmp_path / "a.pt", 0)
    with pytest.raises(ExpertFileError) as err:
        load_fusion_parent(entry(tmp_path / "a.pt", **changes), MNIST, "problem 'p', expert 0")
    message = str(err.value)
    assert "\n" not in message and message.startswith("problem 'p', expert 0")
    assert all(word in message for word in words), message


def test_fusion_parents_from_files_run_through_merge(tmp_path):
    fake = build_fake_root(tmp_path / "data", n_mnist_train=400, n_mnist_test=60, squares=True, n_cifar=0)
    files = []
    for k in range(2):
        save_parent(tmp_path / f"p{k}.pt", k)
        files.append(f"{{path: {tmp_path / f'p{k}.pt'}, channels: 1, size: 28, crop: 2, mean: [0.1307], "
                     f"std: [0.3081], classes: {CLASSES}, model: 'external_models:LevelMLP', "
                     f"model_kwargs: {{hidden: {HIDDEN}}}, levels: [level1.1, level2.1]}}")
    (tmp_path / "p.yaml").write_text(SHARD_TASKS_YAML + f"""problems:
  from_files:
    shared_labels: true
    experts:
      - {{task: s_p0, arch: mlp, file: {files[0]}}}
      - {{task: s_p1, arch: mlp, file: {files[1]}}}
  wrong_arch:
    shared_labels: true
    experts:
      - {{task: s_p0, file: {files[0]}}}
      - {{task: s_p1, arch: mlp, file: {files[1]}}}
""")

    def cfg(problem: str) -> MergeConfig:
        return parse_args(MergeConfig, [str(tmp_path / "p.yaml"), f"problem={problem}", "seeds=[1]",
                                        "strategies=[{name: parent, index: 0},kf_linear,otfusion,ensemble]",
                                        f"data_dir={fake.root}", f"ckpt_dir={tmp_path / 'ckpt'}",
                                        f"results_dir={tmp_path / 'results'}", "device=cpu", "fusion_samples=100"])

    rows = {r["strategy"]: r for r in read_rows(merge.main(cfg("from_files"))["outputs"]["jsonl"])}
    assert {"kf_linear(importance=uniform,ridge=0.0)", "otfusion(cost=weight)", "ensemble"} <= set(rows)
    assert rows["kf_linear(importance=uniform,ridge=0.0)"]["fusion_samples"] == 100
    with pytest.raises(ConfigError, match="write arch: mlp"):
        problems.describe_problem("wrong_arch", cfg("wrong_arch").problems["wrong_arch"], cfg("wrong_arch").tasks)
