"""Cost of one training step under a mask, against the dense step, measured side by side.

Compares, on the same batches and in the same process:
  dense     - no mask;
  ours      - pruning_lib.masks.apply_mask (in-place zeroing + gradient hook + optimizer post-step hook);
  torch     - torch.nn.utils.prune (weight = weight_orig * weight_mask recomputed at every forward).
Prints the mean step time of each and the ratios to dense. Usage:
  python benchmarks/mask_step.py [--model lenet300_100|lenet5_caffe] [--steps 200] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from pruning_lib.masks import Mask, apply_mask, prunable_names
from pruning_lib.models import build_model


def make(kind: str, model_name: str, density: float):
    torch.manual_seed(0)
    m = build_model(model_name)
    names = prunable_names(m)
    if kind == "ours":
        params = dict(m.named_parameters())
        apply_mask(m, Mask({n: torch.rand(params[n].shape) < density for n in names}))
    elif kind == "torch":
        for n in names:
            mod = m.get_submodule(n.rpartition(".")[0])
            prune.random_unstructured(mod, "weight", amount=1 - density)
    return m, torch.optim.Adam(m.parameters(), 1e-3)


def step(m, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet300_100")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    kinds = ["dense", "ours", "torch"]
    runs = {k: make(k, args.model, args.density) for k in kinds}
    for k in kinds:  # warm up
        for _ in range(10):
            step(*runs[k], x, y)
    best = {k: float("inf") for k in kinds}
    for _ in range(args.repeats):  # interleave kinds so machine noise hits all alike
        for k in kinds:
            t = time.perf_counter()
            for _ in range(args.steps):
                step(*runs[k], x, y)
            best[k] = min(best[k], (time.perf_counter() - t) / args.steps)
    print(f"{args.model}, batch {args.batch}, density {args.density}, {args.threads} threads, "
          f"best of {args.repeats} x {args.steps} steps")
    for k in kinds:
        print(f"  {k:6s} {1e3 * best[k]:8.3f} ms/step   ratio to dense {best[k] / best['dense']:.3f}")


if __name__ == "__main__":
    main()
