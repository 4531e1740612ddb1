"""Chapter 04, Bernoulli gates that converge to a deterministic network (Guenter & Sideris 2022,
arXiv 2205.04650): Config, units, run, tables, figures and claims.  The method itself is in
:mod:`pruning_lib.methods.bernoulli`.

The units of work, each cached in its own :class:`~pruning_lib.runs.Store` entry and run through
:func:`pruning_lib.runs.map_units` (:func:`work_units` lists them for :mod:`pruning_lib.units`): the
flip estimator's variance/cost trade-off of each model (it chooses the gated runs' flipped examples), one
gated training run per (model, initial width, seed), and the dense reference runs (same schedule, same
thread count, no gates), which give the epoch time to beat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import claims, metrics, reference
from ..data import load_dataset_once, num_batches
from ..gates import families
from ..methods import bernoulli as bern
from ..models import build_model
from ..runs import RunConfig, Store, map_units, param, progress_bar
from ..timing import torch_threads
from ..train import EpochTimer, adam, fit

CHAPTER = "04_bernoulli_gates"
CONV_MODELS = ("lenet5_caffe", "vgg16_bn")
MODEL_CHOICES = ("lenet300_100",) + CONV_MODELS
DATASET_CHOICES = ("mnist5k", "mnist", "fashion_mnist", "digits")

# Published structured-pruning results on full MNIST (60k training digits), in data/reference/
# published.csv; architectures list input features (LeNet-300-100) or kept filters/units per layer.
PUBLISHED_KEYS = ("snip_dense_lenet300_100", "sbp_lenet300_100", "l0_lenet300_100", "vib_lenet300_100",
                  "bcgnj_lenet5_caffe", "sbp_lenet5_caffe")


@dataclass(frozen=True)
class Config(RunConfig):
    models: tuple[str, ...] = param(("lenet300_100", "lenet5_caffe"), choices=MODEL_CHOICES,
                                    help="networks to prune")
    dataset: str = param("mnist5k", choices=DATASET_CHOICES, help="dataset of the LeNets")
    cifar_dataset: str = param("cifar10", choices=("cifar10",), help="dataset of vgg16_bn")
    widths: tuple[float, ...] = param((1.0, 2.0, 4.0), low=0.01, high=64,
                                      help="initial width multipliers of LeNet-300-100 (1 = 300-100)")
    conv_widths: tuple[float, ...] = param((1.0,), low=0.01, high=64,
                                           help="initial width multipliers of the conv nets")
    seeds: tuple[int, ...] = param((0, 1, 2), low=0, help="seeds (weight init, data order, gates)")
    conv_seeds: tuple[int, ...] = param((0, 1, 2), low=0, help="seeds of the conv nets")
    dense_seeds: int = param(1, low=1, high=100, help="dense reference runs per model and width")
    dense_widths: int = param(1, low=1, high=64, help="dense reference runs at the first N initial widths")
    epochs: float = param(30, low=0.01, high=10000, help="epochs of LeNet-300-100")
    conv_epochs: float = param(10, low=0.01, high=10000, help="epochs of the conv nets")
    batch_size: int = param(100, low=1, high=4096)
    lr: float = param(1e-3, low=0, high=10, help="Adam learning rate of the weights")
    theta_init: float = param(0.9, low=0.0, high=1.0, help="initial Bernoulli parameter of every unit")
    theta_lr: float = param(30.0, low=0, high=1000,
                            help="a: theta's SGD step at the start (projected onto [0, 1])")
    theta_tau: float = param(1.5, low=0, high=10000,
                             help="tau (epochs): theta's step is a / (1 + t / tau); 0 keeps it constant")
    theta_momentum: float = param(0.0, low=0, high=0.999, help="momentum of the theta SGD")
    weight_precision: float = param(1.0, low=0, high=1e6, help="lambda: Gaussian prior precision of weights")
    unit_cost: float = param(0.01, low=0, high=100, help="kappa: nats per parameter of an active unit")
    flip_examples: int = param(0, low=0, high=100000,
                               help="examples per step for the theta estimator; 0: chosen from the measured "
                                    "variance/cost trade-off")
    flip_grid: tuple[int, ...] = param((2, 4, 8, 16, 32, 64, 100), low=1, high=100000,
                                       help="numbers of flipped examples the trade-off measures")
    flip_efficiency: float = param(0.5, low=0.01, high=1.0,
                                   help="choose the fewest flipped examples with at least this share of the "
                                        "best variance reduction per second")
    flip_batches: int = param(30, low=3, high=10000, help="batches the estimator's variance is measured on")
    check_every: int = param(10, low=1, high=100000,
                             help="units at theta = 1 are estimated every N steps (with N times the step)")
    step_repeats: int = param(5, low=1, high=1000,
                              help="best of N interleaved repeats: initial vs compacted network's step")
    shrink_every: int = param(5, low=1, high=100000, help="steps between removals of units at theta = 0")
    record_every: int = param(5, low=1, high=100000, help="steps between recorded theta trajectories")
    band: float = param(0.01, low=0.0, high=0.5, help="theta is undecided inside (band, 1 - band)")
    num_threads: int = param(2, low=1, high=256, help="torch threads, the same for gated and dense runs")
    data_root: str = param("data")
    results_dir: str = param("results")

    PROFILES = {
        "smoke": {"models": ("lenet300_100", "lenet5_caffe"), "widths": (0.2, 0.4), "conv_widths": (0.5,),
                  "seeds": (0,), "conv_seeds": (0,), "epochs": 2, "conv_epochs": 1, "flip_grid": (4, 16),
                  "flip_batches": 4, "step_repeats": 1, "check_every": 2, "num_threads": 1},
        # LeNet-300-100 only: three seeds of LeNet-5-Caffe trained to settlement (its estimator re-runs the
        # convolutions above every flipped filter) do not fit the cpu budget; the paper profile runs both.
        # One torch thread: on a shared 2-core machine two threads per run oversubscribe the cores and
        # made the epoch clock swing 5x within a run; gated and dense runs use the same count.
        "cpu": {"models": ("lenet300_100",), "num_threads": 1},
        # Full MNIST for the LeNets and CIFAR-10 for VGG-16 from data/, on a GPU.  The paper's exact
        # schedule could not be read (only its abstract was reachable): 200 epochs is our choice.
        "paper": {"models": ("lenet300_100", "lenet5_caffe", "vgg16_bn"), "dataset": "mnist",
                  "conv_widths": (1.0, 2.0), "seeds": (0, 1, 2, 3, 4), "conv_seeds": (0, 1, 2, 3, 4),
                  "dense_seeds": 5, "dense_widths": 3, "epochs": 200, "conv_epochs": 200, "theta_tau": 20.0},
    }
    NOT_HASHED = RunConfig.NOT_HASHED + ("data_root",)
    BUDGETED = ("epochs", "conv_epochs")

    def check(self) -> None:
        if self.band >= 0.5:
            from ..runs import ConfigError
            raise ConfigError("parameter 'band': must be < 0.5")

    def widths_of(self, model: str) -> tuple[float, ...]:
        return self.conv_widths if model in CONV_MODELS else self.widths

    def seeds_of(self, model: str) -> tuple[int, ...]:
        return self.conv_seeds if model in CONV_MODELS else self.seeds

    def epochs_of(self, model: str) -> float:
        return self.conv_epochs if model in CONV_MODELS else self.epochs

    def dataset_of(self, model: str) -> str:
        return self.cifar_dataset if model == "vgg16_bn" else self.dataset


def _method_spec(cfg: Config, model: str) -> dict:
    keys = ("batch_size", "lr", "theta_init", "theta_lr", "theta_tau", "theta_momentum", "weight_precision",
            "unit_cost", "check_every", "shrink_every", "record_every", "num_threads", "step_repeats")
    return {**{k: getattr(cfg, k) for k in keys}, "epochs": cfg.epochs_of(model),
            "dataset": cfg.dataset_of(model), "model": model}


def _dense_spec(cfg: Config, model: str) -> dict:
    keys = ("batch_size", "lr", "weight_precision", "num_threads")
    return {**{k: getattr(cfg, k) for k in keys}, "epochs": cfg.epochs_of(model),
            "dataset": cfg.dataset_of(model), "model": model}


# --------------------------------------------------------------------------------------------------
# Units: the flip trade-off per model, the gated runs, the dense references; each its own Store
# --------------------------------------------------------------------------------------------------

FLIP_FILES = ("tradeoff.csv",)
# The steps a gated unit times side by side after training (in its spec: a unit timed before the dense step
# at the final widths was added is not reused).
TIMED_STEPS = ("initial", "final", "dense_final")
GATED_FILES = ("summary.json", "history.csv", "epochs.csv", "trajectory.pt")
DENSE_FILES = ("summary.json", "epochs.csv")


def flip_store(cfg: Config, model_name: str, results_dir: str | None = None) -> Store:
    """Where :func:`measure_flip_tradeoff` caches ``model_name``'s trade-off (first initial width)."""
    spec = {**_method_spec(cfg, model_name), "width": cfg.widths_of(model_name)[0], "grid": list(cfg.flip_grid),
            "batches": cfg.flip_batches, "efficiency": cfg.flip_efficiency}
    return Store(cfg.results_dir if results_dir is None else results_dir, "bernoulli_flip", spec)


def gated_store(cfg: Config, model_name: str, width: float, seed: int, flip: int,
                results_dir: str | None = None) -> Store:
    """Where :func:`train_bernoulli_run` caches one gated run (``flip``: flipped examples per step)."""
    spec = {**_method_spec(cfg, model_name), "width": width, "seed": seed, "flip_examples": flip,
            "timed_steps": list(TIMED_STEPS)}
    return Store(cfg.results_dir if results_dir is None else results_dir, "bernoulli", spec)


def dense_store(cfg: Config, model_name: str, width: float, seed: int, results_dir: str | None = None) -> Store:
    """Where :func:`train_dense_reference` caches one dense reference run."""
    spec = {**_dense_spec(cfg, model_name), "width": width, "seed": seed, "dense": True}
    return Store(cfg.results_dir if results_dir is None else results_dir, "bernoulli_dense", spec)


def _done(store: Store, files: tuple[str, ...]) -> bool:
    return all(store.exists(f) for f in files)


def _pruning(cfg: Config, model, n_train: int, steps_per_epoch: int, flip: int, seed: int,
             **overrides) -> bern.BernoulliPruning:
    kw = dict(weight_precision=cfg.weight_precision, unit_cost=cfg.unit_cost, theta_lr=cfg.theta_lr,
              theta_tau=cfg.theta_tau * steps_per_epoch, theta_momentum=cfg.theta_momentum,
              flip_examples=flip, check_every=cfg.check_every, shrink_every=cfg.shrink_every,
              record_every=cfg.record_every, seed=seed, lo=cfg.band, hi=1 - cfg.band)
    return bern.BernoulliPruning(model, n_train, **{**kw, **overrides})


def _first_batches(data, batch_size: int, count: int, seed: int = 0) -> list:
    from ..data import batches

    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, y in batches(data.train, batch_size, shuffle=True, generator=gen):
        out.append((x, y))
        if len(out) >= count:
            break
    return out


def measure_flip_tradeoff(cfg: Config, model_name: str, data, results_dir: str | None = None) -> dict:
    """The estimator's variance and step time for every number of flipped examples of ``flip_grid``
    (:func:`pruning_lib.methods.bernoulli.flip_tradeoff`), on the model at its first initial width as
    training starts (seed 0), cached; and the number chosen from it
    (:func:`~pruning_lib.methods.bernoulli.choose_flip_examples`). ``data`` is loaded if not given."""
    width = cfg.widths_of(model_name)[0]
    store = flip_store(cfg, model_name, results_dir)
    if store.exists("tradeoff.csv"):
        rows = store.frame("tradeoff")
    else:
        data = data if data is not None else load_dataset_once(cfg.dataset_of(model_name), root=cfg.data_root)
        torch.manual_seed(0)
        model = build_model(model_name, width=width, **data.model_kwargs())
        bern.attach_bernoulli_gates(model, cfg.theta_init)
        batches = _first_batches(data, cfg.batch_size, cfg.flip_batches)
        settings = dict(weight_precision=cfg.weight_precision, unit_cost=cfg.unit_cost,
                        check_every=cfg.check_every, lo=cfg.band, hi=1 - cfg.band)
        rows = pd.DataFrame(bern.flip_tradeoff(model, batches, cfg.flip_grid, len(data.train),
                                               rounds=max(3, cfg.step_repeats), **settings))
        store.save_frame("tradeoff", rows)
    rows = rows.assign(model=model_name, width=width)
    chosen = bern.choose_flip_examples(rows.to_dict("records"), cfg.flip_efficiency)
    return {"rows": rows, "chosen": chosen}


def _initial_widths(model) -> dict[str, int]:
    return {g.name: model.get_submodule(g.slot).channels for g in model.channel_groups()}


def train_bernoulli_run(cfg: Config, model_name: str, width: float, seed: int, data, flip: int,
                        results_dir: str | None = None) -> dict:
    """One gated run, cached: summary, history, per-epoch times and theta trajectories.

    After training, the compacted network's training step is timed against the initial network's (same
    settings, fresh gates at ``theta_init``), best of ``step_repeats`` interleaved repeats of
    ``check_every`` steps on the same batches. ``data`` is loaded if not given."""
    store = gated_store(cfg, model_name, width, seed, flip, results_dir)
    if _done(store, GATED_FILES):
        return {"summary": store.json("summary"), "history": store.frame("history"),
                "epochs": store.frame("epochs"), "trajectory": store.torch("trajectory")}
    data = data if data is not None else load_dataset_once(cfg.dataset_of(model_name), root=cfg.data_root)
    torch.manual_seed(seed)
    model = build_model(model_name, width=width, **data.model_kwargs())
    initial = _initial_widths(model)
    initial_params = metrics.count_parameters_without_gates(model)
    initial_flops = metrics.count_flops(model, data.input_shape)
    bern.attach_bernoulli_gates(model, cfg.theta_init)
    steps_per_epoch = num_batches(data.train, cfg.batch_size)
    bp = _pruning(cfg, model, len(data.train), steps_per_epoch, flip, seed)
    history = fit(model, data, method=bp, lr=cfg.lr, epochs=cfg.epochs_of(model_name), batch_size=cfg.batch_size,
                  seed=seed, progress=False)
    bp.remove_dead(bp._opts)  # last removal
    final = bp.widths()
    thetas = bern.gate_thetas(model)
    removed = pd.DataFrame(bp.removed_at, columns=["step", "group", "removed"])
    total_steps = int(history["step"].iloc[-1])
    early = float(removed.loc[removed["step"] <= total_steps / 4, "removed"].sum())
    final_flops = metrics.count_flops(model, data.input_shape)
    summary = {
        "model": model_name, "width": width, "seed": seed, "dataset": cfg.dataset_of(model_name),
        "test_error": 1 - float(history["test_accuracy"].iloc[-1]),
        "undecided": bern.undecided_fraction(thetas, cfg.band, 1 - cfg.band),
        "initial": initial, "final": final, "initial_params": initial_params,
        "final_params": metrics.count_parameters_without_gates(model), "removed_first_quarter": early,
        "removed_total": float(removed["removed"].sum()), "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch, "threads": torch.get_num_threads(), "flip_examples": flip,
        "initial_flops": initial_flops, "final_flops": final_flops,
    }
    # The compacted network's step against the initial network's, side by side (theta keeps learning in
    # both, as in training; nothing is removed while timing, so both stay the size they are).
    torch.manual_seed(seed)
    start = build_model(model_name, width=width, **data.model_kwargs())
    bern.attach_bernoulli_gates(start, cfg.theta_init)
    bp0 = _pruning(cfg, start, len(data.train), steps_per_epoch, flip, seed, shrink_every=0, record_every=0)
    bp0.optimizers(cfg.lr)
    bp.shrink_every, bp.record_every = 0, 0
    bp._state.step = total_steps  # the final network continues with its own step size
    device = next(model.parameters()).device
    start.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in _first_batches(data, cfg.batch_size, 4, seed)]
    # Never more timed steps than the run trained (a one-step test run stays one step).
    block = max(1, min(cfg.check_every, total_steps))
    rounds = max(1, min(cfg.step_repeats, total_steps // block))
    dense_final = DenseStep(families.get("bernoulli").compact(model), cfg.lr, cfg.weight_precision,
                            len(data.train))
    ms = bern.compare_steps({"initial": bp0, "final": bp, "dense_final": dense_final}, batches, rounds=rounds,
                            block=block, warmup=min(2, total_steps))
    summary.update(step_initial_ms=ms["initial"], step_final_ms=ms["final"], step_dense_final_ms=ms["dense_final"])
    epochs = pd.DataFrame({"epoch": np.arange(1, len(bp.timer.epoch_seconds) + 1),
                           "seconds": bp.timer.epoch_seconds})
    trajectory = {"steps": [s for s, _ in bp.trajectory],
                  "theta": {k: torch.stack([t[k] for _, t in bp.trajectory]) for k in initial}}
    store.save_torch("trajectory", trajectory)
    store.save_frame("epochs", epochs)
    store.save_frame("history", history)
    store.json("summary", lambda: summary)
    return {"summary": summary, "history": history, "epochs": epochs, "trajectory": trajectory}


class DenseStep:
    """A training step of a network without gates, as :func:`train_dense_reference` trains: Adam and the
    weight prior per training example. Timed beside the gated steps, a dense network of the final widths
    gives the floor of the final gated step: what a step of that size costs with no gate, estimator or
    θ update at all."""

    def __init__(self, model, lr: float, weight_precision: float, n_train: int):
        self.model, self.optimizer = model.train(), adam(model.parameters(), lr)
        self.weight_precision, self.n = weight_precision, n_train

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y) + bern.weight_prior(self.model, self.weight_precision) / self.n
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def train_dense_reference(cfg: Config, model_name: str, width: float, seed: int, data,
                          results_dir: str | None = None) -> dict:
    """The same network without gates, same schedule, weight prior and thread count: the reference
    test error and epoch time. ``data`` is loaded if not given."""
    store = dense_store(cfg, model_name, width, seed, results_dir)
    if _done(store, DENSE_FILES):
        return {"summary": store.json("summary"), "epochs": store.frame("epochs")}
    data = data if data is not None else load_dataset_once(cfg.dataset_of(model_name), root=cfg.data_root)
    torch.manual_seed(seed)
    model = build_model(model_name, width=width, **data.model_kwargs())
    timer = EpochTimer()
    n = len(data.train)
    history = fit(model, data, lr=cfg.lr, loss_fn=timer.loss_fn,
                  penalties={"weight_prior": lambda m: bern.weight_prior(m, cfg.weight_precision) / n},
                  callbacks=[timer], epochs=cfg.epochs_of(model_name), batch_size=cfg.batch_size, seed=seed,
                  progress=False)
    summary = {"model": model_name, "width": width, "seed": seed,
               "test_error": 1 - float(history["test_accuracy"].iloc[-1]),
               "params": metrics.count_parameters_without_gates(model), "threads": torch.get_num_threads()}
    epochs = pd.DataFrame({"epoch": np.arange(1, len(timer.epoch_seconds) + 1), "seconds": timer.epoch_seconds})
    store.save_frame("epochs", epochs)
    store.json("summary", lambda: summary)
    return {"summary": summary, "epochs": epochs}


def flip_tasks(cfg: Config) -> list[tuple]:
    """The trade-off units, ``("flip", cfg, (model,))``: one per model, unless ``flip_examples`` is set."""
    return [("flip", cfg, (m,)) for m in cfg.models] if cfg.flip_examples <= 0 else []


def gated_tasks(cfg: Config, chosen: dict[str, int]) -> list[tuple]:
    """The gated runs, ``("gated", cfg, (model, width, seed, flip))``, with ``chosen[model]`` flipped examples."""
    return [("gated", cfg, (m, w, s, chosen[m])) for m in cfg.models for w in cfg.widths_of(m)
            for s in cfg.seeds_of(m)]


def dense_tasks(cfg: Config) -> list[tuple]:
    """The dense references, ``("dense", cfg, (model, width, seed))``: the first ``dense_widths`` initial
    widths and ``dense_seeds`` seeds of every model."""
    return [("dense", cfg, (m, w, s)) for m in cfg.models for w in cfg.widths_of(m)[:cfg.dense_widths]
            for s in cfg.seeds_of(m)[:cfg.dense_seeds]]


def task_store(task: tuple, results_dir: str | None = None) -> tuple[Store, tuple[str, ...]]:
    """A unit's Store (the one the notebook reads) and the files that make it done."""
    kind, cfg, rest = task
    if kind == "flip":
        return flip_store(cfg, *rest, results_dir=results_dir), FLIP_FILES
    if kind == "gated":
        return gated_store(cfg, *rest, results_dir=results_dir), GATED_FILES
    return dense_store(cfg, *rest, results_dir=results_dir), DENSE_FILES


def run_unit(task: tuple, results_dir: str):
    """One unit for :func:`pruning_lib.runs.map_units` (``fn(spec, results_dir)``), with ``cfg.num_threads``
    torch threads (the same for gated and dense runs: their epoch times are compared); writes its Store
    under ``results_dir`` and returns what the chapter's train function returns."""
    kind, cfg, rest = task
    with torch_threads(cfg.num_threads):
        if kind == "flip":
            return measure_flip_tradeoff(cfg, *rest, None, results_dir=results_dir)
        if kind == "gated":
            model, width, seed, flip = rest
            return train_bernoulli_run(cfg, model, width, seed, None, flip, results_dir=results_dir)
        return train_dense_reference(cfg, *rest, None, results_dir=results_dir)


def _map(tasks: list[tuple], results_dir: str, bar=None, progress: bool = False) -> list:
    """``tasks`` through :func:`pruning_lib.runs.map_units`: serially here unless ``$PRUNING_EXECUTOR``
    says otherwise (one unit at a time keeps the epoch clocks clean); finished units only load, here."""
    root = str(results_dir)
    return map_units(run_unit, tasks, results_dir=root, workers=1, bar=bar, progress=progress,
                     done=lambda t: _done(*task_store(t, root)),
                     key=lambda t: f"{t[0]}-{task_store(t, root)[0].key}")


def chosen_flips(cfg: Config, flips: list[dict] | None = None) -> dict[str, int | None]:
    """Flipped examples per model: ``flip_examples`` when set, else the number chosen by the model's
    trade-off (``flips``: :func:`measure_flip_tradeoff`'s results in model order; without them, read from
    a finished trade-off unit, ``None`` where it is not done)."""
    if cfg.flip_examples > 0:
        return {m: cfg.flip_examples for m in cfg.models}
    if flips is not None:
        return {m: f["chosen"] for m, f in zip(cfg.models, flips)}
    out = {}
    for m in cfg.models:
        store = flip_store(cfg, m)
        out[m] = measure_flip_tradeoff(cfg, m, None)["chosen"] if _done(store, FLIP_FILES) else None
    return out


def work_units(cfg: Config) -> list:
    """Every unit of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`), with the hash
    of the Store the notebook reads: each model's flip trade-off, the gated runs, the dense references.

    A gated run's hash holds the number of flipped examples its model's trade-off chooses (from a timing
    measurement), so a model's gated runs are listed only once its trade-off is done (or when
    ``flip_examples`` is set): run the missing units, then list again."""
    from ..units import Unit

    chosen = chosen_flips(cfg)
    gated = [t for t in gated_tasks(cfg, chosen) if t[2][3] is not None]
    out = []
    for task in flip_tasks(cfg) + gated + dense_tasks(cfg):
        kind, _, rest = task
        store, files = task_store(task)
        m, ds = rest[0], cfg.dataset_of(rest[0])
        if kind == "flip":
            what = (f"{m} on {ds}, width {cfg.widths_of(m)[0]:g}: the flip estimator's variance and step time "
                    f"for {list(cfg.flip_grid)} flipped examples on {cfg.flip_batches} batches (chooses the "
                    f"flipped examples of {m}'s gated runs, listed once this is done)")
        elif kind == "gated":
            what = (f"{m} on {ds}, width {rest[1]:g}, seed {rest[2]}: Bernoulli gates, {cfg.epochs_of(m):g} "
                    f"epochs, batch {cfg.batch_size}, {rest[3]} flipped examples")
        else:
            what = (f"{m} on {ds}, width {rest[1]:g}, seed {rest[2]}: dense reference, {cfg.epochs_of(m):g} "
                    f"epochs, batch {cfg.batch_size}")
        out.append(Unit(store.key, store.kind, what, _done(store, files), (ds,),
                        lambda results_dir, task=task: run_unit(task, results_dir)))
    return out


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every (model, width, seed) gated run and the dense references; returns tidy frames:

    ``runs`` (one row per gated run), ``widths`` (model, width, seed, layer, initial, final),
    ``history`` (evaluations during training), ``undecided`` (share of undecided theta per recorded step),
    ``trajectory`` (theta of up to 40 units per layer, first seed of every width), ``epoch_times``
    (seconds per epoch, gated and dense), ``dense`` (one row per dense run) and ``flip`` (the
    estimator's variance/cost trade-off per model, with the number of flipped examples used).

    The units (:func:`work_units`) run through :func:`pruning_lib.runs.map_units` in three phases: the
    trade-offs (they choose the gated runs' flipped examples), the gated runs, the dense references.
    """
    with torch_threads(cfg.num_threads):
        root = cfg.results_dir
        runs, widths, hist, undec, traj, times, dense, flips = [], [], [], [], [], [], [], []
        flip_out = _map(flip_tasks(cfg), root)
        chosen = chosen_flips(cfg, flip_out)
        for f in flip_out:
            flips.append(f["rows"].assign(chosen=f["rows"]["flip_examples"] == f["chosen"]))
        gated_units, dense_units = gated_tasks(cfg, chosen), dense_tasks(cfg)
        bar = progress_bar(total=len(gated_units) + len(dense_units), desc="bernoulli gates", progress=progress)
        gated_out = _map(gated_units, root, bar=bar)
        dense_out = _map(dense_units, root, bar=bar)
        bar.close()
        for (_, _, (m, w, s, _)), r in zip(gated_units, gated_out):
            sm = r["summary"]
            key = dict(model=m, width=w, seed=s)
            ep = r["epochs"].sort_values("epoch")["seconds"].to_numpy()
            runs.append({**key, "test_error": sm["test_error"], "undecided": sm["undecided"],
                         "initial_params": sm["initial_params"], "final_params": sm["final_params"],
                         "early_share": sm["removed_first_quarter"] / max(sm["removed_total"], 1.0),
                         "initial_arch": "-".join(str(v) for v in sm["initial"].values()),
                         "final_arch": "-".join(str(v) for v in sm["final"].values()),
                         "total_final_units": sum(sm["final"].values()), "flip_examples": sm["flip_examples"],
                         "first_epoch_s": float(ep[0]), "last_epoch_s": float(ep[-1]),
                         "epoch_ratio": float(ep[-1] / ep[0]),
                         "kept_flops": sm["final_flops"] / sm["initial_flops"],
                         "step_initial_ms": sm["step_initial_ms"], "step_final_ms": sm["step_final_ms"],
                         "step_ratio": sm["step_final_ms"] / sm["step_initial_ms"],
                         "step_dense_final_ms": sm["step_dense_final_ms"],
                         "floor_ratio": sm["step_dense_final_ms"] / sm["step_initial_ms"]})
            for layer, n0 in sm["initial"].items():
                widths.append({**key, "layer": layer, "initial": n0, "final": sm["final"][layer]})
            hist.append(r["history"].assign(**key))
            times.append(r["epochs"].assign(kind="Bernoulli gates", **key))
            t = r["trajectory"]
            steps = np.asarray(t["steps"], dtype=float)
            spe = sm["steps_per_epoch"]
            allt = torch.cat([v for v in t["theta"].values()], dim=1)
            inside = ((allt > cfg.band) & (allt < 1 - cfg.band)).float().mean(1).numpy()
            undec.append(pd.DataFrame({**key, "step": steps, "epoch": steps / spe, "undecided": inside}))
            if s == cfg.seeds_of(m)[0]:
                gen = np.random.default_rng(0)
                for layer, th in t["theta"].items():
                    pick = np.sort(gen.choice(th.shape[1], size=min(40, th.shape[1]), replace=False))
                    for u in pick:
                        traj.append(pd.DataFrame({**key, "layer": layer, "unit": int(u), "step": steps,
                                                  "epoch": steps / spe, "theta": th[:, u].numpy()}))
        for (_, _, (m, w, s)), r in zip(dense_units, dense_out):
            dense.append({"model": m, "width": w, "seed": s, "test_error": r["summary"]["test_error"],
                          "params": r["summary"]["params"]})
            times.append(r["epochs"].assign(kind="dense", model=m, width=w, seed=s))
    flip_cols = ["flip_examples", "variance", "step_ms", "step_ms_fit", "work", "efficiency", "model", "width", "chosen"]
    return {"runs": pd.DataFrame(runs), "widths": pd.DataFrame(widths),
            "history": pd.concat(hist, ignore_index=True), "undecided": pd.concat(undec, ignore_index=True),
            "trajectory": pd.concat(traj, ignore_index=True), "epoch_times": pd.concat(times, ignore_index=True),
            "dense": pd.DataFrame(dense, columns=["model", "width", "seed", "test_error", "params"]),
            "flip": pd.concat(flips, ignore_index=True) if flips else pd.DataFrame(columns=flip_cols)}


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def _arch_label(model: str, width: float, widths: pd.DataFrame) -> str:
    g = widths[(widths["model"] == model) & (widths["width"] == width)]
    layers = g.drop_duplicates("layer")
    return "-".join(str(int(v)) for v in layers["initial"])


def plot_theta_trajectories(results: dict, model: str = "lenet300_100", width: float | None = None):
    """theta of up to 40 units per layer against training epochs (first seed), one panel per layer."""
    from .. import plotting

    tr = results["trajectory"]
    tr = tr[tr["model"] == model]
    width = width if width is not None else tr["width"].max()
    tr = tr[tr["width"] == width]
    layers = list(dict.fromkeys(tr["layer"]))
    fig, axes = plotting.figure(ncols=len(layers), width=3.2 * len(layers), height=3.2, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, layer in zip(axes, layers):
        g = tr[tr["layer"] == layer]
        for _, u in g.groupby("unit"):
            end = u["theta"].iloc[-1]
            ax.plot(u["epoch"], u["theta"], lw=0.8, alpha=0.7,
                    color="#0173b2" if end >= 0.99 else ("#de8f05" if end <= 0.01 else "#cc3311"))
        ax.set_title(f"{layer} ({int(g['unit'].nunique())} of its units)")
        ax.set_xlabel("epoch")
    axes[0].set_ylabel(r"Bernoulli parameter $\theta_j$")
    fig.suptitle(f"{model} {_arch_label(model, width, results['widths'])}: blue ends at 1, orange at 0, "
                 "red undecided", fontsize=10)
    return fig


def plot_undecided(results: dict):
    """Share of theta strictly inside (band, 1 - band) against epochs, mean and range over seeds."""
    from .. import plotting

    u = results["undecided"]
    models = list(dict.fromkeys(u["model"]))
    fig, axes = plotting.figure(ncols=len(models), width=3.6 * len(models), height=3.3, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, model in zip(axes, models):
        g = u[u["model"] == model]
        for i, (w, gw) in enumerate(g.groupby("width")):
            stats = gw.groupby("step").agg(epoch=("epoch", "first"), mean=("undecided", "mean"),
                                           lo=("undecided", "min"), hi=("undecided", "max"))
            label = _arch_label(model, w, results["widths"])
            ax.plot(stats["epoch"], stats["mean"], label=label, color=f"C{i}")
            ax.fill_between(stats["epoch"], stats["lo"], stats["hi"], alpha=0.2, color=f"C{i}")
        ax.set_title(model)
        ax.set_xlabel("epoch")
        plotting.percent_axis(ax, "y")
        ax.legend(title="initial widths")
    axes[0].set_ylabel("undecided θ (of all units)")
    return fig


def _plain_log_labels(ax) -> None:
    """Label a log y axis 10, 20, 50, 100 ... instead of 2x10^1."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if round(lead) in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def plot_final_widths(results: dict):
    """Final width per layer and test error, every seed (dots) at every initial width."""
    from .. import plotting
    import seaborn as sns

    w = results["widths"].copy()
    runs = results["runs"].copy()
    models = list(dict.fromkeys(w["model"]))
    fig, axes = plotting.figure(ncols=2, nrows=len(models), width=9.0, height=3.2 * len(models))
    axes = np.atleast_2d(axes)
    for row, model in zip(axes, models):
        gw = w[w["model"] == model].copy()
        gw["initial widths"] = [_arch_label(model, x, results["widths"]) for x in gw["width"]]
        sns.stripplot(data=gw, x="layer", y="final", hue="initial widths", dodge=True, ax=row[0], size=5,
                      jitter=0.15)
        nhue = gw["initial widths"].nunique()
        # Same horizontal offsets as the strip plot's dodge (its 0.8-wide slot split into nhue bins).
        sns.pointplot(data=gw, x="layer", y="final", hue="initial widths",
                      dodge=0.8 - 0.8 / nhue if nhue > 1 else False,
                      ax=row[0],
                      errorbar=None, markers="_", linestyles="none", legend=False)
        row[0].set_yscale("log")
        _plain_log_labels(row[0])
        row[0].set_ylabel("final width (units / filters)")
        row[0].set_title(f"{model}: final width per layer")
        gr = runs[runs["model"] == model].copy()
        gr["initial widths"] = [_arch_label(model, x, results["widths"]) for x in gr["width"]]
        sns.stripplot(data=gr, x="initial widths", y="test_error", ax=row[1], size=5, jitter=0.1,
                      color="C0")
        sns.pointplot(data=gr, x="initial widths", y="test_error", ax=row[1], errorbar="sd", color="k",
                      markers="_", linestyles="none")
        dn = results["dense"]
        dn = dn[dn["model"] == model]
        if len(dn):
            labels = [t.get_text() for t in row[1].get_xticklabels()]
            xs = [labels.index(_arch_label(model, wd, results["widths"])) for wd in dn["width"]]
            row[1].scatter(np.asarray(xs) + 0.25, dn["test_error"], marker="x", color="C3",
                           label="dense, same schedule")
            row[1].legend()
        plotting.percent_axis(row[1], "y")
        row[1].set_ylabel("test error")
        row[1].set_title(f"{model}: test error (mean ± s.d.)")
    return fig


def plot_epoch_times(results: dict):
    """Training seconds per epoch (evaluation excluded) of the gated runs against the dense network's."""
    from .. import plotting

    t = results["epoch_times"]
    models = list(dict.fromkeys(t["model"]))
    fig, axes = plotting.figure(ncols=len(models), width=3.8 * len(models), height=3.4)
    axes = np.atleast_1d(axes)
    for ax, model in zip(axes, models):
        g = t[t["model"] == model]
        for i, (w, gw) in enumerate(g.groupby("width")):
            label = _arch_label(model, w, results["widths"])
            gated = gw[gw["kind"] == "Bernoulli gates"].groupby("epoch")["seconds"].agg(["mean", "min", "max"])
            ax.plot(gated.index, gated["mean"], color=f"C{i}", marker="o", ms=3, label=f"{label} gated")
            ax.fill_between(gated.index, gated["min"], gated["max"], color=f"C{i}", alpha=0.2)
            dense = gw[gw["kind"] == "dense"].groupby("epoch")["seconds"].mean()
            if len(dense):
                ax.plot(dense.index, dense.values, color=f"C{i}", ls="--", marker="x", ms=4,
                        label=f"{label} dense")
        ax.set_yscale("log")
        _plain_log_labels(ax)
        ax.set_xlabel("epoch")
        ax.set_title(model)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training seconds per epoch")
    return fig


# --------------------------------------------------------------------------------------------------
# Tables and claims
# --------------------------------------------------------------------------------------------------

def _fmt_arch(g: pd.DataFrame) -> str:
    """Mean ± s.d. of the final width of each layer over the runs in ``g``."""
    parts = []
    for layer, gl in g.groupby("layer", sort=False):
        v = gl["final"].to_numpy(dtype=float)
        sd = v.std(ddof=1) if len(v) > 1 else 0.0
        parts.append(f"{v.mean():.0f}±{sd:.0f}")
    return "-".join(parts)


def architecture_table(cfg: Config, results: dict) -> pd.DataFrame:
    """Our final architectures and errors (mean ± s.d. over seeds) beside the published comparators."""
    rows = []
    w, runs = results["widths"], results["runs"]
    for model in cfg.models:
        for width in cfg.widths_of(model):
            g = w[(w["model"] == model) & (w["width"] == width)]
            r = runs[(runs["model"] == model) & (runs["width"] == width)]
            if not len(r):
                continue
            err = r["test_error"].to_numpy()
            prefix = "784-" if model == "lenet300_100" else ""
            rows.append({"model": model, "method": f"ours, from {_arch_label(model, width, w)}",
                         "architecture": prefix + _fmt_arch(g),
                         "test error": f"{100 * err.mean():.2f} % ± {100 * (err.std(ddof=1) if len(err) > 1 else 0):.2f}",
                         "setting": f"measured, {cfg.dataset_of(model)}, {len(err)} seeds, {cfg.epochs_of(model):g} epochs"})
        d = results["dense"]
        d = d[d["model"] == model]
        for width, g in d.groupby("width"):
            err = g["test_error"].to_numpy()
            rows.append({"model": model, "method": "dense, same schedule",
                         "architecture": ("784-" if model == "lenet300_100" else "") + _arch_label(model, width, w),
                         "test error": f"{100 * err.mean():.2f} %",
                         "setting": f"measured, {cfg.dataset_of(model)}, {len(err)} seed(s)"})
        for key in PUBLISHED_KEYS:
            pub = reference.number(key)
            if pub["model"] == model:
                rows.append({"model": model, "method": pub["method"], "architecture": pub["architecture"],
                             "test error": f"{100 * pub['value']:.1f} %",
                             "setting": f"published: {reference.label(pub)}"})
    return pd.DataFrame(rows)


SETTLE = {  # quantity in the training history -> (tolerance over the last quarter of training, in words)
    "undecided": (0.01, "share of undecided θ still moving ≥ 1 pp over the last quarter"),
    "kept_share": (0.02, "units kept still moving ≥ 2 % of the initial units over the last quarter"),
    "test_accuracy": (0.005, "test accuracy still moving ≥ 0.5 pp over the last quarter"),
}


def settled_runs(results: dict) -> pd.DataFrame:
    """Per gated run (model, width, seed): whether each quantity of :data:`SETTLE` settled, i.e. changed
    by less than its tolerance over the last quarter of training (:func:`pruning_lib.claims.settled`)."""
    h = results["history"]
    wcols = [c for c in h.columns if c.startswith("width_")]
    rows = []
    for (m, wd, sd), g in h.groupby(["model", "width", "seed"], sort=False):
        g = g.copy()
        initial = results["widths"]
        n0 = initial[(initial["model"] == m) & (initial["width"] == wd) & (initial["seed"] == sd)]["initial"].sum()
        g["kept_share"] = g[[c for c in wcols if g[c].notna().any()]].sum(axis=1) / max(float(n0), 1.0)
        row = {"model": m, "width": wd, "seed": sd}
        for q, (tol, _) in SETTLE.items():
            row[q] = claims.settled(g, q, tol, "step") if q in g.columns else True
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "width", "seed", *SETTLE])


def measurements(cfg: Config, results: dict) -> dict:
    """The numbers the claims are judged on (also used in the chapter's prose), one value per seed
    (a Series indexed by seed, the mean over models and widths of that seed) unless said otherwise."""
    runs, w, times, dense = results["runs"], results["widths"], results["epoch_times"], results["dense"]
    out = {"undecided": claims.seed_means(runs, "undecided") * 100,
           "early_share": claims.seed_means(runs, "early_share") * 100,
           "epoch_ratio": claims.seed_means(runs, "epoch_ratio"),
           "step_ratio": claims.seed_means(runs, "step_ratio")}
    # Epoch time: the dense network's median epoch against the gated network's last epoch (same seed).
    pairs = []
    for (m, wd, s), g in times[times["kind"] == "dense"].groupby(["model", "width", "seed"]):
        gg = times[(times["kind"] == "Bernoulli gates") & (times["model"] == m) & (times["width"] == wd)
                   & (times["seed"] == s)]
        if len(gg):
            pairs.append({"seed": s, "dense": float(g["seconds"].median()),
                          "last": float(gg.sort_values("epoch")["seconds"].iloc[-1])})
    pairs = pd.DataFrame(pairs, columns=["seed", "dense", "last"])
    out.update(dense_epoch=claims.seed_means(pairs, "dense"), gated_last_epoch=claims.seed_means(pairs, "last"),
               time_ratio=(pairs["last"] / pairs["dense"]).to_numpy())
    # Robustness to the initial width (LeNet-300-100, or the first model): per layer and seed, the largest
    # relative deviation of the final width at one initial width from its mean over the initial widths.
    model = "lenet300_100" if "lenet300_100" in cfg.models else cfg.models[0]
    gw = w[w["model"] == model]
    deviation = {}
    if gw["width"].nunique() > 1:
        for layer, gl in gw.groupby("layer", sort=False):
            per = gl.pivot_table(index="seed", columns="width", values="final").dropna()
            deviation[layer] = 100 * (per.div(per.mean(axis=1), axis=0) - 1).abs().max(axis=1)
    out["layer_deviation"] = deviation
    gr = runs[runs["model"] == model]
    ws = sorted(gr["width"].unique())
    if len(ws) > 1:
        small = gr[gr["width"] == ws[0]].set_index("seed")["test_error"]
        large = gr[gr["width"] == ws[-1]].set_index("seed")["test_error"]
        common = small.index.intersection(large.index)
        out["error_gap"] = 100 * (large[common] - small[common])
    else:
        out["error_gap"] = pd.Series(dtype=float)
    # Robustness to the weight initialisation: the spread over seeds of the final size (a statistic
    # across seeds: judged by bootstrapping seeds).
    out["final_units"] = runs[["model", "width", "seed", "total_final_units"]]
    # Accuracy against the dense network (same schedule and seed), per seed the mean over models/widths.
    d = dense.set_index(["model", "width", "seed"])["test_error"]
    g = runs.set_index(["model", "width", "seed"])["test_error"]
    both = g.index.intersection(d.index)
    gap = 100 * (g.loc[both] - d.loc[both])
    out["dense_gap"] = claims.per_seed(gap.droplevel(["model", "width"])) if len(both) else pd.Series(dtype=float)
    return out


def mean_cv(frame: pd.DataFrame) -> float:
    """Coefficient of variation over seeds of the final number of units, averaged over (model, width)."""
    cv = []
    for _, g in frame.groupby(["model", "width"]):
        v = g["total_final_units"].to_numpy(dtype=float)
        if len(v) > 1:
            cv.append(v.std(ddof=1) / v.mean())
    return float(np.mean(cv)) if cv else float("nan")


CLAIMS = {
    "binary": claims.Claim(
        "Learning the Bernoulli parameters drives every one of them to 0 or 1: a deterministic network",
        "Guenter & Sideris 2022, abstract",
        "share of θ strictly inside (0.01, 0.99) at the end (%), per seed the mean over models and widths",
        claims.AtMost(limit=1.0, fmt="{:.2f}", unit="% of θ"), paper="θ practically converge to 0 or 1"),
    "early": claims.Claim(
        "Irrelevant units are removed during the early stages of training",
        "Guenter & Sideris 2022, abstract",
        "share of all removed units removed in the first quarter of the steps (%), per seed the mean over "
        "models and widths",
        claims.AtLeast(limit=50.0, fmt="{:.1f}", unit="%"), paper="pruning early in training"),
    "cheaper": claims.Claim(
        "Subsequent training iterations are considerably cheaper: the last epoch against the first",
        "Guenter & Sideris 2022, abstract",
        "training seconds of the last gated epoch ÷ the first (forward, backward, θ estimator, optimizer "
        "steps, removals; same run), per seed the mean over models and widths; 'considerably' read as at "
        "least halved (our threshold)",
        claims.AtMost(limit=0.5, fmt="{:.2f}", unit="× the first epoch"), paper="cost of later iterations reduced"),
    "cheaper_step": claims.Claim(
        "Subsequent training iterations are considerably cheaper: the compacted network's step against the "
        "initial network's",
        "Guenter & Sideris 2022, abstract",
        "one training step of the network left at the end ÷ one of the initial gated network (same batches, "
        "best of interleaved repeats), per seed the mean over models and widths; at least halved (our "
        "threshold)",
        claims.AtMost(limit=0.5, fmt="{:.2f}", unit="× the initial step"), paper="cost of later iterations reduced"),
    "width": claims.Claim(
        "Pruning level is consistent regardless of the initial size of the network",
        "Guenter & Sideris 2022, abstract",
        "per LeNet-300-100 layer: the largest deviation of its final width at one initial width from its "
        "mean over initial widths, ≤ 25 % (t interval over seeds); all layers must hold",
        claims.Fraction(share=1.0, what="layers"), paper="consistent pruning levels"),
    "width_error": claims.Claim(
        "Prediction accuracy is consistent regardless of the initial size of the network",
        "Guenter & Sideris 2022, abstract",
        "LeNet-300-100 test error, largest minus smallest initial width (pp, paired by seed), within ±0.5 pp",
        claims.Within(target=0.0, tol=0.5, fmt="{:+.2f}", unit="pp"), paper="consistent accuracy"),
    "init": claims.Claim(
        "Pruning level is consistent regardless of the weight initialisation",
        "Guenter & Sideris 2022, abstract",
        "coefficient of variation over seeds of the final number of units, mean over models and widths",
        claims.SeedBootstrap(statistic=mean_cv, name="mean CV", sign=-1.0, limit=0.15, fmt="{:.3f}"),
        paper="robust to initialisation"),
    "accuracy": claims.Claim(
        "Better test accuracy than other structured pruning methods at similar pruning levels",
        "Guenter & Sideris 2022, abstract and Sec. 5",
        "not measured here: it needs L0-HC and polarization run on the same LeNets, MNIST-5k and schedule, "
        "each swept to the same kept units or FLOPs; their modules were being changed while this chapter "
        "was rerun, and the sweeps do not fit the cpu budget. The published rows (full MNIST) are shown, "
        "not judged.",
        claims.AtMost(limit=0.0), paper="better test accuracy than other structured methods"),
}
LAYER_RULE = claims.AtMost(limit=25.0, fmt="{:.1f}", unit="%")


def claims_table(cfg: Config, results: dict) -> pd.DataFrame:
    """Every claim on one value per seed, judged only when the runs it uses settled (:data:`SETTLE`)."""
    m = measurements(cfg, results)
    settle = settled_runs(results)

    def ev(value, quantity, models=None):
        s = settle if models is None else settle[settle["model"].isin(models)]
        return claims.Evidence(value, s[quantity].tolist(), SETTLE[quantity][1])

    model = "lenet300_100" if "lenet300_100" in cfg.models else cfg.models[0]
    layers = [ev(dev, "kept_share", [model]) for dev in m["layer_deviation"].values()]
    layer_verdicts = [claims.judge(claims.Claim("", "", "", LAYER_RULE), e, cfg.profile) for e in layers]
    rows = [
        (CLAIMS["binary"], ev(m["undecided"], "undecided")),
        (CLAIMS["early"], ev(m["early_share"], "kept_share")),
        (CLAIMS["cheaper"], ev(m["epoch_ratio"], "kept_share")),
        (CLAIMS["cheaper_step"], ev(m["step_ratio"], "kept_share")),
        (CLAIMS["width"], layer_verdicts or None),
        (CLAIMS["width_error"], ev(m["error_gap"], "test_accuracy", [model]) if len(m["error_gap"]) else None),
        (CLAIMS["init"], ev(m["final_units"], "kept_share") if len(m["final_units"]) else None),
        (CLAIMS["accuracy"], None),
    ]
    return claims.ledger(CHAPTER, rows, cfg.profile, cfg.results_dir, budget=cfg.budget)


def closing_numbers(cfg: Config, results: dict) -> pd.DataFrame:
    """Per (model, initial width): final widths (mean, s.d.), test error, and the epoch-time reduction."""
    rows = []
    w, runs, t = results["widths"], results["runs"], results["epoch_times"]
    for (model, width), g in runs.groupby(["model", "width"], sort=False):
        gw = w[(w["model"] == model) & (w["width"] == width)]
        tt = t[(t["model"] == model) & (t["width"] == width)]
        dense = tt[tt["kind"] == "dense"]["seconds"].median() if (tt["kind"] == "dense").any() else float("nan")
        gated = tt[tt["kind"] == "Bernoulli gates"]
        last = gated[gated["epoch"] == gated["epoch"].max()]["seconds"].mean()
        first = gated[gated["epoch"] == 1]["seconds"].mean()
        rows.append({"model": model, "initial": _arch_label(model, width, w), "final (mean±s.d.)": _fmt_arch(gw),
                     "seeds": len(g), "test error %": 100 * g["test_error"].mean(),
                     "test error s.d. %": 100 * (g["test_error"].std(ddof=1) if len(g) > 1 else 0.0),
                     "first epoch s": first, "last epoch s": last, "dense epoch s": dense,
                     "last / dense": last / dense if dense == dense else float("nan")})
    return pd.DataFrame(rows)


def speed_table(cfg: Config, results: dict) -> pd.DataFrame:
    """Per model and initial width (mean over seeds): the last gated epoch against the first (estimator
    included, same run) beside the kept-FLOPs fraction and issue 15's goal (last/first ≤ kept FLOPs +
    0.1); the compacted network's step against the initial network's (best of interleaved repeats), and
    beside it the floor: the step of a network of the final widths without gates, timed in the same repeats
    (no gate, estimator or θ update can make the final step cheaper than that); the dense network's epoch
    as a note."""
    runs, t = results["runs"], results["epoch_times"]
    rows = []
    for (model, width), g in runs.groupby(["model", "width"], sort=False):
        dense = t[(t["kind"] == "dense") & (t["model"] == model) & (t["width"] == width)]["seconds"]
        goal = g["kept_flops"] + 0.1
        rows.append({"model": model, "initial": _arch_label(model, width, results["widths"]),
                     "seeds": len(g), "flipped examples": int(g["flip_examples"].iloc[0]),
                     "first epoch s": g["first_epoch_s"].mean(), "last epoch s": g["last_epoch_s"].mean(),
                     "last / first": g["epoch_ratio"].mean(), "kept FLOPs": g["kept_flops"].mean(),
                     "goal: kept FLOPs + 0.1": goal.mean(),
                     "seeds meeting the goal": f"{int((g['epoch_ratio'] <= goal).sum())} of {len(g)}",
                     "initial step ms": g["step_initial_ms"].mean(), "final step ms": g["step_final_ms"].mean(),
                     "final / initial step": g["step_ratio"].mean(),
                     "dense final-width step ms": g["step_dense_final_ms"].mean(),
                     "floor: dense final-width / initial step": g["floor_ratio"].mean(),
                     "dense epoch s (note)": float(dense.median()) if len(dense) else float("nan")})
    return pd.DataFrame(rows)


def plot_flip_tradeoff(results: dict, efficiency: float = 0.5):
    """The estimator's variance, the step's cost and the variance reduction per second against the
    number of flipped examples, measured as training starts; the number used is marked."""
    from .. import plotting

    f = results["flip"]
    fig, axes = plotting.figure(ncols=3, width=10.5, height=3.0)
    for i, (model, g) in enumerate(f.groupby("model", sort=False)):
        g = g.sort_values("flip_examples")
        c = f"C{i}"
        axes[0].plot(g["flip_examples"], g["variance"], marker="o", color=c, label=model)
        axes[1].plot(g["flip_examples"], g["step_ms"], ls="none", marker="o", color=c, label=f"{model} measured")
        axes[1].plot(g["flip_examples"], g["step_ms_fit"], color=c, label=f"{model} Theil-Sen line")
        axes[2].plot(g["flip_examples"], g["efficiency"], marker="o", color=c, label=model)
        pick = g[g["chosen"]]
        axes[2].scatter(pick["flip_examples"], pick["efficiency"], s=120, facecolors="none", edgecolors="k",
                        zorder=3, label="used" if i == 0 else None)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("flipped examples per step")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("variance of the θ-gradient estimate")
    axes[1].set_ylabel("training step (ms)")
    axes[2].set_ylabel("variance reduction per second\n(relative to the best)")
    if len(f):
        axes[2].axhline(efficiency, color="0.5", ls="--", lw=0.8)
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------
# The page's prose
# --------------------------------------------------------------------------------------------------

def run_numbers(cfg: Config, results: dict) -> dict[str, float]:
    """The run's numbers quoted in the page's prose: the number of gated runs, the mean and largest share of
    undecided gates at the end (%), and the mean share of the pruning done early (:func:`measurements`)."""
    runs = results["runs"]
    m = measurements(cfg, results)
    return {"n_runs": len(runs), "undecided_mean": 100 * float(runs["undecided"].mean()),
            "undecided_max": 100 * float(runs["undecided"].max()), "early_share": float(m["early_share"].mean())}


def run_text(cfg: Config, results: dict) -> str:
    """One Markdown sentence on what ran: profile, gated and dense runs, dataset, torch threads."""
    return (f"Profile **{cfg.profile}**: {len(results['runs'])} gated runs and {len(results['dense'])} dense "
            f"reference runs on **{cfg.dataset}**, {cfg.num_threads} torch thread(s) for every run.")


def fixed_facts(cfg: Config, results: dict) -> str:
    """The claims this chapter judges and the architectures it starts from, one per line: independent of
    training, so the page can check them verbatim."""
    lines = [f"{key}: {c.statement} [{c.rule.text}]" for key, c in CLAIMS.items()]
    lines += [f"{m} {[_arch_label(m, w, results['widths']) for w in cfg.widths_of(m)]}" for m in cfg.models]
    return "\n".join(lines)


CAVEATS = (
    "Caveats. The estimator is ours, not the paper's (which we could not read), and so is the form of "
    "the hyper-prior's term (a price per active unit, proportional to its parameter count); the prior "
    "settings and the θ schedule were chosen by us on short runs, not tuned per width. A decaying step "
    "settles every θ only as fast as its drift beats the estimator's noise: units whose expected "
    "gradient is near zero (a price per unit that almost balances its use) move slowly, and the step "
    "shrinks before they reach a vertex; longer training (the `paper` profile) is the fair test. "
    "Timings are wall clock on a shared 2-core machine and inherit its load; steps are compared in "
    "interleaved best-of repeats for that reason, epochs are not. MNIST-5k makes the prior 17 times "
    "stronger per example than on full MNIST, so our networks are smaller than the published ones and "
    "our errors higher; the published rows are not judged, and the comparison with other structured "
    "methods at matched size is not measured (see the claims table).")


def discussion(cfg: Config, closing: pd.DataFrame, table: pd.DataFrame, speed: pd.DataFrame) -> str:
    """The chapter's closing discussion (Markdown), every number from the run: per model and initial width
    the final widths, test error and epoch times (:func:`closing_numbers`), the verdicts of ``table``
    (:func:`claims_table`), the speed of the last epoch and step (:func:`speed_table`), and the caveats."""
    lines = [f"This page was produced by the **{cfg.profile}** profile on **{cfg.dataset}**."]
    if cfg.profile == "smoke":
        lines.append("The smoke profile trains tiny networks for one or two epochs: its numbers only show that "
                     "the pipeline runs and are too small to mean anything.")
    for _, r in closing.iterrows():
        lines.append(f"- {r['model']} from {r['initial']}: final widths {r['final (mean±s.d.)']} "
                     f"({int(r['seeds'])} seeds), test error {r['test error %']:.2f} % "
                     f"(s.d. {r['test error s.d. %']:.2f}); "
                     f"training time per epoch {r['first epoch s']:.2f} s (first) to {r['last epoch s']:.2f} s "
                     f"(last), a change of {100 * (r['last epoch s'] / r['first epoch s'] - 1):+.0f} %; the last "
                     f"gated epoch takes {r['last / dense']:.1f} times the dense network's "
                     f"{r['dense epoch s']:.2f} s.")
    verdicts = dict(zip(table["claim"], table["verdict"]))
    lines.append("")
    lines.append("Verdicts from this run: " + "; ".join(f"*{k}*: **{v}**" for k, v in verdicts.items()) + ".")
    lines.append("")
    for _, r in speed.iterrows():
        lines.append(f"- speed, {r['model']} from {r['initial']}: last epoch {r['last / first']:.2f} × the first "
                     f"(kept FLOPs {r['kept FLOPs']:.2f}, goal ≤ {r['goal: kept FLOPs + 0.1']:.2f}: "
                     f"{r['seeds meeting the goal']} seeds meet it); final step {r['final / initial step']:.2f} × "
                     f"the initial step, where a network of the final widths without gates takes "
                     f"{r['floor: dense final-width / initial step']:.2f} × (the floor: what no gate, estimator "
                     f"or θ update costs); {r['flipped examples']} flipped examples a step.")
    lines.append("")
    lines.append(CAVEATS)
    return "\n".join(lines)
