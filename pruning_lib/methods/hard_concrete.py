"""Hard-concrete gates for L0 regularisation (Louizos et al. 2018) and the Dep-L0 gate generator (Li & Ji 2021).

Chapter 03 ("Dep-L0 against L0-HC", :mod:`pruning_lib.chapters.dep_l0`) explains and measures these pieces.

A hard-concrete gate ``z`` in ``[0, 1]`` multiplies one output channel (conv) or unit (linear).  Its
distribution is a *stretched and clipped* binary concrete with location ``log_alpha`` (Louizos et al. 2018,
Sec. 4, Eq. 10-13):

* train:  ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)``, one sample per example (``z`` has shape ``[N, C]``);
* test:   ``z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (the official code's estimator);
* ``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (Eq. 12), the term of the expected L0 norm.

with ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1`` (both official repositories).

Two ways to get ``log_alpha``:

* **L0-HC** (:class:`L0Gate`): one free parameter per channel, independent of all others.
* **Dep-L0** (:class:`GateGenerator` + :class:`GeneratedGate`): a chain of ``Linear`` layers fed a constant
  vector of ones, ``la_1 = ln(100) * tanh(W_1 1 + b_1)``, ``la_l = ln(100) * tanh(W_l la_(l-1) + b_l)``, run
  through the layers in network order (``"forward"``) or in reverse (``"backward"``), so that each layer's
  gates depend on its neighbours' (Li & Ji 2021, Sec. 3; ``models/vgg.py`` of the official code).  The
  generator is one sub-module of the model (``model.gate_generator``, so it is in ``state_dict`` and survives
  ``deepcopy``); it computes every layer's ``log_alpha`` once per forward and each slot's gate reads its slice.

Penalties (:class:`CostModel`):

* :meth:`CostModel.louizos_l0` - Louizos' expected L0 norm: each channel's weight count times ``P(z != 0)``,
  with the input channels counted at their nominal number (independent groups), divided by the data size.
* :meth:`CostModel.expected_params` - Dep-L0's expected parameter count ``sum_l k_l^2 E[C_in^l] E[C_out^l]``
  with ``E[C] = sum_c P(z_c != 0)`` chained, ``E[C_in^l] = E[C_out^(l-1)]`` (official ``SparseChannel._reg_w``),
  over the conv layers only (``layers="conv"``, the official code's scope) or over every conv and linear layer;
  :meth:`CostModel.expected_flops` is the same sum weighted by each layer's output positions.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

from ..gates import compact, get_gates, scale_channels, set_gates
from ..train import Callback, Method, adam

__all__ = [
    "BETA", "GAMMA", "ZETA", "LOG_ALPHA_RANGE", "LAYER_SCOPES",
    "sample_gate", "test_gate", "prob_nonzero", "log_alpha_from_drop_rate",
    "HardConcreteGate", "L0Gate", "GateGenerator", "GeneratedGate",
    "attach_l0_gates", "attach_dep_l0_gates", "gate_log_alphas", "gate_probabilities", "set_fixed",
    "gate_parameters", "CostModel", "PENALTIES", "sparsity_penalty", "ClampLogAlpha", "GateMonitor",
    "ResumableGateMonitor", "keep_and_scale", "compact_gated",
]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # clamp of the free log_alphas (official code)
LAYER_SCOPES = ("all", "conv")  # which layers CostModel.expected_params counts
_EPS = 1e-6  # u is drawn from U(eps, 1 - eps), as in the official code


def sample_gate(log_alpha: torch.Tensor, n: int | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Training-time gates (Louizos et al. Eq. 10-11): shape ``[n, C]`` (one sample per example) or ``[C]``."""
    shape = (log_alpha.shape[-1],) if n is None else (n, log_alpha.shape[-1])
    u = torch.rand(shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u * (1 - 2 * _EPS) + _EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def test_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic test-time gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` (Louizos et al. Eq. 12)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def log_alpha_from_drop_rate(p: float) -> float:
    """Louizos' initialisation ``log((1 - p) / p)`` from a drop rate ``p``."""
    return math.log((1 - p) / p)


class HardConcreteGate(nn.Module):
    """Base class: multiplies its input channel-wise by hard-concrete gates of location :attr:`log_alpha`.

    In training mode one gate vector is sampled per example (``z`` of shape ``[N, C]``); in eval mode, or
    when :attr:`fixed` is set (the fine-tune phase), the deterministic test-time gate is used, and with
    ``fixed`` it is detached so that the gates no longer learn.
    """

    fixed: bool = False

    @property
    def log_alpha(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        la = self.log_alpha
        if self.fixed:
            z = test_gate(la).detach()
        elif self.training:
            z = sample_gate(la, n=x.shape[0])
        else:
            z = test_gate(la)
        return scale_channels(x, z)

    def prob_nonzero(self) -> torch.Tensor:
        return prob_nonzero(self.log_alpha)

    def test_gate(self) -> torch.Tensor:
        return test_gate(self.log_alpha)


class L0Gate(HardConcreteGate):
    """L0-HC: one free ``log_alpha`` per channel (Louizos et al. 2018), initialised to ``init`` (+ N(0, 0.01)
    noise as in the code)."""

    def __init__(self, channels: int, init: float = 3.0, noise: float = 1e-2):
        super().__init__()
        self.log_alpha_param = nn.Parameter(torch.full((channels,), float(init)) + noise * torch.randn(channels))

    @property
    def log_alpha(self) -> torch.Tensor:
        return self.log_alpha_param

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``log_alpha`` in ``[ln 0.01, ln 100]`` (the official code does this after every step)."""
        self.log_alpha_param.clamp_(*LOG_ALPHA_RANGE)


class GateGenerator(nn.Module):
    """Dep-L0's gate generator: an MLP chained through the gated layers (Li & Ji 2021, Sec. 3).

    Args:
        sizes: channels of the gated layers, in network order.
        direction: ``"forward"`` (the chain runs from the first layer to the last) or ``"backward"``.
        bias_init: mean of the generator biases (N(3, 0.01) in the official code: gates start mostly open).

    The chain's input is a constant vector of ones as long as its first layer; layer ``l`` of the chain is
    ``Linear(C_prev, C_l)`` and ``log_alpha_l = ln(100) tanh(W_l log_alpha_prev + b_l)``.  :meth:`log_alphas`
    returns them in network order whatever the direction.  During a forward of the model it is attached to
    (hooks installed by :func:`attach_dep_l0_gates`) the result is cached, so all gates of one forward share
    one evaluation; outside a forward (penalties, logging) every call recomputes, so no call ever reuses an
    autograd graph that a ``backward()`` has freed.
    """

    def __init__(self, sizes: list[int], direction: str = "forward", bias_init: float = 3.0):
        super().__init__()
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        self.sizes = [int(s) for s in sizes]
        self.direction = direction
        chain = self.sizes if direction == "forward" else self.sizes[::-1]
        layers, prev = [], chain[0]
        for c in chain:
            lin = nn.Linear(prev, c)
            nn.init.normal_(lin.bias, bias_init, 1e-2)
            layers.append(lin)
            prev = c
        self.chain = nn.ModuleList(layers)
        self.register_buffer("ones", torch.ones(chain[0]), persistent=False)
        self._cache: tuple | None = None
        self._caching = False  # on only while the model's forward runs (see attach_dep_l0_gates)
        self._params: tuple | None = None  # the parameters, listed once per forward (see _key)

    def clear_cache(self) -> None:
        self._cache = None

    def begin_forward(self) -> None:
        self._cache, self._caching = None, True
        self._params = tuple(self.parameters())

    def end_forward(self) -> None:
        self._cache, self._caching, self._params = None, False, None

    def _key(self) -> tuple:
        # Every gate asks once per forward: walk the module tree once per forward, not twice per gate
        # (issue 15: Python overhead of the Dep-L0 step).
        params = self._params if self._caching and self._params is not None else tuple(self.parameters())
        return (torch.is_grad_enabled(),) + tuple(p._version for p in params) + tuple(id(p) for p in params)

    def log_alphas(self) -> list[torch.Tensor]:
        """``log_alpha`` of every gated layer, in network order (computed once, then cached)."""
        key = self._key()
        if self._caching and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        la, out = self.ones, []
        for lin in self.chain:
            la = math.log(100.0) * torch.tanh(lin(la))
            out.append(la)
        if self.direction == "backward":
            out = out[::-1]
        if self._caching:
            self._cache = (key, out)
        return out

    def forward(self) -> list[torch.Tensor]:
        return self.log_alphas()

    def __getstate__(self):  # the cache holds autograd graphs: never pickle / deepcopy it
        state = self.__dict__.copy()
        state["_cache"], state["_params"] = None, None
        return state

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, direction={self.direction!r}"


class GeneratedGate(HardConcreteGate):
    """Dep-L0 gate of one layer: reads slice ``index`` of the shared :class:`GateGenerator`.

    The generator is *not* a sub-module of the gate (it is registered once on the model); the gate keeps a
    plain reference, which ``copy.deepcopy`` of the model maps to the copied generator.
    """

    def __init__(self, generator: GateGenerator, index: int):
        super().__init__()
        object.__setattr__(self, "generator", generator)  # plain attribute, not a sub-module
        self.index = int(index)

    @property
    def log_alpha(self) -> torch.Tensor:
        return self.generator.log_alphas()[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}, channels={self.generator.sizes[self.index]}"


def _generator_begin(model: nn.Module, args) -> None:
    """Forward pre-hook: the generator computes the log_alphas once for this forward."""
    gen = getattr(model, "gate_generator", None)
    if gen is not None:
        gen.begin_forward()


def _generator_end(model: nn.Module, args, output) -> None:
    gen = getattr(model, "gate_generator", None)
    if gen is not None:
        gen.end_forward()


def attach_l0_gates(model: nn.Module, init: float = 3.0) -> dict[str, L0Gate]:
    """Put an :class:`L0Gate` in the slot of every channel group of ``model`` (L0-HC)."""
    gates = {}
    for g in model.channel_groups():
        slot = model.get_submodule(g.slot)
        gates[g.name] = L0Gate(slot.channels, init).to(_device(model))
    set_gates(model, gates)
    return gates


def attach_dep_l0_gates(model: nn.Module, direction: str = "forward", bias_init: float = 3.0
                        ) -> GateGenerator:
    """Dep-L0: register a :class:`GateGenerator` as ``model.gate_generator`` and put a :class:`GeneratedGate`
    reading it in the slot of every channel group (in ``channel_groups()`` order = network order)."""
    groups = model.channel_groups()
    sizes = [model.get_submodule(g.slot).channels for g in groups]
    gen = GateGenerator(sizes, direction, bias_init).to(_device(model))
    model.gate_generator = gen
    if not getattr(model, "_dep_l0_hook", False):
        model.register_forward_pre_hook(_generator_begin)
        model.register_forward_hook(_generator_end)
        model._dep_l0_hook = True
    set_gates(model, {g.name: GeneratedGate(gen, i) for i, g in enumerate(groups)})
    return gen


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _hc_gates(model: nn.Module) -> dict[str, HardConcreteGate]:
    return {k: g for k, g in get_gates(model).items() if isinstance(g, HardConcreteGate)}


def gate_log_alphas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: g.log_alpha for k, g in _hc_gates(model).items()}


def gate_probabilities(model: nn.Module) -> dict[str, torch.Tensor]:
    """``P(z != 0)`` of every channel, by group name."""
    return {k: g.prob_nonzero() for k, g in _hc_gates(model).items()}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the gates (free log_alphas or the generator), for the gates' own optimizer."""
    params = [p for g in _hc_gates(model).values() for p in g.parameters()]
    gen = getattr(model, "gate_generator", None)
    if gen is not None:
        params += list(gen.parameters())
    return params


def set_fixed(model: nn.Module, fixed: bool = True) -> None:
    """Fix every hard-concrete gate at its deterministic value (the fine-tune phase) or release it."""
    for g in _hc_gates(model).values():
        g.fixed = fixed


class CostModel:
    """Expected parameters / FLOPs of a gated network, and Louizos' expected L0, as differentiable functions
    of the gate probabilities.

    Built once from the un-gated geometry (a forward of one example records each conv / linear layer's
    output positions).  For every layer ``l``: ``E[in_l]`` is the expected channel count of the group feeding
    it (times its features per channel after a flatten) or its nominal input size; ``E[out_l]`` the expected
    channel count of its own group or its nominal output size; ``fan_l`` the kernel area (1 for Linear).
    Biases and norms are left out, as in the official code.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        groups = model.channel_groups()
        out_group = {g.producer: g.name for g in groups}
        in_group = {c: g.name for g in groups for c in g.consumers}
        self.group_channels = {g.name: model.get_submodule(g.slot).channels for g in groups}
        positions: dict[str, int] = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("gate_generator"):
                hooks.append(m.register_forward_hook(
                    lambda mod, i, o, name=name: positions.__setitem__(name, int(o[0, 0].numel()))))
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device(model)))
        model.train(was)
        for h in hooks:
            h.remove()
        self.layers = []
        for name, m in model.named_modules():
            if name not in positions:
                continue
            if isinstance(m, nn.Conv2d):
                n_in, n_out, fan = m.in_channels, m.out_channels, m.kernel_size[0] * m.kernel_size[1]
                if m.groups != 1:
                    raise NotImplementedError("grouped convolutions")
            else:
                n_in, n_out, fan = m.in_features, m.out_features, 1
            g_in = in_group.get(name)
            per_in = n_in // self.group_channels[g_in] if g_in is not None else 1  # features per channel
            self.layers.append(dict(layer=name, conv=isinstance(m, nn.Conv2d), in_group=g_in,
                                    out_group=out_group.get(name), n_in=n_in, n_out=n_out, per_in=per_in, fan=fan,
                                    positions=positions[name]))
        self.producer_weights = {out_group[name]: m.weight[0].numel() + (m.bias is not None)
                                 for name, m in model.named_modules() if name in out_group}

    def _expected(self, probs: Mapping[str, torch.Tensor], flops: bool, layers: str = "all"):
        if layers not in LAYER_SCOPES:
            raise ValueError(f"layers must be one of {LAYER_SCOPES}, got {layers!r}")
        total = 0.0
        for l in self.layers:
            if layers == "conv" and not l["conv"]:
                continue
            e_in = probs[l["in_group"]].sum() * l["per_in"] if l["in_group"] in probs else l["n_in"]
            e_out = probs[l["out_group"]].sum() if l["out_group"] in probs else l["n_out"]
            term = e_in * l["fan"] * e_out
            total = total + (2 * l["positions"] * term if flops else term)
        return total if torch.is_tensor(total) else torch.tensor(float(total))

    def expected_params(self, model_or_probs, layers: str = "all") -> torch.Tensor:
        """Dep-L0's penalty term ``sum_l fan_l E[C_in^l] E[C_out^l]`` (chained expected channel counts).

        ``layers="all"`` sums every conv and linear layer (the classifier included): the expected parameter
        count of the whole network.  ``layers="conv"`` sums the convolutions only, the scope of the official
        Dep-L0 code, whose ``regularization()`` walks the gated conv layers (``SparseChannel``) and leaves the
        classifier out; its VGG-16 and ResNets have no hidden linear layer."""
        return self._expected(self._probs(model_or_probs), flops=False, layers=layers)

    def expected_flops(self, model_or_probs, layers: str = "all") -> torch.Tensor:
        """Expected FLOPs of one example (2 per multiply-add; weights of convs and linears only, or of the
        convs only with ``layers="conv"``)."""
        return self._expected(self._probs(model_or_probs), flops=True, layers=layers)

    def nominal_params(self, layers: str = "all") -> int:
        return int(self._expected({}, flops=False, layers=layers))

    def nominal_flops(self, layers: str = "all") -> int:
        return int(self._expected({}, flops=True, layers=layers))

    def louizos_l0(self, model_or_probs, n_data: int = 1) -> torch.Tensor:
        """Louizos et al.'s group L0 penalty: ``(1 / N) sum_channels P(z != 0) * |weights of the channel|``
        with input channels at their nominal count (the groups are independent)."""
        probs = self._probs(model_or_probs)
        total = sum(p.sum() * self.producer_weights[k] for k, p in probs.items())
        return total / n_data

    @staticmethod
    def _probs(model_or_probs) -> dict[str, torch.Tensor]:
        if isinstance(model_or_probs, nn.Module):
            return gate_probabilities(model_or_probs)
        return dict(model_or_probs)


PENALTIES = ("conv_params", "params", "l0")  # the sparsity penalties of sparsity_penalty


def sparsity_penalty(cost: CostModel, kind: str, lam: float, n_data: int = 1
                     ) -> Callable[[nn.Module], torch.Tensor]:
    """``model -> lam * penalty``, an entry of ``fit``'s ``penalties``, under one of :data:`PENALTIES`:

    * ``"conv_params"``: Dep-L0's expected parameter count of the conv layers (:meth:`CostModel.expected_params`
      with ``layers="conv"``, the official code's scope);
    * ``"params"``: the same over every conv and linear layer;
    * ``"l0"``: Louizos' expected L0 (:meth:`CostModel.louizos_l0`, divided by the data size ``n_data``)."""
    if kind in ("conv_params", "params"):
        layers = "conv" if kind == "conv_params" else "all"
        return lambda m: lam * cost.expected_params(m, layers)
    if kind == "l0":
        return lambda m: lam * cost.louizos_l0(m, n_data)
    raise ValueError(f"penalty must be one of {PENALTIES}, got {kind!r}")


class ClampLogAlpha(Callback):
    """After every optimizer step, clamp L0-HC's free log_alphas to ``[ln 0.01, ln 100]`` (official code)."""

    def after_step(self, state) -> None:
        for g in _hc_gates(state.model).values():
            if isinstance(g, L0Gate):
                g.clamp_()


class HardConcretePruning(Method):
    """L0-HC or Dep-L0 gates (attached beforehand) as a :class:`~pruning_lib.train.Method` of ``fit``: Adam
    on the weights at ``fit``'s ``lr`` and Adam on the gates at ``gate_lr`` (two optimizers, as the official
    code), the sparsity penalty ``{name: penalty(model)}``, and L0-HC's log-alpha clamp after each step."""

    def __init__(self, model: nn.Module, penalty: Callable[[nn.Module], torch.Tensor], gate_lr: float,
                 name: str = "sparsity"):
        if not _hc_gates(model):
            raise ValueError("the model has no hard-concrete gates: attach L0-HC or Dep-L0 gates first")
        self.model, self.penalty, self.gate_lr, self.name = model, penalty, gate_lr, name
        self._clamp = ClampLogAlpha()

    def optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        gates = gate_parameters(self.model)
        ids = {id(p) for p in gates}
        return [adam([p for p in self.model.parameters() if id(p) not in ids], lr=lr),
                adam(gates, lr=self.gate_lr)]

    def penalties(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {self.name: self.penalty}

    def after_step(self, state) -> None:
        self._clamp.after_step(state)


class GateMonitor(Callback):
    """Tracks how much the gates prune: the expected FLOPs / parameters kept, the expected L0 (mean of
    ``P(z != 0)``) and the fraction of channels whose test-time gate is non-zero.

    :meth:`log` adds them to every evaluation row of ``fit``'s history; with ``every=k`` they are also
    recorded every ``k`` optimizer steps in :attr:`trace` (cheap: no evaluation of the network).
    """

    def __init__(self, cost: CostModel, every: int | None = None):
        self.cost, self.every = cost, every
        self.trace: list[dict[str, float]] = []

    def measure(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            probs = gate_probabilities(model)
            if not probs:
                return {}
            kept = sum(int((g.test_gate() > 0).sum()) for g in _hc_gates(model).values())
            total = sum(p.numel() for p in probs.values())
            return {"expected_flops_kept": float(self.cost.expected_flops(probs)) / self.cost.nominal_flops(),
                    "expected_params_kept": float(self.cost.expected_params(probs)) / self.cost.nominal_params(),
                    "expected_l0_kept": float(sum(p.sum() for p in probs.values())) / total,
                    "channels_kept": kept / total}

    def log(self, state) -> dict[str, float]:
        return self.measure(state.model)

    def after_step(self, state) -> None:
        if self.every and (state.step % self.every == 0 or state.step == 1):
            self.trace.append({"step": state.step, **self.measure(state.model)})


class ResumableGateMonitor(GateMonitor):
    """A :class:`GateMonitor` whose trace is saved in ``fit``'s checkpoint (a resumed run keeps its trace)."""

    def state_dict(self) -> dict:
        return {"trace": [dict(r) for r in self.trace]}

    def load_state_dict(self, state: dict) -> None:
        self.trace = [dict(r) for r in state["trace"]]


@torch.no_grad()
def keep_and_scale(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From the test-time gates: ``keep`` (z > 0) and ``scale`` (z) of every gated group, for compaction."""
    keep, scale = {}, {}
    for name, g in _hc_gates(model).items():
        z = g.test_gate().detach()
        keep[name], scale[name] = z > 0, z
    return keep, scale


def compact_gated(model: nn.Module) -> nn.Module:
    """The physically smaller dense network equal to ``model``'s test-time (eval-mode) outputs: channels with
    a zero test-time gate removed, the others' gate values folded in, the gate generator dropped."""
    keep, scale = keep_and_scale(model)
    new = compact(model, keep, scale)
    if hasattr(new, "gate_generator"):
        del new.gate_generator
    return new
