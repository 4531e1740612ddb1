"""Inference latency of compacted networks against the dense one, side by side, with their FLOPs reduction.

Every structured method of the book ends with ``pruning_lib.gates.compact``: a physically smaller dense
network.  This script builds, for each model at a chapter's setting, the compacted networks that keep a given
fraction of the channels of every channel group (the channels with the largest filter L1 norm, as the
magnitude baseline of chapter 5 keeps them; which channels are kept does not change the cost, only how many),
and times them against the dense network on CPU in eval mode under ``torch.no_grad``:

  batch 1 and batch 256, the networks interleaved, best of ``--repeats`` rounds of ``--inner`` forwards.

It prints the measured speed-up (dense time / compacted time), the FLOPs reduction (dense FLOPs / compacted
FLOPs of the conv and linear layers, ``pruning_lib.metrics.layer_flops``) and their ratio, the *efficiency*
(1.0 is the physical limit; issue 15 asks for at least 0.8).

Settings (``--settings``):
  lenet5        LeNet-5-Caffe, width 1, 1x28x28 (chapters 4 and 5, ``cpu`` profile)
  resnet20      ResNet-20, width 0.25, 1x28x28 (chapter 5, ``cpu`` profile: 4 / 8 / 16 channels)
  resnet20_w1   ResNet-20, width 1, 3x32x32 (CIFAR-10 width, for comparison: 16 / 32 / 64 channels)

Every network is timed in its faster memory format (``--layout best``, the default, as the chapters time them:
contiguous NCHW and channels-last NHWC both timed, ``pruning_lib.timing.best_layout_forward_seconds``; the
formats chosen are printed) or in one format for all (``--layout contiguous`` / ``--layout channels_last``).
Options for finding where time goes: ``--threads``, ``--layout``, ``--multiple N`` (kept counts rounded up to
multiples of N: do channel counts that fill the kernels' blocks time closer to their FLOPs?).
Usage:
  python benchmarks/compact_latency.py [--settings lenet5,resnet20,resnet20_w1] [--keep 0.5,0.25]
                                       [--batches 1,256] [--threads 2] [--repeats 5] [--layout best]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from pruning_lib.gates import compact
from pruning_lib.metrics import layer_flops
from pruning_lib.models import build_model
from pruning_lib.timing import LAYOUTS, best_layout_forward_seconds

SETTINGS = {
    "lenet5": dict(model="lenet5_caffe", width=1.0, shape=(1, 28, 28)),
    "resnet20": dict(model="resnet20", width=0.25, shape=(1, 28, 28)),
    "resnet20_w1": dict(model="resnet20", width=1.0, shape=(3, 32, 32)),
}


def magnitude_keep(model: nn.Module, fraction: float, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Per channel group, the ``round(fraction * C)`` channels (at least 1; rounded up to a multiple of
    ``multiple`` where the group has that many) whose producer filters have the largest L1 norm."""
    keep = {}
    for g in model.channel_groups():
        w = model.get_submodule(g.producer).weight.detach()
        score = w.abs().flatten(1).sum(1)
        k = max(1, int(round(fraction * score.numel())))
        k = min(score.numel(), -(-k // multiple) * multiple)
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[score.topk(k).indices] = True
        keep[g.name] = mask
    return keep


def flops(model: nn.Module, shape) -> int:
    return sum(layer_flops(model, shape).values())


def channels(model: nn.Module) -> str:
    return "/".join(str(model.get_submodule(g.slot).channels) for g in model.channel_groups())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="lenet5,resnet20,resnet20_w1")
    ap.add_argument("--keep", default="0.5,0.25", help="fractions of channels kept per group")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layout", choices=("best", *LAYOUTS), default="best",
                    help="memory format of every network: each its faster one (best), or one for all")
    ap.add_argument("--multiple", type=int, default=1,
                    help="round each kept count up to a multiple of this (8, 16: the CPU kernels' channel blocks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keep.split(",")]
    print(f"CPU, {args.threads} threads, eval mode, no_grad, best of {args.repeats} interleaved rounds, "
          + ("each network in its faster memory format" if args.layout == "best" else f"all {args.layout}")
          + (f", kept counts rounded up to multiples of {args.multiple}" if args.multiple > 1 else ""))
    print(f"{'setting':12s} {'keep':>5s} {'channels kept':>16s} {'batch':>5s} {'dense ms':>9s} {'compact ms':>10s} "
          f"{'speed-up':>8s} {'FLOPs red.':>10s} {'efficiency':>10s}  layouts (dense / compact)")
    for name in args.settings.split(","):
        s = SETTINGS[name]
        torch.manual_seed(0)
        dense = build_model(s["model"], width=s["width"], in_channels=s["shape"][0], image_size=s["shape"][1:])
        dense.eval()
        nets = [compact(dense, magnitude_keep(dense, k, args.multiple)).eval() for k in keeps]
        f0 = flops(dense, s["shape"])
        reductions = [f0 / flops(n, s["shape"]) for n in nets]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, *s["shape"])
            models = [dense, *nets]
            inner = max(1, int(64 / batch ** 0.5))  # batch 1: 64 forwards per round, batch 256: 4
            t, fmt = best_layout_forward_seconds(models, x, args.repeats, inner, warmup=3,
                                                 layouts=tuple(LAYOUTS) if args.layout == "best" else (args.layout,))
            for k, net, red, tc, fc in zip(keeps, nets, reductions, t[1:], fmt[1:]):
                speed = t[0] / tc
                print(f"{name:12s} {k:5.2f} {channels(net):>16s} {batch:5d} {1e3 * t[0]:9.3f} {1e3 * tc:10.3f} "
                      f"{speed:8.2f} {red:10.2f} {speed / red:10.2f}  {fmt[0]} / {fc}")


if __name__ == "__main__":
    main()
