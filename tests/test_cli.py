"""The command line as a user meets it, through subprocesses (issue 28, item 5): ``--help`` on every script,
argument and YAML errors in one line before torch loads, Ctrl-C in one line, and a resumed run that says so."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPTS = ["train_source_networks.py", "train_gan.py", "train_pan.py", "merge.py", "predict.py",
           "experiments/reproduce.py"]


def run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_its_default_and_range_and_exits_0(script, flag):
    done = run(script, flag)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith(("seeds=[", "seed=")) and (">= 0" in line or "at least 0" in line)
               for line in lines)
    assert any(line.strip().startswith("device=auto") and "cuda:N" in line for line in lines)
    if script != "experiments/reproduce.py":  # a stage names what its settings sections hold, one key a line
        assert any(line.strip().startswith("expert.epochs=10") and "at least 1" in line for line in lines)


def test_data_py_help_exits_0_and_creates_nothing(tmp_path):
    done = run(str(REPO_ROOT / "data.py"), "--help", cwd=tmp_path)
    assert done.returncode == 0 and "DATA_ROOT" in done.stdout
    assert not list(tmp_path.iterdir())  # "--help" was not taken for a data root


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  pets: {source: cifar10, classes: [3, 5]\nproblems: {}\n")
    line = one_error_line(run("merge.py", str(bad)))
    assert str(bad) in line and "line 3 column" in line


@pytest.mark.parametrize("script", ["train_source_networks.py", "merge.py"])
def test_a_negative_seed_is_refused_at_load(script):
    assert "negative seed" in one_error_line(run(script, "seeds=[-1]"))


@pytest.mark.parametrize("args", [["expert.epochs=abc"], ["problem=nope"], ["seeds=[-1]"], ["epochs=3"]])
def test_argument_errors_come_before_torch_loads_and_before_the_config_dump(args):
    done = run("-X", "importtime", "merge.py", *args)
    assert done.returncode == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "yaml" in imported and "torch" not in imported
    assert done.stdout == ""  # no config dump
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_ctrl_c_ends_in_one_line_and_the_rerun_says_it_resumed(make_fake_root, tmp_path):
    fake = make_fake_root(squares=True, n_cifar=0)
    args = ["train_source_networks.py", f"data_dir={fake.root}", f"ckpt_dir={tmp_path / 'ckpt'}",
            f"results_dir={tmp_path / 'runs'}", "seeds=[1]", "expert.epochs=60", "expert.batch_size=50",
            "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell's background job (CI's runner may be one) starts with SIGINT ignored, which the child would inherit
    # and Python would then leave ignored: the child gets the default disposition back, as a terminal's command has
    process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "ckpt").rglob("*.resume.pt")):  # the first epoch's resume point
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: kept ") and str(tmp_path / "ckpt") in last and "again to resume" in last

    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stdout
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["why_made"] == {"resumed from its last saved epoch": 1}
    assert not list((tmp_path / "ckpt").rglob("*.resume.pt"))  # cleared once the checkpoint is written


def test_an_interrupted_predict_says_it_wrote_nothing():
    import cli
    import config

    line = cli.interrupted_line(config.PredictConfig())
    assert line.startswith("interrupted: nothing was written; run `python ") and line.endswith(" again")
    assert "resume point" in cli.interrupted_line(config.MergeConfig())


def test_train_accepts_a_yaml_with_problems_and_merge_rules(tmp_path):
    """One file serves every stage: the training stage skips what only merge.py reads (issue 28, item 1)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("tasks:\n  pets: {source: cifar10, classes: [3, 5]}\nproblems:\n  my_problem:\n"
                    "    experts: [{task: first5_mnist}, {task: pets}]\nstrategies: [naive, energy]\n")
    done = run("train_source_networks.py", str(mine), "dataset=pets", "arch=resnet18x", "seeds=[0]")
    assert "unknown arch 'resnet18x'" in one_error_line(done)  # got past the YAML to the first real error
