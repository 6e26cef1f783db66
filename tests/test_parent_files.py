"""Fusion parents from files (parent_files.py): state dicts whose module names differ from ours, rebuilt through a level
map; they fuse like the same parents trained here, and what does not fit fails at load in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import merge
import problems
from archs.mlp import MLP
from archs.resnet import ResNet
from common import read_rows
from config import ConfigError, ExpertFile, MergeConfig, parse_args
from conftest import SHARD_TASKS_YAML, build_fake_root
from data import InputFormat
from expert_files import ExpertFileError
from external_models import LevelMLP, NamedResNet
from fusion import kf_linear, otfusion
from parent_files import family_of, load_fusion_parent

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


RESNET_RENAME = {"conv1": "body.0", "bn1": "body.1", "linear": "fc",
                 **{f"layer{s + 1}.{b}": f"body.{3 + 2 * s + b}" for s in range(4) for b in range(2)},
                 **{f"layer{s}.0.downsample": f"body.{2 * s + 1}.shortcut" for s in (2, 3, 4)}}


def resnet_entry(path, **changes) -> ExpertFile:
    fmt = InputFormat.of("cifar10")
    spec = ExpertFile(str(path), channels=3, size=32, mean=list(fmt.mean), std=list(fmt.std),
                      classes=[str(c) for c in range(10)], model="external_models:NamedResNet",
                      model_kwargs={"norm": True}, rename=RESNET_RENAME)
    return dataclasses.replace(spec, **changes)


def save_named_resnet(path, seed: int, norm: bool = True) -> NamedResNet:
    torch.manual_seed(seed)
    model = NamedResNet(norm=norm)
    with torch.no_grad():  # running statistics other than batch norm's initial ones, so that they must be carried
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


@pytest.mark.parametrize("norm", [True, False])
def test_a_rename_map_rebuilds_a_foreign_resnet_as_ours(tmp_path, norm):
    model = save_named_resnet(tmp_path / "r.pt", 0, norm)
    parent = load_fusion_parent(resnet_entry(tmp_path / "r.pt", model_kwargs={"norm": norm}), InputFormat.of("cifar10"),
                                "here")
    assert type(parent) is ResNet and family_of(parent) == "resnet"
    assert (parent.depth, parent.width, parent.batch_norm, parent.bias) == (18, 0.125, norm, False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(parent(x), model(x))


def test_a_renamed_resnet_is_walked_by_fusion(tmp_path):
    """OTFusion of a renamed ResNet with itself gives back its function: the rebuilt parent is one fusion walks."""
    model = save_named_resnet(tmp_path / "r.pt", 0)
    parent = load_fusion_parent(resnet_entry(tmp_path / "r.pt"), InputFormat.of("cifar10"), "here")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fused = otfusion([parent, parent], x, cost="activation")
    with torch.no_grad():
        torch.testing.assert_close(fused(x).float(), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes, words", [
    ({"rename": {k: v for k, v in RESNET_RENAME.items() if k != "layer4.1"}},
     ["blocks body.3 on number 7", "8 (depth 18)", "placed nowhere: layer4.1.conv1.weight"]),
    ({"rename": {k: v for k, v in RESNET_RENAME.items() if k != "layer3.0.downsample"}},
     ["'body.7.shortcut.0.weight' of a depth-18 ResNet unfilled", "layer3.0.downsample.0.weight"]),
    ({"rename": {**RESNET_RENAME, "layer4.1": "body.3"}}, ["maps both 'layer1.0.", "and 'layer4.1."]),
    ({"rename": {k: v for k, v in RESNET_RENAME.items() if k != "conv1"}}, ["no 'body.0.weight'", "body.0 the stem"]),
    ({"rename": {"conv1": "body.0", "bn1": "body.1", "linear": "fc", "layer1.0": "body.3"}},
     ["the blocks body.3 on number 1", "16 (depth 34)"]),
    ({"rename": {**RESNET_RENAME, "layer2.0.conv2": "body.5.conv1", "layer2.0.conv1": "body.5.conv2"}},
     ["the file's 'layer2.0.conv2.weight' (as 'body.5.conv1.weight') is (16, 16, 3, 3)", "needs (16, 8, 3, 3)"]),
    ({"levels": ["conv1", "linear"]}, ["give levels", "or rename", "not both"]),
    ({"classes": ["a", "b"]}, ["returns 10 logits per image", "lists 2 classes"]),
    ({"crop": 2, "size": 28}, ["crop must be 0"]),
])
def test_a_rename_that_does_not_fit_fails_at_load_in_one_line(tmp_path, changes, words):
    save_named_resnet(tmp_path / "r.pt", 0)
    with pytest.raises(ExpertFileError) as err:
        load_fusion_parent(resnet_entry(tmp_path / "r.pt", **changes), InputFormat.of("cifar10"), "problem 'p', expert 0")
    message = str(err.value)
    assert "\n" not in message and message.startswith("problem 'p', expert 0")
    assert all(word in message for word in words), message
