"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878, Sec. 3).

The sparsity rises from ``s_i`` to ``s_f`` over ``n`` pruning steps spaced ``dt`` optimizer steps apart,
starting at step ``t0`` (their Eq. 1)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3      for t in {t0, t0 + dt, ..., t0 + n dt}

fast at first, while the network still has redundant weights, then slower. At each pruning step the
weights are ranked by magnitude and the smallest ``s_t`` of them are masked (here globally over every
conv and linear weight, or per layer). The mask is computed from all weights, not only from the ones that
survived: in this library a pruned weight is exactly zero (:func:`pruning_lib.masks.apply_mask`), so it
ranks last and never returns; Zhu & Gupta's TensorFlow code keeps the masked weights' frozen values and
could revive one whose old magnitude is large. Training continues with the mask fixed after ``t0 + n dt``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import masks as masks_mod
from ..train import Callback


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0,
                   every: int = 1) -> float:
    """Zhu & Gupta's Eq. 1 at optimizer step ``step``: ``initial`` before ``start``, ``final`` from ``end``
    on, the cubic in between, evaluated at the last pruning step ``t0 + k dt <= step``."""
    if not 0.0 <= initial <= final <= 1.0:
        raise ValueError(f"need 0 <= initial <= final <= 1, got initial={initial}, final={final}")
    if end < start:
        raise ValueError(f"end step {end} before start step {start}")
    if step < start:
        return initial
    if step >= end or end == start:
        return final
    t = start + ((step - start) // every) * every
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


def magnitude_mask(model: nn.Module, sparsity: float, scope: str = "global",
                   names: list[str] | None = None) -> masks_mod.Mask:
    """The mask keeping the ``1 - sparsity`` largest |w| of ``names`` (default: every conv/linear weight)."""
    params = dict(model.named_parameters())
    names = masks_mod.prunable_names(model) if names is None else names
    scores = {n: params[n].detach().abs() for n in names}
    return masks_mod.mask_from_scores(scores, sparsity, scope=scope)


class GradualMagnitudePruning(Callback):
    """Prunes ``model`` on Zhu & Gupta's schedule while :func:`pruning_lib.train.fit` trains it.

    ``start``/``end`` are optimizer steps (``t0`` and ``t0 + n dt``), ``every`` is ``dt``. Use it as a
    callback of ``fit``; the mask in force is :attr:`mask` (and the model's applied mask)."""

    def __init__(self, model: nn.Module, final_sparsity: float, start: int, end: int, every: int = 1,
                 initial_sparsity: float = 0.0, scope: str = "global"):
        self.model, self.final, self.initial = model, float(final_sparsity), float(initial_sparsity)
        self.start, self.end, self.every = int(start), int(end), max(1, int(every))
        self.scope = scope
        self.mask: masks_mod.Mask | None = None
        self.current = 0.0
        self.log_rows: list[tuple[int, float]] = []
        cubic_sparsity(0, self.final, self.start, self.end, self.initial, self.every)  # checks the arguments

    def due(self, step: int) -> bool:
        """Whether ``step`` is a pruning step: ``t0 + k dt`` up to ``t0 + n dt``, and ``t0 + n dt`` itself."""
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.every == 0 or step == self.end

    def prune(self, step: int) -> None:
        s = cubic_sparsity(step, self.final, self.start, self.end, self.initial, self.every)
        if s <= self.current and self.mask is not None:
            return
        with torch.no_grad():
            self.mask = magnitude_mask(self.model, s, self.scope)
        masks_mod.apply_mask(self.model, self.mask)
        self.current = s
        self.log_rows.append((step, s))

    def after_step(self, state) -> None:
        if self.due(state.step):
            self.prune(state.step)

    def log(self, state) -> dict[str, float]:
        return {"gmp_sparsity": self.current}


def schedule_steps(total_steps: int, start_fraction: float, end_fraction: float, pruning_steps: int
                   ) -> tuple[int, int, int]:
    """``(t0, t0 + n dt, dt)`` for a run of ``total_steps``: pruning from ``start_fraction`` to
    ``end_fraction`` of the run in ``pruning_steps`` steps (at least one optimizer step apart)."""
    start = int(round(start_fraction * total_steps))
    end = max(start, int(round(end_fraction * total_steps)))
    every = max(1, math.ceil((end - start) / max(1, pruning_steps)))
    end = start + every * math.ceil((end - start) / every) if end > start else start
    return start, min(end, total_steps), every
