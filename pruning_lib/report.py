"""How a chapter reads: its settings, the summary box and provenance of its run, verdict chips, tables
and the data behind each figure. Presentation only; nothing here computes a result.

In a chapter notebook, one call after the config is built::

    report.open_chapter(cfg)

sets how the page shows tables (no pandas index, full cell text, numbers in a fixed format) and figures
(each with a link that downloads its numbers as CSV, from :func:`figure_data`), and shows the run's
settings as a short table (:func:`settings_frame`: profile, models, seeds, epochs..., and which values
were set for this run). It also records, in that output's metadata (``pruning_lib/run``), the settings
and the facts of the run (:func:`run_facts`: git commit, package versions, machine), which the book's
build reads back (``pruning_lib.sphinx_ext``) to open the chapter with a summary box
(:func:`summary_markdown`: the paper, the claims with coloured verdicts, what ran, the cost) and close
it with the run's provenance (:func:`provenance_markdown`, with the start time and duration Papermill
recorded).

The verdicts page uses :func:`verdict_matrix` (chapters x claims, coloured) and
:func:`verdicts_markdown` (one line per claim, the detail one click away).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .claims import COLUMNS as CLAIM_COLUMNS  # the ledger's columns: one list

META_KEY = "pruning_lib/run"  # the key of the settings output's metadata that the build reads
ORDER = ("held", "did not hold", "inconclusive", "not measured", "not judged")
# (text, background) per verdict; anything else is drawn like "not judged"
COLOURS = {
    "held": ("#0f5323", "#c9ecd2"),
    "did not hold": ("#7d1414", "#f7d1d1"),
    "inconclusive": ("#5c4300", "#f6e7b0"),
    "not measured": ("#3b4450", "#e2e6eb"),
    "not judged": ("#3b4450", "#f1f3f5"),
}
# config fields that say where things are, not what ran
HIDDEN_SETTINGS = ("results_dir", "progress", "data_root")

CSS = """
.pr-chip { display: inline-block; white-space: nowrap; padding: 0 .45em; margin: 0 .15em .1em 0;
  border-radius: .8em; font-size: .82em; font-weight: 600; line-height: 1.5; vertical-align: baseline; }
%(chips)s
.pr-summary p, .pr-summary ul { margin-bottom: .35em; }
.pr-summary ul { padding-left: 1.1em; }
details.pr-claim-line { margin: 0 0 .3em 0; box-shadow: none; }
details.pr-claim-line > summary { padding-top: .3em !important; padding-bottom: .3em !important;
  font-weight: 400 !important; }
table.pr-table { width: auto; max-width: 100%%; }
table.pr-table td, table.pr-table th { white-space: normal; word-break: normal; vertical-align: top;
  padding: .2em .6em; }
table.pr-table td.pr-num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pr-figure { margin: 0 0 .5em 0; }
.pr-figure img { max-width: 100%%; height: auto; }
.pr-figure figcaption { font-size: .82em; }
.pr-verdict-col { white-space: nowrap; }
""" % {"chips": "\n".join(
    f'.pr-chip[data-verdict="{v}"] {{ color: {fg}; background: {bg}; }}' for v, (fg, bg) in COLOURS.items())}


# --------------------------------------------------------------------------------------------------
# verdicts


def chip(verdict: str, title: str | None = None) -> str:
    """A coloured verdict label (inline HTML; ``data-verdict`` carries the verdict)."""
    v = str(verdict).strip() or "not judged"
    tip = f' title="{_attr(title)}"' if title else ""
    return f'<span class="pr-chip" data-verdict="{_attr(v)}"{tip}>{_html(v)}</span>'


def counts(table: pd.DataFrame) -> dict[str, int]:
    """How many claims got each verdict (every verdict of :data:`ORDER`, then any other)."""
    found = table["verdict"].astype(str).value_counts() if "verdict" in table and len(table) else {}
    out = {v: int(found.get(v, 0)) for v in ORDER}
    out.update({str(v): int(n) for v, n in dict(found).items() if v not in out})
    return out


def counts_sentence(table: pd.DataFrame) -> str:
    parts = [f"{n} {v}" for v, n in counts(table).items() if n]
    return ", ".join(parts) if parts else "no claims"


def _col(row: Mapping[str, Any], name: str) -> str:
    v = row.get(name, "")
    return "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()


def _detail_rows(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, label in (("paper", "paper"), ("ours", "ours"), ("rule", "rule"), ("n", "n"),
                        ("interval", "interval"), ("why", "why"), ("measure", "measured as"),
                        ("source", "source")):
        value = _col(row, name)
        if value and value not in ("—", "nan"):
            rows.append((label, value))
    return rows


def verdicts_markdown(table: pd.DataFrame, titles: Mapping[str, str] | None = None,
                      links: Mapping[str, str] | None = None) -> str:
    """The verdicts of ``table`` as MyST markdown: per chapter a line with its counts, then one line per
    claim, its verdict as a coloured chip, with the detail (paper, ours, rule, n, interval, source) in a
    dropdown one click away. ``titles`` and ``links`` map a chapter key to its title and page."""
    titles, links = titles or {}, links or {}
    if not len(table):
        return "No claims table was found for this profile."
    out = []
    for chapter, rows in table.groupby("chapter", sort=True):
        name = titles.get(chapter, chapter)
        head = f"[{name}]({links[chapter]})" if chapter in links else name
        out.append(f"**{head}**: {counts_sentence(rows)}.\n")
        for _, row in rows.iterrows():
            detail = "\n".join(f"- **{k}**: {_md(v)}" for k, v in _detail_rows(row))
            out.append(f":::{{dropdown}} {chip(_col(row, 'verdict'))} {_md(_col(row, 'claim'))}\n"
                       f":class-container: pr-claim-line\n\n{detail or 'No detail recorded.'}\n:::\n")
    return "\n".join(out)


def verdict_matrix(table: pd.DataFrame, titles: Mapping[str, str] | None = None):
    """One figure of the book's verdicts: a row per chapter, a coloured cell per claim (in the order
    the chapter lists them), with the legend and counts."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch, Rectangle

    from . import plotting

    titles = titles or {}
    chapters = sorted(table["chapter"].astype(str).unique()) if len(table) else []
    widest = max([int((table["chapter"] == c).sum()) for c in chapters] or [1])
    fig, ax = plotting.figure(width=7.0, height=1.3 + 0.38 * max(len(chapters), 1))
    for i, c in enumerate(chapters):
        for j, (_, row) in enumerate(table[table["chapter"] == c].iterrows()):
            v = _col(row, "verdict")
            ax.add_patch(Rectangle((j + 0.06, i + 0.1), 0.88, 0.8,
                                   facecolor=to_rgb(COLOURS.get(v, COLOURS["not judged"])[1]),
                                   edgecolor=COLOURS.get(v, COLOURS["not judged"])[0], linewidth=0.8))
    ax.set_xlim(0, widest)
    ax.set_ylim(len(chapters) or 1, 0)
    ax.set_yticks([i + 0.5 for i in range(len(chapters))],
                  [_short(titles.get(c, c), 30) for c in chapters])
    ax.set_xticks([j + 0.5 for j in range(widest)], [str(j + 1) for j in range(widest)])
    ax.set_xlabel("claim (in the chapter's order)")
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.grid(False)
    n = counts(table)
    fig.legend(handles=[Patch(facecolor=COLOURS[v][1], edgecolor=COLOURS[v][0], label=f"{v} ({n[v]})")
                        for v in ORDER if n.get(v)],
               loc="outside lower center", ncols=5, frameon=False)
    ax.set_title(f"{len(table)} claims: {counts_sentence(table)}", loc="left")
    return fig




def gather_verdicts(results_dir: str | Path, profile: str, budget: float = 1.0
                    ) -> tuple[pd.DataFrame, list[str]]:
    """Every chapter's claims table of ``profile`` at ``budget`` as text (:func:`pruning_lib.claims.gather`),
    and the tables that could not be read (reported on the page, not fatal)."""
    from .claims import gather

    unreadable: list[str] = []
    return gather(results_dir, profile, budget, text=True, unreadable=unreadable), unreadable


def last_good_runs(table: pd.DataFrame, results_dir: str | Path, profile: str, budget: float = 1.0
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the claims of chapters whose last run succeeded: a chapter whose run record (written by
    ``pruning_lib.book run``) says anything but ``ok`` is dropped, since its claims table is the previous
    run's. Returns the kept claims and a table of each chapter's last run (status, start, duration,
    parameters given), for the verdicts page."""
    from .book import read_run_records

    records = read_run_records(results_dir, profile, budget)
    bad = {c for c, r in records.items() if r.get("status") != "ok"}
    kept = table[~table["chapter"].isin(bad)] if len(table) else table
    rows = []
    for chapter in sorted(set(records) | set(table["chapter"] if len(table) else [])):
        r = records.get(chapter)
        if r is None:
            rows.append({"chapter": chapter, "last run": "no run record", "started (UTC)": "—",
                         "duration": "—", "parameters given": "—", "counted": "yes"})
            continue
        params = {k: v for k, v in (r.get("parameters") or {}).items() if k not in ("profile",)}
        rows.append({"chapter": chapter, "last run": str(r.get("status", "?")),
                     "started (UTC)": _when(r.get("start")), "duration": _duration(r.get("seconds")),
                     "parameters given": ", ".join(f"{k} = {v}" for k, v in params.items()) or "—",
                     "counted": "yes" if chapter not in bad else "no: its last run did not succeed"})
    return kept, pd.DataFrame(rows, columns=["chapter", "last run", "started (UTC)", "duration",
                                             "parameters given", "counted"])


def budget_stability(results_dir: str | Path, profile: str, budget: float = 1.0) -> pd.DataFrame | None:
    """Per claim of the chapters run at budget 1 and at another budget (2 when this page is at budget 1,
    else this page's budget): its verdict at each and whether they agree. None when no chapter has
    both."""
    from .claims import stability

    other = 2.0 if float(budget) == 1.0 else float(budget)
    s = stability(results_dir, profile, other)
    if not len(s):
        return None
    high = f"verdict at budget {other:g}"
    out = s.rename(columns={"verdict": "verdict at budget 1"})
    out["same verdict"] = ["yes" if ok else "⚠ no: sensitive to training length" for ok in out["stable"]]
    return out[["chapter", "claim", "verdict at budget 1", high, "same verdict"]]


def chapter_titles(root: str | Path = ".") -> dict[str, str]:
    """``{"01_dense_baselines": "1 Dense baselines", ...}``: each source notebook's number and title."""
    titles = {}
    for path in sorted((Path(root) / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        try:
            title, _ = notebook_title_and_lead(json.loads(path.read_text()))
        except (OSError, ValueError):
            title = ""
        titles[path.stem] = f"{int(path.stem[:2])} {title or path.stem[3:].replace('_', ' ')}"
    return titles


def csv_link(frame: pd.DataFrame, filename: str, text: str) -> str:
    """An HTML link that downloads ``frame`` as a CSV file embedded in the page (nothing is fetched)."""
    data = base64.b64encode(frame.to_csv(index=False).encode()).decode()
    return f'<a download="{_attr(filename)}" href="data:text/csv;base64,{data}">{_html(text)}</a>'


def run_seconds(results_dir: str | Path, profile: str, budget: float = 1.0) -> dict[str, float]:
    """The wall time of each chapter's last run, from the run records (``results/runs/<key>/*.json``,
    written by ``pruning_lib.book run``); ``{}`` when there are none."""
    from .book import read_run_records

    out = {}
    for chapter, record in read_run_records(results_dir, profile, budget).items():
        if record.get("status", "ok") != "ok":
            continue
        for key in ("seconds", "duration", "wall_seconds"):
            if isinstance(record.get(key), (int, float)):
                out[chapter] = float(record[key])
                break
    return out


# --------------------------------------------------------------------------------------------------
# settings and facts of a run


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) or "—"
    return str(value)


def settings_frame(cfg) -> pd.DataFrame:
    """The run's settings, one row each (``setting``, ``value``, ``from``): ``from`` says whether the
    value is the profile's, the config's default, or was set for this run (a parameter or a budget)."""
    profile = getattr(cfg, "profile", None)
    profile_values = dict(getattr(type(cfg), "PROFILES", {}).get(profile, {}))
    rows = []
    for f in dataclasses.fields(cfg):
        if f.name in HIDDEN_SETTINGS:
            continue
        value = getattr(cfg, f.name)
        factory = f.default_factory  # type: ignore[misc]
        default = f.default if f.default is not dataclasses.MISSING else (
            factory() if factory is not dataclasses.MISSING else None)
        if f.name == "profile":
            source = "chosen"
        elif f.name in profile_values and _same(value, profile_values[f.name]):
            source = f"profile {profile}"
        elif f.name not in profile_values and _same(value, default):
            source = "default"
        else:
            source = "set for this run"
        rows.append({"setting": f.name, "value": _show(value), "from": source})
    return pd.DataFrame(rows, columns=["setting", "value", "from"])


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    try:
        return norm(a) == norm(b)
    except Exception:
        return False


def git_commit(root: str | Path = ".") -> str:
    """The checked-out commit (12 hex digits), with ``+changes`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" +changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def run_facts(root: str | Path = ".") -> dict[str, Any]:
    """What a run ran on: commit, versions that matter, machine (CPU or GPU model, threads)."""
    import torch

    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": git_commit(root),
        "versions": {"pruning_lib": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
                    "gpu": gpu, "system": f"{platform.system()} {platform.release()}"},
    }


# --------------------------------------------------------------------------------------------------
# tables and figures on the page


def _decimals(values: pd.Series) -> int:
    v = pd.to_numeric(values, errors="coerce").abs().dropna()
    v = v[v > 0]
    if not len(v):
        return 2
    top = v.max()
    return 0 if top >= 1000 else 1 if top >= 100 else 2 if top >= 1 else 3 if v.min() >= 1e-3 else 4


def table_html(frame: pd.DataFrame, caption: str | None = None) -> str:
    """A DataFrame as the book shows it: no default (0, 1, 2...) index, full cell text, floats with a
    fixed number of decimals per column, numbers right-aligned."""
    frame = frame.copy()
    hide = isinstance(frame.index, pd.RangeIndex)
    styler = frame.style
    if hide:
        styler = styler.hide(axis="index")
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    numbers = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
               and not pd.api.types.is_bool_dtype(frame[c])]
    for c in floats:
        styler = styler.format(f"{{:,.{_decimals(frame[c])}f}}", subset=[c], na_rep="—")
    if numbers:
        styler = styler.set_td_classes(pd.DataFrame(
            [["pr-num" if c in numbers else "" for c in frame.columns]] * len(frame),
            index=frame.index, columns=frame.columns))
    if caption:
        styler = styler.set_caption(caption)
    return styler.set_table_attributes('class="pr-table"').to_html()


def figure_data(fig) -> pd.DataFrame:
    """The numbers drawn in a matplotlib figure, one row per point: ``panel`` (the axes' title, or its
    number), ``series`` (the artist's label), ``kind`` (line, points, bar), ``x``, ``y``, and the axes'
    labels. Lines, scatter points and bars (including histograms) are read; shaded bands are not."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer

    rows = []
    for i, ax in enumerate(fig.axes):
        panel = ax.get_title() or ax.get_title(loc="left") or f"panel {i + 1}"
        labels = {"x_label": ax.get_xlabel(), "y_label": ax.get_ylabel()}

        def add(kind, label, xs, ys):
            for x, y in zip(xs, ys):
                rows.append({"panel": panel, "series": label, "kind": kind, "x": x, "y": y, **labels})

        for k, line in enumerate(ax.get_lines()):
            label = line.get_label()
            label = f"line {k + 1}" if label.startswith("_") else label
            add("line", label, list(line.get_xdata(orig=True)), list(line.get_ydata(orig=True)))
        for k, coll in enumerate(c for c in ax.collections if isinstance(c, PathCollection)):
            label = coll.get_label()
            label = f"points {k + 1}" if label.startswith("_") else label
            offsets = coll.get_offsets()
            add("points", label, [float(p[0]) for p in offsets], [float(p[1]) for p in offsets])
        for k, cont in enumerate(c for c in ax.containers if isinstance(c, BarContainer)):
            label = cont.get_label() or ""
            label = f"bars {k + 1}" if label.startswith("_") or not label else label
            horizontal = getattr(cont, "orientation", "vertical") == "horizontal"
            xs, ys = [], []
            for r in cont.patches:
                if horizontal:
                    xs.append(r.get_width())
                    ys.append(r.get_y() + r.get_height() / 2)
                else:
                    xs.append(r.get_x() + r.get_width() / 2)
                    ys.append(r.get_height())
            add("bar", label, xs, ys)
    return pd.DataFrame(rows, columns=["panel", "series", "kind", "x", "y", "x_label", "y_label"])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def figure_html(fig, name: str | None = None) -> str:
    """A figure as the book shows it: its image, and a link that downloads its numbers as CSV (from
    :func:`figure_data`, embedded in the page: nothing is fetched)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode()
    data = figure_data(fig)
    titles = [t for ax in fig.axes for t in (ax.get_title(), ax.get_title(loc="left")) if t]
    if name is None:
        suptitle = getattr(fig, "_suptitle", None)
        name = (suptitle.get_text() if suptitle is not None else "") or (titles[0] if titles else "figure")
    alt = _attr("; ".join(titles) or name)
    img = f'<img src="data:image/png;base64,{png}" alt="{alt}"/>'
    if not len(data):
        return f'<figure class="pr-figure">{img}</figure>'
    csv = base64.b64encode(data.to_csv(index=False).encode()).decode()
    link = (f'<a class="pr-figure-data" download="{_slug(name)}.csv" href="data:text/csv;base64,{csv}">'
            f"Download this figure's data (CSV, {len(data)} rows)</a>")
    return f'<figure class="pr-figure">{img}<figcaption>{link}</figcaption></figure>'


def timing_noise_note(times: pd.DataFrame, same_work: Iterable[str], value: str = "seconds") -> str:
    """A caption for a figure of wall-clock times: how noisy they were on the machine that ran the page.

    ``times`` holds repeated timings of the same work (e.g. every epoch of a dense network, which does
    the same work each epoch), grouped by the columns ``same_work``; within a group, the slowest over
    the fastest is pure noise (other jobs on a shared machine, caches, frequency scaling)."""
    groups = [g[value].dropna() for _, g in times.groupby(list(same_work))] if len(times) else []
    ratios = pd.Series([g.max() / g.min() for g in groups if len(g) > 1 and g.min() > 0], dtype=float)
    if not len(ratios):
        return ("These are wall-clock times on the machine that ran this page; no work was timed twice, "
                "so their noise is unknown: read them as rough.")
    return (f"These are wall-clock times on the machine that ran this page, which may be shared with other "
            f"jobs. The same work timed repeatedly ({len(ratios)} series: {', '.join(same_work)} fixed) "
            f"took up to {ratios.max():.1f}× as long at its slowest as at its fastest (median "
            f"{ratios.median():.1f}×): differences smaller than that are noise, not the method.")


def use_book_display(ip=None) -> None:
    """Show DataFrames with :func:`table_html` and matplotlib figures with :func:`figure_html` in this
    IPython session (no-op outside one)."""
    if ip is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return
        ip = get_ipython()
    if ip is None:
        return
    from matplotlib.figure import Figure

    pd.set_option("display.max_colwidth", None)
    ip.display_formatter.formatters["text/html"].for_type(pd.DataFrame, table_html)
    # figures through the mime-bundle formatter: matplotlib's inline backend, when it starts, removes
    # whatever the per-type formatters hold for Figure (and adds its PNG beside this HTML)
    ip.display_formatter.mimebundle_formatter.for_type(Figure, _figure_bundle)


def _figure_bundle(fig) -> dict[str, str]:
    return {"text/html": figure_html(fig)}


def open_chapter(cfg, root: str | Path = ".") -> None:
    """The first presentation cell of a chapter: set how the page shows tables and figures
    (:func:`use_book_display`) and show the run's settings, recording them and :func:`run_facts` in the
    output's metadata for the book's build."""
    from IPython.display import display

    use_book_display()
    frame = settings_frame(cfg)
    meta = {"settings": dict(zip(frame["setting"], frame["value"])),
            "set_for_this_run": list(frame.loc[frame["from"] == "set for this run", "setting"]),
            "facts": run_facts(root)}
    display({"text/html": table_html(frame, caption="The settings of this run"),
             "text/plain": frame.to_string(index=False)}, raw=True, metadata={META_KEY: meta})


# --------------------------------------------------------------------------------------------------
# the summary box and the provenance of a chapter (used at build time by pruning_lib.sphinx_ext)


def _text(source) -> str:
    return "".join(source) if isinstance(source, list) else str(source or "")


def notebook_title_and_lead(nb: Mapping[str, Any]) -> tuple[str, str]:
    """The first markdown heading of a notebook and the first sentence of the paragraph after it."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        lines = _text(cell.get("source")).strip().splitlines()
        if not lines or not lines[0].startswith("# "):
            continue
        title = lines[0][2:].strip()
        paragraph = " ".join(l.strip() for l in "\n".join(lines[1:]).strip().split("\n\n")[0].splitlines())
        return title, first_sentence(paragraph)
    return "", ""


_NOT_AN_END = re.compile(r"(\bet al|\be\.g|\bi\.e|\bcf|\bvs|\bFig|\bSec|\bEq|\bTab|\bNo|\b[A-Z])\.$")


def first_sentence(paragraph: str) -> str:
    """The first sentence of a paragraph (not cut after "et al.", "e.g.", "Sec." or an initial)."""
    for m in re.finditer(r"[.!?](?=\s+[A-Z(\[*_`]|\s*$)", paragraph):
        head = paragraph[:m.end()]
        if not _NOT_AN_END.search(head):
            return head
    return paragraph


def run_metadata(nb: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`open_chapter` recorded in the executed notebook (``{}`` when it did not run)."""
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            meta = (out.get("metadata") or {}).get(META_KEY)
            if meta:
                return meta
    return {}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def _when(stamp: str | None) -> str:
    if not stamp:
        return "not recorded"
    try:
        t = pd.Timestamp(stamp).tz_convert("UTC") if pd.Timestamp(stamp).tzinfo else pd.Timestamp(stamp)
        return t.strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, TypeError):
        return str(stamp)


def summary_markdown(nb: Mapping[str, Any], claims: pd.DataFrame | None,
                     record: Mapping[str, Any] | None = None) -> str:
    """The box that opens a chapter (MyST markdown): the paper in one sentence, its claims with coloured
    verdicts, what ran (profile, models, seeds, budget), and the cost (the run's wall time)."""
    _, lead = notebook_title_and_lead(nb)
    pm = (nb.get("metadata") or {}).get("papermill") or {}
    record = dict(record or {})
    meta = run_metadata(nb)
    settings = dict(meta.get("settings") or {})
    params = dict(pm.get("parameters") or {})
    lines = []
    if lead:
        lines.append(f"**The paper.** {lead}")
    if claims is not None and len(claims):
        lines.append(f"**Its claims, as this run judged them** ({counts_sentence(claims)}):")
        lines += [f"- {chip(_col(r, 'verdict'))} {_md(_col(r, 'claim'))}" for _, r in claims.iterrows()]
        lines.append("")
    else:
        lines.append("**Its claims**: no claims table was found for this run.")
    ran = {k: settings.get(k, params.get(k)) for k in ("profile", "budget")}
    for key in ("models", "model", "dataset", "datasets", "setups", "experiments", "seeds", "epochs",
                "iterations"):
        if key in settings:
            ran[key] = settings[key]
    ran = {k: v for k, v in ran.items() if v not in (None, "", "—")}
    what = "; ".join(f"{k} **{_md(_show(v))}**" for k, v in ran.items()) or "not recorded"
    changed = [k for k in meta.get("set_for_this_run", []) if k != "budget"]
    lines.append(f"**What ran.** {what}" + (f" (set for this run: {', '.join(changed)})" if changed else "")
                 + ".")
    seconds = pm.get("duration", record.get("seconds"))
    lines.append(f"**Cost.** {_duration(seconds)} of wall time for this execution, started "
                 f"{_when(pm.get('start_time', record.get('start')))} (finished units are loaded from "
                 f"the results cache, so a rerun costs less than the first run).")
    body = "\n\n".join(l for l in lines if l is not None).replace("\n\n- ", "\n- ")
    return f":::{{admonition}} This chapter's run\n:class: pr-summary tip\n\n{body}\n:::\n"


def provenance_markdown(nb: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> str:
    """When, how and on what a chapter ran (MyST markdown table): Papermill's start time, duration and
    parameters, the git commit, the versions that matter, the machine."""
    pm = (nb.get("metadata") or {}).get("papermill") or {}
    record = dict(record or {})
    facts = dict(run_metadata(nb).get("facts") or record.get("facts") or {})
    if record.get("git_commit") and not facts.get("commit"):
        facts["commit"] = record["git_commit"]
    params = pm.get("parameters", record.get("parameters")) or {}
    machine = dict(facts.get("machine") or {})
    rows = [
        ("started", _when(pm.get("start_time", record.get("start")))),
        ("duration", _duration(pm.get("duration", record.get("seconds")))),
        ("parameters", ", ".join(f"`{k} = {v!r}`" for k, v in params.items()) or "none (defaults)"),
        ("source notebook", f"`{pm['input_path']}`" if pm.get("input_path") else "not recorded"),
        ("git commit", f"`{facts['commit']}`" if facts.get("commit") else "not recorded"),
        ("versions", ", ".join([f"{k} {v}" for k, v in (facts.get("versions") or {}).items()]
                               + ([f"papermill {pm['version']}"] if pm.get("version") else []))
         or "not recorded"),
        ("machine", ", ".join(x for x in (
            machine.get("gpu") and f"GPU {machine['gpu']}", machine.get("cpu"),
            machine.get("cores") and f"{machine['cores']} cores",
            machine.get("torch threads") and f"{machine['torch threads']} torch threads",
            machine.get("system")) if x) or "not recorded"),
    ]
    table = "| what | record |\n| --- | --- |\n" + "\n".join(
        f"| {k} | {_md(v, code_ok=True)} |" for k, v in rows)
    return ("## About this run\n\nWhen, how and on what this page was computed (from the executed "
            "notebook: Papermill's record and the facts the run wrote down).\n\n" + table + "\n")


# --------------------------------------------------------------------------------------------------
# small text helpers


def _html(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def _attr(text: str) -> str:
    return _html(text).replace('"', "&quot;")


def _md(text: Any, code_ok: bool = False) -> str:
    """Text safe inside a markdown line and a table cell: no pipes or line breaks, no stray markup."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    if not code_ok:
        s = s.replace("`", "'")
    return s.replace("<", "&lt;").replace(">", "&gt;")


def claims_for(chapter: str, results_dir: str | Path, profile: str,
               budget: float = 1.0) -> pd.DataFrame | None:
    """The claims table a chapter wrote for ``profile`` at ``budget`` (``None`` if there is none)."""
    from .claims import claims_dir

    path = claims_dir(results_dir, profile, budget) / f"{chapter}.csv"
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception:  # a broken table is shown as missing, never breaks the build
        return None


def run_record(chapter: str, results_dir: str | Path, profile: str, budget: float = 1.0) -> dict:
    """The run record ``results/runs/<profile-key>/<chapter>.json`` that ``pruning_lib.book run`` writes
    after executing a chapter, when there is one (else ``{}``)."""
    from .claims import budget_key

    path = Path(results_dir) / "runs" / budget_key(profile, budget) / f"{chapter}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    # a record of a run that failed or is still going describes another run than the book's notebook
    return record if isinstance(record, dict) and record.get("status", "ok") == "ok" else {}


def executed_parameters(nb: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a notebook ran with: its defaults (from the cell tagged ``parameters``, as
    Papermill records them) overridden by those Papermill injected."""
    pm = (nb.get("metadata") or {}).get("papermill") or {}
    out: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        if "parameters" in (cell.get("metadata") or {}).get("tags", []):
            for line in _text(cell.get("source")).splitlines():
                m = re.match(r"^([A-Za-z_]\w*)\s*=\s*(.+?)\s*(#.*)?$", line)
                if m:
                    try:
                        import ast

                        out[m.group(1)] = ast.literal_eval(m.group(2))
                    except (ValueError, SyntaxError):
                        pass
            break
    out.update(pm.get("default_parameters") or {})
    out.update(pm.get("parameters") or {})
    return out

