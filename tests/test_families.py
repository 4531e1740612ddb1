"""The gate-family contract, checked over every registered family (pruning_lib.gates.families).

For each family and model: attach, move the gates away from their initial values so that some channels
close, then
* gate and weight parameters split model.parameters() exactly;
* the penalty is a finite scalar with a gradient to the gate parameters;
* state_dict, deepcopy and pickle round trips give the same eval-mode outputs;
* the compacted model equals the gated model in eval mode, and is smaller.
A new family written below in 19 lines (gate module and family, blank lines not counted) (`Sigmoid`) passes the same contract.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from pruning_lib.gates import families
from pruning_lib.data import TensorSplit
from pruning_lib.models import build_model

MODELS = ("lenet300_100", "lenet5_caffe", "resnet20")


def _input(name: str, n: int = 16) -> torch.Tensor:
    if name == "resnet20":
        return torch.randn(n, 3, 32, 32)
    return torch.randn(n, 1, 28, 28)


def _build(name: str) -> nn.Module:
    if name == "resnet20":
        return build_model(name, in_channels=3, image_size=32)
    return build_model(name)


# ---- a new family, written here to show what one costs: gates sigmoid(s), pruned below 1/2 ----------------
class SigmoidGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        from pruning_lib.gates import scale_channels
        return scale_channels(x, torch.sigmoid(self.s) * (self.s > 0))


class Sigmoid(families.GateFamily):
    name, gate_type = "test_sigmoid", SigmoidGate

    def attach(self, model):
        from pruning_lib.gates import set_gates, slot_of
        set_gates(model, {g.name: SigmoidGate(slot_of(model, g).channels) for g in model.channel_groups()})
        return model

    def penalty(self, model):
        return sum(torch.sigmoid(g.s).sum() for g in self.gates(model).values())

    def decide(self, model):
        return ({k: g.s.detach() > 0 for k, g in self.gates(model).items()},
                {k: torch.sigmoid(g.s.detach()) * (g.s.detach() > 0) for k, g in self.gates(model).items()})


families.register(Sigmoid)
ALL = families.names()


def _perturb(fam: families.GateFamily, model: nn.Module, x: torch.Tensor) -> None:
    """Close about a third of the channels (and leave the rest open) in the family's own terms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in fam.gates(model).values():
            for name, p in gate.named_parameters():
                if fam.name == "bernoulli":  # theta in [0, 1]: some exactly 0, the others in (0.3, 1]
                    p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.35, 0.0,
                                        0.3 + 0.7 * torch.rand(p.shape, generator=g)))
                elif p.dim() == 1 and name != "net.0.bias":
                    p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.35, -6.0, 4.0)
                            + 0.1 * torch.randn(p.shape, generator=g))
        gen = getattr(model, "gate_generator", None)
        if gen is not None:  # Dep-L0: log_alphas come from the generator; shift its output biases
            for m in gen.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.copy_(torch.where(torch.rand(m.bias.shape, generator=g) < 0.35, -6.0, 4.0))
    fam.calibrate(model, TensorSplit(x, torch.zeros(len(x), dtype=torch.long))
                  if fam.name == "polarization" else None)


def _setup(family: str, model_name: str):
    torch.manual_seed(0)
    fam = families.get(family)
    model = fam.attach(_build(model_name))
    x = _input(model_name)
    model.train()
    model(x)  # one training-mode forward (BN statistics move; per-input gates record their values)
    _perturb(fam, model, x)
    model.eval()
    return fam, model, x


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", ALL)
def test_gate_family_contract(family, model_name):
    fam, model, x = _setup(family, model_name)
    assert fam.gates(model), "attach put no gates in the slots"

    # the parameters split exactly, by identity, in one place
    gate_p, weight_p = fam.gate_parameters(model), fam.weight_parameters(model)
    assert gate_p and weight_p
    ids = [id(p) for p in gate_p] + [id(p) for p in weight_p]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}

    # a finite scalar penalty with a gradient to the gates (polarization's comes from the last forward)
    if family == "polarization":
        from pruning_lib.methods.polarization import set_mode
        set_mode(model, "dynamic")
        model.train()
        model(x)
    pen = fam.penalty(model)
    assert pen.dim() == 0 and torch.isfinite(pen)
    if family != "bernoulli":  # Bernoulli's theta gradient comes from its estimator, not autograd
        pen.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_p)
    if family == "polarization":
        _perturb(fam, model, x)
    model.zero_grad(set_to_none=True)
    model.eval()

    with torch.no_grad():
        y = model(x)

        # round trips: state_dict into a fresh attached model, deepcopy, pickle
        twin = fam.attach(_build(model_name))
        if family == "polarization":
            from pruning_lib.methods.polarization import set_mode
            set_mode(twin, "static")
        twin.load_state_dict(model.state_dict())
        twin.eval()
        torch.testing.assert_close(twin(x), y)
        torch.testing.assert_close(copy.deepcopy(model)(x), y)
        buf = io.BytesIO()
        pickle.dump(model, buf)
        torch.testing.assert_close(pickle.loads(buf.getvalue())(x), y)

        # the compacted network equals the gated one in eval mode, and is smaller
        keep, _ = fam.decide(model)
        assert any(not bool(k.all()) for k in keep.values()), "nothing closed: the test would not test"
        small = fam.compact(model).eval()
        torch.testing.assert_close(small(x), y, rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_registry_names_every_book_family_and_rejects_unknown():
    assert {"l0_hc", "dep_l0", "bernoulli", "polarization"} <= set(families.names())
    with pytest.raises(KeyError, match="registered"):
        families.get("no_such_family")


def test_polarization_decide_needs_calibration():
    fam = families.get("polarization")
    model = fam.attach(build_model("lenet300_100"))
    with pytest.raises(RuntimeError, match="calibrate"):
        fam.decide(model)
    with pytest.raises(ValueError, match="split"):
        fam.calibrate(model, None)
