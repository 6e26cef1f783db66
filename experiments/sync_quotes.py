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


def shape(line: str) -> str:
    """A line with its digits blanked: a regenerated table keeps its rows' labels while its numbers change, so
    several tables of one header (one per problem) are told apart by their labels."""
    return re.sub(r"\d+", "#", line)


def closest(block: str, source: str, ordinal: int = 0) -> str:
    """The paragraph of ``source`` sharing the most lines with ``block``, compared with their digits blanked first
    (the numbers are what a rerun changes), then verbatim; on a tie, the one of ``block``'s header whose place among
    the paragraphs of that header is ``ordinal`` (the page quotes a file's same-header tables in the file's order)."""
    lines = block.splitlines()
    shapes = {shape(line) for line in lines}
    candidates = paragraphs(source)
    same_header = [p for p in candidates if p.startswith(lines[0])]

    def score(p: str) -> tuple:
        place = same_header.index(p) if p in same_header else len(candidates)
        return (len(shapes & {shape(line) for line in p.splitlines()}), len(set(lines) & set(p.splitlines())),
                -abs(place - ordinal))

    return max(candidates, key=score)


def sync(page: Path) -> int:
    """Rewrite ``page``'s quoted blocks from their files; the number of blocks changed."""
    text, changed = page.read_text(), 0
    seen: dict[tuple[str, str], int] = {}  # blocks of one file and header quoted so far: the next one's place

    def replace(match: re.Match) -> str:
        nonlocal changed
        marker, path, block = match.groups()
        ordinal = seen[(path, block.splitlines()[0])] = seen.get((path, block.splitlines()[0]), -1) + 1
        source = (REPO / path).read_text()
        if block in source and len(block.splitlines()) > 2:  # a header alone is in its file too, but quotes no row
            return match.group(0)
        changed += 1
        return marker + closest(block, source, ordinal)

    page.write_text(MARKED_BLOCK.sub(replace, text))
    return changed


def main(pages: list[str]) -> None:
    for page in [Path(p) for p in pages] or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if (count := sync(page)):
            print(f"{page}: {count} quoted blocks re-copied")


if __name__ == "__main__":
    main(sys.argv[1:])
