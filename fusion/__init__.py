"""Weight-space fusion (docs/design.md section 8): parents in, one new network out; the parents are never changed.

This package's functions are the one entry point: each takes chains of levels (MLPs, VGGs, LeNet5s) and ResNets
alike and sends them to the module that fuses that family.

- ``vanilla_avg``: parameter-wise mean of identical architectures.
- ``otfusion`` (Singh & Jaggi 2020): align every parent's neurons to an anchor's with exact optimal
  transport, layer by layer, then average.
- ``clafusion`` (Nguyen et al. 2022): parents of different depths; align their hidden layers by
  dynamic programming, insert identity layers into the shallower one, then ``otfusion``.
- Neuron interpolation (Luenam et al. 2025): ``hungarian_fusion`` (HF, two parents), ``kf_linear``
  and ``kf_gradient`` (KF, any number; its ``authors`` variant as Luenam et al. describe it), with uniform or
  conductance importance.
- ``rebasin`` (Ainsworth et al. 2023, Git Re-Basin's weight matching): permute every parent's neurons onto the
  first's by coordinate descent over linear assignments of weight inner products, then average.
- Ensembles of the parents' outputs, the baseline fusion has to beat (``ensemble.py``).
- Knowledge distillation of a teacher into a student (``distil.py``): CLAFusion's compression use starts the
  student from the teacher fused into the student's shape.

Averaging methods (vanilla averaging, OTFusion, CLAFusion) first align the parents (``align``), then average them;
``repaired`` averages them with REPAIR (Jordan et al. 2023): every fused channel renormalised to its aligned
parents' mean and standard deviation on the samples (``repair.py``, ``residual_repair.py``), and ``std_ratios`` is
the per-layer variance-collapse diagnostic it is judged by.

Modules, lowest first (none imports one above it, none imports this package):

- primitives: ``levels.py`` (a chain as a list of levels: a Linear or Conv2d, its ReLU, maybe a max-pool; how a
  level's alignment moves the next level's input channels, across the flatten too), ``ot.py`` (exact OT plans),
  ``grouping.py`` (Hungarian and k-means groups, group targets), ``fitting.py`` (least squares, Adam),
  ``cka.py`` (linear CKA), ``gradient.py`` (KF-gradient's refinements of a level), ``depths.py`` (CLAFusion's
  deeper parent and target), ``finetuning.py``, ``distil.py``, ``ensemble.py``;
- REPAIR: ``repair.py`` (chains; its statistics also serve ``residual_repair.py``);
- chains: ``transport.py`` (averaging, OTFusion), ``weight_matching.py`` (Git Re-Basin), ``interpolation.py`` (HF, KF,
  importance), ``cross_layer.py`` (CLAFusion);
- ResNets (docs/fusion_resnet.md): ``residual.py`` (channel spaces, averaging, OTFusion, batch-norm statistics),
  ``residual_fit.py`` (HF and KF, a block as a level), ``residual_depth.py`` (CLAFusion with identity blocks),
  ``residual_weight_matching.py`` (Git Re-Basin, a permutation per channel space), ``residual_repair.py`` (REPAIR).

A chain's channel is a neuron, and neurons are compared through their incoming weights (a kernel flattened) or
their pre-activations (before the ReLU) on a few hundred samples (a channel's at every position, or averaged over
positions). Parents read the same inputs and predict the same classes.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

import torch.nn as nn
from torch import Tensor

from fusion import (cross_layer, interpolation, repair, residual, residual_depth, residual_fit, residual_repair,
                    residual_weight_matching, transport, weight_matching)
from fusion.cka import linear_cka
from fusion.cross_layer import align_layers, insert_identity_layers, layer_cost_matrix, stages
from fusion.distil import Distilled, distil, kd_loss, reinitialised
from fusion.ensemble import class_share_weights, ensemble_softmax
from fusion.finetuning import finetune
from fusion.gradient import AuthorsGradient, output_kl, parents_mean_log_probs
from fusion.interpolation import conductance_importance, uniform_importance
from fusion.levels import FUSABLE, Aligned
from fusion.ot import HAS_POT, POT_MISSING
from fusion.residual import AlignedStates, is_resnet, reset_norm_statistics

Importance = Sequence[Sequence[Tensor]] | None


# the averaging methods' alignments, for chains and for ResNets; each takes (parents, samples, **options), but
# vanilla averaging reads no samples
ALIGNERS: dict[str, tuple[Callable[..., Aligned], Callable[..., AlignedStates]]] = {
    "vanilla_avg": (lambda parents, samples: transport.align_as_they_are(parents),
                    lambda parents, samples: residual.align_as_they_are(parents)),
    "otfusion": (transport.align_by_ot, residual.align_by_ot),
    "clafusion": (cross_layer.align_across_layers, residual_depth.align_across_blocks),
    "rebasin": (lambda parents, samples, **options: weight_matching.align_by_weight_matching(parents, **options),
                lambda parents, samples, **options:
                residual_weight_matching.align_by_weight_matching(parents, **options)),
}


def vanilla_avg(parents: Sequence[nn.Module]) -> nn.Module:
    """Parameter-wise mean of parents with identical widths and layers (no alignment of neurons)."""
    return (residual if is_resnet(parents) else transport).vanilla_avg(parents)


def otfusion(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
             positions: str = "flatten") -> nn.Module:
    """OTFusion onto ``parents[anchor]``'s widths (``transport.otfusion``; ResNets: ``residual.otfusion``, a block's
    output sharing its skip's transport)."""
    return (residual if is_resnet(parents) else transport).otfusion(parents, samples, cost, anchor, positions)


def clafusion(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
              ot_cost: str = "activation", target: int | None = None) -> nn.Module:
    """CLAFusion of two parents of any depths into parent ``target``'s widths (None: the deeper parent's;
    ``cross_layer.clafusion``; ResNets: ``residual_depth.clafusion``)."""
    return (residual_depth if is_resnet(parents) else cross_layer).clafusion(parents, samples, cost, ot_cost, target)


def rebasin(parents: Sequence[nn.Module], iterations: int = weight_matching.ITERATIONS, seed: int = 0) -> nn.Module:
    """Git Re-Basin weight matching of two or more parents of one architecture onto ``parents[0]``, then the average
    (``weight_matching.rebasin``; ResNets: ``residual_weight_matching.rebasin``, one permutation per channel space;
    ``seed``: the order levels or spaces are visited in)."""
    return (residual_weight_matching if is_resnet(parents) else weight_matching).rebasin(parents, iterations, seed)


def hungarian_fusion(parents: Sequence[nn.Module], samples: Tensor, importance: Importance = None,
                     match: str = "correlation", positions: str = "flatten", ridge: float = 0.0) -> nn.Module:
    """HF of two parents (``interpolation.hungarian_fusion``; ResNets: ``residual_fit.hungarian_fusion``)."""
    module = residual_fit if is_resnet(parents) else interpolation
    return module.hungarian_fusion(parents, samples, importance, match, positions, ridge)


def kf_linear(parents: Sequence[nn.Module], samples: Tensor, importance: Importance = None,
              widths: Sequence[int] | None = None, seed: int = 0, positions: str = "flatten",
              ridge: float = 0.0) -> nn.Module:
    """KF-linear of any number of parents (``interpolation.kf_linear``; ResNets: ``residual_fit.kf_linear``)."""
    module = residual_fit if is_resnet(parents) else interpolation
    return module.kf_linear(parents, samples, importance, widths, seed, positions, ridge)


def kf_gradient(parents: Sequence[nn.Module], samples: Tensor, importance: Importance = None,
                widths: Sequence[int] | None = None, steps: int | None = None, lr: float | None = None,
                seed: int = 0, positions: str = "flatten", ridge: float = 0.0,
                authors: AuthorsGradient | None = None) -> nn.Module:
    """KF-gradient (``interpolation.kf_gradient``; ResNets: ``residual_fit.kf_gradient``, where it differs from
    KF-linear); ``authors``: the neuron-interpolation authors' variant (``gradient.AuthorsGradient``, chains only)."""
    if not is_resnet(parents):
        return interpolation.kf_gradient(parents, samples, importance, widths, steps, lr, seed, positions, ridge,
                                         authors)
    if authors is not None:
        raise ValueError("kf_gradient: the authors' variant fits chains of levels (MLPs, VGGs, LeNet5s), not ResNets")
    return residual_fit.kf_gradient(parents, samples, importance, widths, steps, lr, seed, positions, ridge)


def align(method: str, parents: Sequence[nn.Module], samples: Tensor | None = None,
          **options: Any) -> Aligned | AlignedStates:
    """The parents aligned by averaging method ``method`` (``vanilla_avg``, ``otfusion``, ``clafusion``,
    ``rebasin``; ``options``: its other arguments), before the average: ``align(...).network()`` is the method's
    fused network."""
    if method not in ALIGNERS:
        raise ValueError(f"align: {method!r} is not an averaging method ({', '.join(ALIGNERS)})")
    chain, resnet = ALIGNERS[method]
    return (resnet if is_resnet(parents) else chain)(parents, samples, **options)


def _repair_module(alignment: Aligned | AlignedStates) -> ModuleType:
    return residual_repair if isinstance(alignment, AlignedStates) else repair


def std_ratios(network: nn.Module, alignment: Aligned | AlignedStates, samples: Tensor) -> list[float]:
    """Per layer, ``network``'s mean channel standard deviation on ``samples`` over its aligned parents' (Jordan
    et al.'s variance-collapse diagnostic: the fused network's is far under 1 where averaging collapsed it)."""
    return _repair_module(alignment).std_ratios(network, alignment, samples)


def repaired(alignment: Aligned | AlignedStates, samples: Tensor) -> tuple[nn.Module, dict[str, list[float]]]:
    """The aligned parents' average after REPAIR on ``samples``, and the per-layer std ratios before and after
    (``repair_std_ratio_before``, ``repair_std_ratio_after``: what a result row records)."""
    result = _repair_module(alignment).repair(alignment, samples)
    ratios = {"repair_std_ratio_before": result.ratio_before, "repair_std_ratio_after": result.ratio_after}
    return result.network, ratios


__all__ = [
    "FUSABLE", "HAS_POT", "POT_MISSING", "AuthorsGradient", "Distilled", "align", "align_layers",
    "class_share_weights", "clafusion", "conductance_importance", "distil", "ensemble_softmax", "finetune",
    "hungarian_fusion", "insert_identity_layers", "kd_loss", "kf_gradient", "kf_linear", "layer_cost_matrix",
    "linear_cka", "otfusion", "output_kl", "parents_mean_log_probs", "rebasin", "reinitialised", "repaired",
    "reset_norm_statistics", "stages", "std_ratios", "uniform_importance", "vanilla_avg",
]
