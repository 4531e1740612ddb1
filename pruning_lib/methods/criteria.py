"""Pruning criteria as small registered scorers that share one masking code path.

A criterion only *scores* weights (higher = more important); :func:`prune` turns the scores into a mask
with :func:`pruning_lib.masks.mask_from_scores`, the one masking code path of the library (SynFlow's
``score -> mask`` split, open_lth's registered strategies).

The criteria are those compared by Lévai & Zombori (2020, "Data-dependent pruning to find the winning
lottery ticket", arXiv 2006.14350, Sec. 3), in the notation of Zhou et al. (2019, "Deconstructing lottery
tickets"): ``w_i`` are the weights the ticket is rewound to (the initialisation, or an early iterate with
late rewinding), ``w_f`` the weights at the end of the round's training.

========================  ========================================================================
``random``                 u ~ U(0, 1): the random-pruning control
``magnitude``              |w_f| (Frankle & Carbin 2019)
``magnitude_increase``     |w_f| - |w_i| (Zhou et al. 2019, "large final, magnitude increase")
``movement``               |w_f - w_i| (Zhou et al. 2019)
``snip``                   |w_i * dL/dw(w_i)| (Lee et al. 2019, SNIP, Eq. 3 up to normalisation)
``<name>_grad``            <name> x |dL/dw|: the data-dependent variant of each criterion
                           (Lévai & Zombori 2020), gradient taken at ``grad_point``; a negative
                           score is divided by |dL/dw| instead (see below)
========================  ========================================================================

The gradient factor is meant to mark a weight the loss is sensitive to as *more* important (SNIP's
reasoning, Lévai & Zombori 2020, abstract). For the criteria whose scores are never negative (random,
magnitude, movement, SNIP) the product ``s * |g|`` does exactly that. ``magnitude_increase`` is the one
criterion with negative scores (a weight whose magnitude shrank in training), and for those the literal
product does the opposite: ``-0.1 * |g|`` is lower, so *more* prunable, the larger the gradient. The
abstract, the only part of the paper we could retrieve, says "incorporating ... the gradient of the
training loss" and does not treat the sign. We keep the factor's direction instead of the literal
product: a negative score is divided by ``|g|`` (``s / |g|``, ``-inf`` where ``g = 0``), so for every
weight a larger gradient means a higher score, the scores keep their sign (every weight that shrank is
still ranked below every weight that grew, as by the plain criterion), and non-negative scores are
exactly ``s * |g|``. :data:`NEGATIVE_BASE` names this rule; a criterion registered with
``signed=True`` records it in its cache key.

The gradient of the data-dependent variants is the mean over ``grad_batches`` batches of the training
loss's gradient, taken with the current mask applied (pruned weights are zero), at ``grad_point``:
``"init"`` (the rewound weights ``w_i``, where SNIP takes it) or ``"final"`` (the trained weights
``w_f``). Where the paper takes it is not stated in its abstract; both are offered.

:func:`gradient_scores` and :func:`loss_gradients` are generic: any model, any ``loss_fn(model, x, y)``,
any iterable of ``(x, y)`` batches; other chapters (e.g. LNPT) reuse them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .. import masks as masks_mod
from ..masks import Mask

Scores = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --- gradients ---------------------------------------------------------------------------------------

def loss_gradients(model: nn.Module, loss_fn: LossFn, batches: Iterable, names: list[str] | None = None
                   ) -> Scores:
    """dL/dw for the parameters ``names`` (default: :func:`masks.prunable_names`), averaged over ``batches``.

    ``loss_fn(model, x, y)`` returns a scalar; ``batches`` is an iterable of ``(x, y)``. The model is used in
    its current mode (train/eval) and its ``.grad`` fields are left untouched (``torch.autograd.grad``).
    Gradients at masked weights are zero when a mask is applied (the mask's gradient hook acts here too).
    Returned tensors are detached, on the parameters' device.
    """
    names = masks_mod.prunable_names(model) if names is None else list(names)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameters {missing}")
    ps = [params[n] for n in names]
    total = [torch.zeros_like(p) for p in ps]
    count = 0
    for x, y in batches:
        loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, ps, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g.detach())
        count += 1
    if count == 0:
        raise ValueError("loss_gradients needs at least one batch")
    return {n: t / count for n, t in zip(names, total)}


def gradient_scores(model: nn.Module, loss_fn: LossFn, batches: Iterable, names: list[str] | None = None
                    ) -> Scores:
    """SNIP connection sensitivity |w * dL/dw| (Lee et al. 2019, Eq. 3 without the normalisation, which
    does not change the ranking), with dL/dw averaged over ``batches`` (see :func:`loss_gradients`)."""
    grads = loss_gradients(model, loss_fn, batches, names)
    params = dict(model.named_parameters())
    return {n: (params[n].detach() * g).abs() for n, g in grads.items()}


# --- the registry --------------------------------------------------------------------------------------

@dataclass
class ScoreContext:
    """What a criterion may look at when it scores the weights of one pruning round.

    ``model`` holds the trained weights ``w_f`` (with the current mask applied); ``initial`` the weights
    the ticket is rewound to, ``w_i`` (name -> tensor; defaults to the trained weights, e.g. for SNIP at
    initialisation on an untrained model). ``batches`` is a callable returning a fresh iterable of
    ``(x, y)`` (so each gradient sees the same data); only the first ``grad_batches`` are used.
    """

    model: nn.Module
    initial: Scores | None = None  # may hold every parameter (biases too): all are loaded for "init"
    loss_fn: LossFn | None = None
    batches: Callable[[], Iterable] | None = None
    grad_batches: int = 1
    grad_point: str = "init"
    names: list[str] | None = None
    generator: torch.Generator | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.grad_point not in GRAD_POINTS:
            raise ValueError(f"grad_point must be one of {GRAD_POINTS}, got {self.grad_point!r}")
        if self.names is None:
            self.names = masks_mod.prunable_names(self.model)

    def final(self) -> Scores:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def init(self) -> Scores:
        if self.initial is None:
            return self.final()
        mask = masks_mod.current_mask(self.model)
        # survivors start from w_i; pruned weights are zero in the network that will be trained
        return {n: (self.initial[n].to(w.device) * mask[n] if n in mask else self.initial[n].to(w.device))
                for n, w in self.final().items()}

    def gradient(self, point: str | None = None) -> Scores:
        """dL/dw averaged over ``grad_batches`` batches at ``point`` ("init" or "final"), cached."""
        point = point or self.grad_point
        if point not in self._cache:
            if self.loss_fn is None or self.batches is None:
                raise ValueError("a data-dependent criterion needs loss_fn and batches")
            batches = lambda: itertools.islice(self.batches(), self.grad_batches)  # noqa: E731
            if point == "final":
                self._cache[point] = loss_gradients(self.model, self.loss_fn, batches(), self.names)
            else:
                # every rewound parameter (biases too), the pruned weights at zero
                weights = {**(self.initial or {}), **self.init()}
                self._cache[point] = _gradients_at(self.model, weights, self.loss_fn, batches(), self.names)
        return self._cache[point]


GRAD_POINTS = ("init", "final")


def _gradients_at(model: nn.Module, weights: Scores, loss_fn: LossFn, batches: Iterable, names) -> Scores:
    """Gradients with ``weights`` loaded into ``model``; the model's own weights are restored after."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        return loss_gradients(model, loss_fn, batches, names)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


Criterion = Callable[[ScoreContext], Scores]
CRITERIA: dict[str, Criterion] = {}
SIGNED: set[str] = set()  # criteria whose scores can be negative
DATA_DEPENDENT_SUFFIX = "_grad"
# how the gradient factor treats a negative score (module docstring); part of a signed criterion's
# cache key, so results of an older rule are never reused
NEGATIVE_BASE = "divide by |g|"


def register_criterion(name: str, data_dependent_variant: bool = True, signed: bool = False):
    """Register ``fn(ctx) -> scores`` under ``name`` and (by default) its variant ``name + "_grad"``,
    whose scores are ``fn(ctx) * |dL/dw|`` (Lévai & Zombori 2020; :func:`gradient_factor`).
    ``signed=True`` declares that ``fn`` can return negative scores."""
    def deco(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = fn
        if signed:
            SIGNED.add(name)
        if data_dependent_variant:
            CRITERIA[name + DATA_DEPENDENT_SUFFIX] = data_dependent(fn)
        return fn
    return deco


def gradient_factor(score: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``score * |grad|`` where ``score >= 0``, ``score / |grad|`` where ``score < 0``: a larger gradient
    always raises the score, and the sign of the score is kept (module docstring)."""
    g = grad.abs().to(score.device)
    return torch.where(score >= 0, score * g, score / g)


def is_signed(name: str) -> bool:
    """Whether criterion ``name`` (or the plain criterion of a ``_grad`` variant) can score below 0."""
    return base_criterion(name) in SIGNED


def data_dependent(fn: Criterion) -> Criterion:
    """The data-dependent variant of a criterion: its score times |dL/dw| at ``ctx.grad_point``
    (:func:`gradient_factor`)."""
    def scorer(ctx: ScoreContext) -> Scores:
        base = fn(ctx)
        grads = ctx.gradient()
        return {n: gradient_factor(s, grads[n]) for n, s in base.items()}
    scorer.__name__ = f"{getattr(fn, '__name__', 'criterion')}{DATA_DEPENDENT_SUFFIX}"
    scorer.__doc__ = f"{fn.__doc__ or ''} Times |dL/dw| (data-dependent variant)."
    return scorer


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise KeyError(f"unknown criterion {name!r}; registered: {sorted(CRITERIA)}") from None


def criterion_names(plain_only: bool = False) -> list[str]:
    names = list(CRITERIA)
    return [n for n in names if not n.endswith(DATA_DEPENDENT_SUFFIX)] if plain_only else names


def is_data_dependent(name: str) -> bool:
    return name.endswith(DATA_DEPENDENT_SUFFIX) or name == "snip"


def base_criterion(name: str) -> str:
    return name[: -len(DATA_DEPENDENT_SUFFIX)] if name.endswith(DATA_DEPENDENT_SUFFIX) else name


@register_criterion("random")
def random_scores(ctx: ScoreContext) -> Scores:
    """u ~ U(0, 1) per weight: the random-pruning control."""
    return {n: torch.rand(w.shape, generator=ctx.generator).to(w.device) for n, w in ctx.final().items()}


@register_criterion("magnitude")
def magnitude(ctx: ScoreContext) -> Scores:
    """|w_f| (Frankle & Carbin 2019)."""
    return {n: w.abs() for n, w in ctx.final().items()}


@register_criterion("magnitude_increase", signed=True)
def magnitude_increase(ctx: ScoreContext) -> Scores:
    """|w_f| - |w_i| (Zhou et al. 2019): negative where a weight shrank."""
    wi = ctx.init()
    return {n: w.abs() - wi[n].abs() for n, w in ctx.final().items()}


@register_criterion("movement")
def movement(ctx: ScoreContext) -> Scores:
    """|w_f - w_i| (Zhou et al. 2019)."""
    wi = ctx.init()
    return {n: (w - wi[n]).abs() for n, w in ctx.final().items()}


@register_criterion("snip")
def snip(ctx: ScoreContext) -> Scores:
    """|w_i * dL/dw(w_i)|: SNIP's connection sensitivity at the rewound weights (Lee et al. 2019)."""
    wi = ctx.init()
    g = ctx.gradient("init")
    return {n: (w * g[n]).abs() for n, w in wi.items()}


# --- scores -> mask ------------------------------------------------------------------------------------

def score(name: str, ctx: ScoreContext) -> Scores:
    return get_criterion(name)(ctx)


def prune(name: str, ctx: ScoreContext, rates: float | dict[str, float], *, scope: str = "layer",
          current: Mask | None = None) -> Mask:
    """Score with criterion ``name`` and remove ``rates`` of the surviving weights (per layer or global)
    through :func:`masks.mask_from_scores`. ``current`` defaults to the mask applied to ``ctx.model``."""
    if current is None:
        applied = masks_mod.current_mask(ctx.model)
        current = Mask({n: applied[n] for n in ctx.names}) if applied else None
    return masks_mod.mask_from_scores(score(name, ctx), rates, scope=scope, current=current)


def snip_one_shot(model: nn.Module, loss_fn: LossFn, batches: Iterable, density: float, *,
                  scope: str = "global", names: list[str] | None = None) -> Mask:
    """SNIP as published: one-shot pruning at initialisation to ``density`` of the weights, ranked globally
    by |w * dL/dw| over the given batches (Lee et al. 2019, Sec. 4)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    scores = gradient_scores(model, loss_fn, batches, names)
    return masks_mod.mask_from_scores(scores, 1.0 - density, scope=scope)
