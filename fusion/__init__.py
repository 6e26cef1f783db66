"""Weight-space fusion (docs/design.md section 8): parents in, one new network out; the parents are never changed.

This package's functions are the one entry point: each takes chains of levels (MLPs, VGGs, LeNet5s) and ResNets
alike and sends them to the module that fuses that family.

- ``vanilla_avg``: parameter-wise mean of identical architectures.
- ``otfusion`` (Singh & Jaggi 2020): align every parent's neurons to an anchor's with exact optimal
  transport, layer by layer, then average.
- ``clafusion`` (Nguyen et al. 2022): parents of different depths; align their hidden layers by
  dynamic programming, insert identity layers into the shallower one, then ``otfusion``.
- Neuron interpolation (Luenam et al. 2025): ``hungarian_fusion`` (HF, two parents), ``kf_linear``
  and ``kf_gradient`` (KF, any number), with uniform or conductance importance.
- Ensembles of the parents' outputs, the baseline fusion has to beat (``ensemble.py``).

Modules, lowest first (none imports one above it, none imports this package):

- primitives: ``levels.py`` (a chain as a list of levels: a Linear or Conv2d, its ReLU, maybe a max-pool; how a
  level's alignment moves the next level's input channels, across the flatten too), ``ot.py`` (exact OT plans),
  ``grouping.py`` (Hungarian and k-means groups, group targets), ``fitting.py`` (least squares, Adam),
  ``cka.py`` (linear CKA), ``finetuning.py``, ``ensemble.py``;
- chains: ``transport.py`` (averaging, OTFusion), ``interpolation.py`` (HF, KF, importance), ``cross_layer.py``
  (CLAFusion);
- ResNets (docs/fusion_resnet.md): ``residual.py`` (channel spaces, averaging, OTFusion, batch-norm statistics),
  ``residual_fit.py`` (HF and KF, a block as a level), ``residual_depth.py`` (CLAFusion with identity blocks).

A chain's channel is a neuron, and neurons are compared through their incoming weights (a kernel flattened) or
their pre-activations (before the ReLU) on a few hundred samples (a channel's at every position, or averaged over
positions). Parents read the same inputs and predict the same classes.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from fusion import cross_layer, interpolation, residual, residual_depth, residual_fit, transport
from fusion.cka import linear_cka
from fusion.cross_layer import align_layers, insert_identity_layers, layer_cost_matrix, stages
from fusion.ensemble import class_share_weights, ensemble_softmax
from fusion.finetuning import finetune
from fusion.interpolation import conductance_importance, uniform_importance
from fusion.levels import FUSABLE
from fusion.ot import HAS_POT, POT_MISSING
from fusion.residual import is_resnet, recompute_norm_statistics

Importance = Sequence[Sequence[Tensor]] | None


def vanilla_avg(parents: Sequence[nn.Module]) -> nn.Module:
    """Parameter-wise mean of parents with identical widths and layers (no alignment of neurons)."""
    return (residual if is_resnet(parents) else transport).vanilla_avg(parents)


def otfusion(parents: Sequence[nn.Module], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0,
             positions: str = "flatten") -> nn.Module:
    """OTFusion onto ``parents[anchor]``'s widths (``transport.otfusion``; ResNets: ``residual.otfusion``, a block's
    output sharing its skip's transport)."""
    return (residual if is_resnet(parents) else transport).otfusion(parents, samples, cost, anchor, positions)


def clafusion(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
              ot_cost: str = "activation") -> nn.Module:
    """CLAFusion of two parents of any depths (``cross_layer.clafusion``; ResNets: ``residual_depth.clafusion``)."""
    return (residual_depth if is_resnet(parents) else cross_layer).clafusion(parents, samples, cost, ot_cost)


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
                seed: int = 0, positions: str = "flatten", ridge: float = 0.0) -> nn.Module:
    """KF-gradient (``interpolation.kf_gradient``; ResNets: ``residual_fit.kf_gradient``, where it differs from
    KF-linear)."""
    module = residual_fit if is_resnet(parents) else interpolation
    return module.kf_gradient(parents, samples, importance, widths, steps, lr, seed, positions, ridge)


__all__ = [
    "FUSABLE", "HAS_POT", "POT_MISSING", "align_layers", "class_share_weights", "clafusion", "conductance_importance",
    "ensemble_softmax", "finetune", "hungarian_fusion", "insert_identity_layers", "kf_gradient", "kf_linear",
    "layer_cost_matrix", "linear_cka", "otfusion", "recompute_norm_statistics", "stages", "uniform_importance",
    "vanilla_avg",
]
