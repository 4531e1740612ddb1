"""Chapter 2, lottery tickets with plain and data-dependent criteria: Config, units, run, tables, figures,
claims (notebook ``02_lottery_tickets``).

Lévai & Zombori (2020), "Data-dependent pruning to find the winning lottery ticket" (arXiv 2006.14350), on
the frame of Frankle & Carbin (2019), "The lottery ticket hypothesis". The method, iterative pruning with
rewinding, is :mod:`pruning_lib.methods.imp`; the criteria are :mod:`pruning_lib.methods.criteria`. Here:
the chains of rounds for each (setup, criterion, seed), the controls (the ``random`` criterion, rewound;
*random re-initialisation*: the ticket's mask trained from a fresh initialisation), one-shot SNIP (Lee et
al. 2019), and what the chapter reads from them.

Every round of every (setup, criterion, seed) chain is one :class:`~pruning_lib.runs.Store` unit (mask,
history, final weights), so a stopped run resumes at the next round; the dense round 0, shared by all
criteria of a seed, is a dense unit (:mod:`pruning_lib.dense`). Only weights are pruned, never biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import claims, data as data_mod, dense, masks as masks_mod, plotting, reference
from ..masks import Mask
from ..methods import criteria as crit, imp
from ..models import build_model, glorot_init, weights
from ..runs import RunConfig, Store, digest, map_units, param, parse_executor, progress_bar
from ..train import EarlyStop, cross_entropy, fit

CHAPTER = "02_lottery_tickets"
# one-shot SNIP on LeNet-300-100, full MNIST (Lee et al. 2019, Table 1): density (or "dense") -> key in
# data/reference/published.csv
SNIP_PUBLISHED = {"dense": "snip_dense_lenet300_100", 0.05: "snip_lenet300_100_sparsity95",
                  0.02: "snip_lenet300_100_sparsity98"}

# The settings of Frankle & Carbin (2019, Fig. 2 / Appendix): Adam, batch 60, per-layer rates.
SETUPS: dict[str, dict[str, Any]] = {
    "lenet300_100/mnist": dict(model="lenet300_100", dataset="mnist", lr=1.2e-3, iterations=50_000,
                               rate_conv=0.0, rate_hidden=0.2, rate_output=0.1),
    "lenet300_100/mnist5k": dict(model="lenet300_100", dataset="mnist5k", lr=1.2e-3, iterations=50_000,
                                 rate_conv=0.0, rate_hidden=0.2, rate_output=0.1),
    # a second, harder full-size dataset for the relative claims (Fashion-MNIST, 60k/10k; our setting)
    "lenet300_100/fashion_mnist": dict(model="lenet300_100", dataset="fashion_mnist", lr=1.2e-3,
                                       iterations=50_000, rate_conv=0.0, rate_hidden=0.2, rate_output=0.1),
    "conv2/cifar10": dict(model="conv2", dataset="cifar10", lr=2e-4, iterations=20_000,
                          rate_conv=0.1, rate_hidden=0.2, rate_output=0.1),
    "conv4/cifar10": dict(model="conv4", dataset="cifar10", lr=3e-4, iterations=25_000,
                          rate_conv=0.1, rate_hidden=0.2, rate_output=0.1),
    "conv6/cifar10": dict(model="conv6", dataset="cifar10", lr=3e-4, iterations=30_000,
                          rate_conv=0.15, rate_hidden=0.2, rate_output=0.1),
    # generated stand-in: tests only, never in a chapter's results
    "lenet300_100/synthetic-mnist": dict(model="lenet300_100", dataset="synthetic-mnist", lr=1.2e-3,
                                         iterations=200, rate_conv=0.0, rate_hidden=0.2, rate_output=0.1),
}
ALL_CRITERIA = ("random", "random_grad", "magnitude", "magnitude_grad", "magnitude_increase",
                "magnitude_increase_grad", "movement", "movement_grad", "snip", "snip_grad")


@dataclass(frozen=True)
class Config(RunConfig):
    """Settings of the lottery-ticket chapter; ``None`` means "the setup's paper value" (:data:`SETUPS`)."""

    setups: tuple[str, ...] = param(("lenet300_100/mnist5k",), choices=tuple(SETUPS),
                                    help="model/dataset pairs")
    criteria: tuple[str, ...] = param(ALL_CRITERIA, choices=tuple(crit.CRITERIA),
                                      help="pruning criteria (name_grad = data-dependent variant)")
    seeds: tuple[int, ...] = param((0, 1, 2), low=0, help="one chain per seed (init, data order)")
    rounds: int = param(18, low=0, high=60, help="pruning rounds after the dense round 0")
    rate_hidden: float | None = param(None, low=0.0, high=1.0, help="per-round rate of hidden layers")
    rate_output: float | None = param(None, low=0.0, high=1.0, help="per-round rate of the output layer")
    rate_conv: float | None = param(None, low=0.0, high=1.0, help="per-round rate of conv layers")
    scope: str = param("layer", choices=("layer", "global"), help="per-layer rates or one global rate")
    global_rate: float = param(0.2, low=0.0, high=1.0, help="per-round rate with scope='global'")
    rewind_iteration: int = param(0, low=0, help="0: rewind to init; k > 0: late rewinding to iteration k")
    iterations: int | None = param(None, low=1, help="training iterations per round (at most)")
    patience: int | None = param(None, low=1, help="stop a round this many iterations after the best "
                                                  "validation loss (None: train all iterations)")
    lr: float | None = param(None, low=0.0, help="Adam learning rate")
    batch_size: int = param(60, low=1)
    eval_every: int = param(100, low=1, help="iterations between validation evaluations")
    init: str = param("glorot", choices=("glorot", "default"), help="Glorot-normal as in F&C, or torch's")
    width: float = param(1.0, low=0.01, help="width multiplier of the model")
    grad_point: str = param("init", choices=crit.GRAD_POINTS,
                            help="where |dL/dw| of the data-dependent variants is taken")
    grad_batches: int = param(1, low=1, help="batches averaged for |dL/dw|")
    grad_batch_size: int = param(100, low=1, help="batch size of the gradient (SNIP: 100)")
    reinit_criteria: tuple[str, ...] = param(("magnitude",), choices=tuple(crit.CRITERIA),
                                             help="criteria whose tickets get the random re-init control")
    snip_densities: tuple[float, ...] = param((0.05, 0.02), low=0.0, high=1.0,
                                              help="one-shot SNIP at these densities (Lee et al. Table 1)")
    match_tolerance: float = param(0.005, low=0.0, high=1.0,
                                   help="a ticket 'matches' dense within this test accuracy")
    sparse_below: float = param(0.25, low=0.0, high=1.0,
                                help="the gradient-factor claim averages rounds with at most this density")
    threads: int | None = param(None, low=1, help="torch CPU threads per process (not hashed)")
    workers: int = param(1, low=1, high=64, help="processes running chains in parallel (not hashed)")
    results_dir: str = param("results", help="where results are cached")

    NOT_HASHED: ClassVar[tuple[str, ...]] = RunConfig.NOT_HASHED + ("threads", "workers")
    # iterations left at None take the setup's value, scaled in setting()
    BUDGETED: ClassVar[tuple[str, ...]] = ("iterations", "patience")

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: real MNIST-5k, tiny training; numbers mean nothing
        "smoke": dict(seeds=(0,), rounds=2, iterations=30, eval_every=10, patience=None, sparse_below=1.0,
                      snip_densities=(0.05,), threads=1, rate_hidden=0.36, rate_output=0.19),
        # LeNet-300-100 on MNIST-5k; each round = two rounds of the 20 %/10 % schedule (1 - 0.8^2,
        # 1 - 0.9^2), so 8 rounds reach 2.87 % of the weights, as 16 rounds of F&C's schedule do (the
        # rounds at 4.47 % and 2.87 % bracket their 3.6 %). The compute goes to seeds (5, for the
        # gradient-factor claims, whose effects are tenths of a point) and to rounds long enough for
        # the sparse tickets to settle (in a one-seed probe of 2400 iterations the rounds at 4.47 % and
        # 2.87 % had their lowest validation loss at iteration 750), not to
        # the weakest criteria: random (a control, not a pruning algorithm) and SNIP (already
        # data-dependent; SNIP x |g| squares the gradient) run in the paper profile only.
        "cpu": dict(criteria=("magnitude", "magnitude_grad", "magnitude_increase", "magnitude_increase_grad",
                              "movement", "movement_grad"),
                    seeds=(0, 1, 2, 3, 4), rounds=8, rate_hidden=0.36, rate_output=0.19, iterations=1200,
                    patience=200, eval_every=25, threads=1, workers=2),
        # the papers' settings: full MNIST (LeNet-300-100) and CIFAR-10 (Conv-2/4/6) from data/
        "paper": dict(setups=("lenet300_100/mnist", "conv2/cifar10", "conv4/cifar10", "conv6/cifar10"),
                      seeds=(0, 1, 2, 3, 4), rounds=18, patience=None, eval_every=100),
    }

    def check(self) -> None:
        from ..runs import ConfigError
        if not self.seeds:
            raise ConfigError("parameter 'seeds': give at least one seed")
        if not self.criteria:
            raise ConfigError("parameter 'criteria': give at least one criterion")
        missing = sorted(set(self.reinit_criteria) - set(self.criteria))
        if missing:
            raise ConfigError(f"parameter 'reinit_criteria': {missing} are not in 'criteria'")
        for s in self.setups:
            if self.rewind_iteration >= self.setting(s)["iterations"]:
                raise ConfigError("parameter 'rewind_iteration' must be below the iterations per round")

    def setting(self, setup: str) -> dict[str, Any]:
        """The setup's paper values with this config's overrides."""
        out = dict(SETUPS[setup])
        for k in ("lr", "iterations", "rate_conv", "rate_hidden", "rate_output"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.iterations is None:  # the setup's own length, times the budget (set fields are scaled)
            out["iterations"] = self.scaled(out["iterations"])
        return out


# --- the chains of rounds ----------------------------------------------------------------------------

@dataclass
class Unit:
    """What one training unit needs: the data, the setup's model builder and training settings."""

    cfg: Config
    setup: str
    data: data_mod.DataSplits

    @property
    def s(self) -> dict[str, Any]:
        return self.cfg.setting(self.setup)

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_model(self.s["model"], width=self.cfg.width, **self.data.model_kwargs())
        return glorot_init(model) if self.cfg.init == "glorot" else model

    def train(self, model: nn.Module, seed: int, iterations: int, callbacks=()) -> pd.DataFrame:
        cbs = [EarlyStop(self.cfg.patience), *callbacks]
        return fit(model, self.data, lr=self.s["lr"], iterations=iterations, batch_size=self.cfg.batch_size,
                   eval_every=self.cfg.eval_every, seed=seed, callbacks=cbs, progress=False)

    def dense_spec(self, seed: int) -> dict[str, Any]:
        c = self.cfg
        return {"setup": self.setup, **{k: self.s[k] for k in ("model", "dataset", "lr", "iterations")},
                "seed": seed, "init": c.init, "width": c.width, "batch_size": c.batch_size,
                "eval_every": c.eval_every, "patience": c.patience, "rewind_iteration": c.rewind_iteration}

    def prune_settings(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        """The keyword arguments of :func:`pruning_lib.methods.imp.prune_round` for this setup: per-layer
        rates (or the global rate) and where the data-dependent criteria take their gradient."""
        c, s = self.cfg, self.s
        rates = (c.global_rate if c.scope == "global" else
                 imp.layer_rates(model, s["rate_hidden"], s["rate_output"], s["rate_conv"], names))
        return dict(rates=rates, scope=c.scope, grad_point=c.grad_point, grad_batches=c.grad_batches,
                    grad_batch_size=c.grad_batch_size)


def dense_unit_spec(unit: Unit, seed: int) -> dense.DenseSpec:
    """Round 0 as a dense unit (:mod:`pruning_lib.dense`): the setup's model, data, learning rate and
    iterations, the chapter's initialisation, evaluation interval and early stop, and snapshots of the
    initialisation and of the rewind iteration."""
    c, s = unit.cfg, unit.s
    return dense.DenseSpec(s["model"], s["dataset"], seed, batch_size=c.batch_size, lr=s["lr"],
                           iterations=s["iterations"], width=c.width, init=c.init, eval_every=c.eval_every,
                           patience=c.patience, snapshots=tuple(sorted({0, c.rewind_iteration})))


def _legacy_dense(unit: Unit, seed: int) -> dense.Legacy:
    """Round 0's Store before the dense unit: ``lottery/dense`` named by :meth:`Unit.dense_spec`, one file
    ``dense.pt`` (``{"init", "rewind", "final", "history"}``); the initial and rewind weights become the
    snapshots."""
    k = unit.cfg.rewind_iteration

    def convert(old: Store):
        saved = old.torch("dense")
        return saved["final"], saved["history"], {dense.snapshot_name(0): saved["init"],
                                                  dense.snapshot_name(k): saved["rewind"]}
    return dense.Legacy("lottery/dense", unit.dense_spec(seed), ("dense.pt",), convert)


def dense_store(unit: Unit, seed: int, root: str | None = None) -> Store:
    """Round 0's Store (a dense unit; an older ``lottery/dense`` Store of it is adopted first)."""
    return dense.store(dense_unit_spec(unit, seed), unit.cfg.results_dir if root is None else root,
                       _legacy_dense(unit, seed))


def dense_round(unit: Unit, seed: int) -> dict[str, Any]:
    """Round 0: the dense network's initialisation, rewind point, trained weights and history (a cached
    dense unit)."""
    spec = dense_unit_spec(unit, seed)
    model, history = dense.train(spec, results_dir=unit.cfg.results_dir, data=unit.data, progress=False,
                                 desc=f"{unit.setup} seed {seed}: round 0", legacy=_legacy_dense(unit, seed))
    st = dense.store(spec, unit.cfg.results_dir)
    init, rewind = (dense.snapshot(st, k) for k in (0, unit.cfg.rewind_iteration))
    return {"init": init, "rewind": rewind, "final": weights(model), "history": history}


def chain_spec(unit: Unit, seed: int, criterion: str, round_: int) -> dict[str, Any]:
    c, s = unit.cfg, unit.s
    spec = {**unit.dense_spec(seed), "criterion": criterion, "round": round_, "scope": c.scope}
    spec.update({"global_rate": c.global_rate} if c.scope == "global" else
                {k: s[k] for k in ("rate_conv", "rate_hidden", "rate_output")})
    if crit.is_data_dependent(criterion):
        spec.update(grad_point=c.grad_point if criterion != "snip" else "init",
                    grad_batches=c.grad_batches, grad_batch_size=c.grad_batch_size)
        if criterion.endswith(crit.DATA_DEPENDENT_SUFFIX) and crit.is_signed(criterion):
            spec["negative_base"] = crit.NEGATIVE_BASE  # how |g| scales a negative score
    return spec


def imp_chain(unit: Unit, seed: int, criterion: str, rounds: int, on_round=None) -> list[dict[str, Any]]:
    """Iterative pruning with rewinding for one criterion and seed; one cached Store unit per round.

    Returns one record per round (0 = dense): mask, history and metrics. A round found in the store is
    loaded, so a stopped run resumes at the next round. Trained weights are stored for the surviving
    entries only (the next round scores them).
    """
    dense = dense_round(unit, seed)
    offset = unit.cfg.rewind_iteration
    model = unit.build(seed)
    mask = Mask.ones_like(model)
    records = [{"round": 0, "mask": mask, "history": dense["history"],
                **imp.round_metrics(dense["history"])}]
    final = dense["final"]
    for r in range(1, rounds + 1):
        store = Store(unit.cfg.results_dir, "lottery/round", chain_spec(unit, seed, criterion, r))
        if store.exists("round.pt") and store.exists("final.pt"):
            rec = store.torch("round")
            final = imp.unpack(store.torch("final"), rec["mask"], dense["final"])
        else:
            scorer = imp.load_masked(unit.build(seed), final, mask)
            new_mask = imp.prune_round(scorer, criterion, dense["rewind"], mask, unit.data.train, seed=seed,
                                       round_=r, **unit.prune_settings(scorer, list(mask))).cpu()
            model = imp.load_masked(unit.build(seed), dense["rewind"], new_mask)  # rewind the survivors
            history = unit.train(model, seed, unit.s["iterations"] - offset)
            masks_mod.make_permanent(model)
            rec = {"mask": new_mask, "history": history, **imp.round_metrics(history, offset)}
            final = weights(model)
            store.save_torch("round", rec)
            store.save_torch("final", imp.pack(final, new_mask))  # written last: marks the round done
        mask = rec["mask"]
        records.append({"round": r, **rec})
        if on_round is not None:
            on_round()
    return records


def reinit_round(unit: Unit, seed: int, criterion: str, round_: int, mask: Mask) -> dict[str, Any]:
    """Random re-initialisation control: the ticket's mask trained from a fresh initialisation."""
    spec = {**chain_spec(unit, seed, criterion, round_), "control": "reinit"}

    def compute():
        model = unit.build(seed + 1_000_003)  # a different draw from the same distribution
        masks_mod.apply_mask(model, mask)
        history = unit.train(model, seed, unit.s["iterations"] - unit.cfg.rewind_iteration)
        masks_mod.make_permanent(model)
        return {"history": history, **imp.round_metrics(history, unit.cfg.rewind_iteration)}
    return Store(unit.cfg.results_dir, "lottery/reinit", spec).torch("reinit", compute)


def snip_round(unit: Unit, seed: int, density: float) -> dict[str, Any]:
    """SNIP as published: one-shot global pruning of the initialisation to ``density``, then training."""
    spec = {**unit.dense_spec(seed), "snip_density": density, "grad_batches": unit.cfg.grad_batches,
            "grad_batch_size": unit.cfg.grad_batch_size}

    def compute():
        model = unit.build(seed)
        batches = data_mod.batches(unit.data.train, unit.cfg.grad_batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(seed * 7919))
        import itertools
        mask = crit.snip_one_shot(model, cross_entropy, itertools.islice(batches, unit.cfg.grad_batches),
                                  density)
        masks_mod.apply_mask(model, mask)
        history = unit.train(model, seed, unit.s["iterations"])
        masks_mod.make_permanent(model)
        return {"mask": mask.cpu(), "history": history, **imp.round_metrics(history)}
    return Store(unit.cfg.results_dir, "lottery/snip", spec).torch("snip", compute)


@dataclass
class Results:
    """Tidy frames of a run: ``rounds`` (one row per setup, criterion, control, seed and round),
    ``curves`` (training histories), ``layers`` (per-layer density) and ``snip`` (one-shot SNIP)."""

    rounds: pd.DataFrame
    curves: pd.DataFrame
    layers: pd.DataFrame
    snip: pd.DataFrame
    wall_seconds: float = float("nan")  # of the run that computed the results (recorded once)


def _work(task, results_dir: str) -> None:
    """One task of a parallel run (on a :func:`runs.map_units` worker): a seed's dense round, one chain
    with its re-init controls, or one SNIP run; its units land in the worker's Store ``results_dir``."""
    cfg, setup, seed, kind, arg = task
    cfg = cfg.replace(results_dir=results_dir)  # not hashed: the worker's own results folder
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    unit = Unit(cfg, setup, data_mod.load_dataset(SETUPS[setup]["dataset"], root="data"))
    if kind == "dense":
        dense_round(unit, seed)
    elif kind == "chain":
        records = imp_chain(unit, seed, arg, cfg.rounds)
        if arg in cfg.reinit_criteria:
            for rec in records[1:]:
                reinit_round(unit, seed, arg, rec["round"], rec["mask"])
    else:
        snip_round(unit, seed, arg)


def _task_stores(task) -> list[Store]:
    """The units a task reads or writes (under ``cfg.results_dir``): the seed's dense round, and a chain's
    rounds and controls (a stopped chain resumes from its rounds) or the SNIP run."""
    cfg, setup, seed, kind, arg = task
    unit, root = Unit(cfg, setup, None), cfg.results_dir
    stores = [dense_store(unit, seed, root)]
    if kind == "chain":
        for rd in range(1, cfg.rounds + 1):
            spec = chain_spec(unit, seed, arg, rd)
            stores.append(Store(root, "lottery/round", spec))
            if arg in cfg.reinit_criteria:
                stores.append(Store(root, "lottery/reinit", {**spec, "control": "reinit"}))
    elif kind == "snip":
        stores.append(Store(root, "lottery/snip", {**unit.dense_spec(seed), "snip_density": arg,
                                                   "grad_batches": cfg.grad_batches,
                                                   "grad_batch_size": cfg.grad_batch_size}))
    return stores


_TASK_FILE = {"lottery/round": "final.pt", "lottery/reinit": "reinit.pt", "lottery/snip": "snip.pt"}


def _task_done(task) -> bool:
    """Whether every unit of ``task`` is in the Store (then it only loads, in the calling process)."""
    return all(dense.done(s) if s.kind == dense.KIND else s.exists(_TASK_FILE[s.kind]) for s in _task_stores(task))


def _all_cached(cfg: Config) -> bool:
    """Whether every unit of ``cfg`` is already in the Store (then no worker needs to start)."""
    dense, rest = _tasks(cfg)
    return all(_task_done(t) for t in dense + rest)


def _tasks(cfg: Config) -> tuple[list, list]:
    """The tasks of a parallel run: the dense rounds, then the chains and SNIP runs (the longest, chains
    with a re-init control, first, for a balanced finish)."""
    dense = [(cfg, s, seed, "dense", None) for s in cfg.setups for seed in cfg.seeds]
    rest = ([(cfg, s, seed, "chain", c) for s in cfg.setups for seed in cfg.seeds for c in cfg.criteria] +
            [(cfg, s, seed, "snip", d) for s in cfg.setups for seed in cfg.seeds for d in cfg.snip_densities])
    rest.sort(key=lambda t: (t[3] != "chain", t[4] not in cfg.reinit_criteria))
    return dense, rest


def _run_parallel(cfg: Config, progress: bool) -> None:
    """Fill the Store through :func:`runs.map_units` (``$PRUNING_EXECUTOR``, else ``cfg.workers`` spawned
    processes): the dense rounds first, since every chain of a seed starts from them; each task gets the
    finished units it reads, and its workers' units are stored here."""
    dense, rest = _tasks(cfg)
    bar = progress_bar(total=len(dense) + len(rest), desc="lottery chains", progress=progress)
    try:
        for batch in (dense, rest):
            todo = [t for t in batch if not _task_done(t)]  # finished tasks are read later, here
            bar.update(len(batch) - len(todo))
            map_units(_work, todo, results_dir=cfg.results_dir, workers=cfg.workers, inputs=_task_stores,
                      key=lambda t: digest([t[1:], t[0].digest()]), bar=bar)
    finally:
        bar.close()


def _task_key_store(task) -> Store:
    """The Store that names ``task``: the seed's dense round, the last round of a chain, or the SNIP run."""
    stores = _task_stores(task)
    return [s for s in stores if s.kind == "lottery/round"][-1] if task[3] == "chain" else stores[-1]


def _task_description(task) -> str:
    cfg, setup, seed, kind, arg = task
    s = cfg.setting(setup)
    training = f"at most {s['iterations']} iterations, batch {cfg.batch_size}, Adam {s['lr']:g}"
    if kind == "dense":
        return f"{setup}, seed {seed}: the dense network (round 0), {training}"
    if kind == "chain":
        control = ", with its random re-init control" if arg in cfg.reinit_criteria else ""
        return (f"{setup}, seed {seed}: {cfg.rounds} rounds of iterative pruning by {arg}, rewound{control}, "
                f"each {training} (resumes from its finished rounds)")
    return f"{setup}, seed {seed}: one-shot SNIP to {100 * arg:.3g} % of the weights, then {training}"


def work_units(cfg: Config) -> list:
    """The tasks :func:`run_experiment` sends to :func:`runs.map_units`, for the command line
    (:mod:`pruning_lib.units`): each seed's dense network, each (seed, criterion) chain of rounds (with its
    re-init control) and each one-shot SNIP run. A unit's hash is that of the Store the notebook reads for
    it (the chain's: its last round); ``run(results_dir)`` trains what is missing (a chain trains its
    seed's dense round first if needed, and resumes from its finished rounds)."""
    from ..units import Unit as WorkUnit

    dense, rest = _tasks(cfg)
    out = []
    for task in dense + rest:
        if task[3] == "chain" and cfg.rounds == 0:
            continue  # no round to train: the chain is its seed's dense network
        store = _task_key_store(task)
        out.append(WorkUnit(store.key, store.kind, _task_description(task), _task_done(task),
                            (SETUPS[task[1]]["dataset"],),
                            lambda results_dir, task=task: _work(task, results_dir)))
    return out


def run_experiment(cfg: Config, progress: bool = True) -> Results:
    """Every chain, control and one-shot SNIP run of ``cfg``, each round a cached Store unit.

    With ``cfg.workers > 1`` (or ``$PRUNING_EXECUTOR`` set) the units are computed first by
    :func:`runs.map_units` (processes, or Dask workers); the frames are then assembled from the Store.
    """

    import time
    t0 = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # small MLPs: more threads only add contention
    if parse_executor(None, cfg.workers).kind != "serial" and not _all_cached(cfg):
        _run_parallel(cfg, progress)
        progress = False
    n_units = len(cfg.setups) * len(cfg.seeds) * (
        len(cfg.criteria) * cfg.rounds + len(cfg.reinit_criteria) * cfg.rounds + len(cfg.snip_densities))
    bar = progress_bar(total=n_units, desc="lottery rounds", progress=progress)
    rows, curves, layers, snips = [], [], [], []
    for setup in cfg.setups:
        data = data_mod.load_dataset(SETUPS[setup]["dataset"], root="data")
        unit = Unit(cfg, setup, data)
        probe = unit.build(0)
        sizes = {n: p.numel() for n, p in probe.named_parameters() if n in masks_mod.prunable_names(probe)}
        for seed in cfg.seeds:
            for criterion in cfg.criteria:
                records = imp_chain(unit, seed, criterion, cfg.rounds, on_round=bar.update)
                controls = [("ticket", records)]
                if criterion in cfg.reinit_criteria:
                    rein = [{"round": 0, "mask": records[0]["mask"], **{k: v for k, v in records[0].items()
                                                                        if k not in ("round", "mask")}}]
                    for rec in records[1:]:
                        rein.append({"round": rec["round"], "mask": rec["mask"],
                                     **reinit_round(unit, seed, criterion, rec["round"], rec["mask"])})
                        bar.update()
                    controls.append(("reinit", rein))
                for control, recs in controls:
                    for rec in recs:
                        key = dict(setup=setup, criterion=criterion, control=control, seed=seed,
                                   round=rec["round"])
                        m = rec["mask"]
                        rows.append({**key, "remaining": m.density, **{k: rec[k] for k in (
                            "early_stop_iteration", "val_loss", "test_accuracy_early_stop",
                            "test_accuracy_end", "end_iteration")}})
                        h = rec["history"][["step", "val_loss", "val_accuracy", "test_accuracy"]].copy()
                        curves.append(h.assign(**key, remaining=m.density))
                        if control == "ticket":
                            for name, d in m.layer_density().items():
                                layers.append({**key, "layer": name, "size": sizes[name], "density": d,
                                               "remaining": m.density})
            for density in cfg.snip_densities:
                rec = snip_round(unit, seed, density)
                snips.append(dict(setup=setup, seed=seed, density=density, remaining=rec["mask"].density,
                                  **{k: rec[k] for k in ("early_stop_iteration", "test_accuracy_early_stop",
                                                         "test_accuracy_end")}))
                bar.update()
    bar.close()
    # the wall time of the first run that completed everything (a rerun only loads the cache)
    timing = Store(cfg.results_dir, "lottery/timing", {"config": cfg.to_dict(hashed_only=True)}).json(
        "wall", lambda: {"seconds": time.perf_counter() - t0, "workers": cfg.workers,
                         "threads": cfg.threads})
    return Results(pd.DataFrame(rows), pd.concat(curves, ignore_index=True), pd.DataFrame(layers),
                   pd.DataFrame(snips), float(timing["seconds"]))


def gain_table(cfg: Config, results: Results, metric: str = "test_accuracy_early_stop") -> pd.DataFrame:
    """Gain of each data-dependent variant over its plain criterion, in accuracy points, per round
    (mean ± half-width of the 95 % t interval over seeds, paired by seed); ``*`` marks a round whose
    interval excludes 0, from at least 3 seeds."""
    setup = cfg.setups[0]
    r = results.rounds[results.rounds.setup == setup]
    cols = {}
    for base in [c for c in cfg.criteria if not c.endswith(crit.DATA_DEPENDENT_SUFFIX)]:
        if base + crit.DATA_DEPENDENT_SUFFIX not in cfg.criteria:
            continue
        g = paired_gain(r, base, metric)
        cells = {}
        for _, row in g.iterrows():
            half = row["half"]
            star = "*" if (row["count"] >= claims.MIN_REPLICATES and abs(row["mean"]) > half) else ""
            spread = f" ± {100 * half:.2f}" if np.isfinite(half) else ""
            cells[f"{100 * row['remaining']:.3g} %"] = f"{100 * row['mean']:+.2f}{spread}{star}"
        cols[f"{pair_label(base)} × |∂L/∂w| − {pair_label(base)}"] = cells
    out = pd.DataFrame(cols).T
    out.columns.name = "weights remaining"
    return out


def snip_table(cfg: Config, results: Results) -> pd.DataFrame:
    """One-shot SNIP test errors beside the dense network's and the published ones (Lee et al. 2019)."""
    setup = cfg.setups[0]
    r = results.rounds[(results.rounds.setup == setup) & (results.rounds["round"] == 0)]
    dense = 100 * (1 - r.drop_duplicates("seed").test_accuracy_early_stop)
    column = "published (Lee et al. 2019, Table 1, full MNIST)"
    rows = [{"network": "dense", "our test error (%)": f"{dense.mean():.2f} ± {dense.std(ddof=1):.2f}"
             if len(dense) > 1 else f"{dense.mean():.2f}",
             column: f"{100 * reference.number(SNIP_PUBLISHED['dense'])['value']:.1f}"}]
    published = {d: f"{100 * reference.number(k)['value']:.1f}" for d, k in SNIP_PUBLISHED.items()
                 if d != "dense"}
    s = results.snip[results.snip.setup == setup] if len(results.snip) else results.snip
    for density, g in (s.groupby("density") if len(s) else []):
        e = 100 * (1 - g.test_accuracy_early_stop)
        rows.append({"network": f"SNIP, {100 * (1 - density):.0f} % sparse",
                     "our test error (%)": f"{e.mean():.2f} ± {e.std(ddof=1):.2f}" if len(e) > 1
                     else f"{e.mean():.2f}",
                     column: published.get(density, "—")})
    return pd.DataFrame(rows).set_index("network")


# --- analysis --------------------------------------------------------------------------------------

def pair_label(criterion: str) -> str:
    return crit.base_criterion(criterion).replace("_", " ")


def paired_gain(rounds: pd.DataFrame, criterion: str, metric: str = "test_accuracy_early_stop",
                setup: str | None = None) -> pd.DataFrame:
    """Per round: ``criterion_grad − criterion`` of ``metric``, paired by seed (mean, s.e., n)."""
    t = rounds[(rounds.control == "ticket") & (rounds["round"] > 0)]
    if setup is not None:
        t = t[t.setup == setup]
    a = t[t.criterion == criterion + crit.DATA_DEPENDENT_SUFFIX].set_index(["seed", "round"])
    b = t[t.criterion == criterion].set_index(["seed", "round"])
    d = (a[metric] - b[metric]).dropna().rename("gain").reset_index()
    rem = b["remaining"].groupby("round").mean()
    g = d.groupby("round").gain.agg(["mean", "std", "count"]).reset_index()
    g["se"] = g["std"] / np.sqrt(g["count"])
    # half-width of the 95 % t interval (n - 1 degrees of freedom); NaN below 2 seeds
    g["half"] = [claims.t_interval(d.loc[d["round"] == rd, "gain"]).high - m if n > 1 else np.nan
                 for rd, m, n in zip(g["round"], g["mean"], g["count"])]
    g["remaining"] = g["round"].map(rem)
    return g


def gain_rounds(cfg: Config, results: Results, metric: str = "test_accuracy_early_stop") -> dict:
    """Per criterion with a data-dependent variant: the fractions of weights left (rounds with at most
    ``sparse_below`` left) where the variant's gain has a 95 % t interval above 0 (``better``) or below 0
    (``worse``), from at least 3 seeds. Descriptive, one round at a time; the claims pool rounds."""
    setup = cfg.setups[0]
    r = results.rounds[results.rounds.setup == setup]
    out = {}
    for base in [c for c in cfg.criteria if not c.endswith(crit.DATA_DEPENDENT_SUFFIX)
                 and c + crit.DATA_DEPENDENT_SUFFIX in cfg.criteria]:
        g = paired_gain(r, base, metric)
        g = g[(g.remaining <= cfg.sparse_below + 1e-9) & (g["count"] >= claims.MIN_REPLICATES)]
        out[base] = {"better": g[g["mean"] - g["half"] > 0].remaining.tolist(),
                     "worse": g[g["mean"] + g["half"] < 0].remaining.tolist()}
    return out


def match_fraction(rounds: pd.DataFrame, setup: str, criterion: str, control: str, tol: float,
                   metric: str = "test_accuracy_early_stop") -> pd.Series:
    """Per seed: the smallest fraction of weights down to which every round stays within ``tol`` of the
    dense network's accuracy (same seed)."""
    out = {}
    t = rounds[(rounds.setup == setup) & (rounds.criterion == criterion)]
    for seed, g in t.groupby("seed"):
        dense = float(g[(g["round"] == 0) & (g.control == "ticket")][metric].iloc[0])
        c = g[(g.control == control) & (g["round"] > 0)].sort_values("round")
        frac = 1.0
        for _, row in c.iterrows():
            if row[metric] < dense - tol:
                break
            frac = row["remaining"]
        out[seed] = frac
    return pd.Series(out, dtype=float)


def settled_rounds(cfg: Config, rounds: pd.DataFrame) -> pd.Series:
    """Per row of ``rounds``: did the round settle? Its measured quantities are read at early stop (the
    evaluation of lowest validation loss), so a round has settled when that minimum lies at least a
    quarter of its training (or the early-stop patience, if shorter) before the round ended: the
    validation loss found no new minimum over the last quarter. A round whose minimum is at its last
    evaluations was still improving when its iterations ran out."""
    out = []
    for _, row in rounds.iterrows():
        cap = cfg.setting(row["setup"])["iterations"] if "setup" in row else cfg.iterations
        window = 0.25 * cap if cfg.patience is None else min(cfg.patience, 0.25 * cap)
        out.append(bool(row["end_iteration"] - row["early_stop_iteration"] >= window))
    return pd.Series(out, index=rounds.index, dtype=bool)


SETTLE_TEXT = "validation loss still falling in the last quarter of a round"


def claims_table(cfg: Config, results: Results) -> pd.DataFrame:
    """The chapter's claims, measured on the first setup of ``cfg`` and judged by :func:`claims.ledger`.
    Every measurement is one value per seed (rounds pooled by their mean within a seed), judged only
    when every round it uses has settled (:func:`settled_rounds`)."""
    setup = cfg.setups[0]
    r = results.rounds[results.rounds.setup == setup]
    r = r.assign(settled=settled_rounds(cfg, r)) if len(r) else r.assign(settled=True)
    where = f"{setup.replace('/', ' on ')}"

    def evidence(value, used: pd.DataFrame):
        return claims.Evidence(value, used["settled"].tolist(), SETTLE_TEXT)

    rows = []
    improved = []
    for base in [c for c in cfg.criteria if not c.endswith(crit.DATA_DEPENDENT_SUFFIX)]:
        if base + crit.DATA_DEPENDENT_SUFFIX not in cfg.criteria:
            continue
        t = r[(r.control == "ticket") & (r["round"] > 0) & (r.remaining <= cfg.sparse_below + 1e-9)]
        seed_mean = lambda c: (t[t.criterion == c].groupby("seed").test_accuracy_early_stop.mean()  # noqa
                               * 100)
        a, b = seed_mean(base + crit.DATA_DEPENDENT_SUFFIX), seed_mean(base)
        used = t[t.criterion.isin([base, base + crit.DATA_DEPENDENT_SUFFIX])]
        rule = claims.Exceeds(fmt="{:+.2f}", unit="pp", a_name=f"{base}×|g|", b_name=base)
        signed = (" (a negative score is divided by |g|, our reading: see the criteria)"
                  if crit.is_signed(base) else "")
        claim = claims.Claim(
            f"Multiplying the {pair_label(base)} criterion by the loss gradient |∂L/∂w| improves the "
            f"tickets it finds",
            "Lévai & Zombori 2020, abstract",
            f"test accuracy at early stop (pp), {base}×|g| minus {base}{signed}, per seed the mean over "
            f"rounds with ≤ {100 * cfg.sparse_below:.3g} % of weights left; paired by seed, {where}",
            rule, paper="the gradient factor improves existing pruning criteria (no number in the abstract)")
        rows.append((claim, evidence((a, b), used)))
        improved.append(claims.judge(claim, evidence((a, b), used), cfg.profile))
    if improved:
        rows.append((claims.Claim("The gradient factor improves every criterion tested, consistently",
                                  "Lévai & Zombori 2020, abstract",
                                  "the verdicts of the per-criterion claims above",
                                  claims.Fraction(share=1.0, what="criteria"),
                                  paper="“consistently improves the performance of existing pruning "
                                        "algorithms”"), improved))
    ticket_c = "magnitude" if "magnitude" in cfg.criteria else cfg.criteria[0]
    tol = cfg.match_tolerance
    metric = "test_accuracy_early_stop"
    t = r[(r.criterion == ticket_c) & (r.control == "ticket")]
    per = lambda frame, rd: frame[frame["round"] == rd].set_index("seed")  # noqa: E731
    dense = per(t, 0)
    fractions = t[t["round"] > 0].groupby("round").remaining.mean()
    if len(fractions):
        # Frankle & Carbin read "matches dense down to 3.6 %" off the mean curve: we test the rounds
        # nearest 3.6 % on either side (at or above, and below), each with the seed spread, and report
        # where the mean curve leaves dense - tol
        above = fractions[fractions >= 0.036 - 1e-9]
        below = fractions[fractions < 0.036 - 1e-9]
        nearest = ([int((above - 0.036).abs().idxmin())] if len(above) else []) + (
            [int((below - 0.036).abs().idxmin())] if len(below) else [])
        mean_curve = (r.drop(columns="settled").assign(seed=0)
                      .groupby(["criterion", "control", "round"], as_index=False)
                      .mean(numeric_only=True).assign(setup=setup))
        y_mean = match_fraction(mean_curve, setup, ticket_c, "ticket", tol)
        for near in nearest:
            diff = (per(t, near)[metric] - dense[metric]).dropna() * 100
            side = "above" if fractions[near] >= 0.036 - 1e-9 else "below"
            rows.append((claims.Claim(
                f"Tickets ({ticket_c} pruning, rewound) still match the dense network's accuracy down to "
                f"3.6 % of weights: tested at {100 * fractions[near]:.3g} %, the round just {side} 3.6 %",
                "Frankle & Carbin 2019, Sec. 2 / Fig. 3",
                "test accuracy at early stop, ticket minus dense (pp, paired by seed) at "
                f"{100 * fractions[near]:.3g} % of weights left, {where}; matching = within "
                f"{100 * tol:.2g} pp; the mean curve stays within {100 * tol:.2g} pp of dense down to "
                f"{100 * float(y_mean.iloc[0]):.3g} %",
                claims.AtLeast(limit=-100 * tol, fmt="{:+.2f}", unit="pp"),
                paper="at or above dense accuracy down to 3.6 %, where tickets fall back to it "
                      "(LeNet-300-100, full MNIST)"),
                evidence(diff, t[t["round"].isin([0, near])])))
        if ticket_c in cfg.reinit_criteria and (r.control == "reinit").any():
            rt = r[(r.criterion == ticket_c) & (r["round"] > 0) & (r.remaining <= cfg.sparse_below + 1e-9)]
            ticket_mean = rt[rt.control == "ticket"].groupby("seed")[metric].mean() * 100
            reinit_mean = rt[rt.control == "reinit"].groupby("seed")[metric].mean() * 100
            rows.append((claims.Claim(
                "Randomly re-initialised tickets (same mask, fresh initial weights) lose accuracy far "
                "earlier than the rewound tickets: less accurate once few weights are left",
                "Frankle & Carbin 2019, Sec. 2 / Fig. 4",
                "test accuracy at early stop (pp), per seed the mean over rounds with ≤ "
                f"{100 * cfg.sparse_below:.3g} % of weights left, paired by seed",
                claims.Exceeds(fmt="{:+.2f}", unit="pp", a_name="ticket", b_name="reinit"),
                paper="re-initialised tickets degrade far earlier"),
                evidence((ticket_mean, reinit_mean), rt)))
        # learns faster: from the dense network down to about 21 % left (F&C, Fig. 3)
        early = [int(rd) for rd, f in fractions.items() if f >= 0.211 - 0.03]
        if early:
            tick_es = t[t["round"].isin(early)].groupby("seed").early_stop_iteration.mean()
            rows.append((claims.Claim(
                "Tickets learn faster than the dense network (earlier early stop) down to about 21 % of "
                "weights",
                "Frankle & Carbin 2019, Sec. 2 / Fig. 3",
                "early-stop iteration (minimum validation loss), dense minus ticket, ticket averaged over "
                f"rounds with {', '.join(f'{100 * fractions[rd]:.3g} %' for rd in early)} left, "
                "paired by seed",
                claims.Exceeds(fmt="{:+.0f}", unit="iterations", a_name="dense", b_name="ticket"),
                paper="fastest near 21.1 % (LeNet-300-100, full MNIST)"),
                evidence((dense.early_stop_iteration.astype(float), tick_es),
                         t[t["round"].isin([0, *early])])))
    # SNIP one-shot (Lee et al. 2019, Table 1)
    # the increase of error over dense (pp) up to which the published result counts as reproduced: SNIP's
    # published errors are 0.1 pp below (95 %) and 0.7 pp above (98 %) the published dense error; we
    # allow 0.5 pp more than that, for the noisier estimates of a small test set
    allowance = {0.05: 0.5, 0.02: 1.2}
    dense_published = 100 * reference.number(SNIP_PUBLISHED["dense"])["value"]
    published = {d: (round(100 * reference.number(SNIP_PUBLISHED[d])["value"], 2), allowance[d])
                 for d in allowance}
    dense_err = 100 * (1 - r[(r["round"] == 0) & (r.control == "ticket")]
                       .drop_duplicates("seed").set_index("seed").test_accuracy_early_stop)
    s = results.snip[results.snip.setup == setup] if len(results.snip) else results.snip
    for density, (err, allowed) in published.items():
        sd = s[np.isclose(s.density, density)] if len(s) else s
        meas = None
        if len(sd):
            e = 100 * (1 - sd.set_index("seed").test_accuracy_early_stop)
            meas = e - dense_err.loc[e.index]
            ours_err = f"our error {e.mean():.2f} % vs dense {dense_err.loc[e.index].mean():.2f} %"
        else:
            ours_err = "not run"
        rows.append((claims.Claim(
            f"One-shot SNIP at {100 * (1 - density):.0f} % sparsity keeps the error near the dense "
            f"network's (published: {err - dense_published:+.1f} pp; we allow up to {allowed:g} pp)",
            "Lee et al. 2019, Table 1",
            f"one-shot SNIP at init, test error at early stop minus dense error (pp), {where}; {ours_err}",
            claims.AtMost(limit=allowed, fmt="{:+.2f}", unit="pp"),
            paper=f"{err:g} % error (dense {dense_published:g} %), LeNet-300-100, full MNIST"), meas))
    return claims.ledger(CHAPTER, rows, cfg.profile, cfg.results_dir, budget=cfg.budget)


def discussion(cfg: Config, results: Results, table: pd.DataFrame) -> str:
    """The opening of the chapter's discussion (Markdown): the run, where each gradient factor's per-round
    95 % interval excludes 0 (:func:`gain_rounds`), and the verdicts of ``table`` (:func:`claims_table`)."""
    lines = [f"This page was produced by the **{cfg.profile}** profile ({cfg.setups[0].replace('/', ' on ')}, "
             f"{len(cfg.seeds)} seed(s)); the run took **{results.wall_seconds / 60:.1f} minutes** of wall "
             f"time with {cfg.workers} worker process(es)."]
    if cfg.profile == "smoke":
        lines.append("The smoke profile trains for a few dozen iterations and prunes twice: its numbers only "
                     "show that the pipeline runs and mean nothing about the method.")
    lines.append("")
    lines.append(f"Where each gradient factor changed the test accuracy at early stop (rounds with at most "
                 f"{100 * cfg.sparse_below:.3g} % of weights left):")

    def fmt(xs):
        return ", ".join(f"{100 * x:.3g} %" for x in xs) or "none"
    for base, where in gain_rounds(cfg, results).items():
        lines.append(f"- {base.replace('_', ' ')} × |∂L/∂w|: 95 % interval above 0 at {fmt(where['better'])}; "
                     f"below 0 at {fmt(where['worse'])}.")
    lines.append("")
    lines.append("Measured verdicts:")
    for _, row in table.iterrows():
        why = f"; {row['why']}" if row["why"] else ""
        lines.append(f"- {row['claim']}: **{row['verdict']}** ({row['ours']}{why}).")
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------------

def _fraction_ticks(ax, fractions) -> None:
    """Log x axis of the fraction of weights left, dense on the left, ticks at the rounds' fractions."""
    from matplotlib.ticker import FixedLocator, NullLocator
    plotting.percent_axis(ax, "x", log=True)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(np.round(fractions.values, 4)))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (log scale)")


def _closed(fig):
    """Close the figure in pyplot (a notebook shows it once, as the cell's value or via glue)."""
    import matplotlib.pyplot as plt
    plt.close(fig)
    return fig


def _colours(criteria):
    import seaborn as sns
    bases = list(dict.fromkeys(crit.base_criterion(c) for c in criteria))
    pal = sns.color_palette(plotting.PALETTE, len(bases))
    return {b: pal[i] for i, b in enumerate(bases)}


def plot_ticket_accuracy(results: Results, setup: str | None = None):
    """Test accuracy (early stop, end) against the fraction left; one line per criterion (mean, band =
    ±1 s.d. over seeds); data-dependent variants dashed in the plain criterion's colour."""
    r = results.rounds[results.rounds.control == "ticket"]
    setup = setup or r.setup.iloc[0]
    r = r[r.setup == setup]
    colours = _colours(r.criterion.unique())
    fig, axes = plotting.figure(ncols=2, width=11, height=4.4, sharey=True)
    for ax, metric, title in zip(axes, ("test_accuracy_early_stop", "test_accuracy_end"),
                                 ("at early stop", "at the end of training")):
        for c, g in r.groupby("criterion", sort=False):
            s = g.groupby("round").agg(x=("remaining", "mean"), m=(metric, "mean"), sd=(metric, "std"))
            dd = c.endswith(crit.DATA_DEPENDENT_SUFFIX)
            col = colours[crit.base_criterion(c)]
            ax.plot(s.x, s.m, ls="--" if dd else "-", marker="o" if dd else ".", ms=3, color=col,
                    label=pair_label(c) + (" × |∂L/∂w|" if dd else ""))
            ax.fill_between(s.x, s.m - s.sd.fillna(0), s.m + s.sd.fillna(0), color=col, alpha=0.12, lw=0)
        _fraction_ticks(ax, r.groupby("round").remaining.mean())
        ax.set_title(f"test accuracy {title}")
    axes[0].set_ylabel("test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle(setup.replace("/", " on "))
    return _closed(fig)


def plot_early_stop(results: Results, setup: str | None = None, criteria=("magnitude",)):
    """Early-stop iteration against the fraction left: tickets vs random re-initialisation."""
    r = results.rounds
    setup = setup or r.setup.iloc[0]
    r = r[(r.setup == setup) & r.criterion.isin(criteria)]
    fig, axes = plotting.figure(ncols=2, width=11, height=4.2)
    for (c, control), g in r.groupby(["criterion", "control"]):
        s = g.groupby("round").agg(x=("remaining", "mean"), es=("early_stop_iteration", "mean"),
                                   es_sd=("early_stop_iteration", "std"),
                                   acc=("test_accuracy_early_stop", "mean"),
                                   acc_sd=("test_accuracy_early_stop", "std"))
        label = f"{pair_label(c)}: " + ("ticket (rewound)" if control == "ticket" else "random re-init")
        for ax, m in zip(axes, ("es", "acc")):
            line, = ax.plot(s.x, s[m], marker=".", ls="-" if control == "ticket" else ":", label=label)
            ax.fill_between(s.x, s[m] - s[m + "_sd"].fillna(0), s[m] + s[m + "_sd"].fillna(0),
                            color=line.get_color(), alpha=0.15, lw=0)
    for ax in axes:
        _fraction_ticks(ax, r.groupby("round").remaining.mean())
    axes[0].set_ylabel("early-stop iteration (min. val. loss)")
    axes[1].set_ylabel("test accuracy at early stop")
    axes[0].legend(fontsize=8)
    return _closed(fig)


def plot_layer_density(results: Results, setup: str | None = None, at=(0.5, 0.1, 0.02)):
    """Per-layer density at the rounds nearest to the fractions ``at``. With per-layer rates every
    criterion gives the same densities, and one panel shows them; otherwise one panel per criterion."""
    import seaborn as sns
    L = results.layers
    setup = setup or L.setup.iloc[0]
    L = L[L.setup == setup]
    rounds = L.groupby("round").remaining.mean()
    picks = sorted({int((rounds - a).abs().idxmin()) for a in at})
    g = L[L["round"].isin(picks)].groupby(["criterion", "round", "layer"], sort=False).density.mean()
    g = g.reset_index()
    g["weights left"] = g["round"].map(lambda r: f"{100 * rounds[r]:.3g} % overall")
    sizes = L.drop_duplicates("layer").set_index("layer")["size"]
    g["layer"] = g["layer"].map(lambda n: f"{n.rsplit('.', 1)[0]}\n({int(sizes[n]):,} weights)")
    same = g.groupby(["round", "layer"]).density.agg(lambda d: d.max() - d.min()).max() < 1e-9
    panels = [None] if same else list(g.criterion.unique())
    width = min(4.5 * len(panels), 11) if len(panels) > 1 else 7
    fig, axes = plotting.figure(ncols=len(panels), width=width, height=3.8, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, c in zip(axes, panels):
        d = g[g.criterion == (c or g.criterion.iloc[0])]
        sns.barplot(d, x="layer", y="density", hue="weights left", ax=ax)
        plotting.percent_axis(ax, "y", log=True)
        from matplotlib.ticker import FixedLocator
        ax.yaxis.set_major_locator(FixedLocator([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
        ax.set_xlabel("")
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, title=None, frameon=False)
        ax.set_title("every criterion (per-layer rates)" if c is None else pair_label(c))
    axes[0].set_ylabel("density of the layer")
    return _closed(fig)
