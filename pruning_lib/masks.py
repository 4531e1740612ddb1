"""Unstructured weight masks that stay enforced through training with any optimizer.

A :class:`Mask` maps parameter names to boolean tensors (True = weight kept), as in open_lth. The
masking code is shared by every pruning criterion (SynFlow's ``score -> mask`` split): a criterion only
produces scores, :func:`mask_from_scores` turns scores into a mask at a requested rate.

Enforcement (:func:`apply_mask`) keeps pruned weights *exactly* zero without re-allocating weights every
step (``torch.nn.utils.prune`` recomputes ``weight = orig * mask`` at each forward):

* the weight is multiplied by the mask once, in place, when the mask is applied;
* a gradient hook zeroes the gradient at pruned entries, so no optimizer sees a signal there;
* an optimizer step post-hook (registered once, for every optimizer) multiplies the masked parameters
  of that optimizer by their mask again after a ``step()``, because optimizer state built before
  pruning (Adam's moments, momentum buffers) would otherwise revive pruned weights.

The re-multiplication is skipped when it cannot change a bit (issue 15: on LeNet-300-100 these passes over
the weights were a large share of the masked step): for SGD, Adam and AdamW, whose update of an entry depends
only on that entry's gradient, value and state, an entry whose gradient (masked by the hook), value and
optimizer state are all zero stays exactly zero (``±0``, the value ``p * 0`` would have). So once a
multiplication has left a parameter zero at its pruned entries *and* its optimizer state is zero there,
later steps skip it, as long as nothing else changed the parameter or that state in between (their version
counters, storages and the mask are compared before each step; anything else triggers the multiplication,
and the check, again). Stale state (an optimizer that stepped before the mask was applied) keeps the
multiplication on, re-checked every 64 steps. Values are bit-identical to multiplying after every step.

Adam's and AdamW's second moment ``exp_avg_sq`` only ever enters the update as ``sqrt(v) + eps`` in a
denominator. At a pruned entry whose first moment is zero the update is ``0 / denominator = 0`` whatever ``v``
is, so, once a parameter is clean (above), a large ``L`` (1e18 in float32) is added to ``v`` at its pruned
entries, and again whenever ``beta2``'s decay could have brought it below 1 (every 41,000 steps for
``beta2 = 0.999``; kept entries get ``+0``: the same bits). This changes no weight, but it matters for speed: on
the project's CPU (AMD EPYC, torch's AVX-512 kernels) ``sqrt`` of an exact zero costs about 7x ``sqrt`` of a
positive number, so Adam's ``v.sqrt()`` over an 80 %-pruned ``v`` was most of the masked step's extra cost
(``benchmarks/mask_step.py``).
The hooks' bookkeeping is a few attribute reads per masked parameter and step (``_Entry``); issue 15 measured
the earlier per-step ``+1`` pass over ``v`` and weak-dictionary look-ups as most of what remained.
Weights must be changed in place through the parameter (``p.copy_``, ``load_state_dict``) or by applying
the mask again, not through ``p.data`` (whose writes no version counter sees).

The mask is also registered as a buffer ``<param>_mask`` on the owning module, so it is saved and loaded
with the model's ``state_dict``. :func:`make_permanent` removes hooks and buffers and leaves the (already
zero) weights as plain parameters: the forward is unchanged.
"""
from __future__ import annotations

import functools
import math
import weakref
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Mask(dict):
    """Parameter name -> boolean tensor (True = kept)."""

    @classmethod
    def ones_like(cls, model: nn.Module, names: Iterable[str] | None = None) -> "Mask":
        params = dict(model.named_parameters())
        names = prunable_names(model) if names is None else list(names)
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in names})

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.values())

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.values()))

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def layer_density(self) -> dict[str, float]:
        return {n: float(m.float().mean()) for n, m in self.items()}

    def cpu(self) -> "Mask":
        return Mask({n: m.detach().cpu() for n, m in self.items()})

    def to(self, device) -> "Mask":
        return Mask({n: m.to(device) for n, m in self.items()})

    def __and__(self, other: "Mask") -> "Mask":
        return Mask({n: self[n] & other[n] for n in self})

    def save(self, path: str | Path) -> None:
        from .runs import atomic_torch_save
        atomic_torch_save({n: m.cpu() for n, m in self.items()}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        return cls(torch.load(path, map_location="cpu", weights_only=True))


def prunable_names(model: nn.Module, include_bias: bool = False) -> list[str]:
    """Names of the weights of conv and linear layers (biases too if asked), in module order.

    Gate modules, batch norms and embeddings are never pruned by masks.
    """
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            for pname, p in module.named_parameters(recurse=False):
                if p is None or (pname == "bias" and not include_bias) or pname not in ("weight", "bias"):
                    continue
                names.append(f"{mname}.{pname}" if mname else pname)
    return names


# --- enforcement --------------------------------------------------------------------------------

# id(parameter) -> (weak reference to it, float mask) for every parameter under an applied mask. A plain dict
# keyed by id, looked up once per parameter and step (a WeakIdKeyDictionary look-up builds a weak reference
# each time); the weak reference's callback drops the entry when the parameter is garbage collected, and
# the reference is compared on look-up, so a recycled id never matches.
_ACTIVE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
_HOOKS = WeakIdKeyDictionary()
_HOOKS_REGISTERED = False


def _forget(key: int, ref: weakref.ref) -> None:
    rec = _ACTIVE.get(key)
    if rec is not None and rec[0] is ref:
        del _ACTIVE[key]


# Optimizers whose update of an entry depends only on that entry's gradient, value and state, so that an
# entry that is zero in all three stays exactly zero (exact type: a subclass may change the update).
_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_ADAM = (torch.optim.Adam, torch.optim.AdamW)
_RECHECK_EVERY = 64  # steps between re-checks of stale optimizer state at pruned entries

# Adam/AdamW state that only divides the update (sqrt(v) + eps): it cannot move a pruned weight whose first
# moment is zero, so it is neither checked for zeros nor watched for writes.
_DENOMINATOR_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


class _Entry:
    """What the hooks know about one masked parameter of one optimizer.

    ``clean``: after the last step the parameter was zero at its pruned entries and the optimizer's moving
    state (:func:`_moving_state`) was zero there; ``version``/``ptr`` (the parameter's version counter and
    storage), ``state`` (its optimizer state dict and that dict's length) and ``moving`` ((key, tensor,
    version, storage) of each moving state tensor) say what it was, so that any later write is noticed.
    Not clean (stale moments): multiply after every step, re-check at step ``next_check``. ``v`` and
    ``lift_due``: Adam's second moment and the step of its next lift (:func:`_lift_second_moment`).
    """

    __slots__ = ("p", "m", "clean", "version", "ptr", "state", "state_len", "moving", "next_check", "v",
                 "lift_due")

    def __init__(self, p, m):
        self.p, self.m, self.clean, self.next_check, self.v, self.lift_due = p, m, False, 0, None, 0

    def record(self, optimizer) -> None:
        """Note that the parameter is clean, and the versions that this step left."""
        p = self.p
        st = optimizer.state.get(p)
        self.clean, self.version, self.ptr = True, p._version, p.data_ptr()
        self.state, self.state_len = st, (len(st) if st is not None else 0)
        self.moving = tuple((k, t, t._version, t.data_ptr()) for k, t in (st or {}).items()
                            if k not in _DENOMINATOR_STATE and isinstance(t, torch.Tensor) and t.shape == p.shape)

    def still_clean(self, optimizer) -> bool:
        """Nothing wrote to the parameter or its moving state since :meth:`record` (or :meth:`advance`)."""
        p = self.p
        if not self.clean or p._version != self.version or p.data_ptr() != self.ptr:
            return False
        st = optimizer.state.get(p)
        if st is not self.state or (st is not None and len(st) != self.state_len):
            return False
        for k, t, version, ptr in self.moving:
            if st.get(k) is not t or t._version != version or t.data_ptr() != ptr:
                return False
        return True

    def advance(self) -> None:
        """After a step that :meth:`still_clean` allowed to skip: note the versions the step left (a step that
        replaced or added state is caught by the next :meth:`still_clean`)."""
        p = self.p
        self.version, self.ptr = p._version, p.data_ptr()
        self.moving = tuple((k, t, t._version, t.data_ptr()) for k, t, _, _ in self.moving)


class _Plan:
    """Per optimizer: its entries by ``id(param)``, the steps seen, and this step's (todo, skip) lists."""

    __slots__ = ("ref", "entries", "step", "pending")

    def __init__(self, ref):
        self.ref, self.entries, self.step, self.pending = ref, {}, 0, None


# id(optimizer) -> _Plan, dropped when the optimizer is garbage collected (as _ACTIVE).
_PLANS: dict[int, _Plan] = {}


def _plan(optimizer) -> _Plan:
    key = id(optimizer)
    plan = _PLANS.get(key)
    if plan is None or plan.ref() is not optimizer:
        ref = weakref.ref(optimizer, functools.partial(_forget_plan, key))
        plan = _PLANS[key] = _Plan(ref)
    return plan


def _forget_plan(key: int, ref: weakref.ref) -> None:
    plan = _PLANS.get(key)
    if plan is not None and plan.ref is ref:
        del _PLANS[key]


def _moving_state(optimizer, p):
    """The optimizer's per-entry state of ``p`` that can move a pruned weight (not Adam's denominator)."""
    state = optimizer.state.get(p) or {}
    return [t for k, t in state.items() if k not in _DENOMINATOR_STATE
            and isinstance(t, torch.Tensor) and t.shape == p.shape]


def _lift_second_moment(optimizer, entry: _Entry, step: int) -> None:
    """Keep Adam's ``exp_avg_sq`` of a clean parameter at least 1 at its pruned entries (module docstring:
    same weights, no ``sqrt`` of zeros).

    There the gradient is zero, so ``v`` only decays, by ``beta2`` per step. Adding a large ``L`` once, and
    again every ``log(L) / -log(beta2)`` steps (41,000 for ``beta2 = 0.999`` in float32), keeps ``v >= 1``
    without a pass over ``v`` at every step (issue 15). Kept entries get ``+0``: the same bits.
    """
    p, m = entry.p, entry.m
    v = (optimizer.state.get(p) or {}).get("exp_avg_sq")
    if v is None or v.shape != p.shape:
        entry.v = None
        return
    if v is entry.v and step < entry.lift_due:
        return
    lift = min(1e18, math.sqrt(torch.finfo(v.dtype).max))  # v stays below 2 L: far from the dtype's maximum
    beta2 = float(next((g["betas"][1] for g in optimizer.param_groups if any(q is p for q in g["params"])), 0.0))
    every = int(math.log(lift) / -math.log(beta2)) if 0.0 < beta2 < 1.0 else (1 if beta2 <= 0.0 else 2**62)
    v.add_((1 - m).to(dtype=v.dtype, device=v.device), alpha=lift)
    entry.v, entry.lift_due = v, step + max(every, 1)


def _masked_params(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            rec = _ACTIVE.get(id(p))
            if rec is not None and rec[0]() is p:
                yield p, rec[1]


def _before_step(optimizer, args, kwargs) -> None:
    """Pre-step hook: list the masked parameters of ``optimizer`` whose pruned entries this step may move."""
    if not _ACTIVE:
        plan = _PLANS.get(id(optimizer))
        if plan is not None:
            plan.pending = None
        return
    masked = list(_masked_params(optimizer))
    if not masked and id(optimizer) not in _PLANS:
        return
    plan = _plan(optimizer)
    entries = plan.entries
    todo, skip = [], []
    for p, m in masked:
        e = entries.get(id(p))
        if e is not None and e.p is p and e.m is m and e.still_clean(optimizer):
            skip.append(e)
        else:
            todo.append((p, m))
    plan.pending = (todo, skip)


def _reapply_after_step(optimizer, args, kwargs) -> None:
    """Post-step hook: multiply by their mask the parameters :func:`_before_step` listed."""
    plan = _PLANS.get(id(optimizer))
    if plan is not None and plan.ref() is not optimizer:
        plan = None
    pending = plan.pending if plan is not None else None
    if pending is None:  # no pre-step record (hooks registered mid-step): multiply all
        if not _ACTIVE:
            return
        todo, skip = list(_masked_params(optimizer)), ()
        if not todo:
            return
        plan = _plan(optimizer)
    else:
        todo, skip = pending
        plan.pending = None
    plan.step += 1
    step = plan.step
    adam = type(optimizer) in _ADAM
    with torch.no_grad():
        for e in skip:  # still zero at pruned entries (see module docstring): note the versions this step left
            e.advance()
            if adam and step >= e.lift_due:
                _lift_second_moment(optimizer, e, step)
        if not todo:
            return
        elementwise = type(optimizer) in _ELEMENTWISE
        entries = plan.entries
        for p, m in todo:
            p.mul_(m)
            if not elementwise:
                continue
            e = entries.get(id(p))
            if e is None or e.p is not p or e.m is not m:
                e = entries[id(p)] = _Entry(p, m)
            elif not e.clean and step < e.next_check:
                continue  # stale state, next check later
            if _state_zero_where_pruned(optimizer, p, m):
                e.record(optimizer)
                if adam:
                    _lift_second_moment(optimizer, e, step)
            else:
                e.clean, e.next_check = False, step + _RECHECK_EVERY


def _state_zero_where_pruned(optimizer, p, m) -> bool:
    pruned = m == 0
    return all(not bool(t.masked_select(pruned).any()) for t in _moving_state(optimizer, p))


def _ensure_post_hook() -> None:
    global _HOOKS_REGISTERED
    if not _HOOKS_REGISTERED:
        register_optimizer_step_pre_hook(_before_step)
        register_optimizer_step_post_hook(_reapply_after_step)
        _HOOKS_REGISTERED = True


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mname, _, pname = name.rpartition(".")
    return (model.get_submodule(mname) if mname else model), pname


def apply_mask(model: nn.Module, mask: Mask) -> nn.Module:
    """Zero the pruned weights in place and keep them zero from now on (see module docstring).

    Applying a new mask replaces the previous one (pass ``old & new`` to prune further).
    Parameter identity is unchanged, so existing optimizers keep working.
    """
    _ensure_post_hook()
    params = dict(model.named_parameters())
    unknown = sorted(set(mask) - set(params))
    if unknown:
        raise KeyError(f"mask names parameters the model does not have: {unknown}")
    for name, m in mask.items():
        p = params[name]
        if m.shape != p.shape:
            raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        module, pname = _owner(model, name)
        buf = m.to(device=p.device, dtype=torch.bool)
        bname = f"{pname}_mask"
        if bname in module._buffers:
            module._buffers[bname] = buf
        else:
            module.register_buffer(bname, buf)
        # A float copy, multiplied (not masked_fill): p * 1 = p and p * 0 = ±0 bit for bit, as before.
        fmask = buf.to(p.dtype)
        with torch.no_grad():
            p.mul_(fmask)
        _ACTIVE[id(p)] = (weakref.ref(p, functools.partial(_forget, id(p))), fmask)
        old = _HOOKS.pop(p, None)
        if old is not None:
            old.remove()
        _HOOKS[p] = p.register_hook(_grad_hook(fmask))
    return model


def _grad_hook(fmask: torch.Tensor):
    # The hook holds its mask: applying another mask or make_permanent removes the hook, so no look-up
    # (weak dictionary) is needed per backward.
    def hook(grad):
        return grad * fmask
    return hook


def current_mask(model: nn.Module) -> Mask:
    """The mask applied to ``model`` (read from its ``*_mask`` buffers); empty if none."""
    out = Mask()
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if bname.endswith("_mask") and buf is not None and buf.dtype == torch.bool:
                pname = bname[: -len("_mask")]
                out[f"{mname}.{pname}" if mname else pname] = buf
    return out


def restore_mask(model: nn.Module) -> nn.Module:
    """Re-enable enforcement from the ``*_mask`` buffers, e.g. after ``load_state_dict`` or a deepcopy."""
    return apply_mask(model, current_mask(model))


def prepare_for_load(model: nn.Module, state_dict: dict) -> nn.Module:
    """Create empty mask buffers that ``state_dict`` has, so ``load_state_dict`` can fill them."""
    for key, val in state_dict.items():
        if key.endswith("_mask") and val.dtype == torch.bool:
            mname, _, bname = key.rpartition(".")
            module = model.get_submodule(mname) if mname else model
            if bname not in module._buffers:
                module.register_buffer(bname, torch.ones_like(val))
    return model


def load_masked_state(model: nn.Module, state_dict: dict) -> nn.Module:
    """``load_state_dict`` for a model saved with a mask: buffers created, enforcement restored."""
    prepare_for_load(model, state_dict)
    model.load_state_dict(state_dict)
    if current_mask(model):
        restore_mask(model)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove mask hooks and buffers; pruned weights stay zero, so the forward is unchanged."""
    for name, p in model.named_parameters():
        _ACTIVE.pop(id(p), None)
        h = _HOOKS.pop(p, None)
        if h is not None:
            h.remove()
    for module in model.modules():
        for bname in [b for b, v in module._buffers.items() if b.endswith("_mask") and v is not None
                      and v.dtype == torch.bool]:
            del module._buffers[bname]
    return model


# --- scores to masks -------------------------------------------------------------------------------

def mask_from_scores(scores: dict[str, torch.Tensor], rates: float | dict[str, float], *,
                     scope: str = "layer", current: Mask | None = None) -> Mask:
    """Prune the lowest-scoring fraction of the *surviving* weights.

    ``rates`` is the fraction of surviving weights to remove this round: one float for all layers, or a
    dict per parameter name (missing names are not pruned). ``scope="layer"`` prunes each layer by its
    rate; ``scope="global"`` ranks all layers together and removes ``rates`` (a float) of all survivors.
    Already pruned weights stay pruned (their scores are ignored). Ties are broken by position, so the
    number removed is exact: ``round(rate * survivors)`` per layer (or globally).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    current = current if current is not None else Mask({n: torch.ones_like(s, dtype=torch.bool)
                                                         for n, s in scores.items()})
    out = Mask({n: m.clone() for n, m in current.items()})
    if scope == "global":
        if not isinstance(rates, (int, float)):
            raise ValueError("global pruning takes one rate (a float)")
        names = list(scores)
        alive = torch.cat([current[n].flatten() for n in names])
        flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
        _prune_flat(flat, alive.cpu(), rates)
        # _prune_flat cleared entries of `alive`; split it back into layers
        offset = 0
        for n in names:
            k = current[n].numel()
            out[n] = alive[offset:offset + k].view_as(current[n]).to(current[n].device)
            offset += k
        return out
    for n, s in scores.items():
        rate = rates if isinstance(rates, (int, float)) else rates.get(n, 0.0)
        if rate <= 0:
            continue
        alive = current[n].flatten().cpu().clone()
        _prune_flat(s.detach().flatten().float().cpu(), alive, rate)
        out[n] = alive.view_as(current[n]).to(current[n].device)
    return out


def _prune_flat(scores: torch.Tensor, alive: torch.Tensor, rate: float) -> None:
    """Set ``alive`` False at the ``round(rate * alive.sum())`` lowest scores among alive entries."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"pruning rate must be in [0, 1], got {rate}")
    idx = torch.nonzero(alive).flatten()
    k = int(round(rate * len(idx)))
    if k == 0:
        return
    # stable sort: equal scores are removed in index order, so results are deterministic
    order = torch.sort(scores[idx], stable=True).indices
    alive[idx[order[:k]]] = False


def remaining_fraction_per_layer(rates: dict[str, float], sizes: dict[str, int], rounds: int) -> float:
    """Closed form of the fraction of weights left after ``rounds`` rounds of per-layer pruning.

    Each layer keeps ``(1 - rate)^n`` of its weights (up to rounding), e.g. LeNet-300-100 with 20 % of
    hidden and 10 % of output weights per round: ``(0.8^n * 265200 + 0.9^n * 1000) / 266200``.
    """
    total = sum(sizes.values())
    return sum(sizes[n] * (1 - rates.get(n, 0.0)) ** rounds for n in sizes) / total
