"""Chapter 7 (the comparison): GMP's schedule, the Pareto classifier, requested against achieved sparsity
for every method, Scratch-B, the structured methods' weight masks, and the chapter's experiments (one
model on one dataset each; the paper profile's ResNet-20 on CIFAR-10 and ResNet-50 on ImageNet)."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pruning_lib import masks as masks_mod
from pruning_lib import metrics, pareto
from pruning_lib.chapters import comparison as cmp
from pruning_lib.gates import compact
from pruning_lib.methods import gmp, l1_filter, scratch
from pruning_lib.models import build_model
from pruning_lib.train import fit

ROOT = Path(__file__).resolve().parents[1]


# --- GMP ---------------------------------------------------------------------------------------------

def test_cubic_schedule_matches_zhu_gupta_closed_form():
    s_i, s_f, t0, dt, n = 0.1, 0.9, 100, 10, 8
    end = t0 + n * dt
    for k in range(n + 1):
        t = t0 + k * dt
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert gmp.cubic_sparsity(t, s_f, t0, end, s_i, dt) == pytest.approx(expected, abs=1e-12)
        # between pruning steps the sparsity stays at the last step's value
        if k < n:
            assert gmp.cubic_sparsity(t + dt - 1, s_f, t0, end, s_i, dt) == pytest.approx(expected, abs=1e-12)
    assert gmp.cubic_sparsity(t0 - 1, s_f, t0, end, s_i, dt) == s_i
    assert gmp.cubic_sparsity(end + 50, s_f, t0, end, s_i, dt) == s_f
    values = [gmp.cubic_sparsity(t, s_f, t0, end, s_i, dt) for t in range(t0, end + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # never decreases
    steps = np.diff([gmp.cubic_sparsity(t0 + k * dt, s_f, t0, end, s_i, dt) for k in range(n + 1)])
    assert all(b < a for a, b in zip(steps, steps[1:]))  # fast first, slower later
    with pytest.raises(ValueError):
        gmp.cubic_sparsity(0, 0.5, 0, 10, initial=0.8)


def test_gmp_callback_prunes_on_schedule_and_reaches_the_target(tiny_data):
    torch.manual_seed(0)
    model = build_model("lenet300_100", **tiny_data.model_kwargs())
    start, end, every = gmp.schedule_steps(40, 0.1, 0.6, 5)
    cb = gmp.GradualMagnitudePruning(model, 0.9, start, end, every)
    fit(model, tiny_data, iterations=40, batch_size=16, callbacks=[cb], progress=False)
    steps = [s for s, _ in cb.log_rows]
    assert steps[0] == start and steps[-1] == end
    for s, value in cb.log_rows:
        assert value == pytest.approx(gmp.cubic_sparsity(s, 0.9, start, end, 0.0, every))
    mask = masks_mod.current_mask(model)
    assert abs(mask.sparsity - 0.9) <= 1 / mask.total
    params = dict(model.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in mask.items())  # pruned weights stay zero


# --- the Pareto classifier --------------------------------------------------------------------------

def _curves(offsets, seeds=(0, 1, 2, 3), noise=0.002, levels=(2, 4, 8, 16)):
    """A reference curve per seed (accuracy falling with log compression) and a method whose accuracy at
    level i is the reference's plus offsets[i] (plus a little seeded noise), at costs between the
    reference's points."""
    rng = np.random.default_rng(0)
    flops = 1e6
    ref, pts = [], []
    for s in seeds:
        for c in (1.5, *levels, 24):
            ref.append({"seed": s, "flops": flops / c, "accuracy": 0.9 - 0.02 * math.log(c) + 0.001 * s})
        for lv, off in zip(levels, offsets):
            c = lv * 1.2
            acc = 0.9 - 0.02 * math.log(c) + 0.001 * s + off + noise * rng.standard_normal()
            pts.append({"method": "m", "level": lv, "seed": s, "flops": flops / c, "accuracy": acc})
    return pd.DataFrame(pts), pd.DataFrame(ref)


@pytest.mark.parametrize("offsets, expected", [
    ((0.05, 0.05, 0.05, 0.05), "dominant"),
    ((0.05, 0.0, 0.05, 0.0), "better"),
    ((0.05, -0.05, 0.05, 0.0), "mixed"),
    ((0.0, 0.0, 0.0, 0.0), "tied"),
    ((-0.05, 0.0, 0.0, -0.05), "worse"),
    ((-0.05, -0.05, -0.05, -0.05), "dominated"),
])
def test_pareto_classes_on_synthetic_curves(offsets, expected):
    pts, ref = _curves(offsets, noise=0.002 if expected != "tied" else 0.02)
    v = pareto.verdicts(pts, ref)
    assert v.loc[0, "class"] == expected
    assert v.loc[0, "levels"] == 4


def test_pareto_interpolates_per_seed_in_log_cost_and_does_not_extrapolate():
    ref = pd.DataFrame({"seed": [0, 0], "flops": [100.0, 10000.0], "accuracy": [0.5, 0.9]})
    assert pareto.interpolate_log(ref.flops, ref.accuracy, 1000.0) == pytest.approx(0.7)
    assert math.isnan(pareto.interpolate_log(ref.flops, ref.accuracy, 50.0))
    pts = pd.DataFrame({"method": "m", "level": 1.0, "seed": [0, 1, 2], "flops": 1e5, "accuracy": 0.9})
    v = pareto.verdicts(pts, ref)
    assert v.loc[0, "class"] == "not compared"
    # fewer than three seeds: never separated
    pts = pd.DataFrame({"method": "m", "level": 1.0, "seed": [0, 0], "flops": 1000.0, "accuracy": 0.99})
    assert pareto.verdicts(pts, ref).loc[0, "class"] == "tied"


def test_classify_counts():
    assert pareto.classify([1, 1]) == "dominant"
    assert pareto.classify([1, 0, float("nan")]) == "better"
    assert pareto.classify([]) == "not compared"
    assert pareto.classify([-1, 1]) == "mixed"


# --- requested against achieved, every method --------------------------------------------------------

# Tolerances on the sparsity achieved, in the method's own unit:
#  * unstructured (random, magnitude, GMP, SNIP, IMP): global ranking with exact counts, so the weight
#    sparsity is within one weight (rounding) of 1 - 1/c;
#  * L1-filter: the FLOPs reduction is at least c (the keep fraction is the largest that meets it) and at
#    most 25 % beyond it (whole units: on the smoke stand-in's LeNet-300-100, a unit of fc1 is 1/300 of it);
#  * polarization: its target is a soft density loss on the gates; the channel sparsity of the consensus
#    gates is recorded against it, within 0.5 on the smoke run (seconds of training, not a quality check);
#  * L0-HC, Dep-L0 and Bernoulli gates have no target (a penalty): their achieved FLOPs sparsity is
#    recorded, in [0, 1]. LNPT is unstructured with a target, like magnitude (one weight).
UNSTRUCTURED_TOL = None  # one weight, computed from the model


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("results07")
    cfg = cmp.Config.from_profile("smoke", results_dir=str(root))
    return cfg, cmp.run_experiment(cfg, progress=False)


def test_every_method_records_requested_and_achieved(smoke_run):
    cfg, out = smoke_run
    pts = out["points"]
    data = out["data"]
    weights = cmp._weights(build_model(cfg.model, **data.model_kwargs()))
    ran = set(pts["method"])
    assert set(cfg.methods) <= ran, set(cfg.methods) - ran
    for _, r in pts.iterrows():
        m = r["method"]
        assert 0.0 <= r["achieved_sparsity"] <= 1.0
        if m in ("random", "magnitude", "gmp", "snip", "imp", "lnpt"):
            assert r["requested_unit"] == "weights"
            assert abs(r["achieved_sparsity"] - r["requested_sparsity"]) <= 1.0 / weights + 1e-12, r.to_dict()
            assert r["params_reduction"] == pytest.approx(r["requested"], rel=0.02)
        elif m == "l1_filter":
            assert r["requested"] <= r["flops_reduction"] <= 1.25 * r["requested"], r.to_dict()
        elif m == "polarization":
            assert abs(r["achieved_sparsity"] - r["requested_sparsity"]) <= 0.5, r.to_dict()
        elif m in cmp.PENALTY_METHODS:
            assert math.isnan(r["requested_sparsity"])
    # five rows per point: every seed of every level
    assert len(pts[~pts["method"].str.startswith("scratch_b:")]) == len(cmp.plan(cfg))
    # the chapter's tables and figures are built from the run
    assert len(cmp.requested_vs_achieved(pts)) > 0
    assert set(cmp.claims_table(cfg, {out["experiment"]: out}, results_dir=None)["verdict"]) <= {
        "not judged", "not measured"}
    lat = cmp.latency(cfg, out)
    assert set(lat["batch"]) == {1, cfg.timing_batch} and (lat["speedup"] > 0).all()
    ov = cmp.overlap(cfg, out)
    assert np.allclose(np.diag(ov.to_numpy()), 1.0)


def test_bernoulli_keep_maps_back_to_the_original_units(smoke_run):
    """Bernoulli pruning removes units while it trains; the recorded ``keep`` is over the original units,
    and the compacted network's FLOPs equal those of the architecture it describes (what Scratch-B and the
    latency table rebuild)."""
    cfg, out = smoke_run
    data = out["data"]
    net = build_model(cfg.model, **data.model_kwargs())
    widths = {g.name: net.get_submodule(g.slot).channels for g in net.channel_groups()}
    pts = out["points"]
    for (m, lv), p in out["units"].items():
        if m != "bernoulli":
            continue
        assert {k: v.numel() for k, v in p["keep"].items()} == widths
        row = pts[(pts["method"] == m) & (pts["level"] == lv) & (pts["seed"] == cfg.seeds[0])].iloc[0]
        arch = cmp.architecture(cfg, data, cfg.seeds[0], p["keep"])
        assert metrics.summary(arch, tuple(data.input_shape))["flops"] == row["effective_flops"]


def test_scratch_b_uses_the_compacted_architecture_fresh_weights_and_the_same_compute(smoke_run):
    cfg, out = smoke_run
    pts = out["points"]
    data = out["data"]
    ref = out["reference"]
    spe = cmp.steps_per_epoch(cfg, data)
    method_steps = math.ceil(cfg.epochs * spe)
    for (m, lv), p in out["units"].items():
        if m not in cmp.STRUCTURED:
            continue
        row = pts[(pts["method"] == f"scratch_b:{m}") & (pts["level"] == lv) & (pts["seed"] == cfg.seeds[0])]
        assert len(row) == 1
        row = row.iloc[0]
        arch = cmp.architecture(cfg, data, cfg.seeds[0], p["keep"])
        small_flops = metrics.summary(arch, tuple(data.input_shape))["flops"]
        assert row["effective_flops"] == small_flops  # the very architecture the method found
        assert row["steps"] == scratch.scratch_b_steps(method_steps, ref["flops"], small_flops, cfg.scratch_cap)
        assert row["method_steps"] == method_steps


def test_fresh_copy_keeps_shapes_and_redraws_weights():
    torch.manual_seed(0)
    model = build_model("lenet300_100")
    keep = l1_filter.keep_top(l1_filter.filter_scores(model), 0.25)
    small = compact(model, keep)
    fresh = scratch.fresh_copy(small, seed=123)
    a, b = dict(small.named_parameters()), dict(fresh.named_parameters())
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(not torch.equal(a[k], b[k]) for k in a)
    again = scratch.fresh_copy(small, seed=123)
    assert all(torch.equal(b[k], v) for k, v in again.named_parameters())
    assert scratch.scratch_b_steps(100, 8e6, 1e6, cap=2.0) == 200
    assert scratch.scratch_b_steps(100, 1.5e6, 1e6, cap=2.0) == 150
    assert scratch.scratch_b_steps(100, 8e6, 1e6, cap=1.0) == 100  # Scratch-E


def test_l1_filter_hits_the_flops_target_and_keeps_the_largest_filters():
    torch.manual_seed(0)
    model = build_model("lenet300_100")
    shape = (1, 28, 28)
    dense = l1_filter.flops(model, shape)
    for c in (2.0, 8.0, 32.0):
        small, keep = l1_filter.prune(model, shape, c)
        red = dense / l1_filter.flops(small, shape)
        assert c <= red <= 1.25 * c
        scores = l1_filter.filter_scores(model)
        for name, k in keep.items():
            assert scores[name][k].min() >= scores[name][~k].max()


def test_unit_mask_matches_compaction():
    torch.manual_seed(0)
    model = build_model("lenet300_100").eval()
    keep = l1_filter.keep_top(l1_filter.filter_scores(model), 0.3)
    masked = build_model("lenet300_100").eval()
    masked.load_state_dict(model.state_dict())
    masks_mod.apply_mask(masked, cmp.unit_mask(model, keep))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(masked(x), compact(model, keep)(x), atol=1e-5)


def test_config_profiles_and_checks():
    cpu = cmp.Config.from_profile("cpu")
    assert cpu.dataset == "fashion_mnist" and len(cpu.compressions) >= 5 and len(cpu.seeds) >= 3
    assert all(b / a == pytest.approx(2.0) for a, b in zip(cpu.compressions, cpu.compressions[1:]))
    from pruning_lib.runs import ConfigError
    with pytest.raises(ConfigError):
        cmp.Config.from_profile("cpu", pretrain_epochs=5.0, epochs=2.0)
    assert cmp.Config.from_profile("smoke").dataset.startswith("synthetic")


# --- experiments: one model on one dataset each ------------------------------------------------------

def test_the_experiments_parameter_is_validated():
    from pruning_lib import book
    from pruning_lib.runs import ConfigError

    for bad, what in ((("resnet50/mnist",), "is not one of"), (("lenet300_100",), "is not one of"),
                      (("lenet300_100/fashion_mnist", "lenet300_100/fashion_mnist"), "more than once")):
        with pytest.raises(ConfigError, match=f"parameter 'experiments': .*{what}"):
            cmp.Config.from_profile("cpu", experiments=bad)
    # one way to say it: model and dataset are no longer parameters
    for name in ("model", "dataset"):
        with pytest.raises(ConfigError, match="unknown parameter"):
            cmp.Config.from_profile("cpu", **{name: "lenet5_caffe"})
    with pytest.raises(book.BookError, match="07_comparison: parameter 'experiments'"):
        book.validate_parameters(ROOT / "notebooks" / "07_comparison.ipynb", "cpu",
                                 {"experiments": ["lenet300_100/imagenet"]})
    two = cmp.Config.from_profile("cpu", experiments=("lenet300_100/fashion_mnist", "lenet5_caffe/fashion_mnist"))
    with pytest.raises(ValueError, match="take one"):
        two.model
    with pytest.raises(ValueError, match="name one"):
        two.experiment()
    with pytest.raises(ValueError, match="not one of this config's experiments"):
        two.experiment("resnet20/cifar10")
    one = two.experiment("lenet5_caffe/fashion_mnist")
    assert (one.model, one.dataset, one.setup) == ("lenet5_caffe", "fashion_mnist", "lenet5_caffe/fashion_mnist")
    # an experiment of the cpu profile is the cpu config itself: the same units, the same hashes
    cpu = cmp.Config.from_profile("cpu")
    assert cpu.experiments == ("lenet300_100/fashion_mnist",) and cpu.experiment() == cpu
    assert cpu.experiment().experiment() == cpu.experiment()


def test_the_paper_profile_runs_resnet20_on_cifar10_and_resnet50_on_imagenet():
    paper = cmp.Config.from_profile("paper")
    assert paper.experiments == ("resnet20/cifar10", "resnet50/imagenet")
    r20, r50 = (paper.experiment(e) for e in paper.experiments)
    assert (r20.epochs, r20.pretrain_epochs, r20.timing_batch, r20.timing_repeats) == (160.0, 80.0, 256, 30)
    # ImageNet: the 90-epoch schedule, pre-training keeping its half; latency at batch 32, best of 5
    assert (r50.epochs, r50.pretrain_epochs, r50.timing_batch, r50.timing_repeats) == (90.0, 45.0, 32, 5)
    assert r50.experiment() == r50
    assert cmp.Config.from_profile("paper", budget=2.0).experiment("resnet50/imagenet").epochs == 180.0
    assert list(cmp.experiment_table(paper)["epochs (budget)"]) == [160.0, 90.0]
    # shorter settings than the limits are kept (a test's, a quick run's)
    short = cmp.Config.from_profile("paper", epochs=0.5, pretrain_epochs=0.25, timing_batch=4)
    assert short.experiment("resnet50/imagenet").epochs == 0.5
    table = cmp.method_table(paper)
    for e in ("ResNet-20 on CIFAR-10", "ResNet-50 on ImageNet"):
        status = dict(zip(table["method"], table[f"status, {e}"]))
        for m in ("imp", "snip", "bernoulli"):
            assert status[cmp.label(m)].startswith("not run in paper: "), (e, m)
        assert {cmp.label(m) for m in cmp.METHODS if status[cmp.label(m)] == "run"} == {
            cmp.label(m) for m in ("random", "magnitude", "gmp", "lnpt", "l1_filter", "polarization", "l0_hc",
                                   "dep_l0")}


def test_two_experiments_give_points_and_claims_of_their_own(smoke_run):
    """Two experiments in the smoke setting, the first the smoke run's own (its units are loaded, not
    trained again: the same hashes), the second LeNet-5-Caffe: points per experiment, one ledger whose rows
    name their experiment, the same rows as a run of the one experiment otherwise."""
    cfg1, out1 = smoke_run
    e1, e2 = "lenet300_100/synthetic-mnist", "lenet5_caffe/synthetic-mnist"
    methods = ("magnitude", "gmp", "l1_filter")
    cfg = cfg1.replace(experiments=(e1, e2), methods=methods)
    keys1 = {u.key for u in cmp.work_units(cfg1)}
    listed = cmp.work_units(cfg)
    named = [u.description.split(": ")[0] for u in listed]  # experiment after experiment
    assert named == [e1] * named.count(e1) + [e2] * named.count(e2) and named.count(e2)
    first = [u for u in listed if u.description.startswith(f"{e1}: ")]
    assert first and all(u.done and u.key in keys1 for u in first)  # the smoke run's units, by hash
    assert not any(u.done for u in listed if u.description.startswith(f"{e2}: "))
    runs = {e: cmp.run_experiment(cfg, e, progress=False) for e in cfg.experiments}
    for e, out in runs.items():
        assert out["experiment"] == e and out["cfg"].experiments == (e,)
        assert set(out["points"]["method"]) == {*methods, "scratch_b:l1_filter"}
        assert len(out["points"][~out["points"]["method"].str.startswith("scratch_b:")]) == \
            len(cmp.plan(cfg.experiment(e)))
    assert len(cmp.plan(cfg)) == sum(len(cmp.plan(cfg.experiment(e))) for e in cfg.experiments)
    mine = out1["points"][out1["points"]["method"].isin(list(methods) + ["scratch_b:l1_filter"])]
    pd.testing.assert_frame_equal(runs[e1]["points"], mine[runs[e1]["points"].columns].reset_index(drop=True))
    assert all(u.done for u in cmp.work_units(cfg))
    # one ledger, every row naming its experiment
    table = cmp.claims_table(cfg, runs, results_dir=None)
    labels = [cmp.experiment_label(e) for e in cfg.experiments]
    assert labels == ["LeNet-300-100 on a generated MNIST stand-in", "LeNet-5-Caffe on a generated MNIST stand-in"]
    assert all(any(c.startswith(f"{lb}: ") for lb in labels) for c in table["claim"])
    alone = cmp.claims_table(cfg1.replace(methods=methods), {e1: runs[e1]}, results_dir=None)
    ours = cmp.experiment_claims(cfg, table, e1)
    assert list(ours["claim"]) == [f"{labels[0]}: {c}" for c in alone["claim"]]
    pd.testing.assert_frame_equal(ours.drop(columns="claim").reset_index(drop=True), alone.drop(columns="claim"))
    assert len(cmp.experiment_claims(cfg, table, e2)) == len(alone)
    # the page: a status column, a discussion list and a download file per experiment
    assert [c for c in cmp.method_table(cfg).columns if c.startswith("status")] == [f"status, {lb}" for lb in labels]
    verdicts = {e: cmp.pareto_table(out["points"]) for e, out in runs.items()}
    lats = {e: pd.DataFrame(columns=["batch", "ratio", "dense_twice"]) for e in runs}  # nothing timed
    text = cmp.discussion_glue(cfg, runs, verdicts, lats, table)
    assert all(text[k].count(f"**{lb}**") == 1 for k in ("pareto_md", "reach_md", "scratch_md") for lb in labels)
    assert text["dense_md"].count(" %") == 2
    single = cmp.discussion_glue(cfg1, {e1: out1}, {e1: cmp.pareto_table(out1["points"])},
                                 {e1: lats[e1]}, cmp.claims_table(cfg1, {e1: out1}, results_dir=None))
    assert single["dense_md"] == f"{100 * out1['dense']['accuracy'].mean():.1f} %"
    assert "**" not in single["reach_md"]
    names = [cmp.download_link(cfg, e, runs[e]["points"], "comparison_points", "every point") for e in runs]
    assert 'download="comparison_points_lenet300_100_synthetic_mnist.csv"' in names[0]
    assert 'download="comparison_points_lenet5_caffe_synthetic_mnist.csv"' in names[1]
    assert 'download="comparison_points.csv"' in cmp.download_link(cfg1, e1, out1["points"], "comparison_points",
                                                                   "every point")


# --- the paper profile, end to end on generated stand-ins (tests/test_paper_profiles.py's way) ---------

def test_paper_profile_on_cifar10_stand_in(tmp_path, monkeypatch):
    """ResNet-20 on a generated CIFAR-10 stand-in read from data/ in the documented layout: every method the
    paper profile runs (IMP and SNIP have no chapter-2 setup for ResNet-20, Bernoulli gates' estimator no
    residual blocks, and they say so), one level, one seed,
    a few steps; the numbers mean nothing."""
    from test_paper_profiles import PaperData

    torch.set_num_threads(1)
    monkeypatch.setattr(cmp, "LATENCY_CALLS", 1)  # one timed forward per network and batch: numbers mean nothing
    pd_ = PaperData(tmp_path, monkeypatch)
    pd_.cifar10()
    paper = cmp.Config.from_profile("paper", results_dir=pd_.results, seeds=(0,), compressions=(2.0,),
                                    lambdas=(1.0,), epochs=0.5, pretrain_epochs=0.25, batch_size=4,
                                    rewind_iteration=0, timing_repeats=1, timing_batch=4)
    cfg = paper.experiment("resnet20/cifar10")
    assert (cfg.model, cfg.dataset) == ("resnet20", "cifar10")
    out = cmp.run_experiment(paper, "resnet20/cifar10", progress=False)
    assert out["cfg"] == cfg
    pts = out["points"]
    ran = set(pts["method"])
    assert {"random", "magnitude", "gmp", "lnpt", "l1_filter", "polarization", "l0_hc", "dep_l0"} <= ran
    assert {f"scratch_b:{m}" for m in cmp.STRUCTURED if m != "bernoulli"} <= ran
    statuses = dict(zip(cmp.method_table(cfg)["method"], cmp.method_table(cfg)["status"]))
    assert statuses[cmp.label("imp")].startswith("not run in paper")
    assert statuses[cmp.label("bernoulli")].startswith("not run in paper")  # no flip estimator for ResNets
    assert "bernoulli" not in ran
    table = cmp.claims_table(cfg, {"resnet20/cifar10": out}, results_dir=pd_.results)
    assert (table["profile"] == "paper").all() and len(table)
    assert len(cmp.latency(cfg, out)) and len(cmp.overlap(cfg, out))


def test_paper_profile_resnet50_on_imagenet_stand_in(tmp_path, monkeypatch):
    """The paper profile's ResNet-50 / ImageNet experiment on a generated ImageNet stand-in (2 classes, 256 x
    256 JPEGs, read from data/imagenet/ by the chapter's own loader at 224 x 224), through the notebook's
    path: the experiment's config (:meth:`Config.experiment`), its units, compaction, Scratch-B and the
    claims ledger. One method, L0-HC, at one λ, one seed, one step of one image; its gates start closed
    (``init_log_alpha`` -3), so that one step compacts: every channel group of ResNet-50 keeps one zeroed
    channel. The numbers mean nothing.

    Not run end to end here: the other methods of the experiment (random, magnitude, GMP, LNPT, L1-filter,
    polarization, Dep-L0 and their Scratch-B; test_resnet50_imagenet_plans_every_paper_method lists them),
    the latency and overlap tables, and anything at the real schedule: one ResNet-50 training step at
    224 x 224 takes about a second per image on this CPU, and every other method costs as much again (a
    dense pre-training, a second training, or, for L1-filter, 30 compactions of ResNet-50 to find its keep
    fraction), which the unit tests cannot afford. The same code paths run on ResNet-20 in
    test_paper_profile_on_cifar10_stand_in."""
    from pruning_lib import data as data_mod
    from test_data_layouts import write_image_folder
    from test_paper_profiles import PaperData

    torch.set_num_threads(1)
    pd_ = PaperData(tmp_path, monkeypatch)
    wnids = ["n01440764", "n01443537"]
    write_image_folder(pd_.root / "imagenet" / "train", wnids, per_class=2, size=256)
    write_image_folder(pd_.root / "imagenet" / "val", wnids, per_class=1, size=256)
    # the loader holds out 10,000 training images for validation: one here (3 left to train on)
    monkeypatch.setitem(data_mod.DATASETS, "imagenet",
                        functools.partial(data_mod.DATASETS["imagenet"], val_size=1))
    paper = cmp.Config.from_profile("paper", results_dir=pd_.results, methods=("l0_hc",), seeds=(0,),
                                    lambdas=(1.0,), init_log_alpha=-3.0, epochs=0.3, pretrain_epochs=0.1,
                                    batch_size=1)
    assert "resnet50/imagenet" in paper.experiments
    out = cmp.run_experiment(paper, "resnet50/imagenet", progress=False)
    cfg = out["cfg"]
    assert (cfg.model, cfg.dataset, cfg.epochs) == ("resnet50", "imagenet", 0.3)
    data = out["data"]
    assert tuple(data.input_shape) == (3, 224, 224) and (len(data.train), len(data.val)) == (3, 1)
    pts = out["points"].set_index("method")
    assert set(pts.index) == {"l0_hc", "scratch_b:l0_hc"}
    point = pts.loc["l0_hc"]
    assert (point["level"], point["seed"], point["steps"]) == (1.0, 0, 1)
    assert 0 <= point["accuracy"] <= 1 and 0 <= point["val_accuracy"] <= 1
    # its compaction: every channel group of ResNet-50 (conv1 and conv2 of its 16 bottlenecks) emptied to one
    # zeroed channel
    keep = out["units"][("l0_hc", 1.0)]["keep"]
    assert sorted(keep) == sorted(f"layer{i}.{j}.conv{k}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3))
                                  for j in range(n) for k in (1, 2))
    assert not any(bool(k.any()) for k in keep.values())
    assert point["flops_reduction"] > 2 and point["achieved_sparsity"] > 0.5
    assert point["effective_flops"] == pytest.approx(out["reference"]["flops"] / point["flops_reduction"])
    # Scratch-B trained the architecture rebuilt from ``keep`` (its FLOPs are the compacted network's), for
    # the method's step times its FLOPs reduction, capped at 2
    scratch_row = pts.loc["scratch_b:l0_hc"]
    assert scratch_row["effective_flops"] == point["effective_flops"] and scratch_row["steps"] == 2
    # the ledger: one table for the chapter, written for the paper profile
    table = cmp.claims_table(cfg, {"resnet50/imagenet": out}, results_dir=pd_.results)
    assert (table["profile"] == "paper").all() and len(table) == 2
    assert (tmp_path / "results" / "claims" / "paper" / "07_comparison.csv").exists()
    assert any("L0-HC" in c and "Scratch-B" in c for c in table["claim"])


def test_resnet50_imagenet_plans_every_paper_method(tmp_path):
    """The paper profile's ResNet-50 / ImageNet units, as ``python -m pruning_lib.book units 07 --profile
    paper --list`` lists them (nothing runs): every method that can run on ResNet-50, each at every level and
    seed, at the ImageNet schedule; IMP, SNIP and Bernoulli gates are not planned, and the methods table
    says why."""
    from pruning_lib import units

    _, cfg, listed = units.chapter_units("07", "paper", [("results_dir", str(tmp_path))], ROOT)
    assert cfg.experiments == ("resnet20/cifar10", "resnet50/imagenet")
    r50 = [u for u in listed if u.description.startswith("resnet50/imagenet: ")]
    r20 = [u for u in listed if u.description.startswith("resnet20/cifar10: ")]
    assert len(r20) + len(r50) == len(listed) and len(r50) == 126 and not any(u.done for u in listed)
    assert all(u.datasets == ("imagenet",) and "(90-epoch budget)" in u.description for u in r50)
    assert [u.key for u in r50] == [u.key for u in cmp.work_units(cfg.experiment("resnet50/imagenet"))]
    dense = [u.description for u in r50 if u.kind == "dense"]
    assert len(dense) == 6 and sum(", 90 epochs, " in d for d in dense) == 3 and sum(", 45 epochs, " in d
                                                                                     for d in dense) == 3
    planned = ("random", "magnitude", "gmp", "lnpt", "l1_filter", "polarization", "l0_hc", "dep_l0")
    for m in planned:
        assert sum(u.description.startswith(f"resnet50/imagenet: {cmp.label(m)} at ") for u in r50) == 15, m
    assert {u.kind for u in r50} == {"dense", "comparison/prune_finetune", "comparison/gmp", "comparison/lnpt",
                                     "comparison/polarization", "comparison/hard_concrete"}
    status = dict(zip(cmp.method_table(cfg)["method"], cmp.method_table(cfg)["status, ResNet-50 on ImageNet"]))
    assert status[cmp.label("imp")] == status[cmp.label("snip")] == \
        "not run in paper: chapter 2 has no setup resnet50/imagenet"
    assert "no residual blocks" in status[cmp.label("bernoulli")]


def test_pareto_unsettled_levels_are_tied_like_the_ledger():
    pts, ref = _curves((0.05, 0.05, 0.05, 0.05))
    pts["settled"] = True
    pts.loc[pts["level"] == 2, "settled"] = False
    v = pareto.verdicts(pts, ref)
    assert (v.loc[0, "class"], v.loc[0, "above"], v.loc[0, "tied"]) == ("better", 3, 1)
    ref["settled"] = False  # an unsettled reference decides nothing
    assert pareto.verdicts(pts, ref).loc[0, "class"] == "tied"


def test_work_units_list_the_runs_own_stores_and_run_one_from_the_command_line(smoke_run, tmp_path):
    """`python -m pruning_lib.book units 07 ...` lists exactly the Stores the notebook's run reads (all done
    after it, the same hashes twice), Scratch-B included once its method ran; one unit run through the
    listing's ``run(results_dir)`` writes the Store the notebook then loads."""
    cfg, out = smoke_run
    units = cmp.work_units(cfg)
    assert [u.key for u in units] == [u.key for u in cmp.work_units(cfg)]
    assert all(u.done for u in units), [u.description for u in units if not u.done]
    dense_tasks, point_tasks = cmp.tasks(cfg)
    structured = sum(1 for p in out["points"]["method"] if p in cmp.STRUCTURED)
    assert len(units) == len(dense_tasks) + len(point_tasks) + structured
    # a fresh results folder: the first GMP unit, run as the command line runs it
    fresh = cfg.replace(results_dir=str(tmp_path))
    unit = next(u for u in cmp.work_units(fresh) if u.kind == "comparison/gmp")
    assert not unit.done
    unit.run(str(tmp_path))
    again = next(u for u in cmp.work_units(fresh) if u.key == unit.key)
    assert again.done
    row = cmp.run_point((fresh, "gmp", cfg.compressions[0], cfg.seeds[0]), str(tmp_path))["row"]
    ours = out["points"][(out["points"]["method"] == "gmp") & (out["points"]["level"] == cfg.compressions[0])
                         & (out["points"]["seed"] == cfg.seeds[0])].iloc[0]
    assert row["accuracy"] == ours["accuracy"] and row["effective_flops"] == ours["effective_flops"]


def test_the_discussion_lists_come_from_the_run(smoke_run):
    """The notebook's glued discussion (Markdown lists and numbers) is built by :func:`cmp.discussion`."""
    cfg, out = smoke_run
    verdicts = cmp.pareto_table(out["points"])
    table = cmp.claims_table(cfg, {out["experiment"]: out}, results_dir=None)
    lat = pd.DataFrame(columns=["batch", "ratio", "dense_twice"])  # nothing timed: the test stays fast
    text = cmp.discussion(cfg, out, verdicts, lat, table)
    assert list(text) == ["pareto_md", "ratio_md", "scratch_md", "dense_acc", "reach_md", "train_minutes"]
    assert text["ratio_md"] == "- nothing was timed"
    assert text["pareto_md"].count("\n") == max(len(verdicts) - 1, 0)
    ran = [m for m in dict.fromkeys(out["points"]["method"]) if not m.startswith("scratch_b:")]
    assert [line.split(":")[0] for line in text["reach_md"].splitlines()] == [f"- {cmp.label(m)}" for m in ran]
    assert 0 <= text["dense_acc"] <= 100 and text["train_minutes"] >= 0
    lat = pd.DataFrame({"batch": [1, 1], "ratio": [0.5, 1.0], "dense_twice": [1.1, 1.1]})
    assert cmp.discussion(cfg, out, verdicts, lat, table)["ratio_md"] == (
        "- batch 1: speed-up / FLOPs reduction from 0.50 to 1.00 (median 0.75); the dense network timed twice "
        "differed by a factor 1.10")
