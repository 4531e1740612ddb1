"""Side-by-side timing of training steps, shared by the benchmark scripts."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

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


def compare(runs: dict, args, warmup: int = 5) -> None:
    """Time ``step`` for each ``name -> (model, optimizer)`` of ``runs`` on one MNIST-shaped batch and print
    the best mean step time of each over ``args.repeats`` interleaved repeats (so machine noise hits all
    alike) and its ratio to the first (the dense reference)."""
    torch.set_num_threads(args.threads)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    times = best_of([lambda run=run: step(*run, x, y) for run in runs.values()], args.repeats, inner=args.steps,
                    warmup=warmup)
    best = dict(zip(runs, times))
    ref = next(iter(runs))
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, best of {args.repeats} x "
          f"{args.steps} steps")
    for k in runs:
        print(f"  {k:12s} {1e3 * best[k]:8.3f} ms/step   ratio to {ref} {best[k] / best[ref]:.3f}")
