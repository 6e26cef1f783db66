"""Exact optimal transport between two sets of neurons (channels), the primitive OTFusion and CLAFusion align with.

POT is an optional dependency here: the rest of the project runs where it is not installed (``POT_MISSING`` says
what to do), so it is imported only when a plan is solved.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import Tensor

from fusion.levels import POSITIONS

EMD_MAX_ITER = 10_000_000  # POT's default (1e5) can stop early on 400-neuron layers; the result is then not optimal


def _pot_installed() -> bool:
    try:
        return importlib.util.find_spec("ot") is not None
    except ValueError:  # sys.modules["ot"] set to None: as good as missing
        return False


HAS_POT = _pot_installed()
POT_MISSING = ("POT is not installed, and OTFusion and CLAFusion align neurons with its exact EMD: pip install POT "
               "(pinned in requirements.txt)")


def distances(points: Tensor, anchor_points: Tensor) -> Tensor:
    """``[P, A]`` Euclidean distances between rows; exact: the matrix-product shortcut leaves ~1e-8 where identical
    neurons should give 0, and OT ties would then be broken by rounding."""
    return torch.cdist(points, anchor_points, compute_mode="donot_use_mm_for_euclid_dist")


def emd_transport(cost: Tensor) -> Tensor:
    """Exact EMD plan between uniform marginals, each column scaled to sum to 1.

    Column j then holds the convex combination of the parent's neurons that becomes anchor neuron j;
    between layers of equal width the plan is a permutation (a vertex of the Birkhoff polytope).
    """
    import ot

    plan = torch.from_numpy(ot.emd(ot.unif(cost.shape[0]), ot.unif(cost.shape[1]), cost.numpy(),
                                   numItermax=EMD_MAX_ITER))
    return plan / plan.sum(0)


def check_otfusion_args(parents: Sequence[object], samples: Tensor | None, cost: str, anchor: int,
                        positions: str) -> None:
    """The arguments every OTFusion (chains of levels or ResNets) accepts, checked before any work."""
    if cost not in ("weight", "activation"):
        raise ValueError(f"otfusion cost must be 'weight' or 'activation', got {cost!r}")
    if positions not in POSITIONS:
        raise ValueError(f"otfusion positions must be one of {POSITIONS}, got {positions!r}")
    if cost == "activation" and samples is None:
        raise ValueError("otfusion with cost='activation' needs samples")
    if not 0 <= anchor < len(parents):
        raise ValueError(f"anchor={anchor} is not a parent index (0..{len(parents) - 1})")
