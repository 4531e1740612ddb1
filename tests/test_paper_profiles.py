"""Every chapter's `paper` profile, end to end on CPU, against generated stand-ins of the paper datasets.

A GPU user runs a chapter with ``profile="paper"`` from the repository root, with the full datasets in
``data/`` (README.md, "Datasets for the `paper` profile"). These tests take that same path: the working
directory is a temporary folder whose ``data/`` holds tiny generated stand-ins (random pixels, a handful of
images, not the real datasets) in exactly the documented layouts, and each chapter runs its paper
profile's model(s) on its paper dataset(s), read from ``data/`` by the chapter's own loader. Only the
sizes are cut (one seed, one setting, a few iterations), so that each test takes seconds; the numbers
mean nothing, but every code path the paper profile takes (the loaders, the paper models at full width,
the caches, the claims ledger) runs.

The loaders hold out ``val_size`` training images for validation (5000 for CIFAR and MNIST, 10000 for the
ImageNets), more than a stand-in has, and no chapter config sets it: each stand-in's loader is wrapped
(``DATASETS[name] = partial(loader, val_size=...)``) for the test.
"""
from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pruning_lib import claims as claims_mod
from pruning_lib import data as data_mod
from test_data_layouts import write_cifar10, write_image_folder, write_mnist


def write_cifar100(root, n_train=10, n_test=4):
    """The python version of CIFAR-100: ``train``, ``test`` and ``meta`` pickles in cifar-100-python/."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 100).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                         "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)


def _batches_with(workers, batches, *args, num_workers=None, **kwargs):
    """``batches`` with ``workers`` loader processes unless the caller chose a number."""
    return batches(*args, num_workers=workers if num_workers is None else num_workers, **kwargs)


class PaperData:
    """Writes stand-ins under ``<tmp>/data`` (the working directory is ``<tmp>``) and shrinks the
    loaders' validation hold-out to fit them."""

    def __init__(self, tmp_path, monkeypatch):
        self.root = tmp_path / "data"
        self.root.mkdir()
        self.results = str(tmp_path / "results")
        self._mp = monkeypatch
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("PRUNING_DATA", raising=False)  # it would stand in for this data/
        # torchvision checks the official CIFAR files' checksums; the stand-ins have other bytes
        monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
        # on-disk datasets are batched by a DataLoader with one loader process per core; starting them for
        # each of a run's many tiny evaluations costs more than the evaluations (half of a test's time), so
        # batch in the test's process (tests/test_data_layouts.py batches the same stand-ins with loader
        # processes, and one test here runs a chapter with one, see `with_loader_processes`)
        from pruning_lib.chapters import polarization  # imported `batches` by name

        self._modules = (data_mod, polarization)
        self._batches = data_mod.batches
        self._loader_processes(0)

    def _loader_processes(self, workers: int):
        for module in self._modules:
            self._mp.setattr(module, "batches", functools.partial(_batches_with, workers, self._batches))

    def with_loader_processes(self):
        """Batch on-disk datasets through a loader process, as a chapter run does (there, one per core)."""
        self._loader_processes(1)

    def _val_size(self, name, val_size):
        self._mp.setitem(data_mod.DATASETS, name, functools.partial(data_mod.DATASETS[name], val_size=val_size))

    def mnist(self, n_train=140, n_test=20, val_size=20):
        write_mnist(self.root, n_train=n_train, n_test=n_test, compress=True)
        self._val_size("mnist", val_size)

    def cifar10(self, per_batch=2, n_test=4, val_size=2):
        write_cifar10(self.root, per_batch=per_batch, n_test=n_test)
        self._val_size("cifar10", val_size)

    def cifar100(self, n_train=10, n_test=4, val_size=2):
        write_cifar100(self.root, n_train=n_train, n_test=n_test)
        self._val_size("cifar100", val_size)

    def tiny_imagenet(self, per_class=4, n_test=1, val_size=2):
        wnids = ["n01443537", "n01629819"]
        write_image_folder(self.root / "tiny-imagenet-200" / "train", wnids, per_class=per_class, size=64,
                           nested_images=True)
        write_image_folder(self.root / "tiny-imagenet-200" / "val", wnids, per_class=n_test, size=64)
        self._val_size("tiny-imagenet", val_size)


@pytest.fixture
def paper_data(tmp_path, monkeypatch):
    return PaperData(tmp_path, monkeypatch)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the 2-core machine, shared with other jobs, two threads of these small
    batches wait on each other (several times slower); the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_training(*args, **kwargs):
    raise AssertionError("a rerun trained again instead of loading the cached results")


def _accuracies(values) -> None:
    v = np.asarray(values, dtype=float)
    assert len(v) and np.isfinite(v).all() and ((v >= 0) & (v <= 1)).all(), v


def _ledger(table: pd.DataFrame, chapter: str, results: str) -> None:
    """The claims table came out of the ledger for the paper profile, was saved, and judged some claims."""
    assert len(table) and set(table["verdict"]) <= set(claims_mod.VERDICTS)
    assert (table["profile"] == "paper").all() and (table["chapter"] == chapter).all()
    assert (table["verdict"] != claims_mod.NOT_MEASURED).any()
    saved = claims_mod.gather(results, profile="paper")
    assert (saved["chapter"] == chapter).any()


def _datasets_recorded(results: str) -> set[str]:
    """Every ``dataset`` named in the specs of the cached units (nested ones too); no unit was computed on a
    synthetic stand-in."""
    found: set[str] = set()

    def walk(spec):
        if isinstance(spec, dict):
            for k, v in spec.items():
                if k == "dataset":
                    found.add(v)
                walk(v)
    specs = list(Path(results).rglob("spec.json"))
    assert specs
    for p in specs:
        assert "synthetic" not in p.read_text(), p
        walk(json.loads(p.read_text()))
    return found


# --- chapter 1: dense baselines (LeNet-300-100 and LeNet-5-Caffe on full MNIST) --------------------------

def test_ch1_dense_baselines_paper_profile(paper_data, monkeypatch):
    from pruning_lib.chapters import dense_baselines as baselines

    paper_data.mnist()
    cfg = baselines.Config.from_profile("paper", seeds=(0,), epochs=1, results_dir=paper_data.results)
    assert cfg.dataset == "mnist" and cfg.data_root == "data"
    out = baselines.run_experiment(cfg, progress=False)
    final = out["final"]
    assert sorted(final["model"]) == ["lenet300_100", "lenet5_caffe"]
    _accuracies(1 - final["test_error"])
    _accuracies(out["curves"]["test_accuracy"])
    assert (out["size"]["params"] > 0).all()
    table = baselines.claims_table(cfg, out)
    _ledger(table, baselines.CHAPTER, cfg.results_dir)
    # on full MNIST the published values themselves are judged (on MNIST-5k they are "not measured")
    assert (table["verdict"] != claims_mod.NOT_MEASURED).all()
    assert "our test error (mnist, 1 seeds)" in baselines.comparison_table(cfg, out).columns
    assert _datasets_recorded(cfg.results_dir) == {"mnist"}
    # a rerun loads every network from the cache
    monkeypatch.setattr("pruning_lib.dense.fit", _no_training)
    again = baselines.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again["final"], final)


# --- chapter 2: lottery tickets (LeNet-300-100 on MNIST, Conv-2/4/6 on CIFAR-10) -------------------------

# LeNet-300-100 on MNIST (the first setup: the claims are measured on it) and Conv-6 on CIFAR-10, the
# deepest of Conv-2/4/6, which share one code path (they differ in depth, learning rate and conv rate);
# each CIFAR setup costs seconds here, so Conv-2 and Conv-4 are left out.
@pytest.mark.parametrize("setup", ["lenet300_100/mnist", "conv6/cifar10"])
def test_ch2_lottery_paper_profile(paper_data, monkeypatch, setup):
    from pruning_lib.chapters import lottery_tickets as lottery

    getattr(paper_data, setup.split("/")[1])()
    assert setup in lottery.Config.from_profile("paper").setups
    # one criterion with its data-dependent variant, the re-init control and one-shot SNIP, one round
    cfg = lottery.Config.from_profile("paper", setups=(setup,), seeds=(0,), rounds=1, iterations=2,
                                      batch_size=4, grad_batch_size=4, criteria=("magnitude", "magnitude_grad"),
                                      reinit_criteria=("magnitude",), snip_densities=(0.05,),
                                      results_dir=paper_data.results)
    res = lottery.run_experiment(cfg, progress=False)
    r = res.rounds
    assert set(r["setup"]) == {setup} and set(r["round"]) == {0, 1}
    assert set(r["control"]) == {"ticket", "reinit"}
    _accuracies(r["test_accuracy_early_stop"])
    _accuracies(r["test_accuracy_end"])
    assert set(res.snip["setup"]) == {setup}
    _accuracies(res.snip["test_accuracy_early_stop"])
    # one round prunes each layer by the setup's paper rate (Conv-6's convs: 15 %)
    layers = res.layers[res.layers["round"] == 1]
    assert len(layers) and (layers["layer"].str.startswith("features").any() == setup.startswith("conv"))
    for _, row in layers.iterrows():
        kind = ("rate_output" if row["layer"].startswith("classifier") else
                "rate_conv" if row["layer"].startswith("features") else "rate_hidden")
        assert row["density"] == pytest.approx(1 - lottery.SETUPS[row["setup"]][kind], abs=0.01), row["layer"]
    table = lottery.claims_table(cfg, res)
    _ledger(table, lottery.CHAPTER, cfg.results_dir)
    assert setup.replace("/", " on ") in " ".join(table["measure"])
    assert _datasets_recorded(cfg.results_dir) == {setup.split("/")[1]}
    monkeypatch.setattr(lottery, "fit", _no_training)
    again = lottery.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again.rounds, r)


# --- chapter 3: Dep-L0 (VGG-16 and ResNet-56 on CIFAR-10/100, ResNet-50 on ImageNet) ---------------------

# VGG-16 on CIFAR-10 and ResNet-56 on CIFAR-100 (the pairs that swap datasets share the code). Not
# ResNet-50 on ImageNet: the paper profile fixes its schedule at 90 + at least 10 fine-tune epochs
# (`Config.settings`), so even one image per step is 11 steps, each followed by an evaluation, and one
# training step of ResNet-50 at 224 x 224 takes about a second here per image: some 15 s for each of the
# four units. The ImageNet layout itself is read in tests/test_data_layouts.py.

@pytest.mark.parametrize("experiment", ["vgg16_bn/cifar10", "resnet56/cifar100"])
def test_ch3_dep_l0_paper_profile(paper_data, monkeypatch, experiment):
    from pruning_lib.chapters import dep_l0

    model, dataset = experiment.split("/")
    getattr(paper_data, dataset)()
    if dataset == "cifar100":
        paper_data.with_loader_processes()  # one paper run batched as a GPU run is, by loader processes
    # every method and the dense baseline at one lambda, one step of batch 4 (8 training images)
    cfg = dep_l0.Config.from_profile("paper", experiments=(experiment,), lambda_scales=(1.0,), epochs=0.5,
                                     batch_size=4, results_dir=paper_data.results)
    out = dep_l0.run_experiment(cfg, progress=False)
    res = out["results"]
    assert set(res["method"]) == {"dense", *dep_l0.METHODS}
    assert set(res["model"]) == {model} and set(res["dataset"]) == {dataset}
    _accuracies(res["test_accuracy"])
    _accuracies(res["gated_test_accuracy"])
    assert ((res["flops_kept"] > 0) & (res["flops_kept"] <= 1 + 1e-9)).all()
    gated = res[res.method != "dense"]
    assert gated["architecture"].str.match(r"^\d+(-\d+)+$").all()
    assert set(out["architecture"]["model"]) == {model}
    assert _datasets_recorded(cfg.results_dir) == {dataset}
    # One λ gives each method one point, no FLOPs range: chapter 3's claims (accuracy at matched FLOPs; FLOPs
    # at the same λ on ResNet-50 only) may all be "not measured" here, but the ledger is still written.
    table = dep_l0.claims_table(cfg, out)
    assert len(table) == 3 and set(table["verdict"]) <= set(claims_mod.VERDICTS)
    assert (table["profile"] == "paper").all()
    assert (claims_mod.gather(cfg.results_dir, profile="paper")["chapter"] == dep_l0.CHAPTER).any()
    monkeypatch.setattr(dep_l0, "fit", _no_training)
    again = dep_l0.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again["results"], res)


# --- chapter 4: Bernoulli gates (LeNets on MNIST, VGG-16 on CIFAR-10) ------------------------------------

# Two tests, as one step of VGG-16's gate estimator costs seconds on CPU (it re-runs the layers after each
# gated layer once per flipped unit: 13 layers of up to 512 units).
@pytest.mark.parametrize("models", [("lenet300_100", "lenet5_caffe"), ("vgg16_bn",)], ids=["lenets-mnist",
                                                                                         "vgg16_bn-cifar10"])
def test_ch4_bernoulli_gates_paper_profile(paper_data, monkeypatch, models):
    from pruning_lib.chapters import bernoulli_gates as bc

    paper = bc.Config.from_profile("paper")
    assert set(models) <= set(paper.models) and (paper.dataset, paper.cifar_dataset) == ("mnist", "cifar10")
    datasets = {paper.dataset_of(m) for m in models}
    for d in datasets:
        getattr(paper_data, d)()
    # LeNet-300-100 at two initial widths (the width claims compare them); the conv nets at the paper's
    # first width, 1; one epoch of batch 40 (three steps on MNIST, one on CIFAR-10); one flipped example
    cfg = bc.Config.from_profile("paper", models=models, widths=(1.0, 2.0), conv_widths=(1.0,), seeds=(0,),
                                 conv_seeds=(0,), dense_seeds=1, epochs=1, conv_epochs=1, batch_size=40,
                                 flip_examples=1, num_threads=1, results_dir=paper_data.results)
    out = bc.run_experiment(cfg, progress=False)
    runs = out["runs"]
    assert set(runs["model"]) == set(models)
    _accuracies(1 - runs["test_error"])
    _accuracies(1 - out["dense"]["test_error"])
    w = out["widths"]
    assert (w["final"] <= w["initial"]).all()
    if "vgg16_bn" in models:
        vgg = w[w["model"] == "vgg16_bn"]
        assert len(vgg) == 13 and vgg["initial"].max() == 512  # VGG-16's 13 conv layers at full width
    table = bc.architecture_table(cfg, out)
    settings = " ".join(table["setting"])
    assert all(f"measured, {d}," in settings for d in datasets)
    assert _datasets_recorded(cfg.results_dir) == datasets
    _ledger(bc.claims_table(cfg, out), bc.CHAPTER, cfg.results_dir)
    monkeypatch.setattr(bc, "fit", _no_training)
    again = bc.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again["runs"], runs)


# --- chapter 5: polarization (ResNet-56 on CIFAR-10, CIFAR-100, Tiny ImageNet) ---------------------------

@pytest.mark.parametrize("dataset", ["cifar100", "tiny-imagenet"])
def test_ch5_polarization_paper_profile(paper_data, monkeypatch, dataset):
    from pruning_lib.chapters import polarization as P

    getattr(paper_data, dataset.replace("-", "_"))()
    # the last dataset loaded is kept by (name, root): "data" in another test meant another folder
    monkeypatch.setattr(data_mod, "_ONCE", {})
    cfg = P.Config.from_profile("paper", datasets=(dataset,), targets=(0.5,), no_polarizer_target=0.5,
                                resnet_seeds=(0,), epochs=0.5, finetune_epochs=0.25, batch_size=8,
                                timing_batch=4, timing_repeats=1)
    assert cfg.models == ("resnet56",) and cfg.resnet_width == 1.0
    out = P.run_experiment(cfg, results_dir=paper_data.results, progress=False)
    runs = out["runs"]
    assert set(runs["method"]) == {"polarization", "no polarizer", "magnitude", "random"}
    assert set(runs["model"]) == {"resnet56"} and set(runs["dataset"]) == {dataset}
    _accuracies(runs["test_accuracy"])
    _accuracies(out["dense"]["test_accuracy"])
    pol = runs[runs.method == "polarization"]
    assert (pol["max_abs_diff"] < 1e-3).all()  # the compact network computes the static gated one
    assert (pol["blocks"] == 27).all()  # ResNet-56: 3 stages of 9 blocks, each with a block gate
    assert _datasets_recorded(paper_data.results) == {dataset}
    _ledger(P.claims_table(cfg, out, results_dir=paper_data.results), P.CHAPTER, paper_data.results)
    monkeypatch.setattr(P, "fit", _no_training)
    again = P.run_experiment(cfg, results_dir=paper_data.results, progress=False)
    pd.testing.assert_frame_equal(again["runs"], runs)


# --- chapter 6: LNPT (ResNet-56 teacher, ResNet-20 and VGG-16 students on CIFAR-10) ---------------------

# One test per student (each trains the teacher and the probed ResNet-20 run too): every method, one sparsity.
@pytest.mark.parametrize("student", [("resnet20", 1.0), ("vgg16_bn", 0.5)], ids=["resnet20", "vgg16_bn"])
def test_ch6_lnpt_paper_profile(paper_data, monkeypatch, student):
    from pruning_lib.chapters import lnpt

    paper = lnpt.Config.from_profile("paper")
    assert paper.dataset == "cifar10" and paper.teacher == "resnet56" and student in paper.student_specs()
    paper_data.cifar10(per_batch=4)  # 18 training images: 9 for the teacher, 9 for the student
    cfg = lnpt.Config.from_profile("paper", students=(student[0],), student_widths=(student[1],),
                                   teacher_epochs=1, epochs=1, trajectory_epochs=1, batch_size=25,
                                   sparsities=(0.9,), seeds=(0,), trajectory_lrs=(1e-3,),
                                   trajectory_sparsities=(0.0,), probe_samples=10, score_batches=1,
                                   results_dir=paper_data.results)
    assert cfg.trajectory_student == "resnet20"
    out = lnpt.run_experiment(cfg, progress=False)
    acc = out["accuracy"]
    assert set(acc["model"]) == {student[0]} and set(acc["width"]) == {student[1]}
    assert set(acc["method"]) == set(paper.methods) | set(lnpt.DENSE_METHODS)
    _accuracies(acc["test_accuracy"])
    _accuracies(out["teacher"]["test_accuracy_final"])
    pruned = acc[acc["sparsity"] > 0]
    assert np.allclose(pruned["density"], 0.1, atol=0.01)
    assert np.allclose(acc[acc["sparsity"] == 0]["density"], 1.0)
    traj = out["trajectories"]
    assert set(traj["student"]) == {"resnet20"} and np.isfinite(traj[["learning_gap", "weight_distance"]]).all().all()
    _accuracies(traj["test_accuracy"])
    assert out["splits"]["examples"].tolist() == [9, 9, 2, 4]  # the stand-in's, as the test wrote it
    assert _datasets_recorded(cfg.results_dir) == {"cifar10"}
    _ledger(lnpt.claims_table(cfg, out), lnpt.CHAPTER, cfg.results_dir)
    monkeypatch.setattr(lnpt, "fit", _no_training)
    again = lnpt.run_experiment(cfg, progress=False)
    pd.testing.assert_frame_equal(again["accuracy"], acc)
