"""README.md: every table marked as copied from a results file is that file's text, so the README and
the committed results (which experiments/reproduce.py regenerates) cannot drift apart."""
from __future__ import annotations

import re

from conftest import REPO_ROOT

# a marker line, then the block up to the next blank line
MARKED_BLOCK = re.compile(r"<!-- from (\S+) -->\n(.+?)(?=\n\n|\n?\Z)", re.S)


def test_marked_readme_tables_are_verbatim_copies_of_committed_results():
    blocks = MARKED_BLOCK.findall((REPO_ROOT / "README.md").read_text())
    assert len(blocks) >= 5, "the README's result tables should carry <!-- from results/... --> markers"
    for path, block in blocks:
        source = REPO_ROOT / path
        assert source.is_file(), f"README quotes {path}, which is not committed"
        assert block in source.read_text(), f"README's table from {path} differs from the file:\n{block}"


def test_readme_embeds_the_figures_the_entry_point_draws():
    text = (REPO_ROOT / "README.md").read_text()
    for figure in re.findall(r"!\[[^\]]*\]\((results/[^)]+\.png)\)", text):
        assert (REPO_ROOT / figure).is_file(), figure
    assert "results/quick/figures/families.png" in text
