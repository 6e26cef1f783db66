"""Re-copy every table the pages quote (``<!-- from results/... -->``, tests/test_readme.py) from the results file
it names, after a profile or a benchmark regenerated that file: the quoted block becomes the file's paragraph that
shares the most lines with it (a table keeps its place in the page; its numbers follow the file).

    python experiments/sync_quotes.py [README.md docs/*.md]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKED_BLOCK = re.compile(r"(<!-- from (\S+) -->\n)(.+?)(?=\n\n|\n?\Z)", re.S)


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def closest(block: str, source: str) -> str:
    """The paragraph of ``source`` sharing the most lines with ``block`` (its header first, on ties)."""
    lines = set(block.splitlines())
    header = block.splitlines()[0]
    return max(paragraphs(source), key=lambda p: (len(lines & set(p.splitlines())), p.startswith(header)))


def sync(page: Path) -> int:
    """Rewrite ``page``'s quoted blocks from their files; the number of blocks changed."""
    text, changed = page.read_text(), 0

    def replace(match: re.Match) -> str:
        nonlocal changed
        marker, path, block = match.groups()
        source = (REPO / path).read_text()
        if block in source:
            return match.group(0)
        changed += 1
        return marker + closest(block, source)

    page.write_text(MARKED_BLOCK.sub(replace, text))
    return changed


def main(pages: list[str]) -> None:
    for page in [Path(p) for p in pages] or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if (count := sync(page)):
            print(f"{page}: {count} quoted blocks re-copied")


if __name__ == "__main__":
    main(sys.argv[1:])
