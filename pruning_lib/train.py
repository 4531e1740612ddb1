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
statistics are per process, as in plain DDP).
"""
from __future__ import annotations

import math
import os
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, device: torch.device | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode; mode restored after)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for i, (x, y) in enumerate(data_mod.batches(split, batch_size, device=device)):
        if max_batches is not None and i >= max_batches:
            break
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
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
        grad_clip: float | None = None) -> pd.DataFrame:
    """Train ``model`` on ``data.train`` and return the history as a tidy DataFrame.

    Give the length as ``epochs`` or ``iterations`` (optimizer steps). Validation (and test, with
    ``eval_test``) metrics are recorded every ``eval_every`` steps (default: once an epoch) and at the
    end; rows have ``step, epoch, train_loss, val_loss, val_accuracy, test_loss, test_accuracy,
    seconds`` plus penalty values and callback columns. ``optimizer`` defaults to Adam(lr).
    """
    if (epochs is None) == (iterations is None):
        raise ValueError("give exactly one of epochs or iterations")
    device = torch.device(device) if device is not None else default_device()
    rank, world = _distributed()
    seed_everything(seed)
    model.to(device)
    data = data.to(device)
    steps_per_epoch = data_mod.num_batches(data.train, batch_size)
    if world > 1 and not data.in_memory:  # DistributedSampler: each process sees 1/world of the data
        steps_per_epoch = data_mod.num_batches(range(-(-len(data.train) // world)), batch_size // world)
    total = iterations if iterations is not None else int(math.ceil(epochs * steps_per_epoch))
    eval_every = eval_every or steps_per_epoch
    optimizers = _as_list(optimizer) or [torch.optim.Adam(model.parameters(), lr=lr)]
    schedulers = _as_list(scheduler)
    callbacks = list(callbacks)
    penalties = dict(penalties or {})
    gen = torch.Generator().manual_seed(seed)
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
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                  else None)

    def record(train_loss: float):
        row = {"step": state.step, "epoch": state.epoch, "train_loss": train_loss,
               "seconds": elapsed + time.perf_counter() - t0}
        m = evaluate(model, data.val, eval_batch_size, device, max_eval_batches)
        row.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
        if eval_test:
            m = evaluate(model, data.test, eval_batch_size, device, max_eval_batches)
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
        for i, (x, y) in enumerate(data_mod.batches(data.train, batch_size, shuffle=True, generator=gen,
                                                    device=device, shard=(rank, world))):
            loss = loss_fn(net, x, y)
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
