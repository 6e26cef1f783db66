"""README.md and docs/: every table marked as copied from a results file is that file's text, so the pages and
the committed results (which experiments/reproduce.py and the benchmarks regenerate) cannot drift apart; every
figure and page they link to exists; the front page stays a front page."""
from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT

# a marker line, then the block up to the next blank line
MARKED_BLOCK = re.compile(r"<!-- from (\S+) -->\n(.+?)(?=\n\n|\n?\Z)", re.S)
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_LIMIT = 20 * 1024


def test_the_pages_quote_results_tables():
    blocks = [b for page in PAGES for b in MARKED_BLOCK.findall(page.read_text())]
    assert len(blocks) >= 5, "the result tables should carry <!-- from results/... --> markers"
    assert MARKED_BLOCK.findall((REPO_ROOT / "README.md").read_text()), "the README quotes its answer from results/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_marked_tables_are_verbatim_copies_of_committed_results(page):
    for path, block in MARKED_BLOCK.findall(page.read_text()):
        source = REPO_ROOT / path
        assert source.is_file(), f"{page.name} quotes {path}, which is not committed"
        assert block in source.read_text(), f"{page.name}'s table from {path} differs from the file:\n{block}"
        # a header and its rule alone are in the file too, but quote no row (experiments/sync_quotes.py fills them)
        assert len(block.splitlines()) > 2, f"{page.name} quotes only the header of a table from {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_linked_figures_and_pages_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(((?:\.\./)?(?:results|docs)/[^)#\s]+|[\w-]+\.md)(?:#[^)]*)?\)", text):
        assert (page.parent / target).resolve().exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_is_a_front_page():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT, "README.md is over 20 KB: move details to docs/"
    assert "make reproduce" in readme and "make test" in readme
