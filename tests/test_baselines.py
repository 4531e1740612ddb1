import pandas as pd
import pytest

from pruning_lib.chapters import dense_baselines
from pruning_lib.data import DatasetNotFoundError, load_dataset
from pruning_lib.runs import ConfigError


def test_train_dense_caches_and_reloads_the_same_model(tmp_path):
    data = load_dataset("synthetic-mnist", n=200)
    m1, h1 = dense_baselines.train_dense("lenet300_100", "synthetic-mnist", 0, epochs=1, results_dir=tmp_path,
                                         progress=False, data=data)
    m2, h2 = dense_baselines.train_dense("lenet300_100", "synthetic-mnist", 0, epochs=1, results_dir=tmp_path,
                                         progress=False, data=data)
    assert h1["test_accuracy"].tolist() == pytest.approx(h2["test_accuracy"].tolist())
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert (a == b).all(), k
    assert not list(tmp_path.rglob("checkpoint.pt"))  # the resume checkpoint is dropped once done


def test_experiment_and_tables_on_a_stand_in(tmp_path):
    cfg = dense_baselines.Config.from_profile("smoke", dataset="synthetic-mnist", models=["lenet300_100"],
                                              results_dir=str(tmp_path))
    res = dense_baselines.run_experiment(cfg, progress=False)
    assert set(res) == {"curves", "final", "size"} and len(res["final"]) == 1
    assert res["size"]["params"].iloc[0] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    table = dense_baselines.claims_table(cfg, res)
    assert table["verdict"].tolist() == ["not measured"]  # published numbers are judged on full MNIST only
    assert (tmp_path / "claims" / "smoke" / f"{dense_baselines.CHAPTER}.csv").exists()


def test_config_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="models"):
        dense_baselines.Config.from_profile("cpu", models=["lenet7"])
    with pytest.raises(ConfigError, match="epochs"):
        dense_baselines.Config.from_profile("cpu", epochs=-1)


def test_paper_profile_needs_full_mnist(tmp_path):
    cfg = dense_baselines.Config.from_profile("paper", data_root=str(tmp_path))
    assert cfg.dataset == "mnist"
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        dense_baselines.run_experiment(cfg, progress=False)


def _flat_curves(models, seeds, rising=False):
    return pd.DataFrame([{"model": m, "seed": s, "step": t, "test_accuracy": 0.9 + (0.002 * t if rising else 0.0)}
                         for m in models for s in seeds for t in range(0, 100, 10)])


@pytest.mark.parametrize("conv_error, verdict", [(0.02, "held"), (0.08, "did not hold")])
def test_the_ranking_claim_is_judged_on_any_dataset(tmp_path, conv_error, verdict):
    cfg = dense_baselines.Config.from_profile("cpu", results_dir=str(tmp_path))  # mnist5k, both LeNets
    final = pd.DataFrame([{"model": m, "seed": s, "test_error": e + 0.001 * s}
                          for s in range(3) for m, e in (("lenet300_100", 0.05), ("lenet5_caffe", conv_error))])
    curves = _flat_curves(["lenet300_100", "lenet5_caffe"], range(3))
    table = dense_baselines.claims_table(cfg, {"final": final, "curves": curves}).set_index("claim")["verdict"]
    assert table["LeNet-5-Caffe has a lower dense test error than LeNet-300-100"] == verdict
    assert (table.drop("LeNet-5-Caffe has a lower dense test error than LeNet-300-100")
            == "not measured").all()  # the published values themselves: full MNIST only


def test_a_run_that_has_not_settled_decides_nothing(tmp_path):
    cfg = dense_baselines.Config.from_profile("cpu", results_dir=str(tmp_path))
    final = pd.DataFrame([{"model": m, "seed": s, "test_error": e + 0.001 * s}
                          for s in range(3) for m, e in (("lenet300_100", 0.05), ("lenet5_caffe", 0.02))])
    curves = _flat_curves(["lenet300_100", "lenet5_caffe"], range(3), rising=True)
    table = dense_baselines.claims_table(cfg, {"final": final, "curves": curves}).set_index("claim")
    row = table.loc["LeNet-5-Caffe has a lower dense test error than LeNet-300-100"]
    assert row["verdict"] == "inconclusive" and row["why"].startswith("not settled")


# the smoke profile's unit hashes (`python -m pruning_lib.book units 01 --profile smoke --list`), as they
# were before the chapter moved to pruning_lib.chapters: the results cache must keep finding them
SMOKE_KEYS = ["2b87864267e417d7", "04e024e23fccb8f8"]


def test_the_command_line_lists_the_notebooks_units_under_stable_hashes(tmp_path):
    from pruning_lib.runs import Store

    cfg = dense_baselines.Config.from_profile("smoke", results_dir=str(tmp_path))
    kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, evals_per_epoch=cfg.evals_per_epoch)
    run_keys = [Store(tmp_path, "dense", dense_baselines.dense_spec(m, cfg.dataset, s, **kw)).key
                for m in cfg.models for s in cfg.seeds]
    listed = dense_baselines.work_units(cfg)
    assert [u.key for u in listed] == run_keys == SMOKE_KEYS
    assert not any(u.done for u in listed) and {u.kind for u in listed} == {"dense"}


def test_a_unit_run_from_the_command_line_is_the_notebooks_cached_unit(tmp_path, monkeypatch):
    cfg = dense_baselines.Config.from_profile("smoke", dataset="synthetic-mnist", models=("lenet300_100",),
                                              epochs=0.05, results_dir=str(tmp_path))
    [unit] = dense_baselines.work_units(cfg)
    unit.run(str(tmp_path))
    assert dense_baselines.work_units(cfg)[0].done
    monkeypatch.setattr("pruning_lib.dense.fit", lambda *a, **k: pytest.fail("trained instead of reading the cache"))
    assert len(dense_baselines.run_experiment(cfg, progress=False)["final"]) == 1


def test_the_discussion_reports_each_models_error(tmp_path):
    cfg = dense_baselines.Config.from_profile("smoke", dataset="synthetic-mnist", models=["lenet300_100"],
                                              results_dir=str(tmp_path))
    res = dense_baselines.run_experiment(cfg, progress=False)
    text = dense_baselines.discussion(cfg, res, dense_baselines.claims_table(cfg, res))
    err = 100 * res["final"]["test_error"].iloc[0]
    assert text.splitlines()[0] == "This page was produced by the **smoke** profile on **synthetic-mnist**."
    assert f"- lenet300_100: test error {err:.2f} % (s.d. 0.00, 1 seeds)." in text
    assert "not judged here" in text and "Their ranking" not in text  # one model: no ranking claim
