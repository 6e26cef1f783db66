"""What a rule reads beside the experts' logits, on any set of images: detector scores with their statistics,
the experts' logits on the stored synthetic sets, the detector gate's inputs. merge.py builds them over a combined
test set and predict.py over a user's images, so that a rule reads the same things, made the same way, in both
(``strategies.MergeInputs`` takes them as its ``run_*`` callables), and both check before any work that the
experts can show what a detector rule reads (``check_detectors``).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
import torch.nn as nn

import config
from archs import build_model
from artifacts import Layout
from data import InputFormat, get_source, task_classes, to_unit
from detector_stats import GATE_DETECTORS, LOGIT_DETECTORS, DetectorScorer, expert_views, stored_statistics
from detectors import last_batch_norm
from expert_files import require
from problems import Problem, run_experts
from sources import Source, parse_source
from strategies import DEFAULT_SYNTHESIZER, REGISTRY, StrategyCall
from synthesis import components, load_set


def synthesizer_of(call: StrategyCall) -> str:
    """The synthesizer (or mixture) a rule's ``synthesizer`` parameter names ("" is the default, dafl)."""
    return call.param("synthesizer") or DEFAULT_SYNTHESIZER


def sets_read(call: StrategyCall, gate: config.GateTraining) -> str | None:
    """The synthesizer (or mixture) whose stored sets ``call`` reads, or None: a calibration's, a detector's with a
    synthetic source, the detector gate's statistics source (``gate.detector_stats``)."""
    if call.name == "calibrated":
        return synthesizer_of(call)
    source = call.param("stats") if REGISTRY[call.name].detector else ""
    if call.param("gate") == "detectors":
        source = gate.detector_stats
    return parse_source(source).synthesizer or None if source else None


def detector_runner(layout: Layout, problem: Problem, models: list[nn.Module], formats: list[InputFormat],
                    logits: list[torch.Tensor], seed: int, device: torch.device,
                    batches: Callable[[], Iterator[torch.Tensor]], data_dir: str, force: bool = False,
                    views: Callable[[], list] | None = None) -> DetectorScorer:
    """``run_detector(name, source, standardisation, params)`` for MergeInputs over the [0,1] images ``batches()``
    gives: every expert's view of them is taken on first use (``views``, when the caller has them already; ODIN's,
    which keeps the inputs, on first ODIN use), and each expert's statistics of a source are read or fitted once
    (detector_stats.stored_statistics; ``real:N`` reads the first N training images under ``data_dir``)."""
    odin_views = functools.cache(lambda: expert_views(models, formats, batches, keep_inputs=True))

    @functools.cache
    def statistics(source: Source, k: int):
        expert = problem.experts[k]
        return stored_statistics(layout, source, expert, problem.specs[expert.task], seed, models[k], formats[k],
                                 data_dir, device, force)

    views = views or functools.cache(lambda: expert_views(models, formats, batches))
    return DetectorScorer(models, logits, views, statistics, lambda k: odin_views()[k], formats, device)


def detector_gate_inputs(scorer: DetectorScorer, logits: list[torch.Tensor],
                         source: str) -> Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]:
    """What the detector gate reads (gating.gate_runner's ``detector_activations``), computed on first use: per
    expert, its logits and the comparable scores of the gate's detectors, standardised on ``source``."""
    @functools.cache
    def inputs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        parsed = parse_source(source, "gate.detector_stats")
        scores = torch.stack([scorer(name, parsed, "zscore", {}).comparable for name in GATE_DETECTORS], dim=2)
        return [(lo, scores[:, k]) for k, lo in enumerate(logits)]
    return inputs


def synthetic_runner(layout: Layout, problem: Problem, models: list[nn.Module], formats: list[InputFormat],
                     seed: int, device: torch.device) -> Callable[[str], list[list[torch.Tensor]]]:
    """``run_synthetic(synthesizer)``: ``[k][j]`` expert k's logits on expert j's synthetic images."""
    def run_synthetic(synthesizer: str) -> list[list[torch.Tensor]]:
        sets = [torch.cat([load_set(layout.synthetic_path(part, e, seed),
                                    hint=layout.gan_command(problem.name, [seed], [part]))[0]
                           for part in components(synthesizer)]) for e in problem.experts]
        on_sets: list[list[torch.Tensor]] = [[] for _ in models]
        for images in sets:
            batches = (to_unit(images[i:i + 1024], device) for i in range(0, len(images), 1024))
            for k, (logits, _) in enumerate(run_experts(models, formats, batches)):
                on_sets[k].append(logits)
        return on_sets
    return run_synthetic


def check_detectors(calls: list[StrategyCall], name: str, spec: config.ProblemSpec,
                    tasks: dict[str, config.TaskSpec]) -> None:
    """What a detector rule reads, every expert of the problem must show, before any work: the input of its final
    layer (all but the logit detectors without statistics) and, for bn_gaussian, a batch-norm layer."""
    for call in calls:
        if not REGISTRY[call.name].detector:
            continue
        if call.param("stats") or call.name not in LOGIT_DETECTORS:
            require(name, spec, penultimate=f"strategy {call.label}")
        if call.name == "bn_gaussian":
            require(name, spec, batchnorm=f"strategy {call.label}")
            plain = [e.arch for e in spec.experts if e.file is None and last_batch_norm(build_model(
                e.arch, **model_arguments(tasks[e.task]), **e.arch_kwargs)) is None]
            if plain:
                raise config.ConfigError(f"strategy {call.label} reads a batch-norm layer, and problem {name!r} has "
                                         f"experts without one ({', '.join(dict.fromkeys(plain))}); use lenet5_bn "
                                         f"or resnet18 experts (e.g. problem mnist_cifar10_bn)")


def model_arguments(task: config.TaskSpec) -> dict:
    """An expert's input channels and class count, from its task."""
    return {"in_channels": get_source(task.source).channels, "num_classes": len(task_classes(task))}
