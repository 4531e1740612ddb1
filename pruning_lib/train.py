"""One training loop for every chapter: ``fit`` and ``evaluate``.

Methods plug in without touching the loop:

* **penalties**: ``{name: fn(model) -> scalar tensor}``, added to the loss (L0 norms, polarizers, ...);
* **callbacks**: objects with any of ``after_backward(state)``, ``after_step(state)``,
  ``after_epoch(state)`` (Torch-Pruning's regularizer seam sits between backward and step);
* **loss_fn(model, x, y)**: the task loss; the default is cross-entropy. A label-free loss simply never
  reads ``y``.

Several optimizers (weights and gates, as in Dep-L0) may be passed. Training is seeded and
deterministic on CPU; CUDA is used when present. With ``checkpoint=`` the loop saves its whole state
atomically at the end of every epoch and resumes from it, so an interrupted run loses at most one epoch.

Distributed: run the same script under ``torchrun``; ``fit`` initialises the process group from the
environment, wraps the model in ``DistributedDataParallel`` and gives each process its slice of every
global batch, so N processes compute the same updates as one (up to float rounding; batch norm
statistics are per process, as in plain DDP). Stochastic layers (dropout, gates sampled per example)
draw from one random stream per process (seeded ``seed + rank``, so rank 0 draws what one process
would): the processes' noises are independent, as one process's per-example noise is, but a run with
such layers matches one process in distribution, not number for number.

GPU run settings (:class:`RunSettings`, set per call or for a block with :func:`run_settings`): bf16
autocast, channels-last memory format, and a data loader that keeps a GPU fed (loader processes, pinned
memory, persistent workers). They say how a run uses its device, not what it computes, so they are not
part of any unit's hash; they act on CUDA only (on CPU ``fit`` computes exactly what it always did) and
every ``fit`` records what it used, with the device, in :func:`last_run` (a unit's provenance). The device
is chosen once per process (:func:`default_device`: ``cuda:LOCAL_RANK`` under torchrun).
"""
from __future__ import annotations

import contextlib
import math
import os
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from .data import DataSplits, Split
from .runs import atomic_torch_save, load_checkpoint, progress_bar


_DEVICE: torch.device | None = None


def default_device() -> torch.device:
    """The process's device, chosen once: ``cuda:LOCAL_RANK`` (one GPU per torchrun process) when CUDA
    is available, else the CPU."""
    global _DEVICE
    if _DEVICE is None:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            _DEVICE = torch.device("cuda", local)
            torch.cuda.set_device(_DEVICE)
        else:
            _DEVICE = torch.device("cpu")
    return _DEVICE


@dataclass(frozen=True)
class RunSettings:
    """How a run uses the device.

    * ``precision``: ``"fp32"`` or ``"bf16"`` (forward and loss under ``torch.autocast(dtype=bfloat16)``;
      weights, gradients and optimizer state stay fp32, so no loss scaling is needed); CUDA only;
    * ``channels_last``: the model and 4-d inputs in channels-last memory format. None (the default): on CPU
      for a model with 2-d convolutions (oneDNN's layout: a LeNet-5-Caffe or ResNet-20 training step takes
      about 25 % less time: ``benchmarks/steps.py``, its ``dense_nchw`` row), off on CUDA; True or False: always
      (faster convolutions on tensor cores). The same arithmetic in another order: the numbers differ from
      the other layout's in their last bits, like those of another thread count, and are not hashed;
    * ``workers``, ``pin_memory``, ``persistent_workers``: the training loader of on-disk datasets
      (ImageNet, CIFAR), built once per ``fit`` and kept across epochs; ``workers`` None = one per core,
      at most 8 (per process).
    """

    precision: str = "fp32"
    channels_last: bool | None = None
    workers: int | None = None
    pin_memory: bool = True
    persistent_workers: bool = True

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r}: give fp32 or bf16")


_SETTINGS = RunSettings()
_LAST_RUN: dict[str, Any] = {}


def current_settings() -> RunSettings:
    return _SETTINGS


@contextlib.contextmanager
def run_settings(settings: RunSettings | None = None, **changes):
    """``with run_settings(precision="bf16", channels_last=True): ...``: every ``fit`` inside uses them
    (the unit runner of :mod:`pruning_lib.units` sets them from its command line)."""
    global _SETTINGS
    before = _SETTINGS
    _SETTINGS = dataclasses.replace(settings or before, **changes)
    try:
        yield _SETTINGS
    finally:
        _SETTINGS = before


def last_run() -> dict[str, Any]:
    """What the last ``fit`` of this process ran on: device (and GPU name), world size, precision,
    channels-last, loader settings, torch and CUDA versions (a unit's ``provenance.json``)."""
    return dict(_LAST_RUN)


def uses_channels_last(model: nn.Module, device: torch.device, settings: RunSettings | None = None) -> bool:
    """Whether ``fit`` trains ``model`` on ``device`` in channels-last memory format (see :class:`RunSettings`)."""
    settings = settings or current_settings()
    if settings.channels_last is not None:
        return settings.channels_last
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _provenance(device: torch.device, world: int, amp: bool, channels_last: bool, loader: dict) -> dict:
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": world, "precision": "bf16" if amp else "fp32", "channels_last": channels_last,
            "loader": loader, "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


def _cuda_train_batches(split, batch_size: int, gen: torch.Generator, device: torch.device, rank: int,
                        world: int, settings: RunSettings) -> tuple[Callable[[int], Iterable], dict]:
    """One DataLoader for the whole ``fit`` (on-disk data, CUDA): loader processes that persist across
    epochs, pinned memory, prefetching; a DistributedSampler reshuffled by ``set_epoch`` under DDP."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    workers = settings.workers if settings.workers is not None else min(8, os.cpu_count() or 1)
    if world > 1:
        sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=True,
                                     seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        batch_size //= world
    else:
        sampler = RandomSampler(split, generator=gen)
    loader = DataLoader(split, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=settings.pin_memory, persistent_workers=settings.persistent_workers
                        and workers > 0, prefetch_factor=4 if workers > 0 else None)

    def epoch(e: int):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(e)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return epoch, {"workers": workers, "pin_memory": settings.pin_memory,
                   "persistent_workers": settings.persistent_workers and workers > 0}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, device: torch.device | None = None,
             max_batches: int | None = None, amp: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode; mode restored after);
    ``amp``: the forward under bf16 autocast (CUDA only)."""
    device = device or next(model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for i, (x, y) in enumerate(data_mod.batches(split, batch_size, device=device)):
        if max_batches is not None and i >= max_batches:
            break
        with autocast:
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}


@dataclass
class TrainState:
    """What callbacks see. ``model`` is the bare model (not the DDP wrapper)."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    loss: float = float("nan")
    penalties: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # a callback sets this to end training early


class Callback:
    """Base class; override what you need. ``state_dict``/``load_state_dict`` make it resumable."""

    def after_backward(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def after_epoch(self, state: TrainState) -> None: ...
    def log(self, state: TrainState) -> dict[str, float]:
        """Extra columns for the history row written at each evaluation."""
        return {}
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class Method(Callback):
    """The one way a pruning method plugs into :func:`fit` (``fit(model, data, method=m, ...)``): the
    optimizers it trains with (``None``: ``fit``'s Adam on every parameter), the penalties it adds to the
    loss, the task loss (``loss_fn``), and, being a :class:`Callback`, what it does after backward, after
    each step and after each epoch. ``fit`` puts the method first among the callbacks. A method overrides
    only what it needs; :class:`~pruning_lib.methods.bernoulli.BernoulliPruning` and
    :class:`~pruning_lib.methods.hard_concrete.HardConcretePruning` are two."""

    def optimizers(self, lr: float) -> list[torch.optim.Optimizer] | None:
        return None

    def penalties(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {}

    def loss_fn(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(model, x, y)


# Generic callbacks: any chapter's training can use them

class EarlyStop(Callback):
    """Ends training ``patience`` iterations after the lowest validation loss seen so far."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self._seen = 0
        self._best_step, self._best = 0, math.inf

    def after_step(self, state) -> None:
        h = state.history
        if self.patience is None or len(h) == self._seen:
            return
        for row in h[self._seen:]:
            if row["val_loss"] < self._best:
                self._best, self._best_step = row["val_loss"], row["step"]
        self._seen = len(h)
        if h[-1]["step"] - self._best_step >= self.patience:
            state.stop = True


class EpochTimer(Callback):
    """Wall time of the training work of every epoch (forward, backward, estimator, optimizer steps,
    removal), excluding evaluation: timing starts in :meth:`loss_fn` and stops in :meth:`after_step`.
    Use ``loss_fn=timer.loss_fn`` in :func:`~pruning_lib.train.fit` and put the timer *last* in the
    callbacks."""

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._acc = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def loss_fn(self, model, x, y):
        self.start()
        return F.cross_entropy(model(x), y)

    def after_step(self, state) -> None:
        if self._t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._acc += time.perf_counter() - self._t0
            self._t0 = None

    def after_epoch(self, state) -> None:
        self.epoch_seconds.append(self._acc)
        self._acc = 0.0


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def lr_scheduler(optimizer: torch.optim.Optimizer, epochs: float, kind: str = "constant"):
    """A learning-rate schedule stepped once an epoch by :func:`fit` (chapter 5's trainings, dense and
    gated alike): ``"constant"`` (None) or ``"cosine"``, ``0.5 (1 + cos(pi e / E))``
    at epoch ``e`` of ``E = ceil(epochs)``, on every parameter group (the gating modules' too)."""
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {kind!r}")
    total = max(int(math.ceil(epochs)), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e / total, 1))))


def adam(params, lr: float = 1e-3, **kwargs) -> torch.optim.Adam:
    """The book's Adam: ``torch.optim.Adam`` with its multi-tensor (``foreach``) update, the default on CUDA.
    On CPU it computes the same bits as the single-tensor loop torch uses there by default (tests: 30 steps
    of dense, L0-HC, Dep-L0 and polarization networks; the masked-step invariants; the units of the
    ``cpu`` book recomputed cold, see the README), with fewer Python calls: 2-9 % less CPU time per LeNet-300-100
    step (issue 15)."""
    return torch.optim.Adam(params, lr=lr, foreach=True, **kwargs)


def fit(model: nn.Module, data: DataSplits, *,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr: float = 1e-3, epochs: float | None = None, iterations: int | None = None,
        batch_size: int = 128, scheduler: Any = None,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
        penalties: dict[str, Callable[[nn.Module], torch.Tensor]] | None = None,
        callbacks: Iterable[Callback] = (), eval_every: int | None = None, eval_test: bool = True,
        eval_batch_size: int = 1000, max_eval_batches: int | None = None,
        seed: int = 0, device: torch.device | str | None = None,
        checkpoint: str | Path | None = None, progress: bool = True, desc: str = "train",
        grad_clip: float | None = None, settings: RunSettings | None = None,
        method: Method | None = None) -> pd.DataFrame:
    """Train ``model`` on ``data.train`` and return the history as a tidy DataFrame.

    ``method`` (a :class:`Method`) plugs a pruning method in: its optimizers (unless ``optimizer`` is
    given), its penalties (beside ``penalties``), its ``loss_fn`` (unless one is given) and itself as the
    first callback.

    Give the length as ``epochs`` or ``iterations`` (optimizer steps). Validation (and test, with
    ``eval_test``) metrics are recorded every ``eval_every`` steps (default: once an epoch) and at the
    end; rows have ``step, epoch, train_loss, val_loss, val_accuracy, test_loss, test_accuracy,
    seconds`` plus penalty values and callback columns. ``optimizer`` defaults to Adam(lr).
    ``settings`` (default: :func:`current_settings`) are the GPU run settings; they act on CUDA only.
    """
    if (epochs is None) == (iterations is None):
        raise ValueError("give exactly one of epochs or iterations")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = _distributed()
    seed_everything(seed + rank)  # rank 0 (and a single process): `seed`; the data order comes from `gen`
    settings = settings or current_settings()
    on_cuda = device.type == "cuda"
    amp = on_cuda and settings.precision == "bf16"
    channels_last = uses_channels_last(model, device, settings)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data = data.to(device)
    steps_per_epoch = data_mod.num_batches(data.train, batch_size)
    if world > 1 and not data.in_memory:  # DistributedSampler: each process sees 1/world of the data
        steps_per_epoch = data_mod.num_batches(range(-(-len(data.train) // world)), batch_size // world)
    total = iterations if iterations is not None else int(math.ceil(epochs * steps_per_epoch))
    eval_every = eval_every or steps_per_epoch
    callbacks = list(callbacks)
    penalties = dict(penalties or {})
    if method is not None:  # after the move to the device: its optimizers hold the device's parameters
        optimizer = method.optimizers(lr) if optimizer is None else optimizer
        loss_fn = method.loss_fn if loss_fn is cross_entropy else loss_fn
        penalties = {**method.penalties(), **penalties}
        callbacks = [method, *callbacks]
    optimizers = _as_list(optimizer) or [adam(model.parameters(), lr=lr)]
    schedulers = _as_list(scheduler)
    gen = torch.Generator().manual_seed(seed)
    train_batches, loader_info = None, {"workers": "in memory" if data.in_memory else "default"}
    if on_cuda and not data.in_memory:
        train_batches, loader_info = _cuda_train_batches(data.train, batch_size, gen, device, rank, world,
                                                         settings)
    _LAST_RUN.clear()
    _LAST_RUN.update(_provenance(device, world, amp, channels_last, loader_info))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    state = TrainState(model, optimizers, schedulers, total_steps=total)

    ckpt = Path(checkpoint) if checkpoint is not None else None
    saved = load_checkpoint(ckpt, map_location=device) if ckpt is not None else None  # weights_only
    if saved is not None:
        from .masks import load_masked_state
        load_masked_state(model, saved["model"])
        for o, s in zip(optimizers, saved["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(schedulers, saved["schedulers"]):
            sch.load_state_dict(s)
        for cb, s in zip(callbacks, saved["callbacks"]):
            cb.load_state_dict(s)
        state.step, state.epoch, state.history = saved["step"], saved["epoch"], saved["history"]
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def save_checkpoint():
        if ckpt is None or rank != 0:
            return
        atomic_torch_save({
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "callbacks": [cb.state_dict() for cb in callbacks], "step": state.step, "epoch": state.epoch,
            "history": state.history, "generator": gen.get_state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, ckpt)

    net = model
    if world > 1:
        # parameters that no optimizer of this fit updates (gates held fixed during a fine-tune) get no
        # gradient, and DDP would wait for it: it leaves them out (set on every fit: the list stays on
        # the model)
        updated = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        frozen = [n for n, p in model.named_parameters() if id(p) not in updated]
        DDP = nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def record(train_loss: float):
        if world > 1:  # the loss of the global batch, not of this process's slice (every rank records)
            t = torch.tensor([train_loss], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            train_loss = float(t) / world
        row = {"step": state.step, "epoch": state.epoch, "train_loss": train_loss,
               "seconds": elapsed + time.perf_counter() - t0}
        m = evaluate(model, data.val, eval_batch_size, device, max_eval_batches, amp=amp)
        row.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
        if eval_test:
            m = evaluate(model, data.test, eval_batch_size, device, max_eval_batches, amp=amp)
            row.update(test_loss=m["loss"], test_accuracy=m["accuracy"])
        row.update(state.penalties)
        for cb in callbacks:
            row.update(cb.log(state))
        state.history.append(row)

    bar = progress_bar(total=total, initial=state.step, desc=desc, progress=progress and rank == 0,
               leave=False, mininterval=2.0, dynamic_ncols=True)
    elapsed = state.history[-1]["seconds"] if state.history else 0.0
    t0 = time.perf_counter()
    if not state.history:
        record(float("nan"))
    model.train()
    running, count = 0.0, 0
    while state.step < total and not state.stop:
        epoch_done = True
        epoch_batches = (train_batches(state.epoch) if train_batches is not None else
                         data_mod.batches(data.train, batch_size, shuffle=True, generator=gen, device=device,
                                          shard=(rank, world)))
        for i, (x, y) in enumerate(epoch_batches):
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = loss_fn(net, x, y)
            loss = loss.float()
            state.penalties = {}
            for name, pen in penalties.items():
                value = pen(model)
                state.penalties[name] = float(value.detach())
                loss = loss + value
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for cb in callbacks:
                cb.after_backward(state)
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            for o in optimizers:
                o.step()
            state.step += 1
            state.loss = float(loss.detach())
            running, count = running + state.loss, count + 1
            for cb in callbacks:
                cb.after_step(state)
            bar.update(1)
            if state.step % eval_every == 0 or state.step == total or state.stop:
                record(running / max(count, 1))
                running, count = 0.0, 0
                bar.set_postfix(val_acc=f"{state.history[-1]['val_accuracy']:.3f}", refresh=False)
            if state.step >= total or state.stop:
                epoch_done = i + 1 == steps_per_epoch
                break
        if not epoch_done:
            break
        state.epoch += 1
        for s in schedulers:
            s.step()
        for cb in callbacks:
            cb.after_epoch(state)
        save_checkpoint()
    bar.close()
    save_checkpoint()
    return pd.DataFrame(state.history)
