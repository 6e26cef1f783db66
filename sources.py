"""What a detector's statistics are fitted on, per expert and seed (docs/design.md section 4, "Detectors").

A source is a setting, ``stats=...`` of a detector rule:

- ``synthetic:NAME`` -- data-free: the stored synthetic set(s) of synthesizer NAME (or a mixture ``a+b``);
- ``shipped`` -- data-free: what the expert itself carries and no data at all (its input normalisation, and for
  batch-norm networks the running statistics of its last batch-norm layer);
- ``real:N`` -- few-shot: the first N real training images of the expert's task (``real:all``: all of them);
  never reported as data-free.

Parsing checks the spelling before any work; detector_stats.py computes and stores the statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

from config import ConfigError
from synthesis import components

KINDS = ("synthetic", "shipped", "real")


@dataclass(frozen=True)
class Source:
    """A parsed statistics source: its kind, the synthesizer of a synthetic one, the image count of a real one
    (None: all)."""

    kind: str
    synthesizer: str = ""
    images: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.synthesizer}"
        if self.kind == "real":
            return f"real:{'all' if self.images is None else self.images}"
        return self.kind

    @property
    def data_free(self) -> bool:
        """Whether no real training image is read: synthetic and shipped sources."""
        return self.kind != "real"

    @property
    def folder(self) -> str:
        """The folder name of its artifacts (no colon in file names)."""
        return self.label.replace(":", "_")


def parse_source(text: str, where: str = "stats") -> Source:
    """``synthetic:NAME``, ``shipped`` or ``real:N`` (N a positive count or ``all``) -> Source; anything else is
    a ConfigError that lists the forms."""
    kind, _, rest = str(text).partition(":")
    forms = "synthetic:NAME (e.g. synthetic:inversion), shipped, or real:N (N a count, or all)"
    if kind == "synthetic" and rest:
        try:
            components(rest)
        except ConfigError as err:
            raise ConfigError(f"{where}={text!r}: {err}") from None
        return Source("synthetic", synthesizer=rest)
    if kind == "shipped" and not rest:
        return Source("shipped")
    if kind == "real" and rest:
        if rest == "all":
            return Source("real")
        if rest.isdigit() and int(rest) > 0:
            return Source("real", images=int(rest))
    raise ConfigError(f"{where}={text!r} is not a statistics source; use {forms}")
