"""Run the book's chapter notebooks and build the HTML book.

Usage (from the repository root, with the project's environment)::

    python -m pruning_lib.book run [--profile smoke|cpu|paper] [--chapters 02,lottery_tickets]
                                   [-p NAME VALUE ...] [--stage DIR] [--dry-run]
                                   [--executor tcp://host:8786|dask-local[:N]|process[:N]|serial]
                                   [--resources GPU=1]
    python -m pruning_lib.book build [--no-strict] [--stage DIR]
    python -m pruning_lib.book list
    python -m pruning_lib.book units CHAPTER [--profile P] [-p NAME VALUE ...] [--list | --run HASH | --missing]

``run`` executes the source notebooks ``notebooks/NN_name.ipynb`` with Papermill into
``book/chapters/NN_name.ipynb`` (kernel ``python3``, working directory = the repository root), passing
``profile`` and every ``-p`` parameter, then runs ``notebooks/99_verdicts.ipynb`` last. Before running
anything it checks the profile, that every ``-p`` name is a parameter declared by every selected
chapter (its cell tagged ``parameters``), and every value with the chapter's own Config (the validation
the notebook applies again); a mistake stops the run with a message that names it. Each chapter
executes into a temporary notebook (in ``_build/executing/`` of the book or stage) that replaces
``book/chapters/NN_name.ipynb`` only when the whole run succeeded (no error, every cell executed,
figures with images, no warnings, see :func:`check_publishable`); a failed run keeps the book's previous
copy and leaves its own notebook, with the traceback, in ``_build/failed/``. A chapter that fails does
not stop the others; the command then
exits with status 1 and names the failed chapters. Each chapter's run is recorded in
``<results_dir>/runs/<profile key>/<chapter>.json`` (see :func:`write_run_record`).

``-p`` values are read as Papermill's own ``-p`` reads them (``True``/``False``/``None``, ints, floats,
else a string), and a value starting with ``[``, ``{`` or ``(`` is read as YAML 1.2 (``-p seeds "[0,
1]"``; ``1e-4`` is a float, ``010`` is ten), JSON types only; numbers must be finite.
``results_dir`` given with ``-p`` is passed to the verdicts notebook too.

``--executor`` says where the chapters run their units (:func:`pruning_lib.runs.map_units`): the
address of a running Dask scheduler, ``dask-local[:N]`` (a LocalCluster made by each chapter's kernel),
``process[:N]`` or ``serial``; ``--resources GPU=1`` is what each unit asks of a Dask worker. They reach
the notebook kernels as ``$PRUNING_EXECUTOR`` and ``$PRUNING_RESOURCES`` (without ``--executor`` the
kernels see the variable the runner was started with; unset, each chapter keeps its own default, a pool
of its ``workers`` processes). Both are checked before anything runs and recorded in the run record;
neither is a parameter or part of a hash, so the numbers do not depend on them.

``--stage DIR`` keeps a run apart from the book: ``run --stage DIR`` writes the executed notebooks to
``DIR/book/chapters/`` and ``build --stage DIR`` copies the book's pages beside them and builds
``DIR/_build/html``. ``make test`` does this with ``_build/smoke``, so testing never overwrites the
chapters of a ``cpu`` or ``paper`` build (and each profile's claims go to ``results/claims/<profile>/``).

``build`` builds ``_build/html`` with ``jupyter-book build . --all -W -n --keep-going`` (warnings are
errors). The committed ``_toc.yml`` lists every chapter; when some chapters have no executed notebook in
``book/chapters/`` (a chapter not written yet, or a run of a few chapters on a fresh clone), the build
uses a copy of the table of contents without them, written to ``book/_generated/_toc.yml``, and says
which it left out. A source notebook that ``_toc.yml`` does not list is an error.

This module is also a pytest plugin (``pytest -p pruning_lib.book --nbval-lax ...``): it makes nbval
start its kernels in the directory pytest was started from (the repository root), as Papermill does,
instead of the notebook's own folder, so relative paths such as ``results_dir = "results"`` and ``data/``
mean the same thing in both.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PROFILES = ("smoke", "cpu", "paper")  # the same as pruning_lib.runs.PROFILES (a test checks it)
DEFAULT_PROFILE = "cpu"
KERNEL = "python3"
NOTEBOOKS = "notebooks"
CHAPTERS_OUT = Path("book") / "chapters"
GENERATED = Path("book") / "_generated"
VERDICTS = "99_verdicts"
# parameters passed on to the verdicts notebook when it declares them
VERDICTS_PASSTHROUGH = ("profile", "budget", "results_dir")


class BookError(Exception):
    """A mistake in what was asked for (unknown chapter, profile or parameter); nothing was run."""


@dataclass
class Job:
    """One notebook to execute: source, destination and the parameters Papermill injects."""

    name: str
    source: Path
    output: Path
    parameters: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# discovery and validation


def chapter_notebooks(root: str | Path = ".") -> list[Path]:
    """The chapter notebooks ``notebooks/NN_name.ipynb`` present, in order (the verdicts one excluded)."""
    folder = Path(root) / NOTEBOOKS
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.stem != VERDICTS)
    return found


def verdicts_notebook(root: str | Path = ".") -> Path:
    return Path(root) / NOTEBOOKS / f"{VERDICTS}.ipynb"


def _matches(token: str, path: Path) -> bool:
    stem = path.stem
    number, _, name = stem.partition("_")
    token = token.strip().removesuffix(".ipynb")
    token = Path(token).name
    return token in (stem, number, name) or (token.isdigit() and number.isdigit()
                                             and int(token) == int(number))


def select_chapters(available: Sequence[Path], spec: str | Iterable[str] | None) -> list[Path]:
    """The chapters named by ``spec`` ("02,lottery_tickets" or a list; None or "" = all), in book
    order. A token may be the full name (``02_lottery_tickets``), its number (``02``, ``2``) or its
    name (``lottery_tickets``). The verdicts notebook always runs, so naming it selects nothing."""
    if spec is None:
        return list(available)
    raw = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    tokens = [t for t in raw if t]
    if not tokens:
        if isinstance(spec, str) and spec.strip() and not spec.strip(", "):
            raise BookError(f"--chapters {spec!r} names no chapter; give names or numbers separated by "
                            f"commas, or leave it out for every chapter")
        return list(available)
    chosen: set[Path] = set()
    unknown = []
    for token in tokens:
        hits = [p for p in available if _matches(token, p)]
        if hits:
            chosen.update(hits)
        elif not _matches(token, Path(f"{VERDICTS}.ipynb")):
            unknown.append(token)
    if unknown:
        names = ", ".join(p.stem for p in available) or "(none: notebooks/ has no NN_name.ipynb)"
        raise BookError(f"unknown chapter(s): {', '.join(unknown)}. Chapters present: {names}")
    return [p for p in available if p in chosen]


_YAML12 = None


def _yaml12_loader():
    """A safe YAML loader with the YAML 1.2 core schema's plain scalars: ``1e-4`` is a float (YAML 1.1
    reads it as a string), ``010`` is ten (not octal eight), ``2024-01-01`` is a string (not a date),
    ``yes``/``on`` are strings. Explicit tags that build other types (``!!set``, ``!!timestamp``,
    ``!!binary``) are refused after loading by :func:`pruning_lib.runs.check_json_value`."""
    global _YAML12
    if _YAML12 is not None:
        return _YAML12
    import re

    import yaml

    core = {"tag:yaml.org,2002:" + t for t in ("bool", "int", "float", "null", "timestamp")}

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in core]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"),
                                 ["~", "n", "N", ""])
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                 re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))

    def construct_int(loader, node):
        return int(loader.construct_scalar(node), 10)  # decimal: no octal, no sexagesimal

    def construct_float(loader, node):
        text = loader.construct_scalar(node).lower()
        return {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"),
                ".nan": float("nan")}.get(text) or float(text)

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Loader.add_constructor("tag:yaml.org,2002:float", construct_float)
    _YAML12 = Loader
    return Loader


def parse_value(text: str) -> Any:
    """A ``-p`` value, read as Papermill's CLI reads ``-p`` values; ``[..]``/``{..}``/``(..)`` as YAML
    1.2 (see :func:`_yaml12_loader`). Whether the value is a JSON value with finite numbers is checked
    with its name, by :func:`plan`."""
    if text.lstrip()[:1] in "[{(" and text.strip():
        import yaml

        s = text.strip()
        if s.startswith("(") and s.endswith(")"):
            s = "[" + s[1:-1] + "]"
        try:
            return yaml.load(s, Loader=_yaml12_loader())
        except (yaml.YAMLError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BookError(f"cannot read {text!r} as a list or mapping: {why}") from None
    if text == "True":
        return True
    if text == "False":
        return False
    if text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def declared_parameters(notebook: str | Path) -> dict[str, dict]:
    """The parameters a notebook declares in its cell tagged ``parameters`` (Papermill's view)."""
    import papermill

    try:
        return dict(papermill.inspect_notebook(str(notebook)))
    except ValueError as exc:  # e.g. "No kernel name found in notebook"
        raise BookError(f"cannot read the parameters of {notebook}: {exc} (save it with the "
                        f"Python 3 kernel, kernelspec name {KERNEL!r})") from None


def plan(root: str | Path = ".", profile: str = DEFAULT_PROFILE, chapters: str | None = None,
         params: Sequence[tuple[str, Any]] | dict[str, Any] = (), include_verdicts: bool = True,
         out_dir: str | Path | None = None) -> list[Job]:
    """Check a request and return the notebooks to execute, or raise :class:`BookError` (having run
    nothing) naming what is wrong."""
    root = Path(root)
    if profile not in PROFILES:
        raise BookError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    items = list(params.items()) if isinstance(params, dict) else list(params)
    extra: dict[str, Any] = {}
    for name, value in items:
        if name == "profile":
            raise BookError("give the profile with --profile (make: PROFILE=...), not -p profile")
        if not name.isidentifier():
            raise BookError(f"parameter name {name!r} is not a Python identifier")
        from .runs import ConfigError, check_json_value

        try:
            check_json_value(name, value)
        except ConfigError as exc:
            raise BookError(str(exc)) from None
        extra[name] = value
    if not (root / NOTEBOOKS).is_dir():
        raise BookError(f"no {NOTEBOOKS}/ folder in {root.resolve()}: run from the repository root")
    selected = select_chapters(chapter_notebooks(root), chapters)
    out = Path(out_dir) if out_dir is not None else root / CHAPTERS_OUT
    jobs = []
    for nb in selected:
        declared = declared_parameters(nb)
        if "profile" not in declared:
            raise BookError(f"{nb.relative_to(root)} declares no `profile` parameter: it needs a "
                            f"code cell tagged `parameters` whose first line is `profile = \"cpu\"`")
        unknown = [n for n in extra if n not in declared]
        if unknown:
            raise BookError(
                f"unknown parameter {', '.join(map(repr, unknown))} for {nb.stem}; "
                f"its parameters are: {', '.join(declared)}"
                + ("" if chapters else " (use --chapters / CHAPTERS= to pass a parameter that only "
                                       "some chapters have)"))
        validate_parameters(nb, profile, extra)
        jobs.append(Job(nb.stem, nb, out / nb.name, {"profile": profile, **extra}))
    verdicts = verdicts_notebook(root)
    if include_verdicts and verdicts.exists():
        declared = declared_parameters(verdicts)
        given = {"profile": profile, **extra}
        jobs.append(Job(verdicts.stem, verdicts, out / verdicts.name,
                        {k: given[k] for k in VERDICTS_PASSTHROUGH if k in given and k in declared}))
    if not jobs:
        raise BookError(f"nothing to run: no notebooks in {(root / NOTEBOOKS).resolve()}")
    return jobs


def chapter_config(notebook: str | Path):
    """The Config class a chapter notebook builds with ``<Config>.from_namespace(globals())``, found in
    its code (``from pruning_lib.x import Config`` or ``from pruning_lib import x`` ... ``x.Config``);
    None when the notebook has no such call into ``pruning_lib``."""
    import ast
    import importlib

    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    names: dict[str, tuple[str, ...]] = {}  # local name -> (module, attribute, ...)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pruning_lib"):
                for a in node.names:
                    names[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pruning_lib"):
                        names[a.asname or a.name] = (a.name,)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "from_namespace"):
                target = node.func.value
                if isinstance(target, ast.Name) and target.id in names:
                    ref = names[target.id]
                elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                      and target.value.id in names):
                    ref = names[target.value.id] + (target.attr,)
                else:
                    continue
                try:
                    obj = importlib.import_module(ref[0])
                    for part in ref[1:]:
                        obj = (getattr(obj, part) if hasattr(obj, part)
                               else importlib.import_module(f"{obj.__name__}.{part}"))
                    return obj
                except (ImportError, AttributeError):
                    continue
    return None


def validate_parameters(notebook: Path, profile: str, params: dict[str, Any]) -> None:
    """Check ``params`` with the chapter's own Config (the validation its notebook applies again):
    one line naming the chapter and the parameter, before anything runs."""
    from .runs import ConfigError

    cls = chapter_config(notebook)
    if cls is None:
        return
    fields = set(cls.parameter_names())
    try:
        cls.from_profile(profile, **{k: v for k, v in params.items() if k in fields})
    except ConfigError as exc:
        raise BookError(f"{Path(notebook).stem}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# running


EXECUTING = Path("_build") / "executing"  # where a chapter runs before it is published
FAILED = Path("_build") / "failed"  # where a failed run's notebook (with its traceback) is kept


def build_base(output: Path) -> Path:
    """The folder whose ``_build/`` holds a run's working and failed notebooks: the book (or the stage)
    that ``output`` (``<base>/book/chapters/NN.ipynb``) belongs to; else the output's own folder."""
    chapters = output.parent
    return chapters.parent.parent if (chapters.name, chapters.parent.name) == ("chapters", "book") \
        else chapters


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_record_path(root: str | Path, job: Job) -> Path:
    """``<results_dir>/runs/<profile key>/<chapter>.json``: ``results_dir`` as the job passes it (else the
    notebooks' default ``results``), relative to ``root``; the key is the claims tables' own
    (:func:`pruning_lib.claims.budget_key`: ``cpu``, ``cpu-budget2``)."""
    from .claims import budget_key

    p = job.parameters
    results = Path(p.get("results_dir") or "results")
    return Path(root) / results / "runs" / budget_key(p.get("profile", DEFAULT_PROFILE),
                                                     float(p.get("budget", 1.0) or 1.0)) / f"{job.name}.json"


def write_run_record(root: str | Path, job: Job, status: str, start: float, seconds: float | None,
                     commit: str | None, error: str | None = None, notebook: Path | None = None,
                     executor: str | None = None) -> Path:
    """Record one chapter run, atomically: ``{"chapter", "status", "profile", "budget", "parameters",
    "start", "seconds", "git_commit", "error", "notebook", "executor"}`` (``executor``: where its units
    ran, ``$PRUNING_EXECUTOR``, or None for the chapter's own default). ``status`` is ``running``
    (written when it
    starts: a run killed mid-way leaves it so), ``ok``, ``failed`` or ``interrupted``; only ``ok`` means
    the book's notebook and the claims table come from this run. ``start`` is UTC ISO 8601, ``seconds``
    the wall time."""
    from .runs import atomic_write_text

    record = {"chapter": job.name, "status": status,
              "profile": job.parameters.get("profile", DEFAULT_PROFILE),
              "budget": float(job.parameters.get("budget", 1.0) or 1.0),
              "parameters": job.parameters,
              "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
              "seconds": None if seconds is None else round(seconds, 1), "git_commit": commit,
              "error": error, "notebook": None if notebook is None else str(notebook),
              "executor": executor}
    path = run_record_path(root, job)
    atomic_write_text(json.dumps(record, indent=1, default=str) + "\n", path)
    return path


def read_run_records(results_dir: str | Path, profile: str, budget: float = 1.0) -> dict[str, dict]:
    """Every chapter's last run record for ``profile`` at ``budget``: ``{chapter: record}`` (unreadable
    records are left out). A chapter counts as run only when its record's ``status`` is ``ok``."""
    from .claims import budget_key

    out = {}
    for path in sorted((Path(results_dir) / "runs" / budget_key(profile, budget)).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            out[path.stem] = record
    return out


def cached_chapters(jobs: Sequence[Job], root: str | Path = ".") -> list[str]:
    """The chapters among ``jobs`` whose every unit is already in the results cache, as the units listing
    (:mod:`pruning_lib.units`) says for the job's profile and parameters: running them only loads and
    draws, so they may run side by side. A chapter whose units cannot be listed counts as not cached."""
    from . import units

    out = []
    for job in jobs:
        if job.name == VERDICTS or job.name not in units.REGISTRY:
            continue
        params = [(k, v) for k, v in job.parameters.items() if k != "profile"]
        try:
            _, _, listed = units.chapter_units(job.name, job.parameters.get("profile", DEFAULT_PROFILE),
                                               params, root)
        except Exception:  # noqa: BLE001 - anything that stops the listing: run it alone
            continue
        if listed and all(u.done for u in listed):
            out.append(job.name)
    return out


def parallel_jobs(jobs: Sequence[Job], root: str | Path = ".", requested: str | int | None = "auto") -> int:
    """How many chapters run at once: ``requested`` when a number; ``"auto"``: one per core (at most 2)
    when every chapter is cached (:func:`cached_chapters`), else 1, so a chapter that trains has the
    machine to itself (its timings are measured)."""
    if requested not in (None, "auto"):
        return max(1, int(requested))
    chapters = [j for j in jobs if j.name != VERDICTS]
    cores = min(2, os.cpu_count() or 1)
    if requested is None or len(chapters) < 2 or cores < 2:
        return 1
    return cores if len(cached_chapters(chapters, root)) == len(chapters) else 1


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def kernel_threads(parallel: int) -> str | None:
    """``$OMP_NUM_THREADS`` for the kernels when ``parallel`` chapters run at once: the process's thread
    count (``$OMP_NUM_THREADS``, else one per core) shared among them, at least 1; None (left as it is) for
    one chapter at a time. Two kernels of 2 OpenMP threads each on 2 cores spin against each other: a smoke
    chapter that takes 5 s alone took 70 s beside another."""
    if parallel <= 1:
        return None
    total = os.environ.get("OMP_NUM_THREADS", "")
    total = int(total) if total.isdigit() and int(total) > 0 else (os.cpu_count() or 1)
    return str(max(1, total // parallel))


def execute(jobs: Sequence[Job], root: str | Path = ".", executor: str | None = None,
            resources: str | None = None, parallel: int = 1) -> dict[str, Any]:
    """Execute ``jobs`` with Papermill (cwd = ``root``), ``parallel`` chapters at a time (the verdicts
    notebook last, alone). Returns ``{"failed": [...], "seconds": {name: s}, "wall": s}``. Each runs into ``_build/executing/`` and replaces its ``job.output`` only
    when it succeeded (see :func:`check_publishable`); a failed notebook, with its error, goes to
    ``_build/failed/``, and the rest run. Each chapter's run is recorded (:func:`write_run_record`).
    ``executor`` and ``resources`` (see :func:`pruning_lib.runs.map_units`) reach the kernels as
    ``$PRUNING_EXECUTOR`` and ``$PRUNING_RESOURCES``; None leaves the variable as it is."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from tqdm import tqdm

    from .runs import EXECUTOR_ENV, RESOURCES_ENV

    threads = kernel_threads(parallel)
    saved = {k: os.environ.get(k) for k in (EXECUTOR_ENV, RESOURCES_ENV, *THREAD_ENV)}
    for name, value in ((EXECUTOR_ENV, executor), (RESOURCES_ENV, resources),
                        *((name, threads) for name in THREAD_ENV)):
        if value is not None:
            os.environ[name] = value  # the kernels Papermill starts inherit the environment
    try:
        return _execute(jobs, root, papermill, PapermillExecutionError, tqdm,
                        os.environ.get(EXECUTOR_ENV) or None, parallel)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _execute(jobs, root, papermill, PapermillExecutionError, tqdm, executor, parallel=1):
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root).resolve()
    commit = _git_commit(root)
    failed: list[str] = []
    seconds: dict[str, float] = {}
    # a kernel started with MPLBACKEND=Agg (say) shows figures as "<Figure size ...>" text only: the
    # kernels must use matplotlib's inline backend, their default
    backend = os.environ.pop("MPLBACKEND", None)
    bar = tqdm(total=len(jobs), desc="notebooks", unit="nb", file=sys.stderr, dynamic_ncols=True)

    def one(job: Job) -> None:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        base = build_base(job.output)
        # a name of its own: two runs at once (a book and a stage) never write the same file
        work = base / EXECUTING / f"{job.output.stem}.{os.getpid()}{job.output.suffix}"
        work.parent.mkdir(parents=True, exist_ok=True)
        work.unlink(missing_ok=True)
        chapter = job.name != VERDICTS
        started, start = time.time(), time.perf_counter()
        if chapter:
            write_run_record(root, job, "running", started, None, commit, executor=executor)
        error = None
        try:
            # cwd=None: the process already works in root (below); papermill's own cwd= changes the
            # directory of the whole process and back, which two threads would undo for each other
            papermill.execute_notebook(str(job.source), str(work), parameters=job.parameters,
                                       kernel_name=KERNEL, cwd=None, progress_bar=False,
                                       log_output=False)
            blank = text_only_figures(work)
            if blank:
                error = (f"figures without an image in cell(s) {', '.join(map(str, blank))}: display a "
                         f"figure made by pruning_lib.plotting.figure, in matplotlib's inline backend")
            else:
                check_publishable(work)
        except PapermillExecutionError as exc:
            error = f"{exc.ename}: {exc.evalue}"
        except BookError as exc:
            error = str(exc)
        except KeyboardInterrupt:
            if chapter:
                write_run_record(root, job, "interrupted", started, time.perf_counter() - start, commit,
                                 "interrupted", executor=executor)
            raise
        except Exception as exc:  # the kernel died, the notebook could not be read, ...
            error = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        if error is None:
            os.replace(work, job.output)  # publish: the whole run succeeded
            status, kept = "ok", job.output
        else:
            status, kept = f"FAILED ({error})", None
            if work.exists():
                kept = base / FAILED / job.output.name
                kept.parent.mkdir(parents=True, exist_ok=True)
                os.replace(work, kept)
            failed.append(job.name)
        if chapter:
            write_run_record(root, job, "ok" if error is None else "failed", started, elapsed, commit,
                             error, kept, executor=executor)
        seconds[job.name] = round(elapsed, 1)
        shown = ", ".join(f"{k}={v!r}" for k, v in job.parameters.items())
        tqdm.write(f"[{seconds[job.name]:7.1f} s] {job.name} ({shown}): {status}", file=sys.stderr)
        bar.update(1)

    t0 = time.perf_counter()
    previous = os.getcwd()
    os.chdir(root)  # the kernels start here, so relative paths (results_dir, data/) mean the repository's
    try:
        chapters = [j for j in jobs if j.name != VERDICTS]
        if parallel > 1 and len(chapters) > 1:
            with ThreadPoolExecutor(max_workers=parallel) as pool:  # each job's kernel is its own process
                for f in [pool.submit(one, job) for job in chapters]:
                    f.result()
        else:
            for job in chapters:
                one(job)
        for job in jobs:  # the verdicts notebook reads every chapter's claims: last, alone
            if job.name == VERDICTS:
                one(job)
    finally:
        os.chdir(previous)
        bar.close()
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    order = [j.name for j in jobs]
    return {"failed": sorted(failed, key=order.index), "seconds": {k: seconds[k] for k in order if k in seconds},
            "wall": time.perf_counter() - t0}


_WARNING = None


def check_publishable(notebook_path: str | Path) -> None:
    """Raise :class:`BookError`, naming the notebook, when an executed chapter notebook must not reach
    the book: a cell with an error output, a code cell that was not executed (a run stopped half-way),
    or a Python warning printed into an output (``FutureWarning: ...``): the book shows no warnings."""
    global _WARNING
    import re

    import nbformat

    if _WARNING is None:
        _WARNING = re.compile(r"(?m)(?:^|: )(?:[A-Z]\w*)?Warning: ")
    path = Path(notebook_path)
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as exc:
        raise BookError(f"{path}: not a readable notebook ({type(exc).__name__}: {exc})") from None
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.source.strip() and cell.get("execution_count") is None:
            problems.append(f"cell {i} was not executed")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"cell {i} raised {out.get('ename')}: {str(out.get('evalue'))[:200]}")
            elif out.get("output_type") == "stream" and _WARNING.search(str(out.get("text", ""))):
                line = next(l for l in str(out["text"]).splitlines() if _WARNING.search(l))
                problems.append(f"cell {i} printed a warning: {line.strip()[:200]}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise BookError(f"{path} cannot be published: {shown}")


def check_chapters(root: str | Path) -> None:
    """:func:`check_publishable` on every executed notebook in ``<root>/book/chapters/``; one error
    naming each that fails (the build calls it)."""
    problems = []
    for nb in sorted((Path(root) / CHAPTERS_OUT).glob("*.ipynb")):
        try:
            check_publishable(nb)
        except BookError as exc:
            problems.append(str(exc))
    if problems:
        raise BookError("\n".join(problems))


def text_only_figures(notebook: str | Path) -> list[int]:
    """Code cells (numbered from 0 among all cells) with a matplotlib figure displayed as text only."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    blank = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = out.get("data", {})
            if str(data.get("text/plain", "")).startswith("<Figure size") and "image/png" not in data:
                blank.append(i)
                break
    return blank


# --------------------------------------------------------------------------------------------------
# building


def _toc_files(entries) -> Iterable[tuple[dict, str]]:
    for entry in entries or ():
        if isinstance(entry, dict):
            if "file" in entry:
                yield entry, entry["file"]
            for key in ("chapters", "sections", "parts"):
                yield from _toc_files(entry.get(key))


def _exists(root: Path, docname: str) -> bool:
    base = root / docname
    if base.suffix in (".md", ".ipynb", ".rst") and base.exists():
        return True
    return any(base.with_name(base.name + ext).exists() for ext in (".md", ".ipynb", ".rst"))


def _prune(entries, root: Path, dropped: list[str]):
    kept = []
    for entry in entries or ():
        if isinstance(entry, dict) and "file" in entry and not _exists(root, entry["file"]):
            dropped.append(entry["file"])
            continue
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in ("chapters", "sections"):
                if key in entry:
                    entry[key] = _prune(entry[key], root, dropped)
                    if not entry[key]:
                        del entry[key]
            if "parts" in entry:
                entry["parts"] = [p for p in (_prune_part(p, root, dropped) for p in entry["parts"])
                                  if p.get("chapters")]
        kept.append(entry)
    return kept


def _prune_part(part: dict, root: Path, dropped: list[str]) -> dict:
    part = dict(part)
    part["chapters"] = _prune(part.get("chapters"), root, dropped)
    return part


def _unlisted(root: Path) -> list[str]:
    """Source notebooks in ``notebooks/`` that ``_toc.yml`` does not list."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    listed = {Path(f).name.removesuffix(".ipynb").removesuffix(".md") for _, f in _toc_files([toc])}
    return [p.name for p in chapter_notebooks(root) + [verdicts_notebook(root)]
            if p.exists() and p.stem not in listed]


def toc_for_build(root: str | Path = ".") -> tuple[Path, list[str]]:
    """The table of contents to build with: ``_toc.yml`` itself when every file it lists exists,
    else a copy without the missing chapters in ``book/_generated/_toc.yml``. Returns (path, left out).
    Raises :class:`BookError` when the root page is missing, when the verdicts page has not been
    executed, or when a source chapter notebook is not listed in ``_toc.yml``."""
    import yaml

    root = Path(root)
    toc_path = root / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text())
    files = [f for _, f in _toc_files([toc])]
    unlisted = _unlisted(root)
    if unlisted:
        raise BookError("not listed in _toc.yml (add `- file: book/chapters/NAME` for each): "
                        + ", ".join(unlisted))
    if not _exists(root, toc["root"]):
        raise BookError(f"the book's root page {toc['root']} is missing")
    verdicts_doc = (CHAPTERS_OUT / VERDICTS).as_posix()
    if any(f.removesuffix(".ipynb") == verdicts_doc for f in files):
        if not _exists(root, verdicts_doc):
            raise BookError(f"{verdicts_doc}.ipynb has not been executed: run "
                            f"`python -m pruning_lib.book run` (or `make book`) first")
    dropped: list[str] = []
    pruned = dict(toc)
    for key in ("chapters", "parts", "sections"):
        if key in pruned:
            if key == "parts":
                pruned[key] = [p for p in (_prune_part(p, root, dropped) for p in pruned[key])
                               if p.get("chapters")]
            else:
                pruned[key] = _prune(pruned[key], root, dropped)
    if not dropped:
        return toc_path, []
    out = root / GENERATED / "_toc.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Generated by pruning_lib.book from _toc.yml, without chapters not executed yet:\n"
                   + "".join(f"#   {d}\n" for d in dropped)
                   + yaml.safe_dump(pruned, sort_keys=False))
    return out, dropped


def stage_sources(root: str | Path, stage: str | Path) -> Path:
    """Copy the book's own pages (``_config.yml``, ``_toc.yml``, ``book/*.md``) into ``stage``, whose
    ``book/chapters/`` holds notebooks executed elsewhere (``run --stage``), so that a build of
    ``stage`` leaves the main book and its executed chapters untouched. Returns ``stage``."""
    root, stage = Path(root), Path(stage)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, stage / name)
    for page in (root / "book").glob("*.md"):
        (stage / "book").mkdir(parents=True, exist_ok=True)
        shutil.copy2(page, stage / "book" / page.name)
    return stage


def build(root: str | Path = ".", strict: bool = True, stage: str | Path | None = None) -> int:
    """Build the HTML book into ``<root>/_build/html``, or, with ``stage``, the notebooks executed into
    ``<stage>/book/chapters`` into ``<stage>/_build/html``. Returns jupyter-book's exit status."""
    root = Path(root)
    if stage is not None:
        if not (Path(stage) / CHAPTERS_OUT).is_dir():
            raise BookError(f"{Path(stage) / CHAPTERS_OUT} does not exist: run "
                            f"`python -m pruning_lib.book run --stage {stage}` first")
        unlisted = _unlisted(root)
        if unlisted:
            raise BookError("not listed in _toc.yml (add `- file: book/chapters/NAME` for each): "
                            + ", ".join(unlisted))
        root = stage_sources(root, stage)
    check_chapters(root)  # no chapter with an error, unexecuted cells or warnings reaches the book
    toc, dropped = toc_for_build(root)
    if dropped:
        print(f"note: building without chapters that have not been executed: {', '.join(dropped)}",
              file=sys.stderr)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else (shutil.which("jupyter-book") or "jupyter-book"),
           "build", str(root), "--all"]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    if toc != root / "_toc.yml":
        cmd += ["--toc", str(toc)]
    print("$ " + " ".join(cmd), file=sys.stderr)
    status = subprocess.call(cmd)
    index = root / "_build" / "html" / "index.html"
    if status == 0 and not index.exists():
        print(f"error: the build reported success but {index} is missing", file=sys.stderr)
        return 1
    return status


# --------------------------------------------------------------------------------------------------
# pytest plugin: nbval kernels start in the invocation directory (the repository root)


def pytest_configure(config):  # pragma: no cover - exercised by `make test`
    try:
        import nbval.plugin as nbval_plugin
    except ImportError:
        return
    base = nbval_plugin.RunningKernel
    if getattr(base, "_pruning_root", None):
        return
    root = str(config.invocation_params.dir)

    class RootKernel(base):
        _pruning_root = root

        def __init__(self, kernel_name, cwd=None, startup_timeout=60):
            super().__init__(kernel_name, cwd=root, startup_timeout=startup_timeout)

    nbval_plugin.RunningKernel = RootKernel


# --------------------------------------------------------------------------------------------------
# command line


def check_executor(executor: str | None = None, resources: str | None = None) -> None:
    """Raise :class:`BookError` when ``executor`` or ``resources`` (None: the environment variables the
    kernels would read) cannot be used: before anything runs, not in the first chapter's kernel."""
    from .runs import ConfigError, check_executor as check

    try:
        check(executor, resources)
    except ConfigError as exc:
        raise BookError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pruning_lib.book", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapter notebooks into book/chapters/, verdicts last")
    run.add_argument("--profile", default=DEFAULT_PROFILE,
                     help=f"one of {', '.join(PROFILES)} (default: {DEFAULT_PROFILE})")
    run.add_argument("--chapters", default=None,
                     help="comma-separated chapters (02_lottery_tickets, 02 or lottery_tickets); "
                          "default: all present")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="a notebook parameter (repeatable)")
    run.add_argument("--no-verdicts", action="store_true", help="do not run the verdicts notebook")
    run.add_argument("--stage", default=None, metavar="DIR",
                     help="write the executed notebooks to DIR/book/chapters/ instead of book/chapters/ "
                          "(make test uses _build/smoke, so it never overwrites the book's chapters)")
    run.add_argument("--executor", default=None, metavar="WHERE",
                     help="where the chapters run their units: a Dask scheduler's address "
                          "(tcp://host:8786), dask-local[:N], process[:N] or serial (default: "
                          "$PRUNING_EXECUTOR, else each chapter's own; make: DASK=...)")
    run.add_argument("--resources", default=None, metavar="NAME=N,...",
                     help="what each unit asks of a Dask worker, e.g. GPU=1 (default: $PRUNING_RESOURCES; "
                          "make: DASK_RESOURCES=...)")
    run.add_argument("--jobs", default="auto", metavar="N",
                     help="chapters executed at once (default auto: 2 on a 2-core machine when every "
                          "chapter's units are cached, so the run only loads and draws; else 1; make: JOBS=)")
    run.add_argument("--dry-run", action="store_true", help="check and print the plan; run nothing")
    run.add_argument("--root", default=".", help=argparse.SUPPRESS)
    b = sub.add_parser("build", help="build the HTML book into _build/html (warnings are errors)")
    b.add_argument("--no-strict", action="store_true", help="do not turn warnings into errors")
    b.add_argument("--stage", default=None, metavar="DIR",
                   help="build the notebooks of `run --stage DIR` into DIR/_build/html")
    b.add_argument("--root", default=".", help=argparse.SUPPRESS)
    ls = sub.add_parser("list", help="list the chapters and the parameters each declares")
    ls.add_argument("--root", default=".", help=argparse.SUPPRESS)
    from .units import add_arguments  # a chapter's units outside its notebook (torchrun): pruning_lib.units
    add_arguments(sub.add_parser("units", help="list a chapter's units, or run one (or all missing) "
                                               "outside the notebook, also under torchrun"))
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "units":
        from .units import cli
        return cli(args, list(sys.argv[2:] if argv is None else argv[1:]))
    try:
        if args.command == "list":
            for nb in chapter_notebooks(args.root) + [verdicts_notebook(args.root)]:
                if nb.exists():
                    params = declared_parameters(nb)
                    print(f"{nb.stem}: " + ", ".join(
                        f"{k}={v.get('default')}" for k, v in params.items()))
            return 0
        if args.command == "build":
            return build(args.root, strict=not args.no_strict, stage=args.stage)
        check_executor(args.executor, args.resources)
        params = [(name, parse_value(value)) for name, value in args.parameter]
        jobs = plan(args.root, args.profile, args.chapters, params,
                    include_verdicts=not args.no_verdicts,
                    out_dir=None if args.stage is None else Path(args.stage) / CHAPTERS_OUT)
    except BookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for job in jobs:
            print(f"{job.source} -> {job.output} {json.dumps(job.parameters)}")
        return 0
    if args.jobs != "auto" and not str(args.jobs).isdigit():
        print(f"error: --jobs {args.jobs!r}: give a number or 'auto'", file=sys.stderr)
        return 2
    parallel = parallel_jobs(jobs, args.root, args.jobs)
    result = execute(jobs, args.root, args.executor, args.resources, parallel=parallel)
    total = sum(result["seconds"].values())
    side = f", {parallel} at a time: {result['wall']:.0f} s wall" if parallel > 1 else ""
    print(f"ran {len(jobs)} notebook(s) in {total:.0f} s (profile {args.profile}{side})", file=sys.stderr)
    if result["failed"]:
        where = build_base(jobs[0].output) / FAILED
        print("error: failed: " + ", ".join(result["failed"]) + f" (not published; the executed "
              f"notebooks with the traceback are in {where}/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
