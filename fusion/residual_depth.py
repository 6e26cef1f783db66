"""CLAFusion (Nguyen et al. 2022) of ResNets of different depths (a ResNet34 with a ResNet18): align blocks, deepen
the shallower network with identity blocks, then OTFusion (fusion/residual.py).

Blocks are aligned stage by stage, so that every block keeps its resolution and width: within a stage, the
shallower network's blocks map to the deeper one's by a least-cost strictly increasing map that sends the
first block (the one that may change resolution and width) to the first (dynamic programming). A block's cost
is 1 - linear CKA of the two blocks' outputs on the samples (``cost="cka"``), or, as for chains of levels,
their relative width difference (``"width"``: 0 within a stage, so the first blocks of the map win). Each
unmatched position gets an identity block: its second convolution (and norm) is zero, so it computes
relu(x + 0) = x on the non-negative output of the block before it; its first convolution copies the stream
(an identity kernel), which gives activation-cost alignment a signal there.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from archs.resnet import LAYOUTS, BasicBlock, ResNet
from fusion.cka import linear_cka
from fusion.depths import deep_first
from fusion.residual import AlignedStates, align_by_ot, check_resnets, plan_of, space_activations


def stage_blocks(model: ResNet) -> list[list[int]]:
    """Indices into ``model.blocks`` of each stage's blocks."""
    out, start = [], 0
    for count in LAYOUTS[model.depth]:
        out.append(list(range(start, start + count)))
        start += count
    return out


def block_outputs(model: ResNet, x: Tensor) -> list[Tensor]:
    """Every block's output (after its final ReLU) on ``x``."""
    names = [f"body.{i}" for i, m in enumerate(model.body) if isinstance(m, BasicBlock)]
    acts = space_activations(model, x, plan_of(model), names)
    return [acts[name] for name in names]


def block_cost(deep: ResNet, shallow: ResNet, samples: Tensor | None, kind: str = "cka") -> list[Tensor]:
    """Per stage, ``[shallow blocks, deep blocks]``: the cost of matching each shallow block to each deep one."""
    if kind not in ("cka", "width"):
        raise ValueError(f"block cost kind must be 'cka' or 'width', got {kind!r}")
    if kind == "width":  # one width per stage: a constant per stage
        return [torch.full((len(si), len(dj)), abs(s - d) / max(s, d), dtype=torch.float64)
                for si, dj, s, d in zip(stage_blocks(shallow), stage_blocks(deep), shallow.stage_widths,
                                        deep.stage_widths)]
    if samples is None:
        raise ValueError("block costs with kind='cka' need samples")
    x = samples.detach().double().cpu()
    deep_out, shallow_out = block_outputs(deep, x), block_outputs(shallow, x)
    return [torch.tensor([[1 - linear_cka(shallow_out[i], deep_out[j]) for j in dj] for i in si], dtype=torch.float64)
            for si, dj in zip(stage_blocks(shallow), stage_blocks(deep))]


def align_blocks(cost: Tensor) -> list[int]:
    """Least-cost strictly increasing map a: [n] -> [m] with a[0] = 0 (dynamic programming); n <= m."""
    n, m = cost.shape
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m shallow/deep blocks in a stage, got cost of shape {[n, m]}")
    best = torch.full((n, m), float("inf"), dtype=torch.float64)  # best[i, j]: blocks 0..i mapped, a[i] = j
    came_from = torch.zeros((n, m), dtype=torch.long)
    best[0, 0] = cost[0, 0]
    for i in range(1, n):
        for j in range(i, m - (n - 1 - i)):
            prev = int(best[i - 1, :j].argmin())
            best[i, j] = best[i - 1, prev] + cost[i, j]
            came_from[i, j] = prev
    mapping = [int(best[n - 1].argmin())]
    for i in range(n - 1, 0, -1):
        mapping.append(int(came_from[i, mapping[-1]]))
    return mapping[::-1]


def make_identity(block: BasicBlock) -> None:
    """Turn an identity-skip ``block`` into the identity on non-negative inputs (its residual branch is zero)."""
    width = block.conv1.out_channels
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv1.weight[:, :, 1, 1] = torch.eye(width)
        block.conv2.weight.zero_()
        for conv in (block.conv1, block.conv2):
            if conv.bias is not None:
                conv.bias.zero_()
        for norm, scale in ((block.bn1, 1.0), (block.bn2, 0.0)):
            if isinstance(norm, nn.BatchNorm2d):
                norm.reset_running_stats()
                norm.running_var.fill_(1 - norm.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
                norm.weight.fill_(scale)
                norm.bias.zero_()


def deepen(model: ResNet, depth: int, mapping: Sequence[Sequence[int]]) -> ResNet:
    """A ResNet of ``depth`` computing ``model``'s function: stage s's block i moves to position
    ``mapping[s][i]`` of that stage (``mapping[s][0]`` must be 0), identity blocks fill the other positions."""
    deep = ResNet(model.in_channels, model.num_classes, depth, model.width, model.batch_norm, model.bias)
    param = next(model.parameters())
    deep.to(device=param.device, dtype=param.dtype)
    own, new = model.blocks, deep.blocks
    for stage, (positions, blocks, targets) in enumerate(zip(mapping, stage_blocks(model), stage_blocks(deep))):
        if len(positions) != len(blocks) or positions[0] != 0 or list(positions) != sorted(set(positions)) \
                or positions[-1] >= len(targets):
            raise ValueError(f"stage {stage}: mapping {list(positions)} must send {len(blocks)} blocks to strictly "
                             f"increasing positions below {len(targets)}, the first to 0")
        for p, target in enumerate(targets):
            if p in positions:
                new[target].load_state_dict(own[blocks[list(positions).index(p)]].state_dict())
            else:
                make_identity(new[target])
    for source, target in ((model.body[0], deep.body[0]), (model.body[1], deep.body[1]), (model.fc, deep.fc)):
        target.load_state_dict(source.state_dict())
    return deep.eval()


def clafusion(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
              ot_cost: str = "activation", target: int | None = None) -> ResNet:
    """CLAFusion of two ResNets: ``align_across_blocks``, then average."""
    return align_across_blocks(parents, samples, cost, ot_cost, target).network()


def align_across_blocks(parents: Sequence[nn.Module], samples: Tensor | None, cost: str = "cka",
                        ot_cost: str = "activation", target: int | None = None) -> AlignedStates:
    """CLAFusion's alignment of two ResNets: align blocks stage by stage, deepen the shallower one, align both by
    OT to parent ``target`` (None: the deeper one), whose widths the fused network takes, at the deeper depth.
    Equal depths go straight to OT alignment, with ``parents[0]`` as anchor unless ``target`` says otherwise."""
    check_resnets(parents, "clafusion", count=2, same_depth=False)
    order, anchor = deep_first(parents, lambda p: p.depth, target)
    deep, shallow = (parents[k] for k in order)
    if shallow.depth != deep.depth:
        mapping = [align_blocks(c) for c in block_cost(deep, shallow, samples, cost)]
        shallow = deepen(shallow, deep.depth, mapping)
    return align_by_ot([deep, shallow], samples, cost=ot_cost, anchor=anchor)
