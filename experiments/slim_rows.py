"""Slim result tables written before rows carried a config digest: each such row repeated its whole resolved
config, which made results/ tens of megabytes (issue 18). This keeps every number and every config: a row's
config moves, once per distinct config, to ``STEM.configs.json`` beside the table (digest -> config), and the
row keeps ``config_digest``; the CSV is rewritten from the JSON lines. Tables already in the new form
(``config_digest`` in their rows) are left as they are, so a second run changes nothing. Rows that repeat task
entries their run did not read (every split of experiments/fusion_parents.yaml) keep only the ones they read.

Tables written before common.write_rows kept each config once (rows with a digest and a config of their own) get
the same treatment.

    python experiments/slim_rows.py results/cpu results/quick ...
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import atomic_write_text, read_rows, write_rows  # noqa: E402
from config import only_read_tasks  # noqa: E402


def old_form(rows: list[dict]) -> bool:
    """Rows that carry a whole config and no digest of it."""
    return bool(rows) and all(isinstance(r.get("config"), dict) and "config_digest" not in r for r in rows)


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def slim(jsonl: Path) -> bool:
    """Rewrite one table in the slim form; False when it needs nothing."""
    rows = read_rows(jsonl)
    if not old_form(rows):
        return False
    configs = {}
    slimmed = []
    for row in rows:
        digest = config_digest(row["config"])
        configs[digest] = row["config"]
        slimmed.append({**{k: v for k, v in row.items() if k != "config"}, "config_digest": digest})
    stem = jsonl.with_name(jsonl.name[: -len(".jsonl")])
    atomic_write_text(stem.with_name(stem.name + ".configs.json"), json.dumps(configs, indent=1, default=str) + "\n")
    write_rows(stem, slimmed)
    return True


def drop_unread_tasks(jsonl: Path) -> bool:
    """Rewrite a table whose rows repeat task entries their run did not read (config.row_config now leaves them
    out): a row keeps the task it trained on and its problems' experts' tasks; False when it needs nothing."""
    rows = read_rows(jsonl)
    trimmed = []
    for row in rows:
        config = row.get("config")
        if not isinstance(config, dict) or "tasks" not in config:
            trimmed.append(row)
            continue
        read = {row.get("task"), *(e["task"] for p in config.get("problems", {}).values() for e in p.get("experts", []))}
        trimmed.append({**row, "config": only_read_tasks(config, read - {None})})
    if trimmed == rows:
        return False
    write_rows(jsonl.with_name(jsonl.name[: -len(".jsonl")]), trimmed)
    return True


def move_inline_configs(jsonl: Path) -> bool:
    """Rewrite a table written before common.write_rows kept each config once beside it (rows with a
    ``config_digest`` and their own ``config``); False when it needs nothing."""
    stored = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not any("config_digest" in r and isinstance(r.get("config"), dict) for r in stored):
        return False
    write_rows(jsonl.with_name(jsonl.name[: -len(".jsonl")]), read_rows(jsonl))
    return True


def main(folders: list[str]) -> None:
    for folder in folders:
        for jsonl in sorted(Path(folder).rglob("*.jsonl")):
            if slim(jsonl):
                print(f"slimmed {jsonl}")
            if move_inline_configs(jsonl):
                print(f"moved the configs of {jsonl} beside it")
            if drop_unread_tasks(jsonl):
                print(f"dropped unread task entries from {jsonl}")


if __name__ == "__main__":
    main(sys.argv[1:])
