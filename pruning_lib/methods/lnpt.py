"""LNPT, the method: the learning gap and label-free pruning and training (Xiao et al. 2024, arXiv 2403.12690).

The method only (no Store, no figures, no claims): chapter 6 (:mod:`pruning_lib.chapters.lnpt`) runs it and
judges the paper's claims. Only the paper's abstract could be read; the algorithm below is a reconstruction
(papers.md §5, marked [recon]):

* learning gap, **the paper's definition**: ``LG(T, S) = mean_x ||phi_T(x) - phi_S(x)||^2`` with ``phi`` the
  penultimate features (``model.forward_features``) of the mature network T and the learning network S
  (:func:`learning_gap` on models, :func:`raw_learning_gap` on stored features). It compares the two feature
  maps coordinate by coordinate, so it needs equal widths and it is *not* scale-free: features scaled by c
  give ``mean ||phi_T||^2 - 2c mean <phi_T, phi_S> + c^2 mean ||phi_S||^2``. The chapter's claims judge this
  quantity;
* label-free pruning at initialisation: the SNIP connection sensitivity ``|theta * dL_LF/dtheta|`` with the
  label-free loss ``L_LF`` in place of the labelled cross-entropy (:func:`label_free_scores`, computed by
  :func:`pruning_lib.methods.criteria.gradient_scores`, the same code as labelled SNIP);
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

:class:`GapProbe` logs the weight distance, the paper's gap and the aligned gap at every evaluation of a
training run (chapter 6's probed runs).

Labels are *withheld*, not merely unused: :func:`withhold_labels` replaces the student split's labels by a
:class:`WithheldLabels` placeholder that can be batched but raises :class:`LabelAccessError` on any read,
so the label-free runs would fail if anything in their path touched a label.
"""
from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as data_mod
from ..data import DataSplits, TensorSplit
from ..masks import prunable_names
from ..train import Callback, adam, cross_entropy, fit
from . import criteria


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
    in place of the labelled cross-entropy, by :func:`pruning_lib.methods.criteria.gradient_scores`."""
    return criteria.gradient_scores(student, loss, batches)


def snip_scores(student: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Labelled SNIP (Lee et al. 2019): ``|theta * dCE/dtheta|``."""
    return criteria.gradient_scores(student, cross_entropy, batches)


def random_weight_scores(student: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform random scores for every prunable weight of ``student`` (the random-mask baseline)."""
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
    optimizer = adam(params, lr=lr)
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

