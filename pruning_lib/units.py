"""A chapter's units of work outside its notebook: list them, run one by hash, or all missing ones.

A notebook cannot be launched by ``torchrun``; a unit can. A chapter opts in by listing its units for a
Config (:func:`register`: a function ``cfg -> [Unit]``, each with the hash of its results folder, a line
saying what it trains, whether it is done, the datasets it reads and a ``run(results_dir)`` that trains
it and writes its files). The hashes are the notebook's own (the chapter builds both from one spec
function), so a unit trained here is a cached unit that ``make book`` then reads.

Usage (from the repository root)::

    python -m pruning_lib.book units 03_dep_l0 --profile paper [-p NAME VALUE ...] --list
    python -m pruning_lib.book units 03 --profile paper --unit 3f2a...  # one unit (a unique hash prefix)
    python -m pruning_lib.book units 03 --profile paper --missing        # every unit not done yet
    torchrun --standalone --nproc_per_node=8 -m pruning_lib.book units 03 --profile paper --unit 3f2a... --bf16
    python -m pruning_lib.book units 03 --profile paper --missing --nproc 8   # the same, torchrun started for you

``-p`` parameters are checked exactly as ``python -m pruning_lib.book run`` checks them (the chapter
notebook must declare them; the chapter's Config validates the values). Every dataset the selected units
read must be in place (``data/`` or ``$PRUNING_DATA``): a missing one is named, with its expected path,
before any process starts or any unit trains. Under ``torchrun`` (``WORLD_SIZE`` > 1) every process
trains the unit together (``fit`` wraps the model in DDP, each process takes its slice of every batch);
only rank 0 writes the results cache (the other ranks write into a temporary folder they delete).

``--executor`` sends the units to :func:`pruning_lib.runs.map_units` instead: a Dask scheduler's address
(``tcp://host:8786``), ``dask-local[:N]`` or ``process[:N]``; ``--resources GPU=1`` makes each unit ask a
Dask worker for one GPU (workers started with ``dask worker ADDRESS --nthreads 1 --resources GPU=1``, one
per GPU), so a cluster of GPU machines trains a chapter's units side by side. The workers return each
unit's files and this process writes them into the results cache (no shared disk needed)::

    python -m pruning_lib.book units 03 --profile paper --missing --executor tcp://host:8786 \
        --resources GPU=1 --bf16

``--bf16``, ``--channels-last`` and ``--workers N`` are GPU run settings
(:class:`pruning_lib.train.RunSettings`): they act on CUDA (CPU trains convolutional networks in
channels-last format anyway), are not part of the hash (like the device), and each unit records them with
the device in its ``provenance.json``.

Every chapter lists its units (:data:`REGISTRY`), in the order its notebook runs them:

* ``01_dense_baselines``: each dense network;
* ``02_lottery_tickets``: each seed's dense network, each (seed, criterion) chain of rounds (resumed from
  its finished rounds) and each one-shot SNIP run;
* ``03_dep_l0``: the dense baselines and each gated run;
* ``04_bernoulli_gates``: each model's flip trade-off, its gated runs once that trade-off is done (it
  chooses their flipped examples, so their hash), and the dense references;
* ``05_polarization``: dense, gated and baseline units (a baseline first trains the gated and dense units
  it reads when they are missing);
* ``06_lnpt``: the mature networks (teachers) first, then each probed run and each accuracy cell;
* ``07_comparison``: the dense networks, every point (IMP: one seed's chain), and the Scratch-B of each
  structured point already trained (named by the architecture its method found).

A unit listed only once another is done (Bernoulli's gated runs, Scratch-B) needs a second ``--missing``
from a fresh cache.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# chapter notebook stem -> "module:function" listing its units for a Config (imported when used)
REGISTRY: dict[str, str] = {
    "01_dense_baselines": "pruning_lib.chapters.dense_baselines:work_units",
    "02_lottery_tickets": "pruning_lib.chapters.lottery_tickets:work_units",
    "03_dep_l0": "pruning_lib.chapters.dep_l0:work_units",
    "04_bernoulli_gates": "pruning_lib.chapters.bernoulli_gates:work_units",
    "05_polarization": "pruning_lib.chapters.polarization:work_units",
    "06_lnpt": "pruning_lib.chapters.lnpt:work_units",
    "07_comparison": "pruning_lib.chapters.comparison:work_units",
}


@dataclass(frozen=True)
class Unit:
    """One unit of a chapter: ``key`` is its results folder's hash (``results/<kind>/<key>/``)."""

    key: str
    kind: str
    description: str
    done: bool
    datasets: tuple[str, ...]
    run: Callable[[str], Any] = field(repr=False, compare=False)  # run(results_dir): train, write


def register(chapter: str, lister: str | Callable[[Any], list[Unit]]) -> None:
    """Let ``chapter`` (a notebook stem) list its units: ``lister(cfg) -> [Unit]`` or "module:function"."""
    REGISTRY[chapter] = lister


def _lister(chapter: str) -> Callable[[Any], list[Unit]]:
    ref = REGISTRY[chapter]
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class UnitsError(Exception):
    """A request that cannot be run (unknown chapter or hash, a missing dataset); nothing ran."""


def chapter_units(chapter: str, profile: str = "paper", params: Sequence[tuple[str, Any]] = (),
                  root: str | Path = ".") -> tuple[str, Any, list[Unit]]:
    """``(chapter stem, Config, units)`` for ``chapter`` (name, number or short name) at ``profile`` with
    ``params``, validated as ``pruning_lib.book run`` validates them (raises its ``BookError``)."""
    from . import book

    found = book.select_chapters(book.chapter_notebooks(root), chapter)
    if len(found) != 1:
        raise book.BookError(f"name one chapter (got {chapter!r})")
    stem = found[0].stem
    if stem not in REGISTRY:
        raise UnitsError(f"{stem} does not list its units outside the notebook; chapters that do: "
                         f"{', '.join(sorted(REGISTRY))}")
    jobs = book.plan(root, profile, stem, list(params), include_verdicts=False)  # the runner's checks
    cls = book.chapter_config(found[0])
    fields = set(cls.parameter_names())
    cfg = cls.from_profile(profile, **{k: v for k, v in jobs[0].parameters.items()
                                       if k in fields and k != "profile"})
    return stem, cfg, _lister(stem)(cfg)


# where each on-disk dataset must be, relative to the data root (the loaders in pruning_lib.data)
_EXPECTED = {"mnist": ("MNIST/raw",), "cifar10": ("cifar-10-batches-py",), "cifar100": ("cifar-100-python",),
             "tiny-imagenet": ("tiny-imagenet-200/train", "tiny-imagenet-200/val"),
             "imagenet": ("imagenet/train", "imagenet/val")}


def check_datasets(names, data_root: str | Path | None) -> None:
    """Raise :class:`pruning_lib.data.DatasetNotFoundError` naming every dataset of ``names`` whose folder
    is missing (its expected path and layout), without reading it (ImageNet's listing is slow)."""
    from . import data as data_mod

    root = data_mod.data_root(data_root)
    missing = []
    for name in dict.fromkeys(names):
        for rel in _EXPECTED.get(name, ()):
            if not (root / rel).is_dir():
                missing.append(str(data_mod._missing(name, root, root / rel)))
                break
    if missing:
        raise data_mod.DatasetNotFoundError("\n".join(missing))


def select(units: list[Unit], run: str | None = None, missing: bool = False) -> list[Unit]:
    """The units to run: the one whose hash starts with ``run``, or every unit not done."""
    if run is not None:
        hits = [u for u in units if u.key.startswith(run)]
        if len(hits) != 1:
            raise UnitsError(f"{'no' if not hits else 'more than one'} unit with hash {run!r} "
                             f"(list them with --list)")
        return hits
    return [u for u in units if not u.done] if missing else []


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_units(todo: list[Unit], results_dir: str, settings=None, say=print) -> list[str]:
    """Run ``todo`` in this process (one of a torchrun group, or alone); returns the failed keys. Rank 0
    writes ``results_dir``; other ranks write into a temporary folder they delete."""
    from . import train

    rank, world = _rank_world()
    failed = []
    with tempfile.TemporaryDirectory(prefix="pruning-rank-") as scratch, \
            train.run_settings(settings or train.current_settings()):
        target = results_dir if rank == 0 else scratch
        for i, u in enumerate(todo, 1):
            if u.done:
                say(f"[{i}/{len(todo)}] {u.key} already done: {u.description}")
                continue
            say(f"[{i}/{len(todo)}] {u.key} training on {world} process(es): {u.description}")
            start = time.perf_counter()
            try:
                u.run(target)
            except Exception as exc:  # one failed unit does not stop the others (in this process)
                failed.append(u.key)
                say(f"[{i}/{len(todo)}] {u.key} FAILED: {type(exc).__name__}: {exc}")
                if world > 1:
                    raise  # the other ranks would wait for this one forever
                continue
            prov = train.last_run()
            say(f"[{i}/{len(todo)}] {u.key} done in {time.perf_counter() - start:.1f} s on "
                f"{prov.get('device_name', '?')} x{prov.get('world_size', 1)} "
                f"({prov.get('precision', 'fp32')})")
    return failed


def _check_executor(args: argparse.Namespace) -> None:
    from .runs import ConfigError, check_executor

    if args.executor is None:
        raise UnitsError("--resources needs --executor (the units run on Dask workers)")
    if args.nproc or _rank_world()[1] > 1:
        raise UnitsError("--executor runs each unit on one worker: not with --nproc or under torchrun")
    try:
        check_executor(args.executor, args.resources)
    except ConfigError as exc:
        raise UnitsError(str(exc)) from None


def _run_one(spec: tuple[Unit, Any], results_dir: str) -> dict:
    """One unit on a :func:`pruning_lib.runs.map_units` worker, with the run settings; returns its
    provenance (device, precision) and wall time."""
    from . import train

    unit, settings = spec
    start = time.perf_counter()
    with train.run_settings(settings):
        unit.run(results_dir)
    return {**train.last_run(), "seconds": time.perf_counter() - start}


def map_units_cli(todo: list[Unit], results_dir: str, settings, executor: str, resources: str | None,
                  stem: str, say=print) -> list[str]:
    """Run ``todo`` through :func:`pruning_lib.runs.map_units` on ``executor`` (each asking a Dask worker
    for ``resources``); returns the failed keys (the first failure is reported with its traceback)."""
    from .runs import UnitError, map_units

    for u in todo:
        if u.done:
            say(f"{u.key} already done: {u.description}")
    todo = [u for u in todo if not u.done]
    if not todo:
        return []
    asking = f", each asking for {resources}" if resources else ""
    say(f"{stem}: {len(todo)} unit(s) on {executor}{asking}")
    try:
        out = map_units(_run_one, [(u, settings) for u in todo], results_dir=results_dir, executor=executor,
                        resources=resources, key=lambda spec: spec[0].key, desc=f"{stem} units")
    except UnitError as exc:
        say(f"error: {exc}")
        return [exc.key]
    for u, prov in zip(todo, out):
        say(f"{u.key} done in {prov['seconds']:.1f} s on {prov.get('device_name', '?')} "
            f"({prov.get('precision', 'fp32')}): {u.description}")
    return []


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from .book import DEFAULT_PROFILE, PROFILES

    ap.add_argument("chapter", help="the chapter (03_dep_l0, 03 or dep_l0)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a chapter parameter, as for `run` (repeatable)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the units: hash, done or not, what (default)")
    # --unit, not only --run: under torchrun, whose own options include --run-path and --run_path, argparse
    # calls "--run" an ambiguous abbreviation even after the module name
    what.add_argument("--unit", "--run", dest="run", metavar="HASH",
                      help="run the unit with this hash (a unique prefix will do)")
    what.add_argument("--missing", action="store_true", help="run every unit that is not done")
    ap.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="run under `torchrun --standalone --nproc_per_node=N` (one process per GPU)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; recorded, not hashed)")
    ap.add_argument("--channels-last", action="store_true",
                    help="channels-last memory format on CUDA too (on CPU the default for convolutional networks)")
    ap.add_argument("--workers", type=int, default=None, help="loader processes per GPU (on-disk data)")
    ap.add_argument("--executor", default=None, metavar="WHERE",
                    help="run the units through runs.map_units: a Dask scheduler's address (tcp://host:8786), "
                         "dask-local[:N] or process[:N] (default: in this process, or under torchrun)")
    ap.add_argument("--resources", default=None, metavar="NAME=N,...",
                    help="what each unit asks of a Dask worker, e.g. GPU=1 (with --executor)")
    ap.add_argument("--root", default=".", help=argparse.SUPPRESS)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` for the processes torchrun starts: without ``--nproc``, and ``--run`` spelt ``--unit``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif a == "--run" or a.startswith("--run="):
            out.append("--unit" + a[len("--run"):])
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cli(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """The ``units`` command of ``python -m pruning_lib.book`` (``argv``: its own arguments, for --nproc)."""
    from .book import BookError, parse_value
    from .data import DatasetNotFoundError

    rank, world = _rank_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        params = [(n, parse_value(v)) for n, v in args.parameter]
        stem, cfg, units = chapter_units(args.chapter, args.profile, params, args.root)
        todo = select(units, args.run, args.missing)
        if todo:
            check_datasets([d for u in todo for d in u.datasets], getattr(cfg, "data_root", None))
        if args.executor is not None or args.resources is not None:
            _check_executor(args)
    except (BookError, UnitsError, DatasetNotFoundError) as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (args.run or args.missing):
        done = sum(u.done for u in units)
        say(f"{stem}, profile {args.profile}: {len(units)} units, {done} done, results in {cfg.results_dir}/")
        for u in units:
            say(f"{u.key}  {'done   ' if u.done else 'missing'}  {u.kind}  {u.description}")
        return 0
    if args.nproc and world == 1:  # start the processes only now: the request and the data are checked
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "pruning_lib.book", "units", *_without_nproc(argv)]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.call(cmd, cwd=args.root)
    from .train import RunSettings

    settings = RunSettings(precision="bf16" if args.bf16 else "fp32",
                           channels_last=True if args.channels_last else None, workers=args.workers)
    if args.executor is not None:
        failed = map_units_cli(todo, cfg.results_dir, settings, args.executor, args.resources, stem, say)
        return 1 if failed else 0
    try:
        failed = run_units(todo, cfg.results_dir, settings, say)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        say(f"error: {len(failed)} unit(s) failed: {', '.join(failed)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pruning_lib.units", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli(ap.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
