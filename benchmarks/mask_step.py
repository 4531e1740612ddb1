"""Cost of one training step under a mask, against the dense step, measured side by side.

Compares, on the same batches and in the same process:
  dense     - no mask;
  ours      - pruning_lib.masks.apply_mask (in-place zeroing + gradient hook + optimizer post-step hook);
  torch     - torch.nn.utils.prune (weight = weight_orig * weight_mask recomputed at every forward).
Prints the mean step time of each and the ratios to dense. Usage:
  python benchmarks/mask_step.py [--model lenet300_100|lenet5_caffe] [--steps 200] [--threads 2]
"""
from __future__ import annotations

import torch
from _timing import arguments, as_fit_trains, compare
from torch.nn.utils import prune

from pruning_lib.masks import Mask, apply_mask, prunable_names
from pruning_lib.models import build_model
from pruning_lib.train import adam


def make(kind: str, model_name: str, density: float, layout: str = "fit"):
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
    # after the mask, as in the chapters (fit converts the network it is given; torch.prune's own mask
    # computation cannot view a channels-last weight)
    m = as_fit_trains(m, layout)
    return m, adam(m.parameters(), 1e-3)


def main():
    ap = arguments(__doc__.splitlines()[0], model="lenet300_100", steps=200, batch=60)
    ap.add_argument("--density", type=float, default=0.2)
    args = ap.parse_args()
    print(f"density {args.density}")
    compare({k: make(k, args.model, args.density, args.layout) for k in ("dense", "ours", "torch")}, args,
            warmup=10)


if __name__ == "__main__":
    main()
