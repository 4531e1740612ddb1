"""pruning_lib.book: request checking (before anything runs) and the table of contents used to build."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from pruning_lib import book
from pruning_lib.book import BookError

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, parameters: str | None, body: str = "") -> Path:
    cells = [new_markdown_cell(f"# {path.stem}")]
    if parameters is not None:
        cell = new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    if body:
        cells.append(new_code_cell(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), path)
    return path


@pytest.fixture
def repo(tmp_path):
    """A tiny book: two chapters and a verdicts notebook; running a chapter would leave a marker."""
    marker = tmp_path / "ran.txt"
    body = f"open({str(marker)!r}, 'w').write('ran')"
    _notebook(tmp_path / "notebooks" / "01_tiny.ipynb",
              'profile = "cpu"\nseeds = None\nresults_dir = "results"', body)
    _notebook(tmp_path / "notebooks" / "02_other.ipynb",
              'profile = "cpu"\nlam = None\nresults_dir = "results"', body)
    _notebook(tmp_path / "notebooks" / "99_verdicts.ipynb", 'profile = "cpu"\nresults_dir = "results"')
    return tmp_path


def _ran_nothing(root: Path) -> bool:
    return not (root / "ran.txt").exists() and not (root / "book" / "chapters").exists()


def test_unknown_parameter_is_named_with_the_valid_ones_and_nothing_runs(repo, capsys):
    status = book.main(["run", "--root", str(repo), "--chapters", "01", "-p", "sedes", "3"])
    err = capsys.readouterr().err
    assert status == 2
    assert "'sedes'" in err and "01_tiny" in err
    assert "profile, seeds, results_dir" in err
    assert _ran_nothing(repo)


def test_parameter_must_be_declared_by_every_selected_chapter(repo):
    with pytest.raises(BookError, match=r"unknown parameter 'lam' for 01_tiny"):
        book.plan(repo, "cpu", None, [("lam", 0.1)])
    jobs = book.plan(repo, "cpu", "02", [("lam", 0.1)])
    assert [j.name for j in jobs] == ["02_other", "99_verdicts"]
    assert jobs[0].parameters == {"profile": "cpu", "lam": 0.1}
    assert jobs[1].parameters == {"profile": "cpu"}


def test_unknown_profile_is_an_error_and_nothing_runs(repo, capsys):
    status = book.main(["run", "--root", str(repo), "--profile", "gpu"])
    err = capsys.readouterr().err
    assert status == 2
    assert "'gpu'" in err and "smoke, cpu, paper" in err
    assert _ran_nothing(repo)


def test_profile_is_not_a_dash_p_parameter(repo):
    with pytest.raises(BookError, match="--profile"):
        book.plan(repo, "cpu", None, [("profile", "paper")])


def test_unknown_chapter_lists_the_chapters_present(repo):
    with pytest.raises(BookError, match=r"unknown chapter\(s\): 07.*01_tiny, 02_other"):
        book.plan(repo, "cpu", "07")


def test_chapter_selection_by_name_number_or_short_name(repo):
    available = book.chapter_notebooks(repo)
    assert [p.stem for p in available] == ["01_tiny", "02_other"]
    assert [p.stem for p in book.select_chapters(available, "other,1")] == ["01_tiny", "02_other"]
    assert [p.stem for p in book.select_chapters(available, "02_other.ipynb")] == ["02_other"]
    assert book.select_chapters(available, "99_verdicts") == []  # it always runs anyway
    assert book.select_chapters(available, "") == available


def test_plan_runs_verdicts_last_and_passes_results_dir_to_it(repo):
    jobs = book.plan(repo, "smoke", None, [("results_dir", "/tmp/r")])
    assert [j.name for j in jobs] == ["01_tiny", "02_other", "99_verdicts"]
    assert jobs[-1].parameters == {"profile": "smoke", "results_dir": "/tmp/r"}
    assert all(j.output.parent == repo / "book" / "chapters" for j in jobs)


def test_a_stage_keeps_the_run_out_of_book_chapters(repo, capsys):
    stage = repo / "_build" / "smoke"
    jobs = book.plan(repo, "smoke", None, out_dir=stage / "book" / "chapters")
    assert all(j.output.parent == stage / "book" / "chapters" for j in jobs)
    assert book.main(["run", "--root", str(repo), "--stage", str(stage), "--dry-run"]) == 0
    assert str(stage / "book" / "chapters" / "01_tiny.ipynb") in capsys.readouterr().out


def test_a_staged_build_copies_the_pages_and_never_touches_the_book(repo):
    _toc(repo, ["01_tiny", "02_other"])
    (repo / "_config.yml").write_text("title: tiny\n")
    (repo / "book" / "intro.md").write_text("# Tiny\n")
    stage = repo / "_build" / "smoke"
    with pytest.raises(BookError, match="run --stage"):
        book.build(repo, stage=stage)  # nothing executed there yet
    for name in ("01_tiny", "99_verdicts"):
        _notebook(stage / "book" / "chapters" / f"{name}.ipynb", 'profile = "smoke"')
    book.stage_sources(repo, stage)
    assert (stage / "_config.yml").read_text() == "title: tiny\n"
    assert (stage / "book" / "intro.md").exists()
    path, dropped = book.toc_for_build(stage)
    assert dropped == ["book/chapters/02_other"] and path.is_relative_to(stage)
    assert not (repo / "book" / "chapters").exists() and not (repo / "book" / "_generated").exists()


def test_a_chapter_without_a_parameters_cell_is_an_error(repo):
    _notebook(repo / "notebooks" / "03_bare.ipynb", None, "x = 1")
    with pytest.raises(BookError, match="03_bare.ipynb declares no `profile` parameter"):
        book.plan(repo, "cpu", "03")


def test_dry_run_prints_the_plan_and_runs_nothing(repo, capsys):
    assert book.main(["run", "--root", str(repo), "--dry-run", "-p", "results_dir", "out"]) == 0
    out = capsys.readouterr().out
    assert "01_tiny.ipynb" in out and '"results_dir": "out"' in out
    assert _ran_nothing(repo)


@pytest.mark.parametrize("text,value", [
    ("5", 5), ("0.5", 0.5), ("1e-3", 1e-3), ("True", True), ("False", False), ("None", None),
    ("lenet", "lenet"), ("[0, 1, 2]", [0, 1, 2]), ("(0.5, 0.9)", [0.5, 0.9]), ("{a: 1}", {"a": 1}),
])
def test_parse_value_reads_values_as_papermill_does(text, value):
    assert book.parse_value(text) == value


def test_profiles_are_the_librarys():
    from pruning_lib.runs import PROFILES

    assert tuple(PROFILES) == book.PROFILES


# ---- the table of contents ------------------------------------------------------------------------

def _toc(root: Path, chapters: list[str]) -> None:
    toc = {"format": "jb-book", "root": "book/intro",
           "parts": [{"caption": "Chapters", "chapters": [{"file": f"book/chapters/{c}"} for c in chapters]},
                     {"caption": "Results", "chapters": [{"file": "book/chapters/99_verdicts"}]}]}
    (root / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (root / "book").mkdir(exist_ok=True)
    (root / "book" / "intro.md").write_text("# Intro\n")


def test_toc_leaves_out_chapters_not_executed(repo):
    _toc(repo, ["01_tiny", "02_other"])
    for name in ("01_tiny", "99_verdicts"):
        _notebook(repo / "book" / "chapters" / f"{name}.ipynb", 'profile = "smoke"')
    path, dropped = book.toc_for_build(repo)
    assert dropped == ["book/chapters/02_other"]
    toc = yaml.safe_load(path.read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert files == ["book/chapters/01_tiny", "book/chapters/99_verdicts"]
    assert path == repo / "book" / "_generated" / "_toc.yml"


def test_toc_is_used_as_is_when_complete(repo):
    _toc(repo, ["01_tiny", "02_other"])
    for name in ("01_tiny", "02_other", "99_verdicts"):
        _notebook(repo / "book" / "chapters" / f"{name}.ipynb", 'profile = "smoke"')
    assert book.toc_for_build(repo) == (repo / "_toc.yml", [])


def test_a_chapter_missing_from_the_toc_is_an_error(repo):
    _toc(repo, ["01_tiny"])
    with pytest.raises(BookError, match="not listed in _toc.yml.*02_other.ipynb"):
        book.toc_for_build(repo)


def test_build_needs_the_executed_verdicts(repo):
    _toc(repo, ["01_tiny", "02_other"])
    with pytest.raises(BookError, match="99_verdicts.ipynb has not been executed"):
        book.toc_for_build(repo)


def test_the_repository_toc_lists_every_notebook():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {Path(f).name for _, f in book._toc_files([toc])}
    for nb in book.chapter_notebooks(ROOT) + [book.verdicts_notebook(ROOT)]:
        assert nb.stem in listed, f"{nb.name} is not in _toc.yml"
    assert (ROOT / f"{toc['root']}.md").exists()


def test_the_repository_chapters_declare_profile_first():
    for nb in book.chapter_notebooks(ROOT) + [book.verdicts_notebook(ROOT)]:
        cells = [c for c in nbformat.read(nb, as_version=4).cells
                 if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{nb.name}: needs exactly one cell tagged `parameters`"
        assert cells[0].source.splitlines()[0] == 'profile = "cpu"', nb.name
        assert all(not c.get("outputs") for c in nbformat.read(nb, as_version=4).cells
                   if c.cell_type == "code"), f"{nb.name}: commit source notebooks without outputs"


def test_the_repository_chapters_use_no_api_cross_references():
    # the book has no API pages, so a {func}/{mod}/{py:...} role is an unresolved reference, which the
    # strict build (-W -n) turns into an error; write `pruning_lib.x.f` as code instead
    role = re.compile(r"\{(py:\w+|func|mod|class|meth|attr|obj)\}`")
    for nb in book.chapter_notebooks(ROOT) + [book.verdicts_notebook(ROOT)]:
        for cell in nbformat.read(nb, as_version=4).cells:
            if cell.cell_type == "markdown":
                assert not role.search(cell.source), f"{nb.name}: {role.search(cell.source).group(0)}"


def test_figures_get_an_image_even_when_mplbackend_is_agg(tmp_path, monkeypatch):
    # a kernel started with MPLBACKEND=Agg displays figures as "<Figure size ...>" text: the runner
    # must start kernels with the inline backend, and flag a figure that still has no image
    source = _notebook(tmp_path / "notebooks" / "01_fig.ipynb", 'profile = "cpu"',
                       "from pruning_lib.plotting import figure\nfig, ax = figure()\nax.plot([0, 1])\nfig")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "book" / "chapters" / "01_fig.ipynb"
    result = book.execute([book.Job("01_fig", source, out, {"profile": "smoke"})], tmp_path)
    assert result["failed"] == [] and book.text_only_figures(out) == []
    cells = nbformat.read(out, as_version=4).cells
    images = [o for c in cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # shown once: plotting.figure detaches it from pyplot's end-of-cell flush
    assert os.environ["MPLBACKEND"] == "Agg"  # the caller's setting is restored

    cells[-1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "<Figure size 700x420>"})]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), out)
    assert book.text_only_figures(out) == [len(cells) - 1]
