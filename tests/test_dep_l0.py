"""Chapter 03's experiment: config profiles, one tiny end-to-end run with caching, claims and plots."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from pruning_lib import claims
from pruning_lib import dep_l0
from pruning_lib.data import DatasetNotFoundError
from pruning_lib.runs import ConfigError

matplotlib.use("Agg")


def test_profiles_build_and_reject_bad_values():
    for profile in ("smoke", "cpu", "paper"):
        cfg = dep_l0.Config.from_profile(profile)
        assert dep_l0.units(cfg)
    paper = dep_l0.Config.from_profile("paper")
    assert paper.settings("resnet50")["epochs"] == 90 and paper.settings("resnet50")["finetune_epochs"] == 10
    assert paper.settings("vgg16_bn")["lr"] == 0.05 and paper.settings("resnet56")["lr"] == 0.1
    with pytest.raises(ConfigError):
        dep_l0.Config.from_profile("cpu", methods=("l0_hc", "magic"))
    with pytest.raises(ConfigError):
        dep_l0.Config.from_namespace({"profile": "cpu", "lambdas": 3})


def test_paper_profile_fails_with_the_missing_dataset_error(tmp_path):
    cfg = dep_l0.Config.from_profile("paper", data_root=str(tmp_path), results_dir=str(tmp_path / "r"))
    with pytest.raises(DatasetNotFoundError):
        dep_l0.run_experiment(cfg, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dep")
    cfg = dep_l0.Config.from_profile(
        "smoke", experiments=("lenet5_caffe/synthetic-mnist",), lambda_scales=(50.0,), seeds=(0, 1),
        methods=("l0_hc", "dep_l0_backward"), epochs=0.5, finetune_epochs=0.25, results_dir=str(root),
        dense_baseline=True)
    return cfg, dep_l0.run_experiment(cfg, progress=False)


def test_run_experiment_measures_compacted_networks_and_is_cached(tiny_run):
    cfg, out = tiny_run
    res = out["results"]
    assert len(res) == len(dep_l0.units(cfg)) == 1 + 2 * 2
    gated = res[res.method != "dense"]
    # The compacted network computes what the gated one does.
    assert np.allclose(gated["test_accuracy"], gated["gated_test_accuracy"])
    assert (gated["flops_kept"] <= 1).all() and (gated["params_kept"] <= 1).all()
    assert {"expected_flops_kept", "expected_l0_kept", "phase"} <= set(out["history"].columns)
    assert set(out["history"]["phase"]) == {"train", "finetune"}
    assert len(out["trace"]) and out["trace"]["expected_flops_kept"].between(0, 1).all()
    assert len(out["gates"]) == 2 * 2 * (20 + 50 + 500)
    # A rerun loads every unit from the store instead of training.
    again = dep_l0.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again["results"], res)


def test_claims_and_plots_from_a_run(tiny_run):
    cfg, out = tiny_run
    table = dep_l0.claims_table(cfg, out)
    assert len(table) == 5 and set(table["verdict"]) <= set(claims.VERDICTS)
    assert table.iloc[-1]["verdict"] == "not measured"  # no ResNet-50 here
    assert table.iloc[0]["verdict"] == "not measured"  # no forward Dep-L0 in this run
    assert table.iloc[2]["verdict"] != "not measured"
    for fig in (dep_l0.plot_tradeoff(out["results"]), dep_l0.plot_architecture(out["architecture"]),
                dep_l0.plot_training(out["trace"]), dep_l0.plot_gate_histograms(out["gates"])):
        assert fig.axes
    matplotlib.pyplot.close("all")


def test_matched_accuracy_interpolates_inside_the_other_methods_range():
    res = pd.DataFrame({
        "model": "m", "seed": 0, "method": ["l0_hc"] * 2 + ["dep_l0_forward"] * 2,
        "flops_kept": [0.2, 0.6, 0.3, 0.9], "test_accuracy": [0.90, 0.94, 0.95, 0.97]})
    m = dep_l0.matched_accuracy(res, "dep_l0_forward")
    # HC at 0.6 vs Dep interpolated at 0.6 (0.96); Dep at 0.3 vs HC interpolated at 0.3 (0.91).
    assert sorted(zip(m["method_acc"].round(4), m["baseline_acc"].round(4))) == [(0.95, 0.91), (0.96, 0.94)]


def test_architecture_disagreement_is_zero_for_identical_seeds():
    a = pd.DataFrame({"model": "m", "method": "x", "lam": 1.0, "group": ["a", "b"] * 2, "seed": [0, 0, 1, 1],
                      "channels": 10, "kept": [5, 4, 5, 4]})
    assert dep_l0.architecture_disagreement(a)["disagreement"].iloc[0] == 0
    a.loc[3, "kept"] = 8
    assert dep_l0.architecture_disagreement(a)["disagreement"].iloc[0] > 0
