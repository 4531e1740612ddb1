"""Chapter 1, dense baselines: the reference models later chapters compare against.

:func:`train_dense` trains one registered model on one dataset with one seed through the dense unit
(:mod:`pruning_lib.dense`), which caches the trained weights and the learning curve, so another chapter
asking for the same network (chapter 7's dense references) reuses it instead of training it again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import claims, dense, metrics, plotting, reference
from ..data import load_dataset
from ..dense import DenseSpec
from ..runs import RunConfig, Store, map_units, param, parse_executor, progress_bar

CHAPTER = "01_dense_baselines"

# Published dense test errors on full MNIST (60k training digits), for comparison only:
# model -> key in data/reference/published.csv.
PUBLISHED_ERROR = {"lenet300_100": "snip_dense_lenet300_100", "lenet5_caffe": "snip_dense_lenet5_caffe"}
MODEL_CHOICES = ("lenet300_100", "lenet5_caffe", "conv2", "conv4", "conv6", "small_vgg", "vgg16_bn",
                 "resnet20", "resnet56", "resnet50")
DATASET_CHOICES = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny-imagenet", "imagenet",
                   "synthetic-mnist")


@dataclass(frozen=True)
class Config(RunConfig):
    models: tuple[str, ...] = param(("lenet300_100", "lenet5_caffe"), choices=MODEL_CHOICES)
    dataset: str = param("mnist5k", choices=DATASET_CHOICES)
    seeds: tuple[int, ...] = param((0, 1, 2), low=0)
    epochs: float = param(20, low=0.01, high=1000)
    batch_size: int = param(60, low=1, high=4096)
    lr: float = param(1.2e-3, low=0, high=10)
    evals_per_epoch: int = param(2, low=1, high=100)
    data_root: str = param("data")
    results_dir: str = param("results")

    PROFILES = {
        "smoke": {"seeds": (0,), "epochs": 0.3, "evals_per_epoch": 2},
        "cpu": {"seeds": (0, 1, 2), "epochs": 20},
        # LTH schedule for LeNets: Adam 1.2e-3, batch 60, 50k iterations = 60 epochs of 50k digits.
        "paper": {"dataset": "mnist", "seeds": (0, 1, 2, 3, 4), "epochs": 60},
    }
    NOT_HASHED = RunConfig.NOT_HASHED + ("data_root",)
    BUDGETED = ("epochs",)


def dense_spec(model_name: str, dataset: str, seed: int, *, epochs: float, batch_size: int = 60,
               lr: float = 1.2e-3, evals_per_epoch: int = 2) -> dict:
    """What a dense network's cache folder (``results/dense/<hash>/``) is named by: the dense unit's spec."""
    return _spec(model_name, dataset, seed, epochs, batch_size, lr, evals_per_epoch).to_dict()


def dense_store(model_name: str, dataset: str, seed: int, *, epochs: float, batch_size: int = 60,
                lr: float = 1.2e-3, evals_per_epoch: int = 2, results_dir: str = "results") -> Store:
    """The Store :func:`train_dense` caches that network in (:func:`pruning_lib.dense.store`)."""
    return dense.store(_spec(model_name, dataset, seed, epochs, batch_size, lr, evals_per_epoch), results_dir)


def _spec(model_name, dataset, seed, epochs, batch_size, lr, evals_per_epoch) -> DenseSpec:
    return DenseSpec(model_name, dataset, seed, batch_size=batch_size, lr=lr, epochs=epochs,
                     evals_per_epoch=evals_per_epoch)


def work_units(cfg: Config) -> list:
    """Every (model, seed) network of :func:`run_experiment` for the command line (:mod:`pruning_lib.units`),
    with the hash :func:`train_dense` caches it under."""
    from ..units import Unit

    out = []
    for model_name in cfg.models:
        for seed in cfg.seeds:
            kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, evals_per_epoch=cfg.evals_per_epoch)
            store = _store(cfg, model_name, seed)
            done = dense.done(store)

            def run(results_dir, model_name=model_name, seed=seed, kw=kw):
                train_dense(model_name, cfg.dataset, seed, results_dir=results_dir, data_root=cfg.data_root,
                            progress=True, **kw)

            out.append(Unit(store.key, "dense", f"{model_name} on {cfg.dataset}, seed {seed}: {cfg.epochs:g} "
                            f"epochs, batch {cfg.batch_size}, Adam {cfg.lr:g}", done, (cfg.dataset,), run))
    return out


def train_dense(model_name: str, dataset: str, seed: int, *, epochs: float, batch_size: int = 60,
                lr: float = 1.2e-3, evals_per_epoch: int = 2, results_dir: str = "results",
                data_root: str = "data", progress: bool = True, data=None):
    """Train (or load) one dense model with Adam; returns ``(model, history)``: the dense unit
    (:func:`pruning_lib.dense.train`), so another chapter asking for the same network loads it."""
    return dense.train(_spec(model_name, dataset, seed, epochs, batch_size, lr, evals_per_epoch),
                       results_dir=results_dir, data_root=data_root, data=data, progress=progress)


def _store(cfg: Config, model_name: str, seed: int) -> Store:
    return dense_store(model_name, cfg.dataset, seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       evals_per_epoch=cfg.evals_per_epoch, results_dir=cfg.results_dir)


def _train_task(task, results_dir: str) -> str:
    """One network for :func:`runs.map_units` (``task``: ``(cfg, model, seed)``), trained into ``results_dir``
    (or loaded when it is there); on a worker with one torch thread."""
    cfg, model_name, seed = task
    train_dense(model_name, cfg.dataset, seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                evals_per_epoch=cfg.evals_per_epoch, results_dir=str(results_dir), data_root=cfg.data_root,
                progress=False)
    return _store(cfg, model_name, seed).key


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Train every (model, seed) of ``cfg``; returns ``curves`` (all histories), ``final`` (one row per
    run) and ``size`` (parameters and FLOPs per model)."""
    data = load_dataset(cfg.dataset, root=cfg.data_root)
    curves, final, size = [], [], []
    units = [(m, s) for m in cfg.models for s in cfg.seeds]
    # the networks missing from the cache train through runs.map_units: here, one after another, unless
    # $PRUNING_EXECUTOR names processes or a Dask cluster; then each is read back below
    bar = progress_bar(total=len(units), desc="dense baselines", progress=progress)
    map_units(_train_task, [(cfg, m, s) for m, s in units], results_dir=cfg.results_dir,
              executor=parse_executor(None, 1), done=lambda t: dense.done(_store(cfg, t[1], t[2])),
              key=lambda t: _store(cfg, t[1], t[2]).key, bar=bar)
    bar.close()
    for model_name, seed in units:
        model, h = train_dense(model_name, cfg.dataset, seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                               lr=cfg.lr, evals_per_epoch=cfg.evals_per_epoch, results_dir=cfg.results_dir,
                               data_root=cfg.data_root, progress=False, data=data)
        curves.append(h.assign(model=model_name, seed=seed))
        best = h.loc[h["val_loss"].idxmin()]
        final.append({"model": model_name, "seed": seed, "test_error": 1 - h["test_accuracy"].iloc[-1],
                      "early_stop_step": int(best["step"]), "early_stop_test_error": 1 - best["test_accuracy"],
                      "steps": int(h["step"].iloc[-1]), "seconds": float(h["seconds"].iloc[-1])})
        if seed == cfg.seeds[0]:
            s = metrics.summary(model, data.input_shape)
            size.append({"model": model_name, "params": s["params"], "flops": s["flops"]})
    return {"curves": pd.concat(curves, ignore_index=True), "final": pd.DataFrame(final),
            "size": pd.DataFrame(size)}


def comparison_table(cfg: Config, results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Our test error (mean ± s.d. over seeds) beside the published dense error, labelled."""
    rows = []
    for model_name, g in results["final"].groupby("model", sort=False):
        err = g["test_error"].to_numpy()
        pub = reference.number(PUBLISHED_ERROR[model_name]) if model_name in PUBLISHED_ERROR else None
        size = results["size"].set_index("model").loc[model_name]
        rows.append({
            "model": model_name,
            f"our test error ({cfg.dataset}, {len(err)} seeds)":
                f"{100 * err.mean():.2f} % ± {100 * err.std(ddof=1) if len(err) > 1 else 0:.2f}",
            "published error": f"{100 * pub['value']:.1f} %" if pub is not None else "—",
            "published source": reference.label(pub) if pub is not None else "—",
            "parameters": int(size["params"]), "FLOPs / example": int(size["flops"]),
        })
    return pd.DataFrame(rows)


def claims_table(cfg: Config, results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Published dense errors as claims. Their values are judged only on the dataset they were
    published on (full MNIST); on MNIST-5k they are shown in the comparison table but marked not
    measured. Their ranking (the convolutional LeNet-5-Caffe beats the perceptron LeNet-300-100) is
    judged on any dataset, seed by seed."""
    rows = []
    final = results["final"]
    curves = results["curves"]
    time = "step"
    settle_tol = 0.005  # test accuracy within 0.5 pp over the last quarter of training

    def evidence(value, models):
        runs = curves[curves["model"].isin(models)]
        return claims.Evidence(value, claims.settled_table(runs, "test_accuracy", settle_tol,
                                                           ["model", "seed"], time)["settled"].tolist(),
                               "test accuracy moves ≥ 0.5 pp over the last quarter")

    for model_name, key in PUBLISHED_ERROR.items():
        if model_name not in cfg.models:
            continue
        pub = reference.number(key)
        err, source = pub["value"], reference.label(pub)
        ours = claims.seed_means(final[final["model"] == model_name], "test_error") * 100
        claim = claims.Claim(
            statement=f"dense {model_name} reaches about {100 * err:.1f} % test error on MNIST",
            source=source, measure="final test error (%), one value per seed (full MNIST only)",
            rule=claims.AtMost(limit=100 * err + 0.3, fmt="{:.2f}", unit="%"),
            paper=f"{100 * err:.1f} % (full MNIST)")
        rows.append((claim, evidence(ours, [model_name]) if cfg.dataset == "mnist" else None))
    if set(PUBLISHED_ERROR) <= set(cfg.models):
        mlp, conv = (reference.number(PUBLISHED_ERROR[m]) for m in ("lenet300_100", "lenet5_caffe"))
        errors = final.pivot_table(index="seed", columns="model", values="test_error") * 100
        claim = claims.Claim(
            statement="LeNet-5-Caffe has a lower dense test error than LeNet-300-100",
            source=f"{mlp['source']} (both networks)",
            measure=f"test error of LeNet-300-100 minus LeNet-5-Caffe (pp), paired by seed, on {cfg.dataset}",
            rule=claims.Exceeds(fmt="{:+.2f}", unit="pp", a_name="LeNet-300-100", b_name="LeNet-5-Caffe"),
            paper=f"{100 * mlp['value']:.1f} % vs {100 * conv['value']:.1f} % (full MNIST)")
        rows.append((claim, evidence((errors["lenet300_100"], errors["lenet5_caffe"]),
                                     ["lenet300_100", "lenet5_caffe"])))
    return claims.ledger(CHAPTER, rows, cfg.profile, cfg.results_dir, budget=cfg.budget)


def plot_learning_curves(curves: pd.DataFrame, metric: str = "test_accuracy"):
    """Mean and spread (s.d. over seeds) of ``metric`` against training step, one panel per model."""
    import seaborn as sns

    models = list(dict.fromkeys(curves["model"]))
    fig, axes = plotting.figure(ncols=len(models), width=4.2 * len(models), height=3.6, squeeze=False)
    for ax, m in zip(axes[0], models):
        d = curves[curves["model"] == m].melt(id_vars=["step", "seed"],
                                               value_vars=["val_accuracy", "test_accuracy"],
                                               var_name="split", value_name="accuracy")
        d["split"] = d["split"].str.replace("_accuracy", "")
        sns.lineplot(data=d[d["step"] > 0], x="step", y="accuracy", hue="split", errorbar="sd", ax=ax)
        ax.set_title(m)
        ax.set_xlabel("optimizer step")
        lo = float(np.nanpercentile(d.loc[d["step"] > 0, "accuracy"], 5))
        ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    axes[0][0].set_ylabel("accuracy (mean ± s.d. over seeds)")
    return fig


def discussion(cfg: Config, results: dict[str, pd.DataFrame], table: pd.DataFrame) -> str:
    """The chapter's discussion (Markdown): the run, each model's test error (mean, s.d. over seeds), and the
    verdict on the models' ranking from ``table`` (:func:`claims_table`)."""
    summary = results["final"].groupby("model")["test_error"].agg(["mean", "std", "count"])
    lines = [f"This page was produced by the **{cfg.profile}** profile on **{cfg.dataset}**."]
    if cfg.profile == "smoke":
        lines.append("The smoke profile trains for a fraction of an epoch: its numbers only show that the "
                     "pipeline runs and mean nothing about the models.")
    for m, row in summary.iterrows():
        lines.append(f"- {m}: test error {100 * row['mean']:.2f} % "
                     f"(s.d. {100 * (row['std'] if row['count'] > 1 else 0):.2f}, {int(row['count'])} seeds).")
    if cfg.dataset != "mnist":
        lines.append("The published errors were measured on full MNIST, so their values are not judged here "
                     "(verdict 'not measured'); the gap to them is the price of training on far fewer digits.")
    ranking = table[table["claim"].str.startswith("LeNet-5-Caffe has a lower")]
    if len(ranking):
        lines.append(f"Their ranking: **{ranking['verdict'].iloc[0]}** ({ranking['ours'].iloc[0]}).")
    return "\n".join(lines)
