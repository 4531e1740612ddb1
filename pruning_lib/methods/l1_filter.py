"""L1-norm filter pruning (Li et al. 2017, "Pruning filters for efficient ConvNets", ICLR, Sec. 3.1).

Each filter (a conv's output channel, or a linear layer's unit) is scored by the sum of the absolute
values of its incoming weights, ``s_j = sum |F_j|``; the lowest-scoring filters of a layer are removed with
their feature maps and the matching input channels of the next layer, and the smaller network is
fine-tuned. Li et al. choose a rate per layer by sensitivity analysis; here one keep fraction is shared by
every channel group and chosen so that the compacted network has a requested FLOPs reduction
(:func:`keep_fraction_for_flops`), so the method can be placed on a compression axis.
"""
from __future__ import annotations

import torch
from torch import nn

from ..gates import compact
from ..metrics import layer_flops


def filter_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Group name -> L1 norm of each output channel's (unit's) incoming weights."""
    out = {}
    for g in model.channel_groups():
        w = model.get_submodule(g.producer).weight.detach()
        out[g.name] = w.abs().reshape(w.shape[0], -1).sum(1).cpu()
    return out


def keep_top(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per group, keep the ``max(1, round(fraction * C))`` highest-scoring channels (ties by position)."""
    keep = {}
    for name, s in scores.items():
        k = max(1, min(len(s), int(round(fraction * len(s)))))
        order = torch.sort(-s, stable=True).indices
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[order[:k]] = True
        keep[name] = mask
    return keep


def flops(model: nn.Module, input_shape) -> int:
    return int(sum(layer_flops(model, tuple(input_shape)).values()))


def keep_fraction_for_flops(model: nn.Module, input_shape, reduction: float, iterations: int = 30) -> float:
    """The shared keep fraction whose compacted network has ``dense FLOPs / reduction`` FLOPs or fewer,
    closest to it (bisection on the fraction; FLOPs counted on the compacted network)."""
    target = flops(model, input_shape) / reduction
    scores = filter_scores(model)
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if flops(compact(model, keep_top(scores, mid)), input_shape) > target:
            hi = mid
        else:
            lo = mid
    return lo


def prune(model: nn.Module, input_shape, reduction: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The compacted network keeping the highest-L1 filters of every group at the shared fraction that
    reduces FLOPs ``reduction`` times, and the kept channels (group -> bool mask)."""
    fraction = keep_fraction_for_flops(model, input_shape, reduction)
    keep = keep_top(filter_scores(model), fraction)
    return compact(model, keep), keep
