"""KF-gradient's two ways of refining the least-squares fit of a level of a chain by gradient steps.

- ``LinearInit`` (this codebase's KF-gradient): Adam on the level's own loss (the importance-weighted MSE to its
  group targets) from the least-squares fit, keeping the best iterate. On a chain that fit already minimises the
  loss, so the result is KF-linear's (docs/fusion.md).
- ``AuthorsGradient`` (the gradient variant as the neuron-interpolation authors, Luenam et al. 2025, describe it;
  written here from that description): every level trained by its own Adam optimiser at its own learning rate (one
  for the hidden levels, one for the output level), from the least-squares fit optionally perturbed by Gaussian noise,
  ending at the last iterate; the output level is trained by knowledge distillation instead, towards the parents'
  mean output (KL(mean of the parents' softmax || softmax(fused logits)) on the fusion samples), not towards the group
  means of their logits. It can move away from KF-linear, which is its point: the parents' mean prediction, not
  their mean logit, is what the fused network should reproduce.

A refiner is asked per level (``refine(level, last)``) for a function ``(start parameters, loss) -> parameters``, or
None to keep the least-squares fit; ``output`` may then replace the fitted output level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.fitting import adam, best_of_adam
from fusion.levels import Level

Refine = Callable[[list[Tensor], Callable[..., Tensor]], list[Tensor]]
AUTHORS_STEPS = 200  # Adam steps per level (each a pass of one level over the fusion samples), as CHAIN_STEPS
# Not tuned here: a hidden level starts at the optimum of its own MSE (its least-squares fit), so small steps keep it
# near; the output level's distillation starts away from its optimum (the fit is to mean logits) and needs larger ones
AUTHORS_HIDDEN_LR = 1e-3
AUTHORS_LAST_LR = 1e-2


class Refiner:
    """No refinement: the least-squares fit of every level (HF, KF-linear)."""

    def refine(self, level: int, last: bool) -> Refine | None:
        return None

    def output(self, level: int, h: Tensor, fitted: Level, parent_logits: list[Tensor]) -> Level:
        """Output level ``level``, given its inputs ``h`` on the samples, its fit, and every parent's logits there."""
        return fitted


NO_REFINEMENT = Refiner()


@dataclass(frozen=True)
class LinearInit(Refiner):
    """This codebase's KF-gradient: ``steps`` of Adam at ``lr`` on every level's MSE, the best iterate kept."""

    steps: int
    lr: float

    def refine(self, level: int, last: bool) -> Refine | None:
        return lambda params, loss_of: best_of_adam(params, loss_of, self.steps, self.lr)


@dataclass(frozen=True)
class AuthorsGradient(Refiner):
    """The authors' KF-gradient: a fresh Adam per level at the level's rate, to the last iterate, from the perturbed
    fit; the output level distilled towards the parents' mean output (``distil``)."""

    steps: int = AUTHORS_STEPS
    hidden_lr: float = AUTHORS_HIDDEN_LR
    last_lr: float = AUTHORS_LAST_LR
    perturb: float = 0.0  # the noise's std, as a fraction of each start tensor's std (0: none)
    distil: bool = True  # the output level by KD towards the parents' mean output (else by its MSE, like the others)
    seed: int = 0  # seeds the perturbation, level by level

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.hidden_lr > 0 or not self.last_lr > 0 or not self.perturb >= 0:
            raise ValueError(f"the authors' KF-gradient needs steps >= 0, learning rates > 0 and perturb >= 0, got "
                             f"{self}")

    def perturbed(self, params: list[Tensor], level: int) -> list[Tensor]:
        """``params`` plus Gaussian noise of std ``perturb`` x each tensor's own std (a level's own stream)."""
        if not self.perturb:
            return params
        generator = torch.Generator().manual_seed(self.seed + level)  # a 63-bit seed plus a level stays in range
        return [p + self.perturb * p.std() * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

    def refine(self, level: int, last: bool) -> Refine | None:
        if last and self.distil:
            return None  # the output level is distilled instead (``output``)
        lr = self.last_lr if last else self.hidden_lr
        return lambda params, loss_of: adam(self.perturbed(params, level), loss_of, self.steps, lr)

    def output(self, level: int, h: Tensor, fitted: Level, parent_logits: list[Tensor]) -> Level:
        if not self.distil:
            return fitted
        h = h.flatten(1)
        target = parents_mean_log_probs(parent_logits)
        start = [fitted.weight] if fitted.bias is None else [fitted.weight, fitted.bias]

        def loss_of(w: Tensor, b: Tensor | None = None) -> Tensor:
            return output_kl(F.linear(h, w, b), target)

        w, *rest = adam(self.perturbed(start, level), loss_of, self.steps, self.last_lr)
        return fitted.with_weights(w, rest[0] if rest else None)


def output_kl(logits: Tensor, target_log_probs: Tensor) -> Tensor:
    """KL(target || softmax(logits)), averaged over samples: how far a network's prediction is from the target one."""
    return F.kl_div(F.log_softmax(logits, 1), target_log_probs, reduction="batchmean", log_target=True)


def parents_mean_log_probs(parent_logits: list[Tensor]) -> Tensor:
    """The log of the parents' mean softmax output (their mean prediction), per sample; through logsumexp, so a
    probability that underflows in one parent does not give log 0."""
    stacked = torch.stack([F.log_softmax(z, 1) for z in parent_logits])
    return torch.logsumexp(stacked, 0) - math.log(len(parent_logits))
