"""experiments/slim_rows.py: old tables lose their repeated configs, keep every number and config, and a second
run changes nothing; tables in the new form are left alone."""
import json

from common import read_rows, write_rows
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
