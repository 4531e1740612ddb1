"""Chapter 03: Dep-L0 against L0-HC (Li & Ji 2021, arXiv 2107.00070; Louizos et al. 2018).

Every unit of the experiment trains one network with hard-concrete gates on the output channels of every
prunable layer (:mod:`pruning_lib.methods.hard_concrete`), the gates' ``log_alpha`` either free per channel (L0-HC) or
produced by Dep-L0's gate generator chained forward or backward through the layers, under one sparsity
penalty times ``lambda``.  Weights and gates have separate optimizers (SGD and Adam, as in the official
Dep-L0 code); an optional fine-tune phase trains the weights with the gates fixed at their test-time values.
The gated network is then compacted (:func:`pruning_lib.methods.hard_concrete.compact_gated`) and its accuracy,
parameters and FLOPs are measured on the physically smaller network.

Both methods use the same penalty in a comparison, as in the official repository (whose own L0-HC baseline
uses Dep-L0's expected-parameter-count penalty).  By default it counts the conv layers only, the scope of the
official code (``penalty="conv_params"``); ``"params"`` counts every conv and linear layer, and ``"l0"``
switches both methods to Louizos' expected L0.

The claims compare the methods on the accuracy-against-FLOPs frontier, one value per seed
(:func:`accuracy_at_matched_flops`); FLOPs removed at the same lambda is a figure (:func:`plot_same_lambda`).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import claims, metrics
from ..gates import families
from ..data import load_dataset, load_dataset_once
from ..methods.hard_concrete import (PENALTIES, ClampLogAlpha, CostModel, GateMonitor, ResumableGateMonitor,
                                     gate_probabilities, keep_and_scale, set_fixed, sparsity_penalty)
from ..models import build_model
from ..runs import RunConfig, Store, map_units, param, parse_executor, progress_bar
from ..train import adam, evaluate, fit, last_run

CHAPTER = "03_dep_l0"
METHODS = ("l0_hc", "dep_l0_forward", "dep_l0_backward")
METHOD_LABELS = {"l0_hc": "L0-HC", "dep_l0_forward": "Dep-L0 (forward)", "dep_l0_backward": "Dep-L0 (backward)",
                 "dense": "dense (no gates)"}
EXPERIMENTS = ("lenet5_caffe/mnist5k", "small_vgg/mnist5k", "lenet5_caffe/fashion_mnist", "small_vgg/fashion_mnist",
               "vgg16_bn/cifar10", "resnet56/cifar10",
               "vgg16_bn/cifar100", "resnet56/cifar100", "resnet50/imagenet", "small_vgg/synthetic-mnist",
               "lenet5_caffe/synthetic-mnist")

# Per-model training settings; a Config field left at None takes these.  The paper's come from the official
# code (papers.md section 2); the MNIST ones are ours.  LeNet-5-Caffe's base lambda is for the conv-only
# penalty (``penalty="conv_params"``, 25,500 conv weights): with it every L0-HC run of the `cpu` profile stops
# pruning within 15 epochs (a quarter of it, 1e-5, was still pruning 10 points a quarter in a probe).
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "lenet5_caffe": dict(lr=0.05, weight_decay=5e-4, batch_size=128, base_lambda=4e-5),
    "small_vgg": dict(lr=0.05, weight_decay=5e-4, batch_size=128, base_lambda=2e-5),
    "vgg16_bn": dict(lr=0.05, weight_decay=5e-4, batch_size=128, base_lambda=1e-6),
    "resnet56": dict(lr=0.1, weight_decay=5e-4, batch_size=128, base_lambda=1e-6),
    "resnet50": dict(lr=0.1, weight_decay=1e-4, batch_size=256, base_lambda=5e-9),
}


@dataclass(frozen=True)
class Config(RunConfig):
    """Settings of chapter 03.  ``lambda`` of a run is ``MODEL_SETTINGS[model]["base_lambda"] * scale`` for each
    scale in ``lambda_scales`` (the paper's lambdas differ by model: 1e-6 for CIFAR nets, 5e-9 for ResNet-50)."""

    experiments: tuple[str, ...] = param(("lenet5_caffe/mnist5k", "small_vgg/mnist5k"), choices=EXPERIMENTS,
                                         help="model/dataset pairs")
    methods: tuple[str, ...] = param(METHODS, choices=METHODS,
                                     help="l0_hc and Dep-L0 with the dependency direction forward/backward")
    lambda_scales: tuple[float, ...] = param((0.25, 1.0, 4.0), low=0.0, help="multiples of the base lambda")
    penalty: str = param("conv_params", choices=PENALTIES,
                         help="conv_params: Dep-L0's expected parameter count of the conv layers (official "
                              "code); params: the same over every conv and linear layer; l0: Louizos' expected L0")
    epochs: float = param(10.0, low=0.01, help="training epochs with learnable gates")
    finetune_epochs: float = param(0.0, low=0.0, help="epochs of weight training with fixed gates after")
    seeds: tuple[int, ...] = param((0, 1), help="training seeds (one unit per seed)")
    lr: float | None = param(None, low=0.0, help="SGD learning rate of the weights (None: per model)")
    weight_decay: float | None = param(None, low=0.0, help="SGD weight decay (None: per model)")
    batch_size: int | None = param(None, low=1, help="batch size (None: per model)")
    gate_lr: float = param(1e-3, low=0.0, help="Adam learning rate of the gates / generator")
    init_log_alpha: float = param(3.0, help="initial log_alpha of L0-HC and bias mean of the generator")
    dense_baseline: bool = param(True, help="also train each model without gates, for reference")
    eval_per_epoch: int = param(1, low=1, high=20, help="evaluations (and gate logs) per epoch")
    data_root: str = param("data", help="where the large datasets live")
    results_dir: str = param("results", help="results cache")

    NOT_HASHED = RunConfig.NOT_HASHED + ("data_root",)
    BUDGETED = ("epochs", "finetune_epochs")

    PROFILES = {
        # seconds: LeNet-5-Caffe on the generated stand-in (600 images), whose evaluations cost a tenth of
        # MNIST-5k's, which were most of the smoke run's time
        "smoke": dict(experiments=("lenet5_caffe/synthetic-mnist",), lambda_scales=(1.0, 8.0), epochs=0.3,
                      finetune_epochs=0.1, seeds=(0,), gate_lr=0.1, dense_baseline=False),
        # LeNet-5-Caffe only, Dep-L0 forward only: 18 runs of 15 epochs and one dense run, about 8 minutes on
        # 2 cores (the small VGG and the backward direction stay available as parameters; `paper` runs all
        # three methods).  lambda 4e-5 ... 1e-3: L0-HC below 4e-5 is still pruning after 15 epochs, and the
        # sweep must reach low enough FLOPs for both methods' ranges to overlap in every seed
        "cpu": dict(experiments=("lenet5_caffe/mnist5k",), methods=("l0_hc", "dep_l0_forward"),
                    lambda_scales=(1.0, 5.0, 25.0), epochs=15.0, finetune_epochs=0.0, seeds=(0, 1, 2),
                    gate_lr=0.1, eval_per_epoch=1),
        "paper": dict(experiments=("vgg16_bn/cifar10", "resnet56/cifar10", "vgg16_bn/cifar100",
                                   "resnet56/cifar100", "resnet50/imagenet"),
                      lambda_scales=(0.5, 1.0, 2.0), epochs=300.0, finetune_epochs=0.0, seeds=(0,),
                      gate_lr=1e-3),
    }

    def check(self) -> None:
        from ..runs import ConfigError
        if not self.methods:
            raise ConfigError("parameter 'methods': give at least one method")
        if not self.seeds:
            raise ConfigError("parameter 'seeds': give at least one seed")

    def settings(self, model: str) -> dict[str, Any]:
        """The training settings of ``model`` under this config (per-model values unless overridden)."""
        s = dict(MODEL_SETTINGS[model])
        for k in ("lr", "weight_decay", "batch_size"):
            if getattr(self, k) is not None:
                s[k] = getattr(self, k)
        epochs, finetune = self.epochs, self.finetune_epochs
        if self.profile == "paper" and model == "resnet50":  # 90 + 10 fine-tune epochs in the paper
            epochs, finetune = min(epochs, 90.0 * self.budget), max(finetune, 10.0 * self.budget)
        s.update(epochs=epochs, finetune_epochs=finetune)
        return s


def penalty_shares(model_name: str, dataset: str, data_root: str = "data") -> dict[str, float]:
    """What the penalty's scope means for ``model_name``: the share of the linear layers in the network's
    parameter count (the penalty of ``penalty="params"`` with every gate open) and the share of the convs in
    its FLOPs (:class:`~pruning_lib.methods.hard_concrete.CostModel`, weights only)."""
    data = load_dataset(dataset, root=data_root)
    cost = CostModel(build_model(model_name, **data.model_kwargs()), tuple(data.input_shape))
    total = cost.nominal_params("all")
    return {"linear_share_of_params": (total - cost.nominal_params("conv")) / total,
            "conv_share_of_flops": cost.nominal_flops("conv") / cost.nominal_flops("all")}


def _gate_frame(model: torch.nn.Module) -> pd.DataFrame:
    probs = gate_probabilities(model)
    _, scale = keep_and_scale(model)
    rows = []
    for layer, (name, p) in enumerate(probs.items()):
        for c, (pc, zc) in enumerate(zip(p.detach().cpu().tolist(), scale[name].cpu().tolist())):
            rows.append({"layer_index": layer, "group": name, "channel": c, "prob_nonzero": pc, "test_gate": zc})
    return pd.DataFrame(rows)


# each gated method: its gate family (:mod:`pruning_lib.gates.families`) and the options ``attach`` takes, given the
# initial log_alpha (L0-HC's free log_alphas, or the mean of the Dep-L0 generator's biases)
GATE_FAMILIES = {
    "l0_hc": lambda init: ("l0_hc", dict(init=init)),
    "dep_l0_forward": lambda init: ("dep_l0", dict(direction="forward", bias_init=init)),
    "dep_l0_backward": lambda init: ("dep_l0", dict(direction="backward", bias_init=init)),
}


def train_unit(model_name: str, dataset: str, method: str, lam: float, seed: int, cfg: Config,
               data=None, progress: bool = False, checkpoint=None) -> dict[str, Any]:
    """Train and compact one gated network; returns ``{"result": dict, "history": frame, "gates": frame,
    "architecture": frame, "trace": frame}`` (the last three empty for the dense baseline).  ``trace`` holds
    the gate statistics of :class:`~pruning_lib.methods.hard_concrete.GateMonitor` about 20 times an epoch.
    With ``checkpoint`` (a folder), each phase saves ``fit``'s checkpoint there at every epoch's end
    (``checkpoint.pt``, ``checkpoint_finetune.pt``) and resumes from it: a unit stopped half-way loses at
    most one epoch (the caller deletes them once the unit is saved)."""
    ckpt = {phase: None if checkpoint is None else Path(checkpoint) / name
            for phase, name in (("train", "checkpoint.pt"), ("finetune", "checkpoint_finetune.pt"))}
    s = cfg.settings(model_name)
    data = data if data is not None else load_dataset(dataset, root=cfg.data_root)
    torch.manual_seed(seed)
    model = build_model(model_name, **data.model_kwargs())
    shape = tuple(data.input_shape)
    dense = metrics.summary(model, shape)
    cost = CostModel(model, shape)
    n_train = len(data.train)
    family = None  # the dense baseline has no gates
    if method != "dense":
        if method not in GATE_FAMILIES:
            raise ValueError(f"unknown method {method!r}")
        name, options = GATE_FAMILIES[method](cfg.init_log_alpha)
        family = families.get(name)
        family.attach(model, **options)
    gates = family.gate_parameters(model) if family else []
    weights = family.weight_parameters(model) if family else list(model.parameters())
    steps_per_epoch = math.ceil(n_train / s["batch_size"])
    total = max(1, math.ceil(s["epochs"] * steps_per_epoch))
    w_opt = torch.optim.SGD(weights, lr=s["lr"], momentum=0.9, weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(w_opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e / max(s["epochs"], 1), 1))))
    optimizers = [w_opt]
    penalties, callbacks, monitor = {}, [], None
    if gates:
        optimizers.append(adam(gates, lr=cfg.gate_lr))
        penalties["penalty"] = sparsity_penalty(cost, cfg.penalty, lam, n_train)
        monitor = ResumableGateMonitor(cost, every=max(2, steps_per_epoch // 20))  # about 20 points an epoch
        callbacks = [ClampLogAlpha(), monitor]
    eval_every = max(1, steps_per_epoch // cfg.eval_per_epoch)
    t0 = time.perf_counter()
    hist = fit(model, data, optimizer=optimizers, iterations=total, batch_size=s["batch_size"], scheduler=sched,
               penalties=penalties, callbacks=callbacks, eval_every=eval_every, seed=seed, progress=progress,
               desc=f"{method} λ={lam:g} seed={seed}", checkpoint=ckpt["train"])
    hist["phase"] = "train"
    hist["epochs_done"] = hist["step"] / steps_per_epoch
    trace = pd.DataFrame()
    if monitor is not None:  # gate statistics every few steps, from step 0 (the first evaluation row)
        first = hist.iloc[[0]][[c for c in hist.columns if c.startswith(("expected_", "channels_"))]]
        trace = pd.concat([first.assign(step=0), pd.DataFrame(monitor.trace)], ignore_index=True)
        trace["epochs_done"] = trace["step"] / steps_per_epoch
    ft_steps = math.ceil(s["finetune_epochs"] * steps_per_epoch)
    if ft_steps > 0:
        if gates:
            set_fixed(model, True)
        ft_opt = torch.optim.SGD(weights, lr=s["lr"] * 0.1, momentum=0.9, weight_decay=s["weight_decay"])
        ft = fit(model, data, optimizer=ft_opt, iterations=ft_steps, batch_size=s["batch_size"],
                 callbacks=[GateMonitor(cost)] if gates else [], eval_every=eval_every, seed=seed + 1000,
                 progress=progress, desc="fine-tune", checkpoint=ckpt["finetune"])
        ft["phase"], ft["step"] = "finetune", ft["step"] + total
        ft["epochs_done"] = ft["step"] / steps_per_epoch
        ft["seconds"] += hist["seconds"].iloc[-1]
        hist = pd.concat([hist, ft.iloc[1:]], ignore_index=True)
    seconds = time.perf_counter() - t0
    model.eval()
    gated_acc = evaluate(model, data.test)["accuracy"]
    with warnings.catch_warnings():
        # a layer whose gates all closed (Dep-L0's generator can close a whole layer) is in the result's
        # ``architecture`` ("18-0-296") and ``empty_layers``; compact's warning would only repeat it
        warnings.filterwarnings("ignore", message="compact: group .* keeps no channel")
        small = family.compact(model) if gates else model
    small_acc = evaluate(small, data.test)["accuracy"]
    after = metrics.summary(small.cpu(), shape)
    result = dict(model=model_name, dataset=dataset, method=method, lam=lam, seed=seed,
                  test_accuracy=small_acc, gated_test_accuracy=gated_acc,
                  best_test_accuracy=float(hist["test_accuracy"].max()),
                  final_val_accuracy=float(hist["val_accuracy"].iloc[-1]),
                  params=after["params"], flops=after["flops"], dense_params=dense["params"],
                  dense_flops=dense["flops"], params_kept=after["params"] / dense["params"],
                  flops_kept=after["flops"] / dense["flops"], seconds=seconds)
    arch = pd.DataFrame()
    gate_df = pd.DataFrame()
    if gates:
        keep, _ = family.decide(model)
        arch = pd.DataFrame([{"layer_index": i, "group": k, "channels": int(v.numel()), "kept": int(v.sum())}
                             for i, (k, v) in enumerate(keep.items())])
        result["architecture"] = "-".join(str(int(v.sum())) for v in keep.values())
        result["empty_layers"] = ",".join(k for k, v in keep.items() if not bool(v.any()))
        gate_df = _gate_frame(model)
    return {"result": result, "history": hist, "gates": gate_df, "architecture": arch, "trace": trace}


def units(cfg: Config) -> list[tuple[str, str, str, float, int]]:
    """(model, dataset, method, lambda, seed) of every run of the experiment (the dense baseline, lambda 0,
    runs for the first seed only)."""
    out = []
    for exp in cfg.experiments:
        model, dataset = exp.split("/")
        base = MODEL_SETTINGS[model]["base_lambda"]
        for seed in cfg.seeds:
            if cfg.dense_baseline and seed == cfg.seeds[0]:  # one reference run per model
                out.append((model, dataset, "dense", 0.0, seed))
            for scale in cfg.lambda_scales:
                for method in cfg.methods:
                    out.append((model, dataset, method, base * scale, seed))
    return out


def unit_spec(cfg: Config, model: str, dataset: str, method: str, lam: float, seed: int) -> dict[str, Any]:
    """What one unit's cache folder is named by (its hash): the hashed settings of ``cfg`` that act on a
    single run, the unit's own identity and the model's training settings. One function for the notebook's
    :func:`run_experiment` and the command line (:mod:`pruning_lib.units`), so both find the same folder."""
    hashed = {k: v for k, v in cfg.to_dict(hashed_only=True).items()
              if k not in ("experiments", "methods", "lambda_scales", "seeds", "dense_baseline", "eval_per_epoch")}
    spec = dict(hashed, model=model, dataset=dataset, method=method, lam=lam, seed=seed,
                eval_per_epoch=cfg.eval_per_epoch, settings=cfg.settings(model))
    if method == "dense":  # gate settings do not change a dense run
        spec = {k: v for k, v in spec.items() if k not in ("gate_lr", "init_log_alpha", "penalty")}
    return spec


def unit_store(cfg: Config, unit: tuple[str, str, str, float, int], results_dir: str | None = None) -> Store:
    """The results folder of ``unit`` (an item of :func:`units`) under ``results_dir`` (default: the config's)."""
    return Store(cfg.results_dir if results_dir is None else results_dir, CHAPTER, unit_spec(cfg, *unit))


def unit_done(store: Store) -> bool:
    return store.exists("result.json")  # frames first, result last: a finished result means all is there


def run_unit(cfg: Config, unit: tuple[str, str, str, float, int], data=None, results_dir: str | None = None,
             progress: bool = False) -> Store:
    """Train ``unit`` and write its files (frames first, ``result.json`` last) into its results folder."""
    model, dataset, method, lam, seed = unit
    store = unit_store(cfg, unit, results_dir)
    # the checkpoints live in the unit's own folder under cfg.results_dir on every process of a torchrun
    # group (rank 0 writes them, every rank resumes from them), whatever results_dir this process writes
    home = unit_store(cfg, unit).dir
    data = data if data is not None else load_dataset(dataset, root=cfg.data_root)
    out = train_unit(model, dataset, method, lam, seed, cfg, data=data, progress=progress, checkpoint=home)
    for name in ("history", "gates", "architecture", "trace"):
        store.save_frame(name, out[name])
    store.json("provenance", lambda: dict(last_run(), unit_seconds=out["result"]["seconds"]))
    store.json("result", lambda: out["result"])
    if store.dir == home:  # the unit is saved: its checkpoints are spent
        for name in ("checkpoint.pt", "checkpoint_finetune.pt"):
            (home / name).unlink(missing_ok=True)
    return store


def work_units(cfg: Config) -> list:
    """Every unit of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`): its hash (the
    notebook's, from :func:`unit_spec`), what it trains, whether it is done, and ``run(results_dir)``."""
    from ..units import Unit

    out = []
    for unit in units(cfg):
        model, dataset, method, lam, seed = unit
        s = cfg.settings(model)
        store = unit_store(cfg, unit)
        what = (f"{model} on {dataset}, {_label(method)}" + ("" if method == "dense" else f", λ={lam:g}")
                + f", seed {seed}: {s['epochs']:g} epochs" + (f" + {s['finetune_epochs']:g} fine-tune"
                                                              if s["finetune_epochs"] else "")
                + f", batch {s['batch_size']}")
        out.append(Unit(store.key, CHAPTER, what, unit_done(store), (dataset,),
                        lambda results_dir, unit=unit: run_unit(cfg, unit, results_dir=results_dir,
                                                                 progress=True)))
    return out


def _unit_task(task, results_dir: str) -> str:
    """One unit for :func:`runs.map_units`: ``task`` is ``(cfg, unit)``; trains it into ``results_dir`` (on a
    worker, one torch thread per process) with the dataset loaded once per process."""
    cfg, unit = task
    store = unit_store(cfg, unit, str(results_dir))
    if unit_done(store):  # map_units calls a finished unit here too: it only loads
        return store.key
    data = load_dataset_once(unit[1], root=cfg.data_root)
    return run_unit(cfg, unit, data=data, results_dir=str(results_dir)).key


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run (or load from the results cache) every unit; returns frames ``results``, ``history``, ``gates``,
    ``architecture``, ``trace`` with columns model, dataset, method, lam, seed identifying the unit.

    The units missing from the cache run through :func:`runs.map_units`: here, one after another, unless
    ``$PRUNING_EXECUTOR`` names processes or a Dask cluster (``make book DASK=...``)."""
    frames: dict[str, list[pd.DataFrame]] = {"results": [], "history": [], "gates": [], "architecture": [],
                                             "trace": []}
    todo = units(cfg)
    bar = progress_bar(total=len(todo), desc="Dep-L0 units", progress=progress)
    map_units(_unit_task, [(cfg, u) for u in todo], results_dir=cfg.results_dir, executor=parse_executor(None, 1),
              done=lambda t: unit_done(unit_store(cfg, t[1])), key=lambda t: unit_store(cfg, t[1]).key, bar=bar)
    bar.close()
    for unit in todo:
        model, dataset, method, lam, seed = unit
        store = unit_store(cfg, unit)
        result = store.json("result")
        ident = dict(model=model, dataset=dataset, method=method, lam=lam, seed=seed)
        frames["results"].append(pd.DataFrame([result]))
        for name in ("history", "gates", "architecture", "trace"):
            try:
                df = store.frame(name)
            except pd.errors.EmptyDataError:  # the dense baseline has no gates
                df = pd.DataFrame()
            frames[name].append(df.assign(**ident) if len(df) else df)
    return {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in frames.items()}


# --- summaries ------------------------------------------------------------------------------------------

def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean (and seed spread) of test accuracy and FLOPs / parameters removed after compaction, by model,
    method and lambda."""
    r = results.assign(flops_removed=1 - results["flops_kept"], params_removed=1 - results["params_kept"])
    g = r.groupby(["model", "dataset", "method", "lam"], sort=False)
    out = g.agg(seeds=("seed", "nunique"), test_accuracy=("test_accuracy", "mean"),
                accuracy_sd=("test_accuracy", "std"), best_test_accuracy=("best_test_accuracy", "mean"),
                flops_removed=("flops_removed", "mean"), params_removed=("params_removed", "mean"),
                architectures=("architecture", lambda s: ", ".join(str(a) for a in s if isinstance(a, str))))
    return out.reset_index()


def _interp(x: np.ndarray, y: np.ndarray, at: float) -> float:
    order = np.argsort(x)
    x, y = x[order], y[order]
    if at < x[0] or at > x[-1]:
        return float("nan")
    return float(np.interp(at, x, y))


def matched_flops_level(results: pd.DataFrame, method: str, baseline: str = "l0_hc") -> pd.Series:
    """Per model, one FLOPs level (fraction kept) at which both methods are compared in every seed: the
    middle of the FLOPs range that every seed's λ sweep of ``method`` and of ``baseline`` covers (the
    intersection over seeds of the overlap of the two methods' ranges).  NaN when that range is empty."""
    levels = {}
    for model, r in results.groupby("model", sort=False):
        lo, hi = -np.inf, np.inf
        for _, rs in r.groupby("seed"):
            a, b = rs.loc[rs.method == method, "flops_kept"], rs.loc[rs.method == baseline, "flops_kept"]
            if a.empty or b.empty:
                continue
            lo, hi = max(lo, a.min(), b.min()), min(hi, a.max(), b.max())
        levels[model] = 0.5 * (lo + hi) if np.isfinite(lo) and np.isfinite(hi) and lo <= hi else np.nan
    return pd.Series(levels, name="flops_kept", dtype=float)


def accuracy_at_matched_flops(results: pd.DataFrame, method: str, baseline: str = "l0_hc") -> pd.DataFrame:
    """The accuracy-against-FLOPs frontier reduced to one value per seed: each seed's accuracy-against-FLOPs
    curve of each method (its λ sweep, sorted by FLOPs kept, linearly interpolated) read off at the model's
    :func:`matched_flops_level`.  One row per model and seed with both accuracies and ``gain`` = method -
    baseline; empty where the methods' ranges do not overlap."""
    levels = matched_flops_level(results, method, baseline)
    rows = []
    for (model, seed), r in results.groupby(["model", "seed"], sort=True):
        level = levels.get(model, np.nan)
        a, b = r[r.method == method], r[r.method == baseline]
        if a.empty or b.empty or not np.isfinite(level):
            continue
        acc = [_interp(x["flops_kept"].to_numpy(), x["test_accuracy"].to_numpy(), level) for x in (a, b)]
        rows.append(dict(model=model, seed=seed, flops_kept=level, method_acc=acc[0], baseline_acc=acc[1],
                         gain=acc[0] - acc[1]))
    df = pd.DataFrame(rows, columns=["model", "seed", "flops_kept", "method_acc", "baseline_acc", "gain"])
    return df.dropna().reset_index(drop=True)


def architecture_disagreement(architecture: pd.DataFrame) -> pd.DataFrame:
    """How much the kept architecture varies across seeds: for each model, method and lambda, the mean over
    layers of the standard deviation across seeds of the fraction of channels kept (0 = identical)."""
    a = architecture.assign(frac=architecture["kept"] / architecture["channels"])
    per_layer = a.groupby(["model", "method", "lam", "group"])["frac"].agg(["std", "count"]).reset_index()
    per_layer = per_layer[per_layer["count"] > 1]
    return per_layer.groupby(["model", "method", "lam"])["std"].mean().rename("disagreement").reset_index()


# --- figures --------------------------------------------------------------------------------------------

def _experiments(results: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(results["model"] + "/" + results["dataset"]))


def _palette(methods):
    import seaborn as sns
    colours = sns.color_palette("colorblind", 4)
    return {m: colours[i] for i, m in enumerate(["l0_hc", "dep_l0_forward", "dep_l0_backward", "dense"]) if m in methods}


def plot_tradeoff(results: pd.DataFrame, levels: pd.Series | None = None):
    """Test accuracy (after compaction) against FLOPs kept and against parameters kept, one row per model;
    dots are seeds, lines join the seed means over the lambda sweep; the dashed line is the dense network.
    ``levels`` (FLOPs kept by model, :func:`matched_flops_level`) are drawn as dotted vertical lines."""
    from ..plotting import figure, percent_axis
    exps = _experiments(results)
    fig, axes = figure(2, len(exps), width=9.0, height=3.2 * len(exps), squeeze=False)
    pal = _palette(results["method"].unique())
    for row, exp in enumerate(exps):
        model, dataset = exp.split("/")
        r = results[(results.model == model) & (results.dataset == dataset)]
        dense = r[r.method == "dense"]
        for col, what in enumerate(["flops_kept", "params_kept"]):
            ax = axes[row, col]
            for method, rm in r[r.method != "dense"].groupby("method", sort=False):
                ax.scatter(rm[what], rm["test_accuracy"], color=pal[method], s=18, alpha=0.6)
                mean = rm.groupby("lam")[[what, "test_accuracy"]].mean().sort_values(what)
                ax.plot(mean[what], mean["test_accuracy"], "-o", color=pal[method], ms=4, label=_label(method))
            if len(dense):
                ax.axhline(dense["test_accuracy"].mean(), ls="--", color="0.4", lw=1, label="dense (no gates)")
            if what == "flops_kept" and levels is not None and np.isfinite(levels.get(model, np.nan)):
                ax.axvline(levels[model], ls=":", color="0.2", lw=1, label="matched FLOPs (verdict)")
            percent_axis(ax, "x")
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("FLOPs kept" if what == "flops_kept" else "parameters kept")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{model} on {dataset}", fontsize=10)
        axes[row, 0].legend(fontsize=8, loc="lower right")
    return fig


def plot_same_lambda(results: pd.DataFrame):
    """FLOPs removed after compaction against λ, one panel per model: dots are seeds, lines join the seed
    means.  The paper's "removes more FLOPs at the same λ" observation, shown, not judged: at the same λ
    the methods end at different sparsities, so accuracy is compared at matched FLOPs instead."""
    from ..plotting import figure, percent_axis
    exps = _experiments(results[results.method != "dense"])
    fig, axes = figure(len(exps), 1, width=4.6 * len(exps), height=3.2, squeeze=False)
    r = results[results.method != "dense"]
    pal = _palette(r["method"].unique())
    for i, exp in enumerate(exps):
        model, dataset = exp.split("/")
        ax = axes[0, i]
        re = r[(r.model == model) & (r.dataset == dataset)]
        for method, rm in re.groupby("method", sort=False):
            ax.scatter(rm["lam"], 1 - rm["flops_kept"], color=pal[method], s=18, alpha=0.6)
            mean = rm.groupby("lam")["flops_kept"].mean()
            ax.plot(mean.index, 1 - mean.to_numpy(), "-o", color=pal[method], ms=4, label=_label(method))
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        percent_axis(ax, "y")
        ax.set_xlabel("λ")
        ax.set_ylabel("FLOPs removed")
        ax.set_title(f"{model} on {dataset}", fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    return fig


def plot_architecture(architecture: pd.DataFrame, lam_rank: int = 1):
    """Fraction of channels kept per layer (the architecture each method finds) at the ``lam_rank``-th
    smallest lambda of each model; one line per seed."""
    from ..plotting import figure, percent_axis
    exps = list(dict.fromkeys(architecture["model"] + "/" + architecture["dataset"]))
    fig, axes = figure(len(exps), 1, width=4.6 * len(exps), height=3.4, squeeze=False)
    pal = _palette(architecture["method"].unique())
    for i, exp in enumerate(exps):
        model, dataset = exp.split("/")
        a = architecture[(architecture.model == model) & (architecture.dataset == dataset)]
        lams = sorted(a["lam"].unique())
        lam = lams[min(lam_rank, len(lams) - 1)]
        a = a[a.lam == lam]
        ax = axes[0, i]
        styles = ["-", "--", ":", "-."]
        for (method, seed), am in a.groupby(["method", "seed"], sort=False):
            am = am.sort_values("layer_index")
            si = sorted(a["seed"].unique()).index(seed)
            ax.plot(am["layer_index"], am["kept"] / am["channels"], styles[si % 4], marker="o", ms=3,
                    color=pal[method], label=f"{_label(method)}, seed {seed}")
        groups = a.drop_duplicates("layer_index").sort_values("layer_index")
        ax.set_xticks(groups["layer_index"], [f"{g}\n({c})" for g, c in zip(groups["group"], groups["channels"])],
                      fontsize=7, rotation=0)
        ax.set_ylim(0, 1.05)
        percent_axis(ax, "y")
        ax.set_ylabel("channels kept")
        ax.set_title(f"{model}, λ = {lam:.2g}", fontsize=10)
    axes[0, -1].legend(fontsize=7, loc="lower left")
    return fig


def plot_training(trace: pd.DataFrame, seed: int | None = None):
    """Expected FLOPs kept (top) and expected L0 (fraction of gates non-zero in expectation, bottom) over
    training (``trace`` of :func:`run_experiment`), for every method and lambda (dotted, dashed, solid: increasing) of
    one seed."""
    from ..plotting import figure, percent_axis
    h = trace
    seed = h["seed"].min() if seed is None else seed
    h = h[h.seed == seed]
    exps = list(dict.fromkeys(h["model"] + "/" + h["dataset"]))
    fig, axes = figure(len(exps), 2, width=4.6 * len(exps), height=6.0, squeeze=False, sharex="col")
    pal = _palette(h["method"].unique())
    for i, exp in enumerate(exps):
        model, dataset = exp.split("/")
        he = h[(h.model == model) & (h.dataset == dataset)]
        lams = sorted(he["lam"].unique())
        for (method, lam), hm in he.groupby(["method", "lam"], sort=False):
            style = [":", "--", "-", "-."][min(lams.index(lam), 3) if len(lams) < 4 else lams.index(lam) % 4]
            x = hm["epochs_done"]
            for r, col in enumerate(["expected_flops_kept", "expected_l0_kept"]):
                axes[r, i].plot(x, hm[col], style, color=pal[method], lw=1.5,
                                label=f"{_label(method)}, λ={lam:.2g}")
        axes[0, i].set_title(f"{model} (seed {seed})", fontsize=10)
        axes[0, i].set_ylabel("expected FLOPs kept")
        axes[1, i].set_ylabel("expected L0 (gates)")
        axes[1, i].set_xlabel("epoch")
        for r in range(2):
            axes[r, i].set_ylim(0, 1.05)
            percent_axis(axes[r, i], "y")
    axes[0, -1].legend(fontsize=6, ncol=1, loc="lower left")
    return fig


def plot_hc_gate_histograms(gates: pd.DataFrame, lam_rank: int = 1, seed: int | None = None):
    """Histograms of ``P(z != 0)`` of every channel at the end of training, per model and method."""
    from ..plotting import figure
    seed = gates["seed"].min() if seed is None else seed
    g = gates[gates.seed == seed]
    exps = list(dict.fromkeys(g["model"] + "/" + g["dataset"]))
    methods = [m for m in METHODS if m in set(g["method"])]
    fig, axes = figure(len(methods), len(exps), width=3.0 * len(methods), height=2.6 * len(exps),
                       squeeze=False, sharex=True)
    pal = _palette(methods)
    bins = np.linspace(0, 1, 21)
    for i, exp in enumerate(exps):
        model, dataset = exp.split("/")
        ge = g[(g.model == model) & (g.dataset == dataset)]
        lams = sorted(ge["lam"].unique())
        lam = lams[min(lam_rank, len(lams) - 1)]
        for j, method in enumerate(methods):
            ax = axes[i, j]
            gm = ge[(ge.method == method) & (ge.lam == lam)]
            ax.hist(gm["prob_nonzero"], bins=bins, color=pal[method])
            ax.set_yscale("log")
            ax.set_ylim(0.8, max(len(gm), 1) * 1.5)  # same scale in every panel: counts of all channels
            ax.set_title(f"{model}: {_label(method)}", fontsize=9)
            ax.set_xlabel("P(z ≠ 0)")
        axes[i, 0].set_ylabel(f"channels (λ = {lam:.2g})")
    return fig


# --- claims ---------------------------------------------------------------------------------------------

PAPER = "tables not retrieved (abstract: 'outperforms by a clear margin')"
# Gale et al.'s released ResNet-50 / ImageNet sweeps (papers.md, "Peer numbers"): the published evidence
# behind "L0-HC prunes inconsistently at scale".
GALE_L0 = ("published (Gale et al. 2019, released state-of-sparsity sweep): L0 regularization on ResNet-50 / "
           "ImageNet, 323 runs, the best reaches 3.7 % top-1")


SETTLE_TOL = 0.02  # expected FLOPs kept may move less than 2 pp over the last quarter of training
SETTLE_TEXT = "expected FLOPs kept still moving ≥ 2 pp over the last quarter of training"


def settled_runs(trace: pd.DataFrame) -> pd.DataFrame:
    """Per gated run (model, method, lam, seed): has it stopped pruning? The expected fraction of FLOPs
    kept must change by less than :data:`SETTLE_TOL` over the last quarter of training
    (:func:`pruning_lib.claims.settled_table`)."""
    return claims.settled_table(trace, "expected_flops_kept", SETTLE_TOL, ["model", "method", "lam", "seed"],
                                "epochs_done")


def claims_table(cfg: Config, out: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The chapter's claims with verdicts computed from the run (:func:`pruning_lib.claims.ledger`).

    * Dep-L0 is more accurate than L0-HC: judged on the accuracy-against-FLOPs frontier, one value per
      seed (:func:`accuracy_at_matched_flops`: each seed's curve over λ read off at one FLOPs level
      inside both methods' ranges), paired t interval over seeds.  "Removes more FLOPs at the same λ" is
      the paper's observation on ResNet-50 / ImageNet, where L0-HC fails to prune; off ImageNet it is a
      figure (:func:`plot_same_lambda`), not a verdict, since at the same λ the methods end at different
      sparsities.
    * L0-HC prunes inconsistently at scale (Gale et al. 2019): a poor or failed compression trade-off of
      L0 regularization on ResNet-50 / ImageNet, not the seed variance of the kept architecture; judged
      on ResNet-50 / ImageNet only (FLOPs removed at the same λ there), "not measured" elsewhere.

    Every claim is judged only when every run it uses has stopped pruning (:func:`settled_runs`)."""
    results = out["results"]
    gated = results[results.method != "dense"]
    settle = settled_runs(out["trace"]) if len(out["trace"]) else pd.DataFrame(
        columns=["model", "method", "lam", "seed", "change", "settled"])

    def evidence(value, methods, models):
        s = settle[settle.method.isin(methods) & settle.model.isin(models)]
        return claims.Evidence(value, s["settled"].tolist(), SETTLE_TEXT)

    rows = []
    small = gated[gated.model != "resnet50"]
    for method in ("dep_l0_forward", "dep_l0_backward"):
        label = _label(method)
        m = accuracy_at_matched_flops(small, method)
        meas = None
        if not m.empty:
            meas = evidence(claims.per_seed(100 * m.set_index("seed")["gain"]), ["l0_hc", method],
                            m["model"].unique())
        rows.append((claims.Claim(
            f"{label} is more accurate than L0-HC at the same FLOPs",
            "Li & Ji 2021, abstract",
            "test accuracy after compaction (pp), Dep-L0 minus L0-HC, each seed's accuracy-against-FLOPs "
            "curve (over λ, interpolated) read off at one FLOPs level inside both methods' ranges in every "
            "seed (the middle of that range); per seed the mean over models",
            claims.Exceeds(fmt="{:+.2f}", unit="pp", a_name=label, b_name="L0-HC"), PAPER), meas))
    big = gated[gated.model == "resnet50"]
    meas = None
    if len(big):
        d = big[big.method == "dep_l0_forward"].set_index(["lam", "seed"])
        h = big[big.method == "l0_hc"].set_index(["lam", "seed"])
        both = d.index.intersection(h.index)
        if len(both):
            diff = 100 * (h.loc[both, "flops_kept"] - d.loc[both, "flops_kept"])
            meas = evidence(claims.per_seed(diff.droplevel("lam")), ["l0_hc", "dep_l0_forward"], ["resnet50"])
    rows.append((claims.Claim(
        "L0-HC prunes inconsistently at scale (Gale et al. 2019): on ResNet-50 / ImageNet its compression "
        "trade-off is poor or fails, and at the same λ it removes fewer FLOPs than Dep-L0",
        "Li & Ji 2021, abstract, Sec. 1 and Sec. 5",
        "FLOPs removed after compaction (pp), Dep-L0 (fwd) minus L0-HC at the same λ, ResNet-50 on "
        "ImageNet only (not measured off ImageNet); per seed the mean over λ",
        claims.Exceeds(fmt="{:+.1f}", unit="pp of FLOPs", a_name="Dep-L0 (fwd)", b_name="L0-HC"), GALE_L0),
        meas))
    return claims.ledger(CHAPTER, rows, cfg.profile, cfg.results_dir, budget=cfg.budget)


def settling_epochs(trace: pd.DataFrame, tol: float = 0.02) -> pd.DataFrame:
    """When each run stops pruning: the first epoch after which the expected FLOPs kept stay within ``tol`` of
    their final value, with the start and final values; one row per model, method, lambda and seed."""
    rows = []
    for key, t in trace.groupby(["model", "method", "lam", "seed"]):
        t = t.sort_values("step")
        f = t["expected_flops_kept"].to_numpy()
        far = np.flatnonzero(np.abs(f - f[-1]) > tol)
        settle = t["epochs_done"].to_numpy()[far[-1] + 1] if len(far) else 0.0
        rows.append(dict(zip(["model", "method", "lam", "seed"], key), settled_epoch=float(settle),
                         start=float(f[0]), final=float(f[-1])))
    return pd.DataFrame(rows)


# --- the page's tables and prose ------------------------------------------------------------------------

def settings_table(cfg: Config) -> pd.DataFrame:
    """One row per experiment: model, dataset, its training settings (:meth:`Config.settings`) and the λ
    values of the sweep (the model's base λ times :attr:`Config.lambda_scales`)."""
    rows = []
    for e in cfg.experiments:
        model, dataset = e.split("/")
        lambdas = ", ".join(f"{MODEL_SETTINGS[model]['base_lambda'] * s:.2g}" for s in cfg.lambda_scales)
        rows.append({"model": model, "dataset": dataset, **cfg.settings(model), "lambdas": lambdas})
    return pd.DataFrame(rows)


def settings_numbers(cfg: Config, out: dict[str, pd.DataFrame]) -> dict[str, float]:
    """The numbers of the page's settings: the gate steps of one run and how far Adam can move a free
    ``log_alpha`` in them (at the official 1e-3 and at ``cfg.gate_lr``); how far one Adam step on a generator
    weight can move the next layer's pre-activations (lr * C_1 * ln 100); and the penalty's scope for the
    first experiment's model (:func:`penalty_shares`)."""
    gate_steps = int(out["history"].query("phase == 'train'")["step"].max())
    first = out["architecture"].query("layer_index == 0")["channels"]
    first_width = int(first.iloc[0]) if len(first) else 0
    model, dataset = cfg.experiments[0].split("/")
    shares = penalty_shares(model, dataset, cfg.data_root)
    return {"gate_steps": gate_steps, "gate_lr": cfg.gate_lr, "travel_official": 1e-3 * gate_steps,
            "travel_ours": cfg.gate_lr * gate_steps, "first_width": first_width,
            "gen_step": cfg.gate_lr * first_width * math.log(100),
            "linear_share": shares["linear_share_of_params"], "conv_flops_share": shares["conv_share_of_flops"]}


def shown_summary(results: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_table` as the page shows it: methods by their labels, λ to 2 significant digits,
    numbers rounded to 4 places."""
    table = summary_table(results)
    return table.assign(method=table["method"].map(METHOD_LABELS), lam=table["lam"].map("{:.2g}".format)).round(4)


def matched_levels(cfg: Config, results: pd.DataFrame) -> dict[str, pd.Series]:
    """Per Dep-L0 method of the run, the FLOPs level of each model at which it is read against L0-HC
    (:func:`matched_flops_level` over the gated runs)."""
    gated = results[results.method != "dense"]
    return {m: matched_flops_level(gated, m) for m in cfg.methods if m.startswith("dep_l0")}


def shown_settled(settle: pd.DataFrame) -> pd.DataFrame:
    """:func:`settled_runs` as the page shows it: methods by their labels, λ to 2 significant digits, the
    change rounded to 4 places."""
    return settle.assign(method=settle["method"].map(METHOD_LABELS), lam=settle["lam"].map("{:.2g}".format),
                         change=settle["change"].round(4))


def unsettled_text(settle: pd.DataFrame) -> str:
    """The runs of :func:`settled_runs` still pruning at the end (method, λ, seed, change), or "none"."""
    unsettled = settle[~settle["settled"]]
    if unsettled.empty:
        return "none: every gated run settled"
    return "; ".join(f"{METHOD_LABELS[r.method]} λ={r.lam:.2g} seed {r.seed} ({r.change:.1%})"
                     for r in unsettled.itertuples())


def discussion(cfg: Config, out: dict[str, pd.DataFrame], table: pd.DataFrame) -> dict[str, str | float]:
    """The numbers and Markdown lists of the chapter's discussion, by glue name (``*_md`` are Markdown):
    the accuracy / FLOPs pairs of each method (mean over seeds, by λ), the accuracies read off at the
    common FLOPs level (:func:`accuracy_at_matched_flops`), the verdicts of ``table``
    (:func:`claims_table`), when the gates settle (:func:`settling_epochs`), the runs in which a whole
    layer closed, the units' summed training minutes and the number of epochs."""
    results = out["results"]
    gated = results[results.method != "dense"]
    lines = []
    for (model, dataset), r in results.groupby(["model", "dataset"], sort=False):
        parts = []
        for method in ["dense", "l0_hc", "dep_l0_forward", "dep_l0_backward"]:
            rm = r[r.method == method]
            if rm.empty:
                continue
            g = rm.groupby("lam")[["test_accuracy", "flops_kept"]].mean().reset_index()
            pairs = "; ".join(f"{a:.1%} at {1 - f:.0%} FLOPs removed"
                              for a, f in zip(g["test_accuracy"], g["flops_kept"]))
            parts.append(f"**{METHOD_LABELS[method]}** {pairs}")
        lines.append(f"- {model} on {dataset} (test accuracy, mean over seeds, by increasing λ): " + " | ".join(parts))
    verdicts = table.set_index("claim")["verdict"]
    settle = settling_epochs(out["trace"]).groupby(["model", "method"], sort=False).agg(
        settled=("settled_epoch", "median"), start=("start", "mean"), final=("final", "mean"))
    matched = []
    for method, lv in matched_levels(cfg, results).items():
        m = accuracy_at_matched_flops(gated, method)
        for model, level in lv.items():
            mm = m[m.model == model]
            if mm.empty:
                matched.append(f"- {model}, {METHOD_LABELS[method]}: the two methods' FLOPs ranges do not "
                               "overlap in every seed, so there is no common level to read them at")
                continue
            matched.append(f"- {model} at {level:.1%} of the FLOPs kept, {METHOD_LABELS[method]} against "
                           "L0-HC, by seed: " + "; ".join(
                               f"seed {r.seed}: {r.method_acc:.2%} against {r.baseline_acc:.2%}"
                               for r in mm.itertuples()))
    empty = (gated[gated["empty_layers"].fillna("").astype(str).str.len() > 0] if "empty_layers" in gated
             else gated.iloc[:0])
    return {
        "pairs_md": "\n".join(lines),
        "train_minutes": float(results["seconds"].sum() / 60),
        "verdicts_md": "; ".join(f"*{c}*: **{v}**" for c, v in verdicts.items()),
        "settle_md": "\n".join(
            f"- {model}, {METHOD_LABELS[method]}: expected FLOPs kept {r.start:.0%} at the start, "
            f"{r.final:.0%} at the end, settled after epoch {r.settled:.2f} (median)"
            for (model, method), r in settle.iterrows()),
        "epochs_n": float(cfg.epochs),
        "matched_md": "\n".join(matched) or "- no Dep-L0 run in this profile",
        "collapsed_md": "none" if empty.empty else "; ".join(
            f"{METHOD_LABELS[r.method]} λ={r.lam:.2g} seed {r.seed} (layer {r.empty_layers}: "
            f"{r.test_accuracy:.1%} test accuracy)" for r in empty.itertuples()),
    }
