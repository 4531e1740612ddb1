"""Turn a gated / masked model into a physically smaller one ("compaction").

Structured pruning methods end with, per channel group, a boolean ``keep`` mask and, for gate-based methods,
the deterministic test-time gate value ``z >= 0`` of every channel.  :func:`compact` removes the dropped
channels from the producer, its norm and its consumers, and folds ``z`` into the remaining weights, so that

    compact(model, keep, scale)(x) == model_with_gates(x)        (eval mode)

where ``model_with_gates`` has in each slot a gate multiplying by ``scale * keep``.  Folding is exact because
slots sit after the norm and before the ReLU / max-pool: for ``z >= 0``, ``z * BN(x) = BN'(x)`` with affine
``(z * gamma, z * beta)``, and ``relu(z * a) = z * relu(a)``, ``maxpool(z * a) = z * maxpool(a)``.

Policy for a group whose ``keep`` is all False: the layer is not removed (that would disconnect the network,
and PyTorch layers with zero channels are poorly supported); instead the first channel is kept with a folded
gate value of 0, which is exactly what the gated model computes (a zero feature map), and a ``UserWarning``
is issued.  The compact model therefore has at least one channel per group.
"""
from __future__ import annotations

import copy
import warnings
from typing import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .slots import ChannelGroup, GateSlot, clear_gates

__all__ = ["compact", "remove_blocks", "ResidualShortcut"]


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def _slice_norm(norm: _BatchNorm, idx: torch.Tensor) -> None:
    if norm.affine:
        norm.weight = _new_param(norm.weight, norm.weight.detach().index_select(0, idx))
        norm.bias = _new_param(norm.bias, norm.bias.detach().index_select(0, idx))
    if norm.track_running_stats and norm.running_mean is not None:
        norm.running_mean = norm.running_mean.index_select(0, idx)
        norm.running_var = norm.running_var.index_select(0, idx)
    norm.num_features = int(idx.numel())


def _check_dense_conv(conv: nn.Module, path: str) -> None:
    if isinstance(conv, nn.modules.conv._ConvNd) and conv.groups != 1:
        raise NotImplementedError(f"{path}: compaction of grouped convolutions (groups={conv.groups})")


def _out_size(module: nn.Module, path: str) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    raise TypeError(f"producer {path!r} is a {type(module).__name__}, expected a Conv or Linear layer")


def _slice_producer(module: nn.Module, idx: torch.Tensor) -> None:
    module.weight = _new_param(module.weight, module.weight.detach().index_select(0, idx))
    if module.bias is not None:
        module.bias = _new_param(module.bias, module.bias.detach().index_select(0, idx))
    if isinstance(module, nn.Linear):
        module.out_features = int(idx.numel())
    else:
        module.out_channels = int(idx.numel())


def _slice_consumer(module: nn.Module, path: str, idx: torch.Tensor, n_channels: int, spatial: int) -> None:
    if isinstance(module, _BatchNorm):  # pre-activation designs: BN (then conv) consumes the channels
        if module.num_features != n_channels:
            raise ValueError(f"consumer {path!r} has {module.num_features} features, expected {n_channels}")
        _slice_norm(module, idx)
    elif isinstance(module, nn.modules.conv._ConvNd):
        _check_dense_conv(module, path)
        if module.in_channels != n_channels:
            raise ValueError(f"consumer {path!r} has {module.in_channels} in-channels, expected {n_channels}")
        module.weight = _new_param(module.weight, module.weight.detach().index_select(1, idx))
        module.in_channels = int(idx.numel())
    elif isinstance(module, nn.Linear):
        if module.in_features != n_channels * spatial:
            raise ValueError(
                f"consumer {path!r} has {module.in_features} in-features, expected {n_channels} x {spatial}"
            )
        # After a channel-major flatten, channel c owns features c*spatial ... c*spatial + spatial-1.
        cols = (idx[:, None] * spatial + torch.arange(spatial, device=idx.device)).reshape(-1)
        module.weight = _new_param(module.weight, module.weight.detach().index_select(1, cols))
        module.in_features = int(cols.numel())
    else:
        raise TypeError(f"consumer {path!r} is a {type(module).__name__}; expected Conv, Linear or BatchNorm")


def _fold_scale(producer: nn.Module, norm: _BatchNorm | None, z: torch.Tensor, name: str) -> None:
    """Multiply the group's output by ``z`` [C] through the norm's affine, or the producer's rows if no norm."""
    if norm is not None:
        if not norm.affine:
            raise ValueError(f"group {name!r}: cannot fold a scale into a non-affine norm")
        norm.weight.mul_(z)
        norm.bias.mul_(z)
    else:
        producer.weight.mul_(z.view(-1, *([1] * (producer.weight.dim() - 1))))
        if producer.bias is not None:
            producer.bias.mul_(z)


def compact(
    model: nn.Module,
    keep: Mapping[str, torch.Tensor],
    scale: Mapping[str, torch.Tensor] | None = None,
    block_scale: Mapping[str, torch.Tensor | float] | None = None,
) -> nn.Module:
    """Return a physically smaller deep copy of ``model``; ``model`` itself is not modified.

    Args:
        model: a :class:`~pruning_lib.models.PrunableModel` (gates in its slots, if any, are ignored).
        keep: group name -> bool mask ``[C]`` of channels to keep (float 0/1 masks are accepted).
        scale: group name -> deterministic gate value ``z >= 0`` per channel, shape ``[C]`` (the full,
            un-pruned channel count), folded exactly into the norm's affine (or the producer's weights and
            bias when there is no norm).  A group may appear in ``scale`` without ``keep`` (nothing removed).
        block_scale: residual block path -> value of its block gate (scalar, or ``[C]`` per branch channel),
            folded into the branch's last BN (``block.branch_norm``); any sign is exact since the branch gate
            sits before the addition.  Blocks are never removed.

    Returns:
        a new model, with every Conv/Linear/BN attribute (``in_channels``, ``out_features``, ``num_features``,
        ...) consistent with its sliced tensors, every :class:`GateSlot` empty (their ``channels`` updated),
        and the same ``channel_groups()``.  Compaction is applied to parameters and BN buffers, so the result
        equals the gated model in eval mode (in train mode BN batch statistics make it differ anyway).

    A group whose mask is all False keeps its first channel with a folded value of 0 (see module doc).
    """
    scale = dict(scale or {})
    groups: dict[str, ChannelGroup] = {g.name: g for g in model.channel_groups()}
    unknown = sorted((set(keep) | set(scale)) - set(groups))
    if unknown:
        raise KeyError(f"unknown channel groups {unknown}; groups: {sorted(groups)}")
    blocks = set(model.residual_blocks()) if hasattr(model, "residual_blocks") else set()
    unknown = sorted(set(block_scale or {}) - blocks)
    if unknown:
        raise KeyError(f"unknown residual blocks {unknown}; blocks: {sorted(blocks)}")

    new = copy.deepcopy(model)
    clear_gates(new)
    with torch.no_grad():
        for name in sorted(set(keep) | set(scale), key=list(groups).index):
            group = groups[name]
            producer = new.get_submodule(group.producer)
            _check_dense_conv(producer, group.producer)
            n = _out_size(producer, group.producer)
            device = producer.weight.device
            mask = keep.get(name)
            mask = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
            if mask.shape != (n,):
                raise ValueError(f"keep[{name!r}] has shape {tuple(mask.shape)}, expected ({n},)")
            z = scale.get(name)
            if z is not None:
                z = z.detach().to(device=device, dtype=producer.weight.dtype).reshape(-1)
                if z.shape != (n,):
                    raise ValueError(f"scale[{name!r}] has shape {tuple(z.shape)}, expected ({n},)")
                if (z < 0).any():
                    raise ValueError(f"scale[{name!r}] has negative values: folding is only exact for z >= 0")
            if not mask.any():
                warnings.warn(
                    f"compact: group {name!r} keeps no channel; keeping one channel with gate value 0 "
                    "(an all-zero feature map, as in the gated model)",
                    UserWarning,
                    stacklevel=2,
                )
                mask = torch.zeros_like(mask)
                mask[0] = True
                z = torch.zeros(n, dtype=producer.weight.dtype, device=device)
            idx = mask.nonzero().reshape(-1)
            norm = new.get_submodule(group.norm) if group.norm is not None else None

            if idx.numel() < n:
                _slice_producer(producer, idx)
                if norm is not None:
                    if norm.num_features != n:
                        raise ValueError(f"norm {group.norm!r} has {norm.num_features} features, expected {n}")
                    _slice_norm(norm, idx)
                for path in group.consumers:
                    _slice_consumer(new.get_submodule(path), path, idx, n, group.spatial)
            if z is not None:
                _fold_scale(producer, norm, z.index_select(0, idx), name)
            slot = new.get_submodule(group.slot)
            if isinstance(slot, GateSlot):
                slot.channels = int(idx.numel())

        for path, value in (block_scale or {}).items():
            block = new.get_submodule(path)
            bn = block.get_submodule(block.branch_norm)
            z = torch.as_tensor(value, dtype=bn.weight.dtype, device=bn.weight.device).reshape(-1)
            bn.weight.mul_(z)
            bn.bias.mul_(z)
    return new


class ResidualShortcut(nn.Module):
    """A residual block whose branch was removed: ``relu(shortcut(x))``.

    This is exactly what a block computes when its branch output is multiplied by a block gate of 0
    (``relu(0 * branch(x) + shortcut(x))``).  It keeps the block's ``downsample`` (1x1 conv + BN, or None)
    and has no prunable channel groups (``inner_groups`` returns ``[]``).
    """

    def __init__(self, downsample: nn.Module | None):
        super().__init__()
        self.downsample = downsample
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x if self.downsample is None else self.downsample(x))

    def inner_groups(self, prefix: str) -> list[ChannelGroup]:
        return []


def remove_blocks(model: nn.Module, paths) -> nn.Module:
    """Return a deep copy of ``model`` whose residual blocks at ``paths`` are replaced by their shortcut.

    Use after :func:`compact` (whose ``keep`` may then not name groups of removed blocks any more).  The result
    equals the model with a block gate of 0 on each removed block's ``branch_slot``.
    """
    blocks = set(model.residual_blocks()) if hasattr(model, "residual_blocks") else set()
    unknown = sorted(set(paths) - blocks)
    if unknown:
        raise KeyError(f"unknown residual blocks {unknown}; blocks: {sorted(blocks)}")
    new = copy.deepcopy(model)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = new.get_submodule(parent_path) if parent_path else new
        block = new.get_submodule(path)
        setattr(parent, child, ResidualShortcut(getattr(block, "downsample", None)))
    return new
