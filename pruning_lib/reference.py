"""Published numbers the book sets beside its own, read from ``data/reference/published.csv``.

One row per number: a ``key`` the chapters use, the ``paper`` and ``source`` (table or section) it comes
from, the ``model``/``dataset``/``method`` (and ``architecture``, for structured pruning) it describes,
the ``metric`` and its ``value``. Keeping them in one file keeps a paper's number in one place when
several chapters quote it, and lets a reader check every published number the book uses at a glance.
These numbers are only ever shown beside ours, labelled with their source and setting.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd

PUBLISHED = Path(__file__).resolve().parents[1] / "data" / "reference" / "published.csv"
COLUMNS = ("key", "paper", "source", "model", "dataset", "method", "architecture", "metric", "value")


@lru_cache(maxsize=None)
def _table(path: str) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"value": float}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    duplicated = table["key"][table["key"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: duplicated key(s) {', '.join(duplicated)}")
    return table


def published(path: str | Path = PUBLISHED, **match) -> pd.DataFrame:
    """The published numbers, optionally only the rows whose columns equal ``match`` (e.g.
    ``model="lenet300_100"``)."""
    table = _table(str(path))
    for column, value in match.items():
        table = table[table[column] == value]
    return table.reset_index(drop=True).copy()


def number(key: str, path: str | Path = PUBLISHED) -> pd.Series:
    """The row of ``key`` (a KeyError naming the file and the keys it has when absent)."""
    table = _table(str(path))
    rows = table[table["key"] == key]
    if rows.empty:
        raise KeyError(f"no published number {key!r} in {path}; keys: {', '.join(table['key'])}")
    return rows.iloc[0]


def label(row: pd.Series) -> str:
    """How the book labels a published number: its source and the dataset it was measured on."""
    setting = {"mnist": "full MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(
        row["dataset"], row["dataset"])
    return f"{row['source']}; {setting}"
