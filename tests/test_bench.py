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


def write_rows(folder, table: str, rows: list[dict]) -> None:
    (folder / "merge").mkdir(parents=True, exist_ok=True)
    (folder / "merge" / f"{table}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_profiles_counts_the_rows_two_runs_share_and_where_they_differ(tmp_path, monkeypatch):
    import compare_profiles

    def row(seed, label, acc, upstream="u1"):
        return {"seed": seed, "strategy": label, "acc": acc, "acc_report": acc, "key": {"upstream": upstream}}

    first, second = tmp_path / "cpu", tmp_path / "cpu3"
    write_rows(first, "t", [row(1, "naive", 0.5), row(1, "oracle", 0.9), row(2, "naive", 0.6)])
    write_rows(second, "t", [row(1, "naive", 0.5), row(1, "oracle", 0.8, "u2"), row(3, "naive", 0.7)])
    write_rows(second, "only_here", [row(1, "naive", 0.5)])
    monkeypatch.setattr(summary, "RESULTS", tmp_path / "bench")
    monkeypatch.setattr(sys, "argv", ["compare_profiles.py", str(first), str(second)])
    result = compare_profiles.main()
    assert [t["table"] for t in result["tables"]] == ["t"]  # a table of one run only is not compared
    (table,) = result["tables"]
    assert (table["rows"], table["seeds"], table["same_upstream"], table["same_accuracy"]) == (2, [1], 1, 1)
    assert abs(table["max_gap_points"] - 10.0) < 1e-9
    assert (tmp_path / "bench" / "compare_cpu_cpu3_cpu.md").exists()


def test_compare_profiles_names_the_fix_for_a_folder_without_merge_rows(tmp_path, monkeypatch):
    import compare_profiles
    import pytest

    monkeypatch.setattr(sys, "argv", ["compare_profiles.py", str(tmp_path), str(tmp_path)])
    with pytest.raises(SystemExit, match="make reproduce PROFILE=NAME"):
        compare_profiles.main()
