"""Tests of chapter 04: Bernoulli gates, their cost, the flip estimator and in-training removal."""
import math

import pytest
import torch
import torch.nn.functional as F

from pruning_lib.methods import bernoulli as B
from pruning_lib.models import SequentialNet, build_model


def _tiny_mlp(hidden=(3, 2), classes=3, seed=0):
    torch.manual_seed(seed)
    m = build_model("lenet300_100", in_channels=1, image_size=2, hidden=hidden, num_classes=classes)
    with torch.no_grad():  # positive biases: no unit is dead, so every partial derivative is informative
        for g in m.channel_groups():
            m.get_submodule(g.producer).bias.fill_(0.5)
    return m


def _tiny_conv(seed=0):
    torch.manual_seed(seed)
    m = SequentialNet(in_channels=1, image_size=6, convs=[2, "M", 2], fcs=[2], num_classes=3, kernel_size=3,
                      padding=1)
    with torch.no_grad():
        for g in m.channel_groups():
            m.get_submodule(g.producer).bias.fill_(0.5)
    return m


def test_projection_keeps_theta_in_unit_interval():
    m = _tiny_mlp()
    B.attach_bernoulli_gates(m, 0.5)
    bp = B.BernoulliPruning(m, 100, theta_lr=10.0, shrink_every=0, record_every=0)
    opt = bp.optimizers()[1]
    with torch.no_grad():
        for g in B.bernoulli_gates(m).values():
            g.theta.grad = torch.tensor([-5.0, 5.0, 0.01])[: g.theta.numel()]
    opt.step()
    raw = torch.cat([g.theta.detach().clone() for g in B.bernoulli_gates(m).values()])
    assert (raw < 0).any() and (raw > 1).any()  # the SGD step itself leaves the box ...
    B.project_(m)
    t = torch.cat([g.theta.detach() for g in B.bernoulli_gates(m).values()])
    assert (t >= 0).all() and (t <= 1).all()  # ... the projection brings every theta back
    assert torch.allclose(t, raw.clamp(0, 1))  # and it is the Euclidean projection onto the box


def test_gate_draws_bernoulli_and_eval_uses_theta():
    gate = B.BernoulliGate(3, 0.5)
    with torch.no_grad():
        gate.theta.copy_(torch.tensor([0.0, 1.0, 0.3]))
    x = torch.ones(4000, 3)
    gate.train()
    y = gate(x)
    assert (y[:, 0] == 0).all() and (y[:, 1] == 1).all()  # theta in {0, 1}: deterministic
    assert abs(float(y[:, 2].mean()) - 0.3) < 0.03
    gate.eval()
    assert torch.allclose(gate(x)[0], torch.tensor([0.0, 1.0, 0.3]))


@pytest.mark.parametrize("n,c", [(60, 300), (7, 13), (1, 5)])
def test_gate_draws_are_torch_bernoullis_to_the_bit(n, c):
    """The gate draws ``rand < theta`` (faster); on CPU that is ``torch.bernoulli`` to the bit, and it leaves
    the global generator where ``torch.bernoulli`` does, so every cached run stays reproducible."""
    gate = B.BernoulliGate(c)
    with torch.no_grad():
        gate.theta.copy_(torch.rand(c, generator=torch.Generator().manual_seed(c)))
        gate.theta[::3] = 1.0
        gate.theta[1::4] = 0.0
    torch.manual_seed(n)
    ours = gate.sample(n)
    after_ours = torch.get_rng_state()
    torch.manual_seed(n)
    theirs = torch.bernoulli(gate.theta.detach().expand(n, -1))
    assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype
    assert torch.equal(after_ours, torch.get_rng_state())


def test_cost_matches_hand_computation():
    # A 1-input, 2-hidden-unit, 2-class network, everything set by hand.
    m = build_model("lenet300_100", in_channels=1, image_size=1, hidden=(2,), num_classes=2)
    B.attach_bernoulli_gates(m, 0.5)
    fc1, cls = m.head[0], m.classifier
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0], [2.0]]))
        fc1.bias.copy_(torch.tensor([0.0, -1.0]))
        cls.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        cls.bias.zero_()
        B.bernoulli_gates(m)["fc1"].theta.copy_(torch.tensor([0.25, 0.5]))
    x, y = torch.ones(1, 1, 1, 1), torch.tensor([0])
    lam, kappa = 0.5, 0.1
    cost = B.bernoulli_cost(m, x, y, lam, kappa)
    # Hidden activations h = relu([1, 1]) = [1, 1]; logits = xi * h; loss = log(1 + e^(l1 - l0)).
    ce = lambda l0, l1: math.log(1 + math.exp(l1 - l0))
    data = (0.75 * 0.5 * ce(0, 0) + 0.25 * 0.5 * ce(1, 0) + 0.75 * 0.5 * ce(0, 1) + 0.25 * 0.5 * ce(1, 1))
    # Unit rows (weight, bias): ||w_1||^2 = 1, ||w_2||^2 = 4 + 1 = 5; classifier: 1 + 1 = 2 (always on).
    weight_prior = lam / 2 * (0.25 * 1 + 0.5 * 5 + 2)
    hyper = kappa * 2 * (0.25 + 0.5)  # d_j = 2 parameters per unit
    assert float(cost["data"].detach()) == pytest.approx(data, rel=1e-6)
    assert float(cost["weight_prior"].detach()) == pytest.approx(weight_prior, rel=1e-6)
    assert float(cost["hyper_prior"].detach()) == pytest.approx(hyper, rel=1e-6)
    assert float(cost["total"].detach()) == pytest.approx(data + weight_prior + hyper, rel=1e-6)
    # The training-time pieces agree with the cost: weight prior and d cost / d theta of the prior terms.
    assert float(B.weight_prior(m, lam).detach()) == pytest.approx(weight_prior, rel=1e-6)
    g = B.theta_prior_gradient(m, lam, kappa)["fc1"]
    assert torch.allclose(g, torch.tensor([lam / 2 * 1 + 2 * kappa, lam / 2 * 5 + 2 * kappa]))


@pytest.mark.parametrize("make,n_rep", [(_tiny_mlp, 3000), (_tiny_conv, 600)])
def test_flip_estimator_is_unbiased(make, n_rep):
    """Mean of the estimator == exact gradient of the enumerated expected loss (2^5 / 2^6 patterns)."""
    m = make()
    B.attach_bernoulli_gates(m, 0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for g in B.bernoulli_gates(m).values():
            g.theta.uniform_(0.2, 0.8)
    x = torch.randn(6, 1, *((2, 2) if make is _tiny_mlp else (6, 6)))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    thetas = [g.theta for g in B.bernoulli_gates(m).values()]
    exact = torch.autograd.grad(B.bernoulli_cost(m, x, y, 0.0, 0.0)["data"] / len(y), thetas)
    # n_rep copies of the batch: every copy draws its own xi, so one call averages n_rep draws per example;
    # ten independent calls give the Monte Carlo standard error of the mean.
    est = B.FlipEstimator(flip_examples=10 ** 9)
    xr, yr = x.repeat(n_rep // 10, 1, 1, 1), y.repeat(n_rep // 10)
    m.train()
    torch.manual_seed(2)
    draws = []
    for _ in range(10):
        est.begin(m)
        with torch.no_grad():
            m(xr)
        draws.append(est.gradients(m, yr))
        est.clear(m)
        est.end()
    for e, name in zip(exact, draws[0]):
        v = torch.stack([d[name] for d in draws])
        mean, se = v.mean(0), v.std(0) / math.sqrt(len(v))
        assert ((mean - e).abs() <= 4 * se + 1e-4).all(), (name, mean, se, e)
        assert (e.abs() > 1e-3).any()  # the check is not vacuous


def test_removing_units_at_zero_keeps_the_function_and_follows_the_optimizer():
    torch.manual_seed(0)
    m = build_model("lenet5_caffe", width=0.2)  # 4-10-100
    B.attach_bernoulli_gates(m, 1.0)
    gates = B.bernoulli_gates(m)
    with torch.no_grad():
        gates["conv1"].theta[[0, 2]] = 0.0
        gates["conv2"].theta[[1, 3, 5]] = 0.0
        gates["fc1"].theta[::2] = 0.0
    bp = B.BernoulliPruning(m, 100, shrink_every=1, record_every=0)
    opts = bp.optimizers(1e-3)
    x = torch.randn(8, 1, 28, 28)
    # One Adam step so that the optimizer has state to carry over.
    F.cross_entropy(m(x), torch.zeros(8, dtype=torch.long)).backward()
    opts[0].step()
    m.eval()
    before = m(x)
    m.train()
    torch.manual_seed(3)
    before_train = m(x)  # theta in {0, 1}: the training forward is deterministic too
    fc1_w = m.head[0].weight.detach().clone()
    exp_avg = opts[0].state[m.head[0].weight]["exp_avg"].clone()
    bp.remove_dead(opts)
    assert bp.widths() == {"conv1": 2, "conv2": 7, "fc1": 50}
    assert m.features[0].out_channels == 2 and m.features[4].in_channels == 2
    assert m.head[0].in_features == 7 * 16 and m.classifier.in_features == 50
    m.eval()
    assert torch.allclose(m(x), before, atol=1e-5)
    m.train()
    assert torch.allclose(m(x), before_train, atol=1e-5)
    # Optimizer state follows: the new parameters are the optimized ones, with sliced moments.
    new_w = m.head[0].weight
    ids = {id(p) for g in opts[0].param_groups for p in g["params"]}
    assert id(new_w) in ids and len(ids) == len(opts[0].param_groups[0]["params"])
    keep_rows = torch.arange(1, 100, 2)
    keep_in = torch.tensor([c for c in range(10) if c not in (1, 3, 5)])
    cols = (keep_in[:, None] * 16 + torch.arange(16)).reshape(-1)
    assert torch.equal(new_w.detach(), fc1_w[keep_rows][:, cols])
    assert torch.equal(opts[0].state[new_w]["exp_avg"], exp_avg[keep_rows][:, cols])
    theta_ids = {id(g.theta) for g in B.bernoulli_gates(m).values()}
    assert theta_ids == {id(p) for p in opts[1].param_groups[0]["params"]}
    # Training goes on after the removal.
    F.cross_entropy(m(x), torch.zeros(8, dtype=torch.long)).backward()
    opts[0].step()


def test_training_shrinks_the_network(tiny_data):
    from pruning_lib.train import fit

    torch.manual_seed(0)
    m = build_model("lenet300_100", width=0.1, **tiny_data.model_kwargs())  # 30-10
    B.attach_bernoulli_gates(m, 0.9)
    bp = B.BernoulliPruning(m, len(tiny_data.train), unit_cost=0.5, theta_lr=2.0, theta_momentum=0.9,
                            flip_examples=8, shrink_every=1, record_every=1)
    h = fit(m, tiny_data, optimizer=bp.optimizers(1e-3), loss_fn=bp.loss_fn, penalties=bp.penalties(),
            callbacks=[bp], epochs=3, batch_size=50, progress=False, device="cpu")
    assert sum(bp.widths().values()) < 40
    assert m.head[0].out_features == bp.widths()["fc1"]
    assert len(bp.timer.epoch_seconds) == 3 and "undecided" in h.columns
    full = bp.full_thetas()
    assert full["fc1"].shape == (30,) and (full["fc1"] >= 0).all() and (full["fc1"] <= 1).all()


def test_config_profiles_and_missing_dataset(tmp_path):
    from pruning_lib.chapters import bernoulli_gates as bc
    from pruning_lib.data import DatasetNotFoundError
    from pruning_lib.runs import ConfigError

    for p in ("smoke", "cpu", "paper"):
        bc.Config.from_profile(p)
    cfg = bc.Config.from_profile("cpu")
    assert len(cfg.seeds) >= 3 and len(cfg.conv_seeds) >= 3 and len(cfg.widths) >= 3
    assert cfg.theta_tau > 0 and cfg.flip_examples == 0  # decaying theta step; flips chosen by measurement
    with pytest.raises(ConfigError):
        bc.Config.from_namespace({"profile": "cpu", "bogus": 1})
    paper = bc.Config.from_profile("paper", data_root=str(tmp_path), results_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError):
        bc.run_experiment(paper, progress=False)


def test_estimator_reuses_the_forward_and_flips_only_the_units_asked_for():
    """Passing the training forward's per-example losses and a subset of units changes nothing but
    the work: the estimates of the chosen units are those of the full computation, the others 0."""
    for make in (_tiny_mlp, _tiny_conv):
        m = make()
        B.attach_bernoulli_gates(m, 0.5)
        x = torch.randn(8, 1, *((2, 2) if make is _tiny_mlp else (6, 6)))
        y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        m.train()
        est = B.FlipEstimator(flip_examples=5)
        est.begin(m)
        with torch.no_grad():
            losses = F.cross_entropy(m(x), y, reduction="none")
        est.generator = torch.Generator().manual_seed(7)
        full = est.gradients(m, y)
        est.generator = torch.Generator().manual_seed(7)
        units = {name: torch.tensor([0, g.theta.numel() - 1]) for name, g in B.bernoulli_gates(m).items()}
        part = est.gradients(m, y, units=units, base_loss=losses)
        for name, idx in units.items():
            assert torch.allclose(part[name][idx], full[name][idx], atol=1e-6)
            rest = torch.ones_like(part[name], dtype=torch.bool)
            rest[idx] = False
            assert (part[name][rest] == 0).all()
        assert any((full[n][u] != 0).any() for n, u in units.items())  # not vacuous
        est.clear(m)
        est.end()


def test_per_example_cross_entropy_matches_torch():
    logits, y = torch.randn(50, 7) * 5, torch.randint(0, 7, (50,))
    assert torch.allclose(B.per_example_cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"),
                          atol=1e-5)


def _vertex_problem():
    """Four inputs, three hidden units, two classes, weights fixed.  Unit 0 carries class 0, unit 1
    class 1, unit 2 has no outgoing weight: with a price per active unit the optimum is (1, 1, 0)."""
    m = build_model("lenet300_100", in_channels=1, image_size=2, hidden=(3,), num_classes=2)
    with torch.no_grad():
        m.head[0].weight.copy_(torch.eye(3, 4))
        m.head[0].bias.zero_()
        m.classifier.weight.copy_(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
        m.classifier.bias.zero_()
    x = torch.tensor([[1.0, 0, 1, 0], [0, 1.0, 1, 0], [1.0, 0, 1, 0], [0, 1.0, 1, 0]]).view(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1])
    return m, x, y


def _vertex_cost(m, x, y, kappa, vertex):
    """Mean loss + kappa * d_j per active unit at a vertex (eval mode multiplies by theta)."""
    gate = B.bernoulli_gates(m)["fc1"]
    with torch.no_grad():
        gate.theta.copy_(torch.tensor(vertex, dtype=torch.float32))
    m.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(m(x), y))
    return loss + kappa * 5 * sum(vertex)  # d_j = 4 weights + 1 bias


@pytest.mark.parametrize("schedule", ["robbins_monro", "constant"])
def test_theta_schedule_leaves_no_undecided_gate_at_the_vertex_optimum(schedule):
    import itertools

    kappa = 0.01
    m, x, y = _vertex_problem()
    B.attach_bernoulli_gates(m, 0.5)
    costs = {v: _vertex_cost(m, x, y, kappa, v) for v in itertools.product((0.0, 1.0), repeat=3)}
    best = min(costs, key=costs.get)
    assert best == (1.0, 1.0, 0.0)  # the known optimum, checked by enumerating the vertices
    assert sorted(costs.values())[1] - costs[best] > 0.04  # with a clear margin
    with torch.no_grad():
        B.bernoulli_gates(m)["fc1"].theta.fill_(0.5)
    m.train()
    torch.manual_seed(0)
    tau = 20.0 if schedule == "robbins_monro" else 0.0
    # One flipped example a step (the noisiest estimator), weights frozen (Adam's lr 0), dataset size 1:
    # the step descends exactly the cost above.
    bp = B.BernoulliPruning(m, 1, weight_precision=0.0, unit_cost=kappa, theta_lr=1.0, theta_tau=tau,
                            flip_examples=1, shrink_every=1, record_every=1, seed=0)
    bp.optimizers(lr=0.0)
    for _ in range(1000):
        bp.step(x, y)
    last = torch.stack([t["fc1"] for _, t in bp.trajectory[-100:]])  # original unit order
    undecided = ((last > 0.01) & (last < 0.99)).any(1).float().mean()
    if schedule == "robbins_monro":
        assert bp.widths() == {"fc1": 2}  # unit 2 reached 0 and was removed
        assert ((bp.full_thetas()["fc1"] - torch.tensor([1.0, 1.0, 0.0])).abs() < 0.01).all()  # the optimum
        assert undecided == 0  # not one undecided gate over the last 100 steps
        assert bp.theta_lr_at(1000) == pytest.approx(1.0 / (1 + 1000 / 20.0))
    else:  # a constant step keeps kicking the decided units off 1: what the decaying step cures
        assert undecided > 0.1


def test_decided_units_are_estimated_only_on_check_steps():
    m = _tiny_mlp()
    B.attach_bernoulli_gates(m, 1.0)
    with torch.no_grad():
        B.bernoulli_gates(m)["fc1"].theta[0] = 0.5
    bp = B.BernoulliPruning(m, 100, unit_cost=0.1, theta_lr=0.0, flip_examples=4, check_every=3,
                            shrink_every=0, record_every=0)
    bp.optimizers()
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for _ in range(3):
        bp.step(x, y)
        grads.append({k: g.theta.grad.clone() for k, g in B.bernoulli_gates(m).items()})
    for step, g in enumerate(grads, start=1):
        assert g["fc1"][0] != 0  # the undecided unit: every step
        decided = torch.cat([g["fc1"][1:], g["fc2"]])
        assert (decided != 0).all() if step % 3 == 0 else (decided == 0).all()


def test_choose_flip_examples_takes_the_fewest_with_enough_efficiency():
    rows = [{"flip_examples": m, "efficiency": e} for m, e in ((2, 0.2), (8, 0.55), (16, 0.8), (100, 1.0))]
    assert B.choose_flip_examples(rows, 0.5) == 8
    assert B.choose_flip_examples(rows, 0.9) == 100


def test_flip_tradeoff_measures_variance_falling_with_examples():
    m = _tiny_mlp(hidden=(6, 4))
    B.attach_bernoulli_gates(m, 0.7)
    torch.manual_seed(0)
    batches = [(torch.randn(32, 1, 2, 2), torch.randint(0, 3, (32,))) for _ in range(40)]
    rows = B.flip_tradeoff(m, batches, [1, 32], 1000, rounds=2, unit_cost=0.01)
    v = {r["flip_examples"]: r["variance"] for r in rows}
    assert v[32] < v[1] / 4  # 1/m in theory (iid examples): measured, with room for noise
    assert all(r["step_ms"] > 0 and 0 < r["efficiency"] <= 1 for r in rows)


# --- the chapter's units (pruning_lib.units, python -m pruning_lib.book units 04) ---------------------------

# The smoke profile's Stores as the notebook wrote them before its units had functions of their own (taken
# from a smoke run of the chapter): the flip trade-offs, the gated runs (16 flipped examples) and the dense
# references. Retaken when the smoke profile went from 2 torch threads to 1 (the count is in each spec).
SMOKE_FLIP_KEYS = ["1871fb218f690819", "f9852df4278a4764"]
SMOKE_GATED_KEYS = ["489c63c475621262", "ec28472722384790", "b2a5db671a425f2f"]  # spec lists its timed steps
SMOKE_DENSE_KEYS = ["61490a0f48068dc4", "c288ced663fd1a98"]


def test_listed_units_carry_the_notebooks_hashes(tmp_path):
    from pruning_lib import units
    from pruning_lib.chapters import bernoulli_gates as bc

    cfg = bc.Config.from_profile("smoke", results_dir=str(tmp_path))
    listed = bc.work_units(cfg)
    # no trade-off measured yet: the gated runs' hashes (their flipped examples) are not known
    assert [u.key for u in listed] == SMOKE_FLIP_KEYS + SMOKE_DENSE_KEYS
    assert [u.kind for u in listed] == ["bernoulli_flip"] * 2 + ["bernoulli_dense"] * 2
    assert not any(u.done for u in listed) and all(u.datasets == ("mnist5k",) for u in listed)
    assert [u.key for u in bc.work_units(cfg)] == [u.key for u in listed]  # stable
    fixed = bc.work_units(bc.Config.from_profile("smoke", flip_examples=16, results_dir=str(tmp_path)))
    assert [u.key for u in fixed] == SMOKE_GATED_KEYS + SMOKE_DENSE_KEYS
    # the notebook's Stores: the ones run_experiment's tasks name
    tasks = bc.flip_tasks(cfg) + bc.gated_tasks(cfg, {m: 16 for m in cfg.models}) + bc.dense_tasks(cfg)
    assert [bc.task_store(t)[0].key for t in tasks] == SMOKE_FLIP_KEYS + SMOKE_GATED_KEYS + SMOKE_DENSE_KEYS
    stem, again, from_cli = units.chapter_units("04", "smoke", [("results_dir", str(tmp_path))])
    assert stem == bc.CHAPTER and again == cfg and [u.key for u in from_cli] == [u.key for u in listed]


def test_a_listed_unit_writes_the_store_the_notebook_reads(tmp_path, monkeypatch):
    from pruning_lib.chapters import bernoulli_gates as bc

    cfg = bc.Config.from_profile("smoke", models=("lenet300_100",), results_dir=str(tmp_path))
    flip = bc.work_units(cfg)[0]
    assert flip.kind == "bernoulli_flip" and flip.key == SMOKE_FLIP_KEYS[0]
    flip.run(str(tmp_path))
    assert bc.flip_store(cfg, "lenet300_100").key == flip.key
    assert bc.flip_store(cfg, "lenet300_100").exists("tradeoff.csv")
    listed = bc.work_units(cfg)
    assert listed[0].done and [u.kind for u in listed] == ["bernoulli_flip"] + ["bernoulli"] * 2 + ["bernoulli_dense"]
    # the notebook reads the cached trade-off (no new measurement) and names the gated runs listed
    monkeypatch.setattr(bc.bern, "flip_tradeoff", lambda *a, **k: pytest.fail("measured instead of reading"))
    chosen = bc.measure_flip_tradeoff(cfg, "lenet300_100", None)["chosen"]
    assert chosen in cfg.flip_grid
    assert [u.key for u in listed[1:3]] == [bc.gated_store(cfg, "lenet300_100", w, 0, chosen).key
                                            for w in cfg.widths]


def test_the_pages_prose_comes_from_the_run(tmp_path):
    """The notebook's glued numbers, run sentence, fixed facts and discussion are built by the chapter module."""
    from pruning_lib.chapters import bernoulli_gates as bc

    cfg = bc.Config.from_profile("smoke", models=("lenet300_100",), results_dir=str(tmp_path))
    results = bc.run_experiment(cfg, progress=False)
    nums = bc.run_numbers(cfg, results)
    assert list(nums) == ["n_runs", "undecided_mean", "undecided_max", "early_share"]
    assert nums["n_runs"] == len(results["runs"]) == len(cfg.widths) * len(cfg.seeds)
    assert 0 <= nums["undecided_mean"] <= nums["undecided_max"] <= 100
    assert bc.run_text(cfg, results).startswith(f"Profile **smoke**: {nums['n_runs']} gated runs")
    facts = bc.fixed_facts(cfg, results).splitlines()
    assert len(facts) == len(bc.CLAIMS) + 1 and facts[0].startswith(f"{next(iter(bc.CLAIMS))}: ")
    assert facts[-1].startswith("lenet300_100 ['") and facts[-1].count("-") >= len(cfg.widths)
    closing, speed = bc.closing_numbers(cfg, results), bc.speed_table(cfg, results)
    table = bc.claims_table(cfg, results)
    text = bc.discussion(cfg, closing, table, speed)
    assert text.startswith("This page was produced by the **smoke** profile on **mnist5k**.")
    assert text.count("\n- lenet300_100 from ") == len(closing)
    assert text.count("\n- speed, lenet300_100 from ") == len(speed)
    floor = speed["floor: dense final-width / initial step"]
    assert (floor > 0).all() and (speed["dense final-width step ms"] > 0).all()
    assert text.count("a network of the final widths without gates takes") == len(speed)
    assert all(f"*{c}*: **{v}**" in text for c, v in zip(table["claim"], table["verdict"]))
    assert text.endswith(bc.CAVEATS)


def test_the_floor_step_trains_a_gateless_network_as_the_dense_reference_does():
    """DenseStep (the floor timed beside the gated steps) takes fit's dense step: Adam on cross-entropy plus
    the weight prior per training example, to the bit."""
    import copy

    from pruning_lib.chapters import bernoulli_gates as bc
    from pruning_lib.train import adam

    torch.manual_seed(0)
    model = build_model("lenet300_100", width=0.2)
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    step = bc.DenseStep(model, 1e-3, weight_precision=2.0, n_train=50)
    opt = adam(ref.parameters(), 1e-3)
    for _ in range(3):
        loss = step.step(x, y)
        opt.zero_grad(set_to_none=True)
        expect = F.cross_entropy(ref(x), y) + 0.5 * 2.0 * sum((p ** 2).sum() for p in ref.parameters()) / 50
        expect.backward()
        opt.step()
        assert loss == float(expect.detach())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
