"""The last step every benchmark shares: its JSON summary on stdout (the line gpu_check.sh and readers parse),
and the same summary as a file plus a Markdown table beside it, under results/bench/ by default, which the
docs quote verbatim (tests/test_readme.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench"


def finish(summary: dict, name: str, table: str, out: str | None = None) -> dict:
    """Print ``summary`` as one JSON line; write it to ``out`` (default results/bench/NAME_DEVICE.json) and
    ``table`` (Markdown) to the same path with ``.md``."""
    print(json.dumps(summary))
    path = Path(out) if out else RESULTS / f"{name}_{summary.get('device', 'cpu').split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    path.with_suffix(".md").write_text(table)
    return summary


def best_time(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` (seconds): the least disturbed by other work."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def markdown(header: list[str], rows: list[list[str]], note: str = "") -> str:
    """A Markdown table, and a line under it (the machine, the command)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + (f"\n\n{note}\n" if note else "\n")
