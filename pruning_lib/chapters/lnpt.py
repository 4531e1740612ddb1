"""Chapter 6, LNPT: the learning gap and label-free pruning and training (Xiao et al. 2024, arXiv 2403.12690).

The paper's abstract makes three claims:

1. the distance between the initial and the trained weights, commonly taken to track generalization, is
   *inconsistent* with it during training;
2. the **learning gap**, a distance between the penultimate-layer feature maps of a mature network (the
   teacher, "on the cloud") and of the network that is learning (the student, "on the device"), *aligns*
   with generalization;
3. the mature network can guide both the **pruning** (at initialisation) and the **training** of a small
   network on *unlabeled* data, and this beats supervised training.

The method (the gap, the label-free loss and score, withheld labels, the probe) is
:mod:`pruning_lib.methods.lnpt`; this module holds the chapter: its Config, its units, the experiment,
the tables, the figures and the claims.

**Units** (:func:`work_units`, run through :func:`pruning_lib.runs.map_units`): the mature networks first
(the teacher and the probed runs' mature network, each trained with labels on the teacher's split), then
each probed run and each (student, method, sparsity, seed) of the accuracy comparison, which read them.

**Probed runs** (:func:`trajectory_run`): the weight distance, the paper's gap and the aligned gap at every
checkpoint of runs that differ in learning rate, sparsity and seed. The probed student and its mature
network (``trajectory_teacher``) have equal penultimate widths, so the paper's gap needs no map. Their
correlations with test accuracy are judged within each run and pooled within each learning rate
(:func:`correlations`, :func:`claims_table`); pooling across learning rates and sparsities would mix runs
whose distances differ by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import claims, dense, plotting
from .. import data as data_mod
from ..data import DataSplits, TensorSplit
from ..masks import apply_mask, mask_from_scores
from ..methods.lnpt import (GapProbe, LabelFreeLoss, TeacherOutputs, aligned_learning_gap, feature_scaling,
                            init_projection, label_free_scores, lnpt_splits, penultimate_features,
                            random_weight_scores, snapshot, snip_scores, stack_inputs, student_feature_dim,
                            train_label_free, withhold_labels)
from ..metrics import nonzero_density
from ..models import MODELS, build_model
from ..runs import ConfigError, RunConfig, Store, map_units, param, progress_bar
from ..train import default_device, evaluate, fit

CHAPTER = "06_lnpt"
SOURCE = "Xiao et al. 2024 (arXiv 2403.12690), abstract"

METHODS = ("lnpt", "supervised", "snip", "random")
ABLATIONS = ("kd_only",)
DENSE_METHODS = ("dense_label_free", "dense_supervised")
METHOD_LABELS = {
    "lnpt": "LNPT: learning-gap mask, label-free training",
    "kd_only": "learning-gap mask, label-free distillation only (no gap term)",
    "supervised": "learning-gap mask, supervised training",
    "snip": "SNIP (labels), supervised training",
    "random": "random mask, supervised training",
    "dense_label_free": "dense, label-free training",
    "dense_supervised": "dense, supervised training",
}
DATASET_CHOICES = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic-mnist", "synthetic-cifar")


# --- the chapter's configuration and experiment -------------------------------------------------------

@dataclass(frozen=True)
class Config(RunConfig):
    dataset: str = param("mnist5k", choices=DATASET_CHOICES)
    data_root: str = param("data")
    unlabeled_fraction: float = param(0.5, low=0.05, high=0.95,
                                      help="share of the training split given to the student without labels; "
                                           "the teacher is trained with labels on the rest")
    teacher: str = param("lenet5_caffe", choices=tuple(MODELS))
    teacher_epochs: float = param(20, low=0.01, high=1000)
    students: tuple[str, ...] = param(("lenet300_100", "lenet5_caffe"), choices=tuple(MODELS))
    student_widths: tuple[float, ...] = param((1.0, 0.5), low=0.05, high=8,
                                              help="width multiplier of each student (one value, or one per "
                                                   "student); the teacher is full width")
    methods: tuple[str, ...] = param(METHODS, choices=METHODS + ABLATIONS,
                                     help="pruned-student methods compared at each sparsity")
    sparsities: tuple[float, ...] = param((0.9, 0.95, 0.98), low=0.0, high=0.999)
    seeds: tuple[int, ...] = param((0, 1, 2), low=0)
    epochs: float = param(20, low=0.01, high=1000)
    lr: float = param(1e-3, low=0, high=10)
    batch_size: int = param(64, low=1, high=4096)
    temperature: float = param(4.0, low=0.1, high=100)
    gap_weight: float = param(1.0, low=0, high=1000)
    kd_weight: float = param(1.0, low=0, high=1000)
    score_batches: int = param(4, low=1, high=1000, help="batches the pruning scores are averaged over")
    dense_reference: bool = param(True, help="also train dense students, label-free and supervised")
    trajectory_student: str = param("lenet300_100", choices=tuple(MODELS))
    trajectory_teacher: str = param("lenet300_100", choices=tuple(MODELS),
                                    help="the mature network of the probed runs, trained with labels on the "
                                         "teacher's split; its penultimate width must equal the probed "
                                         "student's so that the paper's gap compares feature maps directly "
                                         "(the same name as `teacher` reuses that network)")
    trajectory_lrs: tuple[float, ...] = param((1e-4, 1e-3, 1e-2), low=0, high=10)
    trajectory_sparsities: tuple[float, ...] = param((0.0, 0.9, 0.98), low=0.0, high=0.999)
    trajectory_epochs: float = param(20, low=0.01, high=1000)
    trajectory_training: str = param("supervised", choices=("supervised", "label_free"))
    probes_per_epoch: int = param(2, low=1, high=100)
    probe_samples: int = param(2000, low=10, help="images the aligned gap is fitted on (and evaluated on)")
    results_dir: str = param("results")

    PROFILES = {
        "smoke": {"dataset": "mnist5k", "teacher_epochs": 1, "students": ("lenet300_100",), "student_widths": (1.0,),
                  "sparsities": (0.9, 0.98), "seeds": (0,), "epochs": 1, "score_batches": 1,
                  "trajectory_lrs": (1e-3, 1e-2), "trajectory_sparsities": (0.0, 0.9), "trajectory_epochs": 1,
                  "probes_per_epoch": 3, "probe_samples": 300},
        # about 5.5 minutes of CPU on 2 quiet cores: a 60-epoch student ~6 s, a probed run ~2.5 s, the two
        # teachers ~25 s; label-free students still gain ~1 pp per 10 epochs at epoch 40
        "cpu": {"seeds": (0, 1, 2), "students": ("lenet300_100",), "student_widths": (1.0,), "epochs": 60,
                "sparsities": (0.9, 0.95), "dense_reference": False, "teacher_epochs": 15,
                "methods": METHODS + ABLATIONS, "trajectory_sparsities": (0.0, 0.9), "trajectory_epochs": 10,
                "probes_per_epoch": 2},
        "paper": {"dataset": "cifar10", "teacher": "resnet56", "teacher_epochs": 160,
                  "students": ("resnet20", "vgg16_bn"), "student_widths": (1.0, 0.5),
                  "methods": METHODS + ABLATIONS, "sparsities": (0.9, 0.95, 0.98),
                  "seeds": (0, 1, 2), "epochs": 160, "batch_size": 128, "lr": 1e-3,
                  "trajectory_student": "resnet20", "trajectory_teacher": "resnet56",
                  "trajectory_lrs": (1e-4, 1e-3, 1e-2),
                  "trajectory_sparsities": (0.0, 0.9, 0.98), "trajectory_epochs": 60, "probes_per_epoch": 1,
                  "probe_samples": 5000, "unlabeled_fraction": 0.5},
    }
    NOT_HASHED = RunConfig.NOT_HASHED + ("data_root",)
    BUDGETED = ("teacher_epochs", "epochs", "trajectory_epochs")

    def check(self) -> None:
        if len(self.student_widths) not in (1, len(self.students)):
            raise ConfigError(f"parameter 'student_widths': give one width or one per student "
                              f"({len(self.students)}), got {list(self.student_widths)}")

    def student_specs(self) -> list[tuple[str, float]]:
        """``(model name, width)`` of every student."""
        widths = self.student_widths * len(self.students) if len(self.student_widths) == 1 else self.student_widths
        return list(zip(self.students, widths))


def student_label(name: str, width: float) -> str:
    return name if width == 1.0 else f"{name} (width {width:g})"


@dataclass
class Mature:
    """A mature network (a teacher) with its outputs on the student's split and its penultimate features
    on the probe images (``fit``: the student's split, ``eval``: held-out test images)."""

    name: str
    model: nn.Module
    outputs: TeacherOutputs
    history: pd.DataFrame
    spec: dict
    fit: torch.Tensor
    eval: torch.Tensor

    @property
    def gap_scale(self) -> float:
        """``mean ||phi_T||^2`` on the student's images: the scale of the training loss's gap term."""
        return float(self.fit.pow(2).sum(1).mean())


@dataclass
class Context:
    """What every unit of the experiment shares: the splits, the trained teachers and their outputs."""

    cfg: Config
    data: DataSplits
    teacher_data: DataSplits
    student_data: DataSplits
    teacher: Mature
    probe_teacher: Mature  # the mature network of the probed runs (``cfg.trajectory_teacher``)
    fit_x: torch.Tensor
    eval_x: torch.Tensor
    device: torch.device


def _build(cfg: Config, name: str, data: DataSplits, seed: int, width: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, width=width, **data.model_kwargs())


def teacher_spec(cfg: Config, name: str | None = None) -> dict:
    """The mature network ``name`` as the other units' specs name it (their hashes hold it), and the spec of
    its Store before it moved to the dense unit (``results/lnpt/teacher/<hash>/``, adopted from there)."""
    return dict(dataset=cfg.dataset, unlabeled_fraction=cfg.unlabeled_fraction, teacher=name or cfg.teacher,
                epochs=cfg.teacher_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=0, optimizer="adam")


def teacher_dense_spec(cfg: Config, name: str) -> dense.DenseSpec:
    """The mature network ``name`` as a dense unit (:mod:`pruning_lib.dense`): trained with labels on the
    teacher's split (:func:`~pruning_lib.methods.lnpt.lnpt_splits`), seed 0, evaluated once an epoch."""
    return dense.DenseSpec(name, cfg.dataset, 0, batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.teacher_epochs,
                           evals_per_epoch=1,
                           train_subset={"rule": "lnpt_splits", "part": "teacher", "seed": 0,
                                         "unlabeled_fraction": cfg.unlabeled_fraction})


def _legacy_teacher(cfg: Config, name: str) -> dense.Legacy:
    """The mature network's Store before the dense unit: ``lnpt/teacher`` with :func:`teacher_spec`, one file
    ``teacher.pt`` (``{"state": state_dict, "history": the history as lists}``)."""
    def convert(old: Store):
        saved = old.torch("teacher")
        return saved["state"], pd.DataFrame(saved["history"])
    return dense.Legacy("lnpt/teacher", teacher_spec(cfg, name), ("teacher.pt",), convert)


def mature_names(cfg: Config) -> list[str]:
    """The mature networks of ``cfg``: the teacher, and the probed runs' one when it is another network."""
    return list(dict.fromkeys((cfg.teacher, cfg.trajectory_teacher)))


# one entry per process: the splits and the Context of the last config (a worker reuses them across units)
_CACHE: dict = {}


def _cached(name: str, key, make):
    if _CACHE.get(name, (None,))[0] != key:
        _CACHE[name] = (key, make())
    return _CACHE[name][1]


def _splits(cfg: Config) -> tuple[DataSplits, DataSplits, DataSplits]:
    """``(data, teacher's split, student's split)``, loaded once per process. Refuses a probed student whose
    penultimate width differs from its mature network's: the paper's gap would be undefined."""
    def make():
        data = data_mod.load_dataset(cfg.dataset, root=cfg.data_root)
        teacher_data, student_data = lnpt_splits(data, cfg.unlabeled_fraction)
        probed = student_feature_dim(_build(cfg, cfg.trajectory_student, data, 0))
        mature = student_feature_dim(_build(cfg, cfg.trajectory_teacher, data, 0))
        if probed != mature:
            raise ConfigError(f"parameters 'trajectory_student' and 'trajectory_teacher': the paper's learning "
                              f"gap compares penultimate features of equal width, but {cfg.trajectory_student} "
                              f"has {probed} and {cfg.trajectory_teacher} has {mature}")
        return data, teacher_data, student_data
    return _cached("splits", (cfg.dataset, cfg.data_root, cfg.unlabeled_fraction, cfg.trajectory_student,
                              cfg.trajectory_teacher), make)


def teacher_store(cfg: Config, name: str, results_dir: str | None = None) -> Store:
    """The results folder of the mature network ``name``, a dense unit (``results/dense/<hash>/``; its older
    ``results/lnpt/teacher/<hash>/`` is adopted once)."""
    return dense.store(teacher_dense_spec(cfg, name), cfg.results_dir if results_dir is None else results_dir,
                       _legacy_teacher(cfg, name))


def _teacher(cfg: Config, name: str, teacher_data: DataSplits, progress: bool) -> tuple[nn.Module, pd.DataFrame]:
    """The mature network ``name`` trained with labels on the teacher's split, or loaded from its Store (the
    dense unit); returns the network and its history."""
    return dense.train(teacher_dense_spec(cfg, name), results_dir=cfg.results_dir, data=teacher_data,
                       progress=progress, desc=f"teacher {name}", legacy=_legacy_teacher(cfg, name))


def _mature(cfg: Config, name: str, data: DataSplits, teacher_data: DataSplits, student_data: DataSplits,
            fit_x: torch.Tensor, eval_x: torch.Tensor, device, progress: bool) -> Mature:
    """Train (or load from the Store) the mature network ``name`` with labels on the teacher's split."""
    teacher, history = _teacher(cfg, name, teacher_data, progress)
    teacher.to(device)
    cache_x = student_data.train.x if isinstance(student_data.train, TensorSplit) else None
    return Mature(name, teacher, TeacherOutputs(teacher, cache_x), history,
                  teacher_spec(cfg, name), penultimate_features(teacher, fit_x), penultimate_features(teacher, eval_x))


def prepare(cfg: Config, progress: bool = False) -> Context:
    """Load the data, split it, and train (or load from the Store) the teacher and the probed runs' mature
    network, once each, with labels on the teacher's split. Refuses a probed student whose penultimate width
    differs from its mature network's: the paper's gap would be undefined."""
    device = default_device()
    data, teacher_data, student_data = _splits(cfg)
    fit_x = stack_inputs(student_data.train, cfg.probe_samples)
    eval_x = stack_inputs(data.test, cfg.probe_samples)
    args = (data, teacher_data, student_data, fit_x, eval_x, device, progress)
    teacher = _mature(cfg, cfg.teacher, *args)
    probe_teacher = teacher if cfg.trajectory_teacher == cfg.teacher else _mature(cfg, cfg.trajectory_teacher, *args)
    return Context(cfg, data, teacher_data, student_data, teacher, probe_teacher, fit_x, eval_x, device)


def _score_batches(ctx: Context, seed: int, labelled: bool) -> list:
    """The first ``score_batches`` shuffled batches of the student's split (labels withheld unless
    ``labelled``), fixed by ``seed``."""
    split = ctx.student_data.train if labelled else withhold_labels(ctx.student_data.train)
    gen = torch.Generator().manual_seed(seed)
    it = data_mod.batches(split, ctx.cfg.batch_size, shuffle=True, generator=gen, device=ctx.device)
    return [b for _, b in zip(range(ctx.cfg.score_batches), it)]


def pruned_student(ctx: Context, name: str, criterion: str, sparsity: float, seed: int, width: float = 1.0,
                   kd_only: bool = False, mature: Mature | None = None
                   ) -> tuple[nn.Module, nn.Module | None, LabelFreeLoss]:
    """A freshly initialised student (seeded), pruned at initialisation to ``sparsity`` by ``criterion``
    ("learning_gap", "snip", "random"; global ranking), with its projection and label-free loss towards
    ``mature`` (default: the chapter's teacher). The pruning score always uses the full label-free loss;
    ``kd_only`` drops the gap term from training."""
    cfg = ctx.cfg
    mature = mature or ctx.teacher
    student = _build(cfg, name, ctx.data, seed, width).to(ctx.device)
    unl = _score_batches(ctx, seed, labelled=False)
    projection = init_projection(student, mature.outputs, torch.cat([x for x, _ in unl]))
    loss = LabelFreeLoss(mature.outputs, projection=projection, gap_weight=cfg.gap_weight,
                         kd_weight=cfg.kd_weight, temperature=cfg.temperature, gap_scale=mature.gap_scale)
    if sparsity > 0:
        if criterion == "learning_gap":
            scores = label_free_scores(student, loss, unl)
        elif criterion == "snip":
            scores = snip_scores(student, _score_batches(ctx, seed, labelled=True))
        elif criterion == "random":
            scores = random_weight_scores(student, torch.Generator().manual_seed(seed))
        else:
            raise ValueError(f"unknown criterion {criterion!r}")
        apply_mask(student, mask_from_scores(scores, sparsity, scope="global"))
    if kd_only:
        loss.gap_weight, projection = 0.0, None
        loss.projection = None
    return student, projection, loss


def _train(ctx: Context, student, projection, loss: LabelFreeLoss, label_free: bool, *, lr: float, epochs: float,
           seed: int, eval_every: int | None = None, callbacks=()) -> pd.DataFrame:
    cfg = ctx.cfg
    kw = dict(epochs=epochs, batch_size=cfg.batch_size, seed=seed, progress=False, callbacks=callbacks,
              eval_every=eval_every or 10**9)
    if label_free:
        return train_label_free(student, loss.teacher, ctx.student_data, projection=projection,
                                gap_weight=loss.gap_weight, kd_weight=loss.kd_weight, temperature=loss.temperature,
                                gap_scale=loss.gap_scale, lr=lr, **kw)
    return fit(student, ctx.student_data, lr=lr, **kw)


def trajectory_run(ctx: Context, lr: float, sparsity: float, seed: int = 0) -> pd.DataFrame:
    """One probed run: the trajectory student (seeded), pruned at init by the learning-gap score towards
    the probed runs' mature network, trained with ``cfg.trajectory_training``; weight distance, the paper's
    learning gap, the aligned gap (ours) and test accuracy at every probe."""
    cfg = ctx.cfg
    mature = ctx.probe_teacher
    student, projection, loss = pruned_student(ctx, cfg.trajectory_student, "learning_gap", sparsity, seed,
                                               mature=mature)
    probe = GapProbe(snapshot(student), ctx.fit_x, ctx.eval_x, mature.fit, mature.eval)
    steps = data_mod.num_batches(ctx.student_data.train, cfg.batch_size)
    h = _train(ctx, student, projection, loss, cfg.trajectory_training == "label_free", lr=lr,
               epochs=cfg.trajectory_epochs, seed=seed, eval_every=max(1, steps // cfg.probes_per_epoch),
               callbacks=[probe])
    return h.assign(student=cfg.trajectory_student, teacher=mature.name, lr=lr, sparsity=sparsity, seed=seed,
                    training=cfg.trajectory_training)


def accuracy_run(ctx: Context, student_name: str, method: str, sparsity: float, seed: int,
                 width: float = 1.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One cell of the accuracy-vs-sparsity comparison (see :data:`METHOD_LABELS`): one row, and the
    student's training history, evaluated once an epoch (to check that the run settled)."""
    cfg = ctx.cfg
    criterion = {"snip": "snip", "random": "random"}.get(method, "learning_gap")
    dense = method in DENSE_METHODS
    student, projection, loss = pruned_student(ctx, student_name, criterion, 0.0 if dense else sparsity, seed,
                                               width, kd_only=method == "kd_only")
    label_free = method in ("lnpt", "kd_only", "dense_label_free")
    steps = data_mod.num_batches(ctx.student_data.train, cfg.batch_size)
    h = _train(ctx, student, projection, loss, label_free, lr=cfg.lr, epochs=cfg.epochs, seed=seed,
               eval_every=steps)
    last = h.iloc[-1]
    gap = aligned_learning_gap(ctx.teacher.fit, penultimate_features(student, ctx.fit_x), ctx.teacher.eval,
                               penultimate_features(student, ctx.eval_x))
    return pd.DataFrame([{"student": student_label(student_name, width), "model": student_name, "width": width,
                          "method": method, "sparsity": 0.0 if dense else sparsity,
                          "seed": seed, "density": nonzero_density(student), "test_accuracy": last["test_accuracy"],
                          "val_accuracy": last["val_accuracy"], "aligned_gap": gap,
                          "label_free": label_free, "steps": int(last["step"]), "seconds": last["seconds"]}]), h


# --- units: the mature networks, then each probed run and each accuracy cell ---------------------------

def unit_tasks(cfg: Config) -> list[tuple[str, tuple]]:
    """Every unit of ``cfg`` as ``(kind, arguments)``, in the order the chapter runs them: the mature
    networks (``"teacher"``, a name), the probed runs (``"trajectories"``, ``(lr, sparsity, seed)``) and the
    accuracy cells (``"accuracy"``, ``(student, width, method, sparsity, seed)``)."""
    tasks: list[tuple[str, tuple]] = [("teacher", (name,)) for name in mature_names(cfg)]
    for seed in cfg.seeds:
        for lr in cfg.trajectory_lrs:
            for s in cfg.trajectory_sparsities:
                tasks.append(("trajectories", (lr, s, seed)))
    methods = [(m, s) for s in cfg.sparsities for m in cfg.methods]
    if cfg.dense_reference:
        methods = [(m, 0.0) for m in DENSE_METHODS] + methods
    for name, width in cfg.student_specs():
        for seed in cfg.seeds:
            for m, s in methods:
                tasks.append(("accuracy", (name, width, m, s, seed)))
    return tasks


def _unit_spec(cfg: Config, teacher: str, **kw) -> dict:
    common = dict(teacher=teacher_spec(cfg, teacher), batch_size=cfg.batch_size,
                  score_batches=cfg.score_batches, temperature=cfg.temperature, gap_weight=cfg.gap_weight,
                  kd_weight=cfg.kd_weight, probe_samples=cfg.probe_samples)
    return {**common, **kw}


def unit_spec(cfg: Config, kind: str, args: tuple) -> dict:
    """What a unit's results folder is named by (``results/lnpt/<kind>/<hash>/``)."""
    if kind == "teacher":
        return teacher_dense_spec(cfg, *args).to_dict()
    if kind == "trajectories":
        lr, s, seed = args
        # probes="raw+aligned": the paper's gap and ours are both logged (older entries had one gap)
        return _unit_spec(cfg, cfg.trajectory_teacher, kind="trajectory", student=cfg.trajectory_student,
                          lr=lr, sparsity=s, seed=seed, epochs=cfg.trajectory_epochs,
                          probes_per_epoch=cfg.probes_per_epoch, training=cfg.trajectory_training,
                          probes="raw+aligned")
    name, width, m, s, seed = args
    # evaluated="epoch": the history has a point per epoch, so settling can be judged
    return _unit_spec(cfg, cfg.teacher, kind="accuracy", student=name, width=width, method=m, sparsity=s,
                      seed=seed, epochs=cfg.epochs, lr=cfg.lr, evaluated="epoch")


def unit_store(cfg: Config, kind: str, args: tuple, results_dir: str | None = None) -> Store:
    if kind == "teacher":
        return teacher_store(cfg, *args, results_dir=results_dir)
    return Store(cfg.results_dir if results_dir is None else results_dir, f"lnpt/{kind}", unit_spec(cfg, kind, args))


_UNIT_FILES = {"teacher": dense.FILES, "trajectories": ("result.csv",), "accuracy": ("result.csv", "history.csv")}


def unit_done(kind: str, store: Store) -> bool:
    return all(store.exists(f) for f in _UNIT_FILES[kind])


def _context(cfg: Config) -> Context:
    return _cached("context", cfg, lambda: prepare(cfg, progress=False))


def _teachers_root(cfg: Config, results_dir: str) -> str:
    """Where a unit reads its mature networks: ``results_dir`` (a map_units worker's folder is seeded with
    them), unless they are finished only in ``cfg.results_dir`` (a torchrun rank other than 0 writes a scratch
    folder: every rank then reads the same networks); missing in both, they are trained in ``results_dir``."""
    def ready(root):
        return all(dense.done(teacher_store(cfg, n, root)) for n in mature_names(cfg))
    return cfg.results_dir if not ready(results_dir) and ready(cfg.results_dir) else results_dir


def run_unit(task: tuple, results_dir: str):
    """One unit ``(kind, cfg, arguments)`` (an item of :func:`unit_tasks` with its config), for
    :func:`pruning_lib.runs.map_units`: trains it into ``results_dir`` unless it is there, then returns
    nothing for a mature network, a probed run's frame, or an accuracy cell's ``(row, history)``. The
    others read the mature networks (:func:`_teachers_root`) through one Context per process."""
    kind, cfg, args = task
    store = unit_store(cfg, kind, args, results_dir)
    if kind == "teacher":
        if not unit_done(kind, store):
            _, teacher_data, _ = _splits(cfg)
            _teacher(cfg.replace(results_dir=results_dir), args[0], teacher_data, progress=False)
        return None
    teachers = _teachers_root(cfg, results_dir)
    if kind == "trajectories":
        return store.frame("result", lambda: trajectory_run(_context(cfg.replace(results_dir=teachers)), *args))
    name, width, m, s, seed = args
    if not unit_done(kind, store):
        row, hist = accuracy_run(_context(cfg.replace(results_dir=teachers)), name, m, s, seed, width)
        store.save_frame("history", hist)
        store.save_frame("result", row)
    return store.frame("result"), store.frame("history")


def _map(cfg: Config, tasks: list, **kw) -> list:
    """``tasks`` through :func:`pruning_lib.runs.map_units`: serially here unless ``$PRUNING_EXECUTOR`` says
    otherwise (processes, a Dask cluster); finished units only load, here."""
    root = str(cfg.results_dir)
    return map_units(run_unit, [(kind, cfg, args) for kind, args in tasks], results_dir=root,
                     done=lambda t: unit_done(t[0], unit_store(t[1], t[0], t[2], root)),
                     key=lambda t: f"{t[0]}-{unit_store(t[1], t[0], t[2], root).key}", **kw)


def work_units(cfg: Config) -> list:
    """Every unit of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`), in its order (the
    mature networks first: the others read them), with the notebook's hash, and ``run(results_dir)``."""
    from ..units import Unit

    out = []
    for kind, args in unit_tasks(cfg):
        store = unit_store(cfg, kind, args)
        if kind == "teacher":
            what = (f"mature network {args[0]} on {cfg.dataset}, labelled {1 - cfg.unlabeled_fraction:g} of the "
                    f"training split: {cfg.teacher_epochs:g} epochs")
        elif kind == "trajectories":
            lr, s, seed = args
            what = (f"probed run {cfg.trajectory_student}, lr {lr:g}, sparsity {s:g}, seed {seed}: "
                    f"{cfg.trajectory_epochs:g} epochs, {cfg.trajectory_training}")
        else:
            name, width, m, s, seed = args
            what = (f"{student_label(name, width)}, {m}, sparsity {s:g}, seed {seed}: {cfg.epochs:g} epochs "
                    f"(needs the mature networks)")
        out.append(Unit(store.key, store.kind, what, unit_done(kind, store), (cfg.dataset,),
                        lambda results_dir, task=(kind, cfg, args): run_unit(task, results_dir)))
    return out


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every unit of the chapter, each cached in its own Store entry (the teachers, each probed run, each
    (student, method, sparsity, seed)), through :func:`pruning_lib.runs.map_units` (``$PRUNING_EXECUTOR``,
    else serially): the mature networks first, then the units that read them. Returns frames ``teacher``
    (its history), ``trajectories``, ``accuracy``, ``histories`` (the accuracy units'), ``splits`` and
    ``feature_scaling`` (the two gaps of a freshly initialised probed student whose features are scaled,
    :func:`feature_scaling`)."""
    torch.manual_seed(0)
    try:
        _splits(cfg)  # the data, and the width check, before anything trains
        tasks = unit_tasks(cfg)
        teachers = [t for t in tasks if t[0] == "teacher"]
        rest = [t for t in tasks if t[0] != "teacher"]
        root = str(cfg.results_dir)
        _map(cfg, teachers, progress=False)
        ctx = _context(cfg)
        bar = progress_bar(total=len(rest), desc="LNPT units", progress=progress)
        try:
            done = _map(cfg, rest, bar=bar,
                        inputs=lambda t: [teacher_store(cfg, n, root) for n in mature_names(cfg)])
        finally:
            bar.close()
        out: dict[str, list] = {"trajectories": [], "accuracy": [], "histories": []}
        for (kind, _), res in zip(rest, done):
            if kind == "accuracy":
                row, hist = res
                out["accuracy"].append(row)
                out["histories"].append(hist.assign(**{k: row[k].iloc[0]
                                                       for k in ("student", "method", "sparsity", "seed")}))
            else:
                out[kind].append(res)
        teacher_acc = evaluate(ctx.teacher.model, ctx.data.test)["accuracy"]
        probe_acc = evaluate(ctx.probe_teacher.model, ctx.data.test)["accuracy"]
        fresh = _build(cfg, cfg.trajectory_student, ctx.data, 0).to(ctx.device)
        scaling = feature_scaling(ctx.probe_teacher.fit, ctx.probe_teacher.eval,
                                  penultimate_features(fresh, ctx.fit_x), penultimate_features(fresh, ctx.eval_x))
    finally:
        _CACHE.clear()
    return {"teacher": ctx.teacher.history.assign(model=cfg.teacher, test_accuracy_final=teacher_acc),
            "probe_teacher": pd.DataFrame([{"model": cfg.trajectory_teacher, "test_accuracy": probe_acc,
                                            "features": int(ctx.probe_teacher.fit.shape[1])}]),
            "trajectories": pd.concat(out["trajectories"], ignore_index=True),
            "accuracy": pd.concat(out["accuracy"], ignore_index=True),
            "histories": pd.concat(out["histories"], ignore_index=True),
            "feature_scaling": scaling,
            "splits": pd.DataFrame([{"split": "teacher (labelled)", "examples": len(ctx.teacher_data.train)},
                                    {"split": "student (labels withheld)", "examples": len(ctx.student_data.train)},
                                    {"split": "validation", "examples": len(ctx.data.val)},
                                    {"split": "test", "examples": len(ctx.data.test)}])}


# --- analysis ---------------------------------------------------------------------------------------

def spearman(a, b) -> float:
    """Spearman's rank correlation (scipy), NaN when either side is constant or too short."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


QUANTITIES = {"weight_distance": "weight distance ‖θ_t − θ_0‖₂",
              "learning_gap": "learning gap, the paper's: mean ‖φ_T − φ_S‖²",
              "aligned_gap": "aligned gap (ours): relative ridge residual"}
RUN_KEYS = ["lr", "sparsity", "seed"]


def _runs(traj: pd.DataFrame) -> pd.DataFrame:
    """``traj`` with a ``seed`` column (older frames had one seed) and a ``run`` label per probed run."""
    t = traj if "seed" in traj.columns else traj.assign(seed=0)
    return t.assign(run=[f"lr {lr:g}, sparsity {100 * s:g} %, seed {sd:g}"
                         for lr, s, sd in zip(t["lr"], t["sparsity"], t["seed"])])


def points(traj: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """The checkpoints as ``x`` (``quantity``), ``y`` (test accuracy), ``run`` and ``seed``: the
    measurement :class:`pruning_lib.claims.Correlated` and :func:`within_run_rho` read."""
    t = _runs(traj)
    return pd.DataFrame({"x": t[quantity].to_numpy(float), "y": t["test_accuracy"].to_numpy(float),
                         "run": t["run"].to_numpy(), "seed": t["seed"].to_numpy(), "lr": t["lr"].to_numpy()})


def run_rhos(frame: pd.DataFrame, absolute: bool = False) -> pd.DataFrame:
    """Spearman's ρ of ``x`` with ``y`` within each run of a :func:`points` frame: one row per run, with
    its ``seed`` (|ρ| with ``absolute``)."""
    rows = [{"seed": sd, "run": run, "rho": spearman(g["x"], g["y"])}
            for (sd, run), g in frame.groupby(["seed", "run"], sort=True)]
    out = pd.DataFrame(rows, columns=["seed", "run", "rho"])
    if absolute:
        out["rho"] = out["rho"].abs()
    return out


def within_run_rho(frame: pd.DataFrame, absolute: bool = False) -> float:
    """The mean over runs of Spearman's ρ of ``x`` with ``y`` within each run of a :func:`points` frame."""
    rho = run_rhos(frame, absolute)["rho"]
    return float(rho.mean()) if rho.notna().any() else float("nan")


def correlations(traj: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Spearman's ρ of each of :data:`QUANTITIES` with test accuracy, at three scopes:

    * ``run``: the checkpoints of one run (one learning rate, sparsity and seed);
    * ``learning rate``: every checkpoint of the runs at one learning rate (sparsities × seeds pooled),
      with a 95 % bootstrap interval over those runs (whole runs resampled,
      :func:`pruning_lib.claims.bootstrap_correlation`);
    * ``all runs``: every checkpoint pooled across learning rates and sparsities (with its interval). Runs
      at different learning rates and sparsities travel different distances by construction, so this view
      says little about the weight distance; it is shown, not judged.
    """
    t = _runs(traj)
    rows = []
    for (lr, s, sd), g in t.groupby(RUN_KEYS, sort=True):
        row = {"scope": "run", "run": g["run"].iloc[0], "lr": lr, "sparsity": s, "seed": sd, "runs": 1,
               "checkpoints": len(g), "final_test_accuracy": g.sort_values("step")["test_accuracy"].iloc[-1]}
        for q in QUANTITIES:
            if q in g.columns:
                row[f"rho_{q}"] = spearman(g[q], g["test_accuracy"])
        rows.append(row)
    pools = [("learning rate", f"lr {lr:g}", lr, g) for lr, g in t.groupby("lr", sort=True)]
    pools.append(("all runs", "all learning rates and sparsities (shown, not judged)", float("nan"), t))
    for scope, label, lr, g in pools:
        row = {"scope": scope, "run": label, "lr": lr, "sparsity": float("nan"), "seed": float("nan"),
               "runs": g["run"].nunique(), "checkpoints": len(g), "final_test_accuracy": float("nan")}
        for q in QUANTITIES:
            if q in g.columns:
                iv = claims.bootstrap_correlation(points(g, q), n_boot=n_boot)
                row.update({f"rho_{q}": iv.estimate, f"rho_{q}_low": iv.low, f"rho_{q}_high": iv.high})
        rows.append(row)
    return pd.DataFrame(rows)


def correlation_summary(cor: pd.DataFrame) -> pd.DataFrame:
    """A readable view of :func:`correlations`: per scope (the mean of the per-run ρ within each learning
    rate, and the pooled ρ with its bootstrap interval), one column per quantity."""
    out = []
    runs = cor[cor["scope"] == "run"]
    for lr, g in runs.groupby("lr", sort=True):
        out.append({"view": f"lr {lr:g}: within each run (mean of {len(g)} runs' ρ)",
                    **{QUANTITIES[q]: f"{g[f'rho_{q}'].mean():+.2f}" for q in QUANTITIES if f"rho_{q}" in g}})
    for _, r in cor[cor["scope"] != "run"].iterrows():
        out.append({"view": f"{r['run']}: checkpoints pooled ({int(r['runs'])} runs, {int(r['checkpoints'])} in all)",
                    **{QUANTITIES[q]: f"{r[f'rho_{q}']:+.2f} [{r[f'rho_{q}_low']:+.2f}, {r[f'rho_{q}_high']:+.2f}]"
                       for q in QUANTITIES if f"rho_{q}" in r and np.isfinite(r[f"rho_{q}_low"])}})
    return pd.DataFrame(out).set_index("view").fillna("—")


def accuracy_table(acc: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (%) mean ± s.d. over seeds: rows (student, sparsity), one column per method."""
    def fmt(v):
        v = 100 * np.asarray(v, dtype=float)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"
    t = acc.groupby(["student", "sparsity", "method"])["test_accuracy"].apply(fmt).unstack("method")
    t = t[[m for m in DENSE_METHODS + METHODS + ABLATIONS if m in t.columns]].fillna("")
    t.index = pd.MultiIndex.from_tuples([(st, f"{100 * sp:g} %") for st, sp in t.index],
                                        names=["student", "sparsity"])
    return t.rename(columns=METHOD_LABELS)


# --- plots --------------------------------------------------------------------------------------------

def plot_gap_trajectories(traj: pd.DataFrame):
    """Test accuracy against the weight distance, the paper's learning gap and the aligned gap (ours) at
    every probe of every run; one line per run (colour: learning rate, line style: sparsity, one line per
    seed). Each title gives the mean of the within-run Spearman ρ."""
    import seaborn as sns

    t = _runs(traj)
    shown = [q for q in QUANTITIES if q in t.columns]
    fig, axes = plotting.figure(ncols=len(shown), width=4.6 * len(shown), height=4.2, sharey=True, squeeze=False)
    axes = axes[0]
    lrs = sorted(t["lr"].unique())
    spars = sorted(t["sparsity"].unique())
    colours = dict(zip(lrs, sns.color_palette(plotting.PALETTE, len(lrs))))
    styles = dict(zip(spars, ["-", "--", ":", "-."] * 3))
    markers = dict(zip(spars, ["o", "s", "^", "D"] * 3))
    for ax, q in zip(axes, shown):
        for (lr, s, _), g in t.groupby(RUN_KEYS):
            g = g.sort_values("step")
            ax.plot(g[q], g["test_accuracy"], styles[s], marker=markers[s], ms=2.5, lw=0.9, color=colours[lr],
                    alpha=0.75)
        ax.set_xlabel(QUANTITIES[q])
        ax.set_title(f"mean within-run ρ = {within_run_rho(points(t, q)):+.2f}", fontsize=10)
    axes[0].set_xscale("symlog", linthresh=1.0)
    if "learning_gap" in shown:
        axes[shown.index("learning_gap")].set_xscale("log")
    axes[0].set_ylabel("test accuracy")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[lr], lw=2, label=f"lr {lr:g}") for lr in lrs]
    handles += [Line2D([], [], color="grey", ls=styles[s], marker=markers[s], ms=4, label=f"sparsity {100 * s:g} %")
                for s in spars]
    axes[-1].legend(handles=handles, loc="best", fontsize=8)
    return fig


def plot_lnpt_accuracy(acc: pd.DataFrame, teacher_accuracy: float | None = None):
    """Test accuracy against sparsity, one panel per student, mean ± s.d. over seeds for each method;
    dense students and the teacher as horizontal reference lines."""
    import seaborn as sns

    students = list(dict.fromkeys(acc["student"]))
    fig, axes = plotting.figure(ncols=len(students), width=max(6.0, 5.0 * len(students)), height=5.2,
                                squeeze=False)
    shown = METHODS + ABLATIONS
    palette = dict(zip(shown, sns.color_palette(plotting.PALETTE, len(shown))))
    markers = dict(zip(shown, ["o", "s", "^", "v", "x"]))
    for ax, name in zip(axes[0], students):
        g = acc[acc["student"] == name]
        for m in shown:
            d = g[g["method"] == m].groupby("sparsity")["test_accuracy"].agg(["mean", "std", "count"]).reset_index()
            if d.empty:
                continue
            ax.errorbar(d["sparsity"], d["mean"], yerr=d["std"].fillna(0), marker=markers[m], capsize=3,
                        color=palette[m], label=METHOD_LABELS[m])
        for m, ls in [("dense_supervised", "--"), ("dense_label_free", "-.")]:
            d = g[g["method"] == m]["test_accuracy"]
            if len(d):
                ax.axhline(d.mean(), color="grey", ls=ls, lw=1, label=METHOD_LABELS[m])
        if teacher_accuracy is not None:
            ax.axhline(teacher_accuracy, color="black", ls=":", lw=1, label="teacher")
        ax.set_xscale("logit")
        ax.xaxis.set_major_formatter(plt_percent())
        ax.xaxis.set_minor_formatter(plt_blank())
        ax.set_xticks(sorted(g.loc[g["sparsity"] > 0, "sparsity"].unique()))
        ax.set_xlabel("sparsity (logit scale)")
        ax.set_title(name)
    axes[0][0].set_ylabel("test accuracy (mean ± s.d. over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def plt_percent():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: f"{100 * v:.3g} %")


def plt_blank():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: "")


# --- claims ---------------------------------------------------------------------------------------------

SETTLE_TOL = 0.005  # a student's test accuracy may move less than 0.5 pp over its last quarter
SETTLE_TEXT = "student test accuracy still moving ≥ 0.5 pp over the last quarter of training"


GAP_SOURCE = SOURCE + "; the gap as papers.md §5 states it"


def claims_table(cfg: Config, results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's claims against our runs; verdicts by :func:`pruning_lib.claims.ledger`.

    Thresholds are ours (the abstract gives no numbers): "inconsistent" = |Spearman ρ| of the weight
    distance with test accuracy below 0.5; "aligns" = ρ of the learning gap with test accuracy below -0.7
    (a smaller gap, a higher accuracy). The learning gap judged is the paper's (:func:`raw_learning_gap`);
    our aligned gap is judged beside it, labelled as ours. Each correlation is judged in two views:

    * within each run: the per-run ρ, one value per seed (the mean over that seed's runs), with a t interval
      over seeds, the unit of replication (a bootstrap over three seeds has ten distinct resamples and gives
      intervals far too narrow; a bootstrap over one run's checkpoints ignores that they follow each other);
    * pooled within each learning rate (sparsities × seeds), with a bootstrap interval over those runs
      (:class:`pruning_lib.claims.Correlated`).

    Pooling across learning rates as well is shown in :func:`correlations`, not judged: runs at different
    step sizes and sparsities travel different distances by construction. Accuracy comparisons are one
    value per seed (the mean over sparsities of that seed's differences), judged only when every student run
    they use settled.
    """
    traj, acc = results["trajectories"], results["accuracy"]
    lrs = sorted(traj["lr"].unique())

    def within(statement, source, quantity, limit, absolute):
        rho = "|ρ|" if absolute else "ρ"
        rule = claims.AtMost(limit=limit, fmt="{:.2f}" if absolute else "{:+.2f}")
        return (claims.Claim(f"{statement}: within each run", source,
                             f"Spearman {rho} of the {QUANTITIES[quantity]} with test accuracy over one run's "
                             "checkpoints; per seed the mean over its runs (learning rates × sparsities)",
                             rule),
                claims.per_seed(run_rhos(points(traj, quantity), absolute).set_index("seed")["rho"]))

    def per_lr(statement, source, quantity, limit, absolute):
        out = []
        for lr in lrs:
            pts = points(traj[traj["lr"] == lr], quantity)
            out.append((claims.Claim(f"{statement}: pooled within learning rate {lr:g}", source,
                                     f"Spearman {'|ρ|' if absolute else 'ρ'} of the {QUANTITIES[quantity]} with "
                                     f"test accuracy, all checkpoints of the runs at learning rate {lr:g} "
                                     "(sparsities × seeds)",
                                     claims.Correlated(sign=-1.0, limit=limit, absolute=absolute,
                                                       fmt="{:.2f}" if absolute else "{:+.2f}")),
                        pts))
        return out

    distance = ("The distance between initial and trained weights is inconsistent with generalization during "
                "training", SOURCE, "weight_distance", 0.5, True)
    gap = ("The learning gap (the paper's: mean ‖φ_T − φ_S‖² of penultimate features, mature vs learning "
           "network) aligns with generalization", GAP_SOURCE, "learning_gap", -0.7, False)
    aligned = ("Our aligned learning gap (ridge-aligned relative residual; ours, not the paper's definition) "
               "aligns with generalization", SOURCE + " (the gap variant is ours, not the paper's)", "aligned_gap",
               -0.7, False)
    rows = []
    for spec in (distance, gap, aligned):
        if spec[2] in traj.columns:
            rows.append(within(*spec))
            rows += per_lr(*spec)
    t = _runs(traj)
    per_run = t.groupby(["seed", "run"]).apply(
        lambda g: -spearman(g["learning_gap"], g["test_accuracy"]) - abs(spearman(g["weight_distance"],
                                                                                   g["test_accuracy"])),
        include_groups=False)
    rows.append((claims.Claim("Within a run, the learning gap tracks test accuracy more closely than the weight "
                              "distance", GAP_SOURCE + " (our per-run reading)",
                              "per run: −ρ(paper's gap, accuracy) (the claimed direction) minus |ρ(weight distance, "
                              "accuracy)|; per seed the mean over its runs (learning rates × sparsities)",
                              claims.Exceeds(fmt="{:+.2f}", a_name="−ρ gap", b_name="|ρ distance|")),
                 claims.per_seed(per_run.droplevel("run"))))
    hist = results.get("histories")
    keys = ["student", "method", "sparsity", "seed"]
    settled = {} if hist is None or hist.empty else (
        claims.settled_table(hist, "test_accuracy", SETTLE_TOL, keys, "step")
        .set_index(keys)["settled"].to_dict())

    def paired(student, a, b):
        g = acc[(acc["student"] == student) & (acc["sparsity"] > 0)]
        pa = g[g["method"] == a].set_index(["sparsity", "seed"])["test_accuracy"]
        pb = g[g["method"] == b].set_index(["sparsity", "seed"])["test_accuracy"]
        idx = pa.index.intersection(pb.index).sort_values()
        diff = 100 * (pa.loc[idx] - pb.loc[idx])
        flags = [settled.get((student, m, sp, sd), False) for m in (a, b) for sp, sd in idx]
        return claims.Evidence(claims.per_seed(diff.droplevel("sparsity")), flags, SETTLE_TEXT)

    def claim(statement, source, measure):
        return claims.Claim(statement, source, measure, claims.AtLeast(limit=0.0, fmt="{:+.2f}", unit="pp"))

    for name in dict.fromkeys(acc["student"]):
        rows += [
            (claim(f"{name}: label-free LNPT beats supervised training", SOURCE,
                   "test accuracy (pp), LNPT minus supervised training of the same learning-gap mask; per seed "
                   "the mean over sparsities"),
             paired(name, "lnpt", "supervised")),
            (claim(f"{name}: label-free LNPT beats SNIP with labels", SOURCE + " (SNIP baseline: papers.md §5)",
                   "test accuracy (pp), LNPT minus SNIP; per seed the mean over sparsities"),
             paired(name, "lnpt", "snip")),
            (claim(f"{name}: the mature network guides pruning on unlabeled data (learning-gap mask beats "
                   "a random mask)", SOURCE,
                   "test accuracy (pp), gap mask minus random mask, both trained with labels; per seed the "
                   "mean over sparsities"),
             paired(name, "supervised", "random")),
        ]
        if "kd_only" in set(acc["method"]):
            rows.append((claim(f"{name}: closing the learning gap adds to distillation of the softened "
                               "outputs", SOURCE + " (our ablation of the reconstructed loss)",
                               "test accuracy (pp), label-free with minus without the gap term, same mask; per "
                               "seed the mean over sparsities"),
                         paired(name, "lnpt", "kd_only")))
    return claims.ledger(CHAPTER, rows, cfg.profile, cfg.results_dir, budget=cfg.budget)


# --- the page's closing summary -------------------------------------------------------------------------

def summary_text(cfg: Config, acc: pd.DataFrame, cor: pd.DataFrame, table: pd.DataFrame) -> str:
    """The chapter's closing summary in Markdown, every number from the run: the profile, the within-run and
    per-learning-rate correlations (:func:`correlations`), the pruned students' mean accuracy per method, and
    the verdicts of :func:`claims_table`."""
    def mean_acc(method, student=None):
        g = acc[(acc["method"] == method) & (acc["sparsity"] > 0)]
        if student is not None:
            g = g[g["student"] == student]
        return 100 * g["test_accuracy"].mean()

    runs = cor[cor["scope"] == "run"]
    lines = [f"This page was produced by the **{cfg.profile}** profile on **{cfg.dataset}** "
             f"(teacher {cfg.teacher}, {len(cfg.seeds)} seed(s), students trained for {cfg.epochs:g} epochs)."]
    if cfg.profile == "smoke":
        lines.append("The smoke profile trains for about one epoch: its numbers only show that the pipeline runs "
                     "and mean nothing about the method.")
    lines.append("")
    mean_rho = runs[[f"rho_{q}" for q in QUANTITIES]].mean()
    lines.append(f"**Correlations.** Within single runs ({len(runs)} runs), the mean Spearman ρ with test accuracy "
                 f"is {mean_rho.rho_weight_distance:+.2f} for the weight distance, {mean_rho.rho_learning_gap:+.2f} "
                 f"for the paper's learning gap and {mean_rho.rho_aligned_gap:+.2f} for our aligned gap.")
    for _, r in cor[cor["scope"] == "learning rate"].iterrows():
        lines.append(f"- learning rate {r.lr:g}, all checkpoints of its {int(r.runs)} runs: weight distance "
                     f"{r.rho_weight_distance:+.2f}, paper's gap {r.rho_learning_gap:+.2f}, aligned gap "
                     f"{r.rho_aligned_gap:+.2f}.")
    lines.append("")
    lines.append("**Accuracy** (test %, mean over sparsities and seeds of the pruned students):")
    for st in dict.fromkeys(acc["student"]):
        parts = [f"{METHOD_LABELS[m]} {mean_acc(m, st):.2f}" for m in METHODS + ABLATIONS
                 if (acc[(acc['student'] == st)]['method'] == m).any()]
        lines.append(f"- {st}: " + "; ".join(parts) + ".")
    verdicts = table.set_index("claim")["verdict"]
    lines.append("")
    lines.append("**Verdicts.** " + "; ".join(f"{c}: *{v}*" for c, v in verdicts.items()) + ".")
    return "\n".join(lines)
