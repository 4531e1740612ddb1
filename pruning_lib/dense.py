"""The one dense unit: a dense network trained with :func:`~pruning_lib.train.fit`, cached under
``results/dense/<hash>/`` (``model.pt``, ``history.csv``).

:class:`DenseSpec` says everything that makes the network: model, dataset (and the rule that took a part of
its training split), seed and schedule. As in open_lth, a field left at its default is left out of the
hashed spec (except :attr:`DenseSpec.ALWAYS`, which chapter 1's first hashes always held), so adding a
field with a default that switches it off changes no existing hash.

Two chapters asking for the same network get one Store and one training (chapter 1's baselines and
chapter 7's dense references). Chapter 2's round 0 (Glorot initialisation, early stopping, its initial and
rewind weights kept as snapshots), chapter 5's dense networks (a cosine learning-rate schedule) and chapter
6's mature networks (trained on part of the data) are dense units too: other specs, so other networks.

Two dense trainings are not this unit, and why: chapter 3's ``dense`` method (an arm of the L0-HC/Dep-L0
experiment: the gated pipeline without gates, SGD with weight decay, a cosine schedule and a fine-tune phase,
measured like the gated arms and keeping no weights) and chapter 4's dense references (they time an epoch
with the chapter's weight prior at a thread count that is part of their spec, and keep no weights).

A chapter whose network moved here from a Store of its own passes :class:`Legacy`: when the dense Store is
missing and the old one is finished, the old files are converted once into the dense Store (checked to
read back equal, the old unit named in ``legacy.json``) instead of training again; the old Store is kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pandas as pd
import torch

from .data import load_dataset
from .models import build_model, glorot_init, weights
from .runs import CacheError, Store
from .train import Callback, EarlyStop, adam, default_device, fit, lr_scheduler

KIND = "dense"
FILES = ("model.pt", "history.csv")


@dataclass(frozen=True)
class DenseSpec:
    """What a dense network is: model, data, seed and schedule (Adam, one learning rate).

    * ``epochs`` or ``iterations``: the length (exactly one);
    * ``evals_per_epoch``: validation and test evaluations an epoch (None: :func:`fit`'s default, once an
      epoch);
    * ``width``: the model's width multiplier;
    * ``lr_schedule``: ``"constant"`` or ``"cosine"`` (:func:`~pruning_lib.train.lr_scheduler`, stepped once an
      epoch);
    * ``init``: ``"default"`` (the model's own initialisation) or ``"glorot"``
      (:func:`~pruning_lib.models.glorot_init`);
    * ``eval_every``: evaluate every so many steps (instead of ``evals_per_epoch``);
    * ``patience``: stop early this many steps after the lowest validation loss
      (:class:`~pruning_lib.train.EarlyStop`; None: never);
    * ``snapshots``: steps after which the weights are kept too, as ``weights_at_<step>.pt`` (0: the
      initialisation); a rewind point, say.
    * ``train_subset``: the rule that took the training examples from ``dataset``'s training split (a
      JSON dict naming it; None: the whole split). The caller passes those examples as ``data``.
    """

    model: str
    dataset: str
    seed: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    epochs: float | None = None
    iterations: int | None = None
    evals_per_epoch: int | None = None
    width: float = 1.0
    train_subset: dict | None = None
    lr_schedule: str = "constant"
    init: str = "default"
    eval_every: int | None = None
    patience: int | None = None
    snapshots: tuple[int, ...] = ()

    # hashed even at their defaults (chapter 1's specs always held them)
    ALWAYS: ClassVar[tuple[str, ...]] = ("model", "dataset", "seed", "batch_size", "lr", "optimizer")

    def __post_init__(self):
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("DenseSpec: give exactly one of epochs or iterations")
        if self.optimizer != "adam":
            raise ValueError(f"DenseSpec: optimizer {self.optimizer!r} is not supported (adam)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"DenseSpec: lr_schedule {self.lr_schedule!r} is not supported (constant, cosine)")
        if self.lr_schedule != "constant" and self.epochs is None:
            raise ValueError("DenseSpec: a learning-rate schedule is stepped per epoch: give epochs")
        if self.init not in ("default", "glorot"):
            raise ValueError(f"DenseSpec: init {self.init!r} is not supported (default, glorot)")
        if self.eval_every is not None and self.evals_per_epoch is not None:
            raise ValueError("DenseSpec: give at most one of eval_every and evals_per_epoch")
        if any(int(k) != k or k < 0 for k in self.snapshots):
            raise ValueError(f"DenseSpec: snapshots must be steps >= 0, got {self.snapshots}")
        object.__setattr__(self, "snapshots", tuple(int(k) for k in self.snapshots))

    def to_dict(self) -> dict[str, Any]:
        """The hashed spec: every field of :attr:`ALWAYS`, and the others where they differ from their
        default."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name in self.ALWAYS or getattr(self, f.name) != f.default}
        if "snapshots" in out:
            out["snapshots"] = list(out["snapshots"])
        return out

    def files(self) -> tuple[str, ...]:
        """The files that make the unit finished."""
        return _files(self.snapshots)


def snapshot_name(step: int) -> str:
    """The Store name of the weights after ``step`` (file ``<name>.pt``)."""
    return f"weights_at_{step}"


def snapshot(st: Store, step: int) -> dict[str, torch.Tensor]:
    """The weights after ``step`` that the unit ``st`` kept (its spec's ``snapshots``)."""
    return st.torch(snapshot_name(step))


def _save_snapshot(st: Store, step: int, model: torch.nn.Module) -> None:
    if not st.exists(f"{snapshot_name(step)}.pt"):
        st.save_torch(snapshot_name(step), weights(model))


def _files(snapshots) -> tuple[str, ...]:
    return FILES + tuple(f"{snapshot_name(k)}.pt" for k in snapshots)


@dataclass(frozen=True)
class Legacy:
    """Where a network was cached before it moved to the dense unit: the old Store's ``kind`` and ``spec``
    (computed exactly as the old code did), the ``files`` that made it finished,
    ``convert(old_store) -> (state_dict, history frame[, {snapshot name: tensors}])`` (the last: the spec's
    snapshots, :func:`snapshot_name`), and a ``note`` for ``legacy.json`` (what the conversion could not carry over)."""

    kind: str
    spec: dict[str, Any]
    files: tuple[str, ...]
    convert: Callable[[Store], tuple[dict[str, torch.Tensor], pd.DataFrame]]
    note: str = ""


def done(store: Store) -> bool:
    """Whether the unit is finished: the network, its history and the snapshots its spec asks for."""
    return all(store.exists(f) for f in _files(store.spec.get("snapshots", ())))


def store(spec: DenseSpec, results_dir: str = "results", legacy: Legacy | None = None) -> Store:
    """The network's Store; with ``legacy``, an old Store of it is adopted first (:func:`adopt_legacy`)."""
    st = Store(results_dir, KIND, spec.to_dict())
    if legacy is not None and not done(st):
        adopt_legacy(st, legacy)
    return st


def adopt_legacy(st: Store, legacy: Legacy) -> bool:
    """Write the old Store's network into the dense Store ``st`` (``legacy.json`` naming the old unit and its
    files' digests first, then ``model.pt`` and ``history.csv``), and check that both read back equal to
    what the old Store held. Returns False when there is no finished old Store. The old Store is kept."""
    old = Store(st.root, legacy.kind, legacy.spec)
    if not all(old.exists(f) for f in legacy.files):
        return False
    state, history, *extra = legacy.convert(old)
    extra = extra[0] if extra else {}
    st.json("legacy", lambda: {"kind": legacy.kind, "key": old.key, "spec": old.spec,
                               "files": dict(sorted(old._committed().items())),
                               **({"note": legacy.note} if legacy.note else {})})
    for name, tensors in extra.items():
        st.save_torch(name, tensors)
    st.save_torch("model", state)
    st.save_frame("history", history)

    def equal(name, want):
        back = st.torch(name)
        return back.keys() == want.keys() and all(torch.equal(back[k], want[k].cpu()) for k in want)

    same = (equal("model", state) and all(equal(n, t) for n, t in extra.items())
            and st.frame("history").equals(history.reset_index(drop=True)))
    if not same:
        st._set_aside(f"adopted from {legacy.kind}/{old.key}: it does not read back equal")
        raise CacheError(f"{st.dir}: the network adopted from {old.dir} does not read back equal; moved aside")
    return True


def train(spec: DenseSpec, *, results_dir: str = "results", data_root: str = "data", data=None,
          progress: bool = True, desc: str | None = None, legacy: Legacy | None = None):
    """Train (or load) the dense network ``spec``; returns ``(model, history)``.

    ``data``: the loaded splits (``spec.dataset``, with ``spec.train_subset`` applied); required when a
    subset is named. Training saves ``fit``'s checkpoint at every epoch's end and resumes from it.
    """
    st = store(spec, results_dir, legacy)
    if data is None:
        if spec.train_subset is not None:
            raise ValueError(f"DenseSpec names a training subset {spec.train_subset}: pass its data")
        data = load_dataset(spec.dataset, root=data_root)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, width=spec.width, **data.model_kwargs())
    if spec.init == "glorot":
        glorot_init(model)
    if done(st):
        model.load_state_dict(torch.load(st.path("model.pt"), map_location="cpu", weights_only=True))
        return model.to(default_device()), st.frame("history")
    eval_every = spec.eval_every
    if spec.evals_per_epoch is not None:
        steps = -(-len(data.train) // spec.batch_size)
        eval_every = max(1, steps // spec.evals_per_epoch)
    schedule = {}
    if spec.lr_schedule != "constant":
        opt = adam(model.parameters(), lr=spec.lr)
        schedule = dict(optimizer=opt, scheduler=lr_scheduler(opt, spec.epochs, spec.lr_schedule))
    callbacks = [EarlyStop(spec.patience)] if spec.patience is not None else []
    if spec.snapshots:
        if 0 in spec.snapshots:
            _save_snapshot(st, 0, model)
        callbacks.append(_Snapshots(st, [k for k in spec.snapshots if k > 0]))
    history = fit(model, data, epochs=spec.epochs, iterations=spec.iterations, batch_size=spec.batch_size,
                  lr=spec.lr, seed=spec.seed, **schedule, eval_every=eval_every, checkpoint=st.path("checkpoint.pt"),
                  callbacks=callbacks, progress=progress, desc=desc or f"{spec.model} seed {spec.seed}")
    missing = [k for k in spec.snapshots if not st.exists(f"{snapshot_name(k)}.pt")]
    if missing:
        raise ValueError(f"{st.dir}: training stopped at step {int(history['step'].iloc[-1])}, before the "
                         f"snapshot step(s) {missing}: lower them (a rewind iteration, say) or the early stop's "
                         f"patience")
    st.save_torch("model", model.state_dict())
    st.save_frame("history", history)
    st.path("checkpoint.pt").unlink(missing_ok=True)
    return model, history


class _Snapshots(Callback):
    """Writes the weights after each of ``steps`` into the unit (at once: a resumed training finds them)."""

    def __init__(self, st: Store, steps: list[int]):
        self.st, self.steps = st, set(steps)

    def after_step(self, state) -> None:
        if state.step in self.steps:
            _save_snapshot(self.st, state.step, state.model)
