"""experiments/slim_rows.py: old tables lose their repeated configs, keep every number and config, and a second
run changes nothing; tables in the new form are left alone."""
import json

from common import read_rows, write_rows
from config import MergeConfig, parse_args, row_config
from conftest import REPO_ROOT
from experiments.slim_rows import main as slim_main


def test_old_rows_are_slimmed_losslessly(tmp_path):
    config_a = {"problem": "p", "strategies": ["naive", "energy"], "expert": {"epochs": 10}}
    config_b = {**config_a, "expert": {"epochs": 2}}
    old = [{"strategy": "naive", "acc": 0.9, "config": config_a}, {"strategy": "energy", "acc": 0.8, "config": config_a},
           {"strategy": "naive", "acc": 0.7, "config": config_b}]
    write_rows(tmp_path / "table", old)
    slim_main([str(tmp_path)])
    rows = read_rows(tmp_path / "table.jsonl")
    configs = json.loads((tmp_path / "table.configs.json").read_text())
    assert [r["acc"] for r in rows] == [0.9, 0.8, 0.7]
    assert all("config" not in r for r in rows)
    assert [configs[r["config_digest"]] for r in rows] == [config_a, config_a, config_b]
    assert len(configs) == 2
    assert "config" not in (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    before = (tmp_path / "table.jsonl").read_text()
    slim_main([str(tmp_path)])
    assert (tmp_path / "table.jsonl").read_text() == before


def test_new_rows_are_left_alone(tmp_path):
    new = [{"strategy": "naive", "acc": 0.9, "config_digest": "abcd1234", "config": {"seeds": [1]}}]
    write_rows(tmp_path / "table", new)
    slim_main([str(tmp_path)])
    assert read_rows(tmp_path / "table.jsonl") == new
    assert not (tmp_path / "table.configs.json").exists()


def test_rows_keep_only_the_task_entries_their_run_read(tmp_path):
    """A fusion table's rows repeated every split of experiments/fusion_parents.yaml; they keep their problem's
    experts' tasks (and an expert row its own), every other key as it was, and a second run changes nothing."""
    tasks = {f"t{i}": {"source": "mnist", "part": i} for i in range(5)}
    problem = {"p": {"shared_labels": True, "experts": [{"task": "t1"}, {"task": "t3"}]}}
    rows = [{"strategy": "a", "acc": 0.5, "config_digest": "d", "config": {"tasks": tasks, "problems": problem}},
            {"task": "t4", "acc": 0.25, "config_digest": "e", "config": {"tasks": tasks, "seeds": [1]}},
            {"strategy": "b", "acc": 0.75, "config_digest": "d", "config": {"seeds": [1]}}]
    write_rows(tmp_path / "table", rows)
    slim_main([str(tmp_path)])
    trimmed = read_rows(tmp_path / "table.jsonl")
    assert list(trimmed[0]["config"]["tasks"]) == ["t1", "t3"] and trimmed[0]["config"]["problems"] == problem
    assert list(trimmed[1]["config"]["tasks"]) == ["t4"] and trimmed[1]["config"]["seeds"] == [1]
    assert trimmed[2] == rows[2] and [r["acc"] for r in trimmed] == [0.5, 0.25, 0.75]
    before = (tmp_path / "table.jsonl").read_text()
    slim_main([str(tmp_path)])
    assert (tmp_path / "table.jsonl").read_text() == before


def test_new_rows_leave_out_task_entries_their_run_does_not_read():
    cfg = parse_args(MergeConfig, [str(REPO_ROOT / "experiments" / f) for f in ("fusion_parents.yaml",
                                                                                 "fusion_resnet_noniid2.yaml")])
    tasks = row_config(cfg)["config"]["tasks"]
    assert set(tasks) == {"cifar10_dir2_p0", "cifar10_dir2_p1"}
