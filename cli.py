"""The command line of every script: ``--help``, bad arguments before torch loads, one line per error or Ctrl-C.

A script reads its arguments at its top, before its heavy imports (torch takes seconds to load), and runs its
``main`` at its bottom:

    ARGS = cli.arguments(__name__, __doc__, config.TrainConfig)  # top: --help and bad arguments answer here
    ...
    if __name__ == "__main__":
        cli.run(main, ARGS)

``arguments`` does nothing when the script is imported (tests call ``main`` in-process).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shlex
import sys
from typing import Any, Callable

import yaml

import config
from errors import UserError

HELP_FLAGS = ("-h", "--help")
INTERRUPTED = 130  # the exit status of a process ended by Ctrl-C (128 + SIGINT)


def arguments(name: str, doc: str | None, cls: type, load: Callable[[list[str]], Any] | None = None) -> Any:
    """The script's config from ``sys.argv`` when it runs as a script (``name == "__main__"``), else None.
    ``-h``/``--help`` prints ``help_text`` and exits 0; an argument error prints one line and exits 1."""
    if name != "__main__":
        return None
    argv = sys.argv[1:]
    if any(arg in HELP_FLAGS for arg in argv):
        try:
            print(help_text(doc, cls), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted; Python's own exit would complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    try:
        cfg = load(argv) if load else config.parse_args(cls, argv)
        config.check_names(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    return cfg


def run(main: Callable[[Any], dict], cfg: Any) -> None:
    """``main(cfg)``; a UserError exits with its one line, and Ctrl-C with one line saying what is kept and the
    command that resumes, never a traceback."""
    try:
        main(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print(interrupted_line(cfg), file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)


def interrupted_line(cfg: Any) -> str:
    """What an interrupted run keeps and how to go on: every stage writes finished checkpoints and rows as soon as
    they are done and the resume point of training in progress at every epoch end (training.Saver), so the same
    command continues where it stopped."""
    command = shlex.join(["python", sys.argv[0], *sys.argv[1:]])
    if not hasattr(cfg, "results_dir"):  # predict.py: it makes nothing before its answer
        return f"interrupted: nothing was written; run `{command}` again"
    return (f"interrupted: kept finished checkpoints, with the resume point of training in progress at its last "
            f"finished epoch, under {cfg.ckpt_dir}/ and finished rows under {cfg.results_dir}/; run `{command}` "
            f"again to resume")


# ---------------------------------------------------------------- --help

def help_text(doc: str | None, cls: type) -> str:
    """The script's usage (its docstring's first paragraphs) and every setting: ``key=default``, its type and
    range, and what it does (the comment beside the field in config.py)."""
    usage = (doc or "").strip().split("\n\n")
    lines = [*usage[:2], "",
             "Settings: key=value after any YAML files (.yaml, applied in order); a section's keys take its "
             "name, e.g. expert.epochs=2.", ""]
    lines += [f"  {line}" for line in setting_lines(cls, "")]
    return "\n".join(lines)


def setting_lines(cls: type, prefix: str) -> list[str]:
    notes = field_notes(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("unrecorded"):
            continue
        default = default_of(f)
        if dataclasses.is_dataclass(default):  # a settings section: one line per key
            lines += setting_lines(type(default), f"{prefix}{f.name}.")
            continue
        if isinstance(default, dict) and default and dataclasses.is_dataclass(next(iter(default.values()))):
            shown = "{" + ", ".join(default) + "}"  # the task and problem tables: their names
        else:
            shown = yaml.safe_dump(default, default_flow_style=True, width=10**6).strip().removesuffix(
                "\n...").removesuffix(" ...")
        words = [str(f.type), *range_words(f)]
        note = notes.get(f.name, "")
        lines.append(f"{prefix}{f.name}={shown}  ({', '.join(words)})" + (f"  {note}" if note else ""))
    return lines


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def range_words(f: dataclasses.Field) -> list[str]:
    words = []
    if "check" in f.metadata:
        words.append(f.metadata["check"][2])
    if "choices" in f.metadata:
        words.append("one of " + "/".join(f.metadata["choices"]))
    if f.metadata.get("seeds"):
        words.append("distinct, >= 0")
    if f.metadata.get("device"):
        words.append("auto/cpu/cuda/cuda:N")
    return words


FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+(?:=.*?)?(?:#\s*(.*))?$")


def field_notes(cls: type) -> dict[str, str]:
    """Each field's comment in config.py, cut to one line: the comment on its own line, else the comment block
    just above it (the first sentence)."""
    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    notes, block = {}, []
    for line in source[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("# "))
            continue
        match = FIELD_LINE.match(line) if stripped and not stripped.startswith(('"', "'")) else None
        if match:
            note = match.group(2) or re.split(r"(?<=[.;])\s+(?=[A-Z])", " ".join(block))[0].rstrip(".;")
            notes[match.group(1)] = note if len(note) <= 110 else note[:107] + "..."
        block = []
    return notes
