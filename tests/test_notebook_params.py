"""Each chapter notebook's parameters cell (the code cell tagged ``parameters``, which Papermill
overrides) lists exactly the fields of the chapter's Config, the class the notebook builds with
``Config.from_namespace(globals())``: a field missing from the cell cannot be set with ``-p``, and a name
in the cell that is not a field is refused when the chapter starts. The book runner's own parameters
(``profile``, ``budget`` from ``make BUDGET=``, ``results_dir`` passed on to the verdicts page) are
declared by every chapter, as fields of its Config or beside them."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import nbformat
import pytest

from pruning_lib import book

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = book.chapter_notebooks(ROOT)
# what the runner gives every chapter (profile), make's BUDGET= (budget), and what it passes on to the
# verdicts notebook (results_dir), with the values the runner assumes when they are not given: every
# chapter declares them, as Config fields or (results_dir, for a chapter that passes it to its
# run_experiment) as a parameter of the book beside them
RUNNER = {"profile": book.DEFAULT_PROFILE, "budget": 1.0, "results_dir": "results"}


def parameters_cell(path: Path) -> list[tuple[str, object]]:
    """``[(name, value)]`` assigned in the notebook's cell tagged ``parameters``, in order."""
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged `parameters` (needs exactly one)"
    out = []
    for node in ast.parse(cells[0].source).body:
        simple = (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name))
        assert simple, f"{path.name}: the parameters cell holds `name = value` lines only, not {ast.unparse(node)!r}"
        out.append((node.targets[0].id, ast.literal_eval(node.value)))
    return out


def test_there_are_chapters():
    assert CHAPTERS, "no notebooks/NN_name.ipynb found"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_cell_lists_exactly_the_config_fields(notebook):
    cls = book.chapter_config(notebook)
    assert cls is not None, f"{notebook.name} builds no Config from pruning_lib (Config.from_namespace)"
    cell = parameters_cell(notebook)
    names = [n for n, _ in cell]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"{notebook.name}: assigned twice in the parameters cell: {dupes}"
    fields = cls.parameter_names()
    missing = [f for f in fields if f not in names]
    extra = [n for n in names if n not in fields and n not in RUNNER]
    assert not missing and not extra, (
        f"{notebook.name} vs {cls.__module__}.{cls.__name__}: fields missing from the parameters cell: "
        f"{missing}; names in the cell that are not fields: {extra}")
    # Papermill sees the same names (what the book runner checks -p names against)
    assert list(book.declared_parameters(notebook)) == names


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_cell_leaves_values_to_the_profile(notebook):
    """Every chapter parameter is None (the profile's value) except the runner's own, which hold the
    Config's defaults: a value written in the cell would silently override every profile."""
    cls = book.chapter_config(notebook)
    assert cls is not None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    cell = dict(parameters_cell(notebook))
    assert next(iter(cell)) == "profile", f"{notebook.name}: `profile` must come first"
    for name, value in RUNNER.items():
        assert name in cell, f"{notebook.name} does not declare {name!r}, which the book runner passes"
        assert cell[name] == value, f"{notebook.name}: {name} = {cell[name]!r}; the runner assumes {value!r}"
        if name in defaults:
            assert defaults[name] == value, \
                f"{cls.__name__}.{name} defaults to {defaults[name]!r}, not {value!r}"
    for name, value in cell.items():
        assert value is None or name in RUNNER, (
            f"{notebook.name}: {name} = {value!r} in the parameters cell; give None (the profile's value)")
    # the cell's values build the chapter's default config, as the notebook itself does
    cls.from_namespace(cell, extra=[n for n in RUNNER if n not in defaults])


def test_verdicts_notebook_takes_what_the_runner_passes_on():
    verdicts = book.verdicts_notebook(ROOT)
    if not verdicts.exists():
        pytest.skip("no verdicts notebook")
    declared = book.declared_parameters(verdicts)
    assert set(book.VERDICTS_PASSTHROUGH) <= set(declared)
