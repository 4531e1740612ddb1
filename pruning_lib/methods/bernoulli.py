"""Bernoulli unit/filter gates that converge to a deterministic network (Guenter & Sideris 2022,
arXiv 2205.04650, "Robust learning of parsimonious deep neural networks").  Chapter 04 explains and
measures these pieces; the experiment code lives in :mod:`pruning_lib.chapters.bernoulli_gates`.

The model (paper, abstract and Sec. 2-3, as reconstructed in ``papers.md`` Sec. 3):

* every unit / filter ``j`` of a hidden layer is multiplied by ``xi_j ~ Bernoulli(theta_j)``, drawn
  independently for every example (like adaptive dropout); ``theta_j`` is the variational posterior's
  parameter and is kept in ``[0, 1]`` by projection;
* the weights have a Gaussian (scale-mixture) prior: the incoming weights ``w_j`` of unit ``j`` cost
  ``lambda / 2 ||w_j||^2`` only while the unit is on (the "slab"); weights no gate controls (the
  classifier) always cost ``lambda / 2 ||w||^2``;
* with the prior's inclusion probability optimised out under the paper's hyper-prior, what is left of
  the prior on ``xi`` is a price ``c_j`` per active unit; we take ``c_j = kappa * d_j`` with ``d_j`` the
  unit's incoming parameter count (its weight row and bias): ``kappa`` nats per parameter.

So the cost to minimise (:func:`bernoulli_cost`) is *multilinear* in ``theta``::

    C(W, theta) = E_{xi ~ Bern(theta)} [ sum_n loss_n(W o xi) ]                  (data term)
                  + sum_j theta_j * lambda / 2 * ||w_j||^2 + lambda / 2 * ||w_rest||^2   (weight prior)
                  + sum_j theta_j * c_j                                          (hyper-prior's share)

A multilinear function's minimum over the box ``[0, 1]^n`` is attained at a vertex, and projected
gradient steps push every ``theta_j`` whose partial derivative keeps its sign onto 0 or 1: the network
becomes deterministic.  A unit whose ``theta_j`` reaches 0 can never be drawn again and is removed from
the network for good (:func:`shrink_`), together with the optimizer's state of its weights.

Gradient estimator (:class:`FlipEstimator`).  The paper's own estimator could not be read (only the
abstract was reachable from this project), so we use an unbiased one that exploits the multilinearity:
``dC_data / dtheta_j = E[ loss | xi_j = 1 ] - E[ loss | xi_j = 0 ]`` exactly.  For a sampled ``xi`` and a
sampled example, we evaluate the loss with ``xi_j`` as drawn and with ``xi_j`` flipped, all other gates
kept; the signed difference is an unbiased single-sample estimate of that partial derivative (a "local
expectation gradient", Titsias & Lazaro-Gredilla 2015).  Flipping unit ``j`` changes the input of the
next Linear / Conv layer by one rank-one term, so the flipped pre-activations of *all* units of a layer
come from one einsum (Linear) or one grouped convolution (Conv), and only the layers after that are
re-run, for ``flip_examples`` examples of the batch.  Unlike REINFORCE it has no ``1 / theta(1 - theta)``
factor, so it stays well-behaved as ``theta`` approaches 0 or 1, and unlike straight-through or
concrete relaxations it is unbiased.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from types import SimpleNamespace
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..gates import GateSlot, compact, families, get_gates, scale_channels, set_gates
from ..train import EpochTimer, Method, adam
from ..timing import best_of

__all__ = [
    "BernoulliGate", "attach_bernoulli_gates", "bernoulli_gates", "gate_thetas", "project_",
    "unit_rows", "weight_prior", "theta_prior_gradient", "bernoulli_cost", "FlipEstimator",
    "shrink_", "BernoulliPruning", "keep_and_scale", "undecided_fraction",
    "per_example_cross_entropy", "compare_steps", "flip_tradeoff", "choose_flip_examples",
]


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------

class BernoulliGate(nn.Module):
    """Multiplies channel ``j`` by ``xi_j ~ Bernoulli(theta_j)`` (train) or by ``theta_j`` (eval).

    Training draws one ``xi`` per example (shape ``[N, C]``); with ``theta_j`` in ``{0, 1}`` the draw is
    deterministic, so a converged network computes the same function in train and eval mode.  While
    ``record`` is on, the gate keeps its last input (before gating) and draw for :class:`FlipEstimator`.
    ``theta`` is an ``nn.Parameter``; its gradient is written by the estimator, not by autograd.
    """

    def __init__(self, channels: int, init: float = 0.5):
        super().__init__()
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"theta init must lie in [0, 1], got {init}")
        self.theta = nn.Parameter(torch.full((int(channels),), float(init)))
        self.record = False
        self.saved_input: torch.Tensor | None = None
        self.saved_xi: torch.Tensor | None = None

    def sample(self, n: int) -> torch.Tensor:
        """``xi ~ Bernoulli(theta)``, shape ``[n, C]``. On CPU this is ``torch.bernoulli(theta.expand(n, -1))``
        to the bit, generator state included (both draw one float32 uniform per element, in the same order,
        and compare it with theta), at about 2.5 times its speed (issue 15)."""
        theta = self.theta.detach().clamp(0.0, 1.0)
        u = torch.rand((n, theta.numel()), device=theta.device, dtype=theta.dtype)
        return (u < theta).to(theta.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return scale_channels(x, self.theta.detach().clamp(0.0, 1.0))
        xi = self.sample(x.shape[0])
        if self.record:
            self.saved_input, self.saved_xi = x.detach(), xi
        return scale_channels(x, xi)

    def clear(self) -> None:
        self.saved_input = self.saved_xi = None

    def __getstate__(self):  # never pickle / deepcopy the saved activations
        state = self.__dict__.copy()
        state["saved_input"] = state["saved_xi"] = None
        return state

    def extra_repr(self) -> str:
        return f"channels={self.theta.numel()}"


def attach_bernoulli_gates(model: nn.Module, init: float = 0.5,
                           groups: Iterable[str] | None = None) -> dict[str, BernoulliGate]:
    """Put a :class:`BernoulliGate` into the slot of every channel group (or of ``groups``)."""
    names = list(groups) if groups is not None else [g.name for g in model.channel_groups()]
    device = next(model.parameters()).device
    gates = {}
    for g in model.channel_groups():
        if g.name in names:
            slot = model.get_submodule(g.slot)
            gates[g.name] = BernoulliGate(slot.channels, init).to(device)
    set_gates(model, gates)
    return gates


def bernoulli_gates(model: nn.Module) -> dict[str, BernoulliGate]:
    """The model's Bernoulli gates by group name, in network order."""
    return {k: g for k, g in get_gates(model).items() if isinstance(g, BernoulliGate)}


def gate_thetas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: g.theta.detach().clone() for k, g in bernoulli_gates(model).items()}


@torch.no_grad()
def project_(model: nn.Module, gates: Mapping[str, BernoulliGate] | None = None) -> None:
    """Euclidean projection of every ``theta`` onto ``[0, 1]`` (a clamp, for a box)."""
    for g in (gates if gates is not None else bernoulli_gates(model)).values():
        g.theta.clamp_(0.0, 1.0)


def undecided_fraction(thetas: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], lo: float = 0.01,
                       hi: float = 0.99) -> float:
    """Share of the ``theta`` values strictly between ``lo`` and ``hi``."""
    values = list(thetas.values()) if isinstance(thetas, Mapping) else list(thetas)
    t = torch.cat([v.reshape(-1) for v in values])
    return float(((t > lo) & (t < hi)).float().mean()) if t.numel() else 0.0


def keep_and_scale(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``keep`` (``theta > 0``) and ``scale`` (``theta``, the eval-mode gate) for :func:`compact`."""
    thetas = gate_thetas(model)
    return {k: t > 0 for k, t in thetas.items()}, {k: t.clamp(0, 1) for k, t in thetas.items()}


# --------------------------------------------------------------------------------------------------
# The cost
# --------------------------------------------------------------------------------------------------

def unit_rows(model: nn.Module, group: str) -> list[tuple[nn.Parameter, int]]:
    """The parameters holding unit ``j``'s incoming weights: (param, dim of the unit index).

    A unit owns row ``j`` of its producer's weight and bias (and of its BatchNorm's affine): these are
    the weights its gate switches on and off.
    """
    g = next(c for c in model.channel_groups() if c.name == group)
    producer = model.get_submodule(g.producer)
    rows = [(producer.weight, 0)]
    if producer.bias is not None:
        rows.append((producer.bias, 0))
    if g.norm is not None:
        norm = model.get_submodule(g.norm)
        if getattr(norm, "affine", False):
            rows += [(norm.weight, 0), (norm.bias, 0)]
    return rows


def _unit_sq_norms_and_sizes(model: nn.Module, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||w_j||^2 [C] (differentiable in w), d_j [C])`` of every unit of ``group``."""
    sq, size = 0.0, 0
    for p, dim in unit_rows(model, group):
        q = p.movedim(dim, 0).reshape(p.shape[dim], -1)
        sq = sq + (q ** 2).sum(1)
        size += q.shape[1]
    return sq, torch.full_like(sq.detach(), float(size))


def _gated_param_ids(model: nn.Module) -> set[int]:
    """The weights some gate switches (every unit's :func:`unit_rows`), as ``id``s."""
    return {id(p) for name in bernoulli_gates(model) for p, _ in unit_rows(model, name)}


def _family() -> families.GateFamily:
    """This method's gate family: it tells the gates' ``theta`` from the weights."""
    return families.get("bernoulli")


def weight_prior(model: nn.Module, weight_precision: float) -> torch.Tensor:
    """``sum_j theta_j lambda/2 ||w_j||^2 + lambda/2 ||w_rest||^2`` with ``theta`` held fixed: the
    weight prior's term of the cost, as a penalty on the weights (``theta`` gets its own gradient)."""
    gates = bernoulli_gates(model)
    gated = _gated_param_ids(model)
    total = 0.0
    for name, gate in gates.items():
        sq, _ = _unit_sq_norms_and_sizes(model, name)
        total = total + (gate.theta.detach().clamp(0, 1) * sq).sum()
    for p in _family().weight_parameters(model):
        if id(p) not in gated:
            total = total + (p ** 2).sum()
    return 0.5 * weight_precision * total


@torch.no_grad()
def theta_prior_gradient(model: nn.Module, weight_precision: float, unit_cost: float
                         ) -> dict[str, torch.Tensor]:
    """``dC_prior / dtheta_j = lambda/2 ||w_j||^2 + kappa d_j`` for every gate (the cost is linear in
    ``theta_j`` apart from the data term)."""
    out = {}
    for name in bernoulli_gates(model):
        sq, d = _unit_sq_norms_and_sizes(model, name)
        out[name] = 0.5 * weight_precision * sq + unit_cost * d
    return out


def bernoulli_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_precision: float,
                   unit_cost: float, max_units: int = 16) -> dict[str, torch.Tensor]:
    """The cost ``C(W, theta)`` on the examples ``(x, y)``, exactly, by enumerating every gate pattern.

    Returns ``data`` (``E_xi[sum_n loss_n]``), ``weight_prior``, ``hyper_prior`` (``sum_j theta_j c_j``)
    and ``total``; all are differentiable in ``theta`` and ``W`` (so autograd gives the exact gradient
    that :class:`FlipEstimator` estimates).  Only for tiny networks (at most ``max_units`` gated units).
    """
    gates = bernoulli_gates(model)
    sizes = [g.theta.numel() for g in gates.values()]
    n_units = sum(sizes)
    if n_units > max_units:
        raise ValueError(f"{n_units} gated units: enumerating 2^{n_units} patterns is too many")
    theta = torch.cat([g.theta for g in gates.values()])
    data = 0.0
    was_training = model.training
    model.eval()  # eval mode multiplies by the gate's theta: we overwrite theta with each pattern below
    saved = {k: g.theta for k, g in gates.items()}
    try:
        for pattern in itertools.product((0.0, 1.0), repeat=n_units):
            xi = torch.tensor(pattern, dtype=theta.dtype, device=theta.device)
            prob = torch.prod(torch.where(xi > 0, theta, 1 - theta))
            start = 0
            for (k, g), c in zip(gates.items(), sizes):
                del g.theta
                g.theta = xi[start:start + c]  # a plain tensor: the forward reads it as the gate value
                start += c
            loss = F.cross_entropy(model(x), y, reduction="sum")
            data = data + prob * loss
    finally:
        for k, g in gates.items():
            del g.theta
            g.theta = saved[k]
        model.train(was_training)
    hyper = 0.0
    gated = _gated_param_ids(model)
    total_sq = 0.0
    for name, g in gates.items():
        sq, d = _unit_sq_norms_and_sizes(model, name)
        total_sq = total_sq + (g.theta * sq).sum()
        hyper = hyper + (g.theta * unit_cost * d).sum()
    for p in _family().weight_parameters(model):
        if id(p) not in gated:
            total_sq = total_sq + (p ** 2).sum()
    wp = 0.5 * weight_precision * total_sq
    return {"data": data, "weight_prior": wp, "hyper_prior": hyper, "total": data + wp + hyper}


# --------------------------------------------------------------------------------------------------
# The gradient estimator
# --------------------------------------------------------------------------------------------------

def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every row (``F.cross_entropy(..., reduction="none")``), computed as
    ``logsumexp - logit of the label``: several times faster on CPU for the estimator's many short rows."""
    top = logits.amax(1, keepdim=True)
    lse = (logits - top).exp_().sum(1).log_() + top.squeeze(1)
    return lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def _ops(model: nn.Module) -> list[nn.Module]:
    """The forward pass of a :class:`~pruning_lib.models.SequentialNet` as a flat list of modules."""
    for attr in ("features", "pool", "head", "classifier"):
        if not hasattr(model, attr):
            raise NotImplementedError(
                f"{type(model).__name__}: the flip estimator needs a plain feed-forward SequentialNet "
                "(features -> pool -> flatten -> head -> classifier)")
    return [*model.features, model.pool, nn.Flatten(1), *model.head, model.classifier]


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _is_affine_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


class FlipEstimator:
    """Unbiased estimate of ``dE[mean_n loss_n] / dtheta_j`` for every gate (see module docstring).

    Call :meth:`begin` before the training forward (gates record their inputs and draws, BatchNorm
    layers their batch statistics), then :meth:`gradients` with the labels.  ``flip_examples`` examples
    of the batch (drawn without replacement) are used per step; ``chunk`` bounds the number of
    elements of the flipped activations processed at once.
    """

    def __init__(self, flip_examples: int = 16, chunk: int = 2 ** 23,
                 generator: torch.Generator | None = None):
        self.flip_examples = int(flip_examples)
        self.chunk = int(chunk)
        self.generator = generator
        self._bn_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []

    # -- recording ---------------------------------------------------------------------------------
    def begin(self, model: nn.Module, gates: Mapping[str, BernoulliGate] | None = None,
              norms: Sequence[nn.Module] | None = None) -> None:
        """Start recording. ``norms`` (optional): the model's BatchNorm layers, when the caller keeps them."""
        self.end()
        for g in (gates if gates is not None else bernoulli_gates(model)).values():
            g.record = True
        for m in (norms if norms is not None else batch_norms(model)):
            self._hooks.append(m.register_forward_pre_hook(self._bn_hook))

    def _bn_hook(self, module, args):
        if module.training:
            x = args[0].detach()
            dims = [0] + list(range(2, x.dim()))
            self._bn_stats[id(module)] = (x.mean(dims), x.var(dims, unbiased=False))

    def end(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- replay ------------------------------------------------------------------------------------
    def _apply(self, m: nn.Module, x: torch.Tensor, xi_rows: dict[int, torch.Tensor],
               inplace: bool = False) -> torch.Tensor:
        if isinstance(m, GateSlot):
            if m.gate is None:
                return x
            if isinstance(m.gate, BernoulliGate):
                xi = xi_rows[id(m.gate)]
                if isinstance(xi, tuple):  # (draws [k, C] of k examples, copies c per example)
                    xi, c = xi
                    k = xi.shape[0]
                    shape = (k, 1, xi.shape[1]) + (1,) * (x.dim() - 2)
                    v = x.view(k, c, *x.shape[1:])
                    return (v.mul_(xi.view(shape)) if inplace else v * xi.view(shape)).view(x.shape)
                return scale_channels(x, xi)
            return m.gate(x)
        if inplace and isinstance(m, nn.ReLU):  # the flipped activations are temporaries: no copy
            return x.relu_()
        if isinstance(m, _BatchNorm) and id(m) in self._bn_stats:
            mean, var = self._bn_stats[id(m)]
            return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
        return m(x)

    def _run(self, ops, start, x, xi_rows, inplace: bool = False):
        for m in ops[start:]:
            x = self._apply(m, x, xi_rows, inplace)
        return x

    @torch.no_grad()
    def gradients(self, model: nn.Module, y: torch.Tensor, units: Mapping[str, torch.Tensor] | None = None,
                  base_loss: torch.Tensor | None = None, ops: list | None = None,
                  gates: Mapping[str, BernoulliGate] | None = None) -> dict[str, torch.Tensor]:
        """``{group: estimate [C]}`` of the data term's gradient (per-example mean loss).

        ``units`` (optional, ``{group: unit indices}``) restricts the flips to those units of a group;
        the other entries of its estimate are 0 (a group left out of ``units`` is flipped whole).
        ``base_loss`` (optional) holds the training forward's per-example losses: they are the loss
        with every gate as drawn, so the estimator need not recompute them (reuse of the forward pass).
        ``ops`` and ``gates`` may be passed in when the caller keeps them (they are recomputed
        otherwise).
        """
        ops = ops if ops is not None else _ops(model)
        gates = gates if gates is not None else bernoulli_gates(model)
        slot_index = {id(m.gate): i for i, m in enumerate(ops) if isinstance(m, GateSlot) and m.gate is not None}
        n = len(y)
        m_ex = min(self.flip_examples, n)
        sub = torch.randperm(n, generator=self.generator)[:m_ex].to(y.device) if m_ex < n else None
        ys = y[sub] if sub is not None else y
        pick = (lambda t: t[sub]) if sub is not None else (lambda t: t)
        xis = {id(g): pick(g.saved_xi) for g in gates.values() if g.saved_xi is not None}
        shared_base = pick(base_loss.detach()) if base_loss is not None else None
        out = {}
        for name, gate in gates.items():
            if gate.saved_input is None:
                raise RuntimeError("FlipEstimator.gradients needs a recorded training forward (call begin)")
            c_all = gate.theta.numel()
            idx = None if units is None else units.get(name)
            if idx is not None and idx.numel() == c_all:
                idx = None
            if idx is not None and idx.numel() == 0:
                out[name] = torch.zeros_like(gate.theta.detach())
                continue
            p = slot_index[id(gate)]
            q = next(i for i in range(p + 1, len(ops)) if _is_affine_layer(ops[i]))
            consumer = ops[q]
            x = pick(gate.saved_input)
            xi = xis[id(gate)]
            # Per-channel ops between the slot and its consumer (ReLU, max-pool, pool, flatten).
            v_full = self._run(ops[:q], p + 1, x, xis)
            v_base = self._run(ops[:q], p + 1, scale_channels(x, xi), xis)
            out_base = consumer(v_base)
            rest = q + 1
            downstream = {id(m.gate) for m in ops[rest:] if isinstance(m, GateSlot) and m.gate is not None}
            loss_base = shared_base if shared_base is not None else \
                per_example_cross_entropy(self._run(ops, rest, out_base, xis), ys)
            xi_f = xi if idx is None else xi.index_select(1, idx)
            c = xi_f.shape[1]
            if isinstance(consumer, nn.Linear):
                spatial = consumer.in_features // c_all
                v_sel = v_full.reshape(m_ex, c_all, spatial)
                w = consumer.weight.view(consumer.out_features, c_all, spatial).permute(1, 2, 0)  # [C, s, o]
                if idx is not None:
                    v_sel, w = v_sel.index_select(1, idx), w.index_select(0, idx)
                w_rows = w.squeeze(1).contiguous() if spatial == 1 else None  # [c, o]
            else:
                if consumer.groups != 1:
                    raise NotImplementedError("grouped convolutions")
                o, _, kh, kw = consumer.weight.shape
                w = consumer.weight.transpose(0, 1)
                v_sel = v_full
                if idx is not None:
                    v_sel, w = v_full.index_select(1, idx), w.index_select(0, idx)
                wg = w.reshape(c * o, 1, kh, kw)
            per_ex = out_base[0].numel() * c
            step = max(1, self.chunk // max(per_ex, 1))
            grads = []
            for s in range(0, m_ex, step):
                e = slice(s, min(s + step, m_ex))
                k = e.stop - e.start
                sign = 1.0 - 2.0 * xi_f[e]  # +1: the flip turns the unit on, -1: off
                # written into a contiguous buffer: a broadcast op may otherwise choose the weight's
                # transposed layout, and the reshape below would copy the largest tensor of the step
                flipped = torch.empty((k, c, *out_base.shape[1:]), dtype=out_base.dtype, device=out_base.device)
                if isinstance(consumer, nn.Linear):
                    v = v_sel[e] * sign.unsqueeze(2)  # [k, c, s], signed
                    if spatial == 1:  # an outer product per unit, fused with the addition
                        torch.addcmul(out_base[e].unsqueeze(1), v, w_rows.unsqueeze(0), out=flipped)
                    else:  # one small matrix product per channel: [c, k, s] @ [c, s, o]
                        torch.add(out_base[e].unsqueeze(1), torch.bmm(v.transpose(0, 1), w).transpose(0, 1),
                                  out=flipped)
                else:
                    contrib = F.conv2d(v_sel[e], wg, None, consumer.stride, consumer.padding,
                                       consumer.dilation, groups=c)
                    contrib = contrib.view(k, c, o, *contrib.shape[2:])
                    sg = sign.view(k, c, *([1] * (contrib.dim() - 2)))
                    torch.addcmul(out_base[e].unsqueeze(1), sg, contrib, out=flipped)
                flipped = flipped.view(k * c, *out_base.shape[1:])
                rows = {key: (v[e], c) for key, v in xis.items() if key in downstream}
                logits = self._run(ops, rest, flipped, rows, inplace=True)
                loss_flip = per_example_cross_entropy(logits, ys[e].repeat_interleave(c)).view(k, c)
                grads.append((sign * (loss_flip - loss_base[e].unsqueeze(1))).sum(0))
            est = torch.stack(grads).sum(0) / m_ex
            if idx is not None:
                full = torch.zeros_like(gate.theta.detach())
                full[idx] = est.to(full.dtype)
                est = full
            out[name] = est
        return out

    def clear(self, model: nn.Module, gates: Mapping[str, BernoulliGate] | None = None) -> None:
        for g in (gates if gates is not None else bernoulli_gates(model)).values():
            g.clear()
        self._bn_stats.clear()


# --------------------------------------------------------------------------------------------------
# Removing units during training
# --------------------------------------------------------------------------------------------------

def _param_slices(model: nn.Module, keep: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """``{param name: [(dim, index)]}``: how :func:`compact` slices each parameter (for optimizer state)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g.name: g for g in model.channel_groups()}
    out: dict[str, list] = {}

    def add(p, dim, idx):
        if p is not None:
            out.setdefault(names[id(p)], []).append((dim, idx))

    for name, k in keep.items():
        g = groups[name]
        k = k.bool()
        if not k.any():  # compact keeps the first channel (with a folded gate of 0)
            k = torch.zeros_like(k)
            k[0] = True
        idx = k.nonzero().reshape(-1)
        producer = model.get_submodule(g.producer)
        add(producer.weight, 0, idx)
        add(producer.bias, 0, idx)
        if g.norm is not None:
            norm = model.get_submodule(g.norm)
            if norm.affine:
                add(norm.weight, 0, idx)
                add(norm.bias, 0, idx)
        for path in g.consumers:
            mod = model.get_submodule(path)
            if isinstance(mod, _BatchNorm):
                if mod.affine:
                    add(mod.weight, 0, idx)
                    add(mod.bias, 0, idx)
            elif isinstance(mod, nn.Linear):
                cols = (idx[:, None] * g.spatial + torch.arange(g.spatial, device=idx.device)).reshape(-1)
                add(mod.weight, 1, cols)
            else:
                add(mod.weight, 1, idx)
    return out


@torch.no_grad()
def shrink_(model: nn.Module, keep: Mapping[str, torch.Tensor],
            optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, torch.Tensor]:
    """Physically remove the units with ``keep == False`` from ``model`` *in place*.

    The layers are rebuilt smaller by :func:`pruning_lib.gates.compact` and swapped into ``model``
    (so the object the training loop holds stays valid); the Bernoulli gates are put back with their
    surviving ``theta``; every optimizer's parameter references and per-parameter state (Adam's moments,
    SGD's momentum) are sliced the same way, so training continues exactly where it was.  Returns the
    kept indices per group.
    """
    keep = {k: v.detach().bool().cpu() for k, v in keep.items()}
    if not keep:
        return {}
    gates = bernoulli_gates(model)
    old_names = {id(p): n for n, p in model.named_parameters()}
    old_shapes = {n: p.shape for n, p in model.named_parameters()}
    slices = _param_slices(model, keep)
    slot_paths = {g.name: g.slot for g in model.channel_groups()}
    kept_idx = {}
    new_theta = {}
    for name, gate in gates.items():
        if name in keep:
            k = keep[name]
            if not k.any():
                k = torch.zeros_like(k)
                k[0] = True
                gate.theta.data.zero_()
            idx = k.nonzero().reshape(-1).to(gate.theta.device)
            kept_idx[name] = idx
            slices[f"{slot_paths[name]}.gate.theta"] = [(0, idx)]
            new_theta[name] = gate.theta.detach().index_select(0, idx).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = compact(model, {k: v.to(next(model.parameters()).device) for k, v in keep.items()})
    model._modules = new._modules
    for name, gate in gates.items():
        if name in new_theta:
            gate.theta = nn.Parameter(new_theta[name])
        gate.clear()
    set_gates(model, gates)
    new_params = dict(model.named_parameters())
    for opt in optimizers:
        for group in opt.param_groups:
            fresh = []
            for p in group["params"]:
                name = old_names.get(id(p))
                q = new_params[name] if name is not None else p
                if q is not p:
                    st = opt.state.pop(p, None)
                    if st:
                        new_st = {}
                        for key, v in st.items():
                            if torch.is_tensor(v) and v.shape == old_shapes[name]:
                                for dim, idx in slices.get(name, []):
                                    v = v.index_select(dim, idx.to(v.device))
                                new_st[key] = v
                            else:
                                new_st[key] = v
                        opt.state[q] = new_st
                fresh.append(q)
            group["params"] = fresh
    return kept_idx


# --------------------------------------------------------------------------------------------------
# Training: the callback that plugs all of it into pruning_lib.train.fit
# --------------------------------------------------------------------------------------------------

class BernoulliPruning(Method):
    """Learns the gates' ``theta`` by projected SGD on the cost and removes units at 0 during training.

    Use with :func:`~pruning_lib.train.fit` as::

        bp = BernoulliPruning(model, dataset_size=len(data.train), ...)
        fit(model, data, method=bp, lr=lr, ...)  # its optimizers, penalty, loss and callback

    Each step: the forward draws ``xi`` and records what the estimator needs (and the per-example
    losses, which the estimator reuses); after backward the callback writes ``theta.grad = (estimate of
    dE[loss]/dtheta) + dC_prior/dtheta / N`` (the cost per training example); the theta optimizer (SGD)
    steps with the Robbins-Monro step ``theta_lr / (1 + t / theta_tau)`` (``theta_tau = 0``: constant);
    then ``theta`` is projected onto ``[0, 1]`` and, every ``shrink_every`` steps, units at 0 are removed
    (:func:`shrink_`).

    A decaying step is what stochastic approximation needs to converge: with a constant step a unit at a
    vertex keeps being kicked off it by the estimator's noise (Robbins & Monro 1951: sum of steps
    infinite, sum of squares finite; ``a / (1 + t / tau)`` is such a sequence).

    Only undecided gates are estimated every step.  A unit at ``theta = 0`` is dead (never drawn again,
    removed at the next removal) and gets no update.  A unit at ``theta = 1`` is estimated and updated
    only every ``check_every`` steps: a smaller step for the decided units (each update is still an
    unbiased estimate of the gradient; the step sizes still satisfy the Robbins-Monro conditions, so the
    points the iteration can settle on are the same), while the estimator's cost on a decided network
    falls by that factor.  (Scaling the rare update up by ``check_every`` would keep the expected step
    but make single noisy steps large enough to throw a unit from 1 to 0, where it is removed for
    good.)  ``record_every`` steps the full ``theta`` of every layer (indexed by the
    *original* unit number, removed units at 0) is appended to :attr:`trajectory`.
    """

    def __init__(self, model: nn.Module, dataset_size: int, *, weight_precision: float = 1.0,
                 unit_cost: float = 0.0, theta_lr: float = 0.1, theta_tau: float = 0.0,
                 theta_momentum: float = 0.0, flip_examples: int = 16, check_every: int = 1,
                 shrink_every: int = 1, record_every: int = 5, seed: int = 0, lo: float = 0.01,
                 hi: float = 0.99):
        self.model = model
        self.n = float(dataset_size)
        self.weight_precision = float(weight_precision)
        self.unit_cost = float(unit_cost)
        self.theta_lr = float(theta_lr)
        self.theta_tau = float(theta_tau)
        self.theta_momentum = float(theta_momentum)
        self.check_every = max(1, int(check_every))
        self.shrink_every = int(shrink_every)
        self.record_every = int(record_every)
        self.lo, self.hi = lo, hi
        self.estimator = FlipEstimator(flip_examples, generator=torch.Generator().manual_seed(seed + 1))
        self.timer = EpochTimer()
        self._y: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._sq: dict[str, torch.Tensor] = {}
        self._opts: list[torch.optim.Optimizer] = []
        self._theta_opt: torch.optim.Optimizer | None = None
        self._state = SimpleNamespace(step=0, optimizers=self._opts)
        if not bernoulli_gates(model):
            raise ValueError("the model has no Bernoulli gates: call attach_bernoulli_gates first")
        self._refresh()
        self.initial_width = {k: g.theta.numel() for k, g in self._gates.items()}
        self.orig_index = {k: torch.arange(g.theta.numel()) for k, g in self._gates.items()}
        self.trajectory: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.removed_at: list[dict] = []  # (step, group, units removed)

    def _refresh(self) -> None:
        """Cache what every step needs (gates, unit rows, ungated parameters); redone after a removal."""
        model = self.model
        self._gates = bernoulli_gates(model)
        self._ops_cache = None
        self._norms = batch_norms(model)
        self._rows = {name: unit_rows(model, name) for name in self._gates}
        gated = {id(p) for rows in self._rows.values() for p, _ in rows}
        self._rest = [p for p in _family().weight_parameters(model) if id(p) not in gated]
        self._sizes = {name: sum(p.numel() // p.shape[dim] for p, dim in rows) for name, rows in self._rows.items()}
        self._sq = {}

    def _ops(self) -> list[nn.Module]:
        if self._ops_cache is None:
            self._ops_cache = _ops(self.model)
        return self._ops_cache

    # -- wiring ------------------------------------------------------------------------------------
    def optimizers(self, lr: float = 1e-3) -> list[torch.optim.Optimizer]:
        """Adam on the weights, SGD (with ``theta_momentum``; projected afterwards) on the ``theta``."""
        fam = _family()
        weights, thetas = fam.weight_parameters(self.model), fam.gate_parameters(self.model)
        self._theta_opt = torch.optim.SGD(thetas, lr=self.theta_lr, momentum=self.theta_momentum)
        self._opts[:] = [adam(weights, lr=lr), self._theta_opt]
        return self._opts

    def theta_lr_at(self, step: int) -> float:
        """The Robbins-Monro step ``theta_lr / (1 + step / theta_tau)`` (constant if ``theta_tau`` is 0)."""
        return self.theta_lr / (1.0 + step / self.theta_tau) if self.theta_tau > 0 else self.theta_lr

    def weight_penalty(self, model: nn.Module) -> torch.Tensor:
        """:func:`weight_prior` per training example; keeps each unit's ``||w_j||^2`` for the theta step."""
        total = 0.0
        sq_all = {}
        for name, gate in self._gates.items():
            sq = 0.0
            for p, dim in self._rows[name]:
                q = p if dim == 0 else p.movedim(dim, 0)
                sq = sq + (q.reshape(q.shape[0], -1) ** 2).sum(1)
            sq_all[name] = sq.detach()
            total = total + (gate.theta.detach().clamp(0, 1) * sq).sum()
        for p in self._rest:
            total = total + (p ** 2).sum()
        self._sq = sq_all
        return (0.5 * self.weight_precision / self.n) * total

    def penalties(self) -> dict:
        """The weight prior per training example, as a penalty on the weights."""
        return {"weight_prior": self.weight_penalty}

    def loss_fn(self, model, x, y):
        self.timer.start()
        self.estimator.begin(self.model, self._gates, self._norms)
        self._y = y
        losses = F.cross_entropy(model(x), y, reduction="none")
        self._loss = losses.detach()  # the loss with every gate as drawn: the estimator's baseline
        return losses.mean()

    # -- hooks -------------------------------------------------------------------------------------
    def after_backward(self, state) -> None:
        model = self.model
        check = (state.step + 1) % self.check_every == 0
        units, weight = {}, {}
        for name, g in self._gates.items():
            t = g.theta.detach()
            alive = t > 0
            undecided = alive & (t < 1)
            pick = alive if check else undecided
            units[name] = pick.nonzero().reshape(-1)
            weight[name] = pick.to(t.dtype)  # 0: no update this step
        if any(u.numel() for u in units.values()):
            data = self.estimator.gradients(model, self._y, units, base_loss=self._loss, ops=self._ops(),
                                            gates=self._gates)
        else:
            data = {}
        if self._sq:
            prior = {name: 0.5 * self.weight_precision * self._sq[name] + self.unit_cost * self._sizes[name]
                     for name in self._gates}
        else:
            prior = theta_prior_gradient(model, self.weight_precision, self.unit_cost)
        for name, g in self._gates.items():
            d = data.get(name)
            grad = prior[name] / self.n if d is None else d + prior[name] / self.n
            g.theta.grad = grad * weight[name]
        if self._theta_opt is not None:
            for group in self._theta_opt.param_groups:
                group["lr"] = self.theta_lr_at(state.step)
        self.estimator.clear(model, self._gates)
        self.estimator.end()
        self._sq = {}

    def after_step(self, state) -> None:
        project_(self.model, self._gates)
        if self.shrink_every and state.step % self.shrink_every == 0:
            self.remove_dead(state.optimizers, state.step)
        if self.record_every and (state.step % self.record_every == 0 or state.step == 1):
            self.trajectory.append((state.step, self.full_thetas()))
        self.timer.after_step(state)

    def after_epoch(self, state) -> None:
        self.timer.after_epoch(state)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step exactly as :func:`~pruning_lib.train.fit` runs it with this callback and
        :meth:`optimizers` (used to time steps and in tests).  Returns the loss."""
        if not self._opts:
            raise RuntimeError("call optimizers() first")
        st = self._state
        st.optimizers = self._opts
        loss = self.loss_fn(self.model, x, y) + self.weight_penalty(self.model)
        for o in self._opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward(st)
        for o in self._opts:
            o.step()
        st.step += 1
        self.after_step(st)
        return float(loss.detach())

    def remove_dead(self, optimizers, step: int = 0) -> None:
        keep = {k: v for k, v in ((k, g.theta.detach() > 0) for k, g in self._gates.items())
                if not bool(v.all()) and int(v.sum()) >= 1}
        if not keep:
            return
        kept = shrink_(self.model, keep, optimizers)
        self._refresh()
        for name, idx in kept.items():
            before = self.orig_index[name]
            self.orig_index[name] = before[idx.cpu()]
            self.removed_at.append({"step": step, "group": name, "removed": len(before) - len(idx)})

    def full_thetas(self) -> dict[str, torch.Tensor]:
        """``theta`` of every layer at its original size (removed units read 0)."""
        out = {}
        for name, g in self._gates.items():
            full = torch.zeros(self.initial_width[name])
            full[self.orig_index[name]] = g.theta.detach().float().cpu()
            out[name] = full
        return out

    def widths(self) -> dict[str, int]:
        return {k: g.theta.numel() for k, g in self._gates.items()}

    def log(self, state) -> dict[str, float]:
        row = {f"width_{k}": float(v) for k, v in self.widths().items()}
        row["undecided"] = undecided_fraction(gate_thetas(self.model), self.lo, self.hi)
        row["theta_lr"] = self.theta_lr_at(state.step)
        return row


# --------------------------------------------------------------------------------------------------
# Measuring the estimator's variance against its cost, and steps against steps
# --------------------------------------------------------------------------------------------------

def _best_step_ms(bps: Mapping[str, "BernoulliPruning"], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  rounds: int, block: int, warmup: int = 2) -> dict[str, float]:
    """Best over ``rounds`` of the mean time of ``block`` consecutive training steps, in ms, for every
    :class:`BernoulliPruning` of ``bps`` (or anything with its ``step(x, y)``), after ``warmup`` untimed
    steps each; the rounds interleave them, so a change of machine load hits all alike."""
    for bp in bps.values():  # warm-up: allocator, first-call overheads
        for x, y in batches[:warmup]:
            bp.step(x, y)

    def blocks(bp):  # round r steps on batches r * block, ..., r * block + block - 1 (cycling)
        rounds_done = itertools.count()

        def run():
            r = next(rounds_done)
            for i in range(block):
                bp.step(*batches[(r * block + i) % len(batches)])
        return run

    times = best_of([blocks(bp) for bp in bps.values()], rounds, warmup=0,
                    sync=torch.cuda.synchronize if torch.cuda.is_available() else None)
    return {name: t / block * 1e3 for name, t in zip(bps, times)}


def compare_steps(bps: Mapping[str, "BernoulliPruning"], batches, rounds: int = 5, block: int = 1,
                  warmup: int = 2) -> dict[str, float]:
    """Milliseconds per training step of each network (best of ``rounds`` interleaved repeats of
    ``block`` steps, after ``warmup`` untimed steps each, at most one per batch; use
    ``block = check_every`` so the steps that estimate decided units count)."""
    return _best_step_ms(bps, list(batches), rounds, block, warmup)


def flip_tradeoff(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  grid: Sequence[int], dataset_size: int, rounds: int = 5, **settings) -> list[dict]:
    """The flip estimator's variance and cost for every number of flipped examples ``m`` in ``grid``.

    ``model`` is a gated network as training starts.  ``variance``: per unit, the variance over the
    ``batches`` of the estimate of ``dE[mean loss]/dtheta_j`` (each estimate: one batch, one draw of
    ``xi``, ``m`` of its examples), averaged over units.  ``step_ms``: one whole training step of
    :class:`BernoulliPruning` (``settings``, but ``theta`` held fixed) on a copy of ``model`` with that
    ``m``, best of ``rounds`` interleaved repeats; ``step_ms_fit`` the Theil-Sen line through those
    times (fixed cost + cost per flipped example).  ``work = variance * step_ms_fit``: the time it takes to
    get an estimate of a given precision by averaging steps; ``efficiency``: the smallest ``work`` of
    the grid over this one's.
    """
    grid = [int(m) for m in grid]
    was = model.training
    model.train()
    est = FlipEstimator(max(grid), generator=torch.Generator().manual_seed(12345))
    draws: dict[int, list[torch.Tensor]] = {m: [] for m in grid}
    for x, y in batches:
        est.begin(model)
        with torch.no_grad():
            model(x)
        for m in grid:
            est.flip_examples = m
            g = est.gradients(model, y)
            draws[m].append(torch.cat([v.reshape(-1) for v in g.values()]))
        est.clear(model)
        est.end()
    model.train(was)
    settings = {**settings, "theta_lr": 0.0, "shrink_every": 0, "record_every": 0}
    bps = {}
    for m in grid:
        copy_ = copy.deepcopy(model)
        bp = BernoulliPruning(copy_, dataset_size, flip_examples=m, **settings)
        bp.optimizers()
        bps[m] = bp
    ms = _best_step_ms(bps, list(batches), rounds, 1)
    # A step costs a fixed part plus a part proportional to m: a robust straight line (Theil-Sen)
    # through the best-of times, so that one load spike on a shared machine does not decide the choice.
    from scipy.stats import theilslopes

    slope, intercept, _, _ = theilslopes([ms[m] for m in grid], grid)
    rows = [{"flip_examples": m, "variance": float(torch.stack(draws[m]).var(0).mean()), "step_ms": ms[m],
             "step_ms_fit": float(intercept + max(slope, 0.0) * m)} for m in grid]
    for r in rows:
        r["work"] = r["variance"] * r["step_ms_fit"]
    best = min(r["work"] for r in rows)
    for r in rows:
        r["efficiency"] = best / r["work"] if r["work"] > 0 else float("nan")
    return rows


def choose_flip_examples(rows: Sequence[Mapping], efficiency: float = 0.5) -> int:
    """The smallest ``m`` of a :func:`flip_tradeoff` whose efficiency (variance reduction per second,
    relative to the best of the grid) is at least ``efficiency``."""
    ok = [int(r["flip_examples"]) for r in rows if r["efficiency"] >= efficiency]
    return min(ok) if ok else int(max(rows, key=lambda r: r["efficiency"])["flip_examples"])
