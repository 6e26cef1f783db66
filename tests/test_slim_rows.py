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
    rows = [json.loads(line) for line in (tmp_path / "table.jsonl").read_text().splitlines()]  # as stored
    configs = json.loads((tmp_path / "table.configs.json").read_text())
    assert [r["acc"] for r in rows] == [0.9, 0.8, 0.7]
    assert all("config" not in r for r in rows)
    assert [configs[r["config_digest"]] for r in rows] == [config_a, config_a, config_b]
    assert len(configs) == 2
    assert [r["config"] for r in read_rows(tmp_path / "table.jsonl")] == [config_a, config_a, config_b]  # read back
    assert "config" not in (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    before = (tmp_path / "table.jsonl").read_text()
    slim_main([str(tmp_path)])
    assert (tmp_path / "table.jsonl").read_text() == before


def test_new_rows_are_left_alone(tmp_path):
    new = [{"strategy": "naive", "acc": 0.9, "config_digest": "abcd1234", "config": {"seeds": [1]}}]
    write_rows(tmp_path / "table", new)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    slim_main([str(tmp_path)])
    assert read_rows(tmp_path / "table.jsonl") == new
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_write_rows_keeps_each_config_once_beside_the_table_and_read_rows_puts_it_back(tmp_path):
    a, b = {"seeds": [1]}, {"seeds": [2]}
    rows = [{"seed": 1, "acc": 0.5, "config_digest": "d1", "config": a},
            {"seed": 2, "acc": 0.6, "config_digest": "d1", "config": a},
            {"seed": 3, "acc": 0.7, "config_digest": "d2", "config": b},
            {"seed": 4, "acc": 0.8, "config_digest": "d2", "config": {"seeds": [9]}},  # a digest naming two configs
            {"seed": 5, "acc": 0.9, "config": a}]  # no digest: keeps its config
    write_rows(tmp_path / "table", rows)
    stored = [json.loads(line) for line in (tmp_path / "table.jsonl").read_text().splitlines()]
    assert ["config" in r for r in stored] == [False, False, False, True, True]
    assert json.loads((tmp_path / "table.configs.json").read_text()) == {"d1": a, "d2": b}
    assert read_rows(tmp_path / "table.jsonl") == rows
    assert "config" in (tmp_path / "table.csv").read_text().splitlines()[0].split(",")  # the CSV keeps every config
    write_rows(tmp_path / "table", [{"seed": 1, "acc": 0.5}])  # a rewrite with no config leaves no stale file
    assert not (tmp_path / "table.configs.json").exists()


def test_tables_written_with_inline_configs_move_them_beside_the_table(tmp_path):
    rows = [{"seed": s, "acc": 0.5, "config_digest": "d1", "config": {"seeds": [1, 2]}} for s in (1, 2)]
    (tmp_path / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    slim_main([str(tmp_path)])
    assert "config\"" not in (tmp_path / "table.jsonl").read_text()
    assert read_rows(tmp_path / "table.jsonl") == rows


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
