"""One way to time things: the best of interleaved repeats.

On a shared machine other processes only ever add time, so the least disturbed measurement is the minimum
over repeats; timing the candidates alternately (dense, compacted, dense, compacted, ...) exposes them to
the same disturbances. Chapters that time networks and ``benchmarks/`` use this module.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["best_of", "best_forward_seconds", "torch_threads"]


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
