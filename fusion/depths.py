"""CLAFusion's two parents ordered by depth (chains and ResNets alike), and which one's widths the fusion takes."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn


def deep_first(parents: Sequence[nn.Module], depth: Callable[[nn.Module], int],
               target: int | None) -> tuple[list[int], int]:
    """The two parents' indices, the deeper first (equal depths keep their order), and the position in that order
    of the parent whose widths the fused network takes: ``target`` (a parent index), or the deeper one if None."""
    if target is not None and not 0 <= target < len(parents):
        raise ValueError(f"target={target} is not a parent index (0..{len(parents) - 1})")
    order = sorted(range(len(parents)), key=lambda k: -depth(parents[k]))  # stable
    return order, 0 if target is None else order.index(target)
