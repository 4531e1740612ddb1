"""Gates: where structured-pruning gates plug into a model, how a gated model is cut down, and the families.

* :mod:`.slots`: the :class:`GateSlot` s every model carries and its :class:`ChannelGroup` records;
* :mod:`.compaction`: :func:`compact`, the physically smaller network equal to the gated one in eval;
* :mod:`.families`: the one protocol every gate family meets (:class:`~.families.GateFamily`), and its
  registry (``families.get(name)``, ``families.names()``).

The names of :mod:`.slots` and :mod:`.compaction` are importable from here.
"""
from .compaction import ResidualShortcut, compact, remove_blocks
from .slots import (ChannelGroup, GateSlot, clear_gates, get_gates, get_group, scale_channels, set_block_gates,
                    set_gates, slot_of)
from . import families

__all__ = ["ChannelGroup", "GateSlot", "scale_channels", "set_gates", "set_block_gates", "clear_gates",
           "get_gates", "get_group", "slot_of", "compact", "remove_blocks", "ResidualShortcut", "families"]
