"""Consensus sub-networks with polarization-regularized binary gates (Zhi et al. 2023, arXiv 2302.10798).

Chapter ``05_polarization``.  The method, as far as the paper's public text describes it [abs] and as we
reconstruct the rest [recon]:

* **Binary gates from a small gating module** [abs].  Every prunable channel group (and, in ResNets, every
  residual block) gets a :class:`GatingModule`: global-average-pooled features -> ``Linear -> ReLU -> Linear``
  -> logits ``a``; the gate is ``g = 1[sigmoid(a) > 1/2]`` per input.  The gate sits in the group's
  :class:`~pruning_lib.gates.GateSlot` (after the norm, before the ReLU).
* **Straight-through estimator** [abs]: the forward pass uses the binary ``g``, the backward pass the
  gradient of ``p = sigmoid(a)`` (:func:`straight_through`).
* **Density loss** [recon]: ``L_d = lambda_d * mean_l (rho_l - (1 - s))^2`` where ``rho_l`` is the mean gate
  value of channel group ``l`` over the batch and its channels and ``s`` the user-set sparsity
  (:func:`density_loss`; ``scope="global"`` pools all gates, ``"weighted"`` weights each gate by the
  connections it switches off).  In the default per-layer scope block gates are not pulled to the target;
  a block goes only when its inputs agree it should.
* **Polarizer** [abs, form recon]: drives every gate's *mean over inputs* ``m_c = mean_n g_{n,c}`` to 0 or 1,
  so that all inputs agree on every gate (the "consensus").  The paper's text available to us (abstract and
  third-party summaries of arXiv 2302.10798) names a "polarizing loss" but we could not read its equation;
  our default is the simplest function with the required shape, ``R(m) = mean_c m_c (1 - m_c)``
  (:func:`polarizer`, ``form="product"``): zero exactly at ``m = 0`` and ``m = 1``, maximal at 1/2.  Zhuang et
  al. (2020, "Neuron-level structured pruning using polarization regularizer", Eq. 2; reference code
  ``bn_sparsity``) use ``R(m) = t ||m||_1 - ||m - mean(m)||_1`` on BN scales in [0, 1] (ResNet-56:
  ``lambda = 5e-5``, ``t = 1.4``); it is available as ``form="zhuang"``.
* **Static sub-network** [abs]: after the single training pass, a gate whose mean over the training inputs is
  below 1/2 is agreed "off"; those channels (and blocks) are removed by :func:`pruning_lib.compact.compact`
  and :func:`pruning_lib.compact.remove_blocks`, and the gating modules are dropped.  With a polarized
  consensus the static network computes what the gated one does for (almost) every input.

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

from . import claims as claims_mod
from .claims import AtLeast, AtMost, Claim, Exceeds
from .compact import compact, remove_blocks
from .data import batches, load_dataset
from .gates import GateSlot, scale_channels, set_block_gates, set_gates
from .metrics import layer_flops
from .models import build_model
from .runs import Executor, RunConfig, Store, in_worker, map_units, param, parse_executor, progress_bar
from .timing import best_forward_seconds
from .train import Callback, cross_entropy, evaluate, fit

CHAPTER = "05_polarization"
METHODS = ("polarization", "magnitude", "random")

__all__ = [
    "CHAPTER", "Config", "GatingModule", "straight_through", "add_gating", "gating_modules", "density_loss",
    "polarizer", "polarization_penalty", "gate_statistics", "static_keep", "keep_sparsity", "compact_static", "set_mode",
    "TrainFlops", "connections", "train_gated", "run_experiment", "plot_sweep", "plot_gate_histograms",
    "plot_consensus", "plot_compute", "sweep_table", "latency_table", "claims_table", "training_step_seconds",
    "lr_scheduler", "gated_optimizer", "gated_penalties",
]


# --------------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------------


class _BinaryGate(torch.autograd.Function):
    """Forward ``1[a > 0]``; backward the sigmoid's slope at ``clamp(a, -bound, bound)``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.bound = bound
        return (a > 0).to(a.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a,) = ctx.saved_tensors
        if ctx.bound != math.inf:  # clamp(a, -inf, inf) is a (NaN and -0.0 included): skip that pass
            a = a.clamp(-ctx.bound, ctx.bound)
        s = torch.sigmoid(a)
        return grad * s * (1 - s), None


def straight_through(logits: torch.Tensor, bound: float = math.inf) -> torch.Tensor:
    """Binary gate ``1[sigmoid(a) > 1/2] = 1[a > 0]`` in the forward pass; in the backward pass the gradient
    of ``sigmoid(a)`` (the straight-through estimator).

    ``bound < inf`` evaluates that slope at ``a`` clamped to ``[-bound, bound]``, so that saturated gates keep
    a gradient of at least ``sigmoid'(bound)``.  The default is the plain slope: in our MNIST runs the clamp
    let the density loss push hard through every gate into the backbone and training collapsed.
    """
    return _BinaryGate.apply(logits, bound)


class GatingModule(nn.Module):
    """Per-input binary gates for ``channels`` channels (or one gate for a whole block, ``out=1``).

    ``pooled(x) -> Linear(C, hidden) -> ReLU -> Linear(hidden, out) -> sigmoid -> > 1/2`` with the
    straight-through estimator (Zhi et al. 2023, Sec. 3 [recon]).  ``mode``:

    * ``"dynamic"`` (training, and the gated network at test time): per-input gates ``[N, out]``; the last
      ones are kept in ``self.last_gate`` (STE values, with gradient) for the density loss and the polarizer.
    * ``"static"``: the consensus gates in the buffer ``static_mask`` ``[out]`` (what compaction removes).

    ``init_bias`` starts every gate open (``sigmoid(1) = 0.73``) so training begins from the dense network.
    """

    def __init__(self, channels: int, out: int | None = None, hidden: int | None = None, init_bias: float = 1.0):
        super().__init__()
        self.channels = int(channels)
        self.out = self.channels if out is None else int(out)
        hidden = hidden or int(min(64, max(4, channels // 4)))
        self.net = nn.Sequential(nn.Linear(self.channels, hidden), nn.ReLU(), nn.Linear(hidden, self.out))
        nn.init.constant_(self.net[-1].bias, init_bias)
        self.register_buffer("static_mask", torch.ones(self.out))
        self.cost = 1.0  # connections one of its gates switches off (set by add_gating; density weighting)
        self.mode = "dynamic"
        self.last_gate: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        return self.net(pooled)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "static":
            z = self.static_mask.to(x.dtype)
            return scale_channels(x, z if self.out > 1 else z.reshape(()))
        g = straight_through(self.logits(x))
        self.last_gate = g
        if self.out == 1:  # block gate: one value per input, broadcast over the branch's channels
            g = g.expand(-1, x.shape[1])
        return scale_channels(x, g)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out={self.out}, mode={self.mode}"


def add_gating(model: nn.Module, block_gates: bool = True, init_bias: float = 1.0) -> dict[str, GatingModule]:
    """Put a :class:`GatingModule` in every channel-group slot (and every residual block's ``branch_slot``
    when ``block_gates``).  Returns them by name (group names; block paths prefixed ``"block:"``)."""
    out: dict[str, GatingModule] = {}
    gates = {}
    for g in model.channel_groups():
        slot = model.get_submodule(g.slot)
        gates[g.name] = GatingModule(slot.channels, init_bias=init_bias)
        gates[g.name].cost = float(_channel_cost(model, g))
    set_gates(model, gates)
    out.update(gates)
    if block_gates and model.residual_blocks():
        bg = {}
        for path in model.residual_blocks():
            block = model.get_submodule(path)
            bg[path] = GatingModule(block.branch_slot.channels, out=1, init_bias=init_bias)
            bg[path].cost = float(sum(m.weight.numel() for n, m in block.named_modules()
                                      if isinstance(m, nn.Conv2d) and not n.startswith("downsample")))
        set_block_gates(model, bg)
        out.update({f"block:{k}": v for k, v in bg.items()})
    return out


def _channel_cost(model: nn.Module, group) -> int:
    """Connections attached to one channel of ``group``: its producer's filter plus its consumers' inputs."""
    w = model.get_submodule(group.producer).weight
    cost = w[0].numel()
    for path in group.consumers:
        m = model.get_submodule(path)
        if isinstance(m, nn.Conv2d):
            cost += m.weight.shape[0] * m.weight[0, 0].numel()
        elif isinstance(m, nn.Linear):
            cost += m.out_features * group.spatial
    return cost


def gating_modules(model: nn.Module) -> dict[str, GatingModule]:
    """The gating modules in ``model``'s slots, by name (channel groups, then ``"block:<path>"``)."""
    out = {}
    for g in model.channel_groups():
        gate = model.get_submodule(g.slot).gate
        if isinstance(gate, GatingModule):
            out[g.name] = gate
    for path in model.residual_blocks():
        block = model.get_submodule(path)
        slot = getattr(block, "branch_slot", None)
        if isinstance(slot, GateSlot) and isinstance(slot.gate, GatingModule):
            out[f"block:{path}"] = slot.gate
    return out


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every gating module to ``"dynamic"`` (per-input) or ``"static"`` (consensus mask) gates."""
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    for gm in gating_modules(model).values():
        gm.mode = mode


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------


def density_loss(model: nn.Module, target_sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Squared distance of the gate density to ``1 - s``, from the last forward's STE gate values [recon].

    * ``"layer"``: ``mean_l (rho_l - (1 - s))^2``, every channel group pulled to the target (block gates are
      left to the polarizer and the task loss);
    * ``"global"``: ``(rho - (1 - s))^2`` with all gates pooled (one vote per gate);
    * ``"weighted"``: as global, but each gate weighted by the connections it switches off
      (:attr:`GatingModule.cost`), so the target is (to first order) a fraction of connections.
    """
    gms = [gm for gm in gating_modules(model).values() if gm.last_gate is not None]
    if not gms:
        raise RuntimeError("density_loss: no gate values recorded; run a forward pass in dynamic mode first")
    target = 1.0 - target_sparsity
    if scope == "layer":
        # Block gates are single gates: pulling each to a density of 1 - s would fight the polarizer, so in
        # this scope the channel gates carry the target and a block goes only when its inputs agree it is off.
        chans = [gm for gm in gms if gm.out > 1] or gms
        return torch.stack([(gm.last_gate.mean() - target) ** 2 for gm in chans]).mean()
    if scope in ("global", "weighted"):
        w = [gm.cost if scope == "weighted" else 1.0 for gm in gms]
        total = sum(wi * gm.last_gate.sum(1).mean() for wi, gm in zip(w, gms))
        count = sum(wi * gm.out for wi, gm in zip(w, gms))
        return (total / count - target) ** 2
    raise ValueError(f"scope must be 'layer', 'global' or 'weighted', got {scope!r}")


def polarizer(m: torch.Tensor, form: str = "product", t: float = 1.4) -> torch.Tensor:
    """Polarization of gate means ``m`` (each in [0, 1]).

    * ``"product"`` (default, our reconstruction): ``mean_c m_c (1 - m_c)``; 0 exactly when every
      ``m_c`` is 0 or 1, largest (1/4) at 1/2.
    * ``"zhuang"``: Zhuang et al. (2020), Eq. 2, per element: ``t * mean|m| - mean|m - mean(m)|``; for a fixed
      ``mean(m)`` it is smallest when the ``m_c`` split into 0s and one common value.
    """
    if form == "product":
        return (m * (1 - m)).mean()
    if form == "zhuang":
        return t * m.abs().mean() - (m - m.mean()).abs().mean()
    raise ValueError(f"polarizer form must be 'product' or 'zhuang', got {form!r}")


def polarization_penalty(model: nn.Module, form: str = "product", t: float = 1.4) -> torch.Tensor:
    """Mean over gating modules of :func:`polarizer` applied to each gate's mean over the batch's inputs."""
    gms = [gm for gm in gating_modules(model).values() if gm.last_gate is not None]
    if not gms:
        raise RuntimeError("polarization_penalty: no gate values recorded; run a forward pass first")
    return torch.stack([polarizer(gm.last_gate.mean(0), form, t) for gm in gms]).mean()


# --------------------------------------------------------------------------------------------------------
# Gate statistics, static sub-network, compaction
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gate_statistics(model: nn.Module, split, batch_size: int = 500) -> pd.DataFrame:
    """Per gate: its mean over the inputs of ``split`` (dynamic gates, eval mode) and the agreement
    ``max(m, 1 - m)``, the fraction of inputs that agree with the majority decision (the "consensus")."""
    from .data import batches

    was_training = model.training
    model.eval()
    set_mode(model, "dynamic")
    gms = gating_modules(model)
    sums = {k: 0.0 for k in gms}
    n = 0
    device = next(model.parameters()).device
    for x, _ in batches(split, batch_size, device=device):
        model(x)
        for k, gm in gms.items():
            sums[k] = sums[k] + gm.last_gate.detach().sum(0)
        n += len(x)
    model.train(was_training)
    rows = []
    for k, gm in gms.items():
        mean = (sums[k] / max(n, 1)).cpu()
        for c, m in enumerate(mean.tolist()):
            rows.append({"gate": k, "kind": "block" if k.startswith("block:") else "channel", "index": c,
                         "mean": m, "agreement": max(m, 1 - m)})
    return pd.DataFrame(rows)


def static_keep(stats: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Consensus decisions from :func:`gate_statistics`: gate name -> bool tensor (mean >= 1/2 keeps)."""
    return {k: torch.tensor((g.sort_values("index")["mean"] >= 0.5).to_numpy())
            for k, g in stats.groupby("gate", sort=False)}


def keep_sparsity(model: nn.Module, keep: dict[str, torch.Tensor], scope: str = "layer") -> float:
    """Sparsity of the consensus gates measured as the density loss measures it (``scope``), i.e. the
    quantity whose target the user set."""
    gms = gating_modules(model)
    closed = {k: (~keep[k]).float() for k in gms}
    if scope == "layer":
        chans = [k for k, gm in gms.items() if gm.out > 1] or list(gms)
        return float(np.mean([float(closed[k].mean()) for k in chans]))
    w = {k: (gm.cost if scope == "weighted" else 1.0) for k, gm in gms.items()}
    return float(sum(w[k] * float(closed[k].sum()) for k in gms) / sum(w[k] * gms[k].out for k in gms))


def apply_static(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Load consensus decisions into the gating modules' ``static_mask`` and switch them to static mode."""
    for k, gm in gating_modules(model).items():
        gm.static_mask.copy_(keep[k].to(gm.static_mask))
    set_mode(model, "static")


def compact_static(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The physically smaller network: channels agreed off removed (:func:`~pruning_lib.compact.compact`),
    blocks agreed off replaced by their shortcut (:func:`~pruning_lib.compact.remove_blocks`), gates dropped.

    Equals ``model`` with static gates (:func:`apply_static`) in eval mode."""
    channel_keep = {k: v for k, v in keep.items() if not k.startswith("block:")}
    removed = [k[len("block:"):] for k, v in keep.items() if k.startswith("block:") and not bool(v.any())]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an emptied group keeps one zeroed channel (documented)
        small = compact(model, channel_keep)
    return remove_blocks(small, removed) if removed else small


def connections(model: nn.Module) -> int:
    """Number of connections: weights of every Conv/Linear layer (biases and norms excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _flops(model: nn.Module, input_shape) -> int:
    return int(sum(layer_flops(model, tuple(input_shape)).values()))


def _strip_gates(model: nn.Module) -> nn.Module:
    from .gates import clear_gates

    return clear_gates(copy.deepcopy(model))


# --------------------------------------------------------------------------------------------------------
# Training compute
# --------------------------------------------------------------------------------------------------------


class TrainFlops(Callback):
    """FLOPs executed in training by an implementation that skips gated-off channels, as a fraction of the
    dense network's.

    A gate is known only after its producer's output (it is computed from it), so a closed channel saves the
    FLOPs of its *consumers* (their input channels), not of its producer; a block gate, computed from the
    branch output, saves nothing.  The gating modules' own FLOPs are added.  Forward FLOPs are counted; the
    backward pass scales the same way, so the ratio holds for training.
    """

    def __init__(self, model: nn.Module, input_shape):
        dense = _strip_gates(model)
        self.layer = layer_flops(dense, tuple(input_shape))
        self.dense = float(sum(self.layer.values()))
        self.consumers = {}  # group name -> consumer paths (layers whose input channels it gates)
        for g in model.channel_groups():
            self.consumers[g.name] = [c for c in g.consumers if c in self.layer]
        self.gate_flops = 0.0
        for gm in gating_modules(model).values():
            self.gate_flops += sum(2 * m.in_features * m.out_features for m in gm.net if isinstance(m, nn.Linear))
        self.executed = 0.0
        self.samples = 0

    def after_step(self, state) -> None:
        gms = gating_modules(state.model)
        n = None
        saved = 0.0
        for name, paths in self.consumers.items():
            gm = gms.get(name)
            if gm is None or gm.last_gate is None:
                continue
            closed = 1.0 - gm.last_gate.detach().mean(1)  # per input: fraction of channels off
            n = closed.numel()
            saved += float(closed.sum()) * sum(self.layer[p] for p in paths)
        if n is None:
            return
        self.samples += n
        self.executed += n * (self.dense + self.gate_flops) - saved

    def fraction(self) -> float:
        return self.executed / max(self.samples * self.dense, 1.0)

    def log(self, state) -> dict[str, float]:
        return {"train_flops_fraction": self.fraction()}

    def state_dict(self) -> dict:
        return {"executed": self.executed, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.executed, self.samples = state["executed"], state["samples"]


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
        from .runs import ConfigError

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

_DATA_CACHE: dict = {}


def _data(name: str, root: str):
    key = (name, root)
    if key not in _DATA_CACHE:
        kw = {"n": 600} if name.startswith("synthetic") else {}
        _DATA_CACHE[key] = load_dataset(name, root=root, **kw)
    return _DATA_CACHE[key]


def _build(cfg: Config, model: str, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model, width=cfg.model_width(model), **data.model_kwargs())


def _train_spec(cfg: Config, model: str, dataset: str, seed: int) -> dict:
    return {"model": model, "dataset": dataset, "width": cfg.model_width(model), "seed": seed,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule}


def _gate_spec(cfg: Config, model: str, dataset: str, seed: int, target: float, polarizer_weight: float) -> dict:
    return {**_train_spec(cfg, model, dataset, seed), "target": target, "polarizer_weight": polarizer_weight,
            "density_weight": cfg.density_weight, "polarizer_form": cfg.polarizer_form,
            "zhuang_t": cfg.zhuang_t if cfg.polarizer_form == "zhuang" else None,
            "density_scope": cfg.density_scope, "block_gates": cfg.block_gates, "gate_lr": cfg.gate_lr}


def lr_scheduler(optimizer: torch.optim.Optimizer, epochs: float, kind: str = "constant"):
    """The learning-rate schedule of the chapter's trainings (dense and gated alike), stepped once an
    epoch by :func:`pruning_lib.train.fit`: ``"constant"`` (None) or ``"cosine"``, ``0.5 (1 + cos(pi e / E))``
    at epoch ``e`` of ``E = ceil(epochs)``, on every parameter group (the gating modules' too)."""
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {kind!r}")
    total = max(int(math.ceil(epochs)), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e / total, 1))))


def gated_optimizer(model: nn.Module, lr: float, gate_lr: float | None = None) -> torch.optim.Adam:
    """Adam with two parameter groups: the network at ``lr``, its gating modules at ``gate_lr`` (default
    ``lr``)."""
    gms = gating_modules(model)
    gate_params = {id(p) for gm in gms.values() for p in gm.parameters()}
    return torch.optim.Adam([
        {"params": [p for p in model.parameters() if id(p) not in gate_params], "lr": lr},
        {"params": [p for gm in gms.values() for p in gm.parameters()], "lr": gate_lr or lr}])


def gated_penalties(target: float, polarizer_weight: float, density_weight: float, form: str = "product",
                    t: float = 1.4, scope: str = "layer") -> dict:
    """The terms added to the cross-entropy in the one training pass: ``density`` (always) and
    ``polarizer`` (when ``polarizer_weight > 0``), for :func:`pruning_lib.train.fit`'s ``penalties``."""
    penalties = {"density": lambda m: density_weight * density_loss(m, target, scope)}
    if polarizer_weight > 0:
        penalties["polarizer"] = lambda m: polarizer_weight * polarization_penalty(m, form, t)
    return penalties


def train_gated(model: nn.Module, data, *, target: float, polarizer_weight: float, density_weight: float,
                form: str = "product", t: float = 1.4, scope: str = "layer", block_gates: bool = True,
                epochs: float = 1.0, batch_size: int = 128, lr: float = 1e-3, gate_lr: float | None = None,
                lr_schedule: str = "constant", seed: int = 0,
                progress: bool = False) -> tuple[pd.DataFrame, TrainFlops]:
    """One training pass of ``model`` with gating modules, CE + density loss + polarizer (in place).

    The gating modules get their own learning rate ``gate_lr`` (default ``lr``): Adam with two parameter
    groups (:func:`gated_optimizer`), both following ``lr_schedule`` (:func:`lr_scheduler`).  Returns the
    history and the :class:`TrainFlops` counter.  Uses :func:`pruning_lib.train.fit`.
    """
    add_gating(model, block_gates=block_gates)
    optimizer = gated_optimizer(model, lr, gate_lr)
    counter = TrainFlops(model, data.input_shape)
    penalties = gated_penalties(target, polarizer_weight, density_weight, form, t, scope)
    hist = fit(model, data, optimizer=optimizer, epochs=epochs, batch_size=batch_size, penalties=penalties,
               scheduler=lr_scheduler(optimizer, epochs, lr_schedule), callbacks=[counter], seed=seed,
               progress=progress, desc=f"gated s={target}")
    return hist, counter


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, penalties: dict, x, y) -> None:
    """One optimizer step as :func:`pruning_lib.train.fit` takes it: cross-entropy plus penalties, backward,
    update."""
    loss = cross_entropy(model, x, y)
    for pen in penalties.values():
        loss = loss + pen(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


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
    d = _strip_gates(gated)
    g.train()
    d.train()
    gen = torch.Generator().manual_seed(seed)
    device = next(g.parameters()).device
    x, y = next(iter(batches(data.train, batch_size, shuffle=True, generator=gen, device=device)))
    steps = {"gated": (g, gated_optimizer(g, lr, gate_lr), penalties),
             "dense": (d, torch.optim.Adam(d.parameters(), lr=lr), {})}
    for m, opt, pen in steps.values():
        _train_step(m, opt, pen, x, y)
    best = {k: math.inf for k in steps}
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for k in order:
            t0 = time.perf_counter()
            _train_step(*steps[k], x, y)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"step_seconds_gated": best["gated"], "step_seconds_dense": best["dense"]}


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


def _dense_unit(cfg: Config, model: str, dataset: str, seed: int) -> dict:
    store = Store(cfg_root(cfg), "polarization/dense", _train_spec(cfg, model, dataset, seed))

    def compute():
        data = _data(dataset, cfg.data_root)
        net = _build(cfg, model, data, seed)
        t0 = time.perf_counter()
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        hist = fit(net, data, optimizer=opt, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                   scheduler=lr_scheduler(opt, cfg.epochs, cfg.lr_schedule), progress=False, desc="dense")
        secs = time.perf_counter() - t0
        store.save_torch("model", net.cpu().state_dict())
        return {"test_accuracy": float(hist["test_accuracy"].iloc[-1]), "train_seconds": secs,
                "connections": connections(net), "flops": _flops(net.cpu(), data.input_shape)}

    return store.json("metrics", _timed(compute))


def _gate_unit(cfg: Config, model: str, dataset: str, seed: int, target: float, pw: float) -> dict:
    spec = _gate_spec(cfg, model, dataset, seed, target, pw)
    store = Store(cfg_root(cfg), "polarization/gated", spec)

    def compute():
        data = _data(dataset, cfg.data_root)
        net = _build(cfg, model, data, seed)
        dense_conn, dense_flops = connections(net), _flops(net, data.input_shape)
        t0 = time.perf_counter()
        hist, counter = train_gated(net, data, target=target, polarizer_weight=pw,
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
        dense = _strip_gates(net)
        t_dense, t_small = best_forward_seconds([dense, small], x, cfg.timing_repeats)
        t_dense1, t_small1 = best_forward_seconds([dense, small], x[:1], cfg.timing_repeats, inner=10)
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
            "connections": connections(small), "dense_connections": dense_conn,
            "flops": _flops(small, data.input_shape), "dense_flops": dense_flops,
            "train_flops_fraction": counter.fraction(), "train_seconds": secs,
            "consensus_test": float(test_stats["agreement"].mean()),
            "inference_seconds_dense": t_dense, "inference_seconds_compact": t_small,
            "inference_seconds_dense_b1": t_dense1, "inference_seconds_compact_b1": t_small1,
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


def _baseline_unit(cfg: Config, method: str, model: str, dataset: str, seed: int, target: float) -> dict:
    gate_spec = _gate_spec(cfg, model, dataset, seed, target, cfg.polarizer_weight)
    spec = {"method": method, "gated": gate_spec, "finetune_epochs": cfg.finetune_epochs}
    store = Store(cfg_root(cfg), "polarization/baseline", spec)

    def compute():
        data = _data(dataset, cfg.data_root)
        keep_gates = Store(cfg_root(cfg), "polarization/gated", gate_spec).torch("keep")
        net = _build(cfg, model, data, seed)
        dense_store = Store(cfg_root(cfg), "polarization/dense", _train_spec(cfg, model, dataset, seed))
        net.load_state_dict(dense_store.torch("model"))
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
        return {"test_accuracy": acc, "pruned_accuracy": pruned_acc, "connections": connections(small),
                "flops": _flops(small, data.input_shape)}

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
    if in_worker():
        torch.set_num_threads(1)
    _RESULTS_ROOT[0] = results_dir
    return _unit(kind, cfg, rest)


def _unit_stores(task, root: str) -> tuple[Store, list[Store]]:
    """A unit's own Store (the specs its function uses) and the finished units it reads: a baseline
    reads its gated run's keep masks and the dense weights."""
    kind, cfg, rest = task
    if kind == "dense":
        return Store(root, "polarization/dense", _train_spec(cfg, *rest)), []
    if kind == "gated":
        return Store(root, "polarization/gated", _gate_spec(cfg, *rest)), []
    method, model, dataset, seed, target = rest
    gate_spec = _gate_spec(cfg, model, dataset, seed, target, cfg.polarizer_weight)
    own = Store(root, "polarization/baseline",
                {"method": method, "gated": gate_spec, "finetune_epochs": cfg.finetune_epochs})
    return own, [Store(root, "polarization/gated", gate_spec),
                 Store(root, "polarization/dense", _train_spec(cfg, model, dataset, seed))]


def _run_phase(units, cfg, root, workers, bar):
    """The units of one phase through :func:`runs.map_units`: ``$PRUNING_EXECUTOR`` (Dask workers, ...),
    else ``workers`` spawned processes (a phase of one unit runs here); finished units only load, here."""
    tasks = [(kind, cfg, rest) for kind, rest in units]
    root = str(root)
    executor = parse_executor(None, workers)
    if executor.kind == "process" and len(tasks) < 2:
        executor = Executor("serial")
    return map_units(_pool_unit, tasks, results_dir=root, executor=executor, bar=bar,
                     done=lambda t: _unit_stores(t, root)[0].exists("metrics.json"),
                     inputs=lambda t: _unit_stores(t, root)[1],
                     key=lambda t: f"{t[0]}-{_unit_stores(t, root)[0].key}")


def run_experiment(cfg: Config, results_dir: str = "results", progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run (or load) every unit: dense networks, gated runs (sweep + no-polarizer runs), baselines.

    Each unit (one model x dataset x seed x target x method) is its own :class:`~pruning_lib.runs.Store`
    entry.  The independent units of each phase run through :func:`runs.map_units`: in ``cfg.workers``
    processes when it is > 1, or where ``$PRUNING_EXECUTOR`` says (a Dask cluster).

    Returns ``{"runs": one row per gated/baseline run, "gates": per-gate statistics, "dense": the dense
    networks, "wall_seconds": this call's wall time, "compute_seconds": the summed time of every unit when
    it was computed (what a fresh sequential run costs, even when everything was loaded from the cache),
    "cpu_seconds": the summed CPU time of the units (NaN for units computed before it was recorded)}``.
    """

    _RESULTS_ROOT[0] = str(results_dir)
    combos = [(m, d, s) for d in cfg.datasets for m in cfg.models for s in cfg.model_seeds(m)]
    dense_units = [("dense", (m, d, s)) for m, d, s in combos]
    gate_units = [("gated", (m, d, s, t, cfg.polarizer_weight)) for m, d, s in combos for t in cfg.targets]
    # the run without polarizer is a figure (histograms, consensus), not a claim: the first seed only
    nopol = [("gated", (m, d, s, cfg.no_polarizer_target, 0.0)) for m, d, s in combos
             if s == cfg.model_seeds(m)[0]]
    base_units = [("baseline", (meth, m, d, s, t)) for m, d, s in combos for t in cfg.targets
                  for meth in ("magnitude", "random")]
    t0 = time.perf_counter()
    bar = progress_bar(total=len(dense_units) + len(gate_units) + len(nopol) + len(base_units),
                       desc="polarization runs", progress=progress)
    # the slow ResNets first, so that parallel workers do not end on one long unit
    def longest_first(units):
        return sorted(units, key=lambda u: not any(str(x).startswith("resnet") for x in u[1]))

    dense_units, gated_units, base_units = (longest_first(u) for u in (dense_units, gate_units + nopol,
                                                                          base_units))
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
        st = Store(results_dir, "polarization/gated", _gate_spec(cfg, m, d, s, t, pw))
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
    dense_frame = pd.DataFrame([{"model": m, "dataset": d, "seed": s, **dense_by[(m, d, s)]} for m, d, s in combos])
    return {"runs": runs, "gates": pd.concat(gate_frames, ignore_index=True), "dense": dense_frame,
            "history": pd.concat(histories, ignore_index=True), "wall_seconds": wall,
            "compute_seconds": float(sum(r.get("unit_seconds", 0.0) for r in dense + gated + base)),
            "cpu_seconds": float(sum(r.get("unit_cpu_seconds", math.nan) for r in dense + gated + base))}


# --------------------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------------------

_LABEL = {"lenet5_caffe": "LeNet-5-Caffe", "resnet20": "ResNet-20", "resnet56": "ResNet-56",
          "small_vgg": "small VGG", "vgg16_bn": "VGG-16", "conv2": "Conv-2", "conv4": "Conv-4"}
_COLOR = {"polarization": "C0", "magnitude": "C1", "random": "C2", "no polarizer": "C3"}


def _panels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(runs["model"], runs["dataset"])))


def sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per model, dataset, method and target: accuracy and achieved sparsities."""
    cols = ["test_accuracy", "accuracy_drop", "connection_sparsity", "flops_sparsity"]
    extra = [c for c in ("gate_sparsity", "dynamic_accuracy", "consensus_test") if c in runs]
    t = (runs[runs["method"] != "no polarizer"]
         .groupby(["model", "dataset", "method", "target"], sort=False)[cols + extra].mean().reset_index())
    return t


def plot_sweep(runs: pd.DataFrame, dense: pd.DataFrame):
    """Test accuracy against achieved sparsity (connections, FLOPs), gates vs magnitude and random pruning."""
    from .plotting import figure, percent_axis

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


def plot_gate_histograms(gates: pd.DataFrame, target: float):
    """Histograms of the gates' means over test inputs, with and without the polarizer, at ``target``."""
    from .plotting import figure

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
    from .plotting import figure, percent_axis

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
    from .plotting import figure, percent_axis

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
    timed alternately; CPU, eval, ``no_grad``) at batch 1 and ``batch``, and the efficiency speed-up /
    FLOPs reduction (1.0 is the limit: time proportional to FLOPs)."""
    pol_runs = runs[runs["method"] == "polarization"].copy()
    pol_runs["flops_reduction"] = pol_runs["dense_flops"] / pol_runs["flops"]
    cols = ["flops_reduction"]
    for b, suffix in ((1, "_b1"), (batch, "")):
        dense_col, compact_col = f"inference_seconds_dense{suffix}", f"inference_seconds_compact{suffix}"
        if dense_col not in pol_runs:
            continue
        pol_runs[f"speedup_batch{b}"] = pol_runs[dense_col] / pol_runs[compact_col]
        pol_runs[f"efficiency_batch{b}"] = pol_runs[f"speedup_batch{b}"] / pol_runs["flops_reduction"]
        cols += [f"speedup_batch{b}", f"efficiency_batch{b}"]
    t = pol_runs.groupby(["model", "target"], sort=False)[cols].mean().reset_index()
    t["model"] = t["model"].map(lambda m: _LABEL.get(m, m))
    return t


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
