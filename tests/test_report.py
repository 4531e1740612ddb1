"""pruning_lib.report and pruning_lib.sphinx_ext: how the book shows a run (settings, summary box,
provenance, verdict chips, tables, figure data), and progress bars that stay off the page."""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from pruning_lib import report, sphinx_ext
from pruning_lib.runs import RunConfig, param, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def claims_frame(**extra) -> pd.DataFrame:
    rows = [
        {"chapter": "01_x", "claim": "Sparse nets match dense ones", "source": "Paper 2020, Table 1",
         "measure": "test error", "rule": "mean ≤ 2 %", "paper": "1.7 %", "ours": "1.9 % (n=3)", "n": "3",
         "interval": "[1.6 %, 2.2 %]", "verdict": "held", "why": "", "profile": "cpu", "budget": "1"},
        {"chapter": "01_x", "claim": "Pruning makes training faster", "source": "Paper 2020, Sec. 4",
         "measure": "s/epoch", "rule": "ratio < 1", "paper": "—", "ours": "—", "n": "0", "interval": "",
         "verdict": "not measured", "why": "cpu profile", "profile": "cpu", "budget": "1"},
        {"chapter": "02_y", "claim": "Gates converge to 0 or 1", "source": "Other 2022",
         "measure": "share undecided", "rule": "≤ 1 %", "paper": "0 %", "ours": "4 %", "n": "3",
         "interval": "", "verdict": "did not hold", "why": "CI above", "profile": "cpu", "budget": "1"},
    ]
    return pd.DataFrame(rows).assign(**extra)


# ---- verdicts ----------------------------------------------------------------------------------------

def test_chip_names_and_colours_every_verdict():
    for verdict in report.ORDER:
        html = report.chip(verdict)
        assert f'data-verdict="{verdict}"' in html and f">{verdict}</span>" in html
        assert f'.pr-chip[data-verdict="{verdict}"]' in report.CSS
    assert "&lt;b&gt;" in report.chip("<b>")


def test_counts_cover_every_verdict_in_order():
    n = report.counts(claims_frame())
    assert list(n)[:5] == list(report.ORDER)
    assert n["held"] == 1 and n["did not hold"] == 1 and n["not measured"] == 1 and n["not judged"] == 0
    assert report.counts_sentence(claims_frame()) == "1 held, 1 did not hold, 1 not measured"
    assert report.counts_sentence(claims_frame().iloc[:0]) == "no claims"


def test_verdicts_markdown_one_line_per_claim_with_detail_one_click_away():
    md = report.verdicts_markdown(claims_frame(), titles={"01_x": "1 X"})
    assert md.count(":::{dropdown}") == 3
    assert '**1 X**: 1 held, 1 not measured.' in md
    first = md[md.index(":::{dropdown}"):]
    assert first.startswith(':::{dropdown} <span class="pr-chip" data-verdict="held">held</span> Sparse')
    for detail in ("**rule**: mean ≤ 2 %", "**n**: 3", "**interval**: [1.6 %, 2.2 %]",
                   "**source**: Paper 2020, Table 1", "**ours**: 1.9 % (n=3)"):
        assert detail in md
    # columns may be missing (an older claims table): still one line per claim
    slim = claims_frame()[["chapter", "claim", "verdict"]]
    assert report.verdicts_markdown(slim).count(":::{dropdown}") == 3


def test_verdict_matrix_draws_one_cell_per_claim():
    from matplotlib.patches import Rectangle

    fig = report.verdict_matrix(claims_frame(), {"01_x": "1 X", "02_y": "2 Y"})
    ax = fig.axes[0]
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1 X", "2 Y"]


def test_gather_verdicts_tolerates_missing_columns_and_broken_tables(tmp_path):
    folder = tmp_path / "claims" / "cpu"
    folder.mkdir(parents=True)
    claims_frame().query("chapter == '01_x'")[["chapter", "claim", "verdict"]].to_csv(
        folder / "01_x.csv", index=False)
    (folder / "02_y.csv").write_text("just,a\n")
    table, unreadable = report.gather_verdicts(tmp_path, "cpu")
    assert list(table.columns[:len(report.CLAIM_COLUMNS)]) == report.CLAIM_COLUMNS
    assert len(table) == 2 and set(table["why"]) == {""}
    assert len(unreadable) == 1 and "02_y" in unreadable[0]


# ---- settings and the facts of a run ----------------------------------------------------------------

@dataclass(frozen=True)
class ToyConfig(RunConfig):
    models: tuple = param(("a",))
    seeds: tuple = param((0,))
    epochs: int = param(1)
    lr: float = param(0.1)
    results_dir: str = param("results")

    PROFILES = {"smoke": {"epochs": 1}, "cpu": {"models": ("a", "b"), "seeds": (0, 1, 2), "epochs": 5}}
    BUDGETED = ("epochs",)


def test_settings_say_which_values_were_set_for_this_run():
    cfg = ToyConfig.from_profile("cpu", lr=0.5)
    frame = report.settings_frame(cfg).set_index("setting")
    assert "results_dir" not in frame.index
    assert frame.loc["models", "value"] == "a, b" and frame.loc["models", "from"] == "profile cpu"
    assert frame.loc["seeds", "value"] == "0, 1, 2"
    assert frame.loc["lr", "from"] == "set for this run"
    assert frame.loc["budget", "from"] == "default"
    assert frame.loc["profile", "value"] == "cpu"
    assert report.settings_frame(ToyConfig.from_profile("cpu", budget=2.0)).set_index(
        "setting").loc["epochs", "from"] == "set for this run"


def test_run_facts_name_commit_versions_and_machine():
    facts = report.run_facts(ROOT)
    assert re.fullmatch(r"[0-9a-f]{12}( \+changes)?|unknown.*", facts["commit"])
    assert set(facts["versions"]) >= {"torch", "pruning_lib", "python"}
    assert facts["machine"]["cores"] >= 1 and facts["machine"]["torch threads"] >= 1


# ---- tables and figures ------------------------------------------------------------------------------

def test_tables_have_no_index_full_text_and_fixed_decimals():
    long = "published: reported for SBP (Neklyudov et al. 2017) on full MNIST, Table 2, LeNet-300-100"
    html = report.table_html(pd.DataFrame({"model": [long, "b"], "error": [0.012345, 0.1],
                                           "params": [266200, 1000]}))
    assert long in html and "…" not in html
    assert "row_heading" not in html  # the 0, 1, 2 index is not a column
    assert "0.012" in html and "0.100" in html and "0.012345" not in html
    assert 'class="pr-table"' in html and "pr-num" in html
    indexed = report.table_html(pd.DataFrame({"x": [1.5]}, index=["named"]))
    assert "named" in indexed


def toy_figure():
    from pruning_lib import plotting

    fig, (a, b) = plotting.figure(ncols=2)
    a.plot([1, 2, 3], [0.1, 0.2, 0.3], label="dense")
    a.scatter([1, 2], [5, 6], label="seeds")
    a.set_title("accuracy")
    a.set_xlabel("epoch")
    b.bar(["x", "y"], [3, 4], label="widths")
    return fig


def test_figure_data_reads_lines_points_and_bars():
    data = report.figure_data(toy_figure())
    assert list(data.columns) == ["panel", "series", "kind", "x", "y", "x_label", "y_label"]
    assert data.groupby("kind").size().to_dict() == {"bar": 2, "line": 3, "points": 2}
    line = data[data["kind"] == "line"]
    assert set(line["series"]) == {"dense"} and list(line["y"]) == [0.1, 0.2, 0.3]
    assert set(line["panel"]) == {"accuracy"} and set(line["x_label"]) == {"epoch"}
    assert list(data[data["kind"] == "bar"]["y"]) == [3, 4]


def test_figure_html_embeds_the_image_and_a_csv_download():
    html = report.figure_html(toy_figure())
    assert '<img src="data:image/png;base64,' in html
    m = re.search(r'download="([^"]+)" href="data:text/csv;base64,([^"]+)"', html)
    assert m and m.group(1) == "accuracy.csv"
    csv = base64.b64decode(m.group(2)).decode()
    assert csv.splitlines()[0] == "panel,series,kind,x,y,x_label,y_label" and len(csv.splitlines()) == 8


def test_timing_noise_note_says_how_noisy_the_clock_was():
    times = pd.DataFrame({"seed": [0, 0, 0, 1, 1], "seconds": [1.0, 1.2, 4.0, 2.0, 3.0]})
    note = report.timing_noise_note(times, ["seed"])
    assert "up to 4.0× " in note and "median 2.8×" in note and "2 series" in note
    assert "unknown" in report.timing_noise_note(times.iloc[:1], ["seed"])


# ---- the summary box and provenance (at build time) --------------------------------------------------

def executed_notebook() -> dict:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["papermill"] = {"duration": 83.4, "start_time": "2026-12-01T14:50:50.275452+00:00",
                                "parameters": {"profile": "cpu"}, "version": "2.7.0",
                                "input_path": "notebooks/01_x.ipynb", "default_parameters": {}}
    params = nbformat.v4.new_code_cell('profile = "cpu"\nbudget = 1.0\nresults_dir = "results"',
                                       metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell('# Parameters\nprofile = "cpu"\n',
                                         metadata={"tags": ["injected-parameters"]})
    settings = nbformat.v4.new_code_cell("report.open_chapter(cfg)")
    settings.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "table"}, metadata={
        report.META_KEY: {"settings": {"profile": "cpu", "budget": "1", "models": "a, b", "seeds": "0, 1, 2"},
                          "set_for_this_run": ["seeds"],
                          "facts": {"commit": "0123456789ab", "versions": {"torch": "2.14.1"},
                                    "machine": {"cpu": "Toy CPU", "cores": 2, "torch threads": 2,
                                                "gpu": None}}}})]
    title = "# Toy chapter\n\nToy et al. (2020) prune toys. They say more.\n"
    nb.cells = [nbformat.v4.new_markdown_cell(title),
                params, injected, settings, nbformat.v4.new_markdown_cell("## Results")]
    return json.loads(nbformat.writes(nb))


def test_summary_box_gives_paper_claims_what_ran_and_cost():
    md = report.summary_markdown(executed_notebook(), claims_frame().query("chapter == '01_x'"))
    assert md.startswith(":::{admonition} This chapter's run\n:class: pr-summary")
    assert "**The paper.** Toy et al. (2020) prune toys." in md and "They say more" not in md
    assert '- <span class="pr-chip" data-verdict="held">held</span> Sparse nets match dense ones' in md
    assert "profile **cpu**" in md and "models **a, b**" in md and "seeds **0, 1, 2**" in md
    assert "set for this run: seeds" in md
    assert "1 min 23 s" in md and "2026-12-01 14:50 UTC" in md
    assert "no claims table" in report.summary_markdown(executed_notebook(), None)


def test_provenance_gives_when_how_and_on_what():
    md = report.provenance_markdown(executed_notebook(), {"git_commit": "fedcba987654", "status": "ok"})
    for text in ("## About this run", "2026-12-01 14:50 UTC", "1 min 23 s", "`profile = 'cpu'`",
                 "`0123456789ab`", "torch 2.14.1", "papermill 2.7.0", "Toy CPU", "2 cores"):
        assert text in md, text
    bare = {"cells": [], "metadata": {}}
    assert "not recorded" in report.provenance_markdown(bare, {"git_commit": "fedcba987654"})
    assert "`fedcba987654`" in report.provenance_markdown(bare, {"git_commit": "fedcba987654"})


def test_chapter_page_hides_parameters_and_opens_with_the_summary(tmp_path):
    folder = tmp_path / "claims" / "cpu"
    folder.mkdir(parents=True)
    claims_frame().query("chapter == '01_x'").to_csv(folder / "01_x.csv", index=False)
    page = json.loads(sphinx_ext.chapter_source(json.dumps(executed_notebook()), "01_x", tmp_path))
    cells = page["cells"]
    text = [report._text(c["source"]) for c in cells]
    assert text[0] == "# Toy chapter\n"
    assert cells[1]["id"] == "pr-summary" and "Sparse nets match dense ones" in text[1]
    assert text[2].startswith("Toy et al. (2020)")
    tagged = {report._text(c["source"]).splitlines()[0]: c["metadata"]["tags"] for c in cells
              if c["metadata"].get("tags")}
    assert "remove-cell" in tagged['profile = "cpu"'] and "remove-cell" in tagged["# Parameters"]
    assert cells[-1]["id"] == "pr-provenance" and "About this run" in text[-1]
    nbformat.validate(nbformat.reads(json.dumps(page), as_version=4))
    # the verdicts page gets no box; text that is not a notebook passes through
    verdicts = json.loads(sphinx_ext.chapter_source(json.dumps(executed_notebook()), "99_verdicts", tmp_path))
    assert len(verdicts["cells"]) == 5
    assert sphinx_ext.chapter_source("not json", "01_x") == "not json"


def test_a_failed_run_record_is_not_this_page_s_run(tmp_path):
    folder = tmp_path / "runs" / "cpu"
    folder.mkdir(parents=True)
    (folder / "01_x.json").write_text(json.dumps({"status": "failed", "seconds": 3.0}))
    (folder / "02_y.json").write_text(json.dumps({"status": "ok", "seconds": 30.0}))
    assert report.run_record("01_x", tmp_path, "cpu") == {}
    assert report.run_record("02_y", tmp_path, "cpu")["seconds"] == 30.0
    assert report.run_seconds(tmp_path, "cpu") == {"02_y": 30.0}


# ---- the book's configuration and notebooks ----------------------------------------------------------

def test_math_ships_with_the_book():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    extensions = config["sphinx"]["extra_extensions"]
    assert "sphinx-mathjax-offline" in extensions and "pruning_lib.sphinx_ext" in extensions
    assert "mathjax_path" not in config["sphinx"].get("config", {})  # the extension's local copy


def test_chapter_notebooks_hide_raw_parameters_and_show_settings():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path.name
        assert "remove-cell" in code[0].metadata["tags"], f"{path.name}: parameters cell shown"
        if path.stem != "99_verdicts":
            assert any("report.open_chapter(cfg)" in c.source for c in code), path.name


# ---- progress bars stay in the terminal ---------------------------------------------------------------

def test_progress_bar_outside_a_kernel_is_plain_tqdm():
    from tqdm import tqdm

    bar = progress_bar(range(3), desc="x", disable=True)
    assert type(bar) is tqdm and list(bar) == [0, 1, 2]


def test_progress_bars_leave_one_line_on_the_page(tmp_path, monkeypatch):
    """A chapter's kernel draws bars on the terminal; its notebook gets one plain line per bar."""
    import papermill

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        "from pruning_lib.runs import progress_bar\n"
        "for _ in progress_bar(range(20), desc='units', mininterval=0):\n    pass\n"
        "inner = progress_bar(total=5, desc='inner', leave=False, mininterval=0)\n"
        "inner.update(5); inner.close()\n"
        "quiet = progress_bar(range(3), desc='quiet', progress=False)\nlist(quiet)")]
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(str(source), str(out), kernel_name="python3", cwd=str(ROOT),
                               progress_bar=False, log_output=False)
    outputs = nbformat.read(out, as_version=4).cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "%|" not in text and "inner" not in text and "quiet" not in text
    assert re.fullmatch(r"units: 20 of 20 done in 00:0\d\n", text), text


def test_verdicts_count_only_chapters_whose_last_run_succeeded(tmp_path):
    import json

    from pruning_lib import claims

    c = claims.Claim("y holds", "P", "m", claims.AtLeast(limit=0.0))
    for ch in ("01_a", "02_b", "03_c"):
        claims.ledger(ch, [(c, [1.0, 1.1, 0.9])], "cpu", tmp_path)
    runs = tmp_path / "runs" / "cpu"
    runs.mkdir(parents=True)
    (runs / "01_a.json").write_text(json.dumps({"status": "ok", "start": "2026-12-01T10:00:00+00:00",
                                                "seconds": 61.0, "parameters": {"profile": "cpu",
                                                                               "seeds": [0, 1, 2]}}))
    (runs / "02_b.json").write_text(json.dumps({"status": "failed", "seconds": 3.0, "parameters": {}}))
    table, _ = report.gather_verdicts(tmp_path, "cpu")
    kept, last = report.last_good_runs(table, tmp_path, "cpu")
    assert sorted(kept["chapter"]) == ["01_a", "03_c"]  # 03_c has no record: counted, and said so
    row = last.set_index("chapter")
    assert row.loc["02_b", "counted"].startswith("no") and row.loc["03_c", "last run"] == "no run record"
    assert "seeds = [0, 1, 2]" in row.loc["01_a", "parameters given"]


def test_budget_stability_marks_changed_verdicts(tmp_path):
    from pruning_lib import claims

    c = claims.Claim("y holds", "P", "m", claims.AtLeast(limit=0.0))
    d = claims.Claim("z holds", "P", "m", claims.AtLeast(limit=0.0))
    claims.ledger("ch", [(c, [1.0, 1.1, 0.9]), (d, [1.0, 1.1, 0.9])], "cpu", tmp_path)
    assert report.budget_stability(tmp_path, "cpu") is None
    claims.ledger("ch", [(c, [-1.0, -1.1, -0.9]), (d, [1.0, 1.1, 0.9])], "cpu", tmp_path, budget=2)
    s = report.budget_stability(tmp_path, "cpu").set_index("claim")
    assert s.loc["y holds", "same verdict"].startswith("⚠") and s.loc["z holds", "same verdict"] == "yes"
    assert s.loc["y holds", "verdict at budget 2"] == claims.NOT_HELD
