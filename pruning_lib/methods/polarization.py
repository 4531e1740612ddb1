"""Consensus sub-networks with polarization-regularized binary gates (Zhi et al. 2023, arXiv 2302.10798).

The method of chapter ``05_polarization`` (:mod:`pruning_lib.chapters.polarization` runs it), as far as the
paper's public text describes it [abs] and as we reconstruct the rest [recon]:

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
* **Static sub-network** [abs]: after the single training pass (:func:`train_polarized`), a gate whose mean
  over the training inputs is below 1/2 is agreed "off"; those channels (and blocks) are removed by
  :func:`pruning_lib.gates.compact` and :func:`pruning_lib.gates.remove_blocks`, and the gating modules
  are dropped.  With a polarized consensus the static network computes what the gated one does for
  (almost) every input.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..gates import GateSlot, compact, remove_blocks, scale_channels, set_block_gates, set_gates
from ..metrics import layer_flops
from ..train import Callback, adam, cross_entropy, fit, lr_scheduler

__all__ = [
    "GatingModule", "straight_through", "add_gating", "gating_modules", "set_mode", "density_loss",
    "polarizer", "polarization_penalty", "gate_statistics", "static_keep", "keep_sparsity", "apply_static",
    "compact_static", "strip_gates", "TrainFlops", "lr_scheduler", "gated_optimizer", "gated_penalties",
    "train_polarized", "train_step",
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
    from ..data import batches

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
    """The physically smaller network: channels agreed off removed (:func:`~pruning_lib.gates.compact`),
    blocks agreed off replaced by their shortcut (:func:`~pruning_lib.gates.remove_blocks`), gates dropped.

    Equals ``model`` with static gates (:func:`apply_static`) in eval mode."""
    channel_keep = {k: v for k, v in keep.items() if not k.startswith("block:")}
    removed = [k[len("block:"):] for k, v in keep.items() if k.startswith("block:") and not bool(v.any())]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an emptied group keeps one zeroed channel (documented)
        small = compact(model, channel_keep)
    return remove_blocks(small, removed) if removed else small


def strip_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its gating modules (the backbone)."""
    from ..gates import clear_gates

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
        dense = strip_gates(model)
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
# The one training pass
# --------------------------------------------------------------------------------------------------------


def gated_optimizer(model: nn.Module, lr: float, gate_lr: float | None = None) -> torch.optim.Adam:
    """Adam with two parameter groups: the network at ``lr``, its gating modules at ``gate_lr`` (default
    ``lr``)."""
    gms = gating_modules(model)
    gate_params = {id(p) for gm in gms.values() for p in gm.parameters()}
    return adam([
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


def train_polarized(model: nn.Module, data, *, target: float, polarizer_weight: float, density_weight: float,
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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, penalties: dict, x, y) -> None:
    """One optimizer step as :func:`pruning_lib.train.fit` takes it: cross-entropy plus penalties, backward,
    update."""
    loss = cross_entropy(model, x, y)
    for pen in penalties.values():
        loss = loss + pen(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

