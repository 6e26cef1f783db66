"""Routing from the unlabeled inputs themselves (docs/design.md section 9): rules that fit a router on the
very images the mixture is asked to classify, never on a label or a training image.

What a rule fits on (its ``inputs`` parameter):

- ``selection``: transductive, every input of the selection half of the combined test set (its images through
  the experts, never its labels); the rows report on the other half;
- ``stream:N``: online, the first N inputs of a seeded shuffle of the selection half; every input (the report
  half included) is then routed, one at a time, by what was fitted on those N.

Four methods, each a pure function of the experts' activations on the inputs (``[N, ...]`` tensors), the rows
it may fit on, and a seed:

- ``self_train``: a linear gate over the experts' activations (the paper's gate inputs), trained on a starting
  rule's most confident routes, then re-labelled by itself for some rounds;
- ``cluster_assign``: k-means on the activations, each cluster given to the expert whose per-expert
  standardised confidence is highest on it on average (its ownership score);
- ``entropy_gate``: test-time adaptation of a gate by information maximisation (TENT, Wang et al. ICLR 2021,
  minimises the entropy of a model's predictions on its unlabeled test inputs; SHOT, Liang et al. ICML 2020,
  adds the entropy of the mean prediction so that it cannot collapse onto one answer). Here what adapts is a
  gate over the experts, started at the starting rule's standardised scores, and the prediction whose entropy
  falls is the mixture's over the union of the classes;
- ``pseudo_mahalanobis``: each expert's class-conditional Gaussians (Lee et al. NeurIPS 2018) fitted on the fit
  inputs a starting rule routes to it, labelled by the expert's own predictions, and each input scored by its
  relative Mahalanobis distance (Ren et al. 2021) against the Gaussian of all the fit inputs: a detector whose
  in-distribution statistics come from the unlabeled inputs themselves, not from training or synthetic images.

Fitting is small (a few thousand inputs, hundreds of dimensions) and runs on the CPU whatever the experts ran
on, so a rule gives the same answer on every device. Plain torch, because scikit-learn is only a test
dependency here (requirements-test.txt) and k-means and a logistic regression are a few lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from config import ConfigError
from detectors import class_gaussians, squared_distances
from gating import gate_inputs

SELECTION = "selection"
STREAM_PREFIX = "stream:"
STEP_SIZE = 0.05  # Adam's step for the gates, full batch: converges well within the steps below on z-scored inputs
WEIGHT_DECAY = 1e-3  # keeps a self-trained gate from fitting its own pseudo-labels exactly


def check_fit_inputs(spec: str, where: str) -> None:
    """``selection`` or ``stream:N`` (N a positive count), else a ConfigError naming the fix."""
    count = spec.removeprefix(STREAM_PREFIX) if spec.startswith(STREAM_PREFIX) else None
    if spec != SELECTION and not (count and count.isdigit() and int(count) > 0):
        raise ConfigError(f"{where}: inputs={spec!r} is not {SELECTION} (fit on the selection half's unlabeled "
                          f"images) or stream:N (the first N of a shuffled stream, e.g. stream:500)")


def stream_order(select: Tensor, seed: int) -> Tensor:
    """The stream: the selection half's inputs (indices into the combined test set) in a seeded random order."""
    members = torch.nonzero(select.cpu()).flatten()
    generator = torch.Generator().manual_seed(seed)
    return members[torch.randperm(len(members), generator=generator)]


def fit_rows(spec: str, select: Tensor, seed: int) -> Tensor:
    """The inputs a rule may fit on: the whole selection half, or the first N of the stream."""
    if spec == SELECTION:
        return torch.nonzero(select.cpu()).flatten()
    count = int(spec.removeprefix(STREAM_PREFIX))
    order = stream_order(select, seed)
    if count > len(order):
        raise ValueError(f"inputs={spec} fits on the first {count} inputs of the stream, but the selection half "
                         f"holds {len(order)}; use a smaller N or a larger test set (test_limit)")
    return order[:count]


def activation_matrix(gate: str, logits: list[Tensor], features: list[Tensor] | None) -> Tensor:
    """Every expert's gate input of type ``gate`` (gating.gate_inputs), side by side: ``[N, sum of widths]``."""
    if features is None and gate in ("feature", "agnostic_feature"):
        raise RuntimeError(f"gate={gate} reads the experts' feature vectors, and this evaluation has none")
    parts = [gate_inputs(gate, lo.float().cpu(), None if features is None else features[k].float().cpu())
             for k, lo in enumerate(logits)]
    return torch.cat(parts, dim=1)


def standardise(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` z-scored per column with the mean and std of the fit rows only. A column nearly constant on them (a
    ReLU feature that fires only on other inputs) is scaled by a floor of 1% of the mean column std instead, so
    that it cannot blow up to thousands on the inputs where it does fire."""
    mean, std = x[rows].mean(dim=0), x[rows].std(dim=0)
    return (x - mean) / std.clamp(min=max(0.01 * float(std.mean()), 1e-12))


def confident_rows(rows: Tensor, routes: Tensor, margin: Tensor, fraction: float, experts: int) -> Tensor:
    """Of ``rows``, the ``fraction`` with the largest margin within each route's own group: scores of different
    experts sit on different scales, so one global cut could leave an expert with no example at all."""
    kept = []
    for k in range(experts):
        members = rows[routes[rows] == k]
        keep = max(1, round(fraction * len(members))) if len(members) else 0
        kept.append(members[margin[members].argsort(descending=True)[:keep]])
    return torch.cat(kept)


def top_two_margin(scores: Tensor) -> Tensor:
    """The gap between each row's best and second-best expert score (0 with one expert)."""
    if scores.shape[1] < 2:
        return torch.zeros(len(scores))
    top = scores.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@dataclass
class Routing:
    """What a fitted router says of every input, and which fit inputs it labelled itself while fitting."""

    expert: Tensor  # [N] the expert each input is routed to
    scores: Tensor  # [N, experts] higher = more the expert's own (AUROC per expert)
    pseudo_rows: Tensor  # indices of the fit inputs given a pseudo-label (self-training's first confident set)
    pseudo_experts: Tensor  # the expert each of those was given


def train_linear_gate(x: Tensor, targets: Tensor, experts: int, steps: int,
                      start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """A multinomial logistic regression ``x @ w + b`` over ``experts`` outputs, trained full-batch by Adam from
    zero (or from ``start``, a previous ``(w, b)``) with class weights that balance the experts (a self-labelled
    set is rarely balanced)."""
    w = torch.zeros(x.shape[1], experts) if start is None else start[0].clone()
    b = torch.zeros(experts) if start is None else start[1].clone()
    w.requires_grad_()
    b.requires_grad_()
    counts = torch.bincount(targets, minlength=experts).float()
    balance = len(targets) / (experts * counts.clamp(min=1))
    optimiser = torch.optim.Adam([w, b], lr=STEP_SIZE, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(x @ w + b, targets, weight=balance).backward()
        optimiser.step()
    return w.detach(), b.detach()


def self_train(x: Tensor, start_scores: Tensor, rows: Tensor, confident: float, rounds: int,
               steps: int = 100) -> Routing:
    """Train a linear gate on ``x[rows]`` (``[N, D]``, already standardised) from the starting rule's confident
    routes (``start_scores``: ``[N, experts]``, its route the argmax, its confidence the top-two margin), then
    ``rounds`` times re-label the fit rows by the gate's own confident routes and train on."""
    experts = start_scores.shape[1]
    routes, margin = start_scores.argmax(dim=1), top_two_margin(start_scores)
    chosen = confident_rows(rows, routes, margin, confident, experts)
    pseudo = (chosen, routes[chosen])
    weights = train_linear_gate(x[chosen], routes[chosen], experts, steps)
    for _ in range(rounds):
        probs = (x @ weights[0] + weights[1]).softmax(dim=1)
        routes, margin = probs.argmax(dim=1), top_two_margin(probs)
        chosen = confident_rows(rows, routes, margin, confident, experts)
        # warm-started from the last gate, whose routes moved little: half the steps suffice
        weights = train_linear_gate(x[chosen], routes[chosen], experts, steps // 2, weights)
    probs = (x @ weights[0] + weights[1]).softmax(dim=1)
    return Routing(probs.argmax(dim=1), probs, *pseudo)


def kmeans(x: Tensor, clusters: int, seed: int, iterations: int = 30) -> Tensor:
    """Lloyd's k-means on the rows of ``x`` from a seeded k-means++ start; returns the ``[clusters, D]`` centres.
    Fewer inputs than clusters (a short stream) give each input its own cluster."""
    clusters = min(clusters, len(x))
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(clusters - 1):  # k-means++: the next centre drawn in proportion to its squared distance
        distance = torch.cdist(x, centres).min(dim=1).values.square()
        total = distance.sum()
        pick = torch.multinomial(distance / total, 1, generator=generator) if total > 0 else \
            torch.randint(len(x), (1,), generator=generator)
        centres = torch.cat([centres, x[pick]])
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def cluster_assign(x: Tensor, ownership: Tensor, rows: Tensor, clusters: int, seed: int) -> Routing:
    """Cluster the fit rows of ``x`` (standardised) and give each cluster to the expert with the highest mean
    ``ownership`` (``[N, experts]``, each expert's confidence z-scored over the fit rows) on it; every input goes to
    the expert of its nearest centre."""
    centres = kmeans(x[rows], clusters, seed)
    clusters = len(centres)
    fit_assign = torch.cdist(x[rows], centres).argmin(dim=1)
    sums = torch.zeros(clusters, ownership.shape[1]).index_add_(0, fit_assign, ownership[rows])
    mean = sums / torch.bincount(fit_assign, minlength=clusters).clamp(min=1).unsqueeze(1).float()
    owner = mean.argmax(dim=1)
    nearest = torch.cdist(x, centres).argmin(dim=1)
    return Routing(owner[nearest], mean[nearest], rows, owner[fit_assign])


def entropy_gate(x: Tensor, start: Tensor, expert_probs: list[Tensor], rows: Tensor, diversity: float,
                 steps: int = 50) -> Routing:
    """Adapt a gate ``softmax(x @ w + b + a * start)`` (``start``: the starting rule's per-expert scores, z-scored;
    at w = 0, b = 0, a = 1 the gate is that rule, softened) on the fit rows so that the mixture's prediction over
    the union of the classes, ``gate_k * p_k``, has low entropy while the gate's mean over the rows keeps a high
    entropy (weight ``diversity``): without it the entropy alone drives every input to one expert. It starts at a
    working rule, so it needs fewer steps than a gate trained from zero (on mnist_cifar10 its routes no longer
    change after 25)."""
    experts = start.shape[1]
    w = torch.zeros(x.shape[1], experts, requires_grad=True)
    b = torch.zeros(experts, requires_grad=True)
    a = torch.ones(experts, requires_grad=True)
    # the entropy of a disjoint mixture splits: H(gate) + sum_k gate_k H(p_k)
    expert_entropy = torch.stack([-(p * p.clamp(min=1e-12).log()).sum(dim=1) for p in expert_probs], dim=1)
    optimiser = torch.optim.Adam([w, b, a], lr=STEP_SIZE)
    for _ in range(steps):
        optimiser.zero_grad()
        log_gate = (x[rows] @ w + b + a * start[rows]).log_softmax(dim=1)
        gate = log_gate.exp()
        conditional = -(gate * log_gate).sum(dim=1) + (gate * expert_entropy[rows]).sum(dim=1)
        marginal = gate.mean(dim=0)
        loss = conditional.mean() + diversity * (marginal * marginal.clamp(min=1e-12).log()).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        probs = (x @ w + b + a * start).softmax(dim=1)
    return Routing(probs.argmax(dim=1), probs, rows[:0], torch.zeros(0, dtype=torch.long))


def relative_mahalanobis_scores(features: Tensor, predictions: Tensor, members: Tensor, rows: Tensor,
                                shrinkage: float) -> Tensor:
    """One expert's score of every input: the squared Mahalanobis distance under the Gaussian of all the fit
    inputs (``rows``) less the distance to the closest class mean, the classes' Gaussians (one shared covariance)
    fitted on ``members`` labelled by the expert's own ``predictions``. Higher = more the expert's own. The
    background is the fit inputs' Gaussian, not the members' (Ren et al. fit it on training data, which this rule
    has none of): on five_mnist's selection half it routed 1 to 2 points better."""
    z = features.double()
    classes = class_gaussians(z[members], predictions[members], shrinkage)
    background = class_gaussians(z[rows], torch.zeros(len(rows), dtype=torch.long), shrinkage)
    near = squared_distances(z, classes["class_means"], classes["precision"]).min(dim=1).values
    far = squared_distances(z, background["class_means"], background["precision"]).squeeze(1)
    return (far - near).float()


def pseudo_mahalanobis(features: list[Tensor], predictions: list[Tensor], start: Tensor, rows: Tensor,
                       confident: float, rounds: int, shrinkage: float) -> Routing:
    """Route by relative Mahalanobis scores fitted on pseudo-labelled fit inputs: each expert's members are the
    ``confident`` fraction of the fit inputs the starting rule (``start``: ``[N, experts]``) routes to it, most
    confident first; ``rounds`` times the members are re-chosen by the fitted scores and the Gaussians refitted.
    Scores are z-scored per expert over the fit inputs, so the argmax compares experts on one scale. An expert no
    fit input is routed to has nothing to fit, and takes no input."""
    experts = start.shape[1]
    scores, pseudo = start, None
    for _ in range(rounds + 1):
        routes = scores.argmax(dim=1)
        chosen = confident_rows(rows, routes, top_two_margin(scores), confident, experts)
        if pseudo is None:  # the starting rule's pseudo-labels, judged in the rows as self-training's are
            pseudo = (chosen, routes[chosen])
        members = [chosen[routes[chosen] == k] for k in range(experts)]
        fitted = [k for k in range(experts) if len(members[k])]
        z = standardise(torch.stack([relative_mahalanobis_scores(features[k], predictions[k], members[k], rows,
                                                                 shrinkage) for k in fitted], dim=1), rows)
        scores = torch.full((len(start), experts), float(z.min()) - 1)
        scores[:, fitted] = z
    return Routing(scores.argmax(dim=1), scores, *pseudo)
