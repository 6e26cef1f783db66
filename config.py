"""Run configuration: dataclass defaults < YAML files < command-line ``key=value`` overrides.

Every script has a dataclass config here and builds it with ``parse_args(ConfigClass, argv)``:

    python train_source_networks.py dataset=mnist seeds=[0,1] expert.epochs=2 expert.lr=1e-3

The defaults below are the paper's values and the one place they are written: a researcher who edits
one changes what the next run does, the pipeline included (YAML files and profiles hold only what
differs, and say why). How each kind of artifact is made is one *section* (``ExpertTraining``,
``DaflTraining``, ``GateTraining``); a stage's config holds the section it trains and the sections of
the artifacts it reads, so every stage agrees on where an upstream artifact lives (its settings are part
of its file name: artifacts.py).

Arguments ending in ``.yaml``/``.yml`` are YAML files applied in order; ``key=value`` pairs are
applied after them. Nested keys use dots (``tasks.my_task.classes=[0,2]``); values are parsed as
YAML (lists as ``[a,b]``) and then coerced to the field's declared type, so ``lr=1`` is a float.
Unknown keys are errors that suggest the nearest valid key, and values are checked against their range
(``check``) before any work. In a YAML file (never on the command line) a stage skips the keys that only
other stages read (``STAGE_CONFIGS``): one file of tasks, problems, settings and a merge table's rules serves
every stage. This module imports nothing heavy, so the command line (cli.py) answers before torch loads.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from errors import UserError

# The paper's seed list (docs/design.md section 3); expert, generator and gate of seed i belong together.
PAPER_SEEDS = [770597, 600522, 416719, 306890, 201746, 156886, 929271, 247945, 5028, 436287]

DATA_DIR_ENV = "MOE_DATA_DIR"

# Where an ad-hoc run writes its rows and reports: a folder git ignores, so trying things never touches the committed
# results/ (experiments/reproduce.py writes its profile's folder, results/PROFILE, which the pages quote).
RUNS = "runs"

# The pipeline's profiles (experiments/reproduce.py): a stage may take one as the base of its settings (profile_field)
PROFILES = Path(__file__).resolve().parent / "experiments" / "profiles"

class ConfigError(UserError, ValueError):
    """A configuration problem the user can fix; the message says how."""


# ---------------------------------------------------------------- value ranges, checked at load

def at_least(low: float, default: Any) -> Any:
    """A field whose value (unless None) must be >= ``low``."""
    return field(default=default, metadata={"check": (low, None, f"at least {low}")})


def positive(default: Any) -> Any:
    """A field whose value must be > 0."""
    return greater_than(0, default)


def fraction(default: float) -> Any:
    """A field whose value must lie in [0, 1)."""
    return field(default=default, metadata={"check": (0, 1, "in [0, 1)")})


def open_fraction(default: float) -> Any:
    """A field whose value must lie in (0, 1)."""
    return field(default=default, metadata={"check": (0, 1, "in (0, 1)"), "open_low": True})


def greater_than(low: float, default: Any) -> Any:
    """A field whose value must be > ``low``."""
    return field(default=default, metadata={"check": (low, "open", f"greater than {low}")})


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field that must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


def seed_list(default: list[int]) -> Any:
    return field(default_factory=lambda: list(default), metadata={"seeds": True})


def yaml_files_field() -> Any:
    """The YAML files a config was read from, in order (parse_args records them): the hints that say how to make
    a missing artifact repeat them, so a copied hint finds the user's own tasks and problems. Not part of the
    config's record (``to_dict``, its digest) nor of its equality: the same settings from other files are one
    run."""
    return field(default_factory=list, compare=False, metadata={"unrecorded": True})


def profile_field() -> Any:
    """A profile of the pipeline (``quick``, ``cpu``, ``paper``, or a profile's YAML file) whose settings sections
    and ``ckpt_dir`` are the base of this config, below its YAML files and ``key=value`` arguments wherever it is
    given: the settings under which ``make reproduce PROFILE=...`` made its checkpoints (``profile_settings``)."""
    return field(default="", metadata={"profile": True})


def device_field() -> Any:
    return field(default="auto", metadata={"device": True})


STACKING = ("auto", "true", "false")


def stacking_field() -> Any:
    """How a stage runs its seeds: ``auto`` (the path bench/bench_vectorised.py measured faster for that stage on
    the device at hand: stacked.resolve_stacking), ``true`` (all seeds as one stacked network) or ``false``
    (one seed at a time). YAML's true/false are accepted."""
    return field(default="auto", metadata={"choices": STACKING})


# ---------------------------------------------------------------- tasks and problems (data, not code)

@dataclass
class TaskSpec:
    """An expert's training task: a source dataset, the subset of its classes it learns, and optionally
    one part of a split of its training set (the parents of weight-space fusion, docs/design.md section 8).

    The expert's local label j is ``classes[j]`` of the source dataset; ``classes: null`` means all.
    ``split`` cuts the task's *training* set into ``parts`` disjoint parts and keeps part ``part``
    (test sets stay whole, so every part is scored on the same test set; data.split_parts does it):

    - ``full``: no split (``parts``, ``part``, ``alpha`` and ``split_seed`` keep their defaults).
    - ``dirichlet``: non-IID; each class is shared out by proportions drawn from Dirichlet(``alpha``),
      one concentration per part (``null``: linspace(1, 5, parts)), seeded by ``split_seed``.
    - ``shard``: the classes are dealt into ``parts`` contiguous groups; a part keeps its group's samples.

    Every part keeps the task's whole label space, so each parent has a head over all its classes.
    """

    source: str
    classes: list[int] | None = None
    split: str = "full"  # full, dirichlet or shard (data.SPLITS)
    parts: int = 1
    part: int = 0
    alpha: list[float] | None = None
    split_seed: int = 0


def default_tasks() -> dict[str, TaskSpec]:
    return {
        "mnist": TaskSpec("mnist"),
        "first5_mnist": TaskSpec("mnist", [0, 1, 2, 3, 4]),
        "last5_mnist": TaskSpec("mnist", [5, 6, 7, 8, 9]),
        "fashion_mnist": TaskSpec("fashion_mnist"),
        "cifar10": TaskSpec("cifar10"),
        # MNIST as five 2-class tasks, for the five-expert scaling problem
        **{f"mnist_{a}{a + 1}": TaskSpec("mnist", [a, a + 1]) for a in range(0, 10, 2)},
        # airplane vs automobile: a 2-class expert beside 5-class ones (mnist5_cifar2)
        "cifar2": TaskSpec("cifar10", [0, 1]),
    }


@dataclass
class ExpertFile:
    """An expert this repository did not train, given by file (docs/design.md section 3, "Experts from files").

    The file is TorchScript (``torch.jit.save``), a ``torch.export`` program (``.pt2``), or, when ``model``
    names its class as ``package.module:Class``, a state dict built into ``Class(**model_kwargs)``. The
    expert takes ``channels`` x ``size`` x ``size`` images normalised with ``mean`` and ``std`` (the
    problem's 32x32 images lose ``crop`` border pixels, then are resized to ``size``), and its logits are ``classes``, in order: their names
    become the problem's global class names. ``feature_layer`` names the submodule whose output is its
    feature vector (read with a forward hook), for the rules that read features."""

    path: str
    channels: int
    size: int
    mean: list[float]
    std: list[float]
    classes: list[str]
    model: str | None = None  # package.module:Class of a state dict; None for TorchScript and torch.export files
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: str | None = None
    # pixels cut from every border of the problem's images before resizing: 2 undoes MNIST's Pad(2), for a
    # model trained on the 28x28 originals (resizing the padded image instead shrinks every digit by 1/8)
    crop: int = 0
    # a fusion parent's levels (problems with shared labels; parent_files.py): the names of its Linear and Conv2d
    # modules in the order the data meets them, output layer last, where its class is not an MLP or VGG of archs/;
    # pools: the convolution levels a 2x2 max-pool follows
    levels: list[str] | None = None
    pools: list[str] = field(default_factory=list)
    # a residual fusion parent's level map, where its class is not archs/resnet.py's: prefixes of its parameter
    # names -> archs/resnet.py's (body.0 the stem convolution, body.1 its norm, body.3 on the blocks in order, fc
    # the classifier; in a block conv1, bn1, conv2, bn2, shortcut.0, shortcut.1)
    rename: dict[str, str] = field(default_factory=dict)


@dataclass
class ExpertSpec:
    """One expert of a problem: the task it was trained on, its architecture and the arch's extra
    arguments (e.g. an MLP's widths; they are part of the checkpoint's name). An expert given by ``file``
    was trained elsewhere: its task names the test set it is scored on, and its ``arch`` is ignored, except for a
    fusion parent (shared labels), where it names the family the file rebuilds as (mlp, vgg or resnet)."""

    task: str
    arch: str = "lenet5"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    file: ExpertFile | None = None


@dataclass
class ProblemSpec:
    """A benchmark: its experts, in order. Expert k's local class j gets the next free global id, so
    ``disjoint_mnist`` labels are the digits and ``mnist_cifar10`` puts CIFAR-10 at 10..19.

    ``shared_labels: true`` makes a problem of fusion parents instead (docs/design.md section 8): every
    expert predicts the same classes of the same source, the combined test set is that task's test
    set once, and the global labels are the experts' own (problems.build_problem says more)."""

    experts: list[ExpertSpec]
    shared_labels: bool = False


def default_problems() -> dict[str, ProblemSpec]:
    return {
        "disjoint_mnist": ProblemSpec([ExpertSpec("first5_mnist"), ExpertSpec("last5_mnist")]),
        "mnist_cifar10": ProblemSpec([ExpertSpec("mnist"), ExpertSpec("cifar10")]),
        "mnist_fashion_cifar10": ProblemSpec(
            [ExpertSpec("mnist"), ExpertSpec("fashion_mnist"), ExpertSpec("cifar10")]),
        "five_mnist": ProblemSpec([ExpertSpec(f"mnist_{a}{a + 1}") for a in range(0, 10, 2)]),
        # LeNet5-half experts (channels 3/8/60): an architecture the universal gate never saw
        "mnist_cifar10_half": ProblemSpec([ExpertSpec("mnist", "lenet5_half"), ExpertSpec("cifar10", "lenet5_half")]),
        # LeNet5s with batch norm: experts that ship running statistics of their activations (the detectors'
        # `shipped` source and DeepInversion read them)
        "mnist_cifar10_bn": ProblemSpec([ExpertSpec("mnist", "lenet5_bn"), ExpertSpec("cifar10", "lenet5_bn")]),
        # experts of unequal class counts (5 and 2): softmax-based scores compare only from each expert's chance
        # level (chance.py), and rules that assume one class count are refused
        "mnist5_cifar2": ProblemSpec([ExpertSpec("first5_mnist"), ExpertSpec("cifar2")]),
    }


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "./data")


# ---------------------------------------------------------------- how each kind of artifact is made

@dataclass
class ExpertTraining:
    """How every expert is trained (docs/design.md section 3: SGD lr 0.01, momentum 0.9, no weight decay,
    10 epochs, batch 512 MNIST / 128 CIFAR-10). Part of each expert checkpoint's recipe."""

    epochs: int = at_least(1, 10)
    lr: float = positive(0.01)
    momentum: float = fraction(0.9)
    weight_decay: float = at_least(0, 0.0)
    batch_size: int | None = at_least(1, None)  # None: the source dataset's paper default (512 MNIST, 128 CIFAR)
    train_limit: int | None = at_least(1, None)  # only the first N training images (smoke runs, tests)
    # the seeds trained together as one stacked network or one by one: the two paths end at weights equal only
    # within float tolerance, so the resolved path is part of the recipe (artifacts.py)
    stack_seeds: str = stacking_field()


@dataclass
class DaflTraining:
    """Data-free generators (DAFL, Chen et al. 2019) as the reference implementation defines them: Adam lr 0.2,
    batch 512, 200 epochs x 120 iterations, latent 100, full width; loss = one-hot cross-entropy + 5 x the
    information entropy of the batch-mean softmax in log base 10 - 0.1 x mean absolute feature activation;
    BatchNorm eps 0.8 after the generator's convolutions; samples drawn in training mode (batch statistics),
    a batch at a time. A GPU budget; experiments/gan_cpu.yaml is the CPU one."""

    epochs: int = at_least(1, 200)
    iters_per_epoch: int = at_least(1, 120)
    batch_size: int = at_least(2, 512)  # batch norm and the batch-mean entropy need two samples or more
    lr: float = positive(0.2)  # Adam
    latent_dim: int = at_least(1, 100)
    width: int = at_least(2, 128)  # channels of the generator's first conv block (the original's 128)
    oh_weight: float = at_least(0, 1.0)  # one-hot cross-entropy against the expert's own argmax
    ie_weight: float = at_least(0, 5.0)  # information entropy of the batch-mean softmax (class balance)
    entropy_base: float = greater_than(1, 10.0)  # the log base of that entropy (DAFL's reference: 10)
    a_weight: float = at_least(0, 0.1)  # reward for large mean absolute feature activation
    bn_eps: float = positive(0.8)  # eps of the BatchNorm layers after the generator's convolutions (DAFL: 0.8)
    sample_mode: str = choice("train", ("train", "eval"))  # train: batch statistics, as DAFL draws its samples
    images: int = at_least(1, 12000)  # images drawn into each expert's stored set
    # the generators of every seed (and of experts of one shape) trained as one stacked network, or one by one
    stack_seeds: str = stacking_field()


@dataclass
class InversionSettings:
    """Class-conditional model inversion on pixels ("data impressions", Nayak et al. ICML 2019): soft targets
    drawn from a Dirichlet whose concentration is ``beta`` x the min-max normalised cosine similarity of the
    expert's final-layer class weights, matched by the softmax at ``temperature``, with total-variation and L2
    image priors and random jitter (and, optionally, flips); Adam on [0,1]-parametrised pixels."""

    images: int = at_least(1, 4000)
    steps: int = at_least(1, 100)
    batch_size: int = at_least(1, 1000)  # images optimised together
    lr: float = positive(0.1)
    temperature: float = positive(20.0)
    betas: list[float] = field(default_factory=lambda: [1.0, 0.1])  # concentration scales; images split evenly
    # strong smoothness and L2 (towards the dataset mean) priors: weaker ones left noise textures that the
    # expert classifies just as confidently (sample grids of seed 770597, first5_mnist)
    tv_weight: float = at_least(0, 5.0)
    l2_weight: float = at_least(0, 0.1)
    jitter: int = at_least(0, 2)  # random shifts of up to this many pixels at every step
    flip: bool = False  # random horizontal flips at every step (digits mirrored are other shapes: off)


@dataclass
class DeepInversionSettings:
    """DeepInversion (Yin et al. CVPR 2020) for experts with batch norm: cross-entropy on random target
    classes, the distance of every BatchNorm layer's batch mean and variance to its running statistics, and
    the same image priors; Adam on [0,1]-parametrised pixels."""

    images: int = at_least(1, 4000)
    steps: int = at_least(1, 200)
    batch_size: int = at_least(2, 256)  # batch statistics need two images or more
    lr: float = positive(0.1)
    bn_weight: float = at_least(0, 0.01)
    tv_weight: float = at_least(0, 0.05)
    l2_weight: float = at_least(0, 0.001)
    jitter: int = at_least(0, 2)
    flip: bool = True


@dataclass
class GateTraining:
    """Gating networks (PANs): the paper's SGD lr 0.01, momentum 0.9, 10 epochs, batch 512, plus the data
    each regime reads. Part of each gate checkpoint's recipe."""

    epochs: int = at_least(1, 10)
    lr: float = positive(0.01)
    momentum: float = fraction(0.9)
    batch_size: int = at_least(1, 512)
    balance_classes: bool = True  # weight the loss so in- and out-of-domain count alike
    standardise_inputs: bool = True  # z-score gate inputs with their training mean and std
    noise_samples: int = at_least(1, 12000)  # uniform-noise images (negatives of the data-free regimes)
    augment_copies: int = at_least(0, 0)  # data-free regimes: augmented copies of every synthetic image
    train_limit: int | None = at_least(1, None)  # `real` regime: first N training images of each expert's task
    # the statistics source (sources.py) the detector gate's scores are standardised on, for every regime: a
    # data-free one, so the gate reads the same at evaluation whatever it was trained on (the default synthesizer's
    # sets, which a default run makes; the profiles use model inversion's)
    detector_stats: str = "synthetic:dafl"
    stack_seeds: str = stacking_field()  # the gates of one shape (every seed, type and expert) trained together


@dataclass
class StatisticsSettings:
    """How the detectors' statistics are fitted on a source of an expert's inputs (sources.py names it,
    detector_stats.py fits it): a seeded ``holdout`` share of the source calibrates the scores (scored against statistics of the rest: an
    input is its own nearest neighbour), at most ``knn_bank`` features are kept for KNN, ViM's principal
    subspace has ``vim_dim`` dimensions (null: half the features), ReAct clips at ``react_percentile``. Part
    of each statistics artifact's recipe; shrinkage and KNN's k are the rules' own parameters."""

    holdout: float = open_fraction(0.2)
    knn_bank: int = at_least(1, 10000)
    vim_dim: int | None = at_least(1, None)
    react_percentile: float = fraction(0.9)


SECTIONS = {"expert": ExpertTraining, "dafl": DaflTraining, "inversion": InversionSettings,
            "deepinversion": DeepInversionSettings, "gate": GateTraining, "statistics": StatisticsSettings}
SYNTHESIS_SECTIONS = ("dafl", "inversion", "deepinversion")  # one per synthesizer (synthesis.py)


# ---------------------------------------------------------------- the scripts' configs

@dataclass
class TrainConfig:
    """Expert training (train_source_networks.py): one checkpoint per (task, arch, seed)."""

    dataset: str = "mnist"  # a key of `tasks`
    arch: str = "lenet5"  # a model of archs/ (lenet5, lenet5_half, lenet5_bn, resnet18, resnet, mlp, vgg)
    # extra arguments of the arch beside in_channels and num_classes, e.g. {widths: [400, 200], bias: false}
    # for arch=mlp; they are part of the checkpoint's recipe and name
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = seed_list(PAPER_SEEDS)  # the paper's seeds; expert, generator and gate of seed i go together
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    test_limit: int | None = at_least(1, None)  # only the first N test images of each task (null: all)
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)  # add more under `tasks:` in a YAML file
    data_dir: str = field(default_factory=default_data_dir)  # the data root ($MOE_DATA_DIR, default ./data)
    ckpt_dir: str = "checkpoints"  # where checkpoints, synthetic sets and resume points live
    results_dir: str = RUNS  # rows, reports and the config beside them
    device: str = device_field()  # auto: cuda when available, else cpu
    deterministic: bool = False  # deterministic algorithms: reruns give identical numbers
    force: bool = False  # retrain seeds whose checkpoint already exists
    yaml_files: list[str] = yaml_files_field()


# The rules that need only each expert's logits on the test set, in the paper's table order.
LOGIT_RULES = ["naive", "std_lower", "std_higher", "ratio", "overall_ratio", "thirdQ", "thirdQ_original",
               "max_softmax", "energy", "neg_entropy", "max_logit", "oracle"]


@dataclass
class MergeConfig:
    """Evaluation of combination rules (merge.py). ``expert``, ``dafl`` and ``gate`` say which upstream
    checkpoints the rules read."""

    problem: str = "disjoint_mnist"  # a key of `problems`
    name: str = ""  # names the results files; empty: the problem's name
    strategies: list[Any] = field(default_factory=lambda: list(LOGIT_RULES))  # names, labels or {name: ..., param: ...}
    seeds: list[int] = seed_list(PAPER_SEEDS)  # the paper's seeds; expert, generator and gate of seed i go together
    test_limit: int | None = at_least(1, None)  # per expert's test subset (shared labels: of the one test set)
    batch_size: int = at_least(1, 512)  # evaluation batch (larger batches run slower on CPU: activations leave the cache)
    # real training images (from the union of the parents' training sets) that weight-space fusion rules read
    # to align or fit neurons; shared_labels problems only
    fusion_samples: int = at_least(1, 400)
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    dafl: DaflTraining = field(default_factory=DaflTraining)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    deepinversion: DeepInversionSettings = field(default_factory=DeepInversionSettings)
    gate: GateTraining = field(default_factory=GateTraining)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)  # more under `problems:` in YAML
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)  # add more under `tasks:` in a YAML file
    data_dir: str = field(default_factory=default_data_dir)  # the data root ($MOE_DATA_DIR, default ./data)
    ckpt_dir: str = "checkpoints"  # where checkpoints, synthetic sets and resume points live
    results_dir: str = RUNS  # rows, reports and the config beside them
    device: str = device_field()
    deterministic: bool = False  # deterministic algorithms: reruns give identical numbers
    # evaluate every seed's experts together as one stacked network (stacked.py); the rows equal one seed's alone
    stack_seeds: str = stacking_field()
    force: bool = False  # recompute rows already stored for a seed
    # keep the table's rows of earlier runs of the same problem and settings whose rules this run does not ask for
    # (false: the table holds this run's rules only, as the pipeline's tables do)
    keep_rows: bool = True
    # make the experts, synthetic sets and gates the table needs and does not find, by the commands a missing
    # checkpoint's error names (each stage in its own process), instead of stopping with that error
    make_missing: bool = False
    yaml_files: list[str] = yaml_files_field()


@dataclass
class GanConfig:
    """Data-free synthesis (train_gan.py): per synthesizer, expert of `problem` and seed, one stored set of
    images made from that expert alone (DAFL trains a generator against it first; sections ``dafl``,
    ``inversion``, ``deepinversion``)."""

    problem: str = "disjoint_mnist"
    seeds: list[int] = seed_list(PAPER_SEEDS)  # the paper's seeds; expert, generator and gate of seed i go together
    synthesizers: list[str] = field(default_factory=lambda: ["dafl"])  # names of synthesizers.SYNTHESIZERS
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    dafl: DaflTraining = field(default_factory=DaflTraining)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    deepinversion: DeepInversionSettings = field(default_factory=DeepInversionSettings)
    eval_samples: int = at_least(1, 4096)  # samples scored for the quality figures
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)  # more under `problems:` in YAML
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)  # add more under `tasks:` in a YAML file
    ckpt_dir: str = "checkpoints"  # where checkpoints, synthetic sets and resume points live
    results_dir: str = RUNS  # rows, reports and the config beside them
    device: str = device_field()
    deterministic: bool = False  # deterministic algorithms: reruns give identical numbers
    force: bool = False  # redo finished work
    yaml_files: list[str] = yaml_files_field()


@dataclass
class PanConfig:
    """Gating networks (train_pan.py): per expert of `problem`, per seed, gate type and data regime
    (section ``gate``; ``expert`` and ``dafl`` name the checkpoints the gates read)."""

    problem: str = "disjoint_mnist"
    seeds: list[int] = seed_list(PAPER_SEEDS)  # the paper's seeds; expert, generator and gate of seed i go together
    gate_types: list[str] = field(default_factory=lambda: ["feature", "logits", "agnostic_logits",
                                                           "agnostic_feature", "universal", "detectors"])
    regimes: list[str] = field(default_factory=lambda: ["real", "synthetic", "noise"])
    # the data-free regimes train one set of gates per synthesizer, or mixture ("dafl+inversion")
    synthesizers: list[str] = field(default_factory=lambda: ["dafl"])
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    dafl: DaflTraining = field(default_factory=DaflTraining)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    deepinversion: DeepInversionSettings = field(default_factory=DeepInversionSettings)
    gate: GateTraining = field(default_factory=GateTraining)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    test_limit: int | None = at_least(1, None)  # only the first N test images of each task (null: all)
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)  # more under `problems:` in YAML
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)  # add more under `tasks:` in a YAML file
    data_dir: str = field(default_factory=default_data_dir)  # the data root ($MOE_DATA_DIR, default ./data)
    ckpt_dir: str = "checkpoints"  # where checkpoints, synthetic sets and resume points live
    results_dir: str = RUNS  # rows, reports and the config beside them
    device: str = device_field()
    deterministic: bool = False  # deterministic algorithms: reruns give identical numbers
    force: bool = False  # redo finished work
    yaml_files: list[str] = yaml_files_field()


@dataclass
class PredictConfig:
    """Classify your own images with a mixture (predict.py): one seed of ``problem``'s experts combined by
    ``rule`` (a logit rule or a gate rule; the sections name the checkpoints it reads)."""

    problem: str = "disjoint_mnist"
    # the pipeline profile that made the experts and gates (quick, cpu, paper or its file): its settings and ckpt_dir
    profile: str = profile_field()
    seed: int = at_least(0, PAPER_SEEDS[0])  # one seed of the experts (and gates) to combine
    rule: Any = "naive"  # a strategy: name, label such as gate_hard(gate=universal,regime=real), or mapping
    inputs: str = ""  # a folder of PNG/JPEG images, one image, or a tensor file ([N, C, H, W] uint8 or [0,1] float)
    output: str = ""  # also write the predictions to this CSV file; empty: print them only
    batch_size: int = at_least(1, 512)
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    dafl: DaflTraining = field(default_factory=DaflTraining)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    deepinversion: DeepInversionSettings = field(default_factory=DeepInversionSettings)
    gate: GateTraining = field(default_factory=GateTraining)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)  # more under `problems:` in YAML
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)  # add more under `tasks:` in a YAML file
    ckpt_dir: str = "checkpoints"  # where checkpoints, synthetic sets and resume points live
    data_dir: str = field(default_factory=default_data_dir)  # the data root: stats=real:N not stored yet reads it
    device: str = device_field()
    yaml_files: list[str] = yaml_files_field()


# every stage script's config: a YAML file's keys that only other stages read are skipped by a stage
# (other_stages_keys), and merge.py's make_missing gives each command it runs the arguments its stage takes
STAGE_CONFIGS = {"train_source_networks.py": TrainConfig, "train_gan.py": GanConfig, "train_pan.py": PanConfig,
                 "merge.py": MergeConfig, "predict.py": PredictConfig}


@dataclass
class ReproduceConfig:
    """The whole pipeline (experiments/reproduce.py): experts -> generators -> gates -> merges -> report.

    ``profile`` names ``experiments/profiles/PROFILE.yaml``, which fills the other keys; ``key=value``
    arguments override it. The sections ``expert``, ``dafl`` and ``gate`` go to every stage that reads
    them; ``problems`` holds per-problem stage arguments that choose what to train (gate types, regimes),
    never how."""

    profile: str = "quick"
    seeds: list[int] = seed_list(PAPER_SEEDS[:2])
    # what the data-free gates read: synthesizers and mixtures ("dafl+inversion"); the generator stage makes
    # every synthesizer they name
    synthesizers: list[str] = field(default_factory=lambda: ["dafl"])
    expert: ExpertTraining = field(default_factory=ExpertTraining)
    dafl: DaflTraining = field(default_factory=DaflTraining)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    deepinversion: DeepInversionSettings = field(default_factory=DeepInversionSettings)
    gate: GateTraining = field(default_factory=GateTraining)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    problems: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # name -> {gan: [...], pan: [...]}
    tables: dict[str, list[str]] = field(default_factory=dict)  # experiments/NAME.yaml -> extra merge arguments
    # weight-space fusion tables: experiments/NAME.yaml -> {files: [recipe YAML files every step of the table
    # reads], gan: [...], pan: [...], merge: [...]}: the parents (its problem's experts) are trained, then the
    # generators and gates where `gan` / `pan` are given (their extra arguments), then the table (with `merge`'s
    # extra arguments, after the table's file)
    fusion: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # what the report checks, met or missed, into answer.md and targets.csv (report.target_rows says the forms),
    # e.g. {problem: disjoint_mnist, best: best data-free rule, than: naive, by: 2}
    targets: list[dict[str, Any]] = field(default_factory=list)
    scaling: dict[str, list[str]] = field(default_factory=dict)  # series name -> problems, fewest experts first
    only_problems: list[str] = field(default_factory=list)  # run just these problems (and tables using only them)
    data_dir: str = field(default_factory=default_data_dir)  # the data root ($MOE_DATA_DIR, default ./data)
    ckpt_dir: str = "checkpoints/quick"
    results_dir: str = "results/quick"
    device: str = device_field()
    deterministic: bool = False  # deterministic algorithms in every stage: reruns give identical rows
    force: bool = False  # redo every step's work, ignoring finished checkpoints and cached rows
    report_only: bool = False  # rebuild the report from the results already written
    # local: every step in this process, one after another; ray: every step a Ray task, started when the steps it
    # reads are done (experiments/ray_launcher.py), on a local Ray cluster or the one ray_address (or the
    # RAY_ADDRESS environment variable) names
    launcher: str = choice("local", ("local", "ray"))
    ray_address: str = ""
    seeds_per_task: int | None = at_least(1, None)  # ray: a step's seeds split into tasks of this many (null: one)
    # ray, without GPUs: the CPUs each task reserves and computes on (threads); null: as many as this process's
    # torch threads, so that the rows equal launcher=local's (a float sum over another number of threads rounds
    # differently); 1 runs more steps at once, their numbers equal only within that rounding
    cpus_per_task: float | None = greater_than(0, None)
    # ray, tests only: "STAGE LABEL" makes that step's worker die once, right after its first resume save
    fault_injection: str = ""
    write_script: bool = False  # write experiments/reproduce_PROFILE.sh (the stages as shell commands) and stop


C = TypeVar("C")


def parse_args(cls: type[C], argv: list[str] | None = None) -> C:
    """Build a ``cls`` config from YAML files and ``key=value`` arguments (see module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = cls()
    based = [f.name for f in dataclasses.fields(cls) if f.metadata.get("profile")]
    for arg in argv:  # a profile is the base, wherever it is given: the other arguments override it
        key, _, text = arg.partition("=")
        if key.strip() in based and text:
            cfg = apply_overrides(cfg, profile_settings(text))
    for arg in argv:
        if "=" in arg:
            key, _, text = arg.partition("=")
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"cannot parse the value of {key!r}: {text!r} ({err})") from None
            cfg = apply_overrides(cfg, _nest(key.strip(), value))
        elif arg.endswith((".yaml", ".yml")):
            skips = other_stages_keys(cls)
            cfg = apply_overrides(cfg, {k: v for k, v in load_yaml(arg).items() if k not in skips})
            if hasattr(cfg, "yaml_files"):
                cfg = dataclasses.replace(cfg, yaml_files=[*cfg.yaml_files, arg])
        else:
            raise ConfigError(f"argument {arg!r} is neither key=value nor a .yaml file")
    check(cfg)
    return cfg


def profile_path(name: str) -> Path:
    """A profile's YAML file: ``experiments/profiles/NAME.yaml``, or ``name`` itself when it is a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"unknown profile {name!r}; choices: {choices} (or a profile's .yaml file)")
    return path


def profile_settings(name: str) -> dict:
    """What a pipeline profile sets of the settings sections, and its ``ckpt_dir``: the overrides under which a
    stage finds the checkpoints ``make reproduce PROFILE=name`` made."""
    profile = parse_args(ReproduceConfig, [str(profile_path(name))])
    diff = changes(profile)
    return {**{k: diff[k] for k in SECTIONS if k in diff}, "ckpt_dir": profile.ckpt_dir}


def other_stages_keys(cls: type) -> set[str]:
    """The keys a YAML file may hold for other stages, which ``cls`` skips there: one file serves every stage."""
    return {f.name for stage in STAGE_CONFIGS.values() for f in dataclasses.fields(stage)} - {
        f.name for f in dataclasses.fields(cls)}


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where}: {err.problem or err.context}; fix the YAML "
                              f"there") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not YAML ({err}); fix it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return a copy of dataclass ``cfg`` with ``overrides`` (a nested mapping) applied and coerced."""
    return _merge_dataclass(cfg, overrides, prefix="")


def to_dict(cfg: Any) -> dict:
    unrecorded = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("unrecorded")}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unrecorded}


def describe(cfg: Any) -> str:
    """The resolved config as YAML text, for printing and for saving beside a run's outputs."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def changes(cfg: Any) -> dict:
    """What ``cfg`` sets differently from its class's defaults, as a nested mapping (entries of the task
    and problem tables only where they differ)."""
    return _diff(to_dict(cfg), to_dict(type(cfg)()))


def describe_changes(cfg: Any) -> str:
    """The config's differences from the defaults as YAML: what a run prints before its work (the whole
    resolved config is saved beside its outputs)."""
    diff = changes(cfg)
    name = type(cfg).__name__
    if not diff:
        return f"# {name}: the defaults of config.py\n"
    return f"# {name}: what differs from the defaults of config.py\n" + yaml.safe_dump(
        diff, sort_keys=False, default_flow_style=None)


def _diff(value: Any, default: Any) -> Any:
    if isinstance(value, dict) and isinstance(default, dict):
        out = {k: _diff(v, default[k]) if k in default else v for k, v in value.items() if default.get(k) != v}
        return out
    return value


# Where this machine keeps data, checkpoints and results: they change no number, and an absolute path names a
# machine, so they stay out of every committed config and config digest (issue 27)
MACHINE_PATHS = ("data_dir", "ckpt_dir", "results_dir")


def portable(tree: dict) -> dict:
    """A config as a nested mapping without the machine's paths (MACHINE_PATHS), at any depth."""
    return {k: portable(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in MACHINE_PATHS}


def digest(cfg: Any) -> str:
    """A short hash of the whole resolved config but the machine's paths: every result row carries it
    (``config_digest``), and the config file written once beside its table starts with it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(portable(to_dict(cfg)), sort_keys=True, default=str).encode()).hexdigest()[:12]


def tasks_read(cfg: Any) -> set[str]:
    """The tasks a run reads: the one it trains on (``dataset``) and every expert's of its problems."""
    problems = getattr(cfg, "problems", {})
    return {getattr(cfg, "dataset", None), *(e.task for spec in problems.values() for e in spec.experts)} - {None}


def only_read_tasks(diff: dict, read: set[str]) -> dict:
    """``diff`` without the task entries no one reads: a tasks file such as experiments/fusion_parents.yaml
    defines dozens of splits, and every row would repeat them all (issue 18: results/ stays small)."""
    if "tasks" not in diff:
        return diff
    tasks = {name: spec for name, spec in diff["tasks"].items() if name in read}
    return {k: v for k, v in diff.items() if k != "tasks"} | ({"tasks": tasks} if tasks else {})


def row_config(cfg: Any, table_keys: tuple[str, ...] = ()) -> dict:
    """What one result row carries of the run that made it: the digest of the whole resolved config (saved once
    beside the table, ``save``) and what it sets differently from config.py's defaults, without ``table_keys``
    (keys that describe the table rather than the row, such as the list of every strategy it ran) and without
    the task entries it does not read."""
    diff = portable(only_read_tasks(changes(cfg), tasks_read(cfg)))
    return {"config_digest": digest(cfg), "config": {k: v for k, v in diff.items() if k not in table_keys}}


def save(cfg: Any, path: str | os.PathLike) -> None:
    """The whole resolved config as YAML, headed by its digest (the ``config_digest`` of the rows beside it),
    without the machine's paths."""
    from common import atomic_write_text  # common loads torch; the command line reads this module before it

    atomic_write_text(path, f"# config digest: {digest(cfg)}\n" + yaml.safe_dump(
        portable(to_dict(cfg)), sort_keys=False, default_flow_style=None))


# ---------------------------------------------------------------- range checks

def check(cfg: Any) -> None:
    """Raise ConfigError, naming the key and the allowed range, for the first value out of range in
    ``cfg`` (sections and table entries included); called at load and at the start of every script."""
    _check_dataclass(cfg, prefix="")


def _check_dataclass(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if "check" in f.metadata and value is not None:
            low, high, words = f.metadata["check"]
            bad = value < low if high is None else (value <= low if high == "open" else not low <= value < high)
            bad = bad or (f.metadata.get("open_low", False) and value == low)
            if bad:
                raise ConfigError(f"{key}={value!r} is out of range: it must be {words}")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(f.metadata['choices'])}")
        if f.metadata.get("seeds"):
            if not value:
                raise ConfigError(f"{key} is empty: give at least one seed, e.g. {key}=[0]")
            if len(set(value)) != len(value):
                raise ConfigError(f"{key} lists a seed twice: {value}")
            if any(seed < 0 for seed in value):  # torch's generators take no negative seed
                raise ConfigError(f"{key}={value} holds a negative seed: seeds are whole numbers >= 0, e.g. "
                                  f"{key}=[0]")
        if f.metadata.get("device"):
            check_device(value, key)
        if dataclasses.is_dataclass(value):
            _check_dataclass(value, key + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    _check_dataclass(v, f"{key}.{k}.")


def check_names(cfg: Any) -> None:
    """The task a run trains on (``dataset``) and the problem it reads (``problem``) must be entries of its tables;
    the command line checks this before torch loads, every script again at its start."""
    if hasattr(cfg, "dataset") and cfg.dataset not in cfg.tasks:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choices: {', '.join(cfg.tasks)} "
                          f"(define more under `tasks` in a YAML file)")
    if hasattr(cfg, "problem") and hasattr(cfg, "problems") and cfg.problem not in cfg.problems:
        raise ConfigError(f"unknown problem {cfg.problem!r}; choices: {', '.join(cfg.problems)} "
                          f"(define more under `problems` in a YAML file)")


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str, key: str = "device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device only where CUDA is available."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"{key}={name!r} is not a device; choices: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} was asked for but CUDA is not available here; use {key}=cpu "
                              f"(or {key}=auto, which picks cuda where there is one)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _nest(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _merge_dataclass(obj: Any, overrides: dict, prefix: str) -> Any:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {overrides!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            homes = [prefix + h for h in nested_homes(obj, key)]
            raise ConfigError(_unknown_key_message(prefix + key, key, list(fields), homes))
        current = getattr(obj, key)
        changes[key] = coerce(value, hints[key], prefix + key, current)
    return dataclasses.replace(obj, **changes)


def nested_homes(obj: Any, key: str) -> list[str]:
    """The dotted names under which ``key`` is a field of one of ``obj``'s settings sections (``epochs`` ->
    ``expert.epochs``, ``gate.epochs``): where a flat key of the paper's scripts lives here."""
    return [f"{f.name}.{key}" for f in dataclasses.fields(obj)
            if dataclasses.is_dataclass(getattr(obj, f.name)) and key in {g.name for g in
                                                                         dataclasses.fields(getattr(obj, f.name))}]


def _unknown_key_message(full_key: str, key: str, choices: list[str], homes: list[str] = ()) -> str:
    if homes:
        listed = " or ".join(repr(h) for h in homes)
        return (f"unknown config key {full_key!r}: it is a key of a settings section here; did you mean "
                f"{listed}? (e.g. {homes[0]}=...)")
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {full_key!r}{hint} (valid keys: {', '.join(choices)})"


def coerce(value: Any, tp: Any, key: str, current: Any = None) -> Any:
    """Convert a YAML-parsed ``value`` to type ``tp``; raise ConfigError naming ``key`` if impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, current)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        base = current if dataclasses.is_dataclass(current) else _construct(tp, value, key)
        return _merge_dataclass(base, value, key + ".")
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {value!r}")
        merged = dict(current) if isinstance(current, dict) else {}
        for k, v in value.items():
            merged[str(k)] = coerce(v, args[1], f"{key}.{k}", merged.get(str(k)))
        return merged
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        if tp is int and isinstance(value, int):
            return value  # exact, also beyond float precision
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
        if tp is int:
            if not number.is_integer():
                raise ConfigError(f"{key} expects an integer, got {value!r}")
            return int(number)
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML reads true/false as booleans; string choices spell them in lower case
            return "true" if value else "false"
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _construct(tp: type, value: Any, key: str) -> Any:
    """A fresh dataclass instance for a new dict entry; required fields must be present."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key} expects a mapping, got {value!r}")
    required = [
        f.name for f in dataclasses.fields(tp)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in value]
    if missing:
        raise ConfigError(f"{key} needs the key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(tp)
    return tp(**{name: coerce(value[name], hints[name], f"{key}.{name}") for name in required})


def print_config(cfg: Any) -> None:
    print(describe_changes(cfg), end="", flush=True)
