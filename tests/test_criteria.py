"""Pruning criteria: scores match their definitions and share one masking path (Lévai & Zombori 2020)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_lib.methods import criteria as C
from pruning_lib import masks
from pruning_lib.train import cross_entropy


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]


def _autograd_grads(net, batch):
    """Gradients computed independently: plain backward, no library code."""
    net.zero_grad()
    x, y = batch
    F.cross_entropy(net(x), y).backward()
    out = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return out


def test_snip_score_equals_w_times_autograd_gradient(net, batches):
    scores = C.gradient_scores(net, cross_entropy, batches[:1])
    ref = _autograd_grads(net, batches[0])
    params = dict(net.named_parameters())
    assert set(scores) == {"1.weight", "3.weight"}  # weights only, biases are never pruned
    for n, s in scores.items():
        torch.testing.assert_close(s, (params[n].detach() * ref[n]).abs())


def test_gradient_is_averaged_over_batches_and_grad_fields_untouched(net, batches):
    g = C.loss_gradients(net, cross_entropy, batches)
    refs = [_autograd_grads(net, b) for b in batches]
    for n in g:
        torch.testing.assert_close(g[n], sum(r[n] for r in refs) / len(refs))
    assert all(p.grad is None for p in net.parameters())


def test_masked_weights_have_zero_gradient_and_score(net, batches):
    mask = masks.Mask.ones_like(net)
    mask["1.weight"][:4] = False
    masks.apply_mask(net, mask)
    s = C.gradient_scores(net, cross_entropy, batches)
    assert (s["1.weight"][:4] == 0).all() and (s["1.weight"][4:] > 0).any()


def test_registry_has_each_criterion_and_its_data_dependent_variant():
    for base in ("random", "magnitude", "magnitude_increase", "movement", "snip"):
        assert base in C.CRITERIA and base + "_grad" in C.CRITERIA
    with pytest.raises(KeyError, match="unknown criterion"):
        C.get_criterion("nope")


def test_scores_follow_their_definitions(net, batches):
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():  # "train": move the weights
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ctx = C.ScoreContext(net, initial=initial, loss_fn=cross_entropy, batches=lambda: batches,
                         grad_batches=2, grad_point="final")
    wf = {n: p.detach() for n, p in net.named_parameters()}
    g_final = C.loss_gradients(net, cross_entropy, batches[:2])
    for n in ctx.names:
        torch.testing.assert_close(C.score("magnitude", ctx)[n], wf[n].abs())
        torch.testing.assert_close(C.score("magnitude_increase", ctx)[n], wf[n].abs() - initial[n].abs())
        torch.testing.assert_close(C.score("movement", ctx)[n], (wf[n] - initial[n]).abs())
        torch.testing.assert_close(C.score("movement_grad", ctx)[n],
                                   (wf[n] - initial[n]).abs() * g_final[n].abs())


def test_gradient_at_init_uses_rewound_weights_and_restores_model(net, batches):
    initial = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ctx = C.ScoreContext(net, initial=initial, loss_fn=cross_entropy, batches=lambda: batches, grad_batches=1)
    snip = C.score("snip", ctx)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n])  # the trained weights are back
    ref = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    ref.load_state_dict(initial)
    g = _autograd_grads(ref, batches[0])
    for n in ctx.names:
        torch.testing.assert_close(snip[n], (initial[n] * g[n]).abs())
        torch.testing.assert_close(C.score("magnitude_grad", ctx)[n], before[n].abs() * g[n].abs())


@pytest.mark.parametrize("name", sorted(C.CRITERIA))
def test_prune_removes_the_requested_fraction_of_survivors_per_layer(net, batches, name):
    ctx = C.ScoreContext(net, initial={n: p.detach().clone() for n, p in net.named_parameters()},
                         loss_fn=cross_entropy, batches=lambda: batches,
                         generator=torch.Generator().manual_seed(0))
    current = masks.Mask.ones_like(net)
    current["1.weight"][0] = False  # 12 already pruned, stay pruned
    m = C.prune(name, ctx, {"1.weight": 0.5, "3.weight": 0.25}, current=current)
    assert int(m["1.weight"].sum()) == round(0.5 * 84)
    assert int(m["3.weight"].sum()) == 24 - round(0.25 * 24)
    assert not m["1.weight"][0].any()


def test_snip_one_shot_reaches_the_density_globally(net, batches):
    m = C.snip_one_shot(net, cross_entropy, batches[:1], 0.1)
    assert m.kept == round(0.1 * m.total)
    s = C.gradient_scores(net, cross_entropy, batches[:1])
    flat = torch.cat([s[n].flatten() for n in m])
    kept = torch.cat([m[n].flatten() for n in m])
    assert flat[kept].min() >= flat[~kept].max()  # the highest-scoring weights survive


def test_gradient_factor_raises_every_score_with_the_gradient_and_keeps_its_sign():
    # base scores: two shrunk weights (negative magnitude increase), one grown, one at zero
    s = torch.tensor([-0.2, -0.2, 0.3, 0.3, 0.0])
    g = torch.tensor([2.0, -0.5, 2.0, 0.5, 1.0])  # the sign of the gradient does not matter
    out = C.gradient_factor(s, g)
    torch.testing.assert_close(out, torch.tensor([-0.1, -0.4, 0.6, 0.15, 0.0]))
    assert out[0] > out[1]  # negative base: the larger |g| is the *less* prunable weight
    assert out[2] > out[3]  # non-negative base: the literal product s * |g|
    assert (out[:2] < 0).all() and (out[2:] >= 0).all()  # shrunk weights stay below grown ones
    # no gradient: a shrunk weight goes first, a grown one scores 0; never NaN
    z = C.gradient_factor(torch.tensor([-0.2, 0.0, 0.3]), torch.zeros(3))
    assert z[0] == -float("inf") and z[1] == 0 and z[2] == 0


def test_magnitude_increase_grad_prunes_the_shrunk_weight_with_the_smaller_gradient():
    # one layer, 3 weights: w_i = 1 for all; w_f shrinks two of them equally (base -0.5 each) and grows
    # the third. The gradient at init (set through a linear model) is larger at weight 0 than weight 1.
    net = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, 0.5, 1.5]]))
    initial = {"0.weight": torch.ones(1, 3)}
    x = torch.tensor([[2.0, 0.5, 1.0]])
    ctx = C.ScoreContext(net, initial=initial, loss_fn=lambda m, x, y: m(x).sum(),
                         batches=lambda: [(x, None)], names=["0.weight"])
    s = C.score("magnitude_increase_grad", ctx)["0.weight"].flatten()
    torch.testing.assert_close(s, torch.tensor([-0.5 / 2.0, -0.5 / 0.5, 0.5 * 1.0]))
    m = C.prune("magnitude_increase_grad", ctx, {"0.weight": 1 / 3})["0.weight"].flatten()
    assert m.tolist() == [True, False, True]  # the literal product -0.5 * |g| would prune weight 0
    assert C.is_signed("magnitude_increase_grad") and not C.is_signed("magnitude_grad")
