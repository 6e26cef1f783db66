"""Out-of-distribution detectors: how much each input belongs to one expert, one score per input, higher = more
in-distribution. Routing is OOD detection run once per expert (docs/design.md section 4, "Rules").

The flow, per expert:

1. ``observe(model, batches)`` runs the expert once on prepared inputs (already in its input format) and keeps
   what detectors read, an ``ExpertView``: logits, penultimate features (the input of its final ``nn.Linear``),
   that layer's weight and bias, per-channel moments of the input and of its last batch-norm layer's input, and,
   for ODIN only, the inputs and the model.
2. Statistics of in-distribution inputs, for the detectors that need them: ``fit_statistics(view)`` on the view
   of any source of the expert's inputs (real or synthetic images), or ``shipped_statistics(model)``, from what
   the model ships with and no data. Both are plain dicts of tensors (``torch.save``, ``weights_only=True``).
3. ``score(name, view, statistics, **params)``: the detector's score of every input, vectorised over the batch,
   on the device of the view.
4. ``calibrate`` on scores of the expert's own source, then ``standardise``: every expert's scores on one
   scale, so an argmax over experts means something. Fit on one part of a source and calibrate on another
   (``split_source``): scored on its own bank, an input is its own nearest neighbour.

pytorch-ood (the field's library, pinned in requirements-test.txt) is the reference: tests/test_detectors.py checks
every formula here against it on the same logits, features and models. The runtime never imports it, so the
scores are the same whether or not it is installed (the GPU machine has no registry access), and they follow
the papers where the library chose otherwise: its Mahalanobis covariance is a sum, not divided by N; its GEN
averages over classes where the paper sums; its KNN searches with scikit-learn on the CPU.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Statistics = dict[str, Tensor]  # what statistics-based detectors read, by key; all on the CPU
Calibration = dict[str, Tensor]  # one detector's score distribution on an expert's own source
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
STANDARDISATIONS = ("zscore", "rank")
Standardisation = Literal["zscore", "rank"]


# ---------------------------------------------------------------- what an expert shows on a batch

@dataclass
class ExpertView:
    """What one expert shows on a set of inputs; per-input tensors are in the order the inputs came."""

    logits: Tensor  # [N, K]
    features: Tensor  # [N, D] penultimate features: the input of the final nn.Linear
    weight: Tensor  # [K, D] the final layer's weight
    bias: Tensor  # [K] its bias (zeros when it has none)
    input_moments: Tensor  # [N, C, 2] per input channel: the mean of x and of x^2 over the positions
    bn_moments: Tensor | None = None  # [N, C', 2] the same of the last batch-norm layer's input; None without one
    inputs: Tensor | None = None  # the prepared inputs, kept for ODIN only (observe(keep_inputs=True))
    model: nn.Module | None = None  # the expert, kept with the inputs: ODIN backpropagates to them
    input_std: Tensor | None = None  # [C] the std the inputs were normalised by: ODIN's step is in [0,1] pixels
    model_features: Tensor | None = None  # [N, F] the arch's own feature vector (what gates read), when asked for

    def __len__(self) -> int:
        return len(self.logits)

    def subset(self, index: Tensor) -> ExpertView:
        """The view of the inputs ``index`` selects; the final layer, the model and the input std are shared."""
        per_input = ("logits", "features", "input_moments", "bn_moments", "inputs", "model_features")
        return replace(self, **{name: None if getattr(self, name) is None else
                                getattr(self, name)[index.to(getattr(self, name).device)] for name in per_input})


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in registration order: its output layer in LeNet5, MLP, VGG and ResNet18."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear: the detectors read the input of its output layer")
    return linears[-1]


def last_batch_norm(model: nn.Module) -> nn.Module | None:
    """The model's last batch-norm layer in registration order (ResNet18: the last block's second), or None.

    Registration order is execution order in the archs here; in a block whose shortcut has its own batch norm,
    that one is registered last, and it feeds the same sum as the block's other, so either describes it."""
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    return norms[-1] if norms else None


def channel_moments(x: Tensor) -> Tensor:
    """``[N, C, ...] -> [N, C, 2]``: each channel's mean and mean square over its positions (``[N, C]``: none).

    Two numbers per channel give any diagonal per-channel Gaussian's mean squared distance exactly (see
    ``input_gaussian``), without keeping the tensor."""
    flat = x.detach().float()
    flat = flat.flatten(2) if flat.dim() > 2 else flat.unsqueeze(2)
    return torch.stack([flat.mean(dim=2), flat.square().mean(dim=2)], dim=2)


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable[Tensor], *, keep_inputs: bool = False,
            input_std: Sequence[float] | None = None, model_features: bool = False) -> ExpertView:
    """Run ``model`` (in eval mode) on batches of prepared inputs and keep what the detectors read.

    Forward hooks on the last ``nn.Linear`` (its input: the penultimate features) and on the last batch-norm
    layer (its input, as channel moments) read any of the archs without changing them. ``keep_inputs`` keeps
    the inputs and the model for ODIN (the only detector that runs the model again); ``input_std`` is the
    per-channel std the inputs were normalised by, so that ODIN's step is in [0,1] pixel units;
    ``model_features`` also keeps the arch's own feature vector (``model(x, return_features=True)``), so one pass
    serves the detectors and the rules that read features."""
    if model.training:
        raise ValueError("observe needs the model in eval mode: in training mode batch norm normalises with each "
                         "batch's statistics and updates its running ones")
    head, norm = final_linear(model), last_batch_norm(model)
    seen: dict[str, Tensor] = {}

    def on_head(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen["features"], seen["head_output"] = args[0], output

    def on_norm(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen["bn_input"] = args[0]

    handles = [head.register_forward_hook(on_head)]
    if norm is not None:
        handles.append(norm.register_forward_hook(on_norm))
    parts: dict[str, list[Tensor]] = {"logits": [], "features": [], "input_moments": [], "bn_moments": [],
                                      "inputs": [], "model_features": []}
    try:
        for x in batches:
            seen.clear()
            logits = model(x, return_features=True) if model_features else model(x)
            if model_features:
                logits, own = logits
                parts["model_features"].append(own.float())
            if "features" not in seen or seen["features"].dim() != 2:
                raise ValueError(f"{type(model).__name__}: its last nn.Linear ({head}) was not called on [N, D] "
                                 f"features, so its input is not the penultimate feature vector")
            if not torch.equal(seen["head_output"], logits):
                raise ValueError(f"{type(model).__name__}: its output is not its last nn.Linear's ({head}), so the "
                                 f"detectors that recompute logits from features would score another network")
            parts["logits"].append(logits.float())
            parts["features"].append(seen["features"].float())
            parts["input_moments"].append(channel_moments(x))
            if norm is not None:
                parts["bn_moments"].append(channel_moments(seen["bn_input"]))
            if keep_inputs:
                parts["inputs"].append(x)
    finally:
        for handle in handles:
            handle.remove()
    if not parts["logits"]:
        raise ValueError("observe got no batches")
    joined = {name: torch.cat(tensors) if tensors else None for name, tensors in parts.items()}
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if head.bias is not None else torch.zeros(len(weight), device=weight.device)
    std = None if input_std is None else torch.tensor(input_std, dtype=torch.float32, device=weight.device)
    return ExpertView(weight=weight, bias=bias, model=model if keep_inputs else None, input_std=std, **joined)


def split_source(view: ExpertView, holdout: float = 0.2, seed: int = 0) -> tuple[ExpertView, ExpertView]:
    """A seeded split of a source's view: (the part to fit statistics on, the part to calibrate scores on)."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
    order = torch.randperm(len(view), generator=torch.Generator().manual_seed(seed))
    cut = len(view) - max(1, round(holdout * len(view)))
    return view.subset(order[:cut]), view.subset(order[cut:])


# ---------------------------------------------------------------- statistics of in-distribution inputs

def fit_statistics(view: ExpertView, labels: Tensor | None = None, *, shrinkage: float = 1e-6,
                   knn_bank: int = 10_000, vim_dim: int | None = None, react_percentile: float = 0.9,
                   seed: int = 0) -> Statistics:
    """Everything the statistics-based detectors read, from an expert's view of in-distribution inputs.

    ``labels``: the inputs' classes in the expert's own label space; None (synthetic sets have none): the
    expert's own predictions. Class-conditional statistics cover the classes that occur. ``shrinkage`` adds
    that fraction of the mean variance to every covariance's diagonal, so that a source with fewer inputs
    than feature dimensions, or ReLU units that never fire on it, still has a precision. ``knn_bank``: at
    most that many features, a seeded random subset, are kept for KNN. ``vim_dim``: ViM's principal subspace
    dimension (None: half the feature dimension). ``react_percentile``: ReAct's clipping percentile."""
    z = view.features.double()
    labels = view.logits.argmax(dim=1) if labels is None else labels.to(z.device)
    if len(labels) != len(z):
        raise ValueError(f"{len(labels)} labels for {len(z)} inputs")
    stats = {**class_gaussians(z, labels, shrinkage), **knn_features(z, knn_bank, seed),
             **vim_subspace(z, view.logits.double(), view.weight.double(), view.bias.double(), vim_dim),
             "react_threshold": quantile(z.flatten(), react_percentile),
             **channel_gaussian("input", view.input_moments)}
    if view.bn_moments is not None:
        stats |= channel_gaussian("bn", view.bn_moments)
    return {name: value.float().cpu() for name, value in stats.items()}


def shipped_statistics(model: nn.Module) -> Statistics:
    """Gaussian statistics from what the model ships with, no data at all (a data-free source).

    - Input: an expert normalises with its training pixels' per-channel mean and std, so its prepared
      training inputs have channels of mean 0 and variance 1. ``input_gaussian`` then scores how far an
      input's pixels stray from that standard Gaussian. It assumes the constants are the pixels' mean and std
      as the expert sees them, and the model does not normalise inside (one that does ships nothing to read
      here). Ours hold only roughly: the MNIST ones were measured on 28x28 digits (padded to 32x32, prepared
      training images have mean -0.10 and mean square 0.81), and the CIFAR-10 stds in wide use (0.2023,
      0.1994, 0.2010) are the mean of each image's own std, below the pixels' (0.245, 0.243, 0.261 on our
      copy), so prepared CIFAR-10 training images have mean squares of 1.5-1.7, not 1.
    - Batch norm (only for networks that have one): the last layer's running mean and variance describe
      every activation of each channel of its input, over training batches and positions, as a diagonal
      Gaussian: ``bn_gaussian`` scores how far an input's activations there stray from it. Running variances
      are averages of within-batch variances, which miss the spread of the batch means (small for batches of
      hundreds).

    Both scores are mean squared standardised distances, about 1 on the inputs the Gaussian describes, so
    they are on one scale across experts without calibration (there is no sample to calibrate on), as far
    as the assumptions hold."""
    stats = {"input_mean": torch.zeros(1), "input_var": torch.ones(1)}  # one channel's values stand for every channel
    norm = last_batch_norm(model)
    if norm is not None and norm.running_mean is not None:
        stats |= {"bn_mean": norm.running_mean.detach().float().cpu(),
                  "bn_var": norm.running_var.detach().float().cpu()}
    return stats


def class_gaussians(z: Tensor, labels: Tensor, shrinkage: float) -> Statistics:
    """Class means with a shared within-class precision (Lee et al. 2018) and the background Gaussian of all
    features (Ren et al. 2021). Covariances divide by N, as in both papers; they are kept beside the
    precisions, so another shrinkage needs no refit (``with_shrinkage``)."""
    classes, index = labels.unique(return_inverse=True)
    counts = torch.bincount(index, minlength=len(classes)).to(z.dtype)
    means = torch.zeros(len(classes), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, index, z)
    means /= counts[:, None]
    background_mean = z.mean(dim=0)
    covariance, background = covariance_of(z - means[index]), covariance_of(z - background_mean)
    return {"class_means": means, "covariance": covariance, "precision": shrunk_precision(covariance, shrinkage),
            "background_mean": background_mean, "background_covariance": background,
            "background_precision": shrunk_precision(background, shrinkage)}


def with_shrinkage(statistics: Statistics, shrinkage: float) -> Statistics:
    """``statistics`` with both precisions recomputed from their covariances at another ``shrinkage``."""
    precisions = {key: shrunk_precision(statistics[source].double(), shrinkage).float()
                  for key, source in (("precision", "covariance"), ("background_precision", "background_covariance"))}
    return {**statistics, **precisions}


def covariance_of(centred: Tensor) -> Tensor:
    return centred.T @ centred / len(centred)


def shrunk_precision(covariance: Tensor, shrinkage: float) -> Tensor:
    """The inverse of ``covariance`` with ``shrinkage`` x its mean variance added to the diagonal."""
    ridge = shrinkage * covariance.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.inv(covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype,
                                                          device=covariance.device))


def knn_features(z: Tensor, bank: int, seed: int) -> Statistics:
    """At most ``bank`` features, a seeded random subset, normalised to unit length (Sun et al. 2022)."""
    keep = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:bank]
    return {"knn_bank": F.normalize(z[keep.to(z.device)], dim=1)}


def vim_subspace(z: Tensor, logits: Tensor, weight: Tensor, bias: Tensor, dim: int | None) -> Statistics:
    """ViM (Wang et al. 2022): the origin where the logits vanish, the complement of the ``dim`` principal
    directions of the features about it, and alpha, which matches the mean residual norm to the mean top logit."""
    dim = z.shape[1] // 2 if dim is None else dim
    if not 0 < dim < z.shape[1]:
        raise ValueError(f"ViM's principal dimension must be in 1..{z.shape[1] - 1}, got {dim}")
    origin = -torch.linalg.pinv(weight) @ bias
    centred = z - origin
    _, directions = torch.linalg.eigh(centred.T @ centred / len(z))  # eigenvalues ascending
    residual = directions[:, :z.shape[1] - dim]
    alpha = logits.max(dim=1).values.mean() / (centred @ residual).norm(dim=1).mean()
    return {"vim_origin": origin, "vim_residual": residual, "vim_alpha": alpha}


def quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile (a fraction) with linear interpolation, as numpy's default; no size limit, unlike
    ``torch.quantile``."""
    if not 0 <= q <= 1:
        raise ValueError(f"percentile must be a fraction in [0, 1], got {q}")
    ordered = values.sort().values
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def channel_gaussian(prefix: str, moments: Tensor) -> Statistics:
    """A per-channel Gaussian of every value of a tensor, from its inputs' channel moments (``channel_moments``)."""
    mean = moments[:, :, 0].double().mean(dim=0)
    variance = moments[:, :, 1].double().mean(dim=0) - mean.square()
    return {f"{prefix}_mean": mean, f"{prefix}_var": variance.clamp(min=1e-12)}


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Detector:
    name: str
    fn: Callable[..., Tensor]  # fn(view, statistics, **params) -> [N] scores
    params: dict[str, tuple[Any, Any]]  # name -> (type, default)
    statistics: tuple[str, ...]  # the keys of the statistics it reads; () for per-sample detectors
    reads_inputs: bool  # it runs the model on the inputs again (observe(keep_inputs=True))
    summary: str


DETECTORS: dict[str, Detector] = {}


def detector(name: str, statistics: tuple[str, ...] = (),
             reads_inputs: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn(view, statistics, *, param=default, ...)``; its keyword-only parameters are its settings."""
    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        hints = typing.get_type_hints(fn)
        params = {p.name: (hints[p.name], p.default) for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        DETECTORS[name] = Detector(name, fn, params, statistics, reads_inputs,
                                   (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def score(name: str, view: ExpertView, statistics: Statistics | None = None, **params: Any) -> Tensor:
    """Detector ``name``'s score of every input of ``view`` (higher = more in-distribution), on the view's device."""
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, list(DETECTORS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown detector {name!r}{hint} (choices: {', '.join(DETECTORS)})")
    spec = DETECTORS[name]
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(f"detector {name!r} has no parameter(s) {sorted(unknown)} "
                         f"(parameters: {', '.join(spec.params) or 'none'})")
    missing = [key for key in spec.statistics if statistics is None or key not in statistics]
    if missing:
        raise ValueError(f"detector {name!r} needs the statistics {missing}: fit_statistics gives them all from "
                         f"in-distribution inputs; shipped_statistics gives input_* and, with batch norm, bn_*")
    if spec.reads_inputs and (view.inputs is None or view.model is None):
        raise ValueError(f"detector {name!r} runs the model on the inputs again: observe(..., keep_inputs=True)")
    device = view.logits.device
    return spec.fn(view, {key: statistics[key].to(device) for key in spec.statistics}, **params)


def logits_from(view: ExpertView, features: Tensor) -> Tensor:
    """The expert's final layer applied to (reshaped) penultimate features."""
    return F.linear(features, view.weight, view.bias)


def kept_count(width: int, fraction: float) -> int:
    """How many of ``width`` activations survive when the lowest ``fraction`` of them are pruned (at least one)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"percentile must be a fraction in [0, 1), got {fraction}")
    return max(1, width - round(width * fraction))


def gaussian_distance(moments: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """The mean, over channels and positions, of ``(x - mean_c)^2 / variance_c``, from channel moments."""
    first, second = moments.unbind(dim=2)
    return ((second - 2 * mean * first + mean.square()) / variance).mean(dim=1)


def squared_distances(z: Tensor, centres: Tensor, precision: Tensor) -> Tensor:
    """``[N, M]`` squared Mahalanobis distances of ``z`` to each centre under one precision matrix.

    Whitening once (P = W W^T) turns them into Euclidean distances to the M whitened centres; computed
    without the mm expansion, so a distance near zero does not cancel to noise. An eigendecomposition, not
    a Cholesky factor, since a precision stored in float32 may be a rounding short of positive definite."""
    values, vectors = torch.linalg.eigh(precision.double())
    whitener = (vectors * values.clamp(min=0).sqrt()).to(z.dtype)
    return torch.cdist(z @ whitener, centres @ whitener, compute_mode="donot_use_mm_for_euclid_dist").square()


# ---------------------------------------------------------------- per-sample detectors (no statistics)

@detector("max_softmax")
def max_softmax(view: ExpertView, statistics: Statistics) -> Tensor:
    """The largest softmax probability (MSP; Hendrycks & Gimpel 2017)."""
    return view.logits.softmax(dim=1).max(dim=1).values


@detector("energy")
def energy(view: ExpertView, statistics: Statistics) -> Tensor:
    """Minus the free energy, logsumexp of the logits (Liu et al. 2020, temperature 1)."""
    return view.logits.logsumexp(dim=1)


@detector("max_logit")
def max_logit(view: ExpertView, statistics: Statistics) -> Tensor:
    """The largest logit (MaxLogit; Hendrycks et al. 2022)."""
    return view.logits.max(dim=1).values


@detector("gen")
def gen(view: ExpertView, statistics: Statistics, *, gamma: float = 0.1) -> Tensor:
    """Minus the generalised entropy sum_j p_j^gamma (1 - p_j)^gamma of the softmax (GEN; Liu et al. 2023).

    The paper sums over the top M = 100 classes (ImageNet); our experts have fewer, so over all. p^gamma is
    exp(gamma log p): a probability that underflows to 0 in float32 still counts."""
    log_p = view.logits.log_softmax(dim=1)
    return -((gamma * log_p).exp() * (1 - log_p.exp()).pow(gamma)).sum(dim=1)


@detector("odin", reads_inputs=True)
def odin(view: ExpertView, statistics: Statistics, *, temperature: float = 1000.0, epsilon: float = 0.0014,
         batch_size: int = 512) -> Tensor:
    """The max softmax at temperature T of the input nudged to raise it (ODIN; Liang et al. 2018).

    x' = x - epsilon sign(grad_x CE(f(x) / T, argmax f(x))) / std: a step of epsilon in [0,1] pixels per
    channel (the published defaults T = 1000, epsilon = 0.0014), as the original code divides by the
    normalisation std. Runs the model in chunks of ``batch_size``: a forward, a backward and a forward."""
    std = 1.0 if view.input_std is None else view.input_std.view(1, -1, *[1] * (view.inputs.dim() - 2))
    scores = []
    for chunk in view.inputs.split(batch_size):
        with torch.inference_mode(False), torch.enable_grad():
            x = chunk.clone().requires_grad_()  # a clone: inputs made under inference mode take no gradient
            logits = view.model(x) / temperature
            # summed, not averaged: the step takes only the gradient's sign, and a mean could underflow it to 0
            (gradient,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum"), x)
        with torch.no_grad():
            nudged = chunk - epsilon * gradient.sign() / std
            scores.append((view.model(nudged) / temperature).softmax(dim=1).max(dim=1).values.float())
    return torch.cat(scores)


@detector("ash")
def ash(view: ExpertView, statistics: Statistics, *, percentile: float = 0.9) -> Tensor:
    """Energy after ASH-S on the penultimate features (Djurisic et al. 2023): keep each input's top
    ``1 - percentile`` activations, zero the rest, and scale the kept by exp(sum before / sum after).

    The threshold is each input's own percentile, so ASH needs no statistics (90: the paper's ASH-S value)."""
    h = view.features
    kept, where = h.topk(kept_count(h.shape[1], percentile), dim=1)
    kept_sum = kept.sum(dim=1)
    # an input with no positive activation keeps nothing: leave it unscaled rather than divide 0 by 0
    sharpen = torch.where(kept_sum > 0, h.sum(dim=1) / kept_sum.where(kept_sum > 0, 1.0), 0.0).exp()
    pruned = torch.zeros_like(h).scatter_(1, where, kept)
    return logits_from(view, pruned * sharpen[:, None]).logsumexp(dim=1)


@detector("scale")
def scale(view: ExpertView, statistics: Statistics, *, percentile: float = 0.85) -> Tensor:
    """Energy after SCALE (Xu et al. 2024): ASH-S's factor exp(sum / sum of the top ``1 - percentile``) applied
    to all the penultimate activations, none pruned (85: the paper's ImageNet value, OpenOOD's default)."""
    h = view.features
    top_sum = h.topk(kept_count(h.shape[1], percentile), dim=1).values.sum(dim=1)
    factor = torch.where(top_sum > 0, h.sum(dim=1) / top_sum.where(top_sum > 0, 1.0), 0.0).exp()
    return logits_from(view, h * factor[:, None]).logsumexp(dim=1)


# ---------------------------------------------------------------- detectors reading statistics

@detector("mahalanobis", statistics=("class_means", "precision"))
def mahalanobis(view: ExpertView, statistics: Statistics) -> Tensor:
    """Minus the squared Mahalanobis distance of the penultimate features to the closest class mean, under the
    shared within-class covariance (Lee et al. 2018, without their input preprocessing)."""
    distances = squared_distances(view.features, statistics["class_means"], statistics["precision"])
    return -distances.min(dim=1).values


@detector("relative_mahalanobis", statistics=("class_means", "precision", "background_mean",
                                              "background_precision"))
def relative_mahalanobis(view: ExpertView, statistics: Statistics) -> Tensor:
    """Minus the smallest class Mahalanobis distance less the distance under the Gaussian of all features
    (relative Mahalanobis; Ren et al. 2021): what the classes explain beyond the features' overall spread."""
    distances = squared_distances(view.features, statistics["class_means"], statistics["precision"])
    background = squared_distances(view.features, statistics["background_mean"][None],
                                   statistics["background_precision"])
    return background.squeeze(1) - distances.min(dim=1).values


@detector("knn", statistics=("knn_bank",))
def knn(view: ExpertView, statistics: Statistics, *, k: int = 10) -> Tensor:
    """Minus the distance of the unit-normalised penultimate features to their k-th nearest neighbour in the
    bank of in-distribution features (Sun et al. 2022).

    The paper's k = 50 goes with CIFAR-10's 50,000 training images, k = 10 with a 1% sample of ImageNet: our
    banks hold 1,000-10,000. An exact search by matrix products, in chunks of queries: with the bank bounded
    (fit_statistics' knn_bank) it takes milliseconds per thousand inputs on either device, so faiss, an index
    library that would be one more native dependency to install (and one the GPU machine lacks), buys nothing."""
    bank = statistics["knn_bank"]
    if k < 1:
        raise ValueError(f"knn: k must be at least 1, got {k}")
    k = min(k, len(bank))  # a few-shot source's bank may hold fewer than k: its farthest member then
    queries = F.normalize(view.features, dim=1)
    bank_norms = bank.square().sum(dim=1)  # 1, or 0 for a feature vector of zeros
    rows = max(1, 2 ** 24 // len(bank))  # a chunk's distance matrix stays under 64 MB
    kth = [(q.square().sum(dim=1, keepdim=True) + bank_norms - 2 * q @ bank.T).topk(k, dim=1, largest=False)
           .values[:, -1] for q in queries.split(rows)]
    return -torch.cat(kth).clamp(min=0).sqrt()


@detector("vim", statistics=("vim_origin", "vim_residual", "vim_alpha"))
def vim(view: ExpertView, statistics: Statistics) -> Tensor:
    """The energy of the logits less the virtual logit: alpha x the norm of the features' part outside the
    principal subspace (ViM; Wang et al. 2022; the log of the paper's score, so the same ranking)."""
    residual = ((view.features - statistics["vim_origin"]) @ statistics["vim_residual"]).norm(dim=1)
    return view.logits.logsumexp(dim=1) - statistics["vim_alpha"] * residual


@detector("react", statistics=("react_threshold",))
def react(view: ExpertView, statistics: Statistics) -> Tensor:
    """Energy after clipping the penultimate activations at a percentile (90 by default) of in-distribution
    ones (ReAct; Sun et al. 2021)."""
    return logits_from(view, view.features.clamp(max=statistics["react_threshold"])).logsumexp(dim=1)


@detector("input_gaussian", statistics=("input_mean", "input_var"))
def input_gaussian(view: ExpertView, statistics: Statistics) -> Tensor:
    """Minus the mean squared standardised distance of the input's pixels to a per-channel diagonal Gaussian:
    shipped (the expert's normalisation) or fitted. It tells grey MNIST digits from colour photos."""
    return -gaussian_distance(view.input_moments, statistics["input_mean"], statistics["input_var"])


@detector("bn_gaussian", statistics=("bn_mean", "bn_var"))
def bn_gaussian(view: ExpertView, statistics: Statistics) -> Tensor:
    """Minus the mean squared standardised distance of the last batch-norm layer's input to the per-channel
    Gaussian of its running statistics (shipped) or of a fitted source."""
    if view.bn_moments is None:
        raise ValueError("bn_gaussian reads a batch-norm layer, and this expert has none")
    return -gaussian_distance(view.bn_moments, statistics["bn_mean"], statistics["bn_var"])


# ---------------------------------------------------------------- scores comparable across experts

def calibrate(scores: Tensor) -> Calibration:
    """A detector's score distribution on an expert's own source (scored with statistics fitted on another part
    of that source: ``split_source``): its mean and std, and every score, sorted, for percentile ranks."""
    flat = scores.detach().float().flatten().cpu()
    if len(flat) < 2:
        raise ValueError(f"calibrating needs at least two scores, got {len(flat)}")
    return {"mean": flat.mean(), "std": flat.std(), "sorted": flat.sort().values}


def standardise(scores: Tensor, calibration: Calibration, method: Standardisation = "zscore") -> Tensor:
    """Scores in units of their calibration: ``zscore`` (minus the mean, over the std) or ``rank`` (the fraction
    of calibration scores at or below, in [0, 1]). Ranks saturate: inputs below every calibration score all
    rank 0, and an argmax over experts breaks their ties by expert order; z-scores keep going."""
    if method == "zscore":
        mean, std = calibration["mean"].to(scores.device), calibration["std"].to(scores.device)
        return (scores - mean) / std.clamp(min=1e-12)
    if method == "rank":
        reference = calibration["sorted"].to(scores.device)
        return torch.searchsorted(reference, scores.float().contiguous(), right=True).float() / len(reference)
    raise ValueError(f"unknown standardisation {method!r}; choices: {', '.join(STANDARDISATIONS)}")

