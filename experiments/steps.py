"""One step of the pipeline: a stage script's ``main`` called in-process for some seeds, with the arguments the
pipeline gives every step. The local launcher (experiments/reproduce.py) and the Ray launcher
(experiments/ray_launcher.py) both run steps through this module, so a step computes the same wherever it runs.

Imported as ``experiments.steps`` with the repository root on ``sys.path`` (both launchers put it there), so the
stage scripts and library modules import by their top-level names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import config
from artifacts import section_args
from errors import UserError

REPO = Path(__file__).resolve().parent.parent
# stage -> (script module, its config class); the order is the pipeline's
STAGES = {"experts": ("train_source_networks", config.TrainConfig), "generators": ("train_gan", config.GanConfig),
          "gates": ("train_pan", config.PanConfig), "merge": ("merge", config.MergeConfig)}


@dataclass
class Step:
    """One call of a stage script: its stage, what it works on, and its arguments (seeds come later). A step of
    a fusion table reads the table's recipe files, which may set settings sections of its own (its parents'
    training), the same in each of its steps."""

    stage: str
    label: str
    args: list[str]
    fusion: bool = False

    @property
    def script(self) -> str:
        return STAGES[self.stage][0] + ".py"


def shared_args(cfg: config.ReproduceConfig, stage: str, seeds: list[int], force: bool) -> list[str]:
    """The arguments every step gets from the pipeline: seeds, where things live, the settings sections its
    stage reads (as what differs from config.py's defaults)."""
    fields = {f.name for f in dataclasses.fields(STAGES[stage][1])}
    args = [f"seeds=[{','.join(map(str, seeds))}]", f"ckpt_dir={cfg.ckpt_dir}", f"results_dir={cfg.results_dir}"]
    for name in config.SECTIONS:
        if name in fields:
            args += section_args(name, getattr(cfg, name))
    if cfg.deterministic:
        args.append("deterministic=true")
    if stage == "merge":  # a profile's table holds exactly the rules of its YAML file, not those of earlier runs
        args.append("keep_rows=false")
    return args + (["force=true"] if force else [])


@contextlib.contextmanager
def in_repo() -> Iterator[None]:
    """Stage arguments name experiment files relative to the repository root."""
    previous = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(previous)


StageConfig = config.TrainConfig | config.GanConfig | config.PanConfig | config.MergeConfig


def parse_step(step: Step, seeds: list[int], extra: list[str] = ()) -> StageConfig:
    """The step's stage config for ``seeds`` (``extra``: arguments after the step's own)."""
    with in_repo():
        return config.parse_args(STAGES[step.stage][1], [*step.args, f"seeds={seeds}", *extra])


def run_step(step: Step, cfg: config.ReproduceConfig, seeds: list[int], force: bool) -> dict:
    """Run ``step`` for ``seeds`` in this process; a problem the user can fix is raised naming the step."""
    module = importlib.import_module(STAGES[step.stage][0])
    local = [f"device={cfg.device}"]
    if "data_dir" in {f.name for f in dataclasses.fields(STAGES[step.stage][1])}:  # generators read no data
        local.append(f"data_dir={cfg.data_dir}")
    stage_cfg = parse_step(step, seeds, [*shared_args(cfg, step.stage, seeds, force), *local])
    try:
        return module.main(stage_cfg)
    except UserError as err:
        raise type(err)(f"{step.stage} step {step.label!r}: {err}") from None


def timing_row(step: Step, seeds: list[int], wall_s: float, summary: dict, device: str) -> dict:
    """The timings.jsonl row of one run of ``step``."""
    # a step that found all its work finished "reused" it; its time is not the time the work took
    reused = summary["made"] == 0
    return {"stage": step.stage, "step": step.label, "seeds": seeds, "wall_s": wall_s, "reused": reused,
            "device": device}
