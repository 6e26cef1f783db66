"""Problems: a set of experts and their combined test set, with global labels (DESIGN.md section 2).

The combined test set is the concatenation of every expert's own test subset. Each part keeps its
native channels (grey or RGB) so augmentations act on the image as it is, and is converted to each
expert's input format only when shown to that expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from archs import ARCHS
from common import CheckpointError, load_model
from config import ConfigError, ProblemSpec, TaskSpec
from data import InputFormat, load_task, prepare_input, task_identity, to_unit
from train_source_networks import expert_command, expert_path


@dataclass
class Domain:
    """The test images of one expert's task, labelled with global class ids."""

    images: torch.Tensor  # uint8 [N, C, 32, 32], native channels
    labels: torch.Tensor  # global ids
    expert: int


@dataclass
class Problem:
    name: str
    tasks: list[str]
    archs: list[str]
    label_maps: list[torch.Tensor]  # expert k's local class j -> global id label_maps[k][j]
    domains: list[Domain]
    num_classes: int
    specs: dict[str, TaskSpec]  # the experts' tasks as the config defines them

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([d.labels for d in self.domains])

    @property
    def domain(self) -> torch.Tensor:
        """Index of the expert each combined test sample belongs to."""
        return torch.cat([torch.full((len(d.labels),), d.expert, dtype=torch.long) for d in self.domains])

    def expert_paths(self, ckpt_dir: str | Path, seed: int) -> list[Path]:
        return [expert_path(ckpt_dir, t, a, seed) for t, a in zip(self.tasks, self.archs)]

    def missing_experts(self, ckpt_dir: str | Path, seeds: list[int]) -> list[str]:
        """Commands that create the expert checkpoints not yet on disk, one per (task, arch)."""
        missing: dict[tuple[str, str], list[int]] = {}
        for seed in seeds:
            for task, arch, path in zip(self.tasks, self.archs, self.expert_paths(ckpt_dir, seed)):
                if not path.exists():
                    missing.setdefault((task, arch), []).append(seed)
        return [expert_command(task, arch, seeds) for (task, arch), seeds in missing.items()]

    def load_experts(self, ckpt_dir: str | Path, seed: int,
                     device: torch.device) -> tuple[list[nn.Module], list[InputFormat]]:
        models, formats = [], []
        for task, arch, path in zip(self.tasks, self.archs, self.expert_paths(ckpt_dir, seed)):
            model, ckpt = load_model(path, expect_arch=arch, hint=expert_command(task, arch, seed),
                                     device=device)
            trained = ckpt["meta"]["task"]
            wanted = task_identity(task, self.specs[task])
            if trained != wanted:
                raise CheckpointError(f"{path} holds an expert of {trained}, but the config defines {wanted}; "
                                      f"retrain it: {expert_command(task, arch, seed)} force=true")
            models.append(model.to(memory_format=torch.channels_last))
            formats.append(InputFormat.from_dict(ckpt["meta"]["input_format"]))
        return models, formats


def build_problem(name: str, spec: ProblemSpec, tasks: dict[str, TaskSpec], data_dir: str,
                  test_limit: int | None = None) -> Problem:
    """Load the combined test set of problem ``name``; tasks must exist and not share classes."""
    unknown = [e.task for e in spec.experts if e.task not in tasks]
    if unknown:
        raise ConfigError(f"problem {name!r} names unknown task(s) {unknown}; choices: {', '.join(tasks)}")
    bad_archs = [e.arch for e in spec.experts if e.arch not in ARCHS]
    if bad_archs:
        raise ConfigError(f"problem {name!r} names unknown arch(s) {bad_archs}; choices: {', '.join(ARCHS)}")
    if len(spec.experts) < 2:
        raise ConfigError(f"problem {name!r} needs at least two experts")
    owners: dict[tuple[str, int], int] = {}
    label_maps, domains, next_id = [], [], 0
    for k, expert in enumerate(spec.experts):
        test = load_task(tasks[expert.task], "test", data_dir, test_limit)
        for c in test.classes:
            owner = owners.setdefault((test.source, c), k)
            if owner != k:
                raise ConfigError(f"problem {name!r}: class {c} of {test.source} belongs to both "
                                  f"{spec.experts[owner].task} and {expert.task}; a routing problem "
                                  f"needs experts with disjoint classes")
        label_map = torch.arange(next_id, next_id + len(test.classes))
        next_id += len(test.classes)
        label_maps.append(label_map)
        domains.append(Domain(test.images, label_map[test.labels], k))
    return Problem(name, [e.task for e in spec.experts], [e.arch for e in spec.experts], label_maps,
                   domains, next_id, {e.task: tasks[e.task] for e in spec.experts})


def test_batches(problem: Problem, device: torch.device, batch_size: int):
    """The combined test set as [0,1] batches in ``problem.labels`` order, each in its native channels."""
    return (to_unit(d.images[i:i + batch_size], device) for d in problem.domains
            for i in range(0, len(d.images), batch_size))


@torch.no_grad()
def expert_logits(problem: Problem, models: list[nn.Module], formats: list[InputFormat],
                  device: torch.device, batch_size: int = 512, augment=None) -> list[torch.Tensor]:
    """Every expert's logits on the combined test set, ``[N, K_k]`` each, in ``problem.labels`` order.

    ``augment(x01) -> x01`` (optional) is applied once per [0,1] batch before the batch is shown to
    the experts, so all experts see the same augmented image in their own input format.
    """
    batches = test_batches(problem, device, batch_size)
    if augment is not None:
        batches = (augment(x) for x in batches)
    return [logits for logits, _ in run_experts(models, formats, batches)]


@torch.no_grad()
def expert_activations(problem: Problem, models: list[nn.Module], formats: list[InputFormat],
                       device: torch.device, batch_size: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every expert's ``(logits, features)`` on the combined test set."""
    batches = test_batches(problem, device, batch_size)
    return run_experts(models, formats, batches, features=True)


@torch.no_grad()
def run_experts(models: list[nn.Module], formats: list[InputFormat], batches,
                features: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Show each [0,1] batch (any channel count) to every expert in its own input format;
    returns per expert ``(logits, features or None)`` over all batches."""
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    for x in batches:
        for k, (model, fmt) in enumerate(zip(models, formats)):
            # channels-last runs LeNet's convolutions about a quarter faster on CPU
            inputs = prepare_input(x, fmt).contiguous(memory_format=torch.channels_last)
            if features:
                out, feat = model(inputs, return_features=True)
                feats[k].append(feat.float())
            else:
                out = model(inputs)
            logits[k].append(out.float())
    return [(torch.cat(lo), torch.cat(fe) if features else None) for lo, fe in zip(logits, feats)]
