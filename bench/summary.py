"""The last step every benchmark shares: its JSON summary on stdout (the line gpu_check.sh and readers parse)
and, when asked, in a file."""
from __future__ import annotations

import json
from pathlib import Path


def finish(summary: dict, out: str | None) -> dict:
    print(json.dumps(summary))
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))
    return summary
