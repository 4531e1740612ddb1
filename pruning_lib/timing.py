"""One way to time things: the best of interleaved repeats.

On a shared machine other processes only ever add time, so the least disturbed measurement is the minimum
over repeats; timing the candidates alternately (dense, compacted, dense, compacted, ...) exposes them to
the same disturbances. Chapters that time networks and ``benchmarks/`` use this module.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["best_of", "best_forward_seconds", "best_layout_forward_seconds", "LAYOUTS", "torch_threads"]

# The memory formats a CPU forward pass is timed in (best_layout_forward_seconds).
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the ``with`` block, and the count before it restored after (also when
    the block raises): a timing or a unit that fixes its thread count leaves the process as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_of(fns: Sequence[Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1, *,
            alternate: bool = False, sync: Callable[[], object] | None = None) -> list[float]:
    """For each callable, the best (over ``repeats`` interleaved rounds) mean wall time of one call, each round
    timing ``inner`` calls (short calls need several to be timed well), after ``warmup`` untimed calls.

    ``alternate``: every other round times the callables in reverse order (so none always runs first, or
    always right after another); ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each
    timed round, so queued GPU work is counted where it was issued."""
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be at least 1, got {repeats} and {inner}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [math.inf] * len(fns)
    order = list(range(len(fns)))
    for r in range(repeats):
        for i in (order[::-1] if alternate and r % 2 else order):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[i]()
            if sync is not None:
                sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / inner)
    return best


@torch.no_grad()
def best_forward_seconds(models: Sequence[nn.Module], x: torch.Tensor, repeats: int, inner: int = 1,
                         warmup: int = 1) -> list[float]:
    """:func:`best_of` for one forward pass of each model on ``x``, in eval mode, without autograd."""
    for m in models:
        m.eval()
    return best_of([lambda m=m: m(x) for m in models], repeats, inner, warmup)


def _layouts_for(model: nn.Module, x: torch.Tensor, layouts: Sequence[str] = tuple(LAYOUTS)) -> list[str]:
    """Those of ``layouts`` the model can run in: contiguous always, channels-last for a network with 2-d
    convolutions fed a 4-d input (one without runs contiguous whatever ``layouts`` asks: its format is moot)."""
    convolutional = x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return [name for name in layouts if convolutional or name == "contiguous"] or ["contiguous"]


@torch.no_grad()
def best_layout_forward_seconds(models: Sequence[nn.Module], x: torch.Tensor, repeats: int, inner: int = 1,
                                warmup: int = 1, layouts: Sequence[str] = tuple(LAYOUTS)
                                ) -> tuple[list[float], list[str]]:
    """Each model's best forward time over the memory formats it can run in, and that format.

    A copy of every model is timed in contiguous (NCHW) format and, when it has 2-d convolutions and ``x`` is
    4-d, another in channels-last with ``x`` in channels-last too; all (model, format) pairs are timed
    interleaved in one :func:`best_of`, in eval mode without autograd. The models themselves are not changed.
    ``layouts`` (names of :data:`LAYOUTS`) restricts the formats tried, e.g. to one for every model.

    Why: which format is faster depends on the network. On CPU a dense LeNet-5-Caffe runs about twice as fast
    in channels-last, while a compacted network with a few channels a layer (not filling the kernels' channel
    blocks) may run faster contiguous; timing both in one format would handicap one of them, and timing them
    in whatever format each happens to be in (training converts a network to channels-last, compaction makes
    new tensors contiguous) compares layouts, not networks. A deployment would run each in its faster one."""
    variants, owner = [], []
    for i, m in enumerate(models):
        for name in _layouts_for(m, x, layouts):
            fmt = LAYOUTS[name]
            variants.append((copy.deepcopy(m).eval().to(memory_format=fmt), x.contiguous(memory_format=fmt), name))
            owner.append(i)
    times = best_of([lambda v=v: v[0](v[1]) for v in variants], repeats, inner, warmup)
    best: list[tuple[float, str]] = [(math.inf, "")] * len(models)
    for (_, _, name), i, t in zip(variants, owner, times):
        if t < best[i][0]:
            best[i] = (t, name)
    return [t for t, _ in best], [name for _, name in best]
