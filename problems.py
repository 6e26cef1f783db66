"""Problems: a set of experts and their combined test set, with global labels (docs/design.md section 2).

The combined test set is the concatenation of every expert's own test subset. Each part keeps its
native channels (grey or RGB) so augmentations act on the image as it is, and is converted to each
expert's input format only when shown to that expert.

A problem with ``shared_labels`` holds fusion parents instead (docs/design.md section 8): every expert
learns the same classes of the same source, so the combined test set is that task's test set once
and the global labels are the experts' own. Each test sample still gets a "domain" (read only by the
oracle and by routing accuracy): the expert whose training data holds the most samples of its class
(``Problem.owner_domain``); for sharded parents that is the parent that owns the class.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from archs import ARCHS
from artifacts import ExpertId, Layout, Wanted
from common import CheckpointError, fast_memory_format, load_model, read_checkpoint
from config import ConfigError, ExpertFile, ProblemSpec, TaskSpec
from data import InputFormat, get_source, load_task, prepare_input, task_classes, task_identity, to_unit
from expert_files import load_file_expert
from parent_files import family_of, load_fusion_parent


@dataclass
class Domain:
    """The test images of one expert's task, labelled with global class ids."""

    images: torch.Tensor  # uint8 [N, C, 32, 32], native channels
    labels: torch.Tensor  # global ids
    expert: int  # -1 with shared labels: the expert is decided per sample (Problem.owner_domain)
    unit: tuple[float, ...] = (1.0,)  # per-channel std of the source dataset: one normalised unit in pixels


@dataclass
class Problem:
    name: str
    tasks: list[str]
    archs: list[str]
    label_maps: list[torch.Tensor]  # expert k's local class j -> global id label_maps[k][j]
    domains: list[Domain]
    num_classes: int
    specs: dict[str, TaskSpec]  # the experts' tasks as the config defines them
    arch_kwargs: list[dict] | None = None  # per expert (ExpertSpec.arch_kwargs); None: none has any
    shared_labels: bool = False
    files: list[ExpertFile | None] | None = None  # per expert given by file (arch "file"); None: none is
    class_names: list[str] | None = None  # of the global classes; None: their ids

    def __post_init__(self) -> None:
        if self.arch_kwargs is None:
            self.arch_kwargs = [{} for _ in self.tasks]
        if self.files is None:
            self.files = [None for _ in self.tasks]
        if self.class_names is None:
            self.class_names = [str(c) for c in range(self.num_classes)]

    @property
    def names(self) -> list[str]:
        """Each expert's name in rows and tables: its task; experts of one task (fusion parents of other
        shapes, or one checkpoint twice) add their arch tag, then, if still alike, their position."""
        names = [t if self.tasks.count(t) == 1 else e.tag for t, e in zip(self.tasks, self.experts)]
        return [n if names.count(n) == 1 else f"{n}#{k}" for k, n in enumerate(names)]

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([d.labels for d in self.domains])

    @property
    def domain(self) -> torch.Tensor:
        """Index of the expert each combined test sample belongs to (problems without shared labels)."""
        if self.shared_labels:
            raise ValueError(f"problem {self.name!r} has shared labels: a sample's domain is the expert with the "
                             f"most training data of its class, given by owner_domain(class_counts)")
        return torch.cat([torch.full((len(d.labels),), d.expert, dtype=torch.long) for d in self.domains])

    def owner_domain(self, class_counts: torch.Tensor) -> torch.Tensor:
        """Shared labels: each test sample's domain is the expert whose training data holds the most
        samples of its class (``class_counts[k][c]``: expert k's training images of class c); ties go to
        the lowest index. For sharded parents that is the parent owning the class."""
        return class_counts.argmax(dim=0)[self.labels]  # argmax returns the first maximal index

    @property
    def experts(self) -> list[ExpertId]:
        return [ExpertId(t, a, kw, f) for t, a, kw, f in zip(self.tasks, self.archs, self.arch_kwargs, self.files)]

    def expert_paths(self, layout: Layout, seed: int) -> list[Path]:
        return [layout.expert_path(e, seed) for e in self.experts]

    def wanted_experts(self, layout: Layout, seeds: list[int]) -> list[Wanted]:
        """Every expert checkpoint of ``seeds``; the command of one not yet on disk makes all its missing seeds."""
        missing: dict[ExpertId, list[int]] = {}
        for seed in seeds:
            for expert in self.experts:
                if not layout.expert_path(expert, seed).exists():
                    seeds_missing = missing.setdefault(expert, [])
                    if seed not in seeds_missing:  # one checkpoint may serve two experts
                        seeds_missing.append(seed)
        return [dataclasses.replace(layout.wanted_expert(expert, seed),
                                    command=layout.expert_command(expert, missing.get(expert, [seed])))
                for seed in seeds for expert in dict.fromkeys(self.experts)]

    def load_experts(self, layout: Layout, seed: int,
                     device: torch.device) -> tuple[list[nn.Module], list[InputFormat]]:
        pairs = [load_expert(layout, e, seed, device, self.specs[e.task], f"problem {self.name!r}", self.shared_labels)
                 for e in self.experts]
        return [model for model, _ in pairs], [fmt for _, fmt in pairs]

    def class_counts(self, layout: Layout, seed: int, data_dir: str | None = None) -> torch.Tensor:
        """``[experts, classes]``: the training images of each class every expert learnt from, as its
        checkpoint's row records them; for a parent given by file (trained elsewhere), its task's training set
        read from ``data_dir``."""
        def counts(expert: ExpertId) -> list[int]:
            if expert.file is None:
                return read_checkpoint(layout.expert_path(expert, seed))["meta"]["row"]["class_counts"]
            labels = load_task(self.specs[expert.task], "train", data_dir).labels
            return torch.bincount(labels, minlength=self.num_classes).tolist()

        return torch.tensor([counts(e) for e in self.experts], dtype=torch.long)


def load_expert(layout: Layout, expert: ExpertId, seed: int, device: torch.device, task: TaskSpec,
                where: str = "", fusion: bool = False) -> tuple[nn.Module, InputFormat]:
    """One expert of ``seed`` in eval mode and its input format: a checkpoint of this project (checked against
    the task the config defines), or a file trained elsewhere (the same for every seed), which for a fusion
    parent (``fusion``) is rebuilt as a network fusion walks (parent_files.py)."""
    if expert.file is not None:
        f = expert.file
        fmt = InputFormat(f.channels, tuple(f.mean), tuple(f.std))
        where = where or f"expert {expert.task}"
        model = load_fusion_parent(f, fmt, where, device) if fusion else load_file_expert(f, where, device)
        return model, fmt
    path = layout.expert_path(expert, seed)
    hint = layout.expert_command(expert, [seed])
    model, ckpt = load_model(path, expect_arch=expert.arch, hint=hint, device=device)
    if "meta" not in ckpt:
        raise CheckpointError(f"{path} was not written by train_source_networks.py (no meta); give a model trained "
                              f"elsewhere by file instead (README, \"Experts from files\")")
    trained = ckpt["meta"]["task"]
    wanted = task_identity(expert.task, task)
    if trained != wanted:
        raise CheckpointError(f"{path} holds an expert of {trained}, but the config defines {wanted}; "
                              f"retrain it: {hint} force=true")
    return model.to(memory_format=fast_memory_format(model)), InputFormat.from_dict(ckpt["meta"]["input_format"])


def check_files(name: str, spec: ProblemSpec, tasks: dict[str, TaskSpec]) -> None:
    """Load and check every expert of ``spec`` given by file, before any work (one ConfigError or
    ExpertFileError line each): its class list fits its task's test set, and the file is the classifier its
    entry describes (expert_files.load_file_expert), or with shared labels the fusion parent of the family its
    arch names (parent_files.load_fusion_parent)."""
    for k, expert in enumerate(spec.experts):
        if expert.file is None:
            continue
        where = f"problem {name!r}, expert {k} ({expert.file.path})"
        n_task = len(task_classes(tasks[expert.task]))
        if len(expert.file.classes) != n_task:
            raise ConfigError(f"{where}: the entry lists {len(expert.file.classes)} classes, but its task "
                              f"{expert.task!r}, whose test set it is scored on, has {n_task}")
        if not spec.shared_labels:
            load_file_expert(expert.file, where)
            continue
        parent = load_fusion_parent(expert.file, InputFormat.of(tasks[expert.task].source), where)
        if family_of(parent) != expert.arch:
            raise ConfigError(f"{where}: its file rebuilds as a fusion parent of arch {family_of(parent)!r}, but the "
                              f"entry says arch: {expert.arch}; write arch: {family_of(parent)}")


def build_problem(name: str, spec: ProblemSpec, tasks: dict[str, TaskSpec], data_dir: str,
                  test_limit: int | None = None) -> Problem:
    """Load the combined test set of problem ``name`` (its experts and labels as ``describe_problem`` checks
    them): every expert's task's test images, or with ``spec.shared_labels`` the common task's, once."""
    problem = describe_problem(name, spec, tasks)
    if spec.shared_labels:
        test = load_task(tasks[spec.experts[0].task], "test", data_dir, test_limit)
        problem.domains = [Domain(test.images, test.labels, -1, InputFormat.of(test.source).std)]
        return problem
    for k, (expert, label_map) in enumerate(zip(spec.experts, problem.label_maps)):
        test = load_task(tasks[expert.task], "test", data_dir, test_limit)
        problem.domains.append(Domain(test.images, label_map[test.labels], k, InputFormat.of(test.source).std))
    return problem


def expert_class_counts(name: str, spec: ProblemSpec, tasks: dict[str, TaskSpec]) -> list[int]:
    """Every expert's class count, from its task alone (no file or data is read): what a rule that assumes one
    class count checks at config load (strategies.check_class_counts)."""
    unknown = [e.task for e in spec.experts if e.task not in tasks]
    if unknown:
        raise ConfigError(f"problem {name!r} names unknown task(s) {unknown}; choices: {', '.join(tasks)}")
    return [len(task_classes(tasks[e.task])) for e in spec.experts]


def describe_problem(name: str, spec: ProblemSpec, tasks: dict[str, TaskSpec]) -> Problem:
    """Problem ``name``'s experts and global labels, checked, without reading any test set (no domains):
    tasks must exist and not share classes (or, with ``spec.shared_labels``, all learn the same classes of one
    source), archs must be registered, and experts given by file must be what their entries say."""
    unknown = [e.task for e in spec.experts if e.task not in tasks]
    if unknown:
        raise ConfigError(f"problem {name!r} names unknown task(s) {unknown}; choices: {', '.join(tasks)}")
    bad_archs = [e.arch for e in spec.experts if e.file is None and e.arch not in ARCHS]
    if bad_archs:
        raise ConfigError(f"problem {name!r} names unknown arch(s) {bad_archs}; choices: {', '.join(ARCHS)}")
    if len(spec.experts) < 2:
        raise ConfigError(f"problem {name!r} needs at least two experts")
    check_files(name, spec, tasks)
    expert_fields = dict(tasks=[e.task for e in spec.experts], archs=[e.arch if e.file is None else "file"
                                                                      for e in spec.experts],
                         specs={e.task: tasks[e.task] for e in spec.experts},
                         arch_kwargs=[dict(e.arch_kwargs) for e in spec.experts], shared_labels=spec.shared_labels,
                         files=[e.file for e in spec.experts])
    spaces = [(tasks[e.task].source, task_classes(tasks[e.task])) for e in spec.experts]
    if spec.shared_labels:
        if len({(source, tuple(classes)) for source, classes in spaces}) > 1:
            listed = "; ".join(f"{e.task}: {source} classes {classes}" for e, (source, classes) in zip(spec.experts,
                                                                                                       spaces))
            raise ConfigError(f"problem {name!r} has shared_labels: true, so every expert must learn the same "
                              f"classes of the same source, in the same order; its tasks differ ({listed})")
        source, classes = spaces[0]
        names = get_source(source).class_names
        return Problem(name, label_maps=[torch.arange(len(classes)) for _ in spec.experts], domains=[],
                       num_classes=len(classes), class_names=[names[c] for c in classes], **expert_fields)
    owners: dict[tuple[str, int], int] = {}
    label_maps, class_names, next_id = [], [], 0
    for k, (expert, (source, classes)) in enumerate(zip(spec.experts, spaces)):
        names = get_source(source).class_names
        class_names += expert.file.classes if expert.file else [names[c] for c in classes]
        for c in classes:
            owner = owners.setdefault((source, c), k)
            if owner != k:
                raise ConfigError(f"problem {name!r}: class {c} of {source} belongs to both "
                                  f"{spec.experts[owner].task} and {expert.task}; a routing problem "
                                  f"needs experts with disjoint classes (fusion parents that share their "
                                  f"classes need shared_labels: true)")
        label_maps.append(torch.arange(next_id, next_id + len(classes)))
        next_id += len(classes)
    return Problem(name, label_maps=label_maps, domains=[], num_classes=next_id, class_names=class_names,
                   **expert_fields)


def test_batches(problem: Problem, device: torch.device, batch_size: int):
    """The combined test set as [0,1] batches in ``problem.labels`` order, each in its native channels."""
    return (x for x, _ in test_batches_with_units(problem, device, batch_size))


def test_batches_with_units(problem: Problem, device: torch.device, batch_size: int):
    """``test_batches`` with each batch's noise unit: the per-channel std of its source dataset."""
    return ((to_unit(d.images[i:i + batch_size], device), d.unit) for d in problem.domains
            for i in range(0, len(d.images), batch_size))


@torch.no_grad()
def expert_logits(problem: Problem, models: list[nn.Module], formats: list[InputFormat],
                  device: torch.device, batch_size: int = 512, augment=None) -> list[torch.Tensor]:
    """Every expert's logits on the combined test set, ``[N, K_k]`` each, in ``problem.labels`` order.

    ``augment(x01, unit) -> x01`` (optional) is applied once per [0,1] batch before the batch is shown to
    the experts, so all experts see the same augmented image in their own input format; ``unit`` is the
    per-channel std of the batch's source dataset (noises are sized in its normalised units).
    """
    if augment is None:
        batches = test_batches(problem, device, batch_size)
    else:
        batches = (augment(x, unit) for x, unit in test_batches_with_units(problem, device, batch_size))
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
            inputs = prepare_input(x, fmt).contiguous(memory_format=fast_memory_format(model))
            if features:
                out, feat = model(inputs, return_features=True)
                feats[k].append(feat.float())
            else:
                out = model(inputs)
            logits[k].append(out.float())
    return [(torch.cat(lo), torch.cat(fe) if features else None) for lo, fe in zip(logits, feats)]


@torch.no_grad()
def run_stacked(stacks: list[nn.Module], formats: list[InputFormat], batches,
                features: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``run_experts`` for stacked experts (stacked.py: expert k of every seed as one network): each batch is
    ``[S, B, C, H, W]``, seed s's [0,1] images; returns per expert ``(logits [S, N, K], features or None)``."""
    logits: list[list[torch.Tensor]] = [[] for _ in stacks]
    feats: list[list[torch.Tensor]] = [[] for _ in stacks]
    for x in batches:
        seeds, size = x.shape[:2]
        for k, (network, fmt) in enumerate(zip(stacks, formats)):
            inputs = prepare_input(x.flatten(0, 1), fmt).unflatten(0, (seeds, size))
            out = network(inputs, return_features=features)
            if features:
                out, feat = out
                feats[k].append(feat.float())
            logits[k].append(out.float())
    return [(torch.cat(lo, dim=1), torch.cat(fe, dim=1) if features else None) for lo, fe in zip(logits, feats)]
