"""bench/summary.py: every benchmark's summary is a JSON line, a JSON file and a Markdown table the docs quote."""
from __future__ import annotations

import json
import sys

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import summary  # noqa: E402


def test_finish_prints_and_writes_the_summary_and_its_table(tmp_path, capsys):
    table = summary.markdown(["part", "seconds"], [["experts", "1.0"]], "the machine")
    result = summary.finish({"device": "cuda:0", "x": 1}, "demo", table, str(tmp_path / "demo.json"))
    assert json.loads(capsys.readouterr().out) == result == {"device": "cuda:0", "x": 1}
    assert json.loads((tmp_path / "demo.json").read_text()) == result
    assert (tmp_path / "demo.md").read_text() == "| part | seconds |\n|---|---|\n| experts | 1.0 |\n\nthe machine\n"


def test_by_default_results_go_under_results_bench_by_device(tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    summary.finish({"device": "cuda:1"}, "demo", "table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_cuda.json", "demo_cuda.md"]
