"""The book's own Sphinx extension (listed in ``_config.yml``): how a chapter page opens and closes.

As each executed chapter notebook (``book/chapters/NN_name.ipynb``) is read, before myst-nb parses it:

- Papermill's injected-parameters cell, and the notebook's own ``parameters`` cell, are tagged
  ``remove-cell``: the page shows the run's settings as a table instead (``pruning_lib.report.open_chapter``);
- a summary box is put under the chapter's title (``pruning_lib.report.summary_markdown``): the paper in
  one sentence, its claims with coloured verdicts (from the chapter's claims table of the profile and
  budget the notebook ran with), what ran, and the cost;
- an "About this run" section closes the page (``pruning_lib.report.provenance_markdown``): Papermill's
  start time, duration and parameters, the commit, versions and machine the run recorded.

It also writes the book's stylesheet (verdict chips, tables, figures: ``pruning_lib.report.CSS``) and
drops script tags that a page would load twice (sphinx-thebe adds its settings twice, a console error).
The executed notebooks themselves are not changed. The claims tables and run records
(``results/runs/<key>/<chapter>.json``, written by ``pruning_lib.book run``; used when present and
``ok``) are read from the notebook's ``results_dir`` parameter, relative to the directory the build runs
in (the repository root), or from ``$PRUNING_RESULTS_DIR``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import report

CHAPTERS = "book/chapters/"
VERDICTS = "99_verdicts"


def chapter_source(text: str, chapter: str, results_dir: str | Path | None = None) -> str:
    """The notebook JSON ``text`` of an executed chapter as the page should show it (see the module's
    docstring). Text that is not a notebook is returned unchanged."""
    try:
        nb = json.loads(text)
    except ValueError:
        return text
    if not isinstance(nb, dict) or "cells" not in nb:
        return text
    cells = nb["cells"]
    for cell in cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if ("injected-parameters" in tags or "parameters" in tags) and "remove-cell" not in tags:
            tags.append("remove-cell")
    if chapter != VERDICTS:
        params = report.executed_parameters(nb)
        profile = str(params.get("profile", "cpu"))
        try:
            budget = float(params.get("budget", 1.0) or 1.0)
        except (TypeError, ValueError):
            budget = 1.0
        where = Path(results_dir if results_dir is not None else params.get("results_dir", "results"))
        claims = report.claims_for(chapter, where, profile, budget)
        record = report.run_record(chapter, where, profile, budget)
        _insert_summary(cells, report.summary_markdown(nb, claims, record))
        cells.append(_markdown("pr-provenance", report.provenance_markdown(nb, record)))
    return json.dumps(nb)


def _markdown(cell_id: str, source: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": source}


def _insert_summary(cells: list, box: str) -> None:
    """Put the box right under the first ``# Title`` (splitting the title's cell), else first."""
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        text = report._text(cell.get("source"))
        lines = text.lstrip().splitlines()
        if lines and lines[0].startswith("# "):
            rest = "\n".join(lines[1:]).strip()
            cell["source"] = lines[0] + "\n"
            new = [_markdown("pr-summary", box)]
            if rest:
                new.append(_markdown("pr-lead", rest + "\n"))
            cells[i + 1:i + 1] = new
            return
    cells.insert(0, _markdown("pr-summary", box))


def _source_read(app, docname: str, source: list[str]) -> None:
    if not docname.startswith(CHAPTERS):
        return
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".ipynb":
        return
    source[0] = chapter_source(source[0], path.stem, os.environ.get("PRUNING_RESULTS_DIR"))


def _write_css(app) -> None:
    static = Path(app.outdir).parent / "_pruning_static"
    static.mkdir(parents=True, exist_ok=True)
    (static / "pruning.css").write_text(report.CSS)
    app.config.html_static_path = list(app.config.html_static_path) + [str(static)]


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    files = context.get("script_files")
    if not files:
        return
    seen, kept = set(), []
    for js in files:
        attributes = getattr(js, "attributes", {}) or {}
        name = getattr(js, "filename", js) or ""  # an inline script's name is None or ""
        key = (str(name), tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    files[:] = kept


def setup(app):
    app.connect("source-read", _source_read)
    app.connect("builder-inited", _write_css)
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    app.add_css_file("pruning.css")
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
