"""Vanilla averaging and OTFusion (Singh & Jaggi 2020): align neurons by exact optimal transport, then average."""
from __future__ import annotations

from typing import Sequence

import importlib.util

import torch
from torch import Tensor

from archs.mlp import MLP
from fusion._common import Layers, check_parents, flat_samples, layers_of, mean_layers, pre_acts, to_mlp

EMD_MAX_ITER = 10_000_000  # POT's default (1e5) can stop early on 400-neuron layers; the result is then not optimal


def vanilla_avg(parents: Sequence[MLP]) -> MLP:
    """Parameter-wise mean of parents with identical widths (no alignment of neurons)."""
    check_parents(parents, "vanilla_avg", same_widths=True)
    return to_mlp(parents[0], parents[0].widths, mean_layers([layers_of(p) for p in parents]))


def _emd_transport(cost: Tensor) -> Tensor:
    """Exact EMD plan between uniform marginals, each column scaled to sum to 1.

    Column j then holds the convex combination of the parent's neurons that becomes anchor neuron j;
    between layers of equal width the plan is a permutation (a vertex of the Birkhoff polytope).
    """
    import ot  # imported here: the rest of the project runs where POT is not installed (POT_MISSING says so)

    plan = torch.from_numpy(ot.emd(ot.unif(cost.shape[0]), ot.unif(cost.shape[1]), cost.numpy(),
                                   numItermax=EMD_MAX_ITER))
    return plan / plan.sum(0)


def _pot_installed() -> bool:
    try:
        return importlib.util.find_spec("ot") is not None
    except ValueError:  # sys.modules["ot"] set to None: as good as missing
        return False


HAS_POT = _pot_installed()
POT_MISSING = ("POT is not installed, and OTFusion and CLAFusion align neurons with its exact EMD: pip install POT "
               "(pinned in requirements.txt)")


def _with_bias(w: Tensor, b: Tensor | None) -> Tensor:
    return w if b is None else torch.cat([w, b[:, None]], 1)


def _ot_align(layers: Layers, anchor: Layers, acts: list[Tensor] | None = None,
              anchor_acts: list[Tensor] | None = None) -> Layers:
    """``layers`` re-expressed in ``anchor``'s neuron basis; weight cost, or activation cost when acts are given."""
    aligned: Layers = []
    transport = None  # the inputs are shared, so the first layer's columns need no transport
    for i, ((w, b), (anchor_w, anchor_b)) in enumerate(zip(layers, anchor)):
        if transport is not None:
            w = w @ transport  # incoming weights re-expressed in the anchor's previous-layer basis
        if i == len(layers) - 1:
            aligned.append((w, b))  # output neurons are the classes, already aligned
            break
        if acts is None:
            points, anchor_points = _with_bias(w, b), _with_bias(anchor_w, anchor_b)
        else:
            points, anchor_points = acts[i].T, anchor_acts[i].T
        # exact distances: the matrix-product shortcut leaves ~1e-8 where identical neurons should give 0
        cost = torch.cdist(points, anchor_points, compute_mode="donot_use_mm_for_euclid_dist")
        transport = _emd_transport(cost)
        aligned.append((transport.T @ w, None if b is None else transport.T @ b))
    return aligned


def otfusion(parents: Sequence[MLP], samples: Tensor | None = None, cost: str = "weight", anchor: int = 0) -> MLP:
    """OTFusion: align every parent to ``parents[anchor]`` by exact OT, layer by layer, then average.

    ``cost="weight"`` compares neurons by their incoming weights (bias as an extra column), after the
    previous layer's transport; ``cost="activation"`` by their pre-activations on ``samples``, each
    parent run through its own network. Widths may differ; the fused MLP has the anchor's widths.
    """
    check_parents(parents, "otfusion", same_depth=True)
    if cost not in ("weight", "activation"):
        raise ValueError(f"otfusion cost must be 'weight' or 'activation', got {cost!r}")
    if cost == "activation" and samples is None:
        raise ValueError("otfusion with cost='activation' needs samples")
    if not 0 <= anchor < len(parents):
        raise ValueError(f"anchor={anchor} is not a parent index (0..{len(parents) - 1})")
    anchor_layers = layers_of(parents[anchor])
    x = flat_samples(parents[anchor], samples) if cost == "activation" else None
    anchor_acts = None if x is None else pre_acts(anchor_layers, x)
    aligned = []
    for k, parent in enumerate(parents):
        layers = layers_of(parent)
        if k == anchor:
            aligned.append(layers)
        else:
            aligned.append(_ot_align(layers, anchor_layers, None if x is None else pre_acts(layers, x), anchor_acts))
    return to_mlp(parents[anchor], parents[anchor].widths, mean_layers(aligned))
