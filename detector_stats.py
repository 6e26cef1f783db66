"""Detectors on a problem's experts: statistics fitted once per expert, seed and source (sources.py) and stored as
keyed artifacts, and every detector's scores on a set of inputs made comparable across experts
(docs/design.md section 4, "Detectors").

For a source other than ``shipped``, the expert sees the source's images once (detectors.observe); a seeded
``statistics.holdout`` share of them is held out, the statistics are fitted on the rest, and the held-out view is
stored beside them: a detector's scores on it are the expert's own score distribution, which standardises its
scores on any input (detectors.calibrate / standardise), so an argmax over experts compares like with like. A
shipped source has no images, so its scores stay raw (detectors.shipped_statistics says why they are on one
scale as far as their assumptions hold). A synthetic source reads stored synthetic sets and a shipped one
nothing: neither reads a real training image; ``real:N`` reads the first N of the expert's task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

import config
from artifacts import ExpertId, Layout, check_reuse, digest_of, made_meanwhile
from common import atomic_torch_save, derive_seed, fast_memory_format, make_generator, state_digest
from data import InputFormat, load_task, prepare_input, to_unit
from detectors import (DETECTORS, ExpertView, Statistics, calibrate, final_linear, fit_statistics, observe, score,
                       shipped_statistics, standardise, with_shrinkage)
from sources import Source
from synthesis import components, load_set

CHUNK = 1024  # images prepared and run at once: a whole CIFAR-10 training set in float would take 600 MB


@dataclass
class StoredStatistics:
    """One expert's statistics from one source, and its view of the source's held-out part (None: shipped)."""

    statistics: Statistics
    calibration: dict[str, torch.Tensor | None] | None  # ExpertView fields of the held-out part, without the head
    held_out: torch.Tensor | None  # the held-out part's images (uint8): ODIN runs the expert on them again
    reused: bool = False

    def calibration_view(self, model: nn.Module, device: torch.device) -> ExpertView | None:
        if self.calibration is None:
            return None
        head = final_head(model)
        return ExpertView(**{k: None if v is None else v.to(device) for k, v in self.calibration.items()}, **head)


def final_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert's output layer as ExpertView holds it (weight, bias; zeros when it has none)."""
    head = final_linear(model)
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if head.bias is not None else torch.zeros(len(weight), device=weight.device)
    return {"weight": weight, "bias": bias}


def prepared_batches(images: torch.Tensor, fmt: InputFormat, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 images (any channels) in the expert's input format, a chunk at a time."""
    return (prepare_input(to_unit(images[i:i + CHUNK], device), fmt) for i in range(0, len(images), CHUNK))


def source_images(layout: Layout, source: Source, expert: ExpertId, task: config.TaskSpec, seed: int,
                  data_dir: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images of ``source`` for one expert (uint8) and their labels in its own label space (None for
    synthetic images, which have none: the statistics then use the expert's own predictions)."""
    if source.kind == "synthetic":
        sets = [load_set(layout.synthetic_path(part, expert, seed))[0] for part in components(source.synthesizer)]
        return torch.cat(sets), None
    real = load_task(task, "train", data_dir, source.images)
    return real.images, real.labels


def stats_upstream(layout: Layout, source: Source, expert: ExpertId, seed: int) -> dict[str, str]:
    digests = {"expert": layout.expert_digest(expert, seed)}
    if source.kind == "synthetic":
        digests.update({f"set:{part}": digest_of(layout.synthetic_path(part, expert, seed))
                        for part in components(source.synthesizer)})
    return digests


def fitted(model: nn.Module, fmt: InputFormat, images: torch.Tensor, labels: torch.Tensor | None,
           settings: config.StatisticsSettings, seed: int, device: torch.device) -> StoredStatistics:
    """Statistics fitted on a seeded share of ``images``, the expert's view of the rest for calibration."""
    if len(images) < 4:
        raise config.ConfigError(f"a statistics source needs at least 4 images (to fit on and to calibrate on), "
                                 f"got {len(images)}")
    view = observe(model, prepared_batches(images, fmt, device))
    order = torch.randperm(len(images), generator=make_generator(seed))
    cut = len(images) - max(1, round(settings.holdout * len(images)))
    fit, held = order[:cut], order[cut:]
    statistics = fit_statistics(view.subset(fit), None if labels is None else labels[fit],
                                knn_bank=settings.knn_bank, vim_dim=settings.vim_dim,
                                react_percentile=settings.react_percentile, seed=seed)
    calibration = view.subset(held)
    fields = ("logits", "features", "input_moments", "bn_moments")
    return StoredStatistics(statistics, {k: None if getattr(calibration, k) is None else getattr(calibration, k).cpu()
                                         for k in fields}, images[held.to(images.device)].cpu())


def stored_statistics(layout: Layout, source: Source, expert: ExpertId, task: config.TaskSpec, seed: int,
                      model: nn.Module, fmt: InputFormat, data_dir: str, device: torch.device,
                      force: bool = False) -> StoredStatistics:
    """The statistics of ``source`` for one expert and seed: stored ones when their recipe and upstream digests
    match (artifacts.check_reuse), else fitted now and stored atomically."""
    path = layout.stats_path(source, expert, seed)
    recipe, upstream = layout.stats_recipe(source, expert), stats_upstream(layout, source, expert, seed)
    reuse = check_reuse(path, recipe, upstream, force)
    if reuse.reused:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return StoredStatistics(stored["statistics"], stored["calibration"], stored["held_out"], reused=True)
    if source.kind == "shipped":
        made = StoredStatistics({k: v.cpu() for k, v in shipped_statistics(model).items()}, None, None)
    else:
        images, labels = source_images(layout, source, expert, task, seed, data_dir)
        made = fitted(model, fmt, images, labels, layout.statistics, derive_seed(seed, expert.tag, source.label),
                      device)
    if not force and made_meanwhile(path, recipe, upstream) is not None:  # another worker stored them meanwhile
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return StoredStatistics(stored["statistics"], stored["calibration"], stored["held_out"], reused=True)
    meta = {"source": source.label, "task": expert.task, "recipe": recipe, "upstream": upstream,
            "digest": state_digest(made.statistics)}
    atomic_torch_save({"statistics": made.statistics, "calibration": made.calibration, "held_out": made.held_out,
                       "meta": meta}, path)
    return made


# ---------------------------------------------------------------- scores made comparable across experts

@dataclass
class DetectorScores:
    """One detector's scores of a set of inputs, per expert: as the detector gives them (``raw``) and in units of
    each expert's own source (``comparable``; equal to raw for a shipped source or none)."""

    raw: torch.Tensor  # [N, experts]
    comparable: torch.Tensor  # [N, experts]


DETECTOR_PARAMS = ("shrinkage",)  # rule parameters applied to the statistics rather than passed to the detector
LOGIT_DETECTORS = ("max_softmax", "energy", "max_logit", "gen")  # read the logits alone: any expert, also a file's


def logits_view(logits: torch.Tensor) -> ExpertView:
    """A view holding only logits, for the detectors that read nothing else (LOGIT_DETECTORS)."""
    empty = logits.new_zeros(len(logits), 0)
    return ExpertView(logits, empty, logits.new_zeros(logits.shape[1], 0), logits.new_zeros(logits.shape[1]),
                      empty.unsqueeze(2))


@dataclass
class DetectorScorer:
    """Scores every expert's inputs with any detector, each expert's statistics read (or fitted) once per source.

    ``logits[k]`` are expert k's logits on the inputs to score (enough for LOGIT_DETECTORS without statistics);
    ``views()`` every expert's full view of them (taken on first need); ``statistics(source, k)`` its
    StoredStatistics; ``odin_view(k)`` its view of the same inputs kept for ODIN (made on first use)."""

    models: list[nn.Module]
    logits: list[torch.Tensor]
    views: Callable[[], list[ExpertView]]
    statistics: Callable[[Source, int], StoredStatistics]
    odin_view: Callable[[int], ExpertView]
    formats: list[InputFormat]
    device: torch.device
    _cache: dict[tuple, DetectorScores] = field(default_factory=dict)

    def __call__(self, name: str, source: Source | None, method: str, params: dict[str, Any]) -> DetectorScores:
        key = (name, source, method, tuple(sorted(params.items())))
        if key not in self._cache:
            raw, comparable = [], []
            for k in range(len(self.models)):
                one_raw, one = self.one_expert(name, source, method, params, k)
                raw.append(one_raw)
                comparable.append(one)
            self._cache[key] = DetectorScores(torch.stack(raw, dim=1), torch.stack(comparable, dim=1))
        return self._cache[key]

    def one_expert(self, name: str, source: Source | None, method: str, params: dict[str, Any],
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if DETECTORS[name].reads_inputs:
            view = self.odin_view(k)
        elif source is None and name in LOGIT_DETECTORS:
            view = logits_view(self.logits[k])
        else:
            view = self.views()[k]
        stored = self.statistics(source, k) if source is not None else None
        return comparable_scores(name, view, stored, self.models[k], self.formats[k], self.device, method, params)


def comparable_scores(name: str, view: ExpertView, stored: StoredStatistics | None, model: nn.Module,
                      fmt: InputFormat, device: torch.device, method: str = "zscore",
                      params: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector ``name``'s scores of ``view``'s inputs as it gives them, and standardised on the expert's own
    held-out part of the source ``stored`` came from (the same when there is none to standardise on)."""
    params = params or {}
    detector_params = {p: v for p, v in params.items() if p not in DETECTOR_PARAMS}
    statistics = stored.statistics if stored else None
    if statistics is not None and "shrinkage" in params and "covariance" in statistics:
        statistics = with_shrinkage(statistics, params["shrinkage"])
    raw = score(name, view, statistics, **detector_params)
    if stored is None or stored.calibration is None:
        return raw, raw
    if DETECTORS[name].reads_inputs:
        reference = observe(model, prepared_batches(stored.held_out, fmt, device), keep_inputs=True,
                            input_std=fmt.std)
    else:
        reference = stored.calibration_view(model, device)
    return raw, standardise(raw, calibrate(score(name, reference, statistics, **detector_params)), method)


# what the universal gate over detector scores reads of each expert: the comparable scores of these detectors,
# one per family of the field (softmax, logits, energy, generalised entropy, class Gaussians, nearest neighbours,
# the residual subspace, clipped activations); ODIN (a backward pass per input) and the input/batch-norm
# Gaussians (not every expert has the latter) are left out
GATE_DETECTORS = ("max_softmax", "energy", "max_logit", "gen", "mahalanobis", "knn", "vim", "react")


def detector_vector(view: ExpertView, stored: StoredStatistics, model: nn.Module, fmt: InputFormat,
                    device: torch.device) -> torch.Tensor:
    """``[N, len(GATE_DETECTORS)]``: every gate detector's comparable score of the inputs of ``view``."""
    return torch.stack([comparable_scores(name, view, stored, model, fmt, device)[1] for name in GATE_DETECTORS],
                       dim=1)


def detection_metrics(raw: torch.Tensor, domain: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """Per expert, how well the detector's raw score tells its own test images from the other experts':
    AUROC and the false-positive rate at 95% true-positive rate (OpenOOD's metrics). Written here because
    scikit-learn, which has them, is a test-only dependency: AUROC is the Mann-Whitney statistic over ranks
    (ties counted half)."""
    out = {}
    for k, name in enumerate(names):
        scores, own = raw[:, k].double().cpu(), (domain == k).cpu()
        positives, negatives = scores[own], scores[~own]
        if not len(positives) or not len(negatives):
            continue
        ranks = average_ranks(torch.cat([positives, negatives]))
        auroc = (ranks[:len(positives)].sum() - len(positives) * (len(positives) + 1) / 2) / (
            len(positives) * len(negatives))
        threshold = torch.quantile(positives, 0.05)  # 95% of the expert's own images score at or above it
        out[name] = {"auroc": float(auroc), "fpr95": float((negatives >= threshold).double().mean())}
    return out


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    order = values.argsort()
    ordered = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    unique, inverse = ordered.unique(return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, ranks[order])
    mean_rank /= torch.bincount(inverse, minlength=len(unique)).to(values.dtype)
    return mean_rank[inverse][order.argsort()]


def expert_views(models: list[nn.Module], formats: list[InputFormat], batches: Callable[[], Iterator[torch.Tensor]],
                 keep_inputs: bool = False, model_features: bool = False) -> list[ExpertView]:
    """Every expert's view of the same [0,1] batches, each in its own input format (``model_features``: with the
    arch's own feature vector too)."""
    return [observe(model, (prepare_input(x, fmt).contiguous(memory_format=fast_memory_format(model))
                            for x in batches()),
                    keep_inputs=keep_inputs, input_std=fmt.std if keep_inputs else None, model_features=model_features)
            for model, fmt in zip(models, formats)]

