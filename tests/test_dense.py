"""The one dense unit (pruning_lib.dense): open_lth-style hashing, one Store for one network, migration."""
import pandas as pd
import pytest
import torch

from pruning_lib import dense
from pruning_lib.data import load_dataset
from pruning_lib.runs import Store, digest


def _units(folder):
    return [p for p in folder.iterdir() if not p.name.startswith(".")]  # not the lock files


def _no_fit(*a, **k):
    raise AssertionError("fit was called: the dense network trained again")


def test_defaults_are_left_out_of_the_hash_and_chapter_1s_spec_keeps_its_hash():
    spec = dense.DenseSpec("lenet300_100", "mnist5k", 0, batch_size=60, lr=1.2e-3, epochs=20.0, evals_per_epoch=2)
    old = dict(model="lenet300_100", dataset="mnist5k", seed=0, epochs=20.0, batch_size=60, lr=1.2e-3,
               evals_per_epoch=2, optimizer="adam")  # chapter 1's spec before the dense unit
    assert spec.to_dict() == old and digest(spec.to_dict()) == digest(old)
    assert digest(old) == "27e8b3376484070c"  # the cpu book's lenet300_100, seed 0 (results/dense/)
    wide = dense.DenseSpec("lenet300_100", "mnist5k", 0, batch_size=60, lr=1.2e-3, epochs=20.0, evals_per_epoch=2,
                           width=2.0)
    assert wide.to_dict() == {**old, "width": 2.0}
    with pytest.raises(ValueError):
        dense.DenseSpec("lenet300_100", "mnist5k", 0, batch_size=60, lr=1e-3)  # no length


def test_two_chapters_asking_for_the_same_network_share_one_store(tmp_path, monkeypatch):
    from pruning_lib.chapters import comparison, dense_baselines

    data = load_dataset("synthetic-mnist", n=200)
    m1, h1 = dense_baselines.train_dense("lenet300_100", "synthetic-mnist", 0, epochs=0.5, batch_size=60,
                                         lr=1.2e-3, evals_per_epoch=2, results_dir=tmp_path, progress=False,
                                         data=data)
    cfg = comparison.Config.from_profile("smoke", experiments=("lenet300_100/synthetic-mnist",), batch_size=60,
                                         lr=1.2e-3, evals_per_epoch=2, results_dir=str(tmp_path))
    st = comparison.task_store(cfg, (cfg, "dense", 0.5, 0))
    assert _units(tmp_path / "dense") == [st.dir]  # one Store: chapter 1 trained it
    monkeypatch.setattr(dense, "fit", _no_fit)
    m2, h2 = comparison.dense(cfg, data, 0, 0.5)
    assert h2["test_accuracy"].tolist() == pytest.approx(h1["test_accuracy"].tolist())
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert _units(tmp_path / "dense") == [st.dir]


def test_an_old_store_is_adopted_bit_for_bit_without_training(tmp_path, monkeypatch):
    data = load_dataset("synthetic-mnist", n=200)
    spec = dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, batch_size=50, lr=1e-3, epochs=1, evals_per_epoch=1)
    model, history = dense.train(spec, results_dir=tmp_path / "fresh", data=data, progress=False)
    # the same network as an older chapter cached it: one file of its own, under its own kind
    old_spec = {"teacher": "lenet300_100", "epochs": 1, "seed": 0}
    old = Store(tmp_path / "res", "old/teacher", old_spec)
    old.save_torch("teacher", {"state": model.state_dict(), "history": history.to_dict("list")})
    old_files = {p.name: p.read_bytes() for p in old.dir.iterdir()}

    def convert(st):
        saved = st.torch("teacher")
        return saved["state"], pd.DataFrame(saved["history"])

    legacy = dense.Legacy("old/teacher", old_spec, ("teacher.pt",), convert)
    monkeypatch.setattr(dense, "fit", _no_fit)
    m2, h2 = dense.train(spec, results_dir=tmp_path / "res", data=data, progress=False, legacy=legacy)
    new = Store(tmp_path / "res", "dense", spec.to_dict())
    assert dense.done(new) and new.json("legacy")["key"] == old.key
    assert h2.equals(history)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    # the adopted files hold what a fresh training writes (history.csv byte for byte; a .pt archive also holds
    # the name of the temporary file it was written to); the old unit is kept as it was
    fresh = Store(tmp_path / "fresh", "dense", spec.to_dict())
    assert new.path("history.csv").read_bytes() == fresh.path("history.csv").read_bytes()
    a, b = new.torch("model"), fresh.torch("model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {p.name: p.read_bytes() for p in old.dir.iterdir()} == old_files
    # adopted once: a later call finds the dense Store (the old one is not read again)
    assert dense.store(spec, tmp_path / "res", dense.Legacy("old/teacher", old_spec, ("teacher.pt",), _no_fit)).key \
        == new.key


def test_no_old_store_trains(tmp_path):
    data = load_dataset("synthetic-mnist", n=200)
    spec = dense.DenseSpec("lenet300_100", "synthetic-mnist", 1, batch_size=50, lr=1e-3, iterations=3)
    legacy = dense.Legacy("old/teacher", {"x": 1}, ("teacher.pt",), _no_fit)
    _, h = dense.train(spec, results_dir=tmp_path, data=data, progress=False, legacy=legacy)
    assert int(h["step"].iloc[-1]) == 3 and not (tmp_path / "dense" / Store(tmp_path, "dense", spec.to_dict()).key
                                                 / "legacy.json").exists()


def test_a_learning_rate_schedule_is_part_of_the_spec_and_of_the_training(tmp_path):
    base = dict(batch_size=50, lr=1e-2, epochs=2)
    flat = dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, **base)
    cos = dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, **base, lr_schedule="cosine")
    assert "lr_schedule" not in flat.to_dict() and cos.to_dict() == {**flat.to_dict(), "lr_schedule": "cosine"}
    with pytest.raises(ValueError, match="lr_schedule"):
        dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, **base, lr_schedule="step")
    with pytest.raises(ValueError, match="per epoch"):
        dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, batch_size=50, lr=1e-2, iterations=4,
                        lr_schedule="cosine")
    data = load_dataset("synthetic-mnist", n=200)
    m1, _ = dense.train(flat, results_dir=tmp_path, data=data, progress=False)
    m2, _ = dense.train(cos, results_dir=tmp_path, data=data, progress=False)
    # the same first epoch (the cosine factor is 1 at epoch 0), then a smaller step: other weights
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_chapter_5s_old_dense_store_is_adopted_with_a_one_row_history(tmp_path, monkeypatch):
    from pruning_lib.chapters import polarization as ch5

    cfg = ch5.Config.from_profile("smoke", models=("lenet5_caffe",), results_dir=str(tmp_path))
    data = load_dataset("synthetic-mnist")
    spec = ch5.dense_spec(cfg, "lenet5_caffe", "synthetic-mnist", 0)
    model, history = dense.train(spec, results_dir=tmp_path / "fresh", data=data, progress=False)
    # the network as chapter 5 cached it before the dense unit: model.pt and metrics.json
    old = Store(tmp_path, "polarization/dense", ch5._train_spec(cfg, "lenet5_caffe", "synthetic-mnist", 0))
    old.save_torch("model", model.state_dict())
    acc = float(history["test_accuracy"].iloc[-1])
    old.json("metrics", lambda: {"test_accuracy": acc, "train_seconds": 1.5, "connections": 1, "flops": 2})
    monkeypatch.setattr(dense, "fit", _no_fit)
    ch5._RESULTS_ROOT[0] = str(tmp_path)
    row = ch5._dense_unit(cfg, "lenet5_caffe", "synthetic-mnist", 0)
    st = dense.store(spec, tmp_path)
    assert dense.done(st) and st.json("legacy")["key"] == old.key and "no history" in st.json("legacy")["note"]
    assert row["test_accuracy"] == acc and row["train_seconds"] == 1.5
    a, b = st.torch("model"), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)


def test_snapshots_keep_the_initial_and_rewind_weights_and_a_stop_before_them_is_refused(tmp_path):
    data = load_dataset("synthetic-mnist", n=200)
    spec = dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, batch_size=50, lr=1e-3, iterations=6,
                           init="glorot", eval_every=2, snapshots=(0, 3))
    assert spec.files() == ("model.pt", "history.csv", "weights_at_0.pt", "weights_at_3.pt")
    model, _ = dense.train(spec, results_dir=tmp_path, data=data, progress=False)
    st = dense.store(spec, tmp_path)
    w0, w3 = st.torch("weights_at_0"), st.torch("weights_at_3")
    torch.manual_seed(0)
    from pruning_lib.models import build_model, glorot_init
    fresh = glorot_init(build_model("lenet300_100", **data.model_kwargs()))
    assert all(torch.equal(w0[n], p) for n, p in fresh.named_parameters())
    assert not torch.equal(w3["head.0.weight"], w0["head.0.weight"])
    assert not torch.equal(w3["head.0.weight"], model.state_dict()["head.0.weight"])
    # an early stop before a snapshot step: no unit is finished, and the error says what to change
    late = dense.DenseSpec("lenet300_100", "synthetic-mnist", 0, batch_size=50, lr=1e-3, iterations=6,
                           eval_every=1, patience=0, snapshots=(5,))
    with pytest.raises(ValueError, match="before the snapshot step"):
        dense.train(late, results_dir=tmp_path, data=data, progress=False)
    assert not dense.done(dense.store(late, tmp_path))


def test_chapter_2s_old_round_0_is_adopted_with_its_initial_and_rewind_weights(tmp_path, monkeypatch):
    from pruning_lib.chapters import lottery_tickets as L

    data = load_dataset("synthetic-mnist", n=300)
    cfg = L.Config.from_profile("smoke", setups=("lenet300_100/synthetic-mnist",), results_dir=str(tmp_path),
                                rewind_iteration=2)
    unit = L.Unit(cfg, cfg.setups[0], data)
    fresh = L.dense_round(L.Unit(cfg.replace(results_dir=str(tmp_path / "fresh")), cfg.setups[0], data), 0)
    Store(tmp_path, "lottery/dense", unit.dense_spec(0)).save_torch("dense", fresh)  # as the old code cached it
    monkeypatch.setattr(dense, "fit", _no_fit)
    got = L.dense_round(unit, 0)
    for k in ("init", "rewind", "final"):
        assert got[k].keys() == fresh[k].keys() and all(torch.equal(got[k][n], fresh[k][n]) for n in got[k]), k
    assert got["history"].equals(fresh["history"])
    assert L.dense_store(unit, 0).json("legacy")["kind"] == "lottery/dense"
