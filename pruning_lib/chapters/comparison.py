"""Chapter 7, "Which method, at what cost?": every method on one model, one budget, one axis (issue 14).

The chapter runs one or more experiments (``Config.experiments``, "model/dataset"), each on its own: every
method prunes that one network on that one dataset (:meth:`Config.experiment` gives an experiment's own
config, whose ``model`` and ``dataset`` name its units). In each, every method comes from the library,
trained for the same number of epochs (pre-training included), and is placed on one axis, the effective
FLOPs of the pruned network (:func:`pruning_lib.metrics.summary`; structured networks after compaction):

* unstructured, with a target (the weight sparsity ``1 - 1/c`` for each compression ``c``): random and
  global magnitude pruning of a pre-trained network, then fine-tuning (:mod:`pruning_lib.methods.criteria`);
  gradual magnitude pruning (:mod:`pruning_lib.methods.gmp`); IMP with rewinding and one-shot SNIP at
  initialisation, run by chapter 2's own code (:func:`pruning_lib.chapters.lottery_tickets.imp_chain`,
  :func:`pruning_lib.chapters.lottery_tickets.snip_round`); LNPT (chapter 6's method, :mod:`pruning_lib.methods.lnpt`):
  a fresh student pruned at initialisation by the label-free score towards the dense network of the
  pre-training phase (the teacher), then trained without labels for the rest of the budget;
* structured: L1-norm filter pruning with a FLOPs target (:mod:`pruning_lib.methods.l1_filter`),
  polarization with a target channel sparsity (:func:`pruning_lib.methods.polarization.train_polarized`), and L0-HC and
  Dep-L0 (:mod:`pruning_lib.methods.hard_concrete`), driven by a penalty on the expected FLOPs whose weight
  ``lambda`` is swept, and Bernoulli gates (chapter 4, :mod:`pruning_lib.methods.bernoulli`), whose unit
  cost ``kappa`` is swept: their points are placed by what they achieved;
* Scratch-B for each structured method (:mod:`pruning_lib.methods.scratch`).

Each run records what was requested and what was achieved. Verdicts: each method's curve against global
magnitude's (:mod:`pruning_lib.pareto`), and each structured method against its Scratch-B.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import claims, masks as masks_mod, metrics, pareto, plotting, timing
from ..methods import criteria as crit
from . import lottery_tickets as lottery
from .. import data as data_mod
from ..methods import hard_concrete as hc
from ..methods import polarization as polar
from .dense_baselines import dense_store, train_dense
from ..methods import gmp, l1_filter, scratch
from ..models import build_model
from .. import dense as dense_unit
from ..runs import RunConfig, Store, map_units, param, progress_bar
from ..train import default_device, evaluate, fit

CHAPTER = "07_comparison"
UNSTRUCTURED = ("random", "magnitude", "gmp", "imp", "snip", "lnpt")
STRUCTURED = ("l1_filter", "polarization", "l0_hc", "dep_l0", "bernoulli")
METHODS = UNSTRUCTURED + STRUCTURED
PENALTY_METHODS = ("l0_hc", "dep_l0", "bernoulli")
PRETRAINED = ("random", "magnitude", "l1_filter", "lnpt")  # start from the dense network after pretrain_epochs  # swept by a penalty weight, placed by what they achieved
REFERENCE = "magnitude"
METHOD_LABELS = {
    "dense": "dense", "random": "random + fine-tune", "magnitude": "global magnitude + fine-tune",
    "gmp": "GMP (Zhu & Gupta)", "imp": "IMP with rewinding", "snip": "SNIP at init",
    "l1_filter": "L1-filter + fine-tune", "polarization": "polarization", "l0_hc": "L0-HC", "dep_l0": "Dep-L0",
    "lnpt": "LNPT (label-free)", "bernoulli": "Bernoulli gates",
}
# Methods of the book this chapter does not run, and why (shown as rows of the methods table).
NOT_RUN: dict[str, str] = {}
MODELS = ("lenet300_100", "lenet5_caffe", "resnet20", "resnet56")
DATASETS = ("fashion_mnist", "mnist5k", "mnist", "synthetic-mnist", "synthetic-cifar", "cifar10")
# "model/dataset": every pairing of the small models and datasets, and ResNet-50 on ImageNet
EXPERIMENTS = tuple(f"{m}/{d}" for m in MODELS for d in DATASETS) + ("resnet50/imagenet",)
MODEL_NAMES = {"lenet300_100": "LeNet-300-100", "lenet5_caffe": "LeNet-5-Caffe", "resnet20": "ResNet-20",
               "resnet56": "ResNet-56", "resnet50": "ResNet-50"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist5k": "MNIST-5k", "mnist": "MNIST", "cifar10": "CIFAR-10",
                 "imagenet": "ImageNet", "synthetic-mnist": "a generated MNIST stand-in",
                 "synthetic-cifar": "a generated CIFAR stand-in"}
# Upper limits of an experiment's settings (:meth:`Config.experiment`): a larger value is lowered to the
# limit, a smaller one (a test's, a shorter run's) is kept. ResNet-50 on ImageNet trains the standard
# 90-epoch ImageNet schedule (times ``budget``; the paper profile's 160 epochs are CIFAR's), its
# pre-training keeping its share of the budget (80 of 160 -> 45 of 90); and one CPU forward pass of
# ResNet-50 at 224 x 224 (4 GFLOPs) took 0.15 s on one core here, so its latency table is timed at batch 32,
# best of 5 rounds (at batch 256, best of 30, its 20-odd networks would take many hours).
EXPERIMENT_LIMITS: dict[str, dict[str, float]] = {
    "resnet50/imagenet": dict(epochs=90.0, timing_batch=32, timing_repeats=5),
}


def experiment_label(experiment: str) -> str:
    """``resnet50/imagenet`` -> ``ResNet-50 on ImageNet``."""
    model, dataset = experiment.split("/")
    return f"{MODEL_NAMES.get(model, model)} on {DATASET_NAMES.get(dataset, dataset)}"


@dataclass(frozen=True)
class Config(RunConfig):
    """Settings of chapter 7 (``None`` in a notebook means "the profile's value").

    ``experiments`` lists the runs of the chapter, each one network on one dataset; every other setting
    is shared by them (up to :data:`EXPERIMENT_LIMITS`). An experiment's own config
    (:meth:`experiment`) names its units: ``model``, ``dataset`` and the hashed settings, exactly as a
    config of that one experiment did before the chapter took several, so their cached units are reused."""

    experiments: tuple[str, ...] = param(("lenet300_100/fashion_mnist",), choices=EXPERIMENTS,
                                         help="model/dataset pairs, each run on its own: every method prunes "
                                              "that one network on that one dataset")
    methods: tuple[str, ...] = param(METHODS, choices=METHODS, help="methods to run")
    compressions: tuple[float, ...] = param((2.0, 4.0, 8.0, 16.0, 32.0), low=1.0,
                                            help="targets: x fewer weights (unstructured) or FLOPs (structured)")
    lambdas: tuple[float, ...] = param((1.0, 1.6, 2.5, 4.0, 6.5), low=0.0,
                                       help="penalty sweep of L0-HC / Dep-L0 (weight of expected FLOPs kept)")
    seeds: tuple[int, ...] = param((0, 1, 2), low=0)
    epochs: float = param(1.0, low=0.01, help="training budget of every method, in epochs, pre-training included")
    pretrain_epochs: float = param(0.5, low=0.0, help="dense pre-training of prune-then-fine-tune methods")
    batch_size: int = param(128, low=1)
    lr: float = param(1e-3, low=0.0, help="Adam learning rate of the weights")
    gate_lr: float = param(0.1, low=0.0, help="Adam learning rate of the L0-HC / Dep-L0 gates")
    polarization_gate_lr: float = param(0.01, low=0.0, help="Adam learning rate of polarization's gating modules")
    init_log_alpha: float = param(3.0, help="initial log alpha of the hard-concrete gates")
    bernoulli_costs: tuple[float, ...] = param((0.1, 0.2, 0.4, 0.8, 1.6), low=0.0,
                                               help="Bernoulli gates: sweep of the unit cost kappa (nats per "
                                                    "parameter of an active unit)")
    theta_init: float = param(0.9, low=0.0, high=1.0, help="Bernoulli gates: initial theta of every unit")
    theta_lr: float = param(3.0, low=0.0, help="Bernoulli gates: theta's SGD step a at the start")
    theta_tau: float = param(1.5, low=0.0, help="Bernoulli gates: tau in epochs of the step a / (1 + t / tau)")
    flip_examples: int = param(16, low=1, help="Bernoulli gates: flipped examples per step of the estimator")
    check_every: int = param(10, low=1, help="Bernoulli gates: units at theta = 1 estimated every N steps")
    lnpt_score_batches: int = param(10, low=1, help="LNPT: unlabelled batches the pruning score sums over")
    lnpt_temperature: float = param(4.0, low=0.01, help="LNPT: distillation temperature")
    lnpt_gap_weight: float = param(1.0, low=0.0, help="LNPT: weight of the learning gap in the label-free loss")
    lnpt_kd_weight: float = param(1.0, low=0.0, help="LNPT: weight of distillation in the label-free loss")
    polarizer_weight: float = param(2.0, low=0.0, help="polarization: weight of the polarizer")
    density_weight: float = param(10.0, low=0.0, help="polarization: weight of the density loss")
    gmp_start: float = param(0.1, low=0.0, high=1.0, help="GMP: first pruning step, fraction of the run")
    gmp_end: float = param(0.6, low=0.0, high=1.0, help="GMP: last pruning step, fraction of the run")
    gmp_steps: int = param(20, low=1, help="GMP: number of pruning steps n")
    imp_rate: float = param(0.5, low=0.01, high=0.99, help="IMP: share of the surviving weights pruned per round")
    rewind_iteration: int = param(50, low=0, help="IMP: late rewinding to this iteration (0: to init)")
    scratch_cap: float = param(2.0, low=1.0, help="Scratch-B trains at most this many times the method's steps")
    evals_per_epoch: int = param(4, low=1, high=100)
    settle_tol: float = param(0.02, low=0.0, help="a run settled if validation accuracy moved < this over the "
                                                 "last quarter of its (last) training phase")
    overlap_compression: float = param(8.0, low=1.0, help="compression at which masks are compared")
    timing_batch: int = param(256, low=1, help="the large batch of the latency measurement")
    timing_repeats: int = param(30, low=1, help="best of this many interleaved rounds")
    timing_threads: int = param(2, low=1, high=256, help="torch threads of the latency measurement (so a "
                                                         "chapter run beside another times alike)")
    workers: int = param(1, low=1, high=64, help="processes running units in parallel (not hashed)")
    data_root: str = param("data")
    results_dir: str = param("results")

    NOT_HASHED: ClassVar[tuple[str, ...]] = RunConfig.NOT_HASHED + ("data_root", "timing_repeats", "timing_threads",
                                                                  "workers")
    BUDGETED: ClassVar[tuple[str, ...]] = ("epochs", "pretrain_epochs")
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: the generated stand-in, two levels, one seed; numbers mean nothing
        "smoke": dict(experiments=("lenet300_100/synthetic-mnist",), compressions=(2.0, 8.0), lambdas=(1.0, 8.0),
                      seeds=(0,), bernoulli_costs=(0.1, 1.6), lnpt_score_batches=2,
                      epochs=1.0, pretrain_epochs=0.5, batch_size=64, rewind_iteration=2, gmp_steps=4,
                      timing_repeats=2, timing_batch=32, evals_per_epoch=2),
        # LeNet-300-100 on Fashion-MNIST, about 9 minutes cold on 2 cores. LeNet-5-Caffe took 59 min more
        # (every method but IMP and SNIP, 5 levels, 3 seeds, 2026-12-02): add it with
        # -p experiments "[lenet300_100/fashion_mnist, lenet5_caffe/fashion_mnist]"
        "cpu": dict(experiments=("lenet300_100/fashion_mnist",)),
        # GPU: ResNet-20 on CIFAR-10 and ResNet-50 on ImageNet, Adam at the same rate and batch for both (the
        # chapter's one optimizer, not the ImageNet papers' SGD), ResNet-50 for 90 epochs (45 of pre-training;
        # EXPERIMENT_LIMITS). IMP and SNIP need a chapter-2 setup (none for either), Bernoulli gates' estimator
        # plain feed-forward networks: not run. ResNet-50 has 126 units before Scratch-B (2 dense networks and
        # 40 points per seed: 8,505 epochs of ImageNet) and 60 Scratch-B units of up to 180 epochs each (of
        # their smaller networks): not measured on a GPU yet
        "paper": dict(experiments=("resnet20/cifar10", "resnet50/imagenet"), epochs=160.0, pretrain_epochs=80.0,
                      lr=1e-3, rewind_iteration=500, seeds=(0, 1, 2), evals_per_epoch=1),
    }

    def check(self) -> None:
        from ..runs import ConfigError
        twice = sorted({e for e in self.experiments if self.experiments.count(e) > 1})
        if twice:
            raise ConfigError(f"parameter 'experiments': {twice} given more than once")
        if self.pretrain_epochs >= self.epochs:
            raise ConfigError("parameter 'pretrain_epochs': must be less than 'epochs' (the whole budget)")
        if self.gmp_end < self.gmp_start:
            raise ConfigError("parameter 'gmp_end': must not come before 'gmp_start'")
        if not self.seeds or not self.methods:
            raise ConfigError("parameters 'seeds' and 'methods': give at least one")

    def experiment(self, experiment: str | None = None) -> "Config":
        """The config of one experiment of ``experiments`` (the only one when ``None``): ``experiments`` is
        that one, and :data:`EXPERIMENT_LIMITS` apply (the epochs cap scales with ``budget``, pre-training
        keeps its share of the budget). Its ``model`` and ``dataset`` name its units; applying it twice
        changes nothing."""
        if experiment is None:
            experiment = self._only()
        if experiment not in self.experiments:
            raise ValueError(f"{experiment!r} is not one of this config's experiments {list(self.experiments)}")
        limits = EXPERIMENT_LIMITS.get(experiment, {})
        changes: dict[str, Any] = {"experiments": (experiment,)}
        cap = limits.get("epochs")
        if cap is not None and self.epochs > cap * self.budget:
            epochs = cap * self.budget
            changes.update(epochs=epochs, pretrain_epochs=self.pretrain_epochs * epochs / self.epochs)
        for name in ("timing_batch", "timing_repeats"):
            if name in limits and getattr(self, name) > limits[name]:
                changes[name] = int(limits[name])
        return self.replace(**changes)

    def _only(self) -> str:
        """The config's one experiment; a ValueError naming them when it holds several."""
        if len(self.experiments) != 1:
            raise ValueError(f"this config holds {len(self.experiments)} experiments {list(self.experiments)}: "
                             "name one, or take one with cfg.experiment(name)")
        return self.experiments[0]

    @property
    def model(self) -> str:
        """The network of this config's one experiment (see :meth:`experiment`)."""
        return self._only().split("/")[0]

    @property
    def dataset(self) -> str:
        """The dataset of this config's one experiment."""
        return self._only().split("/")[1]

    @property
    def setup(self) -> str:
        """Chapter 2's setup for this model and dataset (IMP and SNIP run through it)."""
        return f"{self.model}/{self.dataset}"


def label(method: str) -> str:
    if method.startswith("scratch_b:"):
        return f"Scratch-B of {METHOD_LABELS[method.split(':', 1)[1]]}"
    return METHOD_LABELS.get(method, method)


# --------------------------------------------------------------------------------------------------
# shared pieces

def steps_per_epoch(cfg: Config, data) -> int:
    return data_mod.num_batches(data.train, cfg.batch_size)


def _eval_every(cfg: Config, data) -> int:
    return max(1, steps_per_epoch(cfg, data) // cfg.evals_per_epoch)


def _build(cfg: Config, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg.model, **data.model_kwargs())


def _base_spec(cfg: Config, seed: int) -> dict:
    return dict(model=cfg.model, dataset=cfg.dataset, seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                lr=cfg.lr, evals_per_epoch=cfg.evals_per_epoch)


def dense(cfg: Config, data, seed: int, epochs: float):
    """Chapter 1's dense unit (:func:`.dense_baselines.train_dense`), shared with every chapter that
    asks for the same network: ``(model, history)``."""
    return train_dense(cfg.model, cfg.dataset, seed, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       evals_per_epoch=cfg.evals_per_epoch, results_dir=cfg.results_dir,
                       data_root=cfg.data_root, progress=False, data=data)


def _weights(model: nn.Module) -> int:
    """Conv and linear weights (what the unstructured sparsity counts)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, masks_mod.PRUNABLE_TYPES))


def unit_mask(model: nn.Module, keep: dict[str, torch.Tensor]) -> masks_mod.Mask:
    """The weight mask (on the uncompacted ``model``) that removing the channels not in ``keep`` amounts to:
    a removed channel's incoming weights (its producer's row) and outgoing weights (its consumers' inputs)."""
    mask = masks_mod.Mask.ones_like(model)
    for g in model.channel_groups():
        k = keep.get(g.name)
        if k is None:
            continue
        off = ~k.bool().cpu()
        mask[f"{g.producer}.weight"][off] = False
        for path in g.consumers:
            name = f"{path}.weight"
            if name not in mask:
                continue
            w = mask[name]
            cols = off.repeat_interleave(g.spatial) if isinstance(model.get_submodule(path), nn.Linear) else off
            w[:, cols] = False
    return mask


def _settled(cfg: Config, history: pd.DataFrame) -> bool:
    return claims.settled(history, "val_accuracy", cfg.settle_tol, time="step")


def _row(cfg: Config, data, method: str, level: float, seed: int, net: nn.Module, mask, history: pd.DataFrame,
         *, requested: float, requested_unit: str, requested_sparsity: float, achieved_sparsity: float,
         epochs: float, seconds: float, dense_ref: dict) -> dict:
    """One point: where it lies (effective parameters and FLOPs), how accurate, what it cost."""
    shape = tuple(data.input_shape)
    net.eval()
    s = metrics.summary(net, shape, mask)
    test = evaluate(net, data.test)["accuracy"]
    val = evaluate(net, data.val)["accuracy"]
    return dict(method=method, level=float(level), seed=seed, requested=requested, requested_unit=requested_unit,
                requested_sparsity=requested_sparsity, achieved_sparsity=achieved_sparsity,
                effective_params=s["effective_params"], effective_flops=s["effective_flops"],
                params_reduction=dense_ref["params"] / s["effective_params"],
                flops_reduction=dense_ref["flops"] / max(s["effective_flops"], 1),
                accuracy=test, val_accuracy=val, epochs=epochs, steps=int(history["step"].iloc[-1]),
                seconds=seconds, settled=_settled(cfg, history))


def _dense_ref(cfg: Config, data) -> dict:
    """The dense network's parameters, FLOPs and prunable weights (what reductions are relative to)."""
    return dict(_dense_counts(cfg.model, tuple(sorted(data.model_kwargs().items())), tuple(data.input_shape)))


@functools.lru_cache(maxsize=8)
def _dense_counts(model: str, kwargs: tuple, shape: tuple) -> dict:
    # once per process and architecture: every unit asks, and building ResNet-50 to count it takes 0.5 s
    torch.manual_seed(0)
    net = build_model(model, **dict(kwargs))
    s = metrics.summary(net, shape)
    return {"params": s["params"], "flops": s["flops"], "weights": _weights(net)}


def point_spec(cfg: Config, method: str, level: float, seed: int) -> tuple[str, dict]:
    """``(kind, spec)`` of one point's cached unit (``results/comparison/<kind>/<hash>/``): what names it.
    The run and the command-line listing (:func:`work_units`) both build it here."""
    base = _base_spec(cfg, seed)
    if method in ("random", "magnitude", "l1_filter"):
        return "prune_finetune", {**base, "method": method, "compression": level,
                                  "pretrain_epochs": cfg.pretrain_epochs}
    if method == "gmp":
        return "gmp", {**base, "method": "gmp", "compression": level, "gmp_start": cfg.gmp_start,
                       "gmp_end": cfg.gmp_end, "gmp_steps": cfg.gmp_steps}
    if method in ("l0_hc", "dep_l0"):
        return "hard_concrete", {**base, "method": method, "lambda": level, "gate_lr": cfg.gate_lr,
                                 "init_log_alpha": cfg.init_log_alpha}
    if method == "polarization":
        return "polarization", {**base, "method": "polarization", "compression": level,
                                "gate_lr": cfg.polarization_gate_lr, "polarizer_weight": cfg.polarizer_weight,
                                "density_weight": cfg.density_weight}
    if method == "lnpt":
        return "lnpt", {**base, "method": "lnpt", "compression": level, "pretrain_epochs": cfg.pretrain_epochs,
                        "score_batches": cfg.lnpt_score_batches, "temperature": cfg.lnpt_temperature,
                        "gap_weight": cfg.lnpt_gap_weight, "kd_weight": cfg.lnpt_kd_weight}
    if method == "bernoulli":
        return "bernoulli", {**base, "method": "bernoulli", "unit_cost": level, "theta_init": cfg.theta_init,
                             "theta_lr": cfg.theta_lr, "theta_tau": cfg.theta_tau,
                             "flip_examples": cfg.flip_examples, "check_every": cfg.check_every}
    # IMP and SNIP train and cache in chapter 2's own units; these small units hold their rows
    if method == "imp":  # the whole chain of one seed, every round a point
        return "imp", {**base, "method": "imp", "imp_rate": cfg.imp_rate, "rounds": imp_rounds(cfg),
                       "rewind_iteration": cfg.rewind_iteration}
    if method == "snip":
        return "snip", {**base, "method": "snip", "compression": level, "rewind_iteration": cfg.rewind_iteration}
    raise ValueError(f"unknown method {method!r}")


def point_store(cfg: Config, method: str, level: float, seed: int) -> Store:
    kind, spec = point_spec(cfg, method, level, seed)
    return Store(cfg.results_dir, f"comparison/{kind}", spec)


def _unit(cfg: Config, kind: str, spec: dict, compute) -> dict:
    """A cached unit: ``compute()`` returns ``{"row": ..., "history": ..., "mask"/"keep": ...}``."""
    def timed():
        t0 = time.perf_counter()
        out = compute()
        out["row"]["unit_seconds"] = time.perf_counter() - t0
        return out
    return Store(cfg.results_dir, f"comparison/{kind}", spec).torch("unit", timed)


# --------------------------------------------------------------------------------------------------
# the units, one per (method, level, seed)

def prune_finetune_unit(cfg: Config, data, method: str, c: float, seed: int, dense_ref: dict) -> dict:
    """random / magnitude (unstructured, global, ``1 - 1/c`` of the weights) or L1-filter (structured, FLOPs
    / c) applied to chapter 1's dense network after ``pretrain_epochs``, then fine-tuned for the rest of the
    budget."""
    kind, spec = point_spec(cfg, method, c, seed)

    def compute():
        net, pre_hist = dense(cfg, data, seed, cfg.pretrain_epochs)
        net = net.cpu()
        ft_epochs = cfg.epochs - cfg.pretrain_epochs
        keep = mask = None
        if method == "l1_filter":
            net, keep = l1_filter.prune(net, tuple(data.input_shape), c)
            requested_unit, requested_sparsity = "FLOPs", 1 - 1 / c
        else:
            ctx = crit.ScoreContext(net, generator=torch.Generator().manual_seed(seed * 7919 + int(c * 16)))
            mask = crit.prune(method, ctx, 1 - 1 / c, scope="global").cpu()
            masks_mod.apply_mask(net, mask)
            requested_unit, requested_sparsity = "weights", 1 - 1 / c
        hist = fit(net, data, lr=cfg.lr, epochs=ft_epochs, batch_size=cfg.batch_size,
                   eval_every=_eval_every(cfg, data), seed=seed + 1, progress=False, desc=f"{method} x{c:g}")
        net = net.cpu()
        if mask is not None:
            achieved = mask.sparsity
            masks_mod.make_permanent(net)
        else:
            achieved = 1 - metrics.summary(net, tuple(data.input_shape))["flops"] / dense_ref["flops"]
        seconds = float(pre_hist["seconds"].iloc[-1] + hist["seconds"].iloc[-1])
        row = _row(cfg, data, method, c, seed, net, mask, hist, requested=c, requested_unit=requested_unit,
                   requested_sparsity=requested_sparsity, achieved_sparsity=achieved, epochs=cfg.epochs,
                   seconds=seconds, dense_ref=dense_ref)
        return {"row": row, "history": hist, "mask": mask, "keep": keep}
    return _unit(cfg, kind, spec, compute)


def gmp_unit(cfg: Config, data, c: float, seed: int, dense_ref: dict) -> dict:
    """Gradual magnitude pruning from a fresh network to ``1 - 1/c`` of the weights in the whole budget."""
    kind, spec = point_spec(cfg, "gmp", c, seed)

    def compute():
        net = _build(cfg, data, seed)
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, data)))
        start, end, every = gmp.schedule_steps(total, cfg.gmp_start, cfg.gmp_end, cfg.gmp_steps)
        cb = gmp.GradualMagnitudePruning(net, 1 - 1 / c, start, end, every)
        hist = fit(net, data, lr=cfg.lr, iterations=total, batch_size=cfg.batch_size, callbacks=[cb],
                   eval_every=_eval_every(cfg, data), seed=seed, progress=False, desc=f"gmp x{c:g}")
        net = net.cpu()
        mask = cb.mask.cpu()
        masks_mod.make_permanent(net)
        row = _row(cfg, data, "gmp", c, seed, net, mask, hist, requested=c, requested_unit="weights",
                   requested_sparsity=1 - 1 / c, achieved_sparsity=mask.sparsity, epochs=cfg.epochs,
                   seconds=float(hist["seconds"].iloc[-1]), dense_ref=dense_ref)
        return {"row": row, "history": hist, "mask": mask, "keep": None}
    return _unit(cfg, kind, spec, compute)


def lottery_config(cfg: Config, data) -> lottery.Config:
    """Chapter 2's settings for IMP and SNIP under this chapter's budget: one global rate per round,
    ``epochs`` of training per round (every round of IMP trains the whole budget again), Adam at ``lr``."""
    iterations = max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, data)))
    return lottery.Config(profile=cfg.profile, setups=(cfg.setup,), criteria=("magnitude",),
                          seeds=cfg.seeds, rounds=imp_rounds(cfg), scope="global", global_rate=cfg.imp_rate,
                          rewind_iteration=min(cfg.rewind_iteration, iterations - 1), iterations=iterations,
                          patience=None, lr=cfg.lr, batch_size=cfg.batch_size, eval_every=_eval_every(cfg, data),
                          init="default", reinit_criteria=("magnitude",),
                          snip_densities=tuple(1 / c for c in cfg.compressions), workers=1,
                          results_dir=cfg.results_dir)


def imp_rounds(cfg: Config) -> int:
    """Rounds of IMP that reach the largest compression: ``(1 - rate)^r <= 1 / max(c)``."""
    return max(1, math.ceil(math.log(max(cfg.compressions)) / -math.log(1 - cfg.imp_rate) - 1e-9))


def _mask_row(cfg, data, method, level, seed, mask, hist, requested, epochs, dense_ref, seconds):
    net = _build(cfg, data, seed)  # the architecture, for counting; accuracy comes from the run itself
    shape = tuple(data.input_shape)
    s = metrics.summary(net, shape, mask)
    last = hist.iloc[-1]
    return dict(method=method, level=float(level), seed=seed, requested=requested, requested_unit="weights",
                requested_sparsity=1 - 1 / requested, achieved_sparsity=mask.sparsity,
                effective_params=s["effective_params"], effective_flops=s["effective_flops"],
                params_reduction=dense_ref["params"] / s["effective_params"],
                flops_reduction=dense_ref["flops"] / max(s["effective_flops"], 1),
                accuracy=float(last["test_accuracy"]), val_accuracy=float(last["val_accuracy"]), epochs=epochs,
                steps=int(last["step"]), seconds=seconds, settled=_settled(cfg, hist))


def imp_points(cfg: Config, data, seed: int, dense_ref: dict) -> list[dict]:
    """IMP with rewinding, chapter 2's :func:`~pruning_lib.chapters.lottery_tickets.imp_chain` (cached
    there): one point per round, at ``(1 - imp_rate)^r`` of the weights; round r has trained ``r + 1`` times
    the budget. The points are kept in a small unit of this chapter (the chain's rounds stay chapter 2's)."""
    kind, spec = point_spec(cfg, "imp", 0.0, seed)

    def compute():
        lcfg = lottery_config(cfg, data)
        unit = lottery.Unit(lcfg, cfg.setup, data)
        records = lottery.imp_chain(unit, seed, "magnitude", lcfg.rounds)
        out, seconds = [], 0.0
        for rec in records:
            seconds += float(rec["history"]["seconds"].iloc[-1])
            if rec["round"] == 0:
                continue
            c = 1 / (1 - cfg.imp_rate) ** rec["round"]
            row = _mask_row(cfg, data, "imp", c, seed, rec["mask"], rec["history"], c,
                            cfg.epochs * (rec["round"] + 1), dense_ref, seconds)
            out.append({"row": row, "history": rec["history"], "mask": rec["mask"], "keep": None})
        return {"points": out}
    return Store(cfg.results_dir, f"comparison/{kind}", spec).torch("unit", compute)["points"]


def snip_point(cfg: Config, data, c: float, seed: int, dense_ref: dict) -> dict:
    """One-shot SNIP at initialisation to ``1/c`` of the weights, then the budget's training, through chapter
    2's :func:`~pruning_lib.chapters.lottery_tickets.snip_round` (cached there)."""
    kind, spec = point_spec(cfg, "snip", c, seed)

    def compute():
        lcfg = lottery_config(cfg, data)
        rec = lottery.snip_round(lottery.Unit(lcfg, cfg.setup, data), seed, 1 / c)
        row = _mask_row(cfg, data, "snip", c, seed, rec["mask"], rec["history"], c, cfg.epochs, dense_ref,
                        float(rec["history"]["seconds"].iloc[-1]))
        return {"row": row, "history": rec["history"], "mask": rec["mask"], "keep": None}
    return Store(cfg.results_dir, f"comparison/{kind}", spec).torch("unit", compute)


def hard_concrete_unit(cfg: Config, data, method: str, lam: float, seed: int, dense_ref: dict) -> dict:
    """L0-HC or Dep-L0 (forward chain) trained from scratch for the budget with the penalty
    ``lam * E[FLOPs] / FLOPs`` (:class:`~pruning_lib.methods.hard_concrete.CostModel`), then compacted."""
    kind, spec = point_spec(cfg, method, lam, seed)

    def compute():
        net = _build(cfg, data, seed)
        shape = tuple(data.input_shape)
        cost = hc.CostModel(net, shape)
        nominal = float(cost.nominal_flops())
        if method == "l0_hc":
            hc.attach_l0_gates(net, cfg.init_log_alpha)
        else:
            hc.attach_dep_l0_gates(net, "forward", cfg.init_log_alpha)
        pruning = hc.HardConcretePruning(net, lambda m: lam * cost.expected_flops(m) / nominal, cfg.gate_lr,
                                         name="flops")
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, data)))
        hist = fit(net, data, method=pruning, lr=cfg.lr, iterations=total, batch_size=cfg.batch_size,
                   eval_every=_eval_every(cfg, data), seed=seed, progress=False, desc=f"{method} λ={lam:g}")
        net = net.cpu().eval()
        keep, _ = hc.keep_and_scale(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an emptied group keeps one zeroed channel
            small = hc.compact_gated(net)
        achieved = 1 - metrics.summary(small, shape)["flops"] / dense_ref["flops"]
        row = _row(cfg, data, method, lam, seed, small, None, hist, requested=float("nan"), requested_unit="—",
                   requested_sparsity=float("nan"), achieved_sparsity=achieved, epochs=cfg.epochs,
                   seconds=float(hist["seconds"].iloc[-1]), dense_ref=dense_ref)
        return {"row": row, "history": hist, "mask": None, "keep": {k: v.cpu() for k, v in keep.items()}}
    return _unit(cfg, kind, spec, compute)


def polarization_unit(cfg: Config, data, c: float, seed: int, dense_ref: dict) -> dict:
    """Polarization (chapter 5's :func:`~pruning_lib.methods.polarization.train_polarized`) from scratch for the budget
    with target channel sparsity ``1 - 1/c`` in every layer; the consensus gates on the validation split
    decide what compaction removes."""
    kind, spec = point_spec(cfg, "polarization", c, seed)

    def compute():
        net = _build(cfg, data, seed)
        hist, _ = polar.train_polarized(net, data, target=1 - 1 / c, polarizer_weight=cfg.polarizer_weight,
                                        density_weight=cfg.density_weight, epochs=cfg.epochs,
                                        batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=cfg.polarization_gate_lr,
                                        seed=seed)
        net = net.cpu().eval()
        keep = polar.static_keep(polar.gate_statistics(net, data.val))
        achieved = polar.keep_sparsity(net, keep, "layer")
        small = polar.compact_static(net, keep)
        row = _row(cfg, data, "polarization", c, seed, small, None, hist, requested=c,
                   requested_unit="channels per layer", requested_sparsity=1 - 1 / c, achieved_sparsity=achieved,
                   epochs=cfg.epochs, seconds=float(hist["seconds"].iloc[-1]), dense_ref=dense_ref)
        return {"row": row, "history": hist, "mask": None, "keep": {k: v.cpu() for k, v in keep.items()}}
    return _unit(cfg, kind, spec, compute)


def lnpt_unit(cfg: Config, data, c: float, seed: int, dense_ref: dict) -> dict:
    """LNPT (Xiao et al. 2024; chapter 6's method) within this chapter's budget. The dense network after
    ``pretrain_epochs`` is the mature teacher (trained with labels, as the paper's cloud model is); a fresh
    student of the same architecture is pruned at initialisation to ``1 - 1/c`` of its weights by the
    label-free score (SNIP's ``|w * dL/dw|`` with the learning gap plus distillation as ``L``, summed over
    ``lnpt_score_batches`` unlabelled batches, global ranking) and trained without labels for the rest of the
    budget (:func:`pruning_lib.methods.lnpt.train_label_free`). Pre-training and the student's training make
    the budget, as for random and magnitude pruning. The student never reads a label: they are withheld."""
    kind, spec = point_spec(cfg, "lnpt", c, seed)

    def compute():
        from ..methods import lnpt as lnpt_method

        teacher_net, pre_hist = dense(cfg, data, seed, cfg.pretrain_epochs)
        # the teacher's answers for an in-memory training split are computed once (exact either way)
        cached = isinstance(data.train, data_mod.TensorSplit)
        teacher = lnpt_method.TeacherOutputs(teacher_net.to(default_device()),
                                             cache_x=data.train.x if cached else None)
        gap_scale = teacher.mean_sq_norm(None if cached else lnpt_method.stack_inputs(data.train, 2048))
        student = _build(cfg, data, seed + 1_000_003)  # a fresh initialisation, not the teacher's
        loss = lnpt_method.LabelFreeLoss(teacher, gap_weight=cfg.lnpt_gap_weight, kd_weight=cfg.lnpt_kd_weight,
                                         temperature=cfg.lnpt_temperature, gap_scale=gap_scale)
        gen = torch.Generator().manual_seed(seed)
        unlabelled = data_mod.batches(lnpt_method.withhold_labels(data.train), cfg.batch_size, shuffle=True,
                                      generator=gen)
        score_batches = [b for _, b in zip(range(cfg.lnpt_score_batches), unlabelled)]
        scores = lnpt_method.label_free_scores(student, loss, score_batches)
        mask = masks_mod.mask_from_scores(scores, 1 - 1 / c, scope="global")
        masks_mod.apply_mask(student, mask)
        hist = lnpt_method.train_label_free(
            student, teacher, data, gap_weight=cfg.lnpt_gap_weight, kd_weight=cfg.lnpt_kd_weight,
            temperature=cfg.lnpt_temperature, gap_scale=gap_scale, lr=cfg.lr,
            epochs=cfg.epochs - cfg.pretrain_epochs, batch_size=cfg.batch_size, eval_every=_eval_every(cfg, data),
            seed=seed + 1, progress=False, desc=f"lnpt x{c:g}")
        student = student.cpu()
        mask = masks_mod.current_mask(student).cpu()
        masks_mod.make_permanent(student)
        seconds = float(pre_hist["seconds"].iloc[-1] + hist["seconds"].iloc[-1])
        row = _row(cfg, data, "lnpt", c, seed, student, mask, hist, requested=c, requested_unit="weights",
                   requested_sparsity=1 - 1 / c, achieved_sparsity=mask.sparsity, epochs=cfg.epochs,
                   seconds=seconds, dense_ref=dense_ref)
        return {"row": row, "history": hist, "mask": mask, "keep": None}
    return _unit(cfg, kind, spec, compute)


def bernoulli_unit(cfg: Config, data, kappa: float, seed: int, dense_ref: dict) -> dict:
    """Bernoulli gates (Guenter & Sideris 2022; chapter 4's :class:`~pruning_lib.methods.bernoulli.BernoulliPruning`)
    trained from scratch for the budget with unit cost ``kappa``: units whose ``theta`` reaches 0 are removed
    during training; the network left is compacted with its eval-mode gates (``theta``) folded in. Placed
    by the FLOPs it achieved. ``theta_lr`` is ours: chapter 4's 30 (for 4,000 training images) drove every
    unit of LeNet-300-100 to 0 within one epoch of Fashion-MNIST's 55,000 in a probe."""
    kind, spec = point_spec(cfg, "bernoulli", kappa, seed)

    def compute():
        from ..gates import families
        from ..methods import bernoulli as bern

        net = _build(cfg, data, seed)
        bern.attach_bernoulli_gates(net, cfg.theta_init)
        spe = steps_per_epoch(cfg, data)
        bp = bern.BernoulliPruning(net, len(data.train), unit_cost=kappa, theta_lr=cfg.theta_lr,
                                   theta_tau=cfg.theta_tau * spe, flip_examples=cfg.flip_examples,
                                   check_every=cfg.check_every, shrink_every=5, record_every=0, seed=seed)
        total = max(1, math.ceil(cfg.epochs * spe))
        hist = fit(net, data, method=bp, lr=cfg.lr, iterations=total, batch_size=cfg.batch_size,
                   eval_every=_eval_every(cfg, data), seed=seed, progress=False, desc=f"bernoulli κ={kappa:g}")
        bp.remove_dead(bp._opts)
        net = net.cpu().eval()
        family = families.get("bernoulli")
        keep, _ = family.decide(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an emptied group keeps one zeroed channel
            small = family.compact(net)
        achieved = 1 - metrics.summary(small, tuple(data.input_shape))["flops"] / dense_ref["flops"]
        row = _row(cfg, data, "bernoulli", kappa, seed, small, None, hist, requested=float("nan"),
                   requested_unit="—", requested_sparsity=float("nan"), achieved_sparsity=achieved,
                   epochs=cfg.epochs, seconds=float(hist["seconds"].iloc[-1]), dense_ref=dense_ref)
        row["undecided"] = bern.undecided_fraction(bern.gate_thetas(net))
        return {"row": row, "history": hist, "mask": None, "keep": _full_keep(cfg, data, bp, keep)}
    return _unit(cfg, kind, spec, compute)


def _full_keep(cfg: Config, data, bp, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``keep`` over the *original* units: Bernoulli pruning removes units during training, so the gates left
    index the survivors; :attr:`BernoulliPruning.orig_index` maps them back."""
    out = {}
    for name, k in keep.items():
        full = torch.zeros(bp.initial_width[name], dtype=torch.bool)
        full[bp.orig_index[name][k.cpu()]] = True
        out[name] = full
    return out


def architecture(cfg: Config, data, seed: int, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The compacted architecture ``keep`` describes, on a network built from ``seed`` (weights do not
    matter: Scratch-B re-initialises them, the latency depends on shapes only)."""
    return polar.compact_static(_build(cfg, data, seed), keep)


def scratch_spec(cfg: Config, point: dict) -> dict:
    """What names a Scratch-B unit: the structured point's architecture (its kept units) and the budget."""
    row = point["row"]
    return {**_base_spec(cfg, int(row["seed"])), "scratch_of": row["method"], "level": row["level"],
            "scratch_cap": cfg.scratch_cap, "architecture": {k: v.int().tolist() for k, v in point["keep"].items()}}


def scratch_unit(cfg: Config, data, point: dict, dense_ref: dict) -> dict:
    """Scratch-B of one structured point: its compacted architecture, fresh weights, the method's steps times
    its FLOPs reduction (at most ``scratch_cap`` times)."""
    row = point["row"]
    method, seed = row["method"], int(row["seed"])
    spec = scratch_spec(cfg, point)

    def compute():
        small = scratch.fresh_copy(architecture(cfg, data, seed, point["keep"]), seed + 1_000_003)
        method_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, data)))
        small_flops = metrics.summary(small, tuple(data.input_shape))["flops"]
        steps = scratch.scratch_b_steps(method_steps, dense_ref["flops"], small_flops, cfg.scratch_cap)
        hist = fit(small, data, lr=cfg.lr, iterations=steps, batch_size=cfg.batch_size,
                   eval_every=_eval_every(cfg, data), seed=seed, progress=False, desc=f"scratch-B {method}")
        small = small.cpu()
        out = _row(cfg, data, f"scratch_b:{method}", row["level"], seed, small, None, hist,
                   requested=row["requested"], requested_unit="architecture of " + method,
                   requested_sparsity=row["achieved_sparsity"], achieved_sparsity=row["achieved_sparsity"],
                   epochs=steps / steps_per_epoch(cfg, data), seconds=float(hist["seconds"].iloc[-1]),
                   dense_ref=dense_ref)
        out["method_steps"] = method_steps
        return {"row": out, "history": hist, "mask": None, "keep": point["keep"]}
    return _unit(cfg, "scratch_b", spec, compute)


# --------------------------------------------------------------------------------------------------
# the run

def plan(cfg: Config) -> list[tuple[str, float, int]]:
    """Every (method, level, seed) point the run produces (IMP: its rounds), experiment after experiment."""
    out = []
    for e in cfg.experiments:
        ecfg = cfg.experiment(e)
        for m in ecfg.methods:
            if why_not_run(ecfg, m):
                continue
            levels = (penalty_levels(ecfg, m) if m in PENALTY_METHODS else
                      [1 / (1 - ecfg.imp_rate) ** r for r in range(1, imp_rounds(ecfg) + 1)] if m == "imp"
                      else ecfg.compressions)
            out += [(m, float(lv), s) for lv in levels for s in ecfg.seeds]
    return out


def why_not_run(cfg: Config, method: str) -> str | None:
    """Why ``method`` cannot run on this experiment's model (``None`` when it can); ``cfg`` holds one
    experiment."""
    if method in ("imp", "snip") and cfg.setup not in lottery.SETUPS:
        return f"chapter 2 has no setup {cfg.setup}"
    if method == "bernoulli" and cfg.model.startswith("resnet"):
        return "the flip estimator of chapter 4 re-runs the layers above a gate and handles plain " \
               "feed-forward networks only (no residual blocks)"
    return None


def penalty_levels(cfg: Config, method: str) -> tuple[float, ...]:
    """The penalty weights a penalty-driven method sweeps: kappa for Bernoulli gates, lambda otherwise."""
    return cfg.bernoulli_costs if method == "bernoulli" else cfg.lambdas


def _status(cfg: Config, method: str) -> str:
    if method in NOT_RUN:
        return f"not run in {cfg.profile}: {NOT_RUN[method]}"
    if method not in cfg.methods:
        return "not selected"
    why = why_not_run(cfg, method)
    return f"not run in {cfg.profile}: {why}" if why else "run"


def method_table(cfg: Config) -> pd.DataFrame:
    """Every method of the book: how this chapter runs it, or why it does not (``status``; with several
    experiments one status column per experiment)."""
    rows = []
    several = len(cfg.experiments) > 1
    for m in (*METHODS, *NOT_RUN):
        placed = ("unit cost κ, placed by what it achieved" if m == "bernoulli" else
                  "penalty λ, placed by what it achieved" if m in PENALTY_METHODS else
                  "target: weight sparsity 1 - 1/c" if m in UNSTRUCTURED else
                  "target: FLOPs / c" if m == "l1_filter" else "target: channel sparsity 1 - 1/c per layer"
                  if m == "polarization" else "—")
        budget = ("pre-train + fine-tune = budget" if m in ("random", "magnitude", "l1_filter") else
                  "teacher pre-train + label-free student = budget" if m == "lnpt" else
                  "r + 1 budgets at round r" if m == "imp" else "budget" if m in METHODS else "—")
        row = {"method": label(m), "kind": "structured" if m in STRUCTURED or m == "bernoulli"
               else "unstructured", "placed by": placed, "training": budget}
        for e in cfg.experiments:
            row[f"status, {experiment_label(e)}" if several else "status"] = _status(cfg.experiment(e), m)
        rows.append(row)
    return pd.DataFrame(rows)


def experiment_table(cfg: Config) -> pd.DataFrame:
    """One row per experiment: its network, dataset and the settings :meth:`Config.experiment` gives it
    (the training budget, the latency measurement's batch and rounds)."""
    rows = []
    for e in cfg.experiments:
        c = cfg.experiment(e)
        rows.append({"experiment": experiment_label(e), "model": c.model, "dataset": c.dataset,
                     "epochs (budget)": c.epochs, "pre-training epochs": c.pretrain_epochs,
                     "latency batch": c.timing_batch, "latency rounds": c.timing_repeats})
    return pd.DataFrame(rows)


def _dataset(cfg: Config):
    """The chapter's dataset, loaded once per process (a worker keeps it for its next units)."""
    return data_mod.load_dataset_once(cfg.dataset, root=cfg.data_root)


def run_point(task, results_dir: str):
    """One unit for :func:`runs.map_units`: ``task`` is ``(cfg, what, level, seed)``; ``what`` a method, "dense"
    (the budget's dense network; ``level`` its epochs) or "scratch_b" (``level``: the structured point). On a
    worker it writes to the worker's results folder (one torch thread per process); serially to ``results_dir``."""
    cfg, what, level, seed = task
    cfg = cfg.replace(results_dir=str(results_dir))
    data = _dataset(cfg)
    ref = _dense_ref(cfg, data)
    if what == "dense":
        net, hist = dense(cfg, data, seed, level)
        net = net.cpu().eval()
        return {"method": "dense", "seed": seed, "accuracy": evaluate(net, data.test)["accuracy"],
                "effective_flops": ref["flops"], "effective_params": ref["params"],
                "seconds": float(hist["seconds"].iloc[-1]), "settled": _settled(cfg, hist)}
    if what == "scratch_b":
        return scratch_unit(cfg, data, level, ref)
    if what == "imp":
        return imp_points(cfg, data, seed, ref)
    if what in ("random", "magnitude", "l1_filter"):
        return prune_finetune_unit(cfg, data, what, level, seed, ref)
    if what == "gmp":
        return gmp_unit(cfg, data, level, seed, ref)
    if what == "snip":
        return snip_point(cfg, data, level, seed, ref)
    if what == "lnpt":
        return lnpt_unit(cfg, data, level, seed, ref)
    if what == "bernoulli":
        return bernoulli_unit(cfg, data, level, seed, ref)
    if what in ("l0_hc", "dep_l0"):
        return hard_concrete_unit(cfg, data, what, level, seed, ref)
    if what == "polarization":
        return polarization_unit(cfg, data, level, seed, ref)
    raise ValueError(f"unknown unit {what!r}")


def task_store(cfg: Config, task) -> Store:
    """The Store a task's result lives in (dense: chapter 1's unit; IMP and SNIP: this chapter's rows unit)."""
    _, what, level, seed = task
    if what == "dense":
        return dense_store(cfg.model, cfg.dataset, seed, epochs=level, batch_size=cfg.batch_size, lr=cfg.lr,
                           evals_per_epoch=cfg.evals_per_epoch, results_dir=cfg.results_dir)
    if what == "scratch_b":
        return Store(cfg.results_dir, "comparison/scratch_b", scratch_spec(cfg, level))
    return point_store(cfg, what, level, seed)


def _task_done(cfg: Config, task) -> bool:
    st = task_store(cfg, task)
    return dense_unit.done(st) if task[1] == "dense" else st.exists("unit.pt")


def _task_inputs(cfg: Config, task) -> list[Store]:
    """The finished units a task reads: the pre-trained dense network of the prune-then-train methods."""
    _, what, _, seed = task
    if what in PRETRAINED and cfg.pretrain_epochs > 0:
        return [task_store(cfg, (cfg, "dense", cfg.pretrain_epochs, seed))]
    return []


def tasks(cfg: Config) -> tuple[list, list]:
    """The first two phases' tasks: the dense networks (the budget's, and the pre-trained ones the
    prune-then-train methods start from), then every point (IMP: one task per seed, its whole chain).
    Scratch-B tasks follow once their structured points exist (:func:`scratch_tasks`)."""
    pre = any(m in PRETRAINED for m in cfg.methods) and cfg.pretrain_epochs > 0
    dense_tasks = [(cfg, "dense", cfg.epochs, s) for s in cfg.seeds]
    dense_tasks += [(cfg, "dense", cfg.pretrain_epochs, s) for s in cfg.seeds] if pre else []
    imp = [(cfg, "imp", 0.0, s) for s in cfg.seeds] if "imp" in cfg.methods and not why_not_run(cfg, "imp") else []
    return dense_tasks, imp + [(cfg, m, lv, s) for m, lv, s in plan(cfg) if m != "imp"]


def scratch_tasks(cfg: Config, points: list[dict]) -> list:
    return [(cfg, "scratch_b", p, int(p["row"]["seed"])) for p in points if p["row"]["method"] in STRUCTURED]


def _map(cfg: Config, todo: list, bar) -> list:
    """``todo`` through :func:`runs.map_units`: ``$PRUNING_EXECUTOR`` (Dask workers, ...), else ``workers``
    processes (one unit left to compute runs here); finished units only load, here."""
    return map_units(run_point, todo, results_dir=cfg.results_dir, workers=cfg.workers, bar=bar,
                     done=lambda t: _task_done(cfg, t), inputs=lambda t: _task_inputs(cfg, t),
                     key=lambda t: f"{t[1]}-{task_store(cfg, t).key}")


def run_experiment(cfg: Config, experiment: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or load) every unit of one experiment (``experiment``, or the config's only one); returns
    ``points`` (one row per method, level and seed, Scratch-B included), ``dense`` (the dense reference of
    the budget), ``units`` (first seed's point per method and level: its mask or kept channels),
    ``histories``, ``experiment`` and ``cfg`` (the experiment's config, :meth:`Config.experiment`).

    The units run through :func:`runs.map_units` in three phases (dense networks, points, Scratch-B): serially
    by default, in ``workers`` processes, or on the Dask cluster ``$PRUNING_EXECUTOR`` names
    (``make book DASK=...``); the numbers do not depend on where a unit ran (up to the last bits of float
    sums with another thread count)."""
    several = experiment is not None and len(cfg.experiments) > 1
    cfg = cfg.experiment(experiment)
    data = _dataset(cfg)
    ref = _dense_ref(cfg, data)
    dense_tasks, point_tasks = tasks(cfg)
    desc = f"comparison units, {cfg.experiments[0]}" if several else "comparison units"
    bar = progress_bar(total=len(dense_tasks) + len(point_tasks), desc=desc, progress=progress)
    dense_rows = _map(cfg, dense_tasks, bar)[:len(cfg.seeds)]
    points = []
    for t, r in zip(point_tasks, _map(cfg, point_tasks, bar)):
        points += r if t[1] == "imp" else [r]
    todo = scratch_tasks(cfg, points)
    bar.total += len(todo)
    points += _map(cfg, todo, bar)
    bar.close()
    frame = pd.DataFrame([p["row"] for p in points])
    first = cfg.seeds[0]
    masks = {(p["row"]["method"], p["row"]["level"]): p for p in points if p["row"]["seed"] == first}
    return {"points": frame, "dense": pd.DataFrame(dense_rows), "units": masks, "reference": ref,
            "histories": {(p["row"]["method"], p["row"]["level"], p["row"]["seed"]): p["history"] for p in points},
            "data": data, "experiment": cfg.experiments[0], "cfg": cfg}


def _run_cfg(cfg: Config, out: dict) -> Config:
    """The config of the experiment ``out`` (:func:`run_experiment`'s output) ran, from the chapter's."""
    return cfg.experiment(out["experiment"]) if "experiment" in out else cfg.experiment()


def work_units(cfg: Config) -> list:
    """Every unit of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`), experiment after
    experiment, with the hash of the Store the notebook reads: the dense networks, every point (IMP: a
    seed's chain), and the Scratch-B of every structured point already trained (a Scratch-B unit is named by
    the architecture its method found, so it is listed once that unit is done). With several experiments
    each unit's description starts with its experiment."""
    out = []
    for e in cfg.experiments:
        out += _experiment_units(cfg.experiment(e), f"{e}: " if len(cfg.experiments) > 1 else "")
    return out


def _experiment_units(cfg: Config, prefix: str) -> list:
    from ..units import Unit

    dense_tasks, point_tasks = tasks(cfg)
    listed = dense_tasks + point_tasks
    for t in point_tasks:
        if t[1] in STRUCTURED and _task_done(cfg, t):
            listed += scratch_tasks(cfg, [task_store(cfg, t).torch("unit")])
    out = []
    for t in listed:
        _, what, level, seed = t
        store = task_store(cfg, t)
        if what == "dense":
            desc = f"dense {cfg.model} on {cfg.dataset}, {level:g} epochs, seed {seed}"
        elif what == "scratch_b":
            desc = f"Scratch-B of {label(level['row']['method'])} at level {level['row']['level']:g}, seed {seed}"
        elif what == "imp":
            desc = f"IMP chain of {imp_rounds(cfg)} rounds, seed {seed}"
        else:
            desc = f"{label(what)} at {'κ' if what == 'bernoulli' else 'λ' if what in PENALTY_METHODS else '×'}" \
                   f"{level:g}, seed {seed}"
        out.append(Unit(store.key, store.kind, f"{prefix}{desc} ({cfg.epochs:g}-epoch budget)",
                        _task_done(cfg, t), (cfg.dataset,), lambda results_dir, t=t: run_point(t, results_dir)))
    return out


# --------------------------------------------------------------------------------------------------
# measurements

def nearest_level(reduction: float, levels) -> float:
    """The compression level (of ``levels``) nearest to ``reduction`` in log scale."""
    levels = np.asarray(levels, float)
    return float(levels[np.argmin(np.abs(np.log(levels) - np.log(reduction)))])


def level_tables(cfg: Config, points: pd.DataFrame, verdicts: pd.DataFrame | None = None) -> dict[float, pd.DataFrame]:
    """One table per compression level: every method's points whose achieved FLOPs reduction is nearest to
    it (penalty methods: per λ, by their mean achieved reduction), mean and spread over seeds."""
    g = points.groupby(["method", "level"], sort=False).agg(
        flops_reduction=("flops_reduction", "mean"), accuracy=("accuracy", "mean"), sd=("accuracy", "std"),
        n=("seed", "nunique"), requested=("requested", "first"), requested_sparsity=("requested_sparsity", "mean"),
        achieved_sparsity=("achieved_sparsity", "mean"), seconds=("seconds", "mean")).reset_index()
    g["at"] = [nearest_level(r, cfg.compressions) for r in g["flops_reduction"]]
    classes = {} if verdicts is None else dict(zip(verdicts["method"], verdicts["class"]))
    out = {}
    for c in cfg.compressions:
        t = g[g["at"] == c].copy()
        t["method"] = t["method"].map(label)
        t["Pareto vs magnitude"] = [classes.get(m, "—") for m in g.loc[g["at"] == c, "method"]]
        t = t.rename(columns={"flops_reduction": "FLOPs ÷ (achieved)", "accuracy": "test accuracy",
                              "sd": "sd over seeds", "seconds": "training s / point"})
        out[c] = t.drop(columns=["at"]).sort_values("test accuracy", ascending=False).reset_index(drop=True)
    return out


def pareto_points(points: pd.DataFrame) -> pd.DataFrame:
    return points.rename(columns={"effective_flops": "flops"})[["method", "level", "seed", "flops", "accuracy",
                                                                "settled"]]


def pareto_table(points: pd.DataFrame) -> pd.DataFrame:
    """Each method's class against the global-magnitude curve (:func:`pruning_lib.pareto.verdicts`)."""
    p = pareto_points(points)
    ref = p[p["method"] == REFERENCE]
    others = p[p["method"] != REFERENCE]
    if ref.empty or others.empty:
        return pd.DataFrame(columns=["method", "class", "levels", "above", "tied", "below", "mean_difference"])
    return pareto.verdicts(others, ref)


LATENCY_CALLS = 64  # forward passes per timed round at batch 1 (at batch b: 64 / sqrt(b), at least one)


def latency(cfg: Config, out: dict) -> pd.DataFrame:
    """The first seed's compacted structured networks against the dense one, timed in one run on CPU in eval
    mode: batch 1 and ``timing_batch``; speed-up, FLOPs reduction and their ratio (1.0 is the limit).
    ``dense_twice``: the slower over the faster time of two copies of the dense network timed alike, a
    measure of the timing noise of that batch size.

    Measured once and cached like a unit (named by the architectures timed and the timing settings), so a
    rebuild from the cache shows the same timings and two chapters rebuilt side by side do not disturb
    them; delete ``results/comparison/latency/`` to time again on this machine. ``cfg``: the chapter's
    config or the experiment's (the experiment is ``out``'s)."""
    cfg = _run_cfg(cfg, out)
    arch = [[m, lv, {k: v.int().tolist() for k, v in p["keep"].items()}]
            for (m, lv), p in out["units"].items() if m in STRUCTURED]
    spec = {**_base_spec(cfg, cfg.seeds[0]), "architectures": arch, "timing_batch": cfg.timing_batch,
            "timing_repeats": cfg.timing_repeats, "threads": cfg.timing_threads, "layouts": list(timing.LAYOUTS)}
    return Store(cfg.results_dir, "comparison/latency", spec).frame("latency", lambda: measure_latency(cfg, out))


def measure_latency(cfg: Config, out: dict) -> pd.DataFrame:
    """:func:`latency`'s measurement itself (not cached)."""
    cfg = _run_cfg(cfg, out)
    data, seed = out["data"], cfg.seeds[0]
    shape = tuple(data.input_shape)
    nets, rows = [], []
    for (m, lv), p in out["units"].items():
        if m not in STRUCTURED:
            continue
        small = architecture(cfg, data, seed, p["keep"]).eval()
        nets.append(small)
        rows.append({"method": m, "level": lv, "flops_reduction": out["reference"]["flops"] / max(
            l1_filter.flops(small, shape), 1)})
    if not nets:
        return pd.DataFrame(columns=["method", "level", "batch", "dense_ms", "compact_ms", "speedup",
                                     "flops_reduction", "ratio", "dense_twice", "dense_layout", "compact_layout"])
    dense_net = _build(cfg, data, seed).eval()
    twin = _build(cfg, data, seed).eval()  # the dense network timed twice: their ratio is the noise
    table = []
    with timing.torch_threads(cfg.timing_threads):
        for batch in (1, cfg.timing_batch):
            x = torch.randn(batch, *shape)
            inner = max(1, int(LATENCY_CALLS / batch ** 0.5))
            # each network in its faster memory format (timing.best_layout_forward_seconds)
            t, fmt = timing.best_layout_forward_seconds([dense_net, twin, *nets], x, cfg.timing_repeats, inner,
                                                        warmup=3)
            noise = max(t[0], t[1]) / min(t[0], t[1])
            for r, tc, f in zip(rows, t[2:], fmt[2:]):
                table.append({**r, "batch": batch, "dense_ms": 1e3 * t[0], "compact_ms": 1e3 * tc,
                              "speedup": t[0] / tc, "ratio": t[0] / tc / r["flops_reduction"],
                              "dense_twice": noise, "dense_layout": fmt[0], "compact_layout": f})
    return pd.DataFrame(table)


def overlap(cfg: Config, out: dict) -> pd.DataFrame:
    """Intersection over union of the kept weights of every method's mask (first seed) at the point nearest
    to ``overlap_compression`` in FLOPs reduction; structured methods' removed channels as weight masks."""
    cfg = _run_cfg(cfg, out)
    pts = out["points"]
    first = pts[(pts["seed"] == cfg.seeds[0]) & ~pts["method"].str.startswith("scratch_b:")]
    model = _build(cfg, out["data"], cfg.seeds[0])
    chosen = {}
    for m, g in first.groupby("method", sort=False):
        i = (np.log(g["flops_reduction"]) - math.log(cfg.overlap_compression)).abs().idxmin()
        p = out["units"][(m, g.loc[i, "level"])]
        mask = p["mask"] if p["mask"] is not None else unit_mask(model, p["keep"])
        chosen[label(m)] = (torch.cat([mask[n].flatten() for n in sorted(mask)]), g.loc[i, "flops_reduction"])
    names = list(chosen)
    m = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            x, y = chosen[a][0], chosen[b][0]
            union = float((x | y).sum())
            m[i, j] = float((x & y).sum()) / union if union else 1.0  # two empty masks agree
    frame = pd.DataFrame(m, index=[f"{n} (÷{chosen[n][1]:.1f})" for n in names], columns=names)
    frame.index.name = "method (achieved FLOPs ÷)"
    return frame


def scratch_pairs(points: pd.DataFrame) -> pd.DataFrame:
    """Per structured (method, level, seed): its accuracy and its Scratch-B's."""
    s = points[points["method"].str.startswith("scratch_b:")].copy()
    s["of"] = s["method"].str.split(":").str[1]
    base = points[points["method"].isin(STRUCTURED)]
    return base.merge(s[["of", "level", "seed", "accuracy", "settled"]].rename(
        columns={"of": "method", "accuracy": "scratch_accuracy", "settled": "scratch_settled"}),
        on=["method", "level", "seed"])


# --------------------------------------------------------------------------------------------------
# claims

def claim_prefix(cfg: Config, experiment: str) -> str:
    """What starts the statement of every claim about ``experiment`` in the chapter's ledger: its name when
    the chapter runs several experiments, nothing when it runs one."""
    return f"{experiment_label(experiment)}: " if len(cfg.experiments) > 1 else ""


def experiment_claims(cfg: Config, table: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """The rows of the chapter's claims table (:func:`claims_table`) about ``experiment``."""
    prefix = claim_prefix(cfg, experiment)
    return table[table["claim"].str.startswith(prefix)] if prefix else table


def claims_table(cfg: Config, runs: dict[str, dict], results_dir: str | None = "results") -> pd.DataFrame:
    """The chapter's one ledger over its experiments (``runs``: experiment -> :func:`run_experiment`'s
    output). Per experiment and method, a claim that its curve dominates global magnitude's; per structured
    method, a claim that it beats its Scratch-B. Each is judged level by level (paired by seed, t interval),
    then over levels. With several experiments every statement starts with its experiment
    (:func:`claim_prefix`)."""
    rows = []
    for e in cfg.experiments:
        rows += _claim_rows(cfg.experiment(e), runs[e], claim_prefix(cfg, e))
    return claims.ledger(CHAPTER, rows, cfg.profile, results_dir, cfg.budget)


def _claim_rows(cfg: Config, out: dict, prefix: str) -> list:
    points = out["points"]
    p = pareto_points(points)
    ref = p[p["method"] == REFERENCE]
    rows = []
    what = f"validation accuracy within {cfg.settle_tol:.0%} over the last quarter of training"
    data_note = f"ours: {cfg.model} on {cfg.dataset}, {cfg.epochs:g} epochs"
    for m in cfg.methods:
        if m == REFERENCE:
            continue
        g = p[p["method"] == m]
        claim = claims.Claim(
            f"{prefix}{label(m)} lies above global magnitude pruning's accuracy–FLOPs curve at every level it "
            f"reaches (Pareto-dominant)", data_note,
            "per level, per seed: test accuracy minus global magnitude's (same seed) interpolated in log "
            "effective FLOPs at the achieved FLOPs; t interval over seeds per level",
            claims.Fraction(share=1.0, what="levels"))
        measurement = None
        if not g.empty and not ref.empty:
            d = pareto.differences(g, ref)
            d = d[d["difference"].notna()]
            if len(d):
                ref_settled = bool(ref["settled"].all())
                measurement = [claims.Exceeds(fmt="{:+.3f}", a_name=m, b_name="magnitude")(
                    claims.Evidence(gl.set_index("seed")["difference"],
                                    [*gl["settled"].tolist(), ref_settled], what))
                    for _, gl in d.groupby("level")]
        rows.append((claim, measurement))
    pairs = scratch_pairs(points)
    for m in cfg.methods:
        if m not in STRUCTURED:
            continue
        g = pairs[pairs["method"] == m]
        claim = claims.Claim(
            f"{prefix}Pruning with {label(m)} beats training the architecture it found from scratch with the "
            f"same compute (Scratch-B)",
            "Liu et al. 2019 (ICLR), Sec. 4, report the opposite for structured methods: Scratch-B matches or "
            "beats the fine-tuned pruned model; " + data_note,
            "per level: test accuracy of the method minus its Scratch-B's, paired by seed (t interval)",
            claims.Fraction(share=1.0, what="levels"))
        measurement = None
        if len(g):
            measurement = [claims.Exceeds(fmt="{:+.3f}", a_name=m, b_name="Scratch-B")(
                claims.Evidence(gl.set_index("seed")["accuracy"] - gl.set_index("seed")["scratch_accuracy"],
                                [*gl["settled"].tolist(), *gl["scratch_settled"].tolist()], what))
                for _, gl in g.groupby("level")]
        rows.append((claim, measurement))
    return rows


def requested_vs_achieved(points: pd.DataFrame) -> pd.DataFrame:
    """Per method and level: what was requested (sparsity in its own unit) and what was achieved."""
    p = points[~points["method"].str.startswith("scratch_b:")]
    t = p.groupby(["method", "level"], sort=False).agg(
        unit=("requested_unit", "first"), requested_sparsity=("requested_sparsity", "mean"),
        achieved_sparsity=("achieved_sparsity", "mean"), achieved_min=("achieved_sparsity", "min"),
        achieved_max=("achieved_sparsity", "max"), flops_reduction=("flops_reduction", "mean")).reset_index()
    t["method"] = t["method"].map(label)
    return t


def cost_table(points: pd.DataFrame, dense_rows: pd.DataFrame) -> pd.DataFrame:
    """Training wall time per method: mean seconds per point (pre-training included where the method uses
    it), and the epochs each point trained."""
    t = points.groupby("method", sort=False).agg(points=("seed", "size"), epochs=("epochs", "mean"),
                                                  seconds=("seconds", "mean")).reset_index()
    t = pd.concat([pd.DataFrame([{"method": "dense", "points": len(dense_rows),
                                  "epochs": np.nan, "seconds": dense_rows["seconds"].mean()}]), t])
    t["method"] = t["method"].map(label)
    return t.rename(columns={"seconds": "training s / point", "epochs": "epochs / point"}).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# figures

def _colours(methods):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_tradeoff(out: dict):
    """Accuracy against effective FLOPs: every seed's point, seed means joined per method; Scratch-B
    dashed beside its method; the dense network's accuracy (mean over seeds) as a line."""
    points, dense_rows = out["points"], out["dense"]
    fig, axes = plotting.figure(ncols=2, width=12.0, height=4.8, sharey=True)
    base = [m for m in points["method"].unique() if not m.startswith("scratch_b:")]
    colours = _colours(base)
    for ax, family in zip(axes, (UNSTRUCTURED, STRUCTURED)):
        for m in [m for m in base if m in family]:
            for variant, style in ((m, "-"), (f"scratch_b:{m}", "--")):
                g = points[points["method"] == variant]
                if g.empty:
                    continue
                ax.scatter(g["effective_flops"], g["accuracy"], s=10, alpha=0.45, color=colours[m])
                mean = g.groupby("level").agg(x=("effective_flops", "mean"), y=("accuracy", "mean")).sort_values("x")
                ax.plot(mean["x"], mean["y"], style, marker="o", ms=4, color=colours[m], label=label(variant))
        if len(dense_rows):
            ax.axhline(dense_rows["accuracy"].mean(), color="k", lw=0.8, ls=":", label="dense (budget)")
        ax.set_xscale("log")
        ax.set_xlabel("effective FLOPs per example (log)")
        ax.set_title("unstructured" if family is UNSTRUCTURED else "structured (dashed: Scratch-B)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy")
    return fig


def plot_speedup(lat: pd.DataFrame):
    """Measured CPU speed-up of the compacted networks against their FLOPs reduction (dotted: equal)."""
    fig, axes = plotting.figure(ncols=2, width=11.0, height=4.4)
    colours = _colours(STRUCTURED)
    for ax, batch in zip(axes, sorted(lat["batch"].unique()) if len(lat) else []):
        g = lat[lat["batch"] == batch]
        for m, gm in g.groupby("method", sort=False):
            ax.scatter(gm["flops_reduction"], gm["speedup"], color=colours[m], label=label(m))
        hi = max(float(g["flops_reduction"].max()), float(g["speedup"].max()), 1.0)
        ax.plot([1, hi], [1, hi], ":", color="k", lw=0.8, label="speed-up = FLOPs reduction")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOPs reduction (dense / compacted)")
        ax.set_ylabel("measured speed-up")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=7)
    return fig


def plot_overlap(frame: pd.DataFrame):
    """Heat map of the intersection over union of the kept weights."""
    fig, ax = plotting.figure(width=7.5, height=6.0)
    im = ax.imshow(frame.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.grid(False)
    ax.set_xticks(range(len(frame.columns)), frame.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(frame.index)), frame.index, fontsize=7)
    for i in range(len(frame.index)):
        for j in range(len(frame.columns)):
            v = frame.iat[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="IoU of kept weights")
    ax.set_title("mask overlap (first seed)")
    return fig


# --- the page's prose -------------------------------------------------------------------------------

def discussion(cfg: Config, out: dict, verdicts: pd.DataFrame, lat: pd.DataFrame,
               table: pd.DataFrame) -> dict[str, str | float]:
    """The numbers and Markdown lists of the chapter's discussion, by glue name (``*_md`` are Markdown):
    each method's class against global magnitude (``verdicts``, :func:`pareto_table`), the speed-up over
    the FLOPs reduction per batch size (``lat``, :func:`latency`), the Scratch-B verdicts of ``table``
    (:func:`claims_table`), the dense accuracy, the FLOPs reductions and accuracies each method reached
    with its runs not settled, and the units' summed training minutes. ``cfg``: the chapter's config or the
    experiment's (the experiment is ``out``'s); ``table``: the claims about this experiment
    (:func:`experiment_claims`)."""
    cfg = _run_cfg(cfg, out)
    points = out["points"]
    pareto_md = "\n".join(
        f"- **{label(r['method'])}**: {r['class']} ({r['above']} levels above, {r['tied']} tied, "
        f"{r['below']} below; mean difference {100 * r['mean_difference']:+.2f} points)"
        for _, r in verdicts.iterrows())
    ratios = lat.groupby("batch").agg(lo=("ratio", "min"), mid=("ratio", "median"), hi=("ratio", "max"),
                                      noise=("dense_twice", "first")) if len(lat) else pd.DataFrame()
    sb = table[table["claim"].str.contains("Scratch-B")]
    reach = points[~points["method"].str.startswith("scratch_b:")].groupby(["method", "level"], sort=False).agg(
        r=("flops_reduction", "mean"), a=("accuracy", "mean"), u=("settled", lambda s: int((~s.astype(bool)).sum())))
    return {
        "pareto_md": pareto_md or "- no method was compared",
        "ratio_md": "\n".join(f"- batch {b}: speed-up / FLOPs reduction from {r['lo']:.2f} to {r['hi']:.2f} "
                              f"(median {r['mid']:.2f}); the dense network timed twice differed by a factor "
                              f"{r['noise']:.2f}" for b, r in ratios.iterrows()) or "- nothing was timed",
        "scratch_md": "\n".join(f"- {c}: **{v}** ({o})" for c, v, o in zip(sb["claim"], sb["verdict"], sb["ours"]))
                      or "- no structured method ran",
        "dense_acc": float(100 * out["dense"]["accuracy"].mean()),
        "reach_md": "\n".join(
            f"- {label(m)}: ×{g['r'].min():.1f} to ×{g['r'].max():.1f} fewer FLOPs "
            f"(test accuracy {100 * g['a'].max():.1f} % to {100 * g['a'].min():.1f} %); "
            f"{g['u'].sum()} of {len(g) * len(cfg.seeds)} runs not settled"
            for m, g in reach.groupby(level=0, sort=False)),
        "train_minutes": float((points["unit_seconds"].sum() if "unit_seconds" in points else 0) / 60),
    }


def discussion_glue(cfg: Config, runs: dict[str, dict], verdicts: dict[str, pd.DataFrame],
                    lats: dict[str, pd.DataFrame], table: pd.DataFrame) -> dict[str, str | float]:
    """The page's glue values over every experiment (``runs``, ``verdicts``, ``lats``: per experiment;
    ``table``: the chapter's claims): each Markdown list of :func:`discussion`, under its experiment's name
    when there are several (the list alone when there is one); ``dense_md``, the dense network's test
    accuracy (per experiment when several); ``train_minutes``, summed over the experiments."""
    parts = {e: discussion(cfg, runs[e], verdicts[e], lats[e], experiment_claims(cfg, table, e))
             for e in cfg.experiments}
    several = len(cfg.experiments) > 1
    out: dict[str, str | float] = {}
    for name in ("pareto_md", "ratio_md", "scratch_md", "reach_md"):
        out[name] = "\n\n".join(f"**{experiment_label(e)}**\n\n{d[name]}" for e, d in parts.items()) \
            if several else parts[cfg.experiments[0]][name]
    out["dense_md"] = " and ".join(f"{d['dense_acc']:.1f} %" + (f" ({experiment_label(e)})" if several else "")
                                   for e, d in parts.items())
    out["train_minutes"] = float(sum(d["train_minutes"] for d in parts.values()))
    return out


def each_experiment(cfg: Config, runs: dict[str, dict]):
    """``(experiment, run)`` for every experiment of the chapter, in order; with several, the experiment's
    name is shown before each (in a notebook), so a cell's tables and figures read under their experiment."""
    several = len(cfg.experiments) > 1
    for e in cfg.experiments:
        if several:
            from IPython.display import Markdown, display

            display(Markdown(f"**{experiment_label(e)}** (`{e}`)"))
        yield e, runs[e]


def download_link(cfg: Config, experiment: str, frame: pd.DataFrame, stem: str, what: str) -> str:
    """The page's link that downloads ``frame`` as ``<stem>.csv``; with several experiments the file name
    and the text name the experiment (``<stem>_<model>_<dataset>.csv``), so each download is its own file."""
    from .. import report

    if len(cfg.experiments) > 1:
        tag = experiment.replace("/", "_").replace("-", "_")
        return report.csv_link(frame, f"{stem}_{tag}.csv", f"Download {what}, {experiment_label(experiment)} (CSV)")
    return report.csv_link(frame, f"{stem}.csv", f"Download {what} (CSV)")
