"""Tests of LNPT: the method (pruning_lib.methods.lnpt) and chapter 6 (pruning_lib.chapters.lnpt, its units)."""
import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_lib.chapters import lnpt as chapter
from pruning_lib.methods import lnpt
from pruning_lib.data import DataSplits, TensorSplit, batches, load_dataset
from pruning_lib.gates import set_gates
from pruning_lib.masks import prunable_names
from pruning_lib.models import build_model
from pruning_lib.runs import ConfigError
from pruning_lib.train import fit


def tiny_mlp(seed, hidden=(6, 4)):
    torch.manual_seed(seed)
    return build_model("lenet300_100", image_size=4, hidden=hidden, num_classes=3)


class Scale(nn.Module):
    """A gate multiplying every unit by the constant ``s``: a known perturbation of the features."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


# --- the learning gap ---------------------------------------------------------------------------------

def test_learning_gap_is_zero_for_identical_networks():
    teacher = build_model("lenet5_caffe", width=0.25)
    student = copy.deepcopy(teacher)
    x = torch.randn(16, 1, 28, 28)
    assert float(lnpt.learning_gap(teacher, student, x).detach()) == 0.0
    ft = lnpt.penultimate_features(teacher, x)
    assert lnpt.aligned_learning_gap(ft, ft, ft, ft) == pytest.approx(0.0, abs=1e-4)


def test_learning_gap_grows_with_a_known_perturbation():
    """Scaling the last hidden layer by s (a gate before its ReLU) scales the features exactly by s, so the
    gap is (1 - s)^2 mean ||phi||^2: zero at s = 1, growing as s moves away."""
    teacher = tiny_mlp(0)
    x = torch.randn(32, 1, 4, 4)
    norm = float(lnpt.penultimate_features(teacher, x).pow(2).sum(1).mean())
    assert norm > 0
    gaps = []
    for s in (1.0, 0.9, 0.5, 0.0):
        student = copy.deepcopy(teacher)
        set_gates(student, {"fc2": Scale(s)})
        gap = float(lnpt.learning_gap(teacher, student, x).detach())
        assert gap == pytest.approx((1 - s) ** 2 * norm, rel=1e-5, abs=1e-7)
        gaps.append(gap)
    assert gaps == sorted(gaps) and gaps[-1] > gaps[1] > 0
    # weight noise of growing size: the gap grows too
    noisy = []
    for eps in (1e-3, 1e-2, 1e-1):
        student = copy.deepcopy(teacher)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(eps * torch.randn_like(p))
        noisy.append(float(lnpt.learning_gap(teacher, student, x).detach()))
    assert noisy[0] < noisy[1] < noisy[2]


def test_learning_gap_needs_comparable_widths_and_projection_fixes_it():
    teacher, student = tiny_mlp(0, (6, 4)), tiny_mlp(1, (6, 3))
    x = torch.randn(8, 1, 4, 4)
    with pytest.raises(ValueError, match="projection"):
        lnpt.learning_gap(teacher, student, x)
    proj = lnpt.make_projection(3, 4)
    assert isinstance(proj, nn.Linear) and lnpt.make_projection(4, 4) is None
    assert torch.isfinite(lnpt.learning_gap(teacher, student, x, proj))


def _scaled_copy(model, c):
    """``model`` with its last hidden Linear (before the ReLU) multiplied by ``c > 0``: ReLU is positively
    homogeneous, so the penultimate features are exactly ``c`` times the original ones."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.head[3].weight.mul_(c)
        out.head[3].bias.mul_(c)
    return out


@pytest.mark.parametrize("c", [10.0, 0.1])
def test_paper_gap_is_scale_sensitive_as_defined_and_aligned_gap_is_not(c):
    """Issue 12: the paper's gap mean ||phi_T - phi_S||^2 changes with the scale of the student's features
    by the factor its definition implies, (A - 2cB + c^2 C) / (A - 2B + C) with A = mean ||phi_T||^2,
    B = mean <phi_T, phi_S>, C = mean ||phi_S||^2; the ridge-aligned gap (ours) does not change at all."""
    teacher, student = tiny_mlp(0, (6, 4)), tiny_mlp(1, (5, 4))
    x_fit, x_eval = torch.randn(120, 1, 4, 4), torch.randn(80, 1, 4, 4)
    scaled = _scaled_copy(student, c)
    ft_fit, ft_eval = lnpt.penultimate_features(teacher, x_fit), lnpt.penultimate_features(teacher, x_eval)
    fs_fit, fs_eval = lnpt.penultimate_features(student, x_fit), lnpt.penultimate_features(student, x_eval)
    assert torch.allclose(lnpt.penultimate_features(scaled, x_eval), c * fs_eval, rtol=1e-5, atol=1e-6)
    ft, fs = ft_eval.double(), fs_eval.double()
    a, b, cc = ft.pow(2).sum(1).mean(), (ft * fs).sum(1).mean(), fs.pow(2).sum(1).mean()
    expected = float((a - 2 * c * b + c * c * cc) / (a - 2 * b + cc))
    raw, raw_scaled = (float(lnpt.learning_gap(teacher, m, x_eval).detach()) for m in (student, scaled))
    assert raw_scaled / raw == pytest.approx(expected, rel=1e-4)
    assert abs(raw_scaled / raw - 1) > 0.1  # the factor is far from 1: the paper's gap sees the scale
    assert lnpt.raw_learning_gap(ft_eval, c * fs_eval) == pytest.approx(raw_scaled, rel=1e-5)
    aligned = lnpt.aligned_learning_gap(ft_fit, fs_fit, ft_eval, fs_eval, ridge=1e-6)
    aligned_scaled = lnpt.aligned_learning_gap(ft_fit, lnpt.penultimate_features(scaled, x_fit), ft_eval,
                                               lnpt.penultimate_features(scaled, x_eval), ridge=1e-6)
    assert aligned_scaled == pytest.approx(aligned, rel=1e-4)
    table = lnpt.feature_scaling(ft_fit, ft_eval, fs_fit, fs_eval, factors=(1.0, c))
    assert table["learning_gap_ratio"].iloc[1] == pytest.approx(expected, rel=1e-4)
    assert table["aligned_gap_ratio"].iloc[1] == pytest.approx(1.0, rel=1e-4)


def test_paper_gap_needs_equal_widths():
    with pytest.raises(ValueError, match="equal shape"):
        lnpt.raw_learning_gap(torch.zeros(5, 4), torch.zeros(5, 3))
    cfg = chapter.Config.from_profile("smoke", dataset="synthetic-mnist", trajectory_teacher="lenet5_caffe",
                                   trajectory_student="lenet300_100", results_dir="unused")
    with pytest.raises(ConfigError, match="equal width"):
        chapter.prepare(cfg)


def test_aligned_gap_is_invariant_to_a_linear_change_of_basis():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(200, 5, generator=g)
    mix = torch.randn(5, 8, generator=g)
    fs = ft @ mix + 0.5  # the student's features determine the teacher's linearly
    assert lnpt.aligned_learning_gap(ft[:150], fs[:150], ft[150:], fs[150:], ridge=1e-8) < 1e-4
    noise = torch.randn(200, 8, generator=g)
    assert lnpt.aligned_learning_gap(ft[:150], noise[:150], ft[150:], noise[150:]) > 0.8


def test_weight_distance():
    m = tiny_mlp(0)
    init = lnpt.snapshot(m)
    assert lnpt.weight_distance(m, init) == 0.0
    with torch.no_grad():
        m.classifier.weight.add_(torch.full_like(m.classifier.weight, 0.5))
    n = m.classifier.weight.numel()
    assert lnpt.weight_distance(m, init) == pytest.approx(0.5 * n ** 0.5)
    assert set(init) == set(prunable_names(m))


def test_features_and_logits_match_the_model():
    m = tiny_mlp(0)
    x = torch.randn(5, 1, 4, 4)
    f, z = lnpt.features_and_logits(m, x)
    assert torch.allclose(f, m.forward_features(x)) and torch.allclose(z, m(x))


# --- the label-free score -----------------------------------------------------------------------------

def test_label_free_score_matches_independent_autograd():
    """|theta * dL_LF/dtheta| from the library (criteria.gradient_scores + LabelFreeLoss) against a
    hand-written functional forward of the same tiny MLPs, differentiated by torch.autograd."""
    teacher, student = tiny_mlp(0, (5, 4)), tiny_mlp(1, (6, 4))
    x = torch.randn(10, 1, 4, 4)
    outputs = lnpt.TeacherOutputs(teacher)
    gap_scale, t = 2.5, 3.0
    loss = lnpt.LabelFreeLoss(outputs, gap_weight=0.7, kd_weight=0.3, temperature=t, gap_scale=gap_scale)
    scores = lnpt.label_free_scores(student, loss, [(x, lnpt.WithheldLabels(10))])

    def mlp(params, x):
        w1, b1, w2, b2, w3, b3 = params
        h = x.flatten(1)
        h = F.relu(h @ w1.T + b1)
        f = F.relu(h @ w2.T + b2)
        return f, f @ w3.T + b3

    tp = [p.detach() for p in (teacher.head[0].weight, teacher.head[0].bias, teacher.head[3].weight,
                               teacher.head[3].bias, teacher.classifier.weight, teacher.classifier.bias)]
    sp = [p.detach().clone().requires_grad_(True) for p in (
        student.head[0].weight, student.head[0].bias, student.head[3].weight, student.head[3].bias,
        student.classifier.weight, student.classifier.bias)]
    ft, zt = mlp(tp, x)
    fs, zs = mlp(sp, x)
    gap = ((ft - fs) ** 2).sum(1).mean() / gap_scale
    pt = torch.softmax(zt / t, 1)
    kd = (pt * (torch.log(pt) - torch.log_softmax(zs / t, 1))).sum(1).mean() * t * t
    total = 0.7 * gap + 0.3 * kd
    grads = torch.autograd.grad(total, sp)
    expected = {"head.0.weight": (sp[0] * grads[0]).abs(), "head.3.weight": (sp[2] * grads[2]).abs(),
                "classifier.weight": (sp[4] * grads[4]).abs()}
    assert set(scores) == set(expected)
    for n, e in expected.items():
        assert torch.allclose(scores[n], e.detach(), rtol=1e-4, atol=1e-7), n
    assert any(float(s.sum()) > 0 for s in scores.values())


def test_label_free_score_differs_from_labelled_snip():
    teacher, student = tiny_mlp(0), tiny_mlp(1)
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    lf = lnpt.label_free_scores(student, lnpt.LabelFreeLoss(lnpt.TeacherOutputs(teacher)), [(x, y)])
    sn = lnpt.snip_scores(student, [(x, y)])
    assert not torch.allclose(lf["head.0.weight"], sn["head.0.weight"])


# --- withheld labels -----------------------------------------------------------------------------------

def test_withheld_labels_batch_but_refuse_any_read():
    y = lnpt.WithheldLabels(10)
    assert len(y) == 10 and y.shape == (10,)
    part = y[torch.tensor([1, 3])]
    assert isinstance(part, lnpt.WithheldLabels) and len(part[0:1]) == 1 and len(y.to("cpu")) == 10
    logits = torch.randn(10, 3)
    for read in (lambda: F.cross_entropy(logits, y), lambda: y.sum(), lambda: y.tolist(), lambda: y == 0,
                 lambda: y.numpy(), lambda: int(y[0]), lambda: logits.argmax(1).eq(y)):
        with pytest.raises(lnpt.LabelAccessError):
            read()


def _tiny_splits(n=60):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    sp = TensorSplit(x, y)
    return DataSplits("synthetic-tiny", sp, sp.subset(20), sp.subset(20), 3, (1, 4, 4))


def test_label_free_training_never_reads_labels():
    """The label-free path runs on a split whose labels raise on any access; the labelled loss fails on the
    same split (so the guard is live), and the label-free loss learns (the gap shrinks)."""
    data = _tiny_splits()
    unlabeled = DataSplits(data.name, lnpt.withhold_labels(data.train), data.val, data.test, 3, (1, 4, 4))
    with pytest.raises(lnpt.LabelAccessError):
        fit(tiny_mlp(2), unlabeled, iterations=1, batch_size=16, progress=False)
    teacher, student = tiny_mlp(0, (6, 4)), tiny_mlp(1, (6, 3))
    outputs = lnpt.TeacherOutputs(teacher, data.train.x)
    x_all = data.train.x
    proj = lnpt.init_projection(student, outputs, x_all)
    assert isinstance(proj, nn.Linear)
    loss = lnpt.LabelFreeLoss(outputs, projection=proj)
    scores = lnpt.label_free_scores(student, loss, batches(unlabeled.train, 16))
    assert set(scores) == set(prunable_names(student))
    before = float(loss(student, x_all, None).detach())
    h = lnpt.train_label_free(student, outputs, data, projection=proj, iterations=40, batch_size=16, lr=1e-2,
                              progress=False)
    assert len(h) >= 2 and float(loss(student, x_all, None).detach()) < before
    assert outputs.hits > 0  # the teacher's answers came from the cache, verified to be the same images


def test_teacher_cache_is_exact_and_falls_back():
    teacher = tiny_mlp(0)
    x = torch.randn(30, 1, 4, 4)
    outputs = lnpt.TeacherOutputs(teacher, x)
    idx = torch.tensor([4, 0, 17, 17])
    f, z = outputs(x[idx])
    assert torch.allclose(f, teacher.forward_features(x[idx])) and torch.allclose(z, teacher(x[idx]))
    new = torch.randn(3, 1, 4, 4)
    f2, _ = outputs(new)
    assert outputs.misses == 1 and torch.allclose(f2, teacher.forward_features(new))


def test_lnpt_splits_are_disjoint():
    data = load_dataset("synthetic-mnist", n=200)
    t, s = lnpt.lnpt_splits(data, 0.5)
    assert len(t.train) + len(s.train) == len(data.train)
    rows = lambda sp: {tuple(r.flatten()[:8].tolist()) for r in sp.x}  # noqa: E731
    assert not rows(t.train) & rows(s.train)
    with pytest.raises(ValueError):
        lnpt.lnpt_splits(data, 0.0001)


# --- config, analysis, claims ----------------------------------------------------------------------------

def test_config_profiles_and_errors():
    for p in ("smoke", "cpu", "paper"):
        cfg = chapter.Config.from_profile(p)
        assert cfg.student_specs()
    with pytest.raises(ConfigError):
        chapter.Config.from_profile("cpu", student_widths=(1.0, 0.5, 0.25))
    with pytest.raises(ConfigError):
        chapter.Config.from_profile("cpu", methods=("magic",))
    with pytest.raises(ConfigError):
        chapter.Config.from_namespace({"profile": "cpu", "studnets": ("lenet300_100",)})


def test_paper_profile_fails_with_missing_dataset_error(tmp_path):
    from pruning_lib.data import DatasetNotFoundError

    cfg = chapter.Config.from_profile("paper", data_root=str(tmp_path), results_dir=str(tmp_path / "r"))
    with pytest.raises(DatasetNotFoundError, match="cifar"):
        chapter.prepare(cfg)


def _trajectories():
    """Probed runs where accuracy, the paper's gap and the aligned gap follow the step alone, while the
    weight distance also grows with the learning rate (runs at larger steps travel farther)."""
    rows = []
    for seed in (0, 1, 2):
        for lr in (1e-4, 1e-2):
            for s in (0.0, 0.9):
                for step in range(8):
                    rows.append({"seed": seed, "lr": lr, "sparsity": s, "step": step,
                                 "weight_distance": step * (1 + 1e4 * lr) * (1 - s / 2),
                                 "learning_gap": 100.0 / (1 + step) + seed, "aligned_gap": 1.0 / (2 + step),
                                 "test_accuracy": 0.5 + 0.05 * step + 0.001 * seed})
    return pd.DataFrame(rows)


def test_correlations_within_runs_and_learning_rates():
    traj = _trajectories()
    cor = chapter.correlations(traj, n_boot=200)
    runs = cor[cor["scope"] == "run"]
    assert len(runs) == 12 and (runs["runs"] == 1).all()
    assert runs["rho_weight_distance"].tolist() == pytest.approx([1.0] * 12)
    assert runs["rho_learning_gap"].tolist() == pytest.approx([-1.0] * 12)
    per_lr = cor[cor["scope"] == "learning rate"].set_index("lr")
    assert list(per_lr.index) == [1e-4, 1e-2] and (per_lr["runs"] == 6).all()
    pooled = cor[cor["scope"] == "all runs"].iloc[0]
    # pooling across learning rates blurs the distance's relation to accuracy by construction
    assert abs(pooled["rho_weight_distance"]) < per_lr["rho_weight_distance"].abs().min()
    for q in chapter.QUANTITIES:
        assert (per_lr[f"rho_{q}_low"] <= per_lr[f"rho_{q}"] + 1e-12).all()
        assert (per_lr[f"rho_{q}"] <= per_lr[f"rho_{q}_high"] + 1e-12).all()
    view = chapter.correlation_summary(cor)
    assert len(view) == 2 + 2 + 1 and set(chapter.QUANTITIES.values()) <= set(view.columns)


def test_correlations_and_claims(tmp_path):
    traj = _trajectories()
    acc = pd.DataFrame([{"student": "m", "method": m, "sparsity": s, "seed": seed,
                         "test_accuracy": {"lnpt": 0.9, "supervised": 0.8, "snip": 0.85, "random": 0.5}[m] + 0.01 * seed}
                        for m in chapter.METHODS for s in (0.9, 0.98) for seed in (0, 1, 2)])
    hist = pd.DataFrame([{"student": "m", "method": m, "sparsity": s, "seed": seed, "step": t,
                          "test_accuracy": 0.9} for m in chapter.METHODS for s in (0.9, 0.98) for seed in (0, 1, 2)
                         for t in range(0, 50, 5)])
    cfg = chapter.Config.from_profile("cpu", results_dir=str(tmp_path))
    table = chapter.claims_table(cfg, {"trajectories": traj, "accuracy": acc, "histories": hist})
    assert (tmp_path / "claims" / "cpu" / "06_lnpt.csv").exists()
    v = dict(zip(table["claim"], table["verdict"]))
    assert v["m: label-free LNPT beats supervised training"] == "held"
    distance = "The distance between initial and trained weights is inconsistent with generalization during training"
    gap = [c for c in v if c.startswith("The learning gap (the paper's")]
    aligned = [c for c in v if c.startswith("Our aligned learning gap")]
    # within each run and within each learning rate the distance tracks accuracy perfectly here
    assert v[f"{distance}: within each run"] == "did not hold"
    assert v[f"{distance}: pooled within learning rate 0.01"] == "did not hold"
    assert len(gap) == len(aligned) == 3  # within runs, and each of the two learning rates
    assert v[[c for c in gap if c.endswith("within each run")][0]] == "held"
    assert v[[c for c in aligned if c.endswith("within each run")][0]] == "held"
    rows = table.set_index("claim")
    assert "t interval" in rows.loc[f"{distance}: within each run", "rule"]
    assert "bootstrap over runs" in rows.loc[f"{distance}: pooled within learning rate 0.01", "rule"]
    assert "ours" in rows.loc[aligned[0], "source"] and rows.loc[gap[0], "n"] == 3
    assert "within-run" in chapter.plot_gap_trajectories(traj).axes[1].get_title()
    chapter.plot_lnpt_accuracy(acc, 0.97)
    assert chapter.accuracy_table(acc).shape[0] == 2
    cor = chapter.correlations(traj, n_boot=50)
    text = chapter.summary_text(cfg, acc, cor, table)
    assert text.startswith("This page was produced by the **cpu** profile") and "**Verdicts.**" in text


# --- units ---------------------------------------------------------------------------------------------------

def _tiny(results_dir, **kw):
    return chapter.Config.from_profile(
        "smoke", dataset="synthetic-mnist", teacher_epochs=0.5, epochs=0.5, trajectory_epochs=0.5,
        sparsities=(0.9,), trajectory_lrs=(1e-2,), trajectory_sparsities=(0.9,), probe_samples=50,
        results_dir=str(results_dir), **kw)


def test_work_units_list_the_stores_the_chapter_reads(tmp_path):
    smoke = chapter.Config.from_profile("smoke", results_dir=str(tmp_path))
    units = chapter.work_units(smoke)
    keys = [u.key for u in units]
    assert keys == [u.key for u in chapter.work_units(smoke)] and len(set(keys)) == len(keys) == 16
    assert [u.kind for u in units[:2]] == ["dense"] * 2  # the mature networks first (dense units): the others read them
    assert {u.kind for u in units[2:]} == {"lnpt/trajectories", "lnpt/accuracy"} and not any(u.done for u in units)
    assert units[0].key == chapter.teacher_store(smoke, smoke.teacher).key

    # every unit run on its own writes the Store run_experiment reads: it then loads all, trains nothing
    cfg = _tiny(tmp_path / "units")
    for u in chapter.work_units(cfg):
        u.run(cfg.results_dir)
    assert all(u.done for u in chapter.work_units(cfg))
    written = {p.name for p in (tmp_path / "units" / "dense").glob("[0-9a-f]*")}  # the mature networks
    written |= {p.name for p in (tmp_path / "units" / "lnpt").glob("*/[0-9a-f]*")}
    assert written == {u.key for u in chapter.work_units(cfg)}
    fresh = chapter.run_experiment(_tiny(tmp_path / "fresh"), progress=False)  # serial, through map_units

    def no_training(*a, **k):
        raise AssertionError("a finished unit was trained again")

    import pruning_lib.methods.lnpt as method
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chapter, "fit", no_training)
        mp.setattr(method, "fit", no_training)
        mp.setattr("pruning_lib.dense.fit", no_training)
        loaded = chapter.run_experiment(cfg, progress=False)
    for name in ("accuracy", "trajectories", "histories", "teacher", "feature_scaling"):
        untimed = [c for c in fresh[name].columns if "second" not in c]  # wall times differ between runs
        pd.testing.assert_frame_equal(loaded[name][untimed], fresh[name][untimed], check_exact=True)
