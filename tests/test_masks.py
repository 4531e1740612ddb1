"""Mask invariants (the torch.nn.utils.prune checklist)."""
import copy
import io

import pytest
import torch
from torch import nn

from pruning_lib.masks import (Mask, apply_mask, current_mask, load_masked_state, make_permanent,
                               mask_from_scores, prunable_names, remaining_fraction_per_layer)


def random_mask(model, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return Mask({n: torch.rand(params[n].shape, generator=g) < density for n in prunable_names(model)})


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(1, 1, 1) if False else nn.Linear(16, 4))


def test_prunable_names_are_conv_and_linear_weights():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    assert prunable_names(m) == ["0.weight", "3.weight"]
    assert prunable_names(m, include_bias=True) == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_weight_equals_original_times_mask():
    m = net()
    orig = {n: p.detach().clone() for n, p in m.named_parameters()}
    mask = random_mask(m)
    apply_mask(m, mask)
    for n, keep in mask.items():
        assert torch.equal(dict(m.named_parameters())[n], orig[n] * keep)


def test_gradient_zero_at_masked_entries():
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    m(torch.randn(5, 8)).pow(2).sum().backward()
    for n, keep in mask.items():
        g = dict(m.named_parameters())[n].grad
        assert torch.all(g[~keep] == 0)
        assert torch.any(g[keep] != 0)


@pytest.mark.parametrize("opt", ["adam", "adam_foreach", "adamw", "sgd_momentum"])
def test_masked_entries_stay_zero_after_steps_with_stale_optimizer_state(opt):
    m = net()
    make = {"adam": lambda p: torch.optim.Adam(p, 1e-2),
            "adam_foreach": lambda p: torch.optim.Adam(p, 1e-2, foreach=True),
            "adamw": lambda p: torch.optim.AdamW(p, 1e-2, weight_decay=0.1),
            "sgd_momentum": lambda p: torch.optim.SGD(p, 1e-2, momentum=0.9)}[opt]
    o = make(m.parameters())
    x = torch.randn(16, 8)
    # Build up moments first, so that the optimizer would revive pruned weights if nothing stopped it.
    for _ in range(5):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    mask = random_mask(m)
    apply_mask(m, mask)
    for _ in range(5):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
        for n, keep in mask.items():
            assert torch.all(dict(m.named_parameters())[n][~keep] == 0)


def test_parameter_identity_is_unchanged_so_optimizer_keeps_working():
    m = net()
    before = [id(p) for p in m.parameters()]
    o = torch.optim.Adam(m.parameters(), 1e-2)
    apply_mask(m, random_mask(m))
    assert [id(p) for p in m.parameters()] == before
    w = m[0].weight.detach().clone()
    o.zero_grad(); m(torch.randn(4, 8)).sum().backward(); o.step()
    assert not torch.equal(w, m[0].weight)  # the optimizer still updates the live parameter


def test_make_permanent_leaves_forward_unchanged_and_removes_buffers():
    m = net()
    apply_mask(m, random_mask(m))
    x = torch.randn(3, 8)
    y = m(x)
    make_permanent(m)
    assert torch.equal(m(x), y)
    assert not any(k.endswith("_mask") for k in m.state_dict())
    m(x).sum().backward()  # no hook left: gradient flows to pruned entries again
    assert torch.any(m[0].weight.grad[m[0].weight == 0] != 0)


def test_state_dict_round_trip_restores_mask_and_enforcement():
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = net()
    load_masked_state(m2, torch.load(buf, weights_only=True))
    loaded = current_mask(m2)
    assert set(loaded) == set(mask) and all(torch.equal(loaded[n], mask[n]) for n in mask)
    x = torch.randn(3, 8)
    assert torch.equal(m(x), m2(x))
    o = torch.optim.Adam(m2.parameters(), 1e-1)
    for _ in range(3):
        o.zero_grad(); m2(x).sum().backward(); o.step()
    for n, keep in mask.items():
        assert torch.all(dict(m2.named_parameters())[n][~keep] == 0)


def test_mask_save_load(tmp_path):
    m = net()
    mask = random_mask(m)
    mask.save(tmp_path / "mask.pt")
    back = Mask.load(tmp_path / "mask.pt")
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    assert back.density == pytest.approx(mask.density)


def test_deepcopy_keeps_buffers_and_weights():
    m = net()
    apply_mask(m, random_mask(m))
    c = copy.deepcopy(m)
    assert set(current_mask(c)) == set(current_mask(m))


def test_density_and_layer_density():
    mask = Mask({"a": torch.tensor([True, False, True, False]), "b": torch.tensor([True, True])})
    assert mask.density == pytest.approx(4 / 6)
    assert mask.sparsity == pytest.approx(2 / 6)
    assert mask.layer_density() == {"a": 0.5, "b": 1.0}


def test_mask_from_scores_removes_exact_fraction_of_survivors_per_layer():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(100, generator=g), "b": torch.rand(50, generator=g)}
    m1 = mask_from_scores(scores, {"a": 0.2, "b": 0.1})
    assert int(m1["a"].sum()) == 80 and int(m1["b"].sum()) == 45
    # the lowest scores went
    assert scores["a"][~m1["a"]].max() <= scores["a"][m1["a"]].min()
    m2 = mask_from_scores(scores, {"a": 0.2, "b": 0.1}, current=m1)
    assert int(m2["a"].sum()) == 64 and int(m2["b"].sum()) == 45 - round(0.1 * 45)
    assert torch.all(m2["a"] <= m1["a"])  # pruned weights stay pruned


def test_global_scope_ranks_all_layers_together():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 10.0])}
    m = mask_from_scores(scores, 0.4, scope="global")
    assert m["a"].tolist() == [False, True, True] and m["b"].tolist() == [False, True]


def test_invalid_rate_is_an_error():
    with pytest.raises(ValueError, match="rate"):
        mask_from_scores({"a": torch.rand(4)}, 1.5)


def test_remaining_fraction_closed_form_lenet300_100():
    sizes = {"fc1": 784 * 300, "fc2": 300 * 100, "fc3": 100 * 10}
    rates = {"fc1": 0.2, "fc2": 0.2, "fc3": 0.1}
    # papers.md: Pm = 51.3, 21.1, 7.0, 3.6, 1.85 % at n = 3, 7, 12, 15, 18
    for n, pm in [(3, 51.3), (7, 21.1), (12, 7.0), (15, 3.6), (18, 1.85)]:
        assert 100 * remaining_fraction_per_layer(rates, sizes, n) == pytest.approx(pm, abs=0.06)


# --- the cheaper masked step (issue 15): same bits as multiplying after every step --------------------

OPTIMIZERS = {"adam": lambda p: torch.optim.Adam(p, 1e-2),
              "adam_foreach": lambda p: torch.optim.Adam(p, 1e-2, foreach=True),  # pruning_lib.train.adam
              "adamw": lambda p: torch.optim.AdamW(p, 1e-2, weight_decay=0.1),
              "sgd_momentum": lambda p: torch.optim.SGD(p, 1e-2, momentum=0.9, weight_decay=1e-3)}


def _bits(t):
    return t.detach().view(torch.int32)


def _reference_masked_training(model, mask, make_opt, x, steps, warm=0, write_at=None):
    """What the masked step computed before issue 15, with plain torch: grad * mask in a tensor hook and
    the weights multiplied by the mask after every step."""
    params = dict(model.named_parameters())
    opt = make_opt(model.parameters())
    for _ in range(warm):
        opt.zero_grad(); model(x).pow(2).sum().backward(); opt.step()
    fm = {n: mask[n].float() for n in mask}
    with torch.no_grad():
        for n in mask:
            params[n].mul_(fm[n])
    hooks = [params[n].register_hook(lambda g, m=fm[n]: g * m) for n in mask]
    for i in range(steps):
        if i == write_at:
            with torch.no_grad():
                params["0.weight"].add_(1.0)  # an outside write to pruned entries
        opt.zero_grad(); model(x).pow(2).sum().backward(); opt.step()
        with torch.no_grad():
            for n in mask:
                params[n].mul_(fm[n])
    for h in hooks:
        h.remove()
    return model, opt


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("warm", [0, 5], ids=["fresh_state", "stale_state"])
def test_masked_step_is_bit_identical_to_multiplying_after_every_step(opt, warm):
    x = torch.randn(16, 8)
    ref, ref_opt = _reference_masked_training(net(), random_mask(net()), OPTIMIZERS[opt], x, 12, warm,
                                              write_at=7)
    m = net()
    mask = random_mask(m)
    o = OPTIMIZERS[opt](m.parameters())
    for _ in range(warm):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    apply_mask(m, mask)
    for i in range(12):
        if i == 7:
            with torch.no_grad():
                m[0].weight.add_(1.0)
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
        params = dict(m.named_parameters())
        for n, keep in mask.items():
            assert torch.all(params[n][~keep] == 0), (i, n)  # pruned weights exactly zero
            assert torch.all(params[n].grad[~keep] == 0)  # zero gradients at pruned entries
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(_bits(p), _bits(q)), n  # same bits, signs of zeros included
        assert torch.equal(_bits(p.grad), _bits(q.grad)), n
    make_permanent(m)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_masked_training_survives_state_dict_round_trip(opt):
    x = torch.randn(16, 8)
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    o = OPTIMIZERS[opt](m.parameters())
    for _ in range(3):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m2 = net()
    load_masked_state(m2, saved["model"])
    o2 = OPTIMIZERS[opt](m2.parameters())
    o2.load_state_dict(saved["opt"])
    for _ in range(4):
        for model, optim in ((m, o), (m2, o2)):
            optim.zero_grad(); model(x).pow(2).sum().backward(); optim.step()
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(_bits(p), _bits(q)), n
    for n, keep in mask.items():
        assert torch.all(dict(m2.named_parameters())[n][~keep] == 0)


def test_reapplying_or_loading_weights_after_steps_keeps_pruned_entries_zero():
    x = torch.randn(16, 8)
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    o = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(3):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    m.load_state_dict(net().state_dict(), strict=False)  # dense weights written into the live parameters
    o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    for n, keep in mask.items():
        assert torch.all(dict(m.named_parameters())[n][~keep] == 0)
    tighter = Mask({n: k & random_mask(m, seed=1)[n] for n, k in mask.items()})
    apply_mask(m, tighter)
    o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    for n, keep in tighter.items():
        assert torch.all(dict(m.named_parameters())[n][~keep] == 0)


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_adam_second_moment_is_lifted_at_pruned_entries_and_weights_keep_their_bits(opt):
    """Issue 15: sqrt(0) is slow on this CPU, so a clean masked parameter's exp_avg_sq gets +1 at pruned
    entries after each step; kept entries keep their bits, pruned first moments stay zero."""
    x = torch.randn(16, 8)
    ref, ref_opt = _reference_masked_training(net(), random_mask(net()), OPTIMIZERS[opt], x, 6)
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    o = OPTIMIZERS[opt](m.parameters())
    for _ in range(6):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    params = dict(m.named_parameters())
    ref_params = dict(ref.named_parameters())
    for n, keep in mask.items():
        p, q = params[n], ref_params[n]
        v, v_ref = o.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"]
        assert torch.all(v[~keep] >= 1.0)  # no exact zeros left for sqrt
        assert torch.equal(_bits(v[keep]), _bits(v_ref[keep]))
        assert torch.all(o.state[p]["exp_avg"][~keep] == 0)
        assert torch.equal(_bits(p), _bits(q))


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, 1e-2, betas=(0.9, 0.5)),
                                      lambda p: torch.optim.AdamW(p, 1e-2, betas=(0.9, 0.5), amsgrad=True)],
                         ids=["adam", "adamw_amsgrad"])
def test_second_moment_lift_is_renewed_as_beta2_decays_it_and_weights_keep_their_bits(make_opt):
    """Issue 15: the lift is added once and renewed every log(L) / -log(beta2) steps (59 for beta2 = 1/2),
    not at every step; across several renewals v stays >= 1 at pruned entries and the weights keep the
    reference's bits."""
    x = torch.randn(16, 8)
    steps = 150
    ref, _ = _reference_masked_training(net(), random_mask(net()), make_opt, x, steps)
    m = net()
    mask = random_mask(m)
    apply_mask(m, mask)
    o = make_opt(m.parameters())
    for i in range(steps):
        o.zero_grad(); m(x).pow(2).sum().backward(); o.step()
        for n, p in m.named_parameters():
            if n in mask:
                assert torch.all(o.state[p]["exp_avg_sq"][~mask[n]] >= 1.0), (i, n)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(_bits(p), _bits(q)), n


def test_enforcement_forgets_models_and_optimizers_that_are_garbage_collected():
    import gc

    from pruning_lib import masks as masks_mod
    before = (len(masks_mod._ACTIVE), len(masks_mod._PLANS))
    m = net()
    apply_mask(m, random_mask(m))
    o = torch.optim.Adam(m.parameters(), 1e-2)
    o.zero_grad(); m(torch.randn(4, 8)).sum().backward(); o.step()
    assert len(masks_mod._ACTIVE) > before[0] and len(masks_mod._PLANS) > before[1]
    del m, o
    gc.collect()
    assert (len(masks_mod._ACTIVE), len(masks_mod._PLANS)) == before
