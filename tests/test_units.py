"""A chapter's units outside its notebook (`python -m pruning_lib.book units`, pruning_lib/units.py).

A unit run from the command line, alone or under torchrun (2 gloo processes), writes the very cached result
the notebook's own code path (`dep_l0.run_experiment`) writes and then reads; listing the units gives the
notebook's hashes, the same every time; a missing dataset is named before any process starts. Smoke-size:
LeNet-5-Caffe on the generated MNIST stand-in (chapter 3's smoke dataset), one Dep-L0 unit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pruning_lib import book, units
from pruning_lib.chapters import dep_l0
from pruning_lib.runs import Store

ROOT = Path(__file__).resolve().parents[1]
# one unit: Dep-L0 (forward) at one lambda, smoke profile (gate fine-tune included)
TINY = [("methods", "[dep_l0_forward]"), ("lambda_scales", "[1.0]"), ("epochs", "0.05")]


def _args(results, extra=()):
    out = ["units", "03_dep_l0", "--profile", "smoke"]
    for name, value in TINY + [("results_dir", str(results))]:
        out += ["-p", name, value]
    return out + list(extra)


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "pruning_lib.book", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def _tiny_cfg(results):
    return dep_l0.Config.from_profile("smoke", methods=("dep_l0_forward",), lambda_scales=(1.0,), epochs=0.05,
                                      results_dir=str(results))


def _unit_files(results):
    """{hash: (result.json without its wall time, history without its clock)} of every unit cached."""
    out = {}
    for m in Path(results, dep_l0.CHAPTER).glob("*/manifest.json"):
        d = m.parent
        result = json.loads((d / "result.json").read_text())
        result.pop("seconds")
        out[d.name] = (result, pd.read_csv(d / "history.csv").drop(columns="seconds"))
    return out


def _old_spec_hashes(cfg):
    """The hashes as dep_l0.run_experiment built them before the spec had a function of its own (frozen
    copy of that code): the refactor must not change any."""
    hashed = {k: v for k, v in cfg.to_dict(hashed_only=True).items()
              if k not in ("experiments", "methods", "lambda_scales", "seeds", "dense_baseline", "eval_per_epoch")}
    keys = []
    for model, dataset, method, lam, seed in dep_l0.units(cfg):
        spec = dict(hashed, model=model, dataset=dataset, method=method, lam=lam, seed=seed,
                    eval_per_epoch=cfg.eval_per_epoch, settings=cfg.settings(model))
        if method == "dense":
            spec = {k: v for k, v in spec.items() if k not in ("gate_lr", "init_log_alpha", "penalty")}
        keys.append(Store("unused", dep_l0.CHAPTER, spec).key)
    return keys


# the smoke profile's six units, as the notebook names them (computed by the frozen copy above; changed
# by issue 12's conv-only penalty and LeNet-5 base lambda, which change what a unit trains)
from test_dep_l0 import SMOKE_KEYS  # noqa: E402  (chapter 3's smoke units, pinned once)


@pytest.mark.parametrize("profile,budget", [("smoke", 1.0), ("cpu", 1.0), ("paper", 1.0), ("cpu", 2.0),
                                            ("paper", 2.0)])
def test_listed_units_carry_the_notebooks_hashes(tmp_path, profile, budget):
    cfg = dep_l0.Config.from_profile(profile, budget=budget, results_dir=str(tmp_path))
    listed = dep_l0.work_units(cfg)
    assert [u.key for u in listed] == _old_spec_hashes(cfg)
    assert [u.key for u in listed] == [dep_l0.unit_store(cfg, u).key for u in dep_l0.units(cfg)]
    assert not any(u.done for u in listed) and len({u.key for u in listed}) == len(listed)
    if (profile, budget) == ("smoke", 1.0):
        assert [u.key for u in listed] == SMOKE_KEYS


def test_listing_from_the_command_line_is_stable(tmp_path):
    first = book.main(["units", "03", "--profile", "smoke", "-p", "results_dir", str(tmp_path), "--list"])
    assert first == 0
    cfg = dep_l0.Config.from_profile("smoke", results_dir=str(tmp_path))
    _, again_cfg, listed = units.chapter_units("dep_l0", "smoke", [("results_dir", str(tmp_path))], ROOT)
    assert again_cfg == cfg and [u.key for u in listed] == SMOKE_KEYS
    assert all("lenet5_caffe on synthetic-mnist" in u.description for u in listed)


def test_parameters_are_checked_as_the_book_runner_checks_them(tmp_path, capsys, monkeypatch):
    for params in ([("seeds", "[-1]")], [("bogus", "1")], [("epochs", "nan")]):
        argv = ["--profile", "smoke"] + [x for n, v in params for x in ("-p", n, v)]
        with pytest.raises(book.BookError) as expected:
            book.plan(ROOT, "smoke", "03_dep_l0", [(n, book.parse_value(v)) for n, v in params],
                      include_verdicts=False)
        assert book.main(["units", "03", *argv, "--list"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {expected.value}"
    # every chapter lists its units now: take one out to see what an unregistered chapter is told
    monkeypatch.delitem(units.REGISTRY, "07_comparison")
    assert book.main(["units", "07", "--profile", "smoke"]) == 2  # not registered: says which are
    assert "03_dep_l0" in capsys.readouterr().err


def test_a_missing_dataset_is_named_before_any_process_starts(tmp_path, monkeypatch, capsys):
    def no(*a, **k):
        raise AssertionError("started something")

    monkeypatch.setattr(subprocess, "call", no)  # the torchrun launch of --nproc
    monkeypatch.setattr(units, "run_units", no)
    empty = tmp_path / "nodata"
    empty.mkdir()
    base = ["units", "03", "--profile", "paper", "-p", "data_root", str(empty), "-p", "results_dir",
            str(tmp_path / "results")]
    assert book.main(base + ["--missing", "--nproc", "2"]) == 2  # every dataset the units read
    err = capsys.readouterr().err
    for where in ("cifar-10-batches-py", "cifar-100-python", "imagenet/train"):
        assert str(empty / where) in err, where
    resnet50 = [u for u in dep_l0.work_units(dep_l0.Config.from_profile("paper", results_dir=str(tmp_path)))
                if "resnet50" in u.description][0]
    assert book.main(base + ["--run", resnet50.key, "--nproc", "2"]) == 2  # the one unit's dataset only
    err = capsys.readouterr().err
    assert str(empty / "imagenet" / "train") in err and "cifar" not in err
    argv = base + ["--missing"]
    # launched by torchrun itself (WORLD_SIZE set): each process says so and stops before training
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert book.main(argv) == 2
    assert "imagenet" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_unit_from_the_command_line_is_the_notebooks_unit(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    # the notebook's own code path
    nb = tmp_path / "notebook"
    out = dep_l0.run_experiment(_tiny_cfg(nb), progress=False)
    reference = _unit_files(nb)
    assert len(reference) == 1 and len(out["results"]) == 1
    (key, (result, history)), = reference.items()
    # the same unit from the command line, by hash
    cli = tmp_path / "cli"
    assert book.main(_args(cli, ["--list"])) == 0
    assert f"{key}  missing" in capsys.readouterr().out
    ran = _cli(_args(cli, ["--run", key[:8]]))
    assert ran.returncode == 0, ran.stderr + ran.stdout
    got = _unit_files(cli)
    assert list(got) == [key]
    assert got[key][0] == result  # the same numbers: CPU training is deterministic
    pd.testing.assert_frame_equal(got[key][1], history)
    prov = json.loads((cli / dep_l0.CHAPTER / key / "provenance.json").read_text())
    assert prov["device"] == "cpu" and prov["world_size"] == 1 and prov["precision"] == "fp32"
    assert book.main(_args(cli, ["--list"])) == 0
    assert f"{key}  done" in capsys.readouterr().out
    # the notebook reads it from the cache, training nothing
    monkeypatch.setattr(dep_l0, "fit", lambda *a, **k: pytest.fail("trained instead of reading the cache"))
    again = dep_l0.run_experiment(_tiny_cfg(cli), progress=False)
    pd.testing.assert_frame_equal(again["results"].drop(columns="seconds"),
                                  out["results"].drop(columns="seconds"))



def test_units_under_torchrun_are_the_notebooks_units(tmp_path, monkeypatch):
    # under torchrun, 2 gloo processes (--nproc starts torchrun after checking the request), every missing
    # unit: the dense baseline and the Dep-L0 unit, each one DDP run written once by rank 0
    torch.set_num_threads(1)
    nb = tmp_path / "notebook"
    with_dense = _tiny_cfg(nb).replace(dense_baseline=True)
    dep_l0.run_experiment(with_dense, progress=False)  # the notebook's dense baseline too
    reference = _unit_files(nb)
    ddp = tmp_path / "ddp"
    ran = _cli(_args(ddp, ["-p", "dense_baseline", "True", "--missing", "--nproc", "2"]))
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "torch.distributed.run" in ran.stderr and ran.stdout.count("training on 2 process(es)") == 2
    got = _unit_files(ddp)
    assert sorted(got) == sorted(reference) and len(list(ddp.rglob("manifest.json"))) == 2
    for k, (res, hist) in got.items():
        assert json.loads((ddp / dep_l0.CHAPTER / k / "provenance.json").read_text())["world_size"] == 2
        ref, ref_hist = reference[k]
        assert set(res) == set(ref) and list(hist.columns) == list(ref_hist.columns) and len(hist) == len(ref_hist)
        if res["method"] == "dense":  # no stochastic layer: the same numbers up to float rounding
            for name in ("test_accuracy", "final_val_accuracy", "flops_kept", "params_kept"):
                assert res[name] == pytest.approx(ref[name], abs=2e-3), name
            pd.testing.assert_series_equal(hist["train_loss"], ref_hist["train_loss"], rtol=1e-4)
        else:  # per-example gate noise is drawn per process (fit: seed + rank): the same in distribution
            assert res["architecture"].count("-") == ref["architecture"].count("-")
            assert res["flops_kept"] == pytest.approx(ref["flops_kept"], abs=0.15)
            assert hist["train_loss"].iloc[0] != hist["train_loss"].iloc[0]  # NaN: no step before step 0
            assert hist["val_accuracy"].iloc[0] == ref_hist["val_accuracy"].iloc[0]  # the same initial net
    monkeypatch.setattr(dep_l0, "fit", lambda *a, **k: pytest.fail("trained instead of reading the cache"))
    again = dep_l0.run_experiment(with_dense.replace(results_dir=str(ddp)), progress=False)
    assert sorted(again["results"]["method"]) == ["dense", "dep_l0_forward"]


def test_gpu_run_settings_change_nothing_on_cpu(tiny_data):
    from torch import nn

    from pruning_lib.train import RunSettings, fit, last_run, run_settings

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))

    a, b = net(), net()
    ha = fit(a, tiny_data, iterations=6, batch_size=30, seed=2, progress=False)
    with run_settings(precision="bf16", channels_last=True, workers=4):
        hb = fit(b, tiny_data, iterations=6, batch_size=30, seed=2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))
    assert last_run()["device"] == "cpu" and last_run()["precision"] == "fp32"
    assert last_run()["channels_last"]  # on CPU the default for a convolutional network anyway
    assert a[0].weight.is_contiguous(memory_format=torch.channels_last)
    c = net()
    with run_settings(channels_last=False):  # the other layout: the same numbers up to float rounding
        hc = fit(c, tiny_data, iterations=6, batch_size=30, seed=2, progress=False)
    assert not last_run()["channels_last"] and c[0].weight.is_contiguous()
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hc.drop(columns="seconds"), rtol=1e-4)
    with pytest.raises(ValueError):
        RunSettings(precision="fp16")


def test_chapter_1_dense_units_from_the_command_line(tmp_path, monkeypatch, capsys):
    from pruning_lib.chapters import dense_baselines as baselines

    cfg = baselines.Config.from_profile("smoke", models=("lenet300_100",), epochs=0.05,
                                        results_dir=str(tmp_path))
    listed = baselines.work_units(cfg)
    spec = baselines.dense_spec("lenet300_100", "mnist5k", 0, epochs=0.05, batch_size=60, lr=1.2e-3,
                                evals_per_epoch=2)
    assert [u.key for u in listed] == [Store(tmp_path, "dense", spec).key]
    argv = ["units", "01", "--profile", "smoke", "-p", "models", "[lenet300_100]", "-p", "epochs", "0.05",
            "-p", "results_dir", str(tmp_path)]
    torch.set_num_threads(1)
    assert book.main(argv + ["--missing"]) == 0
    assert book.main(argv + ["--list"]) == 0
    assert f"{listed[0].key}  done" in capsys.readouterr().out
    monkeypatch.setattr("pruning_lib.dense.fit", lambda *a, **k: pytest.fail("trained instead of reading the cache"))
    assert len(baselines.run_experiment(cfg, progress=False)["final"]) == 1


def test_a_stopped_unit_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A chapter-3 unit saves fit's checkpoint every epoch in its folder (a 90-epoch ResNet-50 unit must
    not start over): stopped in its second epoch, it resumes to the result of an uninterrupted run."""
    from pruning_lib.train import Callback

    torch.set_num_threads(1)
    cfg = dep_l0.Config.from_profile("smoke", methods=("l0_hc",), lambda_scales=(1.0,), epochs=2.0,
                                     results_dir=str(tmp_path / "whole"))
    unit = dep_l0.units(cfg)[0]
    whole = dep_l0.run_unit(cfg, unit)
    cfg = cfg.replace(results_dir=str(tmp_path / "stopped"))
    home = dep_l0.unit_store(cfg, unit).dir
    real_fit = dep_l0.fit

    class Stop(Callback):
        def after_step(self, state):
            if state.step == 6:  # 4 steps an epoch (420 stand-in images, batch 128): in the second
                raise KeyboardInterrupt

    monkeypatch.setattr(dep_l0, "fit", lambda *a, callbacks=(), **k: real_fit(*a, callbacks=[*callbacks, Stop()], **k))
    with pytest.raises(KeyboardInterrupt):
        dep_l0.run_unit(cfg, unit)
    assert (home / "checkpoint.pt").exists() and not (home / "manifest.json").exists()
    monkeypatch.undo()
    resumed = dep_l0.run_unit(cfg, unit)
    assert not (home / "checkpoint.pt").exists() and not (home / "checkpoint_finetune.pt").exists()
    a, b = whole.json("result"), resumed.json("result")
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0
    assert set(a) == set(b)
    for k in a:
        assert a[k] == (pytest.approx(b[k], rel=1e-6) if isinstance(a[k], float) else b[k]), k
    for name in ("history", "trace"):
        pd.testing.assert_frame_equal(whole.frame(name).drop(columns="seconds", errors="ignore"),
                                      resumed.frame(name).drop(columns="seconds", errors="ignore"), rtol=1e-6)


def test_the_torchrun_command_spells_run_as_unit():
    """torchrun's own parser calls ``--run`` an ambiguous abbreviation of its ``--run-path`` (even after the
    module name), so the processes it starts are given ``--unit``, the same option; ``--nproc`` is dropped."""
    argv = ["03", "--profile", "smoke", "--run", "ab12", "--nproc", "2", "--bf16"]
    assert units._without_nproc(argv) == ["03", "--profile", "smoke", "--unit", "ab12", "--bf16"]
    assert units._without_nproc(["03", "--run=ab12", "--nproc=2"]) == ["03", "--unit=ab12"]
    import argparse

    ap = argparse.ArgumentParser()
    units.add_arguments(ap)
    assert ap.parse_args(["03", "--unit", "ab12"]).run == ap.parse_args(["03", "--run", "ab12"]).run == "ab12"
