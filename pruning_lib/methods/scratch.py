"""Scratch-B (Liu et al. 2019, "Rethinking the value of network pruning", ICLR, Sec. 4).

The architecture a structured pruning method found (its compacted network) is trained from freshly
initialised weights with the same computation budget as the pruned model had: Scratch-B trains
``dense FLOPs / pruned FLOPs`` times as many steps as the method did (Scratch-E: the same number), capped
(Liu et al. cap the extra epochs on ImageNet at 2x). The question it asks: is what pruning keeps the
weights, or only the architecture?
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture (every layer's shape) with every parameter re-initialised by its layer's own
    ``reset_parameters``, drawn from ``seed``; batch-norm statistics reset too."""
    new = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and m is not new:
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return new


def scratch_b_steps(method_steps: int, dense_flops: float, pruned_flops: float, cap: float = 2.0) -> int:
    """Optimizer steps of Scratch-B: ``method_steps`` times the FLOPs reduction, at most ``cap`` times
    (``cap = 1`` gives Scratch-E)."""
    if cap < 1.0:
        raise ValueError(f"cap must be at least 1 (Scratch-E), got {cap}")
    factor = min(cap, max(1.0, dense_flops / max(pruned_flops, 1.0)))
    return int(math.ceil(method_steps * factor))
