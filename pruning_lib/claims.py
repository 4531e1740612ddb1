"""The claims ledger: every chapter's table of paper claims, our measurement and a computed verdict.

A :class:`Claim` states what a paper says, where, how we measure it, and the :class:`Rule` that turns
our measurement into a verdict. :func:`ledger` evaluates a chapter's claims against its measurements,
returns the table and saves it to ``<results_dir>/claims/<profile>/<chapter>.csv``, where the book's
verdicts page gathers every chapter's table of that profile into one.

Verdicts: ``held``, ``did not hold``, ``inconclusive`` (the seed spread does not separate the outcomes)
and ``not measured`` (the profile that ran does not measure it). Measurements given as several values
(one per seed) are judged with their spread: a difference counts only when it exceeds ``z`` standard
errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .runs import atomic_write_frame

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED = "held", "did not hold", "inconclusive", "not measured"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED)
COLUMNS = ["chapter", "claim", "source", "measure", "rule", "paper", "ours", "verdict", "profile"]


def _values(m) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(m, dtype=float))
    return arr[~np.isnan(arr)]


def _describe(values: np.ndarray, fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))} (n={len(values)})"


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Rule:
    """Base class: ``text`` says the rule in words; ``__call__(measurement) -> (verdict, ours)``."""

    fmt: str = "{:.3g}"
    z: float = 2.0

    @property
    def text(self) -> str:
        raise NotImplementedError

    def __call__(self, measurement) -> tuple[str, str]:
        raise NotImplementedError


def _bound(rule: "AtMost | AtLeast", measurement, sign: float) -> tuple[str, str]:
    """The verdict of a one-sided bound: ``sign`` -1 for "mean ≤ limit", +1 for "mean ≥ limit". Held
    when the whole band mean ± z·SE is on the right side of the limit (the limit itself counting),
    did not hold when it is wholly on the wrong side, else inconclusive."""
    v = _values(measurement)
    if len(v) == 0:
        return NOT_MEASURED, "—"
    band = rule.z * _stderr(v)
    excess = sign * (v.mean() - rule.limit)  # > 0: on the claimed side of the limit
    verdict = HELD if excess - band >= 0 else (NOT_HELD if excess + band < 0 else INCONCLUSIVE)
    return verdict, _describe(v, rule.fmt)


@dataclass(frozen=True)
class AtMost(Rule):
    """Held when the mean is at most ``limit`` (beyond ``z`` standard errors either way, else
    inconclusive)."""

    limit: float = 0.0

    @property
    def text(self) -> str:
        return f"mean ≤ {self.fmt.format(self.limit)}"

    def __call__(self, measurement):
        return _bound(self, measurement, sign=-1.0)


@dataclass(frozen=True)
class AtLeast(Rule):
    """Held when the mean is at least ``limit`` (with the same spread rule as :class:`AtMost`)."""

    limit: float = 0.0

    @property
    def text(self) -> str:
        return f"mean ≥ {self.fmt.format(self.limit)}"

    def __call__(self, measurement):
        return _bound(self, measurement, sign=1.0)


@dataclass(frozen=True)
class Exceeds(Rule):
    """Measurement ``(a, b)``: held when a − b > ``margin`` by more than ``z`` standard errors of the
    difference; did not hold when a − b < ``margin`` by as much; else inconclusive. With ``paired``,
    a and b are matched (same seeds) and the spread is that of the differences."""

    margin: float = 0.0
    paired: bool = True
    a_name: str = "a"
    b_name: str = "b"

    @property
    def text(self) -> str:
        m = f" + {self.fmt.format(self.margin)}" if self.margin else ""
        return f"{self.a_name} > {self.b_name}{m} beyond {self.z:g} s.e."

    def __call__(self, measurement):
        a, b = (_values(m) for m in measurement)
        if len(a) == 0 or len(b) == 0:
            return NOT_MEASURED, "—"
        if self.paired and len(a) == len(b):
            d = a - b
            diff, se = d.mean(), _stderr(d)
        else:
            diff = a.mean() - b.mean()
            se = math.sqrt(_stderr(a) ** 2 + _stderr(b) ** 2)
        n = min(len(a), len(b))
        if n < 2:
            verdict = HELD if diff > self.margin else NOT_HELD
        else:
            verdict = HELD if diff - self.z * se > self.margin else (
                NOT_HELD if diff + self.z * se < self.margin else INCONCLUSIVE)
        ours = f"{self.a_name} − {self.b_name} = {self.fmt.format(diff)}"
        if n >= 2:
            ours += f" ± {self.fmt.format(se)} s.e. (n={n})"
        return verdict, ours


@dataclass(frozen=True)
class Within(Rule):
    """Held when the mean lies within ``tol`` of ``target``."""

    target: float = 0.0
    tol: float = 0.0

    @property
    def text(self) -> str:
        return f"|mean − {self.fmt.format(self.target)}| ≤ {self.fmt.format(self.tol)}"

    def __call__(self, measurement):
        v = _values(measurement)
        if len(v) == 0:
            return NOT_MEASURED, "—"
        return (HELD if abs(v.mean() - self.target) <= self.tol else NOT_HELD), _describe(v, self.fmt)


@dataclass(frozen=True)
class Fraction(Rule):
    """Measurement: booleans (one per case). Held when at least ``share`` of the cases are True."""

    share: float = 1.0
    what: str = "cases"

    @property
    def text(self) -> str:
        return f"at least {self.share:.0%} of {self.what} satisfy it"

    def __call__(self, measurement):
        v = [bool(x) for x in measurement]
        if not v:
            return NOT_MEASURED, "—"
        k = sum(v)
        return (HELD if k >= self.share * len(v) else NOT_HELD), f"{k} of {len(v)} {self.what}"


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: the statement, where it is made, how we measure it, and the rule."""

    statement: str
    source: str
    measure: str
    rule: Rule
    paper: str = "—"  # the paper's own number, with its setting, when it gives one


def ledger(chapter: str, rows: Sequence[tuple[Claim, Any]], profile: str,
           results_dir: str | Path | None = "results", budget: float = 1.0) -> pd.DataFrame:
    """Evaluate ``(claim, measurement)`` pairs into the chapter's claims table and save it.

    A measurement of ``None`` means "not measured in this profile". The table is written (atomically) to
    ``<results_dir>/claims/<profile>/<chapter>.csv`` (see :func:`claims_dir`) unless ``results_dir`` is
    None, so a `smoke` run never overwrites the verdicts of a `cpu` or `paper` run.
    """
    records = []
    for claim, measurement in rows:
        verdict, ours = (NOT_MEASURED, "—") if measurement is None else claim.rule(measurement)
        records.append({"chapter": chapter, "claim": claim.statement, "source": claim.source,
                        "measure": claim.measure, "rule": claim.rule.text, "paper": claim.paper,
                        "ours": ours, "verdict": verdict, "profile": profile})
    table = pd.DataFrame(records, columns=COLUMNS)
    if results_dir is not None:
        atomic_write_frame(table, claims_dir(results_dir, profile, budget) / f"{chapter}.csv")
    return table


def budget_key(profile: str, budget: float = 1.0) -> str:
    """The key of a profile run at a training budget: ``cpu`` at budget 1, ``cpu-budget2`` at 2."""
    return profile if float(budget) == 1.0 else f"{profile}-budget{float(budget):g}"


def claims_dir(results_dir: str | Path, profile: str, budget: float = 1.0) -> Path:
    """Where :func:`ledger` saves the claims tables of runs of ``profile`` at ``budget``: one folder per
    profile and budget (``claims/cpu/``, ``claims/cpu-budget2/``)."""
    return Path(results_dir) / "claims" / budget_key(profile, budget)


def gather(results_dir: str | Path = "results", profile: str = "cpu", budget: float = 1.0) -> pd.DataFrame:
    """Every chapter's claims table of ``profile`` at ``budget``, concatenated (the ledger's columns if
    none)."""
    files = sorted(claims_dir(results_dir, profile, budget).glob("*.csv"))
    if not files:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def show(table: pd.DataFrame, columns: Sequence[str] = ("claim", "source", "paper", "ours", "verdict",
                                                         "rule")):
    """A styled view of a claims table for notebooks (verdicts coloured)."""
    colours = {HELD: "#d8f0d8", NOT_HELD: "#f6d5d5", INCONCLUSIVE: "#f5ecc8", NOT_MEASURED: "#e8e8e8"}
    view = table[list(columns)]
    return (view.style.hide(axis="index")
            .map(lambda v: f"background-color: {colours.get(v, '')}", subset=["verdict"])
            .set_properties(**{"text-align": "left"}))
