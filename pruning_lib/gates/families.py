"""Gate families: one protocol for every kind of structured-pruning gate, and a registry.

The structured methods of the book all plug a gate module into the model's :class:`~pruning_lib.gates.GateSlot`
s and differ only in what the gate is and how it is trained. A :class:`GateFamily` says, for one kind:

* ``attach(model, **options)``: put the gates in the slots (returns the model);
* ``gates(model)``: the gates, by name, in network order;
* ``gate_parameters(model)``: the parameters the gates' own optimizer updates; ``weight_parameters(model)``
  is every other parameter (the two are disjoint and together are ``model.parameters()``);
* ``penalty(model)``: the family's sparsity penalty at the current gates (a scalar tensor);
* ``calibrate(model, data)``: what must happen before ``decide`` (data-dependent gates fix their
  decisions on a split; the others need nothing);
* ``decide(model)``: ``(keep, scale)``: the channels each gated group keeps, and the deterministic gate value
  folded into them (``scale`` may be ``None``);
* ``compact(model)``: the physically smaller network that equals the gated model in eval mode.

Families register themselves with :func:`register`; :func:`get` and :func:`names` look them up. The
contract every family must meet (state_dict, deepcopy and pickle round trips; compacted = gated in eval)
is checked for every registered family by ``tests/test_families.py``, which also writes a small new family
to show what one costs.
"""
from __future__ import annotations

import torch
from torch import nn

from .compaction import compact as _compact
from .slots import get_gates

__all__ = ["GateFamily", "register", "get", "names", "attach"]

_REGISTRY: dict[str, "GateFamily"] = {}


class GateFamily:
    """One kind of gate. Subclasses set ``name`` and ``gate_type`` and implement :meth:`attach`; the
    defaults below cover gates that hold their own parameters and have a deterministic eval-mode value."""

    name: str = ""
    gate_type: type | tuple[type, ...] = nn.Module

    def attach(self, model: nn.Module, **options) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def gates(self, model: nn.Module) -> dict[str, nn.Module]:
        return {k: g for k, g in get_gates(model).items() if isinstance(g, self.gate_type)}

    def gate_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        seen, out = set(), []
        for gate in self.gates(model).values():
            for p in gate.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def weight_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        gate_ids = {id(p) for p in self.gate_parameters(model)}
        return [p for p in model.parameters() if id(p) not in gate_ids]

    def penalty(self, model: nn.Module) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def calibrate(self, model: nn.Module, data=None) -> None:
        """Nothing to do for gates whose eval-mode value does not depend on the input."""

    def decide(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def compact(self, model: nn.Module) -> nn.Module:
        keep, scale = self.decide(model)
        return _compact(model, keep, scale)

    def __repr__(self) -> str:
        return f"<gate family {self.name!r}>"


def register(family: GateFamily | type[GateFamily]) -> GateFamily:
    """Add ``family`` (an instance, or a class instantiated here) to the registry under its ``name``."""
    fam = family() if isinstance(family, type) else family
    if not fam.name:
        raise ValueError(f"{fam!r} has no name")
    if fam.name in _REGISTRY and type(_REGISTRY[fam.name]) is not type(fam):
        raise ValueError(f"a different gate family is already registered as {fam.name!r}")
    _REGISTRY[fam.name] = fam
    return fam


def get(name: str) -> GateFamily:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown gate family {name!r}; registered: {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def attach(name: str, model: nn.Module, **options) -> nn.Module:
    """``get(name).attach(model, **options)``."""
    return get(name).attach(model, **options)


# ---- the book's families --------------------------------------------------------------------------------

class _HardConcrete(GateFamily):
    """Shared by L0-HC and Dep-L0 (the gates differ in where ``log_alpha`` comes from)."""

    def _hc(self):
        from ..methods import hard_concrete

        return hard_concrete

    def gates(self, model):
        return self._hc()._hc_gates(model)

    def gate_parameters(self, model):
        return self._hc().gate_parameters(model)

    def penalty(self, model):
        """The expected number of open gates, sum of P(z != 0) (Louizos et al.'s L0 norm of the gates)."""
        probs = self._hc().gate_probabilities(model)
        return torch.stack([p.sum() for p in probs.values()]).sum()

    def decide(self, model):
        return self._hc().keep_and_scale(model)

    def compact(self, model):
        return self._hc().compact_gated(model)


class L0HC(_HardConcrete):
    name = "l0_hc"

    def attach(self, model, init: float = 3.0):
        self._hc().attach_l0_gates(model, init=init)
        return model


class DepL0(_HardConcrete):
    name = "dep_l0"

    def attach(self, model, direction: str = "forward", bias_init: float = 3.0):
        self._hc().attach_dep_l0_gates(model, direction, bias_init)
        return model


class Bernoulli(GateFamily):
    name = "bernoulli"

    def attach(self, model, init: float = 0.5):
        from ..methods import bernoulli

        bernoulli.attach_bernoulli_gates(model, init=init)
        return model

    def gates(self, model):
        from ..methods import bernoulli

        return bernoulli.bernoulli_gates(model)

    def penalty(self, model):
        """The expected number of kept units, sum of theta (the unit-cost term of the Bernoulli cost)."""
        return torch.stack([g.theta.clamp(0, 1).sum() for g in self.gates(model).values()]).sum()

    def decide(self, model):
        from ..methods import bernoulli

        return bernoulli.keep_and_scale(model)


class Polarization(GateFamily):
    """Per-input gates (Zhi et al. 2023): the eval-mode decision is the consensus over a data split, so
    :meth:`calibrate` must run first; it switches the gates to their static mask."""

    name = "polarization"

    def _pol(self):
        from ..methods import polarization

        return polarization

    def attach(self, model, block_gates: bool = True, init_bias: float = 1.0):
        self._pol().add_gating(model, block_gates=block_gates, init_bias=init_bias)
        return model

    def gates(self, model):
        return self._pol().gating_modules(model)

    def penalty(self, model):
        """The polarizer of the last forward's gate means (a forward pass must have run)."""
        return self._pol().polarization_penalty(model)

    def calibrate(self, model, data=None):
        if data is None:
            raise ValueError("polarization gates decide from data: calibrate(model, split) needs a split")
        pol = self._pol()
        pol.apply_static(model, pol.static_keep(pol.gate_statistics(model, data)))

    def decide(self, model):
        gms = self.gates(model)
        if any(gm.mode != "static" for gm in gms.values()):
            raise RuntimeError("polarization: call calibrate(model, split) before decide/compact")
        return {k: gm.static_mask > 0.5 for k, gm in gms.items()}, None

    def compact(self, model):
        keep, _ = self.decide(model)
        return self._pol().compact_static(model, keep)


_BUILTIN: tuple[type[GateFamily], ...] = (L0HC, DepL0, Bernoulli, Polarization)


def _load_builtin() -> None:
    for cls in _BUILTIN:
        if cls.name not in _REGISTRY:
            register(cls)
