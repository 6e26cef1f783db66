"""experiments/sync_quotes.py: a quoted table follows its file when a rerun changes the numbers, even where the file
holds several tables of one header (one per problem)."""
from __future__ import annotations

from experiments import sync_quotes

HEADER = "| family | accuracy |\n|---|---|"
OLD = f"# report\n\n{HEADER}\n| naive | 90.1 |\n| gates | 95.2 |\n\n{HEADER}\n| naive | 70.3 |\n| detectors | 75.4 |\n"
NEW = f"# report\n\n{HEADER}\n| naive | 91.0 |\n| gates | 94.0 |\n\n{HEADER}\n| naive | 71.0 |\n| detectors | 76.0 |\n"


def page_quoting(path: str, *blocks: str) -> str:
    return "intro\n\n" + "\n\ntext\n\n".join(f"<!-- from {path} -->\n{b}" for b in blocks) + "\n"


def test_each_quoted_table_follows_its_own_table_after_the_numbers_change(tmp_path, monkeypatch):
    monkeypatch.setattr(sync_quotes, "REPO", tmp_path)
    (tmp_path / "r.md").write_text(NEW)
    old_first, old_second = [p for p in sync_quotes.paragraphs(OLD) if p.startswith("| family")]
    page = tmp_path / "page.md"
    page.write_text(page_quoting("r.md", old_second, old_first))  # the page quotes them in the other order
    assert sync_quotes.sync(page) == 2
    new_first, new_second = [p for p in sync_quotes.paragraphs(NEW) if p.startswith("| family")]
    assert page.read_text() == page_quoting("r.md", new_second, new_first)
    assert sync_quotes.sync(page) == 0  # in step with its file: nothing to do


def test_same_labels_fall_back_to_the_order_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sync_quotes, "REPO", tmp_path)
    twin = OLD.replace("detectors", "gates")  # both tables have the same row labels
    (tmp_path / "r.md").write_text(twin.replace("0.", "9."))
    first, second = [p for p in sync_quotes.paragraphs(twin) if p.startswith("| family")]
    page = tmp_path / "page.md"
    page.write_text(page_quoting("r.md", first, second))
    sync_quotes.sync(page)
    new = [p for p in sync_quotes.paragraphs(twin.replace("0.", "9.")) if p.startswith("| family")]
    assert page.read_text() == page_quoting("r.md", *new)
