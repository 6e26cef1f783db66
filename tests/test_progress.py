"""Progress where no terminal is (issue 28, item 6): one line per finished item with its time when stderr is a file,
a pipe or a zero-size terminal; a bar on a real terminal; long loops thinned; merge.py names the rule."""
from __future__ import annotations

import io
import os

import pytest
from tqdm import tqdm

import common
from common import ProgressLines, hidden_inner_progress, progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (its size comes from the patched os.get_terminal_size)."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


class Captured:
    """What the code under test wrote to stderr (pytest's capture: a stream that is no terminal)."""

    def __init__(self, capsys) -> None:
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    return Captured(capsys)


def test_without_a_terminal_every_finished_item_is_one_line_with_its_time(stderr):
    bar = progress(["a", "b", "c"], desc="steps", unit="step")
    assert isinstance(bar, ProgressLines)
    for item in bar:
        bar.set_postfix_str(f"working on {item}")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 3
    for n, (line, item) in enumerate(zip(lines, "abc"), start=1):
        assert line.startswith(f"steps: {n}/3 step done in ") and " s in all" in line
        assert line.endswith(f": working on {item}")  # the item that finished, not the next one


@pytest.mark.parametrize("columns", [0, 5])
def test_a_zero_size_terminal_gets_lines_and_a_real_one_a_bar(monkeypatch, columns):
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((columns, 0)))
    with monkeypatch.context() as patch:  # set here: pytest swaps sys.stderr between a fixture and the test
        patch.setattr("sys.stderr", terminal)
        list(progress(range(2), desc="epochs"))
        monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((80, 24)))
        assert isinstance(progress(range(2)), tqdm)
    assert terminal.getvalue().splitlines()[1].startswith("epochs: 2/2 it done in ")  # before the bar


def test_a_long_loop_writes_at_most_a_line_every_interval_and_its_last_item(stderr):
    list(progress(range(common.LONG_LOOP + 30), desc="images"))
    assert stderr.getvalue().splitlines() == [stderr.getvalue().splitlines()[-1]]
    assert stderr.getvalue().startswith(f"images: {common.LONG_LOOP + 30}/{common.LONG_LOOP + 30} it done")


def test_a_resumed_loop_counts_from_where_it_resumed(stderr):
    list(progress(range(3, 5), desc="seed 1", total=5, initial=3, unit="epoch"))
    assert [line.split(" done")[0] for line in stderr.getvalue().splitlines()] == \
           ["seed 1: 4/5 epoch", "seed 1: 5/5 epoch"]


def test_under_a_driver_inner_loops_are_thinned_and_its_own_loop_is_not(stderr):
    with hidden_inner_progress():
        list(progress(range(3), desc="inner"))
        list(progress(range(2), outer=True, desc="reproduce"))
    assert [line.split(":")[0] for line in stderr.getvalue().splitlines()] == ["reproduce", "reproduce"]
