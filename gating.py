"""What a gate reads, and where gates live: the inputs of each gate type and the gate checkpoints a rule reads.

Gate types (docs/design.md section 4): ``feature`` (the expert's feature vector), ``logits``,
``agnostic_logits`` and ``agnostic_feature`` (mean, std and max of those vectors), and
``universal``: statistics of the softmax that do not depend on the expert's architecture, width or
number of classes, so one gate can serve any expert.
"""
from __future__ import annotations

import math
from typing import Callable

from pathlib import Path

import torch
import torch.nn as nn

from artifacts import Layout, Wanted
from config import ConfigError
from common import load_model
from problems import Problem

GATE_TYPES = ("feature", "logits", "agnostic_logits", "agnostic_feature", "universal", "detectors")
# one gate serves every expert: it reads what does not depend on the expert's architecture or classes
SHARED_GATES = ("universal", "detectors")
REGIMES = ("real", "synthetic", "noise")  # and real:N, few-shot: the first N real training images of each task


def is_real(regime: str) -> bool:
    """Whether gates of ``regime`` read real training images: ``real``, or few-shot ``real:N``."""
    return regime == "real" or regime.startswith("real:")


def real_images(regime: str, section_limit: int | None) -> int | None:
    """How many real training images of each task a real-regime gate reads: N of ``real:N``, else the gate
    section's ``train_limit`` (None: all)."""
    return int(regime.partition(":")[2]) if regime.startswith("real:") else section_limit


def check_regime(regime: str, where: str) -> None:
    """``real``, ``synthetic``, ``noise`` or ``real:N`` (N a positive count), else a ConfigError."""
    count = regime.partition(":")[2] if regime.startswith("real:") else None
    if regime not in REGIMES and not (count and count.isdigit() and int(count) > 0):
        raise ConfigError(f"{where}: regime={regime!r} is not one of {', '.join(REGIMES)} or real:N (the first N "
                          f"real training images of each expert's task, e.g. real:200)")
UNIVERSAL_STATS = ("max_prob", "entropy_over_log_k", "top2_margin")


def vector_stats(v: torch.Tensor) -> torch.Tensor:
    """Mean, std and max of each row: a 3-number summary of any vector."""
    return torch.stack([v.mean(dim=1), v.std(dim=1), v.max(dim=1).values], dim=1)


def softmax_stats(logits: torch.Tensor) -> torch.Tensor:
    """Max probability, entropy / log K and the top-1 minus top-2 probability: in [0, 1] for any K."""
    probs = logits.softmax(dim=1)
    top2 = probs.topk(2, dim=1).values
    entropy = -(probs * logits.log_softmax(dim=1)).sum(dim=1) / math.log(probs.shape[1])
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], dim=1)


def gate_inputs(gate_type: str, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The vector a gate of ``gate_type`` reads from one expert's logits and features."""
    if gate_type == "feature":
        return features
    if gate_type == "logits":
        return logits
    if gate_type == "agnostic_logits":
        return vector_stats(logits)
    if gate_type == "agnostic_feature":
        return vector_stats(features)
    if gate_type == "universal":
        return softmax_stats(logits)
    if gate_type == "detectors":  # ``features`` holds the comparable detector scores (detector_stats.detector_vector)
        return features
    raise ValueError(f"unknown gate type {gate_type!r}; choices: {', '.join(GATE_TYPES)}")


def gate_arch(gate_type: str, in_features: int) -> tuple[str, dict]:
    """PAN for the full vectors, AgnosticPAN for the few statistics."""
    if gate_type in ("feature", "logits"):
        return "pan", {"in_features": in_features}
    return "agnostic_pan", {"in_features": in_features}


@torch.no_grad()
def in_domain_probability(gate: nn.Module, inputs: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """The gate's probability that each input belongs to its expert (class 1 of its two outputs)."""
    return torch.cat([gate(inputs[i:i + batch_size]).softmax(dim=1)[:, 1]
                      for i in range(0, len(inputs), batch_size)])


def gate_paths(layout: Layout, problem: Problem, gate_type: str, regime: str, gates_from: str, seed: int,
               synthesizer: str) -> list[Path]:
    """Per evaluated expert, the gate file it reads; another problem's gates (``gates_from``) are universal
    gates, one file that serves every expert."""
    if gates_from:
        return [layout.gate_path(gates_from, regime, gate_type, None, seed, synthesizer)] * len(problem.experts)
    return layout.gate_paths(problem.name, regime, gate_type, seed, synthesizer)


def wanted_gates(layout: Layout, problem: Problem, gate_type: str, regime: str, gates_from: str, seed: int,
                 synthesizer: str) -> list[Wanted]:
    """The gate files ``gate_paths`` names, as artifacts a stage needs (their recipes and commands)."""
    if gates_from or gate_type in SHARED_GATES:
        return [layout.wanted_gate(gates_from or problem.name, regime, gate_type, None, seed, synthesizer)]
    return [layout.wanted_gate(problem.name, regime, gate_type, k, seed, synthesizer)
            for k in range(len(problem.experts))]


def gate_runner(layout: Layout, problem: Problem, activations, seed: int, device: torch.device,
                detector_activations: Callable[[], list] | None = None):
    """``run_gates(gate, regime, gates_from, synthesizer)``: every expert's gate probability on the test set.
    ``detector_activations()`` gives the detector gates' inputs instead: per expert, (logits, comparable detector
    scores)."""
    def run_gates(gate_type: str, regime: str, gates_from: str, synthesizer: str) -> torch.Tensor:
        paths = gate_paths(layout, problem, gate_type, regime, gates_from, seed, synthesizer)
        hint = layout.gate_command(gates_from or problem.name, regime, gate_type, seed, synthesizer)
        gates = {p: load_model(p, hint=hint, device=device)[0] for p in dict.fromkeys(paths)}
        seen = detector_activations() if gate_type == "detectors" else activations
        return torch.stack([in_domain_probability(gates[p], gate_inputs(gate_type, logits, features))
                            for p, (logits, features) in zip(paths, seen)], dim=1)
    return run_gates
