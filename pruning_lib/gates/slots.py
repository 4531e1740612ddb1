"""Gate slots: where structured-pruning gates plug into a model.

Structured pruning methods (channel gates, L0 / hard-concrete gates, network slimming, block gates, ...)
all multiply a group of output channels by per-channel values ``z``.  Instead of each method rewriting
the architectures, every model in :mod:`pruning_lib.models` contains empty :class:`GateSlot` modules at the
places where such a multiplication is exact and meaningful, and describes its prunable channel groups with
:class:`ChannelGroup` records (returned by ``model.channel_groups()``).

Conventions
-----------
* A slot sits *after* the normalisation (BatchNorm) of its producer and *before* the activation (ReLU) and any
  max-pooling.  For gate values ``z >= 0`` this makes ``z`` foldable into the norm's affine parameters (or
  into the producer's weights when there is no norm): see :func:`pruning_lib.gates.compact`.
* An empty slot (``slot.gate is None``) is the identity, so a model's default forward is unchanged.
* A gate is any ``nn.Module`` that receives the feature map ``[N, C, ...]`` (or ``[N, C]`` after a Linear) and
  returns it multiplied by its gate values; :func:`scale_channels` does the broadcasting.
* A gate placed in a slot is a registered sub-module of the model: it appears in ``state_dict()``,
  ``parameters()`` (so the optimiser sees it), ``.to(device)`` and survives ``copy.deepcopy``.
* Residual networks also have one ``branch_slot`` per block (``model.residual_blocks()``) on the residual
  branch output, before the addition, for block-level gates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ChannelGroup",
    "GateSlot",
    "scale_channels",
    "set_gates",
    "set_block_gates",
    "clear_gates",
    "get_gates",
    "get_group",
    "slot_of",
]


@dataclass(frozen=True)
class ChannelGroup:
    """A set of output channels (conv) or units (linear) that can be pruned as a unit, one channel at a time.

    Attributes:
        name: stable, human-readable group name (e.g. ``"fc1"``, ``"conv3"``, ``"layer1.0.conv1"``).
        producer: module path (as in ``named_modules()``) of the ``Conv2d``/``Linear`` producing the channels.
        norm: path of the BatchNorm directly after the producer, or ``None``.
        slot: path of the :class:`GateSlot` where a gate multiplies these channels (after ``norm``, before
            the activation).
        consumers: paths of the layers whose *input* channels are these channels (``Conv2d``, ``Linear``, or a
            BatchNorm followed by a conv in pre-activation designs).
        spatial: input features per channel of a ``Linear`` consumer that follows a flatten (e.g. ``4 * 4 = 16``
            for LeNet-5's conv2 -> fc1); 1 otherwise.  Feature ``c * spatial + j`` of the consumer belongs to
            channel ``c`` (PyTorch's ``flatten`` of ``[N, C, H, W]`` is channel-major).
    """

    name: str
    producer: str
    norm: str | None
    slot: str
    consumers: tuple[str, ...]
    spatial: int = 1


class GateSlot(nn.Module):
    """Identity placeholder that applies ``self.gate`` when one is plugged in.

    Args:
        channels: number of channels of the tensor passing through (dim 1).  Gate constructors use it to size
            their parameters; :func:`pruning_lib.gates.compact` keeps it up to date.  For a residual
            ``branch_slot`` it is the branch's channel count even though a block gate is usually one scalar.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        # Registered (as None) so that assigning a module later makes it a proper sub-module.
        self.register_module("gate", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gate is None else self.gate(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def scale_channels(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Multiply ``x`` [N, C, *spatial] channel-wise by ``z``.

    ``z`` may have shape ``[C]`` (shared by the batch, e.g. deterministic test-time gates), ``[N, C]`` (one
    sample of gates per example, e.g. stochastic training-time gates), or be a scalar / ``[1]`` (block gates).
    ``z`` is only *viewed* to ``[1 or N, C, 1, ..., 1]``, so no copy of ``z`` or ``x`` is made besides the result.
    """
    if z.dim() == 0 or (z.dim() == 1 and z.numel() == 1):
        return x * z.reshape(())
    if x.dim() < 2:
        raise ValueError(f"scale_channels expects x of shape [N, C, ...], got {tuple(x.shape)}")
    extra = (1,) * (x.dim() - 2)
    if z.dim() == 1:
        if z.shape[0] != x.shape[1]:
            raise ValueError(f"z has {z.shape[0]} values but x has {x.shape[1]} channels")
        return x * z.view(1, -1, *extra)
    if z.dim() == 2:
        if z.shape[1] != x.shape[1] or z.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"z of shape {tuple(z.shape)} does not match x of shape {tuple(x.shape)}")
        return x * z.view(z.shape[0], z.shape[1], *extra)
    raise ValueError(f"z must have shape [C] or [N, C], got {tuple(z.shape)}")


def _groups_by_name(model: nn.Module) -> dict[str, ChannelGroup]:
    return {g.name: g for g in model.channel_groups()}


def get_group(model: nn.Module, name: str) -> ChannelGroup:
    """The :class:`ChannelGroup` of ``model`` called ``name`` (KeyError listing the valid names otherwise)."""
    groups = _groups_by_name(model)
    if name not in groups:
        raise KeyError(f"model has no channel group {name!r}; groups: {sorted(groups)}")
    return groups[name]


def slot_of(model: nn.Module, group: ChannelGroup | str) -> GateSlot:
    """The :class:`GateSlot` module of ``group`` (a :class:`ChannelGroup` or a group name)."""
    if isinstance(group, str):
        group = get_group(model, group)
    slot = model.get_submodule(group.slot)
    if not isinstance(slot, GateSlot):
        raise TypeError(f"{group.slot!r} is a {type(slot).__name__}, not a GateSlot")
    return slot


def set_gates(model: nn.Module, gates: dict[str, nn.Module]) -> nn.Module:
    """Plug ``gates[group_name]`` into the slot of each named channel group (replacing any previous gate).

    The gates become sub-modules of ``model`` (state_dict, parameters, deepcopy).  Returns ``model``.
    """
    groups = _groups_by_name(model)
    unknown = sorted(set(gates) - set(groups))
    if unknown:
        raise KeyError(f"unknown channel groups {unknown}; groups: {sorted(groups)}")
    for name, gate in gates.items():
        slot_of(model, groups[name]).gate = gate
    return model


def set_block_gates(model: nn.Module, gates: dict[str, nn.Module]) -> nn.Module:
    """Plug ``gates[block_path]`` into the ``branch_slot`` of each residual block (see ``residual_blocks()``)."""
    blocks = set(model.residual_blocks())
    unknown = sorted(set(gates) - blocks)
    if unknown:
        raise KeyError(f"unknown residual blocks {unknown}; blocks: {sorted(blocks)}")
    for path, gate in gates.items():
        model.get_submodule(path).branch_slot.gate = gate
    return model


def clear_gates(model: nn.Module) -> nn.Module:
    """Empty every :class:`GateSlot` of ``model`` (channel and block slots).  Returns ``model``."""
    for module in model.modules():
        if isinstance(module, GateSlot):
            module.gate = None
    return model


def get_gates(model: nn.Module) -> dict[str, nn.Module]:
    """The gates currently plugged into channel-group slots, by group name (empty slots are omitted)."""
    out = {}
    for group in model.channel_groups():
        gate = slot_of(model, group).gate
        if gate is not None:
            out[group.name] = gate
    return out
