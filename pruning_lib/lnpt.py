"""Chapter 6, LNPT: the learning gap and label-free pruning and training (Xiao et al. 2024, arXiv 2403.12690).

The paper's abstract makes three claims:

1. the distance between the initial and the trained weights, commonly taken to track generalization, is
   *inconsistent* with it during training;
2. the **learning gap**, a distance between the penultimate-layer feature maps of a mature network (the
   teacher, "on the cloud") and of the network that is learning (the student, "on the device"), *aligns*
   with generalization;
3. the mature network can guide both the **pruning** (at initialisation) and the **training** of a small
   network on *unlabeled* data, and this beats supervised training.

Only the abstract could be read; the algorithm below is a reconstruction (papers.md §5, marked [recon]):

* learning gap, **the paper's definition**: ``LG(T, S) = mean_x ||phi_T(x) - phi_S(x)||^2`` with ``phi`` the
  penultimate features (``model.forward_features``) of the mature network T and the learning network S
  (:func:`learning_gap` on models, :func:`raw_learning_gap` on stored features). It compares the two feature
  maps coordinate by coordinate, so it needs equal widths and it is *not* scale-free: features scaled by c
  give ``mean ||phi_T||^2 - 2c mean <phi_T, phi_S> + c^2 mean ||phi_S||^2``. The chapter's claims judge this
  quantity;
* label-free pruning at initialisation: the SNIP connection sensitivity ``|theta * dL_LF/dtheta|`` with the
  label-free loss ``L_LF`` in place of the labelled cross-entropy (:func:`label_free_scores`, computed by
  :func:`pruning_lib.criteria.gradient_scores`, the same code as labelled SNIP);
* label-free training: the pruned student minimises ``L_LF = gap_weight * LG / s_T + kd_weight * T^2 *
  KL(softmax(z_T / T) || softmax(z_S / T))`` (the gap plus distillation of the teacher's softened outputs)
  on a split whose labels it never sees (:class:`LabelFreeLoss`, :func:`train_label_free`); ``s_T`` is the
  teacher's mean squared feature norm on that split, so the loss's gap term has a fixed scale.

**Unequal widths in training** (our choice, not the paper's): when the student's penultimate width differs
from the teacher's (LeNet-300-100's 100 features against LeNet-5-Caffe's 500), the training loss uses
``||phi_T - P phi_S||^2`` with ``P`` a linear map (FitNets-style regressor) fitted by ridge regression at
initialisation (so the pruning score is the gradient of the *best-aligned* gap; by the envelope theorem
the optimal ``P`` may be held fixed when differentiating) and then trained jointly with the student; it is
a training aid, dropped afterwards and never pruned or counted.

**The aligned gap** (ours, reported beside the paper's): :func:`aligned_learning_gap` fits a ridge map from
the student's features to the teacher's on the student's unlabeled split and reports the relative residual
on held-out images: 0 when the student's features determine the teacher's linearly, 1 when they explain
nothing. It works for any widths and for students whose features no loss tied to the teacher's basis, but
it is invariant to any invertible linear change of the student's features, rescaling included: it does not
measure what the paper's gap measures, and the claims label it as ours.

**Probed runs** (:func:`trajectory_run`): the weight distance, the paper's gap and the aligned gap at every
checkpoint of runs that differ in learning rate, sparsity and seed. The probed student and its mature
network (``trajectory_teacher``) have equal penultimate widths, so the paper's gap needs no map. Their
correlations with test accuracy are judged within each run and pooled within each learning rate
(:func:`correlations`, :func:`claims_table`); pooling across learning rates and sparsities would mix runs
whose distances differ by construction.

Labels are *withheld*, not merely unused: :func:`withhold_labels` replaces the student split's labels by a
:class:`WithheldLabels` placeholder that can be batched but raises :class:`LabelAccessError` on any read,
so the label-free runs of this chapter would fail if anything in their path touched a label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import claims, criteria, plotting
from . import data as data_mod
from .data import DataSplits, TensorSplit
from .masks import apply_mask, mask_from_scores, prunable_names
from .models import MODELS, build_model
from .runs import ConfigError, RunConfig, Store, param, progress_bar
from .train import Callback, cross_entropy, default_device, evaluate, fit

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


# --- withheld labels ---------------------------------------------------------------------------------

class LabelAccessError(RuntimeError):
    """Label-free code tried to read labels it must never see."""


def _allowed_label_ops() -> tuple:
    t = torch.Tensor
    return (t.__len__, t.__getitem__, t.to, t.cpu, t.cuda, t.contiguous, t.size, t.dim, t.numel,
            t.shape.__get__, t.device.__get__, t.dtype.__get__, t.is_cuda.__get__, t.ndim.__get__)


class WithheldLabels(torch.Tensor):
    """A stand-in for a split's labels that can be sliced, indexed, measured and moved (so the batching
    code works unchanged) but raises :class:`LabelAccessError` on any operation that reads values.

    It holds placeholder zeros, never the real labels: the real labels are not even in memory.
    """

    @staticmethod
    def __new__(cls, n: int, device=None):
        return torch.zeros(int(n), dtype=torch.long, device=device).as_subclass(cls)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if any(func == ok for ok in _allowed_label_ops()):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            return out.as_subclass(cls) if isinstance(out, torch.Tensor) else out
        name = getattr(func, "__name__", repr(func))
        raise LabelAccessError(f"the labels of this split are withheld; label-free code called {name} on them")

    def __repr__(self) -> str:
        return f"WithheldLabels(n={self.shape[0]})"

    def __reduce_ex__(self, proto):
        raise LabelAccessError("withheld labels cannot be saved")


class _UnlabeledDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are ``(x, -1)``: for on-disk datasets (CIFAR), whose batches are
    collated by a DataLoader. ``-1`` is rejected by ``cross_entropy``, so a labelled loss fails here too."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], -1


def withhold_labels(split):
    """The split with its labels replaced by :class:`WithheldLabels` (in-memory) or ``-1`` (datasets)."""
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x, WithheldLabels(len(split.x), device=split.x.device))
    return _UnlabeledDataset(split)


def lnpt_splits(data: DataSplits, unlabeled_fraction: float, seed: int = 0) -> tuple[DataSplits, DataSplits]:
    """Split ``data.train`` into the teacher's labelled part and the student's part (``unlabeled_fraction``
    of it), disjoint and fixed by ``seed``; validation and test splits are shared. The student's part is
    returned *with* labels: the supervised baselines need them, label-free runs call :func:`withhold_labels`.
    """
    n = len(data.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    k = int(round(unlabeled_fraction * n))
    if not 0 < k < n:
        raise ValueError(f"unlabeled_fraction {unlabeled_fraction} leaves an empty split of {n} examples")
    student_idx, teacher_idx = perm[:k], perm[k:]

    def take(idx):
        if isinstance(data.train, TensorSplit):
            return TensorSplit(data.train.x[idx].contiguous(), data.train.y[idx].contiguous())
        return torch.utils.data.Subset(data.train, idx.tolist())

    def splits(train, role):
        return DataSplits(data.name, train, data.val, data.test, data.num_classes, data.input_shape,
                          {**data.info, "lnpt_role": role, "lnpt_size": len(train)})
    return splits(take(teacher_idx), "teacher"), splits(take(student_idx), "student")


def stack_inputs(split, n: int | None = None, batch_size: int = 500) -> torch.Tensor:
    """The first ``n`` inputs of a split as one tensor (labels are not read)."""
    if isinstance(split, TensorSplit):
        return split.x[:n] if n is not None else split.x
    xs, count = [], 0
    for x, _ in data_mod.batches(split, batch_size, num_workers=0):
        xs.append(x)
        count += len(x)
        if n is not None and count >= n:
            break
    return torch.cat(xs)[:n]


# --- features, the learning gap, the weight distance -------------------------------------------------

def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel wraps the model


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (the input of ``model.classifier``) and logits in one forward pass.

    The features are caught by a hook on the classifier so that the call goes through ``model(x)``, which
    also works for a ``DistributedDataParallel`` wrapper (its gradient synchronisation needs its forward).
    """
    caught = {}
    handle = _bare(model).classifier.register_forward_hook(lambda m, inp, out: caught.__setitem__("f", inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return caught["f"], logits


@torch.no_grad()
def penultimate_features(model: nn.Module, split_or_x, batch_size: int = 1000) -> torch.Tensor:
    """``model.forward_features`` of every input (eval mode, no gradient; mode restored), on CPU."""
    was = model.training
    model.eval()
    x_all = split_or_x if isinstance(split_or_x, torch.Tensor) else stack_inputs(split_or_x)
    device = next(model.parameters()).device
    out = [_bare(model).forward_features(x_all[i:i + batch_size].to(device)).cpu()
           for i in range(0, len(x_all), batch_size)]
    model.train(was)
    return torch.cat(out)


def learning_gap(teacher: nn.Module, student: nn.Module, x: torch.Tensor,
                 projection: nn.Module | None = None) -> torch.Tensor:
    """The learning gap ``mean_x ||phi_T(x) - P phi_S(x)||^2`` on the batch ``x`` (papers.md §5 [recon]).

    ``phi`` is ``forward_features`` (the penultimate layer); the teacher is evaluated without gradient,
    the gradient flows into the student (and ``projection``). ``projection=None`` compares the feature
    maps directly, which needs equal widths.
    """
    with torch.no_grad():
        ft = _bare(teacher).forward_features(x)
    fs = _bare(student).forward_features(x)
    if projection is not None:
        fs = projection(fs)
    if fs.shape != ft.shape:
        raise ValueError(f"student features {tuple(fs.shape)} and teacher features {tuple(ft.shape)} differ: "
                         "pass a projection (see make_projection)")
    return (ft - fs).pow(2).sum(1).mean()


def raw_learning_gap(teacher_features: torch.Tensor, student_features: torch.Tensor) -> float:
    """The paper's learning gap on stored penultimate features: ``mean_x ||phi_T(x) - phi_S(x)||^2``
    (papers.md §5), with no alignment, so it changes with the scale of either network's features.
    Raises ``ValueError`` when the widths differ (the paper's gap is then undefined)."""
    if teacher_features.shape != student_features.shape:
        raise ValueError(f"the paper's learning gap compares feature maps of equal shape; got teacher "
                         f"{tuple(teacher_features.shape)} and student {tuple(student_features.shape)}")
    return float((teacher_features.double() - student_features.double()).pow(2).sum(1).mean())


def fit_ridge(fs: torch.Tensor, ft: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares map ``ft ≈ fs @ W.T + b`` with a ridge ``ridge * mean eigenvalue`` (float64 solve).

    Returns ``(W [d_t, d_s], b [d_t])``, the parameters of an ``nn.Linear(d_s, d_t)``.
    """
    fs, ft = fs.double(), ft.double()
    mu_s, mu_t = fs.mean(0), ft.mean(0)
    a, c = fs - mu_s, ft - mu_t
    gram = a.T @ a
    lam = ridge * float(torch.trace(gram)) / max(gram.shape[0], 1) + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ c).T
    b = mu_t - w @ mu_s
    return w.float(), b.float()


def aligned_learning_gap(teacher_fit: torch.Tensor, student_fit: torch.Tensor, teacher_eval: torch.Tensor,
                         student_eval: torch.Tensor, ridge: float = 1e-3) -> float:
    """The learning gap after the best linear alignment, relative to the teacher's feature variance.

    The ridge map from student to teacher features is fitted on ``*_fit`` (the student's unlabeled
    split) and evaluated on ``*_eval`` (held-out images): ``mean ||phi_T - (W phi_S + b)||^2 /
    mean ||phi_T - mean phi_T||^2``. Works for any two widths and for students trained without any tie to
    the teacher's feature basis; 0 when the student's features determine the teacher's linearly.
    """
    w, b = fit_ridge(student_fit, teacher_fit, ridge)
    resid = teacher_eval - (student_eval @ w.T + b)
    spread = teacher_eval - teacher_eval.mean(0)
    return float(resid.pow(2).sum(1).mean() / spread.pow(2).sum(1).mean().clamp_min(1e-12))


def weight_distance(model: nn.Module, initial: dict[str, torch.Tensor], names: Iterable[str] | None = None
                    ) -> float:
    """``||theta_t - theta_0||_2`` over the prunable weights (the paper's "distance between initialized and
    trained weights"); ``initial`` holds ``theta_0`` (after the pruning mask, so pruned weights count 0)."""
    params = dict(model.named_parameters())
    names = list(initial) if names is None else list(names)
    sq = sum(float((params[n].detach().cpu() - initial[n].cpu()).pow(2).sum()) for n in names)
    return math.sqrt(sq)


def snapshot(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    names = prunable_names(model) if names is None else names
    return {n: params[n].detach().cpu().clone() for n in names}


# --- the teacher's outputs -----------------------------------------------------------------------------

class TeacherOutputs:
    """The mature network's penultimate features and logits for a batch, without gradient.

    With ``cache_x`` (the student's in-memory split) every output is computed once, up front, as if the
    cloud sent its answers for the device's data once; a batch is then found by a fingerprint of each row
    and *verified* to be the very same images, else the teacher runs. Exact either way.
    """

    def __init__(self, teacher: nn.Module, cache_x: torch.Tensor | None = None, batch_size: int = 1000):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.device = next(teacher.parameters()).device
        self.hits = self.misses = 0
        self._x = None
        if cache_x is not None:
            x = cache_x.to(self.device)
            feats, logits = [], []
            with torch.no_grad():
                for i in range(0, len(x), batch_size):
                    f, z = features_and_logits(self.teacher, x[i:i + batch_size])
                    feats.append(f)
                    logits.append(z)
            self._x, self._f, self._z = x, torch.cat(feats), torch.cat(logits)
            self._r = torch.randn(x[0].numel(), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64).to(self.device)
            fp = self._fingerprint(x)
            self._fp_sorted, self._order = torch.sort(fp)

    def _fingerprint(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self._r

    @property
    def feature_dim(self) -> int:
        return int(self._f.shape[1]) if self._x is not None else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is not None and x.device == self._x.device and x.shape[1:] == self._x.shape[1:]:
            pos = torch.searchsorted(self._fp_sorted, self._fingerprint(x)).clamp(max=len(self._order) - 1)
            idx = self._order[pos]
            if torch.equal(self._x[idx], x):
                self.hits += 1
                return self._f[idx], self._z[idx]
        self.misses += 1
        with torch.no_grad():
            return features_and_logits(self.teacher, x.to(self.device))

    def mean_sq_norm(self, x: torch.Tensor | None = None) -> float:
        """``mean_x ||phi_T(x)||^2`` over the cached split (or ``x``): the gap's scale."""
        f = self._f if x is None else self(x)[0]
        return float(f.pow(2).sum(1).mean())


def make_projection(student_dim: int, teacher_dim: int) -> nn.Module | None:
    """``None`` (compare feature maps directly) for equal widths, else a trainable ``nn.Linear``."""
    return None if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


def student_feature_dim(model: nn.Module) -> int:
    return int(_bare(model).classifier.in_features)


class LabelFreeLoss:
    """``loss_fn(model, x, y)`` of label-free training and scoring; it never reads ``y``.

    ``L_LF = gap_weight * LG / gap_scale + kd_weight * T^2 * KL(softmax(z_T/T) || softmax(z_S/T))``:
    the learning gap (scale-free with ``gap_scale = mean ||phi_T||^2``) plus distillation of the teacher's
    softened outputs (Hinton et al. 2015). ``projection`` maps student features to the teacher's width.
    """

    def __init__(self, teacher: TeacherOutputs, *, projection: nn.Module | None = None, gap_weight: float = 1.0,
                 kd_weight: float = 1.0, temperature: float = 4.0, gap_scale: float = 1.0):
        self.teacher, self.projection = teacher, projection
        self.gap_weight, self.kd_weight, self.temperature = gap_weight, kd_weight, temperature
        self.gap_scale = gap_scale

    def __call__(self, model: nn.Module, x: torch.Tensor, y=None) -> torch.Tensor:
        del y  # label-free: the labels are never read (a WithheldLabels would raise if they were)
        ft, zt = self.teacher(x)
        fs, zs = features_and_logits(model, x)
        if self.projection is not None:
            fs = self.projection(fs)
        loss = x.new_zeros(())
        if self.gap_weight:
            loss = loss + self.gap_weight * (ft - fs).pow(2).sum(1).mean() / self.gap_scale
        if self.kd_weight:
            t = self.temperature
            kd = F.kl_div(F.log_softmax(zs / t, 1), F.log_softmax(zt / t, 1), log_target=True,
                          reduction="batchmean")
            loss = loss + self.kd_weight * t * t * kd
        return loss


def init_projection(student: nn.Module, teacher: TeacherOutputs, x: torch.Tensor, ridge: float = 1e-3
                    ) -> nn.Module | None:
    """The projection for ``student``: ``None`` for equal widths, else an ``nn.Linear`` initialised by the
    ridge fit of the teacher's features on the student's (at the student's current weights) on ``x``."""
    proj = make_projection(student_feature_dim(student), int(teacher(x[:1].to(teacher.device))[0].shape[1]))
    if proj is None:
        return None
    with torch.no_grad():
        was = student.training
        student.eval()
        fs = _bare(student).forward_features(x.to(teacher.device))
        student.train(was)
        ft = teacher(x.to(teacher.device))[0]
        w, b = fit_ridge(fs.cpu(), ft.cpu())
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    return proj.to(teacher.device)


def label_free_scores(student: nn.Module, loss: LabelFreeLoss, batches: Iterable) -> dict[str, torch.Tensor]:
    """LNPT's pruning score: SNIP's ``|theta * dL/dtheta|`` with the label-free loss (gap + distillation)
    in place of the labelled cross-entropy, by :func:`pruning_lib.criteria.gradient_scores`."""
    return criteria.gradient_scores(student, loss, batches)


def snip_scores(student: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Labelled SNIP (Lee et al. 2019): ``|theta * dCE/dtheta|``."""
    return criteria.gradient_scores(student, cross_entropy, batches)


def random_scores(student: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    params = dict(student.named_parameters())
    return {n: torch.rand(params[n].shape, generator=generator) for n in prunable_names(student)}


def train_label_free(student: nn.Module, teacher: TeacherOutputs, data: DataSplits, *,
                     projection: nn.Module | None = None, gap_weight: float = 1.0, kd_weight: float = 1.0,
                     temperature: float = 4.0, gap_scale: float | None = None, lr: float = 1e-3,
                     **fit_kwargs) -> pd.DataFrame:
    """Train ``student`` to close the learning gap (and match the softened outputs) on ``data.train``
    without its labels, with :func:`pruning_lib.train.fit`. The labels are withheld first, so any read
    raises; validation and test accuracy are still measured with labels (that is evaluation, not training).
    """
    unlabeled = DataSplits(data.name, withhold_labels(data.train), data.val, data.test, data.num_classes,
                           data.input_shape, data.info)
    if gap_scale is None:
        gap_scale = teacher.mean_sq_norm() if teacher.feature_dim else 1.0
    loss = LabelFreeLoss(teacher, projection=projection, gap_weight=gap_weight, kd_weight=kd_weight,
                         temperature=temperature, gap_scale=gap_scale)
    params = list(student.parameters()) + (list(projection.parameters()) if projection is not None else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    return fit(student, unlabeled, optimizer=optimizer, loss_fn=loss, **fit_kwargs)


# --- probing runs: weight distance and learning gap over training -----------------------------------

class GapProbe(Callback):
    """Logs, at every evaluation of ``fit``: ``weight_distance``; ``learning_gap``, the paper's gap
    (:func:`raw_learning_gap` on the held-out images ``eval_x``); and ``aligned_gap``, ours
    (:func:`aligned_learning_gap`, ridge map fitted on ``fit_x``, residual on ``eval_x``)."""

    def __init__(self, initial: dict[str, torch.Tensor], fit_x: torch.Tensor, eval_x: torch.Tensor,
                 teacher_fit: torch.Tensor, teacher_eval: torch.Tensor):
        self.initial, self.fit_x, self.eval_x = initial, fit_x, eval_x
        self.teacher_fit, self.teacher_eval = teacher_fit, teacher_eval

    def log(self, state) -> dict[str, float]:
        model = state.model
        fs_eval = penultimate_features(model, self.eval_x)
        return {"weight_distance": weight_distance(model, self.initial),
                "learning_gap": raw_learning_gap(self.teacher_eval, fs_eval),
                "aligned_gap": aligned_learning_gap(self.teacher_fit, penultimate_features(model, self.fit_x),
                                                    self.teacher_eval, fs_eval)}


def feature_scaling(teacher_fit: torch.Tensor, teacher_eval: torch.Tensor, student_fit: torch.Tensor,
                    student_eval: torch.Tensor, factors: Iterable[float] = (1.0, 10.0)) -> pd.DataFrame:
    """The paper's gap and the aligned gap when the student's features are multiplied by each factor
    (what a rescaled last hidden layer does to a ReLU network): the paper's gap moves, the aligned one
    does not. One row per factor, with each gap's ratio to its value at the first factor."""
    rows = [{"factor": c, "learning_gap": raw_learning_gap(teacher_eval, c * student_eval),
             "aligned_gap": aligned_learning_gap(teacher_fit, c * student_fit, teacher_eval, c * student_eval)}
            for c in factors]
    out = pd.DataFrame(rows)
    for col in ("learning_gap", "aligned_gap"):
        out[f"{col}_ratio"] = out[col] / out[col].iloc[0]
    return out


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
    return dict(dataset=cfg.dataset, unlabeled_fraction=cfg.unlabeled_fraction, teacher=name or cfg.teacher,
                epochs=cfg.teacher_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=0, optimizer="adam")


def _mature(cfg: Config, name: str, data: DataSplits, teacher_data: DataSplits, student_data: DataSplits,
            fit_x: torch.Tensor, eval_x: torch.Tensor, device, progress: bool) -> Mature:
    """Train (or load from the Store) the mature network ``name`` with labels on the teacher's split."""
    spec = teacher_spec(cfg, name)
    store = Store(cfg.results_dir, "lnpt/teacher", spec)
    teacher = _build(cfg, name, data, 0)

    def train_teacher():
        h = fit(teacher, teacher_data, epochs=cfg.teacher_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=0,
                eval_every=data_mod.num_batches(teacher_data.train, cfg.batch_size), progress=progress,
                desc=f"teacher {name}")
        return {"state": {k: v.cpu() for k, v in teacher.state_dict().items()}, "history": h.to_dict("list")}

    saved = store.torch("teacher", train_teacher)
    teacher.load_state_dict(saved["state"])
    teacher.to(device)
    cache_x = student_data.train.x if isinstance(student_data.train, TensorSplit) else None
    return Mature(name, teacher, TeacherOutputs(teacher, cache_x), pd.DataFrame(saved["history"]), spec,
                  penultimate_features(teacher, fit_x), penultimate_features(teacher, eval_x))


def prepare(cfg: Config, progress: bool = False) -> Context:
    """Load the data, split it, and train (or load from the Store) the teacher and the probed runs' mature
    network, once each, with labels on the teacher's split. Refuses a probed student whose penultimate width
    differs from its mature network's: the paper's gap would be undefined."""
    device = default_device()
    data = data_mod.load_dataset(cfg.dataset, root=cfg.data_root)
    teacher_data, student_data = lnpt_splits(data, cfg.unlabeled_fraction)
    probed = student_feature_dim(_build(cfg, cfg.trajectory_student, data, 0))
    mature = student_feature_dim(_build(cfg, cfg.trajectory_teacher, data, 0))
    if probed != mature:
        raise ConfigError(f"parameters 'trajectory_student' and 'trajectory_teacher': the paper's learning gap "
                          f"compares penultimate features of equal width, but {cfg.trajectory_student} has "
                          f"{probed} and {cfg.trajectory_teacher} has {mature}")
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
            scores = random_scores(student, torch.Generator().manual_seed(seed))
        else:
            raise ValueError(f"unknown criterion {criterion!r}")
        apply_mask(student, mask_from_scores(scores, sparsity, scope="global"))
    if kd_only:
        loss.gap_weight, projection = 0.0, None
        loss.projection = None
    return student, projection, loss


def _density(model: nn.Module) -> float:
    params = dict(model.named_parameters())
    names = prunable_names(model)
    return sum(int((params[n] != 0).sum()) for n in names) / sum(params[n].numel() for n in names)


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
                          "seed": seed, "density": _density(student), "test_accuracy": last["test_accuracy"],
                          "val_accuracy": last["val_accuracy"], "aligned_gap": gap,
                          "label_free": label_free, "steps": int(last["step"]), "seconds": last["seconds"]}]), h


def _unit_spec(ctx: Context, teacher: Mature | None = None, **kw) -> dict:
    cfg = ctx.cfg
    common = dict(teacher=(teacher or ctx.teacher).spec, batch_size=cfg.batch_size,
                  score_batches=cfg.score_batches, temperature=cfg.temperature, gap_weight=cfg.gap_weight,
                  kd_weight=cfg.kd_weight, probe_samples=cfg.probe_samples)
    return {**common, **kw}


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every unit of the chapter, each cached in its own Store entry (the teachers, each probed run, each
    (student, method, sparsity, seed)); returns frames ``teacher`` (its history), ``trajectories``,
    ``accuracy``, ``histories`` (the accuracy units'), ``splits`` and ``feature_scaling`` (the two gaps of
    a freshly initialised probed student whose features are scaled, :func:`feature_scaling`)."""
    torch.manual_seed(0)
    ctx = prepare(cfg, progress=False)
    root = cfg.results_dir
    units: list[tuple[str, dict, Callable[[], pd.DataFrame]]] = []
    for seed in cfg.seeds:
        for lr in cfg.trajectory_lrs:
            for s in cfg.trajectory_sparsities:
                # probes="raw+aligned": the paper's gap and ours are both logged (older entries had one gap)
                spec = _unit_spec(ctx, ctx.probe_teacher, kind="trajectory", student=cfg.trajectory_student,
                                  lr=lr, sparsity=s, seed=seed, epochs=cfg.trajectory_epochs,
                                  probes_per_epoch=cfg.probes_per_epoch, training=cfg.trajectory_training,
                                  probes="raw+aligned")
                units.append(("trajectories", spec, lambda lr=lr, s=s, seed=seed: trajectory_run(ctx, lr, s, seed)))
    methods = [(m, s) for s in cfg.sparsities for m in cfg.methods]
    if cfg.dense_reference:
        methods = [(m, 0.0) for m in DENSE_METHODS] + methods
    for name, width in cfg.student_specs():
        for seed in cfg.seeds:
            for m, s in methods:
                # evaluated="epoch": the history has a point per epoch, so settling can be judged
                spec = _unit_spec(ctx, kind="accuracy", student=name, width=width, method=m, sparsity=s,
                                  seed=seed, epochs=cfg.epochs, lr=cfg.lr, evaluated="epoch")
                units.append(("accuracy", spec, lambda name=name, m=m, s=s, seed=seed, width=width:
                              accuracy_run(ctx, name, m, s, seed, width)))
    out: dict[str, list] = {"trajectories": [], "accuracy": [], "histories": []}
    for kind, spec, compute in progress_bar(units, desc="LNPT units", progress=progress):
        store = Store(root, f"lnpt/{kind}", spec)
        if kind == "accuracy":
            if not (store.exists("result.csv") and store.exists("history.csv")):
                row, hist = compute()
                store.save_frame("history", hist)
                store.save_frame("result", row)
            row = store.frame("result")
            out["accuracy"].append(row)
            out["histories"].append(store.frame("history").assign(
                **{k: row[k].iloc[0] for k in ("student", "method", "sparsity", "seed")}))
        else:
            out[kind].append(store.frame("result", compute))
    teacher_acc = evaluate(ctx.teacher.model, ctx.data.test)["accuracy"]
    probe_acc = evaluate(ctx.probe_teacher.model, ctx.data.test)["accuracy"]
    fresh = _build(cfg, cfg.trajectory_student, ctx.data, 0).to(ctx.device)
    scaling = feature_scaling(ctx.probe_teacher.fit, ctx.probe_teacher.eval, penultimate_features(fresh, ctx.fit_x),
                              penultimate_features(fresh, ctx.eval_x))
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

def plot_trajectories(traj: pd.DataFrame):
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


def plot_accuracy(acc: pd.DataFrame, teacher_accuracy: float | None = None):
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
