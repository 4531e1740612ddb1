"""Chapter 05, "Consensus sub-networks with polarization regularization" (Zhi et al. 2023, arXiv 2302.10798).

The method (gating modules, straight-through gates, density loss, polarizer, consensus, compaction) is
:mod:`pruning_lib.methods.polarization`; this module holds the chapter: its Config, its units of work (dense
networks, gated runs of the target sweep and without polarizer, baselines), :func:`run_experiment`, tables,
figures and claims.

Baselines at equal sparsity: *magnitude* (the dense network's channels ranked by the L1 norm of their filters,
the same number kept per group as the gates kept, then a short fine-tune) and *random* (random channels, same
counts, same fine-tune).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import claims as claims_mod
from .. import dense
from ..claims import AtLeast, AtMost, Claim
from ..data import batches, load_dataset_once
from ..methods.polarization import (apply_static, compact_static, gate_statistics, gated_optimizer,
                                    gated_penalties, keep_sparsity, set_mode, static_keep,
                                    strip_gates, train_polarized, train_step)
from ..metrics import count_connections, count_flops
from ..models import build_model
from ..runs import RunConfig, Store, map_units, param, progress_bar
from ..timing import best_layout_forward_seconds, best_of
from ..train import adam, evaluate, fit

CHAPTER = "05_polarization"
METHODS = ("polarization", "magnitude", "random")

__all__ = [
    "CHAPTER", "METHODS", "Config", "work_units", "run_experiment", "training_step_seconds", "sweep_table",
    "latency_table", "no_polarizer_table", "plot_sweep", "plot_gate_value_histograms", "plot_consensus",
    "plot_compute", "model_label", "drop_at", "settled_runs", "claims_table", "verdict", "sweep_summary",
    "findings",
]


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------

MODEL_CHOICES = ("lenet5_caffe", "resnet20", "resnet56", "small_vgg", "vgg16_bn", "conv2", "conv4")
DATASET_CHOICES = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic-mnist",
                   "synthetic-cifar")


@dataclass(frozen=True)
class Config(RunConfig):
    """Settings of the polarization chapter (``None`` in a notebook means "the profile's value")."""

    models: tuple[str, ...] = param(("lenet5_caffe", "resnet20"), choices=MODEL_CHOICES, help="networks")
    datasets: tuple[str, ...] = param(("mnist5k",), choices=DATASET_CHOICES, help="every model on every one")
    data_root: str = param("data", help="where the large datasets live")
    width: float = param(1.0, low=0.05, high=4.0, help="width multiplier of non-ResNet models")
    resnet_width: float = param(0.25, low=0.05, high=4.0, help="width multiplier of ResNets")
    targets: tuple[float, ...] = param((0.3, 0.5, 0.7, 0.9), low=0.0, high=0.99,
                                       help="user-set gate sparsities of the sweep")
    seeds: tuple[int, ...] = param((0, 1, 2), low=0, help="seeds of non-ResNet models")
    resnet_seeds: tuple[int, ...] = param((0, 1, 2), low=0, help="seeds of ResNets")
    epochs: float = param(6.0, low=0.01, help="training epochs (dense and gated, one pass)")
    batch_size: int = param(64, low=1)
    lr: float = param(2e-3, low=0.0, help="Adam learning rate")
    lr_schedule: str = param("cosine", choices=("constant", "cosine"),
                             help="learning-rate schedule of the dense and gated trainings (per epoch)")
    gate_lr: float = param(1e-2, low=0.0, help="Adam learning rate of the gating modules")
    polarizer_weight: float = param(2.0, low=0.0, help="lambda_p, weight of the polarizer")
    density_weight: float = param(10.0, low=0.0, help="lambda_d, weight of the density loss")
    polarizer_form: str = param("product", choices=("product", "zhuang"))
    zhuang_t: float = param(1.4, low=1.0, help="t of Zhuang et al.'s polarizer")
    density_scope: str = param("layer", choices=("layer", "global", "weighted"),
                               help="how gate densities are pooled in the density loss")
    block_gates: bool = param(True, help="gate whole residual blocks too (ResNets)")
    no_polarizer_target: float = param(0.5, low=0.0, high=0.99,
                                       help="target of the extra run without polarizer (histograms; first "
                                            "seed of each model)")
    finetune_epochs: float = param(0.5, low=0.0, help="fine-tuning of the magnitude/random baselines")
    timing_batch: int = param(256, low=1, help="batch size of the inference-time measurement (and batch 1)")
    timing_repeats: int = param(10, low=1, help="best of this many: inference passes, training steps")
    workers: int = param(1, low=1, high=64, help="parallel processes for independent runs")
    results_dir: str = param("results", help="results cache")

    NOT_HASHED: ClassVar[tuple[str, ...]] = RunConfig.NOT_HASHED + ("workers", "timing_repeats")
    BUDGETED: ClassVar[tuple[str, ...]] = ("epochs", "finetune_epochs")

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(models=("lenet5_caffe", "resnet20"), datasets=("synthetic-mnist",), width=0.25,
                      resnet_width=0.25, targets=(0.3, 0.6), seeds=(0,), resnet_seeds=(0,),
                      epochs=0.2, finetune_epochs=0.1, timing_repeats=1, timing_batch=32,
                      no_polarizer_target=0.6),
        "cpu": dict(workers=2),  # one process a core: units are single-threaded
        "paper": dict(models=("resnet56",), datasets=("cifar10", "cifar100", "tiny-imagenet"),
                      resnet_width=1.0, targets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), seeds=(0, 1, 2),
                      resnet_seeds=(0, 1, 2), epochs=160.0, lr=1e-3, finetune_epochs=20.0, batch_size=128),
    }

    def check(self) -> None:
        from ..runs import ConfigError

        if not self.targets:
            raise ConfigError("parameter 'targets': give at least one target sparsity")
        if not any(math.isclose(self.no_polarizer_target, t) for t in self.targets):
            raise ConfigError(f"parameter 'no_polarizer_target': {self.no_polarizer_target} must be one of the "
                              f"targets {list(self.targets)} (its run with the polarizer is the comparison)")

    def model_width(self, model: str) -> float:
        return self.resnet_width if model.startswith("resnet") else self.width

    def model_seeds(self, model: str) -> tuple[int, ...]:
        return self.resnet_seeds if model.startswith("resnet") else self.seeds


# --------------------------------------------------------------------------------------------------------
# Units of work
# --------------------------------------------------------------------------------------------------------

def _build(cfg: Config, model: str, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model, width=cfg.model_width(model), **data.model_kwargs())


def _train_spec(cfg: Config, model: str, dataset: str, seed: int) -> dict:
    return {"model": model, "dataset": dataset, "width": cfg.model_width(model), "seed": seed,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule}


# How a gated unit times its networks at inference (in its Store's spec, not in the baselines' that embed
# _gate_spec: a unit timed before each network got its faster memory format is not reused).
INFERENCE_TIMING = "each network in its faster memory format"


def _gated_store(cfg: Config, root: str, model: str, dataset: str, seed: int, target: float,
                 polarizer_weight: float) -> Store:
    spec = {**_gate_spec(cfg, model, dataset, seed, target, polarizer_weight), "inference_timing": INFERENCE_TIMING}
    return Store(root, "polarization/gated", spec)


def _gate_spec(cfg: Config, model: str, dataset: str, seed: int, target: float, polarizer_weight: float) -> dict:
    return {**_train_spec(cfg, model, dataset, seed), "target": target, "polarizer_weight": polarizer_weight,
            "density_weight": cfg.density_weight, "polarizer_form": cfg.polarizer_form,
            "zhuang_t": cfg.zhuang_t if cfg.polarizer_form == "zhuang" else None,
            "density_scope": cfg.density_scope, "block_gates": cfg.block_gates, "gate_lr": cfg.gate_lr}


def training_step_seconds(gated: nn.Module, data, *, penalties: dict, batch_size: int, lr: float,
                          gate_lr: float | None = None, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Wall time of one training step with the gates against one step of the dense network, side by side.

    Copies of ``gated`` (gating modules in dynamic mode, :func:`gated_optimizer`, ``penalties``: the step
    of the one training pass) and of its backbone without gates (plain Adam, cross-entropy: the dense
    step) take turns on the same training batch; after one warm-up step each, the fastest of ``repeats``
    steps of each is kept (other processes on a shared machine only ever add time).  ``gated`` itself is
    not changed.  Returns ``{"step_seconds_gated", "step_seconds_dense"}``.
    """
    g = copy.deepcopy(gated)
    set_mode(g, "dynamic")
    d = strip_gates(gated)
    g.train()
    d.train()
    gen = torch.Generator().manual_seed(seed)
    device = next(g.parameters()).device
    x, y = next(iter(batches(data.train, batch_size, shuffle=True, generator=gen, device=device)))
    steps = {"gated": (g, gated_optimizer(g, lr, gate_lr), penalties),
             "dense": (d, adam(d.parameters(), lr=lr), {})}
    gated_s, dense_s = best_of([lambda: train_step(*steps["gated"], x, y), lambda: train_step(*steps["dense"], x, y)],
                               repeats, warmup=1, alternate=True)  # alternate who goes first
    return {"step_seconds_gated": gated_s, "step_seconds_dense": dense_s}


def _timed(compute):
    """Wrap a unit's ``compute`` so that its result records how long the unit took: ``unit_seconds`` (wall)
    and ``unit_cpu_seconds`` (CPU time of this process: what the unit costs a free core, whatever else the
    machine runs)."""
    def run():
        t0, c0 = time.perf_counter(), time.process_time()
        out = compute()
        out["unit_seconds"] = time.perf_counter() - t0
        out["unit_cpu_seconds"] = time.process_time() - c0
        return out
    return run


def dense_spec(cfg: Config, model: str, dataset: str, seed: int) -> dense.DenseSpec:
    """The chapter's dense network as a dense unit (:mod:`pruning_lib.dense`): Adam at ``lr`` with the
    chapter's learning-rate schedule for ``epochs``, at the model's width; the gated runs start from the same
    seeded initialisation, and the baselines prune its weights."""
    return dense.DenseSpec(model, dataset, seed, batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs,
                           width=cfg.model_width(model), lr_schedule=cfg.lr_schedule)


def _legacy_dense(cfg: Config, model: str, dataset: str, seed: int) -> dense.Legacy:
    """The network's Store before the dense unit: ``polarization/dense`` with :func:`_train_spec`, files
    ``model.pt`` and ``metrics.json``. It kept no history, so the adopted one is a single row: the final test
    accuracy and the training seconds it recorded."""
    def convert(old: Store):
        m = old.json("metrics")
        return old.torch("model"), pd.DataFrame([{"epoch": float(cfg.epochs), "test_accuracy": m["test_accuracy"],
                                                  "seconds": m["train_seconds"]}])
    return dense.Legacy("polarization/dense", _train_spec(cfg, model, dataset, seed), ("model.pt", "metrics.json"),
                        convert, note="the old unit kept no history: history.csv holds its final test accuracy "
                                      "and training seconds only")


def _dense_store(cfg: Config, model: str, dataset: str, seed: int, root: str | None = None) -> Store:
    return dense.store(dense_spec(cfg, model, dataset, seed), root or cfg_root(cfg),
                       _legacy_dense(cfg, model, dataset, seed))


def _dense_unit(cfg: Config, model: str, dataset: str, seed: int) -> dict:
    data = load_dataset_once(dataset, root=cfg.data_root)
    net, hist = dense.train(dense_spec(cfg, model, dataset, seed), results_dir=cfg_root(cfg), data=data,
                            progress=False, desc="dense", legacy=_legacy_dense(cfg, model, dataset, seed))
    net = net.cpu()
    secs = float(hist["seconds"].iloc[-1])
    return {"test_accuracy": float(hist["test_accuracy"].iloc[-1]), "train_seconds": secs, "unit_seconds": secs,
            "connections": count_connections(net), "flops": count_flops(net, data.input_shape)}


def _gate_unit(cfg: Config, model: str, dataset: str, seed: int, target: float, pw: float) -> dict:
    store = _gated_store(cfg, cfg_root(cfg), model, dataset, seed, target, pw)

    def compute():
        data = load_dataset_once(dataset, root=cfg.data_root)
        net = _build(cfg, model, data, seed)
        dense_conn, dense_flops = count_connections(net), count_flops(net, data.input_shape)
        t0 = time.perf_counter()
        hist, counter = train_polarized(net, data, target=target, polarizer_weight=pw,
                                        density_weight=cfg.density_weight, form=cfg.polarizer_form,
                                        t=cfg.zhuang_t, scope=cfg.density_scope, block_gates=cfg.block_gates,
                                        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                        gate_lr=cfg.gate_lr, lr_schedule=cfg.lr_schedule, seed=seed)
        secs = time.perf_counter() - t0
        # the wall-clock cost of the one pass against dense training: the two steps side by side, here
        steps = training_step_seconds(
            net, data, penalties=gated_penalties(target, pw, cfg.density_weight, cfg.polarizer_form,
                                                 cfg.zhuang_t, cfg.density_scope),
            batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=cfg.gate_lr, repeats=cfg.timing_repeats, seed=seed)
        device = next(net.parameters()).device
        dynamic_acc = evaluate(net, data.test)["accuracy"]
        train_stats = gate_statistics(net, data.train)
        test_stats = gate_statistics(net, data.test)  # the consensus, measured before compaction
        keep = static_keep(train_stats)
        apply_static(net, keep)
        static_acc = evaluate(net, data.test)["accuracy"]
        small = compact_static(net, keep).eval()
        x = next(iter(batches(data.test, cfg.timing_batch, device=device)))[0]
        with torch.no_grad():
            diff = float((small(x) - net.eval()(x)).abs().max())
        compact_acc = evaluate(small, data.test)["accuracy"]
        dense = strip_gates(net)
        # each network in its faster memory format (training left the dense one channels-last, compaction
        # made the small one's new tensors contiguous): see timing.best_layout_forward_seconds
        (t_dense, t_small), layouts = best_layout_forward_seconds([dense, small], x, cfg.timing_repeats)
        (t_dense1, t_small1), layouts1 = best_layout_forward_seconds([dense, small], x[:1], cfg.timing_repeats,
                                                                     inner=10)
        gates = test_stats.rename(columns={"mean": "mean_test", "agreement": "agreement_test"})
        gates["mean_train"] = train_stats["mean"].to_numpy()
        store.save_frame("gates", gates)
        store.save_frame("history", hist)
        n_gates = int(sum(len(v) for k, v in keep.items() if not k.startswith("block:")))
        n_open = int(sum(int(v.sum()) for k, v in keep.items() if not k.startswith("block:")))
        achieved = keep_sparsity(net, keep, cfg.density_scope)
        blocks = [k for k in keep if k.startswith("block:")]
        store.save_torch("keep", {k: v.clone() for k, v in keep.items()})
        return {
            "dynamic_accuracy": dynamic_acc, "static_accuracy": static_acc, "test_accuracy": compact_acc,
            "max_abs_diff": diff, "gate_sparsity": achieved,
            "channel_sparsity": 1 - n_open / max(n_gates, 1),
            "blocks_removed": int(sum(not bool(keep[b].any()) for b in blocks)), "blocks": len(blocks),
            "connections": count_connections(small), "dense_connections": dense_conn,
            "flops": count_flops(small, data.input_shape), "dense_flops": dense_flops,
            "train_flops_fraction": counter.fraction(), "train_seconds": secs,
            "consensus_test": float(test_stats["agreement"].mean()),
            "inference_seconds_dense": t_dense, "inference_seconds_compact": t_small,
            "inference_seconds_dense_b1": t_dense1, "inference_seconds_compact_b1": t_small1,
            "inference_layout_dense": layouts[0], "inference_layout_compact": layouts[1],
            "inference_layout_dense_b1": layouts1[0], "inference_layout_compact_b1": layouts1[1],
            **steps, "train_time_ratio": steps["step_seconds_gated"] / steps["step_seconds_dense"],
        }

    return store.json("metrics", _timed(compute))


def _l1_channel_scores(net: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for g in net.channel_groups():
        w = net.get_submodule(g.producer).weight.detach()
        out[g.name] = w.abs().reshape(w.shape[0], -1).sum(1)
    for path in net.residual_blocks():
        block = net.get_submodule(path)
        ws = [m.weight.detach().abs().mean() for n, m in block.named_modules()
              if isinstance(m, nn.Conv2d) and not n.startswith("downsample")]
        out[f"block:{path}"] = torch.stack(ws).mean().reshape(1)
    return out


def _baseline_store(cfg: Config, root: str, method: str, model: str, dataset: str, seed: int,
                    target: float) -> Store:
    gate_spec = _gate_spec(cfg, model, dataset, seed, target, cfg.polarizer_weight)
    return Store(root, "polarization/baseline",
                 {"method": method, "gated": gate_spec, "finetune_epochs": cfg.finetune_epochs})


def _baseline_unit(cfg: Config, method: str, model: str, dataset: str, seed: int, target: float) -> dict:
    store = _baseline_store(cfg, cfg_root(cfg), method, model, dataset, seed, target)

    def compute():
        data = load_dataset_once(dataset, root=cfg.data_root)
        keep_gates = _gated_store(cfg, cfg_root(cfg), model, dataset, seed, target, cfg.polarizer_weight).torch("keep")
        net = _build(cfg, model, data, seed)
        net.load_state_dict(_dense_store(cfg, model, dataset, seed).torch("model"))
        gen = torch.Generator().manual_seed(10_000 + seed)
        scores = _l1_channel_scores(net)
        # Channels: in every group keep as many as the gates kept; blocks: remove as many as the gates did.
        keep = {}
        for name, kg in keep_gates.items():
            if name.startswith("block:"):
                continue
            k = max(int(kg.sum()), 1)
            s = scores[name] if method == "magnitude" else torch.rand(len(kg), generator=gen)
            mask = torch.zeros(len(kg), dtype=torch.bool)
            mask[torch.topk(s, k).indices] = True
            keep[name] = mask
        blocks = [k for k in keep_gates if k.startswith("block:")]
        n_removed = sum(not bool(keep_gates[b].any()) for b in blocks)
        if blocks:
            bs = torch.cat([scores[b] for b in blocks]) if method == "magnitude" else torch.rand(len(blocks),
                                                                                                 generator=gen)
            off = set(torch.topk(-bs, n_removed).indices.tolist()) if n_removed else set()
            for i, b in enumerate(blocks):
                keep[b] = torch.tensor([i not in off])
        small = compact_static(net, keep)
        pruned_acc = evaluate(small, data.test)["accuracy"]
        acc = pruned_acc
        if cfg.finetune_epochs > 0:
            hist = fit(small, data, lr=cfg.lr, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                       seed=seed, progress=False, desc=f"{method} fine-tune")
            acc = float(hist["test_accuracy"].iloc[-1])
        return {"test_accuracy": acc, "pruned_accuracy": pruned_acc, "connections": count_connections(small),
                "flops": count_flops(small, data.input_shape)}

    return store.json("metrics", _timed(compute))


_RESULTS_ROOT = ["results"]  # set by run_experiment (and in each worker process)


def cfg_root(cfg: Config) -> str:
    return _RESULTS_ROOT[0]


def _unit(kind: str, cfg: Config, rest) -> dict:
    return {"dense": _dense_unit, "gated": _gate_unit, "baseline": _baseline_unit}[kind](cfg, *rest)


def _pool_unit(task, results_dir: str) -> dict:
    """One unit for :func:`runs.map_units`. On a worker (one thread per process, so ``workers``
    processes share the cores) it writes to the worker's results folder; serially, to this process's."""
    kind, cfg, rest = task
    _RESULTS_ROOT[0] = results_dir
    return _unit(kind, cfg, rest)


def _inputs(task) -> list:
    """The units ``task`` reads, finished: a baseline reads its gated run's keep masks and the dense
    weights; dense and gated units read none (a gated run starts from the same seeded initialisation)."""
    kind, cfg, rest = task
    if kind != "baseline":
        return []
    method, model, dataset, seed, target = rest
    return [("gated", cfg, (model, dataset, seed, target, cfg.polarizer_weight)),
            ("dense", cfg, (model, dataset, seed))]


def _store(task, root: str) -> Store:
    """A unit's own Store (the spec its function uses)."""
    kind, cfg, rest = task
    if kind == "dense":
        return _dense_store(cfg, *rest, root=root)
    if kind == "gated":
        return _gated_store(cfg, root, *rest)
    return _baseline_store(cfg, root, *rest)


def _done(task, root: str) -> bool:
    store = _store(task, root)
    return dense.done(store) if task[0] == "dense" else store.exists("metrics.json")


def _unit_stores(task, root: str) -> tuple[Store, list[Store]]:
    """A unit's own Store and the Stores of the finished units it reads (:func:`_inputs`)."""
    return _store(task, root), [_store(t, root) for t in _inputs(task)]


def _run_phase(units, cfg, root, workers, bar):
    """The units of one phase through :func:`runs.map_units`: ``$PRUNING_EXECUTOR`` (Dask workers, ...),
    else ``workers`` spawned processes (a phase with one unit to compute runs it here); finished units only load, here."""
    tasks = [(kind, cfg, rest) for kind, rest in units]
    root = str(root)
    return map_units(_pool_unit, tasks, results_dir=root, workers=workers, bar=bar,
                     done=lambda t: _done(t, root),
                     inputs=lambda t: _unit_stores(t, root)[1],
                     key=lambda t: f"{t[0]}-{_unit_stores(t, root)[0].key}")


def _combos(cfg: Config) -> list[tuple[str, str, int]]:
    """Every (model, dataset, seed) network of the chapter."""
    return [(m, d, s) for d in cfg.datasets for m in cfg.models for s in cfg.model_seeds(m)]


def _phases(cfg: Config) -> tuple[list, list, list]:
    """The units of :func:`run_experiment`, phase by phase, each ``(kind, args)``: dense networks, gated
    runs (the sweep, then the runs without polarizer), baselines; the slow ResNets first in each."""
    combos = _combos(cfg)
    dense_units = [("dense", (m, d, s)) for m, d, s in combos]
    gate_units = [("gated", (m, d, s, t, cfg.polarizer_weight)) for m, d, s in combos for t in cfg.targets]
    # the run without polarizer is a figure (histograms, consensus), not a claim: the first seed only
    nopol = [("gated", (m, d, s, cfg.no_polarizer_target, 0.0)) for m, d, s in combos
             if s == cfg.model_seeds(m)[0]]
    base_units = [("baseline", (meth, m, d, s, t)) for m, d, s in combos for t in cfg.targets
                  for meth in ("magnitude", "random")]

    # the slow ResNets first, so that parallel workers do not end on one long unit
    def longest_first(units):
        return sorted(units, key=lambda u: not any(str(x).startswith("resnet") for x in u[1]))

    return longest_first(dense_units), longest_first(gate_units + nopol), longest_first(base_units)


def _describe(cfg: Config, task) -> str:
    kind, _, rest = task
    if kind == "dense":
        m, d, s = rest
        return f"{m} on {d}, seed {s}: dense, {cfg.epochs:g} epochs, batch {cfg.batch_size}"
    if kind == "gated":
        m, d, s, t, pw = rest
        how = f"polarizer weight {pw:g}" if pw > 0 else "no polarizer"
        return (f"{m} on {d}, seed {s}: gated, target sparsity {t:g}, {how}, {cfg.epochs:g} epochs, "
                f"batch {cfg.batch_size}")
    meth, m, d, s, t = rest
    return (f"{m} on {d}, seed {s}: {meth} pruning to the gated run's channels at target {t:g}, "
            f"{cfg.finetune_epochs:g} epochs fine-tune (reads the gated and dense units)")


def _run_unit_with_inputs(task, results_dir: str) -> dict:
    """One unit from the command line: the finished units it reads first, where missing (they are
    units of this chapter, the same cached results whoever trains them), then the unit itself."""
    for dep in _inputs(task):
        if not _done(dep, results_dir):
            _pool_unit(dep, results_dir)
    return _pool_unit(task, results_dir)


def work_units(cfg: Config) -> list:
    """Every unit of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`), in its order:
    its hash (the notebook's Store), what it trains, whether it is done, and ``run(results_dir)``."""
    from ..units import Unit

    out = []
    for kind, rest in (u for phase in _phases(cfg) for u in phase):
        task = (kind, cfg, rest)
        store = _store(task, cfg.results_dir)
        dataset = rest[1] if kind != "baseline" else rest[2]
        out.append(Unit(store.key, store.kind, _describe(cfg, task), _done(task, cfg.results_dir), (dataset,),
                        lambda results_dir, task=task: _run_unit_with_inputs(task, str(results_dir))))
    return out


def run_experiment(cfg: Config, results_dir: str | None = None, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run (or load) every unit: dense networks, gated runs (sweep + no-polarizer runs), baselines.

    Each unit (one model x dataset x seed x target x method) is its own :class:`~pruning_lib.runs.Store`
    entry.  The independent units of each phase run through :func:`runs.map_units`: in ``cfg.workers``
    processes when it is > 1, or where ``$PRUNING_EXECUTOR`` says (a Dask cluster).

    Returns ``{"runs": one row per gated/baseline run, "gates": per-gate statistics, "dense": the dense
    networks, "wall_seconds": this call's wall time, "compute_seconds": the summed time of every unit when
    it was computed (what a fresh sequential run costs, even when everything was loaded from the cache),
    "cpu_seconds": the summed CPU time of the gated and baseline units (NaN for units computed before it was
    recorded; the dense units record wall time only)}``.
    """

    results_dir = cfg.results_dir if results_dir is None else results_dir
    _RESULTS_ROOT[0] = str(results_dir)
    dense_units, gated_units, base_units = _phases(cfg)
    t0 = time.perf_counter()
    bar = progress_bar(total=len(dense_units) + len(gated_units) + len(base_units),
                       desc="polarization runs", progress=progress)
    dense = _run_phase(dense_units, cfg, results_dir, cfg.workers, bar)
    gated = _run_phase(gated_units, cfg, results_dir, cfg.workers, bar)
    base = _run_phase(base_units, cfg, results_dir, cfg.workers, bar)
    bar.close()
    wall = time.perf_counter() - t0

    dense_by = {u[1]: r for u, r in zip(dense_units, dense)}
    rows, gate_frames, histories = [], [], []
    for (kind, (m, d, s, t, pw)), r in zip(gated_units, gated):
        dn = dense_by[(m, d, s)]
        method = "polarization" if pw > 0 else "no polarizer"
        rows.append({"model": m, "dataset": d, "seed": s, "target": t, "method": method,
                     "polarizer_weight": pw, "dense_accuracy": dn["test_accuracy"], **r})
        st = _gated_store(cfg, results_dir, m, d, s, t, pw)
        g = st.frame("gates")
        gate_frames.append(g.assign(model=m, dataset=d, seed=s, target=t, method=method))
        histories.append(st.frame("history").assign(model=m, dataset=d, seed=s, target=t, method=method))
    gate_rows = {(r["model"], r["dataset"], r["seed"], r["target"]): r for r in rows
                 if r["method"] == "polarization"}
    for (kind, (meth, m, d, s, t)), r in zip(base_units, base):
        g = gate_rows[(m, d, s, t)]
        rows.append({"model": m, "dataset": d, "seed": s, "target": t, "method": meth,
                     "dense_accuracy": dense_by[(m, d, s)]["test_accuracy"], **r,
                     "dense_connections": g["dense_connections"], "dense_flops": g["dense_flops"],
                     "train_flops_fraction": 1.0 + cfg.finetune_epochs / cfg.epochs * r["flops"] / g["dense_flops"]})
    order = {m: i for i, m in enumerate(cfg.models)}
    runs = pd.DataFrame(rows).sort_values("model", key=lambda c: c.map(order), kind="stable",
                                         ignore_index=True)
    runs["connection_sparsity"] = 1 - runs["connections"] / runs["dense_connections"]
    runs["flops_sparsity"] = 1 - runs["flops"] / runs["dense_flops"]
    runs["accuracy_drop"] = 100 * (runs["dense_accuracy"] - runs["test_accuracy"])
    dense_frame = pd.DataFrame([{"model": m, "dataset": d, "seed": s, **dense_by[(m, d, s)]}
                                for m, d, s in _combos(cfg)])
    return {"runs": runs, "gates": pd.concat(gate_frames, ignore_index=True), "dense": dense_frame,
            "history": pd.concat(histories, ignore_index=True), "wall_seconds": wall,
            "compute_seconds": float(sum(r.get("unit_seconds", 0.0) for r in dense + gated + base)),
            "cpu_seconds": float(sum(r.get("unit_cpu_seconds", math.nan) for r in gated + base))}


# --------------------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------------------

_LABEL = {"lenet5_caffe": "LeNet-5-Caffe", "resnet20": "ResNet-20", "resnet56": "ResNet-56",
          "small_vgg": "small VGG", "vgg16_bn": "VGG-16", "conv2": "Conv-2", "conv4": "Conv-4"}
_COLOR = {"polarization": "C0", "magnitude": "C1", "random": "C2", "no polarizer": "C3"}


def model_label(model: str) -> str:
    """The network's name as the chapter writes it (``resnet20`` -> ``ResNet-20``)."""
    return _LABEL.get(model, model)


def _panels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(runs["model"], runs["dataset"])))


def sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per model, dataset, method and target: accuracy and achieved sparsities."""
    cols = ["test_accuracy", "accuracy_drop", "connection_sparsity", "flops_sparsity"]
    extra = [c for c in ("gate_sparsity", "dynamic_accuracy", "consensus_test") if c in runs]
    t = (runs[runs["method"] != "no polarizer"]
         .groupby(["model", "dataset", "method", "target"], sort=False)[cols + extra].mean().reset_index())
    return t


def no_polarizer_table(runs: pd.DataFrame, target: float) -> pd.DataFrame:
    """With and without the polarizer at ``target``, on the seeds that have both runs (the first seed of
    each network): means of consensus, dynamic and static accuracy and gate sparsity, by model and method."""
    nopol_seeds = runs.loc[runs["method"] == "no polarizer", ["model", "seed"]].drop_duplicates()
    nopol = runs.merge(nopol_seeds, on=["model", "seed"])
    nopol = nopol[nopol["method"].isin(["polarization", "no polarizer"]) & (nopol["target"] == target)]
    return (nopol.groupby(["model", "method"])[["consensus_test", "dynamic_accuracy", "static_accuracy",
                                                 "gate_sparsity"]].mean())


def plot_sweep(runs: pd.DataFrame, dense: pd.DataFrame):
    """Test accuracy against achieved sparsity (connections, FLOPs), gates vs magnitude and random pruning."""
    from ..plotting import figure, percent_axis

    panels = _panels(runs)
    fig, axes = figure(2, len(panels), width=9.0, height=3.4 * len(panels), squeeze=False)
    for i, (m, d) in enumerate(panels):
        sub = runs[(runs["model"] == m) & (runs["dataset"] == d) & (runs["method"] != "no polarizer")]
        dn = dense[(dense["model"] == m) & (dense["dataset"] == d)]["test_accuracy"]
        for j, (xcol, xlabel) in enumerate([("connection_sparsity", "connections removed"),
                                            ("flops_sparsity", "FLOPs removed")]):
            ax = axes[i][j]
            for meth in METHODS:
                s = sub[sub["method"] == meth]
                if s.empty:
                    continue
                ax.scatter(s[xcol], 100 * s["test_accuracy"], s=14, alpha=0.45, color=_COLOR[meth])
                g = s.groupby("target")[[xcol, "test_accuracy"]].mean().sort_values(xcol)
                ax.plot(g[xcol], 100 * g["test_accuracy"], "-o", ms=4, color=_COLOR[meth], label=meth)
            mu = 100 * dn.mean()
            ax.axhline(mu, color="k", ls="--", lw=1, label="dense")
            ax.axhspan(mu - 1, mu, color="k", alpha=0.07, lw=0, label="dense − 1 pt")
            ax.set_xlim(0, 1)
            percent_axis(ax, "x")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{_LABEL.get(m, m)} on {d}")
        axes[i][0].legend(loc="lower left", fontsize=8)
    return fig


def plot_gate_value_histograms(gates: pd.DataFrame, target: float):
    """Histograms of the gates' means over test inputs, with and without the polarizer, at ``target``."""
    from ..plotting import figure

    sub = gates[np.isclose(gates["target"], target)]
    panels = list(dict.fromkeys(zip(sub["model"], sub["dataset"])))
    fig, axes = figure(len(panels), 1, width=4.5 * len(panels), height=3.4, squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (m, d) in zip(axes[0], panels):
        for meth in ("no polarizer", "polarization"):
            s = sub[(sub["model"] == m) & (sub["dataset"] == d) & (sub["method"] == meth)]
            w = np.full(len(s), 1 / max(len(s), 1))
            ax.hist(s["mean_test"], bins=bins, weights=w, alpha=0.55, color=_COLOR[meth],
                    label=f"{'with' if meth == 'polarization' else 'without'} polarizer")
        ax.set_yscale("log")
        ax.set_xlabel("gate mean over test inputs")
        ax.set_ylabel("fraction of gates")
        ax.set_title(f"{_LABEL.get(m, m)}, target sparsity {target:.0%}")
        ax.legend(fontsize=8)
    return fig


def plot_consensus(gates: pd.DataFrame, target: float):
    """Per-gate agreement across test inputs (``max(m, 1-m)``), gates sorted, with and without polarizer."""
    from ..plotting import figure, percent_axis

    sub = gates[np.isclose(gates["target"], target)]
    panels = list(dict.fromkeys(zip(sub["model"], sub["dataset"])))
    fig, axes = figure(len(panels), 1, width=4.5 * len(panels), height=3.4, squeeze=False)
    for ax, (m, d) in zip(axes[0], panels):
        for meth in ("no polarizer", "polarization"):
            s = sub[(sub["model"] == m) & (sub["dataset"] == d) & (sub["method"] == meth)]
            for seed, g in s.groupby("seed"):
                a = np.sort(g["agreement_test"].to_numpy())
                ax.plot(np.linspace(0, 1, len(a)), 100 * a, color=_COLOR[meth], alpha=0.8,
                        label=f"{'with' if meth == 'polarization' else 'without'} polarizer" if seed == s["seed"].min()
                        else None)
        ax.set_ylim(49, 101)
        percent_axis(ax, "x")
        ax.set_xlabel("gates, sorted by agreement")
        ax.set_ylabel("inputs agreeing with majority (%)")
        ax.set_title(f"{_LABEL.get(m, m)}, target sparsity {target:.0%}")
        ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_compute(runs: pd.DataFrame):
    """Left: cost of the one training pass with gates relative to dense training, per target: the measured
    wall-clock ratio (best-of-k training steps side by side) and the FLOP count of an ideal implementation
    that skips closed channels.  Right: measured inference time of the compact network / dense network."""
    from ..plotting import figure, percent_axis

    fig, (ax1, ax2) = figure(2, 1, width=9.0, height=3.6)
    panels = _panels(runs)
    pol_runs = runs[runs["method"] == "polarization"]
    bars = [("train_time_ratio", "measured wall time"), ("train_flops_fraction", "FLOP count, ideal skipping")]
    bars = [(c, lab) for c, lab in bars if c in pol_runs]
    width = 0.8 / (len(bars) * len(panels))
    targets = sorted(pol_runs["target"].unique())
    for i, (m, d) in enumerate(panels):
        sub = pol_runs[(pol_runs["model"] == m) & (pol_runs["dataset"] == d)]
        for k, (col, lab) in enumerate(bars):
            g = sub.groupby("target")[col]
            mean = g.mean().reindex(targets)
            x = np.arange(len(targets)) + (len(bars) * i + k - (len(bars) * len(panels) - 1) / 2) * width
            ax1.bar(x, 100 * mean.to_numpy(), width, color=f"C{i + 4}", alpha=1.0 if k == 0 else 0.4,
                    hatch=None if k == 0 else "//", label=f"{_LABEL.get(m, m)}: {lab}")
            for t_i, t in enumerate(targets):  # one dot per seed
                v = sub.loc[np.isclose(sub["target"], t), col]
                ax1.scatter(np.full(len(v), x[t_i]), 100 * v, s=6, color="k", zorder=3)
    ax1.set_xticks(np.arange(len(targets)), [f"{t:.0%}" for t in targets])
    ax1.axhline(100, color="k", ls="--", lw=1, label="dense training")
    ax1.set_xlabel("target sparsity")
    ax1.set_ylabel("training cost (% of dense)")
    ax1.legend(fontsize=7, loc="lower left")
    for i, (m, d) in enumerate(panels):
        s = pol_runs[(pol_runs["model"] == m) & (pol_runs["dataset"] == d)]
        ratio = s["inference_seconds_compact"] / s["inference_seconds_dense"]
        ax2.scatter(s["flops_sparsity"], 100 * ratio, color=f"C{i + 4}", label=_LABEL.get(m, m))
    xs = np.linspace(0, 1, 50)
    ax2.plot(xs, 100 * (1 - xs), "k--", lw=1, label="time ∝ FLOPs")
    ax2.axhline(100, color="k", lw=0.6)
    percent_axis(ax2, "x")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("FLOPs removed")
    ax2.set_ylabel("inference time (% of dense)")
    ax2.legend(fontsize=8)
    return fig


def latency_table(runs: pd.DataFrame, batch: int = 256) -> pd.DataFrame:
    """Compacted networks against the dense one at inference, per model and target (means over seeds):
    FLOPs reduction (dense / compact FLOPs), measured speed-up (dense / compact time, best of k, the two
    timed alternately; CPU, eval, ``no_grad``; each network in its faster memory format) at batch 1 and
    ``batch``, the efficiency speed-up / FLOPs reduction (1.0 is the limit: time proportional to FLOPs), and
    the formats the times come from (``dense / compact``; NCHW contiguous, NHWC channels-last; with the
    number of seeds where the seeds differ)."""
    pol_runs = runs[runs["method"] == "polarization"].copy()
    pol_runs["flops_reduction"] = pol_runs["dense_flops"] / pol_runs["flops"]
    cols, layouts = ["flops_reduction"], []
    for b, suffix in ((1, "_b1"), (batch, "")):
        dense_col, compact_col = f"inference_seconds_dense{suffix}", f"inference_seconds_compact{suffix}"
        if dense_col not in pol_runs:
            continue
        pol_runs[f"speedup_batch{b}"] = pol_runs[dense_col] / pol_runs[compact_col]
        pol_runs[f"efficiency_batch{b}"] = pol_runs[f"speedup_batch{b}"] / pol_runs["flops_reduction"]
        cols += [f"speedup_batch{b}", f"efficiency_batch{b}"]
        if f"inference_layout_dense{suffix}" in pol_runs:
            pol_runs[f"layouts_batch{b}"] = (pol_runs[f"inference_layout_dense{suffix}"].map(_FORMAT) + " / "
                                             + pol_runs[f"inference_layout_compact{suffix}"].map(_FORMAT))
            layouts.append(f"layouts_batch{b}")
    groups = pol_runs.groupby(["model", "target"], sort=False)
    t = groups[cols].mean()
    for c in layouts:
        t[c] = groups[c].agg(_tally)
    t = t[[c for c in pol_runs.columns if c in t.columns]].reset_index()
    t["model"] = t["model"].map(lambda m: _LABEL.get(m, m))
    return t


_FORMAT = {"contiguous": "NCHW", "channels_last": "NHWC"}


def _tally(values: pd.Series) -> str:
    """One value, or each value with its count where they differ (most common first)."""
    counts = values.value_counts()
    return counts.index[0] if len(counts) == 1 else ", ".join(f"{v} ×{n}" for v, n in counts.items())


# --------------------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------------------


def drop_at(runs: pd.DataFrame, model: str, dataset: str, level: float = 0.5) -> list[float]:
    """Per seed: the gated networks' accuracy drop (points) at ``level`` of connections removed, interpolated
    along the sweep.  When even the least sparse run removes more than ``level``, its drop is used (it
    removes at least ``level``, so a drop under the limit there is evidence for the claim); NaN when the
    sweep never reaches ``level``."""
    out = []
    sub = runs[(runs["model"] == model) & (runs["dataset"] == dataset) & (runs["method"] == "polarization")]
    for _, g in sub.groupby("seed"):
        g = g.sort_values("connection_sparsity")
        xs, ys = g["connection_sparsity"].to_numpy(), g["accuracy_drop"].to_numpy()
        if level < xs.min():
            out.append(float(ys[0]))
        else:
            out.append(float(np.interp(level, xs, ys)) if level <= xs.max() else float("nan"))
    return out


TIME_TOL = 5.0  # pp of the dense step: a saving must exceed what best-of-k timing on a shared machine resolves
SETTLE_TOL = 0.01  # test accuracy may move less than 1 pp over the last quarter of the gated training
SETTLE_TEXT = "test accuracy of the gated training still moving ≥ 1 pp over the last quarter"


def settled_runs(results: dict) -> pd.DataFrame:
    """Per gated run (model, dataset, seed, target, method): did its test accuracy settle over the last
    quarter of training (:func:`pruning_lib.claims.settled_table`)?"""
    keys = ["model", "dataset", "seed", "target", "method"]
    h = results.get("history")
    if h is None or h.empty:
        return pd.DataFrame(columns=[*keys, "change", "settled"])
    return claims_mod.settled_table(h, "test_accuracy", SETTLE_TOL, keys, "step")


def claims_table(cfg: Config, results: dict, results_dir: str | None = "results") -> pd.DataFrame:
    """The chapter's claims ledger (``pruning_lib.claims.ledger``), one row per claim and model. Every
    measurement is one value per seed (the mean over targets of that seed's runs), judged only when the
    gated runs it uses settled (:func:`settled_runs`). That the compact network equals the gated one is
    an identity of the code, tested in ``tests/test_polarization.py``, not a claim."""
    runs = results["runs"]
    settle = settled_runs(results)
    rows = []
    src = "Zhi et al. 2023, abstract"
    for m, d in _panels(runs):
        name = f"{_LABEL.get(m, m)}, {d}"
        sub = runs[(runs["model"] == m) & (runs["dataset"] == d)]
        pol = sub[sub["method"] == "polarization"].sort_values(["seed", "target"])
        st = settle[(settle["model"] == m) & (settle["dataset"] == d) & (settle["method"] == "polarization")]

        def ev(value):
            return claims_mod.Evidence(value, st["settled"].tolist(), SETTLE_TEXT)

        per = lambda col: claims_mod.seed_means(pol.assign(v=col), "v")  # noqa: E731
        rows.append((Claim(f"{name}: the gates reach the user-set sparsity",
                           src, "|gate sparsity − target| (pp), per seed the mean over targets",
                           AtMost(limit=5.0, fmt="{:.2f}", unit="pp")),
                     ev(per(100 * (pol["gate_sparsity"] - pol["target"]).abs()))))
        rows.append((Claim(f"{name}: the static sub-network (gates fixed) keeps the accuracy of the dynamic "
                           "one (gates computed per input)",
                           src, "test accuracy, dynamic minus static gating (pp), per seed the mean over "
                                "targets", AtMost(limit=0.5, fmt="{:+.2f}", unit="pp")),
                     ev(per(100 * (pol["dynamic_accuracy"] - pol["static_accuracy"])))))
        rows.append((Claim(f"{name}: with the polarizer the inputs agree on the gates (consensus)",
                           src, "mean per-gate agreement on the test set (%), per seed the mean over targets",
                           AtLeast(limit=95.0, fmt="{:.2f}", unit="%")),
                     ev(per(100 * pol["consensus_test"]))))
        drops = drop_at(runs, m, d, 0.5)
        seeds = sorted(pol["seed"].unique())
        rows.append((Claim(f"{name}: 50 % of connections removed with < 1 % accuracy loss", src,
                           "accuracy drop (pp) at 50 % connections removed, interpolated along each seed's "
                           "sweep (or at the least sparse run when that removes more)",
                           AtMost(limit=1.0, fmt="{:.2f}", unit="pp"),
                           paper="< 1 % (CIFAR-10/100, ResNet)"),
                     None if all(math.isnan(x) for x in drops) else ev(claims_mod.per_seed(drops, seeds))))
        for base in ("magnitude", "random"):
            pair = pol.merge(sub[sub["method"] == base], on=["seed", "target"], suffixes=("", "_base"))
            gain = claims_mod.seed_means(pair.assign(
                v=100 * (pair["test_accuracy"] - pair["test_accuracy_base"])), "v")
            rows.append((Claim(f"{name}: less accuracy lost than {base} pruning at the same compute saved",
                               src, f"test accuracy (pp), gates minus structured {base} pruning + "
                                    f"{cfg.finetune_epochs:g} epoch fine-tune, same channels per layer; per "
                                    "seed the mean over targets",
                               AtLeast(limit=0.0, fmt="{:+.2f}", unit="pp")), ev(gain)))
        # Wall-clock, not a FLOP count (a count of what an ideal implementation would skip is near-
        # tautological). Timing needs no settled run; the tolerance keeps timing noise from deciding.
        rows.append((Claim(f"{name}: the one training pass with gates takes less wall-clock time than dense "
                           "training (ours: PyTorch on this CPU)", src,
                           "training step with gates, density loss and polarizer / dense training step (%), "
                           "best of k, the two timed alternately on one batch in the same process; same "
                           "epochs, so the ratio of the trainings; per seed the mean over targets",
                           AtMost(limit=100.0 - TIME_TOL, fmt="{:.1f}", unit="%")),
                     per(100 * pol["train_time_ratio"]) if "train_time_ratio" in pol else None))
    return claims_mod.ledger(CHAPTER, rows, cfg.profile, results_dir, budget=cfg.budget)


def verdict(table: pd.DataFrame, label: str, words: str) -> tuple[str, str]:
    """``(verdict, ours)`` of the claim of ``table`` (:func:`claims_table`) about ``label`` (``"<model
    label>, <dataset>"``) whose text contains ``words``; ``("not measured", "—")`` when there is none."""
    row = table[table["claim"].str.startswith(label) & table["claim"].str.contains(words, regex=False)]
    return (row["verdict"].iloc[0], row["ours"].iloc[0]) if len(row) else ("not measured", "—")


def sweep_summary(runs: pd.DataFrame, dense: pd.DataFrame) -> str:
    """Markdown: per network, the static networks' accuracy and achieved sparsity at each target (means
    over seeds, :func:`sweep_table`), against the dense accuracy."""
    sw = sweep_table(runs)
    lines = []
    for (m, d), g in sw[sw["method"] == "polarization"].groupby(["model", "dataset"], sort=False):
        dn = 100 * dense[(dense["model"] == m) & (dense["dataset"] == d)]["test_accuracy"].mean()
        pairs = "; ".join(f"target {r.target:.0%}: {100 * r.test_accuracy:.1f} % at {r.connection_sparsity:.0%} "
                          f"connections / {r.flops_sparsity:.0%} FLOPs removed" for r in g.itertuples())
        lines.append(f"* **{model_label(m)} on {d}** (dense {dn:.1f} %): {pairs}.")
    return ("Measured accuracy and achieved sparsity of the static networks found by the gates "
            "(means over seeds):\n\n" + "\n".join(lines))


def findings(cfg: Config, runs: pd.DataFrame, table: pd.DataFrame) -> str:
    """Markdown: what the runs show, per network: consensus and the cost of static gates with and without
    the polarizer (first seed, at ``cfg.no_polarizer_target``), each claim's measurement and verdict
    (:func:`verdict`), the training FLOP count and the median measured inference speed-up."""
    notes = []
    for (m, d) in _panels(runs):
        label = f"{model_label(m)}, {d}"
        sub = runs[(runs["model"] == m) & (runs["dataset"] == d)]
        first = sub[sub["method"] == "no polarizer"]["seed"].unique()  # the seeds that have both runs
        at = sub[(sub["target"] == cfg.no_polarizer_target) & sub["seed"].isin(first)].groupby("method")
        cons = at["consensus_test"].mean()
        gap = (at["dynamic_accuracy"].mean() - at["static_accuracy"].mean()) * 100
        pol_runs = sub[sub["method"] == "polarization"]
        speed = (pol_runs["inference_seconds_dense"] / pol_runs["inference_seconds_compact"]).median()
        v50, o50 = verdict(table, label, "50 %")
        vmag, omag = verdict(table, label, "than magnitude")
        vrnd, ornd = verdict(table, label, "than random")
        vden, oden = verdict(table, label, "user-set sparsity")
        vst, ost = verdict(table, label, "static sub-network")
        vtime, otime = verdict(table, label, "wall-clock")
        notes.append(
            f"* **{label}.** At target {cfg.no_polarizer_target:.0%}, the mean per-gate agreement on the test set is "
            f"{100 * cons.get('polarization', float('nan')):.1f} % with the polarizer and "
            f"{100 * cons.get('no polarizer', float('nan')):.1f} % without; making the gates static costs "
            f"{gap.get('polarization', float('nan')):.2f} points of accuracy with it and "
            f"{gap.get('no polarizer', float('nan')):.2f} without (first seed); over all seeds and targets, "
            f"dynamic minus static accuracy: {ost} ({vst}). Gate sparsity vs target: {oden} ({vden}). "
            f"Accuracy drop at 50 % of connections removed: {o50} ({v50}). Against magnitude pruning: "
            f"{omag} ({vmag}); against random pruning: {ornd} ({vrnd}). Measured training time with gates: "
            f"{otime} of dense training ({vtime}); an implementation that skipped closed channels would execute "
            f"{100 * pol_runs['train_flops_fraction'].mean():.0f} % of the dense FLOPs (a count). Median measured "
            f"inference speed-up of the compact network: {speed:.2f}x at "
            f"{100 * pol_runs['flops_sparsity'].median():.0f} % of FLOPs removed (median run).")
    return "What the runs show (profile **" + cfg.profile + "**):\n\n" + "\n".join(notes)
