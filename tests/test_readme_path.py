"""The README's own-problem path, end to end (issue 28, item 1): its YAML file and its commands, as a new user copies
them, from experts to predictions on PNG files, on a tiny fake data root. Each command runs its script's ``main``
in-process with tiny budgets and the test's folders added; a hint for a missing artifact names the YAML file."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from torchvision.io import encode_png, write_file

import config
import merge
import predict
import train_gan
import train_pan
import train_source_networks
from common import CheckpointError, read_rows
from conftest import REPO_ROOT
from data import load_task

SCRIPTS = {"train_source_networks.py": (train_source_networks, config.TrainConfig),
           "train_gan.py": (train_gan, config.GanConfig), "train_pan.py": (train_pan, config.PanConfig),
           "merge.py": (merge, config.MergeConfig), "predict.py": (predict, config.PredictConfig)}
# budgets of a few seconds; every stage gets the sections it has, so all agree on where an artifact lives
TINY = ["expert.epochs=1", "expert.batch_size=32", "dafl.epochs=1", "dafl.iters_per_epoch=2", "dafl.batch_size=8",
        "dafl.width=8", "dafl.images=64", "gate.epochs=1", "gate.noise_samples=64", "eval_samples=32",
        "device=cpu", "deterministic=true"]


def readme_block(marker: str, fence: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return re.search(re.escape(marker) + r".*?```" + fence + r"\n(.*?)```", text, re.S).group(1)


def commands() -> list[list[str]]:
    block = readme_block("<!-- the custom problem's path", "")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def run(argv: list[str], folders: list[str]) -> dict:
    """One README command (``python SCRIPT ARGS``) in-process, with the test's folders and tiny budgets."""
    assert argv[0] == "python" and argv[1] in SCRIPTS, argv
    module, cls = SCRIPTS[argv[1]]
    fields = {f.name for f in config.dataclasses.fields(cls)}
    extra = [arg for arg in [*folders, *TINY] if arg.partition("=")[0].split(".")[0] in fields]
    return module.main(config.parse_args(cls, [*argv[2:], *extra]))


@pytest.fixture
def user(make_fake_root, tmp_path, monkeypatch):
    """A user's folder (the working directory): the README's my.yaml and a folder of PNGs (MNIST digits and CIFAR
    pets); the arguments every command gets: the test's data root."""
    fake = make_fake_root(squares=True, n_cifar=40)
    monkeypatch.chdir(tmp_path)
    Path("my.yaml").write_text(readme_block("Put it in a file, say `my.yaml`", "yaml"))
    images = Path("my_images")
    images.mkdir()
    yaml_cfg = config.parse_args(config.MergeConfig, ["my.yaml"])
    for task in ("first5_mnist", "cifar_pets"):
        test = load_task(yaml_cfg.tasks[task], "test", str(fake.root))
        for i, image in enumerate(test.images[:2]):
            write_file(str(images / f"{task}_{i}.png"), encode_png(image))
    return [f"data_dir={fake.root}"]  # checkpoints and rows go where the defaults put them, under tmp_path


def test_the_readme_path_goes_from_its_yaml_to_predictions(user, capsys):
    steps = commands()
    assert [argv[1] for argv in steps] == ["train_source_networks.py", "train_source_networks.py", "train_gan.py",
                                           "train_pan.py", "merge.py", "predict.py"]
    assert all(argv[2] == "my.yaml" for argv in steps)

    # before any training, the table's error names the commands that make its experts, with the user's file
    with pytest.raises(CheckpointError) as missing:
        run(steps[4], user)
    assert "python train_source_networks.py my.yaml dataset=cifar_pets arch=lenet5_half seeds=[0]" in \
           str(missing.value)

    for argv in steps[:4]:
        assert run(argv, user)["made"] > 0
    table = run(steps[4], user)
    rows = read_rows(table["outputs"]["jsonl"])
    assert {r["strategy"] for r in rows} >= {"naive", "energy", "gate_hard(gate=universal,regime=synthetic)",
                                             "oracle"}
    assert Path(table["outputs"]["jsonl"]) == Path("runs/merge/my_problem.jsonl")  # the README's word: runs/
    capsys.readouterr()
    answer = run(steps[5], user)
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert answer["images"] == 4 and [Path(line[0]).name for line in printed] == [
        "cifar_pets_0.png", "cifar_pets_1.png", "first5_mnist_0.png", "first5_mnist_1.png"]
    assert all(line[2] in ("first5_mnist", "cifar_pets") for line in printed)


def test_make_missing_makes_what_the_table_needs_in_one_command(user, capsys):
    """``python merge.py my.yaml problem=my_problem make_missing=true``: the experts (here; sets and gates alike)
    are made by the commands the missing-checkpoint error names, each in its own process, then the table."""
    argv = ["python", "merge.py", "my.yaml", "problem=my_problem", "seeds=[0]", "strategies=[naive,energy]",
            "make_missing=true"]
    table = run(argv, user)
    out = capsys.readouterr().out
    made = [line for line in out.splitlines() if line.startswith("make_missing: python")]
    assert made == ["make_missing: python train_source_networks.py my.yaml dataset=first5_mnist arch=lenet5 "
                    "seeds=[0] expert.epochs=1 expert.batch_size=32",
                    "make_missing: python train_source_networks.py my.yaml dataset=cifar_pets arch=lenet5_half "
                    "seeds=[0] expert.epochs=1 expert.batch_size=32"]
    assert {r["strategy"] for r in read_rows(table["outputs"]["jsonl"])} >= {"naive", "energy", "oracle"}
    assert run(argv, user)["made"] == 0  # all there now: nothing to make, every row reused
