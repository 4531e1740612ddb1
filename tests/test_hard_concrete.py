"""Hard-concrete gates, the Dep-L0 gate generator, the two penalties, and compaction of gated networks."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from pruning_lib.methods import hard_concrete as hc
from pruning_lib.gates import get_gates
from pruning_lib.metrics import count_parameters
from pruning_lib.models import build_model


def test_prob_nonzero_matches_monte_carlo():
    torch.manual_seed(0)
    la = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    z = hc.sample_gate(la, n=200_000)
    mc = (z > 0).float().mean(0)
    assert torch.allclose(hc.prob_nonzero(la), mc, atol=4e-3), (hc.prob_nonzero(la), mc)
    # The closed form of papers.md: sigmoid(log_alpha + 1.5987).
    assert torch.allclose(hc.prob_nonzero(la), torch.sigmoid(la + 1.5987), atol=1e-4)


def test_samples_lie_in_unit_interval_with_mass_at_both_ends():
    torch.manual_seed(0)
    z = hc.sample_gate(torch.zeros(1000))
    assert z.min() == 0 and z.max() == 1 and ((z > 0) & (z < 1)).any()


def test_test_time_gate_formula():
    la = torch.tensor([-10.0, -2.0, 0.0, 1.0, 2.0, 10.0])
    expected = torch.clamp(torch.sigmoid(la) * 1.2 - 0.1, 0, 1)
    assert torch.allclose(hc.test_gate(la), expected)
    assert hc.test_gate(torch.tensor(0.0)) == pytest.approx(0.5)
    assert hc.test_gate(torch.tensor(-10.0)) == 0 and hc.test_gate(torch.tensor(10.0)) == 1
    # log_alpha = log(0.1 / 1.2) is where the test-time gate starts to be exactly zero.
    edge = math.log(0.1 / 1.1)
    assert hc.test_gate(torch.tensor(edge - 1e-3)) == 0 and hc.test_gate(torch.tensor(edge + 1e-2)) > 0


def test_gate_samples_one_vector_per_example_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    gate = hc.L0Gate(6, init=0.0)
    x = torch.ones(5, 6, 3, 3)
    gate.train()
    y = gate(x)
    assert y.shape == x.shape
    per_example = y[:, :, 0, 0]
    assert not torch.allclose(per_example[0], per_example[1])  # one sample per example
    assert torch.equal(y[:, :, 0, 0], y[:, :, 2, 1])  # the same value over a channel's positions
    gate.eval()
    assert torch.allclose(gate(x), x * gate.test_gate().view(1, -1, 1, 1))
    gate.train()
    gate.fixed = True  # fine-tune phase: deterministic and detached even in training mode
    out = gate(x)
    assert torch.allclose(out, x * gate.test_gate().view(1, -1, 1, 1)) and not out.requires_grad


def test_l0_gate_init_and_clamp():
    gate = hc.L0Gate(4, init=hc.log_alpha_from_drop_rate(0.5), noise=0.0)
    assert torch.allclose(gate.log_alpha, torch.zeros(4))
    with torch.no_grad():
        gate.log_alpha_param.copy_(torch.tensor([-9.0, 0.0, 2.0, 9.0]))
    gate.clamp_()
    la = gate.log_alpha.detach()
    assert float(la.min()) == pytest.approx(math.log(0.01)) and float(la.max()) == pytest.approx(math.log(100))


def _lenet(width=0.1):
    torch.manual_seed(0)
    return build_model("lenet5_caffe", width=width)  # conv1 2, conv2 5, fc1 50 channels


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_generator_formula_and_gradients_reach_its_weights(direction):
    model = _lenet()
    gen = hc.attach_dep_l0_gates(model, direction)
    assert gen.sizes == [2, 5, 50]
    chain = list(gen.chain) if direction == "forward" else list(gen.chain)[::-1]
    # Hand-computed chain: la_1 = ln100 tanh(W_1 1 + b_1), la_l = ln100 tanh(W_l la_(l-1) + b_l).
    if direction == "forward":
        la1 = math.log(100) * torch.tanh(chain[0](torch.ones(2)))
        la2 = math.log(100) * torch.tanh(chain[1](la1))
        assert torch.allclose(gen.log_alphas()[1], la2)
    else:
        la3 = math.log(100) * torch.tanh(chain[2](torch.ones(50)))
        la2 = math.log(100) * torch.tanh(chain[1](la3))
        assert torch.allclose(gen.log_alphas()[1], la2)
    # The task loss alone and the penalty alone both send gradients into every generator weight (biases at
    # 0 and small weights here: in saturation every sampled gate is clipped to 0 or 1, where the gradient is 0).
    with torch.no_grad():
        for lin in gen.chain:
            lin.bias.zero_()
            lin.weight.mul_(0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    model.zero_grad()
    cost = hc.CostModel(_lenet(), (1, 28, 28))
    cost.expected_params(model).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gen.named_parameters() if "weight" in n)


def test_generator_runs_once_per_forward():
    model = _lenet()
    gen = hc.attach_dep_l0_gates(model)
    calls = []
    gen.chain[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 1, 28, 28)
    model(x)
    assert len(calls) == 1  # three gated layers, one generator evaluation
    model(x)
    assert len(calls) == 2  # a new forward recomputes (the previous graph may be freed)
    gen.log_alphas()
    assert len(calls) == 3  # outside a forward nothing is cached ...
    model(x).sum().backward()
    # ... so a penalty computed after a backward() never reuses the freed graph of that forward.
    hc.CostModel(_lenet(), (1, 28, 28)).expected_params(model).backward()


def test_dep_l0_survives_deepcopy_state_dict_and_pickle():
    model = _lenet()
    hc.attach_dep_l0_gates(model, "backward")
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    ref = model(x)
    keys = [k for k in model.state_dict() if "gate" in k]
    assert keys and all(k.startswith("gate_generator.chain.") for k in keys)
    twin = copy.deepcopy(model)
    gates = get_gates(twin)
    assert all(g.generator is twin.gate_generator for g in gates.values())
    assert twin.gate_generator is not model.gate_generator
    with torch.no_grad():  # the copy's gates read the copy's generator, not the original's
        twin.gate_generator.chain[-1].bias.fill_(-10.0)
    assert torch.allclose(model(x), ref) and not torch.allclose(twin(x), ref)
    fresh = _lenet()
    fresh.features[0].weight.data.zero_()
    hc.attach_dep_l0_gates(fresh, "backward")
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.allclose(fresh(x), ref)
    unpickled = pickle.loads(pickle.dumps(model))
    assert torch.allclose(unpickled(x), ref)


def _set_log_alphas(model, values: dict[str, torch.Tensor]):
    for name, g in get_gates(model).items():
        with torch.no_grad():
            g.log_alpha_param.copy_(values[name])


def test_expected_parameter_count_penalty_by_hand():
    model = _lenet()
    cost = hc.CostModel(model, (1, 28, 28))
    hc.attach_l0_gates(model)
    torch.manual_seed(1)
    las = {"conv1": torch.randn(2), "conv2": torch.randn(5), "fc1": torch.randn(50)}
    _set_log_alphas(model, las)
    e1, e2, e3 = (float(torch.sigmoid(las[k] - (2 / 3) * math.log(0.1 / 1.1)).sum()) for k in ("conv1", "conv2", "fc1"))
    # conv1: 1 input channel x 5x5 x E1; conv2: E1 x 5x5 x E2; fc1: E2 x (4x4 positions) x E3; classifier E3 x 10.
    by_hand = 1 * 25 * e1 + e1 * 25 * e2 + e2 * 16 * e3 + e3 * 10
    assert float(cost.expected_params(model).detach()) == pytest.approx(by_hand, rel=1e-5)
    # FLOPs: the same terms times output positions (24x24, 8x8, 1, 1) and 2 per multiply-add.
    flops = 2 * (1 * 25 * e1 * 576 + e1 * 25 * e2 * 64 + e2 * 16 * e3 + e3 * 10)
    assert float(cost.expected_flops(model).detach()) == pytest.approx(flops, rel=1e-5)
    # Louizos' L0: each channel's weights (+ bias) at nominal input width, times P(z != 0), over N.
    louizos = (e1 * (25 + 1) + e2 * (2 * 25 + 1) + e3 * (5 * 16 + 1)) / 100
    assert float(cost.louizos_l0(model, n_data=100).detach()) == pytest.approx(louizos, rel=1e-5)
    # With every gate surely on, the expected count is the nominal one.
    assert cost.nominal_params() == 25 * 2 + 2 * 25 * 5 + 5 * 16 * 50 + 50 * 10


def test_conv_scope_counts_the_convolutions_only():
    """The official Dep-L0 code penalises the gated conv layers (``regularization()`` walks them); with
    ``layers="conv"`` the linear layers drop out of the count and their gates get no gradient from it."""
    model = _lenet()
    cost = hc.CostModel(model, (1, 28, 28))
    hc.attach_l0_gates(model)
    torch.manual_seed(2)
    las = {"conv1": torch.randn(2), "conv2": torch.randn(5), "fc1": torch.randn(50)}
    _set_log_alphas(model, las)
    e1, e2, e3 = (float(torch.sigmoid(las[k] - (2 / 3) * math.log(0.1 / 1.1)).sum()) for k in ("conv1", "conv2", "fc1"))
    conv = 1 * 25 * e1 + e1 * 25 * e2
    assert float(cost.expected_params(model, "conv").detach()) == pytest.approx(conv, rel=1e-5)
    assert float(cost.expected_params(model, "all").detach()) == pytest.approx(conv + e2 * 16 * e3 + e3 * 10, rel=1e-5)
    assert cost.nominal_params("conv") == 25 * 2 + 2 * 25 * 5
    cost.expected_params(model, "conv").backward()
    gates = get_gates(model)
    fc1 = gates["fc1"].log_alpha_param.grad
    assert fc1 is None or float(fc1.abs().sum()) == 0.0
    assert float(gates["conv1"].log_alpha_param.grad.abs().min()) > 0
    assert float(gates["conv2"].log_alpha_param.grad.abs().min()) > 0
    with pytest.raises(ValueError):
        cost.expected_params(model, "linear")


@pytest.mark.parametrize("name,method", [("lenet5_caffe", "l0_hc"), ("small_vgg", "dep_l0_forward"),
                                         ("small_vgg", "l0_hc")])
def test_compaction_preserves_outputs_and_reaches_the_effective_count(name, method):
    torch.manual_seed(0)
    model = build_model(name, width=0.25)
    if method == "l0_hc":
        hc.attach_l0_gates(model)
        for g in get_gates(model).values():  # about half the channels off, never all of a layer
            with torch.no_grad():
                g.log_alpha_param.copy_(torch.randn_like(g.log_alpha_param) * 3)
                g.log_alpha_param[0] = 3.0
    else:
        gen = hc.attach_dep_l0_gates(model)
        with torch.no_grad():
            for lin in gen.chain:
                lin.bias.copy_(torch.randn_like(lin.bias))
                lin.bias[0] = 5.0
    # Random BN statistics, so that folding the gates into BN is really tested.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    keep, scale = hc.keep_and_scale(model)
    assert 0 < sum(int(k.sum()) for k in keep.values()) < sum(k.numel() for k in keep.values())
    small = hc.compact_gated(model)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert not hasattr(small, "gate_generator")
    # Effective parameter count computed from the keep masks: every weight between two kept channels,
    # the biases of kept outputs and the BN affine pair of every kept channel.
    groups = model.channel_groups()
    kept = {g.producer: int(keep[g.name].sum()) for g in groups}
    kept_in = {c: (int(keep[g.name].sum()), g.spatial) for g in groups for c in g.consumers}
    effective = 0
    for path, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not path.startswith("gate_generator"):
            if isinstance(m, torch.nn.Conv2d):
                n_in, n_out, fan = m.in_channels, m.out_channels, m.kernel_size[0] * m.kernel_size[1]
            else:
                n_in, n_out, fan = m.in_features, m.out_features, 1
            if path in kept_in:
                n_in = kept_in[path][0] * kept_in[path][1]
            n_out = kept.get(path, n_out)
            effective += n_in * fan * n_out + (n_out if m.bias is not None else 0)
        elif isinstance(m, torch.nn.BatchNorm2d):
            effective += 2 * kept[path.rsplit(".", 1)[0] + "." + str(int(path.rsplit(".", 1)[1]) - 1)]
    assert count_parameters(small) == effective < count_parameters(build_model(name, width=0.25))
