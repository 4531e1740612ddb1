"""Side-by-side timing of training steps, shared by the benchmark scripts."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pruning_lib.timing import best_of
from pruning_lib.train import RunSettings, uses_channels_last


def as_fit_trains(m, layout: str = "fit"):
    """``m`` in the memory format ``fit`` trains it in on CPU (``layout="fit"``: channels-last for a network
    with 2-d convolutions, see :class:`pruning_lib.train.RunSettings`) or plain contiguous
    (``layout="contiguous"``)."""
    settings = RunSettings(channels_last=False if layout == "contiguous" else None)
    if uses_channels_last(m, torch.device("cpu"), settings):
        m.to(memory_format=torch.channels_last)
    return m


def step(m, opt, x, y):
    """One optimizer step: forward, cross-entropy, backward, update."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    opt.step()


def arguments(description: str, model: str, steps: int, batch: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=model)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layout", choices=("fit", "contiguous"), default="fit",
                    help="memory format of the networks: as fit trains them on CPU (channels-last for "
                         "convolutional ones), or contiguous")
    return ap


class _CountOps(TorchDispatchMode):
    """Counts the operators dispatched to kernels (forward, backward and optimizer) while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(run, x, y) -> int:
    """Operators one ``step`` of ``run = (model, optimizer)`` dispatches (one untimed step). At these sizes a
    CPU operator costs a few microseconds whatever it computes, so the count explains much of a small
    network's step time, and unlike a time it does not move with the machine's load."""
    with _CountOps() as counter:
        step(*run, x, y)
    return counter.count


def compare(runs: dict, args, warmup: int = 5) -> None:
    """Time ``step`` for each ``name -> (model, optimizer)`` of ``runs`` on one MNIST-shaped batch and print
    the best mean step time of each over ``args.repeats`` interleaved repeats (so machine noise hits all
    alike), its ratio to the first (the dense reference), and the operators one step dispatches
    (counted after the timing, in an untimed step) with their ratio to the reference's."""
    torch.set_num_threads(args.threads)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    times = best_of([lambda run=run: step(*run, x, y) for run in runs.values()], args.repeats, inner=args.steps,
                    warmup=warmup)
    best = dict(zip(runs, times))
    ops = {k: ops_per_step(run, x, y) for k, run in runs.items()}
    ref = next(iter(runs))
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, best of {args.repeats} x "
          f"{args.steps} steps")
    for k in runs:
        print(f"  {k:12s} {1e3 * best[k]:8.3f} ms/step   ratio to {ref} {best[k] / best[ref]:.3f}   "
              f"{ops[k]:4d} ops/step ({ops[k] / ops[ref]:.2f})")
