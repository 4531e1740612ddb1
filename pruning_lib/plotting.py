"""One plotting style for every figure of the book (seaborn, colour-blind palette).

matplotlib's pyplot and seaborn are imported by the functions that draw, not with this module: every
chapter module imports it, and so does every process that only trains a chapter's units (pool and Dask
workers, ``python -m pruning_lib.book units``, torchrun ranks), where the two cost 1.3 s of start-up
(seaborn pulls in scipy.stats).
"""
from __future__ import annotations

PALETTE = "colorblind"


def use_style() -> None:
    """Apply the book's style; call once at the top of a chapter."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE,
                  rc={"figure.figsize": (7.0, 4.2), "figure.dpi": 100, "savefig.dpi": 150,
                      "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
                      "axes.spines.top": False, "axes.spines.right": False})


def figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 4.2, **kw):
    """A new figure sized for the book's text column (``width`` is the whole figure's width).

    The figure is detached from pyplot at once, so a notebook shows it exactly once, where it displays
    it (``fig`` as a cell's last line, ``display(fig)`` or ``glue``), never again when the inline
    backend flushes open figures at the end of the cell; it still renders and saves as usual.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), constrained_layout=True, **kw)
    plt.close(fig)
    return fig, axes


def percent_axis(ax, axis: str = "x", log: bool = False) -> None:
    """Label an axis of fractions in [0, 1] as percentages (optionally on a log scale)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{100 * v:.3g} %")
    target = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(lambda v, _: ""))
