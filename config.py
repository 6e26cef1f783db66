"""Run configuration: dataclass defaults < YAML files < command-line ``key=value`` overrides.

Every script has a dataclass config here and calls ``parse_args(ConfigClass, argv)``:

    python train_source_networks.py experiments/experts.yaml dataset=mnist seeds=[0,1] lr=1e-3

Arguments ending in ``.yaml``/``.yml`` are YAML files applied in order; ``key=value`` pairs are
applied after them. Nested keys use dots (``tasks.my_task.classes=[0,2]``); values are parsed as
YAML (lists as ``[a,b]``) and then coerced to the field's declared type, so ``lr=1`` is a float.
Unknown keys are errors that suggest the nearest valid key. A config class may name, in its
``YAML_SKIPS``, keys of other scripts' experiment files that it skips in a YAML file (never on the
command line): the generator and gate stages read a merge table's problem and seeds and skip its
rules (``MERGE_ONLY_KEYS``), so one file defines a problem for all three.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

import yaml

# The paper's seed list (DESIGN.md section 3); expert, generator and gate of seed i belong together.
PAPER_SEEDS = [770597, 600522, 416719, 306890, 201746, 156886, 929271, 247945, 5028, 436287]

DATA_DIR_ENV = "MOE_DATA_DIR"

# Keys of a merge table (experiments/*.yaml for merge.py) that only merge.py reads.
MERGE_ONLY_KEYS = ("name", "strategies", "fusion_samples")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class TaskSpec:
    """An expert's training task: a source dataset, the subset of its classes it learns, and optionally
    one part of a split of its training set (the parents of weight-space fusion, DESIGN.md section 8).

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
    }


@dataclass
class ExpertSpec:
    """One expert of a problem: the task it was trained on, its architecture and the arch's extra
    arguments (``TrainConfig.arch_kwargs``, e.g. an MLP's widths; they are part of the checkpoint's name)."""

    task: str
    arch: str = "lenet5"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProblemSpec:
    """A benchmark: its experts, in order. Expert k's local class j gets the next free global id, so
    ``disjoint_mnist`` labels are the digits and ``mnist_cifar10`` puts CIFAR-10 at 10..19.

    ``shared_labels: true`` makes a problem of fusion parents instead (DESIGN.md section 8): every
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
    }


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "./data")


@dataclass
class TrainConfig:
    """Expert training (train_source_networks.py); defaults are the paper's (DESIGN.md section 3)."""

    dataset: str = "mnist"  # a key of `tasks`
    arch: str = "lenet5"
    # extra arguments of the arch beside in_channels and num_classes, e.g. {widths: [400, 200], bias: false}
    # for arch=mlp; they are part of the checkpoint's settings and name (train_source_networks.arch_tag)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int | None = None  # None: the source dataset's paper default (512 MNIST, 128 CIFAR)
    train_limit: int | None = None  # use only the first N training images (smoke runs, tests)
    test_limit: int | None = None
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)
    data_dir: str = field(default_factory=default_data_dir)
    ckpt_dir: str = "checkpoints"
    results_dir: str = "results"
    device: str = "auto"  # auto: cuda when available, else cpu
    deterministic: bool = False
    force: bool = False  # retrain seeds whose checkpoint already exists
    replace_stale: bool = False  # retrain a checkpoint made with other settings instead of stopping


# The rules that need only each expert's logits on the test set, in the paper's table order.
LOGIT_RULES = ["naive", "std_lower", "std_higher", "ratio", "overall_ratio", "thirdQ", "thirdQ_original",
               "max_softmax", "energy", "neg_entropy", "max_logit", "oracle"]


@dataclass
class MergeConfig:
    """Evaluation of combination rules (merge.py)."""

    problem: str = "disjoint_mnist"  # a key of `problems`
    name: str = ""  # names the results files; empty: the problem's name
    strategies: list[Any] = field(default_factory=lambda: list(LOGIT_RULES))  # names or {name: ..., param: ...}
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))
    test_limit: int | None = None  # per expert's test subset (shared labels: of the one test set), for smoke runs
    batch_size: int = 512  # evaluation batch (larger batches run slower on CPU: activations leave the cache)
    # real training images (from the union of the parents' training sets) that weight-space fusion rules read
    # to align or fit neurons; shared_labels problems only
    fusion_samples: int = 400
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)
    data_dir: str = field(default_factory=default_data_dir)
    ckpt_dir: str = "checkpoints"
    results_dir: str = "results"
    device: str = "auto"
    deterministic: bool = False
    force: bool = False  # recompute rows already stored for a seed


@dataclass
class GanConfig:
    """Data-free generators (train_gan.py): one per expert of `problem` per seed, trained against that
    expert with the DAFL loss. Defaults are the original settings (the `paper` profile, for a GPU)."""

    YAML_SKIPS: ClassVar[tuple[str, ...]] = MERGE_ONLY_KEYS  # a merge table's rules, in a YAML file

    problem: str = "disjoint_mnist"
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))
    epochs: int = 200
    iters_per_epoch: int = 120
    batch_size: int = 512
    lr: float = 0.2  # Adam
    latent_dim: int = 100
    width: int = 128  # channels of the generator's first conv block (the original's 128)
    oh_weight: float = 1.0  # one-hot cross-entropy against the expert's own argmax
    ie_weight: float = 10.0  # information entropy of the batch-mean softmax (class balance)
    a_weight: float = 0.1  # reward for large mean absolute feature activation
    eval_samples: int = 4096  # samples scored for the quality figures
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)
    ckpt_dir: str = "checkpoints"
    results_dir: str = "results"
    device: str = "auto"
    deterministic: bool = False
    force: bool = False
    replace_stale: bool = False  # retrain a checkpoint made with other settings or upstream checkpoints


@dataclass
class PanConfig:
    """Gating networks (train_pan.py): per expert of `problem`, per seed, gate type and data regime.
    Training defaults are the paper's (SGD lr 0.01, momentum 0.9, 10 epochs, batch 512)."""

    YAML_SKIPS: ClassVar[tuple[str, ...]] = MERGE_ONLY_KEYS  # a merge table's rules, in a YAML file

    problem: str = "disjoint_mnist"
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))
    gate_types: list[str] = field(default_factory=lambda: ["feature", "logits", "agnostic_logits",
                                                           "agnostic_feature", "universal"])
    regimes: list[str] = field(default_factory=lambda: ["real", "synthetic", "noise"])
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 512
    balance_classes: bool = True  # weight the loss so in- and out-of-domain count alike
    standardise_inputs: bool = True  # z-score gate inputs with their training mean and std
    synthetic_samples: int = 12000  # images drawn from each expert's generator
    noise_samples: int = 12000  # uniform-noise images (negatives of the data-free regimes)
    train_limit: int | None = None  # `real` regime: first N training images of each expert's task
    test_limit: int | None = None
    problems: dict[str, ProblemSpec] = field(default_factory=default_problems)
    tasks: dict[str, TaskSpec] = field(default_factory=default_tasks)
    data_dir: str = field(default_factory=default_data_dir)
    ckpt_dir: str = "checkpoints"
    results_dir: str = "results"
    device: str = "auto"
    deterministic: bool = False
    force: bool = False
    replace_stale: bool = False  # retrain a checkpoint made with other settings or upstream checkpoints


@dataclass
class ReproduceConfig:
    """The whole pipeline (experiments/reproduce.py): experts -> generators -> gates -> merges -> report.

    ``profile`` names ``experiments/profiles/PROFILE.yaml``, which fills the other keys; ``key=value``
    arguments override it. Stage arguments are exactly what the stage script takes on its command
    line (YAML files and ``key=value``), so the batch script runs the same steps."""

    profile: str = "quick"
    seeds: list[int] = field(default_factory=lambda: PAPER_SEEDS[:2])
    experts: list[str] = field(default_factory=list)  # arguments of every train_source_networks.py step
    gan: list[str] = field(default_factory=list)  # ... of every train_gan.py step
    pan: list[str] = field(default_factory=list)  # ... of every train_pan.py step
    merge: list[str] = field(default_factory=list)  # ... of every merge.py step
    problems: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # name -> {gan: [...], pan: [...]}
    tables: dict[str, list[str]] = field(default_factory=dict)  # experiments/NAME.yaml -> extra merge arguments
    scaling: dict[str, list[str]] = field(default_factory=dict)  # series name -> problems, fewest experts first
    only_problems: list[str] = field(default_factory=list)  # run just these problems (and tables using only them)
    data_dir: str = field(default_factory=default_data_dir)
    ckpt_dir: str = "checkpoints/quick"
    results_dir: str = "results/quick"
    device: str = "auto"
    force: bool = False  # redo every step's work, ignoring finished checkpoints and cached rows
    report_only: bool = False  # rebuild the report from the results already written
    write_script: bool = False  # write experiments/reproduce_PROFILE.sh (the stages as shell commands) and stop


C = TypeVar("C")


def parse_args(cls: type[C], argv: list[str] | None = None) -> C:
    """Build a ``cls`` config from YAML files and ``key=value`` arguments (see module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = cls()
    for arg in argv:
        if "=" in arg:
            key, _, text = arg.partition("=")
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"cannot parse the value of {key!r}: {text!r} ({err})") from None
            cfg = apply_overrides(cfg, _nest(key.strip(), value))
        elif arg.endswith((".yaml", ".yml")):
            skips = getattr(cls, "YAML_SKIPS", ())
            cfg = apply_overrides(cfg, {k: v for k, v in load_yaml(arg).items() if k not in skips})
        else:
            raise ConfigError(f"argument {arg!r} is neither key=value nor a .yaml file")
    return cfg


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return a copy of dataclass ``cfg`` with ``overrides`` (a nested mapping) applied and coerced."""
    return _merge_dataclass(cfg, overrides, prefix="")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cfg: Any) -> str:
    """The resolved config as YAML text, for printing and for saving beside a run's outputs."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save(cfg: Any, path: str | os.PathLike) -> None:
    from common import atomic_write_text

    atomic_write_text(path, describe(cfg))


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
            raise ConfigError(_unknown_key_message(prefix + key, key, list(fields)))
        current = getattr(obj, key)
        changes[key] = coerce(value, hints[key], prefix + key, current)
    return dataclasses.replace(obj, **changes)


def _unknown_key_message(full_key: str, key: str, choices: list[str]) -> str:
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
    print(describe(cfg), end="", flush=True)
