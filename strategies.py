"""Merge strategies: rules that turn the experts' outputs into one prediction over the global classes.

A strategy is a function ``fn(inputs: MergeInputs, *, param=default, ...) -> Decision`` registered by
name with ``@register``; its keyword-only parameters, with their annotations and defaults, are the
typed parameters a config may set. ``parse_strategies`` checks names and parameters when the config
loads, before any work. Every rule is vectorised over the batch and runs wherever its tensors are.

Routing rules trust one expert per sample. Weight-space fusion rules (docs/design.md section 8) instead
build one network from the parents of a problem with shared labels and let it answer every sample
(``Decision.expert`` is -1); they read ``MergeInputs.fusion`` and are registered with the
``FusionNeeds`` that ``check_fusion`` tests against a problem before any work.
"""
from __future__ import annotations

import difflib
import inspect
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import yaml
from torch import Tensor

from augments import TTA_SETTINGS
from chance import differ, relative_to_chance
from config import ConfigError, ProblemSpec, coerce
from detectors import DETECTORS
from fusion import (HAS_POT, POT_MISSING, AuthorsGradient, align, class_share_weights, conductance_importance, distil,
                    ensemble_softmax, finetune, hungarian_fusion, kf_gradient, kf_linear, reinitialised, repaired,
                    reset_norm_statistics)
from gating import GATE_TYPES, check_regime, is_real
from sources import Source, parse_source
from synthesis import components
from unlabeled import (SELECTION, activation_matrix, check_fit_inputs, cluster_assign, entropy_gate, fit_rows,
                       pseudo_mahalanobis,
                       self_train, standardise)

NO_EXPERT = -1  # Decision.expert of a sample no single expert answered (a fused network or an ensemble did)


@dataclass
class Decision:
    """A rule's output: the predicted global class and the expert it trusted, per sample."""

    pred: Tensor  # [N] global class ids
    expert: Tensor  # [N] index of the chosen expert, or NO_EXPERT
    fallback: Tensor | None = None  # [N] bool: the rule could not decide and fell back to naive
    row: dict[str, Any] = field(default_factory=dict)  # extra fields for the result row (fusion: data use, times)
    # rules fitted on unlabeled inputs: each expert's routing score ([N, experts], higher = more its own), and the
    # fit inputs they labelled themselves with the expert given to each; merge.py scores both against the domain
    scores: Tensor | None = None
    pseudo: tuple[Tensor, Tensor] | None = None


@dataclass
class FusionInputs:
    """What fusion rules read beside the logits, on a problem with shared labels (merge.py builds it
    only when a fusion rule runs)."""

    parents: list[nn.Module]  # the experts, in eval mode; rules never change them
    samples: Tensor  # real training images from the union of the parents' training sets, in their input format
    class_counts: Tensor  # [parents, classes] training images of each class every parent learnt from
    predict: Callable[[Callable[[Tensor], Tensor]], Tensor]  # a network's global predictions on the test set
    training_data: Callable[[], tuple[Tensor, Tensor]]  # the union of the parents' training sets (prepared), labels
    seed: int = 0  # seeds a rule's own randomness (k-means seeding, fine-tuning order)


@dataclass
class MergeInputs:
    """What a rule may read. ``passes(setting)`` runs the experts on augmented copies (cached)."""

    logits: list[Tensor]  # expert k's logits on the combined test set, [N, K_k]
    label_maps: list[Tensor]  # expert k's local class j -> global id
    domain: Tensor | None = None  # true expert of each sample: only the oracle may read it
    run_passes: Callable[[str], list[list[Tensor]]] | None = None
    run_gates: Callable[[str, str, str, str], Tensor] | None = None
    run_synthetic: Callable[[str], list[list[Tensor]]] | None = None
    # run_detector(name, source, standardisation, params): every expert's scores (detector_stats.DetectorScorer)
    run_detector: Callable[[str, Source | None, str, dict[str, Any]], Any] | None = None
    fusion: FusionInputs | None = None  # problems with shared labels, for the fusion rules
    features: list[Tensor] | None = None  # expert k's feature vectors on the combined test set, [N, D_k]
    select: Tensor | None = None  # [N] bool, the selection half: all a rule fitted on unlabeled inputs may fit on
    seed: int = 0  # seeds a rule's own randomness (the order of an unlabeled stream, k-means seeding)
    _passes: dict[str, list[list[Tensor]]] = field(default_factory=dict, repr=False)
    _gates: dict[tuple[str, str, str, str], Tensor] = field(default_factory=dict, repr=False)
    _synthetic: dict[str, list[list[Tensor]]] = field(default_factory=dict, repr=False)

    def passes(self, setting: str) -> list[list[Tensor]]:
        """Logits per pass (pass 0 = the original images) per expert, for a TTA setting."""
        if self.run_passes is None:
            raise RuntimeError("this evaluation cannot run experts on augmented images")
        if setting not in self._passes:
            self._passes[setting] = self.run_passes(setting)
        return self._passes[setting]

    def gates(self, gate: str, regime: str, gates_from: str = "", synthesizer: str = "") -> Tensor:
        """``[N, experts]``: each expert's gate's probability that the sample is its own (cached)."""
        if self.run_gates is None:
            raise RuntimeError("this evaluation has no gating networks")
        key = (gate, regime, gates_from, synthesizer or DEFAULT_SYNTHESIZER)
        if key not in self._gates:
            self._gates[key] = self.run_gates(*key)
        return self._gates[key]

    def detector(self, name: str, stats: str, standardisation: str, params: dict[str, Any]) -> Any:
        """Detector ``name``'s scores per expert (``.raw`` and ``.comparable``, ``[N, experts]``), its statistics
        from source ``stats`` ("" for none), made comparable by ``standardisation``; cached by the scorer."""
        if self.run_detector is None:
            raise RuntimeError("this evaluation has no detector scorer")
        return self.run_detector(name, parse_source(stats) if stats else None, standardisation, params)

    def synthetic(self, synthesizer: str = "") -> list[list[Tensor]]:
        """``[k][j]``: expert k's logits on expert j's synthetic images (cached); data-free, no real image."""
        if self.run_synthetic is None:
            raise RuntimeError("this evaluation has no synthetic image sets")
        name = synthesizer or DEFAULT_SYNTHESIZER
        if name not in self._synthetic:
            self._synthetic[name] = self.run_synthetic(name)
        return self._synthetic[name]


# the registered archs fusion/ reads layer by layer (fusion.FUSABLE) or block by block (ResNets, fusion/residual.py)
FUSABLE_ARCHS = ("mlp", "vgg", "lenet5", "resnet")


@dataclass(frozen=True)
class FusionNeeds:
    """What a rule reading ``MergeInputs.fusion`` needs of its problem, beside shared labels."""

    weights: bool = True  # it fuses weights, so the experts must be of one fusable arch (FUSABLE_ARCHS)
    parents: int | None = None  # it fuses exactly this many experts (None: any number)
    pot: bool = False  # it solves optimal transport with POT (an optional dependency here)


# The source files every rule's row depends on (running the experts, scoring); a rule's own ``code`` adds the
# modules of its family. A cached row is recomputed when any of them changes (merge.row_key).
BASE_CODE = ("strategies.py", "chance.py", "merge.py", "runners.py", "problems.py", "data.py", "archs/__init__.py",
             "archs/lenet.py", "archs/resnet.py", "archs/mlp.py", "archs/vgg.py")
TTA_CODE = BASE_CODE + ("augments.py",)
# the synthesis code: the sets a calibration or a data-free gate reads are keyed by it too (artifacts.SYNTHESIS_CODE)
SYNTHESIS_CODE = ("synthesis.py", "dafl.py", "inversion.py", "archs/generator.py")
GATE_CODE = BASE_CODE + ("gating.py", "archs/gates.py") + SYNTHESIS_CODE
DEFAULT_SYNTHESIZER = "dafl"  # what a rule's ``synthesizer=""`` reads: the paper's generator
FUSION_CODE = BASE_CODE + tuple(f"fusion/{name}.py" for name in
                                ("__init__", "levels", "ot", "grouping", "fitting", "cka", "finetuning", "ensemble",
                                 "depths", "distil", "gradient", "transport", "weight_matching", "interpolation",
                                 "cross_layer", "repair", "residual", "residual_fit", "residual_depth",
                                 "residual_weight_matching", "residual_repair"))


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., Decision]
    params: dict[str, tuple[Any, Any]]  # name -> (type, default)
    summary: str
    fusion: FusionNeeds | None = None  # set for the rules that read MergeInputs.fusion
    code: tuple[str, ...] = BASE_CODE  # the source files its rows depend on
    detector: str | None = None  # the detector (detectors.DETECTORS) a detector rule routes by
    validate: Callable[[dict[str, Any]], None] | None = None  # checks its parameters together, at config load
    equal_classes: str = ""  # why it needs experts of one class count (refused on other problems); "" if it does not


@dataclass(frozen=True)
class StrategyCall:
    """A strategy with its parameters, as a config asked for it."""

    name: str
    params: dict[str, Any]

    @property
    def label(self) -> str:
        # "" and None mean "not set" and False "off", so a parameter added unset or off by default leaves every
        # label (and the rows keyed by it) as it was
        args = ",".join(f"{k}={v}" for k, v in self.params.items() if v != "" and v is not False and v is not None)
        return f"{self.name}({args})" if args else self.name

    def param(self, key: str) -> Any:
        """The value of parameter ``key``: as given, else the strategy's default (None if it has none)."""
        default = REGISTRY[self.name].params.get(key, (None, None))[1]
        return self.params.get(key, default)

    def __call__(self, inputs: MergeInputs) -> Decision:
        return REGISTRY[self.name].fn(inputs, **self.params)


REGISTRY: dict[str, Strategy] = {}


def register(name: str, fusion: FusionNeeds | None = None, code: tuple[str, ...] = BASE_CODE,
             validate: Callable[[dict[str, Any]], None] | None = None, equal_classes: str = ""
             ) -> Callable[[Callable[..., Decision]], Callable[..., Decision]]:
    def wrap(fn: Callable[..., Decision]) -> Callable[..., Decision]:
        hints = typing.get_type_hints(fn)
        params = {p.name: (hints[p.name], p.default) for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        REGISTRY[name] = Strategy(name, fn, params, (fn.__doc__ or "").strip().splitlines()[0],
                                  fusion, FUSION_CODE if fusion else code, validate=validate,
                                  equal_classes=equal_classes)
        return fn
    return wrap


def check_class_counts(call: StrategyCall, problem: str, counts: list[int]) -> None:
    """Raise ConfigError when ``call`` needs experts of one class count and problem ``problem``'s have ``counts``."""
    why = REGISTRY[call.name].equal_classes
    if why and differ(counts):
        raise ConfigError(f"strategy {call.label!r} assumes experts of one class count, and problem {problem!r} has "
                          f"{counts}: {why}")


def check_fusion(call: StrategyCall, problem: str, spec: ProblemSpec) -> None:
    """Raise ConfigError when fusion rule ``call`` cannot run on problem ``problem`` (nothing for other rules)."""
    needs = REGISTRY[call.name].fusion
    if needs is None:
        return
    if needs.pot and not HAS_POT:
        raise ConfigError(f"strategy {call.name!r}: {POT_MISSING}")
    if not spec.shared_labels:
        raise ConfigError(f"strategy {call.name!r} combines experts that share one label space: it needs a problem "
                          f"with shared_labels: true (fusion parents), and {problem!r} is a routing problem")
    archs = [e.arch for e in spec.experts]
    if needs.weights and (any(a not in FUSABLE_ARCHS for a in archs) or len(set(archs)) > 1):
        raise ConfigError(f"strategy {call.name!r} fuses weights and needs experts of one of the archs "
                          f"{', '.join(FUSABLE_ARCHS)}, all the same, but problem {problem!r} has experts of arch "
                          f"{archs}; ensemble and ensemble_weighted take any arch")
    if call.param("variant") == "authors" and "resnet" in archs:
        raise ConfigError(f"strategy {call.label!r}: the authors' KF-gradient fits chains of levels (archs mlp, vgg, "
                          f"lenet5), and problem {problem!r} has ResNets; drop variant=authors")
    if call.param("importance") == "conductance" and "resnet" in archs:
        raise ConfigError(f"strategy {call.label!r}: ResNets are fused with uniform importance (fusion/residual_fit.py); "
                          f"use importance=uniform")
    if call.param("norm_stats") and not all(e.arch == "resnet" and e.arch_kwargs.get("batch_norm", True)
                                            for e in spec.experts):
        raise ConfigError(f"strategy {call.label!r} resets batch-norm running statistics, but problem {problem!r} has "
                          f"experts without batch norm (only ResNets with batch_norm: true have it); drop norm_stats")
    for key in ("target", "student"):  # parameters naming a parent
        index = call.param(key)
        if index is not None and not 0 <= index < len(archs):
            raise ConfigError(f"strategy {call.label!r}: {key}={index} is not a parent of problem {problem!r}, whose "
                              f"parents are 0..{len(archs) - 1}")
    if needs.parents is not None and len(archs) != needs.parents:
        raise ConfigError(f"strategy {call.name!r} fuses exactly {needs.parents} experts, but problem {problem!r} "
                          f"has {len(archs)}")


LABEL = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*")


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name(key=value,...)``, as the tables print a strategy -> (name, parameters as YAML values)."""
    match = LABEL.fullmatch(label)
    if not match:
        return label.strip(), {}
    params = {}
    for part in filter(None, (p.strip() for p in match.group(2).split(","))):
        key, sep, text = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"strategy {label!r}: {part!r} is not key=value")
        params[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return match.group(1), params


def rejoin_labels(entries: list[Any]) -> list[Any]:
    """A label with several parameters given on the command line (``strategies=[naive,gate_hard(gate=feature,
    regime=real)]``) reaches us cut at its commas by the YAML list; glue the pieces of each label back."""
    out: list[Any] = []
    for entry in entries:
        if out and isinstance(entry, str) and isinstance(out[-1], str) and out[-1].count("(") > out[-1].count(")"):
            out[-1] += "," + entry
        else:
            out.append(entry)
    return out


def expand_grids(entries: list[Any]) -> list[Any]:
    """A mapping whose values include lists stands for the grid of every combination, in the order its keys
    are given: ``{name: [gate_hard, gate_soft], gate: [feature, logits], regime: synthetic}`` is four entries."""
    out: list[Any] = []
    for entry in entries:
        if not isinstance(entry, dict):
            out.append(entry)
            continue
        grid = [{}]
        for key, value in entry.items():
            grid = [{**partial, key: v} for partial in grid for v in (value if isinstance(value, list) else [value])]
        out += grid
    return out


def parse_strategies(entries: list[Any]) -> list[StrategyCall]:
    """Config entries (a name, a label as the tables print it, or a mapping with ``name`` and parameters,
    whose list values expand to a grid) -> validated calls."""
    calls = []
    for entry in expand_grids(rejoin_labels(list(entries))):
        if isinstance(entry, str):
            name, given = parse_label(entry)
        elif isinstance(entry, dict) and "name" in entry:
            name, given = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise ConfigError(f"strategy entry {entry!r} must be a name or a mapping with a `name` key")
        if name not in REGISTRY:
            close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown strategy {name!r}{hint} (choices: {', '.join(REGISTRY)})")
        defaults = {k: default for k, (_, default) in REGISTRY[name].params.items()}
        # defaults filled in, so `tta_mean` and `{name: tta_mean, setting: <default>}` are one strategy
        params = _check_synthesizer(name, {**defaults, **_check_params(REGISTRY[name], given)})
        if REGISTRY[name].validate is not None:
            REGISTRY[name].validate(params)
        calls.append(StrategyCall(name, params))
    labels = [c.label for c in calls]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"strategies listed twice: {', '.join(duplicates)}")
    return calls


def _check_synthesizer(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A rule reading synthetic sets names a synthesizer or mixture ("" = the default, dafl, which is also
    spelled ""); gates of the real regime read none."""
    synthesizer = params.get("synthesizer")
    if not synthesizer:
        return params
    components(synthesizer)
    if is_real(params.get("regime") or ""):
        raise ConfigError(f"strategy {name!r}: gates of regime real read real images, not synthesizer={synthesizer!r}")
    return {**params, "synthesizer": "" if synthesizer == DEFAULT_SYNTHESIZER else synthesizer}


# parameter values that were renamed: an old config fails at load naming the new value
RENAMED_VALUES = {("norm_stats", "recomputed"): "norm_stats=reset (it resets batch-norm running statistics; REPAIR "
                                                "is repair=true)"}


def _check_params(strategy: Strategy, given: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, value in given.items():
        if key not in strategy.params:
            valid = ", ".join(strategy.params) or "none"
            raise ConfigError(f"strategy {strategy.name!r} has no parameter {key!r} (parameters: {valid})")
        tp, _ = strategy.params[key]
        if isinstance(value, str) and (key, value) in RENAMED_VALUES:
            raise ConfigError(f"strategy {strategy.name!r}: {key}={value} is now {RENAMED_VALUES[key, value]}")
        if typing.get_origin(tp) is Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(f"strategy {strategy.name!r}: {key}={value!r} is not one of "
                                  f"{', '.join(map(str, typing.get_args(tp)))}")
            params[key] = value
        else:
            params[key] = coerce(value, tp, f"{strategy.name}.{key}")
    return params


# ---------------------------------------------------------------- building blocks

def column_owners(label_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """For the concatenated logit vector: the global class and the expert of each column."""
    classes = torch.cat(list(label_maps))
    experts = torch.cat([torch.full((len(m),), k, dtype=torch.long) for k, m in enumerate(label_maps)])
    return classes, experts


def concat_argmax(scores: Tensor, label_maps: list[Tensor]) -> Decision:
    """Argmax over a concatenated score vector ``[N, sum K_k]``: its column names class and expert."""
    classes, experts = column_owners(label_maps)
    column = scores.argmax(dim=1).cpu()
    return Decision(classes[column], experts[column])


def choose(inputs: MergeInputs, expert: Tensor) -> Decision:
    """Trust expert ``expert[i]`` for sample i: predict the global class of its argmax."""
    expert = expert.cpu()
    preds = torch.stack([m[o.argmax(dim=1).cpu()] for o, m in zip(inputs.logits, inputs.label_maps)])
    return Decision(preds.gather(0, expert.unsqueeze(0)).squeeze(0), expert)


def class_counts(inputs: MergeInputs) -> list[int]:
    return [o.shape[1] for o in inputs.logits]


def choose_by_score(inputs: MergeInputs, score: Callable[[Tensor], Tensor], higher: bool = True,
                    name: str = "") -> Decision:
    """Trust, per sample, the expert whose ``score(logits)`` is highest (or lowest). ``name`` names the score in
    chance.CORRECTIONS: where the experts' class counts differ, each expert's score is measured from its own
    chance level (chance.py), so that experts compare; with one class count the scores stay raw."""
    scores = torch.stack([score(o) for o in inputs.logits], dim=1)
    return choose_by_columns(inputs, scores, name, {}, higher)


def choose_by_columns(inputs: MergeInputs, scores: Tensor, name: str, params: dict[str, Any],
                      higher: bool = True) -> Decision:
    """Trust, per sample, the expert whose column of ``scores`` ``[N, experts]`` is highest (or lowest), each
    column measured from its expert's chance level where the class counts differ (chance.relative_to_chance)."""
    counts = class_counts(inputs)
    if differ(counts):
        scores = torch.stack([relative_to_chance(name, scores[:, k], c, params) for k, c in enumerate(counts)], dim=1)
    return choose(inputs, scores.argmax(dim=1) if higher else scores.argmin(dim=1))


# ---------------------------------------------------------------- logit statistics (the paper's)

@register("naive")
def naive(inputs: MergeInputs) -> Decision:
    """Argmax over the concatenated logits of all experts (the paper's best rule without a gate)."""
    return concat_argmax(torch.cat(inputs.logits, dim=1), inputs.label_maps)


@register("std_lower")
def std_lower(inputs: MergeInputs) -> Decision:
    """Trust the expert whose logits have the lower standard deviation (the original's rule)."""
    return choose_by_score(inputs, lambda o: o.std(dim=1), higher=False, name="std")


@register("std_higher")
def std_higher(inputs: MergeInputs) -> Decision:
    """Trust the expert whose logits have the higher standard deviation."""
    return choose_by_score(inputs, lambda o: o.std(dim=1), higher=True, name="std")


@register("ratio")
def ratio(inputs: MergeInputs) -> Decision:
    """Each expert's logits divided by their own sum, then naive (unstable: sums near 0 or negative).

    Where an expert's logits sum to a negative number, as they mostly do in trained experts, its largest share is
    its *least* likely class, so the rule routes to an expert and then names a wrong class: accuracy near 0
    (docs/results.md). A share's chance level is 1/K, so where the class counts differ each share is measured
    from it (chance.share_of_certainty)."""
    counts = class_counts(inputs)
    shares = [o / o.sum(dim=1, keepdim=True) for o in inputs.logits]
    if differ(counts):
        shares = [relative_to_chance("ratio", s, c) for s, c in zip(shares, counts)]
    return concat_argmax(torch.cat(shares, dim=1), inputs.label_maps)


@register("overall_ratio")
def overall_ratio(inputs: MergeInputs) -> Decision:
    """The concatenated logits divided by their sum, then argmax (unstable: a negative sum flips it).

    It is naive where the sum of all logits is positive and picks the smallest logit of all (a wrong class) where
    it is negative; like naive it compares raw logits, so the class counts need no correction."""
    concat = torch.cat(inputs.logits, dim=1)
    return concat_argmax(concat / concat.sum(dim=1, keepdim=True), inputs.label_maps)


@register("thirdQ", equal_classes="the third quartile of fewer than 5 logits lies between the top logit and the "
                                   "next, so a 2-class expert's gap is a quarter of a 5-class one's; use "
                                   "thirdQ_original (max - min) or max_softmax")
def third_quartile(inputs: MergeInputs) -> Decision:
    """Trust the expert with the larger gap between its top logit and its logits' third quartile."""
    return choose_by_score(inputs, lambda o: o.max(dim=1).values - torch.quantile(o, 0.75, dim=1))


@register("thirdQ_original")
def third_quartile_original(inputs: MergeInputs) -> Decision:
    """What the original thirdQ computed (a percent/fraction mix-up): the gap max - min."""
    return choose_by_score(inputs, lambda o: o.max(dim=1).values - o.min(dim=1).values)


# ---------------------------------------------------------------- out-of-distribution scores

SCORES: dict[str, Callable[[Tensor], Tensor]] = {  # per sample, higher = more confident
    "max_softmax": lambda o: o.softmax(dim=1).max(dim=1).values,
    "energy": lambda o: o.logsumexp(dim=1),  # minus the free energy
    "neg_entropy": lambda o: (o.softmax(dim=1) * o.log_softmax(dim=1)).sum(dim=1),
    "max_logit": lambda o: o.max(dim=1).values,
}
Score = Literal[tuple(SCORES)]  # type: ignore[valid-type]


@register("neg_entropy")
def neg_entropy(inputs: MergeInputs) -> Decision:
    """Trust the expert whose softmax has the lowest entropy."""
    return choose_by_score(inputs, SCORES["neg_entropy"], name="neg_entropy")


# ---------------------------------------------------------------- detectors (routing as OOD detection per expert)

DETECTOR_CODE = BASE_CODE + ("detectors.py", "detector_stats.py", "sources.py") + SYNTHESIS_CODE
SHIPPED_KEYS = {"input_mean", "input_var", "bn_mean", "bn_var"}  # what detectors.shipped_statistics can give
RULE_HIDDEN = ("batch_size",)  # detector settings that change how, not what, it computes: not rule parameters
Standardisation = Literal["", "zscore", "rank"]


def register_detector(name: str) -> None:
    """Detector ``name`` (detectors.DETECTORS) as a routing rule: trust, per sample, the expert whose score
    stands highest. ``stats`` names the statistics source (sources.py; "" for none: the raw scores, only for
    detectors that need no statistics); scores from a source are standardised on the expert's own held-out
    part of it (``standardise``: zscore, the default, or rank) so that experts compare; a shipped source's
    stay raw. Mahalanobis-type detectors take the covariance ``shrinkage`` as a parameter (its sweep is a
    set of rules, picked on the selection half like any other). max_softmax, energy and max_logit without
    ``stats`` are the OOD scores they always were."""
    spec = DETECTORS[name]
    params: dict[str, tuple[Any, Any]] = {k: v for k, v in spec.params.items() if k not in RULE_HIDDEN}
    if "precision" in spec.statistics:
        params["shrinkage"] = (float, 1e-6)
    params |= {"stats": (str, ""), "standardise": (Standardisation, "")}

    def route(inputs: MergeInputs, **given: Any) -> Decision:
        stats, method = given.pop("stats", ""), given.pop("standardise", "") or "zscore"
        if not stats and not spec.statistics and name in SCORES:  # the raw OOD score, from the logits alone
            return choose_by_score(inputs, SCORES[name], name=name)
        scores = inputs.detector(name, stats, method, given).comparable
        if stats:  # standardised on each expert's own source: comparable whatever the class counts
            return choose(inputs, scores.argmax(dim=1))
        return choose_by_columns(inputs, scores, name, given)

    def validate(given: dict[str, Any]) -> None:
        stats = given.get("stats", "")
        source = parse_source(stats, f"strategy {name}: stats") if stats else None
        if source is None and spec.statistics:
            raise ConfigError(f"strategy {name!r} reads statistics of in-distribution inputs: give stats=SOURCE "
                              f"(synthetic:NAME, shipped or real:N)")
        if source is None and given.get("standardise"):
            raise ConfigError(f"strategy {name!r}: standardise needs stats=SOURCE to standardise on")
        if source is not None and source.kind == "shipped" and not (spec.statistics and set(spec.statistics)
                                                                    <= SHIPPED_KEYS):
            raise ConfigError(f"strategy {name!r}: stats=shipped holds only the experts' input and batch-norm "
                              f"Gaussians (detectors input_gaussian, bn_gaussian) and no images to standardise "
                              f"scores on; use a synthetic or real source, or no stats for the raw score")

    REGISTRY[name] = Strategy(name, route, params, spec.summary, code=DETECTOR_CODE, detector=name,
                              validate=validate)


for _name in DETECTORS:
    register_detector(_name)


# ---------------------------------------------------------------- data-free calibration of the scores

@register("calibrated", code=BASE_CODE + SYNTHESIS_CODE)
def calibrated(inputs: MergeInputs, *, score: Score = "energy", reference: Literal["own", "others", "mid"] = "own",
               synthesizer: str = "") -> Decision:
    """Trust the expert whose score stands highest against its distributions on synthetic images, so experts
    whose scores live on different scales become comparable: the score minus its mean, over its std, on the
    expert's own synthetic images (``reference=own``), on the other experts' synthetic images, its data-free
    stand-in for inputs that are not its own (``others``), or halfway between the two, over their mean std
    (``mid``: the boundary a one-dimensional linear discriminant would draw). Reads no real image."""
    on_sets, fn = inputs.synthetic(synthesizer), SCORES[score]
    columns = []
    for k, logits in enumerate(inputs.logits):
        own = fn(on_sets[k][k])
        others = torch.cat([fn(on_sets[k][j]) for j in range(len(inputs.logits)) if j != k])
        if reference == "mid":
            centre, scale = (own.mean() + others.mean()) / 2, (own.std() + others.std()) / 2
        else:
            chosen = own if reference == "own" else others
            centre, scale = chosen.mean(), chosen.std()
        columns.append((fn(logits) - centre) / scale.clamp(min=1e-6))
    return choose(inputs, torch.stack(columns, dim=1).argmax(dim=1))


# ---------------------------------------------------------------- bound

@register("oracle")
def oracle(inputs: MergeInputs) -> Decision:
    """The true domain picks the expert: the upper bound of every routing rule."""
    if inputs.domain is None:
        raise RuntimeError("the oracle needs the true domain of each sample")
    return choose(inputs, inputs.domain)


# ---------------------------------------------------------------- multi-pass test-time augmentation

Setting = Literal[tuple(TTA_SETTINGS)]  # type: ignore[valid-type]


@register("tta_mean", code=TTA_CODE)
def tta_mean(inputs: MergeInputs, *, setting: Setting = "gaussian_1") -> Decision:
    """Average the concatenated logits over the original and augmented passes, then argmax."""
    passes = inputs.passes(setting)
    mean = torch.stack([torch.cat(p, dim=1) for p in passes]).mean(dim=0)
    return concat_argmax(mean, inputs.label_maps)


@register("tta_voting", code=TTA_CODE)
def tta_voting(inputs: MergeInputs, *, setting: Setting = "gaussian_1") -> Decision:
    """Majority vote of each pass's naive prediction; a tie goes to the tied class voted first
    (the original pass votes first), so the result is deterministic."""
    decisions = [concat_argmax(torch.cat(p, dim=1), inputs.label_maps) for p in inputs.passes(setting)]
    votes = torch.stack([d.pred for d in decisions], dim=1)  # [N, P]
    experts = torch.stack([d.expert for d in decisions], dim=1)
    num_classes = int(torch.cat(list(inputs.label_maps)).max()) + 1
    counts = torch.zeros(len(votes), num_classes, dtype=torch.long).scatter_add_(
        1, votes, torch.ones_like(votes))
    is_top = counts.gather(1, votes) == counts.max(dim=1, keepdim=True).values
    first = is_top.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    return Decision(votes.gather(1, first).squeeze(1), experts.gather(1, first).squeeze(1))


# ---------------------------------------------------------------- gating networks

GateType = Literal[GATE_TYPES]  # type: ignore[valid-type]
Regime = str  # real, synthetic, noise, or real:N (gating.check_regime)


def check_gate_params(params: dict[str, Any]) -> None:
    check_regime(params["regime"], "a gate rule")
    if params.get("stats"):
        if params.get("gate") != "detectors":
            raise ConfigError(f"a gate rule: stats={params['stats']} names the detector gate's statistics source; "
                              f"it applies to gate=detectors only")
        parse_source(params["stats"], "a gate rule: stats")


def with_gate_statistics(calls: list[StrategyCall], source: str) -> list[StrategyCall]:
    """The calls with every detector gate's statistics source (``gate.detector_stats``, what its gates were
    trained and are evaluated on) written into its parameters, so that the rule's label, and with it its
    family, names the source: a gate standardised on real images is never labelled data-free (issue 27). A
    call that names another source than the config's fails in one line naming the setting to change."""
    filled = []
    for call in calls:
        if call.name in REGISTRY and REGISTRY[call.name].validate is check_gate_params \
                and call.param("gate") == "detectors":
            given = call.params.get("stats", "")
            if given and parse_source(given).label != parse_source(source).label:
                raise ConfigError(f"strategy {call.label}: its gates are standardised on gate.detector_stats="
                                  f"{source}; pass gate.detector_stats={given} (to train_pan.py too) to read "
                                  f"gates of that source")
            call = StrategyCall(call.name, {**call.params, "stats": parse_source(source).label})
        filled.append(call)
    return filled


@register("gate_hard", code=GATE_CODE, validate=check_gate_params)
def gate_hard(inputs: MergeInputs, *, gate: GateType = "feature", regime: Regime = "synthetic",
              gates_from: str = "", synthesizer: str = "", stats: str = "") -> Decision:
    """The paper's rule: if exactly one gate says yes (p > 0.5), trust its expert; otherwise naive.
    ``gates_from`` names the problem whose gates to use (empty: the problem evaluated); ``synthesizer`` the
    synthetic sets the data-free gates were trained on (empty: dafl); ``stats`` the detector gate's statistics
    source, filled from ``gate.detector_stats`` (with_gate_statistics) so that its label says what it read."""
    says_yes = inputs.gates(gate, regime, gates_from, synthesizer) > 0.5
    single = (says_yes.sum(dim=1) == 1).cpu()
    routed = choose(inputs, says_yes.int().argmax(dim=1))
    fallback = naive(inputs)
    return Decision(torch.where(single, routed.pred, fallback.pred),
                    torch.where(single, routed.expert, fallback.expert), fallback=~single)


@register("gate_confident", code=GATE_CODE, validate=check_gate_params)
def gate_confident(inputs: MergeInputs, *, gate: GateType = "feature", regime: Regime = "synthetic",
                   gates_from: str = "", synthesizer: str = "", stats: str = "") -> Decision:
    """Trust the expert whose gate is most confident that the sample is its own."""
    return choose(inputs, inputs.gates(gate, regime, gates_from, synthesizer).argmax(dim=1))


@register("gate_soft", code=GATE_CODE, validate=check_gate_params)
def gate_soft(inputs: MergeInputs, *, gate: GateType = "feature", regime: Regime = "synthetic",
              gates_from: str = "", synthesizer: str = "", stats: str = "") -> Decision:
    """Mixture: each expert's softmax weighted by its gate's probability, argmax over all classes."""
    weights = inputs.gates(gate, regime, gates_from, synthesizer)
    mixture = torch.cat([weights[:, k:k + 1] * o.softmax(dim=1) for k, o in enumerate(inputs.logits)], dim=1)
    return concat_argmax(mixture, inputs.label_maps)


# ---------------------------------------------------------------- routing fitted on the unlabeled inputs

UNLABELED_CODE = BASE_CODE + ("detectors.py", "unlabeled.py", "gating.py")
# the starting rules: training-free, data-free rules with a per-expert score (naive is the argmax of the max logits)
StartRule = Literal["naive", "energy", "max_softmax", "neg_entropy"]
# what the router reads of every expert (the paper's gate inputs); the detector gate's scores need statistics
UnlabeledGate = Literal["feature", "logits", "agnostic_logits", "agnostic_feature"]
FitInputs = str  # selection or stream:N (unlabeled.check_fit_inputs)


def check_unlabeled_params(params: dict[str, Any]) -> None:
    check_fit_inputs(params["inputs"], "a rule fitted on unlabeled inputs")
    checks = {"confident": lambda v: 0 < v <= 1, "rounds": lambda v: v >= 0, "clusters": lambda v: v >= 2,
              "diversity": lambda v: v >= 0, "shrinkage": lambda v: v > 0}
    ranges = {"confident": "a fraction in (0, 1], e.g. 0.5", "rounds": "0 or more", "clusters": "2 or more",
              "diversity": "0 or more, e.g. 1.0", "shrinkage": "greater than 0, e.g. 1.0"}
    for key, ok in checks.items():
        if key in params and not ok(params[key]):
            raise ConfigError(f"a rule fitted on unlabeled inputs: {key}={params[key]!r} must be {ranges[key]}")


def start_scores(inputs: MergeInputs, start: str) -> Tensor:
    """``[N, experts]`` on the CPU: the starting rule's score of every expert (its route is the argmax)."""
    score = SCORES["max_logit" if start == "naive" else start]
    return torch.stack([score(o.float().cpu()) for o in inputs.logits], dim=1)


def fit_indices(inputs: MergeInputs, fit: str) -> Tensor:
    """The indices of the inputs a rule fitted on unlabeled inputs may fit on (``fit``: selection or stream:N)."""
    if inputs.select is None:
        raise RuntimeError("a rule fitted on unlabeled inputs needs the selection half (MergeInputs.select)")
    return fit_rows(fit, inputs.select, inputs.seed)


def fit_view(inputs: MergeInputs, gate: str, fit: str) -> tuple[Tensor, Tensor]:
    """The experts' activations of type ``gate`` standardised on the fit inputs, and those inputs' indices."""
    rows = fit_indices(inputs, fit)
    return standardise(activation_matrix(gate, inputs.logits, inputs.features), rows), rows


def routed(inputs: MergeInputs, routing: Any, fit: str, rows: Tensor) -> Decision:
    decision = choose(inputs, routing.expert)
    decision.scores, decision.pseudo = routing.scores, (routing.pseudo_rows, routing.pseudo_experts)
    decision.row = {"fit_inputs": len(rows), "fit": "transductive" if fit == SELECTION else "stream"}
    return decision


@register("self_train", code=UNLABELED_CODE, validate=check_unlabeled_params)
def self_train_rule(data: MergeInputs, *, inputs: FitInputs = SELECTION, gate: UnlabeledGate = "feature",
                    start: StartRule = "naive", confident: float = 0.5, rounds: int = 3) -> Decision:
    """Self-training: a linear gate over the experts' activations trained on the unlabeled fit inputs the starting
    rule routes most confidently (the ``confident`` fraction of each expert's routes), re-labelled by itself
    ``rounds`` times. Reads no label and no training image."""
    x, rows = fit_view(data, gate, inputs)
    return routed(data, self_train(x, start_scores(data, start), rows, confident, rounds), inputs, rows)


@register("cluster_assign", code=UNLABELED_CODE, validate=check_unlabeled_params)
def cluster_assign_rule(data: MergeInputs, *, inputs: FitInputs = SELECTION, gate: UnlabeledGate = "feature",
                        score: StartRule = "naive", clusters: int = 20) -> Decision:
    """Cluster-then-assign: k-means on the experts' activations over the unlabeled fit inputs, each cluster to the
    expert with the highest mean score on it, each score z-scored over the fit inputs per expert (its ownership).
    Reads no label and no training image."""
    x, rows = fit_view(data, gate, inputs)
    ownership = standardise(start_scores(data, score), rows)
    return routed(data, cluster_assign(x, ownership, rows, clusters, data.seed), inputs, rows)


@register("entropy_gate", code=UNLABELED_CODE, validate=check_unlabeled_params)
def entropy_gate_rule(data: MergeInputs, *, inputs: FitInputs = SELECTION, gate: UnlabeledGate = "agnostic_logits",
                      start: StartRule = "energy", diversity: float = 1.0) -> Decision:
    """Test-time adaptation of a gate (TENT's entropy minimisation with SHOT's diversity term): from the starting
    rule's z-scored scores, lower the entropy of the mixture's predictions on the unlabeled fit inputs while the
    mean gate stays spread over the experts (weight ``diversity``). Reads no label and no training image."""
    x, rows = fit_view(data, gate, inputs)
    probs = [o.float().cpu().softmax(dim=1) for o in data.logits]
    return routed(data, entropy_gate(x, standardise(start_scores(data, start), rows), probs, rows, diversity),
                  inputs, rows)


@register("pseudo_mahalanobis", code=UNLABELED_CODE, validate=check_unlabeled_params)
def pseudo_mahalanobis_rule(data: MergeInputs, *, inputs: FitInputs = SELECTION, start: StartRule = "naive",
                            confident: float = 1.0, rounds: int = 1, shrinkage: float = 1.0) -> Decision:
    """A Mahalanobis detector whose statistics are the unlabeled inputs': each expert's class Gaussians (over its
    penultimate features, classes by its own predictions, one covariance with ``shrinkage`` x its mean variance on
    the diagonal) fitted on the ``confident`` fraction of the fit inputs the starting rule routes to it, each input
    routed by its relative Mahalanobis score against all the fit inputs' Gaussian, z-scored per expert; ``rounds``
    refits on the rule's own routes. Reads no label and no training image."""
    if data.features is None:
        raise RuntimeError("pseudo_mahalanobis reads the experts' feature vectors, and this evaluation has none")
    rows = fit_indices(data, inputs)
    features = [f.float().cpu() for f in data.features]
    predictions = [o.argmax(dim=1).cpu() for o in data.logits]
    start_z = standardise(start_scores(data, start), rows)
    return routed(data, pseudo_mahalanobis(features, predictions, start_z, rows, confident, rounds, shrinkage),
                  inputs, rows)


# ---------------------------------------------------------------- weight-space fusion (one network, no routing)

Importance = Literal["uniform", "conductance"]
# "" keeps the batch-norm statistics the fusion moved with the channels; "reset" resets the running statistics to
# the fusion samples' afterwards (not REPAIR, which is ``repair=true``: it sets every channel's output statistics
# to its parents')
NormStats = Literal["", "reset"]


def fusion_inputs(inputs: MergeInputs, rule: str) -> FusionInputs:
    if inputs.fusion is None:
        raise RuntimeError(f"{rule} combines experts that share one label space: it needs a problem with "
                           f"shared_labels: true (fusion parents)")
    return inputs.fusion


def network_decision(fusion: FusionInputs, make: Callable[[], Callable[[Tensor], Tensor]], samples_used: int,
                     **row: Any) -> Decision:
    """Build a network with ``make()`` (timed as ``fuse_time_s``, apart from its evaluation) and let it
    answer every test sample. ``samples_used``: how many fusion samples (real training images) it read."""
    start = time.perf_counter()
    network = make()
    if torch.cuda.is_available():  # fine-tuning may have queued GPU work
        torch.cuda.synchronize()
    fuse_time = time.perf_counter() - start
    pred = fusion.predict(network)
    return Decision(pred, torch.full_like(pred, NO_EXPERT),
                    row={"fusion_samples": samples_used, "fuse_time_s": fuse_time, **row})


def importance_scores(parents: list[nn.Module], samples: Tensor, importance: str) -> list[list[Tensor]] | None:
    """Per parent and level, each neuron's importance: None (uniform) or its conductance on ``samples``."""
    if importance == "uniform":
        return None
    return [conductance_importance(p, samples) for p in parents]


def with_norm_stats(fusion: FusionInputs, network: nn.Module, norm_stats: str) -> nn.Module:
    """``network``, its batch-norm running statistics reset to the fusion samples' if ``norm_stats`` says so."""
    return reset_norm_statistics(network, fusion.samples) if norm_stats == "reset" else network


def averaged(fusion: FusionInputs, method: str, repair: bool, row: dict[str, Any], **options: Any) -> nn.Module:
    """The parents aligned by ``method`` and averaged, with REPAIR if ``repair`` (its per-layer std ratios before
    and after go into ``row``)."""
    alignment = align(method, fusion.parents, fusion.samples, **options)
    if not repair:
        return alignment.network()
    network, ratios = repaired(alignment, fusion.samples)
    row.update(ratios)
    return network


def check_repair_params(params: dict[str, Any]) -> None:
    if params.get("repair") and params.get("norm_stats"):
        raise ConfigError("repair=true and norm_stats=reset both set the fused network's statistics from the fusion "
                          "samples; choose one")


@register("vanilla_avg", fusion=FusionNeeds(), validate=check_repair_params)
def vanilla_avg_rule(inputs: MergeInputs, *, norm_stats: NormStats = "", repair: bool = False) -> Decision:
    """Fuse the parents into their parameter-wise mean (identical widths, neurons not aligned).

    ``norm_stats=reset``: batch-norm running statistics reset to the fusion samples' (ResNets with batch norm).
    ``repair=true``: REPAIR (Jordan et al. 2023) on the fusion samples (fusion/repair.py)."""
    fusion = fusion_inputs(inputs, "vanilla_avg")
    row: dict[str, Any] = {}
    decision = network_decision(
        fusion, lambda: with_norm_stats(fusion, averaged(fusion, "vanilla_avg", repair, row), norm_stats),
        samples_used=len(fusion.samples) if norm_stats or repair else 0)
    decision.row.update(row)
    return decision


@register("otfusion", fusion=FusionNeeds(pot=True), validate=check_repair_params)
def otfusion_rule(inputs: MergeInputs, *, cost: Literal["weight", "activation"] = "weight",
                  norm_stats: NormStats = "", repair: bool = False, target: int | None = None) -> Decision:
    """OTFusion: align the parents' neurons to the first parent's by exact optimal transport, then average.

    ``target=k``: align to parent k instead, whose widths the fused network takes (parents of different widths:
    the smaller one's shape compresses). ``norm_stats=reset``: batch-norm running statistics reset to the fusion
    samples' (ResNets with batch norm). ``repair=true``: REPAIR (Jordan et al. 2023) on the fusion samples
    (fusion/repair.py)."""
    fusion = fusion_inputs(inputs, "otfusion")
    row: dict[str, Any] = {}
    anchor = 0 if target is None else target

    def make() -> nn.Module:
        return with_norm_stats(fusion, averaged(fusion, "otfusion", repair, row, cost=cost, anchor=anchor), norm_stats)

    decision = network_decision(
        fusion, make,
        samples_used=len(fusion.samples) if cost == "activation" or norm_stats or repair else 0)
    decision.row.update(row)
    return decision


def check_rebasin_params(params: dict[str, Any]) -> None:
    if params["iterations"] < 1:
        raise ConfigError(f"rebasin: iterations (sweeps of weight matching over the levels) must be 1 or more, got "
                          f"{params['iterations']}")


@register("rebasin", fusion=FusionNeeds(), validate=check_rebasin_params)
def rebasin_rule(inputs: MergeInputs, *, iterations: int = 100, repair: bool = False) -> Decision:
    """Git Re-Basin weight matching: permute every parent's neurons onto the first's, then average (data-free).

    Coordinate descent over the levels (ResNets: the channel spaces, a block's output with its skip), each a linear
    assignment maximising the weight inner products (fusion/weight_matching.py, fusion/residual_weight_matching.py),
    for at most ``iterations`` sweeps (it stops when a sweep changes nothing); parents of one architecture (MLPs,
    VGGs, LeNet5s, ResNets of one depth and widths). ``repair=true``: REPAIR (Jordan et al. 2023) on the fusion
    samples."""
    fusion = fusion_inputs(inputs, "rebasin")
    row: dict[str, Any] = {}
    decision = network_decision(
        fusion, lambda: averaged(fusion, "rebasin", repair, row, iterations=iterations, seed=fusion.seed),
        samples_used=len(fusion.samples) if repair else 0)
    decision.row.update(row)
    return decision


@register("hf", fusion=FusionNeeds(parents=2))
def hf_rule(inputs: MergeInputs, *, ridge: float = 0.0) -> Decision:
    """Neuron-interpolation fusion HF: Hungarian matching of two parents' neurons, each level fitted to the pairs.

    ``ridge > 0``: every level fitted by ridge regression (fusion/interpolation.py), not plain least squares."""
    fusion = fusion_inputs(inputs, "hf")
    return network_decision(fusion, lambda: hungarian_fusion(fusion.parents, fusion.samples, ridge=ridge),
                            samples_used=len(fusion.samples))


@register("kf_linear", fusion=FusionNeeds())
def kf_linear_rule(inputs: MergeInputs, *, importance: Importance = "uniform", ridge: float = 0.0) -> Decision:
    """Neuron-interpolation fusion KF-linear: k-means groups of all parents' neurons, levels fitted by least squares."""
    fusion = fusion_inputs(inputs, "kf_linear")
    return network_decision(fusion, lambda: kf_linear(
        fusion.parents, fusion.samples, importance_scores(fusion.parents, fusion.samples, importance),
        seed=fusion.seed, ridge=ridge), samples_used=len(fusion.samples))


# "" (linear_init): KF-linear's fit refined by Adam keeping the best iterate, KF-linear's function on chains;
# "authors": the neuron-interpolation authors' variant (fusion/gradient.py)
GradientVariant = Literal["", "authors"]


def check_kf_gradient_params(params: dict[str, Any]) -> None:
    perturb = params.get("perturb")
    if perturb is not None and params.get("variant") != "authors":
        raise ConfigError("kf_gradient: perturb is a setting of variant=authors; add variant=authors or drop perturb")
    if perturb is not None and not perturb >= 0:
        raise ConfigError(f"kf_gradient: perturb (the noise's std over each start tensor's) must be 0 or more, got "
                          f"{perturb}")


@register("kf_gradient", fusion=FusionNeeds(), validate=check_kf_gradient_params)
def kf_gradient_rule(inputs: MergeInputs, *, importance: Importance = "uniform", ridge: float = 0.0,
                     variant: GradientVariant = "", perturb: float | None = None) -> Decision:
    """Neuron-interpolation fusion KF-gradient: KF-linear's groups, each level then refined by Adam.

    ``variant=""`` (linear_init): from the least-squares fit, keeping the best iterate (on chains KF-linear's
    function). ``variant=authors``: as the neuron-interpolation authors describe it (fusion/gradient.py): each level
    by its own Adam at its own learning rate from the fit, perturbed by Gaussian noise of ``perturb`` x each tensor's
    std if set, to the last iterate, and the output level by distillation towards the parents' mean output (chains
    only)."""
    fusion = fusion_inputs(inputs, "kf_gradient")
    authors = AuthorsGradient(perturb=perturb or 0.0, seed=fusion.seed) if variant == "authors" else None
    return network_decision(fusion, lambda: kf_gradient(
        fusion.parents, fusion.samples, importance_scores(fusion.parents, fusion.samples, importance),
        seed=fusion.seed, ridge=ridge, authors=authors), samples_used=len(fusion.samples))


@register("clafusion", fusion=FusionNeeds(parents=2, pot=True), validate=check_repair_params)
def clafusion_rule(inputs: MergeInputs, *, finetune_epochs: int = 0, norm_stats: NormStats = "",
                   repair: bool = False, target: int | None = None) -> Decision:
    """CLAFusion: align the hidden layers (ResNets: blocks) of two parents of any depths, then OTFusion; optionally
    fine-tune.

    The fused network has the deeper parent's depth and, by default, its widths; ``target=k``: parent k's widths.

    Fine-tuning trains the fused network for ``finetune_epochs`` epochs on the union of the parents'
    training sets (real data; the row records how many images). ``norm_stats=reset``: batch-norm running
    statistics reset to the fusion samples' first; ``repair=true``: REPAIR on the fusion samples first."""
    if finetune_epochs < 0:
        raise ValueError(f"clafusion: finetune_epochs must be 0 or more, got {finetune_epochs}")
    fusion = fusion_inputs(inputs, "clafusion")
    row: dict[str, Any] = {}

    def make() -> nn.Module:
        fused = with_norm_stats(fusion, averaged(fusion, "clafusion", repair, row, target=target), norm_stats)
        return finetune(fused, *fusion.training_data(), epochs=finetune_epochs, seed=fusion.seed) \
            if finetune_epochs else fused

    # the training data is loaded here, before make() runs, so loading it is not counted as fusing
    decision = network_decision(fusion, make, samples_used=len(fusion.samples), finetune_epochs=finetune_epochs,
                                finetune_images=len(fusion.training_data()[0]) if finetune_epochs else 0)
    decision.row.update(row)
    return decision


# where distil's student starts: the teacher fused into the student's shape, or the two controls, the student's own
# weights and a fresh initialisation of its architecture
KdInit = Literal["fused", "student", "scratch"]


def check_distil_params(params: dict[str, Any]) -> None:
    if params["kd_epochs"] < 0:
        raise ConfigError(f"distil: kd_epochs must be 0 or more, got {params['kd_epochs']}")
    if not 0 <= params["kd_alpha"] <= 1:
        raise ConfigError(f"distil: kd_alpha weighs the teacher's soft targets against the labels and must lie in "
                          f"[0, 1], got {params['kd_alpha']}")
    if not params["kd_temperature"] > 0:
        raise ConfigError(f"distil: kd_temperature must be above 0, got {params['kd_temperature']}")
    if params["repair"] and params["init"] != "fused":
        raise ConfigError(f"distil: repair=true repairs the fused start, and init={params['init']} fuses nothing; "
                          "drop repair or use init=fused")


def student_start(fusion: FusionInputs, student: int, init: str, repair: bool, row: dict[str, Any]) -> nn.Module:
    """The network distil trains: the teacher fused by CLAFusion into parent ``student``'s widths (``fused``; with
    REPAIR if ``repair``), the student itself (``student``) or a fresh initialisation of it (``scratch``)."""
    own = fusion.parents[student]
    if init == "student":
        return own
    if init == "scratch":
        return reinitialised(own, fusion.seed)
    fused = averaged(fusion, "clafusion", repair, row, target=student)
    shapes = [list(p.shape) for p in fused.parameters()]
    if shapes != [list(p.shape) for p in own.parameters()]:  # CLAFusion keeps the deeper parent's depth
        raise ValueError(f"distil: the teacher fused into parent {student}'s widths is not parent {student}'s shape "
                         f"(CLAFusion keeps the deeper parent's depth): the student must be as deep as the teacher")
    return fused


@register("distil", fusion=FusionNeeds(parents=2, pot=True), validate=check_distil_params)
def distil_rule(inputs: MergeInputs, *, student: int = 1, init: KdInit = "fused", kd_epochs: int = 1,
                kd_alpha: float = 0.9, kd_temperature: float = 4.0, repair: bool = False) -> Decision:
    """Teacher-student (CLAFusion's compression use): distil the other parent (the teacher) into parent ``student``.

    ``init=fused`` starts from the teacher fused into the student's shape (CLAFusion with ``target=student``,
    activation costs on the fusion samples); the controls ``init=student`` (the student's own weights) and
    ``init=scratch`` (a fresh initialisation of its architecture) get the same distillation. Each trains for
    ``kd_epochs`` epochs of SGD (fine-tuning's: lr 0.01, momentum 0.9, batch 64, one batch order for every start) on
    the union of the parents' training sets with loss kd_alpha * T^2 * KL(softmax(teacher / T) || softmax(student /
    T)) + (1 - kd_alpha) * cross-entropy, T = ``kd_temperature``. ``repair=true``: the fused start after REPAIR on
    the fusion samples (Jordan et al. 2023). The row records the epochs and the training images seen (``kd_epochs``,
    ``kd_images``), and the teacher's index."""
    fusion = fusion_inputs(inputs, "distil")
    if len(fusion.parents) != 2:
        raise ValueError(f"distil fuses exactly 2 parents (a teacher and a student), got {len(fusion.parents)}")
    if not 0 <= student < len(fusion.parents):
        raise ValueError(f"distil: student={student} is not a parent (0..{len(fusion.parents) - 1})")
    teacher = fusion.parents[1 - student]
    images, labels = fusion.training_data()  # loaded here, before make() runs, so loading is not counted as fusing
    row: dict[str, Any] = {}

    def make() -> nn.Module:
        start = student_start(fusion, student, init, repair, row)
        result = distil(start, teacher, images, labels, kd_epochs, kd_alpha, kd_temperature, seed=fusion.seed)
        row["kd_images"] = result.images_seen
        return result.network

    decision = network_decision(fusion, make, samples_used=len(fusion.samples) if init == "fused" else 0,
                                kd_epochs=kd_epochs, teacher=1 - student)
    decision.row.update(row)
    return decision


@register("parent", fusion=FusionNeeds(weights=False))
def parent_rule(inputs: MergeInputs, *, index: int = 0, finetune_epochs: int = 0) -> Decision:
    """One parent alone, answering every test sample: what fusion has to improve on (any architecture).

    ``finetune_epochs > 0``: the parent after the same fine-tuning clafusion's fused network gets, the
    control that tells what fine-tuning adds on its own."""
    if finetune_epochs < 0:
        raise ValueError(f"parent: finetune_epochs must be 0 or more, got {finetune_epochs}")
    fusion = fusion_inputs(inputs, "parent")
    if not 0 <= index < len(fusion.parents):
        raise ValueError(f"parent: index={index} is not a parent of this problem (0..{len(fusion.parents) - 1})")
    if not finetune_epochs:
        return network_decision(fusion, lambda: fusion.parents[index], samples_used=0)
    return network_decision(
        fusion, lambda: finetune(fusion.parents[index], *fusion.training_data(), epochs=finetune_epochs,
                                 seed=fusion.seed),
        samples_used=0, finetune_epochs=finetune_epochs, finetune_images=len(fusion.training_data()[0]))


@register("ensemble", fusion=FusionNeeds(weights=False))
def ensemble_rule(inputs: MergeInputs) -> Decision:
    """Output-space baseline: the mean of the parents' softmax outputs (any architecture)."""
    fusion = fusion_inputs(inputs, "ensemble")
    return network_decision(fusion, lambda: lambda x: ensemble_softmax(fusion.parents, x), samples_used=0)


@register("ensemble_weighted", fusion=FusionNeeds(weights=False))
def ensemble_weighted_rule(inputs: MergeInputs) -> Decision:
    """The parents' softmax outputs, each class weighted by the parent's share of that class's training data."""
    fusion = fusion_inputs(inputs, "ensemble_weighted")
    weights = class_share_weights(fusion.class_counts)
    return network_decision(fusion, lambda: lambda x: ensemble_softmax(fusion.parents, x, weights), samples_used=0)
