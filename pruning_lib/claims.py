"""The claims ledger: every chapter's table of paper claims, our measurement and a computed verdict.

A :class:`Claim` states what a paper says, where, how we measure it, and the :class:`Rule` that turns
our measurement into a verdict. :func:`ledger` evaluates a chapter's claims against its measurements,
returns the table and saves it to ``<results_dir>/claims/<key>/<chapter>.csv`` (``key`` is the profile,
with the budget when it is not 1, see :func:`budget_key`), where the verdicts page gathers every
chapter's table.

Verdicts: ``held``, ``did not hold``, ``inconclusive`` (the interval does not separate the outcomes, or
too few replicates, or a run has not settled), ``not measured`` (the profile that ran does not measure
it) and ``not judged`` (the ``smoke`` profile, whose runs are fractions of an epoch, judges nothing).

The statistics
--------------
* **The unit of replication is the seed.** A measurement is a :class:`pandas.Series` indexed by seed
  (or a ``{seed: value}`` dict). Values pooled over settings (several rows of one seed: λ values,
  targets, sparsities) are first reduced to one value per seed, by the mean over the settings
  (:func:`per_seed`); a chapter that wants another per-seed summary (say, the area between two curves)
  computes it and passes one value per seed. A plain list or array is read as one value per seed.
* **Intervals come from Student's t** with n − 1 degrees of freedom, two-sided at ``level`` (95 %):
  ``mean ± t(1 − α/2, n − 1) · s / √n``. Two unpaired samples use Welch's interval.
* **n < 3 never gives a firm verdict**: it is "inconclusive (n < 3)", with the interval shown when
  n = 2. A tie (the interval touching the limit, or a mean equal to it with no spread) is inconclusive.
* **Correlations** (:class:`Correlated`) carry a percentile bootstrap interval over runs (whole runs are
  resampled, the points of a run stay together); the verdict uses the interval.
* **Settled runs** (:class:`Evidence`, :func:`settled`): a claim about a training outcome is judged only
  when every run it uses had settled, i.e. its measured quantity changed by less than a stated tolerance
  over the last quarter of training; otherwise it is "inconclusive (not settled)".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import special

from .runs import atomic_write_frame

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED, NOT_JUDGED = (
    "held", "did not hold", "inconclusive", "not measured", "not judged")
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED, NOT_JUDGED)
COLUMNS = ["chapter", "claim", "source", "measure", "rule", "paper", "ours", "n", "interval", "verdict",
           "why", "profile", "budget"]
MIN_REPLICATES = 3
LEVEL = 0.95


# --------------------------------------------------------------------------------------------------
# samples: one value per seed

def per_seed(values, seeds=None) -> pd.Series:
    """One value per seed, as a Series indexed by seed (sorted).

    ``values`` may be a Series indexed by seed, a ``{seed: value}`` mapping, or a sequence (then
    ``seeds`` labels its items; without ``seeds`` each item is its own replicate). Several values of one
    seed (pooled over settings) are reduced to their mean. NaNs are dropped.
    """
    if isinstance(values, pd.Series):
        s = values.astype(float)
    elif isinstance(values, Mapping):
        s = pd.Series({k: float(v) for k, v in values.items()}, dtype=float)
    else:
        arr = np.atleast_1d(np.asarray(values, dtype=float))
        s = pd.Series(arr, index=list(seeds) if seeds is not None else range(len(arr)), dtype=float)
    s = s[~np.isnan(s.to_numpy())]
    if s.index.has_duplicates:
        s = s.groupby(level=0).mean()
    return s.sort_index()


def seed_means(frame: pd.DataFrame, value: str, seed: str = "seed") -> pd.Series:
    """``frame[value]`` reduced to one value per seed (the mean over every other column's settings)."""
    return per_seed(frame.set_index(seed)[value])


@dataclass(frozen=True)
class Interval:
    """A two-sided interval ``[low, high]`` around ``estimate`` from ``n`` replicates."""

    estimate: float
    low: float
    high: float
    n: int
    method: str = "t"

    def text(self, fmt: str = "{:.3g}", unit: str = "") -> str:
        u = f" {unit}" if unit else ""
        if self.n < 2 or not np.isfinite(self.low):
            return "—"
        return f"[{fmt.format(self.low)}, {fmt.format(self.high)}]{u}"


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile: ``scipy.stats.t.ppf(p, df)``, computed by the same function it calls
    (``scipy.special.stdtrit``; equal to the last bit over 31,000 pairs of levels and integer and Welch
    degrees of freedom), without importing ``scipy.stats``, which costs every process about a second."""
    return float(special.stdtrit(df, p))


def t_interval(values, level: float = LEVEL) -> Interval:
    """Student's t interval for the mean of ``values`` (one per replicate), n − 1 degrees of freedom."""
    v = np.asarray(per_seed(values), dtype=float)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n < 2:
        return Interval(m, -math.inf, math.inf, n)
    half = float(t_quantile(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(m, m - half, m + half, n)


def welch_interval(a, b, level: float = LEVEL) -> Interval:
    """Welch's t interval for mean(a) − mean(b), two independent samples; n = the smaller sample."""
    a, b = (np.asarray(per_seed(x), dtype=float) for x in (a, b))
    n = min(len(a), len(b))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    d = float(a.mean() - b.mean())
    if n < 2:
        return Interval(d, -math.inf, math.inf, n)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(d, d, d, n, "welch")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(t_quantile(0.5 + level / 2, df) * se)
    return Interval(d, d - half, d + half, n, "welch")


def average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of ``a`` (no NaN) with ties at their mean rank: ``scipy.stats.rankdata(a)`` (method
    "average"), value for value. Every rank is a whole number or a half, exact in float64, so any correct computation
    gives the same bits; this one is about 3 times faster on the hundred-odd points of a bootstrap draw,
    where the ranking was most of :func:`bootstrap_correlation`'s time."""
    a = np.asarray(a)
    order = np.argsort(a, kind="stable")
    s = a[order]
    new_value = np.empty(len(a), dtype=bool)
    new_value[:1] = True
    np.not_equal(s[1:], s[:-1], out=new_value[1:])
    tie_group = np.cumsum(new_value) - 1  # which run of equal values each sorted entry is in
    starts = np.append(np.flatnonzero(new_value), len(a))
    mean_rank = 0.5 * (starts[:-1] + starts[1:] + 1)  # the mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(a), dtype=float)
    ranks[order] = mean_rank[tie_group]
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks (ties get their mean rank)."""
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


def bootstrap_correlation(points: pd.DataFrame, x: str = "x", y: str = "y", run: str = "run",
                          n_boot: int = 2000, level: float = LEVEL, seed: int = 0,
                          method: str = "spearman", absolute: bool = False) -> Interval:
    """Percentile bootstrap interval of the correlation of ``x`` and ``y`` over the pooled points,
    resampling whole runs with replacement (``n`` = the number of runs). ``method``: spearman or
    pearson; ``absolute``: the interval of |ρ|."""
    groups = [g[[x, y]].to_numpy(dtype=float) for _, g in points.groupby(run, sort=True)]
    groups = [g[~np.isnan(g).any(axis=1)] for g in groups]
    groups = [g for g in groups if len(g)]
    n = len(groups)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "bootstrap")
    corr = _spearman if method == "spearman" else (
        lambda a, b: float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else math.nan)
    if absolute:
        base = corr
        corr = lambda a, b: abs(base(a, b))  # noqa: E731
    allp = np.concatenate(groups)
    est = corr(allp[:, 0], allp[:, 1])
    if n < 2:
        return Interval(est, -math.inf, math.inf, n, "bootstrap")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = np.concatenate([groups[i] for i in rng.integers(0, n, n)])
        draws.append(corr(pick[:, 0], pick[:, 1]))
    draws = np.asarray(draws)
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0:
        return Interval(est, -math.inf, math.inf, n, "bootstrap")
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), n, "bootstrap")


# --------------------------------------------------------------------------------------------------
# settled runs

def settled_change(history: pd.DataFrame, quantity: str, time: str = "epoch") -> float:
    """How much ``quantity`` changed over the last quarter of training: the rise of the least-squares
    line through the points of the last quarter of the ``time`` axis, across that quarter (robust to
    evaluation noise, unlike the last value minus the first)."""
    h = history[[time, quantity]].dropna()
    if len(h) < 2:
        return math.nan
    t = h[time].to_numpy(dtype=float)
    v = h[quantity].to_numpy(dtype=float)
    start = t.min() + 0.75 * (t.max() - t.min())
    tail = t >= start
    if tail.sum() < 2:
        tail = np.zeros_like(tail)
        tail[-2:] = True
    tt, vv = t[tail], v[tail]
    if np.all(tt == tt[0]):
        return float(abs(vv[-1] - vv[0]))
    slope = np.polyfit(tt, vv, 1)[0]
    return float(abs(slope * (tt.max() - tt.min())))


def settled(history: pd.DataFrame, quantity: str, tol: float, time: str = "epoch") -> bool:
    """True when ``quantity`` changed by less than ``tol`` over the last quarter of training
    (:func:`settled_change`)."""
    change = settled_change(history, quantity, time)
    return bool(np.isfinite(change) and change < tol)


def settled_table(history: pd.DataFrame, quantity: str, tol: float, by: Sequence[str],
                  time: str = "epoch") -> pd.DataFrame:
    """For each run of a long history frame (runs told apart by the ``by`` columns): the ``change`` of
    ``quantity`` over its last quarter (:func:`settled_change`) and whether it ``settled`` (change below
    ``tol``, as :func:`settled`)."""
    by = list(by)
    rows = []
    for key, g in history.groupby(by, sort=True):
        change = settled_change(g, quantity, time)
        rows.append({**dict(zip(by, key)), "change": change,
                     "settled": bool(np.isfinite(change) and change < tol)})
    return pd.DataFrame(rows, columns=[*by, "change", "settled"])


@dataclass(frozen=True)
class Evidence:
    """A measurement with what is known of the runs behind it.

    ``settled``: per run, whether the run's measured quantity settled (see :func:`settled`); the claim
    is judged only if all did. ``what`` names the quantity and tolerance ("test accuracy within 0.5 pp
    over the last quarter"), shown when a run has not settled.
    """

    value: Any
    settled: Sequence[bool] | bool | None = None
    what: str = ""

    @property
    def all_settled(self) -> bool:
        if self.settled is None:
            return True
        if isinstance(self.settled, (bool, np.bool_)):
            return bool(self.settled)
        return bool(all(self.settled))

    def unsettled(self) -> int:
        if self.settled is None or isinstance(self.settled, (bool, np.bool_)):
            return 0 if self.all_settled else 1
        return int(sum(not s for s in self.settled))


# --------------------------------------------------------------------------------------------------
# judgements and rules

@dataclass(frozen=True)
class Judgement:
    """What a rule decided: the verdict, our value (effect and spread, with units), the number of
    replicates, the interval and a short reason."""

    verdict: str
    ours: str = "—"
    n: int = 0
    interval: str = "—"
    why: str = ""


def _side(iv: Interval, limit: float, sign: float) -> tuple[str, str]:
    """Compare an interval with a limit on the claimed side ``sign`` (+1: above, -1: below)."""
    lo, hi = (iv.low - limit, iv.high - limit) if sign > 0 else (limit - iv.high, limit - iv.low)
    if lo > 0:
        return HELD, "interval on the claimed side"
    if hi < 0:
        return NOT_HELD, "interval on the other side"
    if lo == 0 == hi:
        return INCONCLUSIVE, "tie"
    return INCONCLUSIVE, "interval includes the limit"


def _firm(verdict: str, why: str, n: int) -> tuple[str, str]:
    """Fewer than MIN_REPLICATES replicates never give a firm verdict."""
    if n < MIN_REPLICATES:
        return INCONCLUSIVE, f"n < {MIN_REPLICATES}"
    return verdict, why


@dataclass(frozen=True)
class Rule:
    """Base class: ``text`` says the rule in words; ``__call__(measurement) -> Judgement``.

    ``fmt`` formats numbers, ``unit`` is the unit of the claim's quantity ("pp", "% of FLOPs"),
    ``level`` the interval's confidence level.
    """

    fmt: str = "{:.3g}"
    unit: str = ""
    level: float = LEVEL

    @property
    def text(self) -> str:
        raise NotImplementedError

    def judge(self, measurement) -> Judgement:
        raise NotImplementedError

    def __call__(self, measurement) -> Judgement:
        if isinstance(measurement, Evidence):
            j = self.judge(measurement.value)
            if not measurement.all_settled and j.verdict in (HELD, NOT_HELD, INCONCLUSIVE):
                what = f": {measurement.what}" if measurement.what else ""
                return Judgement(INCONCLUSIVE, j.ours, j.n, j.interval,
                                 f"not settled ({measurement.unsettled()} run(s){what})")
            return j
        return self.judge(measurement)

    def _u(self) -> str:
        return f" {self.unit}" if self.unit else ""

    def _mean_text(self, iv: Interval) -> str:
        return f"{self.fmt.format(iv.estimate)}{self._u()} (n={iv.n})"


def _bound(rule: "AtMost | AtLeast", measurement, sign: float) -> Judgement:
    v = per_seed(measurement)
    if len(v) == 0:
        return Judgement(NOT_MEASURED)
    iv = t_interval(v, rule.level)
    verdict, why = _firm(*_side(iv, rule.limit, sign), iv.n)
    return Judgement(verdict, rule._mean_text(iv), iv.n, iv.text(rule.fmt, rule.unit), why)


@dataclass(frozen=True)
class AtMost(Rule):
    """Held when the t interval of the mean lies below ``limit``; did not hold when it lies above."""

    limit: float = 0.0

    @property
    def text(self) -> str:
        return f"mean ≤ {self.fmt.format(self.limit)}{self._u()} (t interval)"

    def judge(self, measurement):
        return _bound(self, measurement, sign=-1.0)


@dataclass(frozen=True)
class AtLeast(Rule):
    """Held when the t interval of the mean lies above ``limit``; did not hold when it lies below."""

    limit: float = 0.0

    @property
    def text(self) -> str:
        return f"mean ≥ {self.fmt.format(self.limit)}{self._u()} (t interval)"

    def judge(self, measurement):
        return _bound(self, measurement, sign=1.0)


@dataclass(frozen=True)
class Exceeds(Rule):
    """Measurement ``(a, b)``, each one value per seed (or the per-seed differences a − b alone): held
    when the interval of a − b lies above ``margin``, did not hold when it lies below, else
    inconclusive. With ``paired`` (the default) a and b are matched by seed and the interval is the t
    interval of the per-seed differences; otherwise Welch's interval."""

    margin: float = 0.0
    paired: bool = True
    a_name: str = "a"
    b_name: str = "b"

    @property
    def text(self) -> str:
        m = f" + {self.fmt.format(self.margin)}{self._u()}" if self.margin else ""
        kind = "paired t" if self.paired else "Welch t"
        return f"{self.a_name} > {self.b_name}{m} ({kind} interval)"

    def judge(self, measurement):
        if isinstance(measurement, tuple) and len(measurement) == 2:
            a, b = (per_seed(m) for m in measurement)
            if len(a) == 0 or len(b) == 0:
                return Judgement(NOT_MEASURED)
            common = a.index.intersection(b.index)
            if self.paired and len(common):
                iv = t_interval(a.loc[common] - b.loc[common], self.level)
            else:
                iv = welch_interval(a, b, self.level)
        else:  # the per-seed differences a − b themselves
            d = per_seed(measurement)
            if len(d) == 0:
                return Judgement(NOT_MEASURED)
            iv = t_interval(d, self.level)
        verdict, why = _firm(*_side(iv, self.margin, +1.0), iv.n)
        ours = f"{self.a_name} − {self.b_name} = {self.fmt.format(iv.estimate)}{self._u()} (n={iv.n})"
        return Judgement(verdict, ours, iv.n, iv.text(self.fmt, self.unit), why)


@dataclass(frozen=True)
class Within(Rule):
    """Held when the t interval of the mean lies inside ``[target − tol, target + tol]``; did not hold
    when it lies wholly outside; else inconclusive."""

    target: float = 0.0
    tol: float = 0.0

    @property
    def text(self) -> str:
        return (f"|mean − {self.fmt.format(self.target)}| ≤ {self.fmt.format(self.tol)}{self._u()} "
                f"(t interval)")

    def judge(self, measurement):
        v = per_seed(measurement)
        if len(v) == 0:
            return Judgement(NOT_MEASURED)
        iv = t_interval(v, self.level)
        lo, hi = self.target - self.tol, self.target + self.tol
        if iv.low >= lo and iv.high <= hi and not (iv.low == lo and iv.high == lo) and not (
                iv.low == hi and iv.high == hi):
            verdict, why = HELD, "interval inside the band"
        elif iv.high < lo or iv.low > hi:
            verdict, why = NOT_HELD, "interval outside the band"
        else:
            verdict, why = INCONCLUSIVE, "interval crosses the band's edge"
        verdict, why = _firm(verdict, why, iv.n)
        return Judgement(verdict, self._mean_text(iv), iv.n, iv.text(self.fmt, self.unit), why)


@dataclass(frozen=True)
class Fraction(Rule):
    """Measurement: the verdicts of sub-claims (one per case). Held when at least ``share`` of the cases
    held; did not hold when too few could hold even if every inconclusive case held; else inconclusive
    (so with ``share`` = 1, an inconclusive case and no failed one gives inconclusive). Booleans count
    as held / did not hold."""

    share: float = 1.0
    what: str = "cases"

    @property
    def text(self) -> str:
        return f"at least {self.share:.0%} of {self.what} hold"

    def judge(self, measurement):
        vs = [(HELD if x else NOT_HELD) if isinstance(x, (bool, np.bool_)) else
              (x.verdict if isinstance(x, Judgement) else str(x)) for x in measurement]
        vs = [v for v in vs if v not in (NOT_MEASURED, NOT_JUDGED)]
        if not vs:
            return Judgement(NOT_MEASURED)
        k = sum(v == HELD for v in vs)
        u = sum(v == INCONCLUSIVE for v in vs)
        need = self.share * len(vs)
        if k >= need:
            verdict, why = HELD, f"{k} of {len(vs)} held"
        elif k + u < need:
            verdict, why = NOT_HELD, f"{len(vs) - k - u} of {len(vs)} did not hold"
        else:
            verdict, why = INCONCLUSIVE, f"{u} of {len(vs)} inconclusive"
        ours = f"{k} held, {u} inconclusive, {len(vs) - k - u} did not hold, of {len(vs)} {self.what}"
        return Judgement(verdict, ours, len(vs), "—", why)


@dataclass(frozen=True)
class Correlated(Rule):
    """Measurement: a frame of points with columns ``x``, ``y`` and ``run``. Held when the bootstrap
    interval (over runs) of the rank correlation (of its absolute value with ``absolute``) lies on the
    claimed side of ``limit`` (``sign`` +1: above, -1: below); n = the number of runs."""

    sign: float = 1.0
    limit: float = 0.0
    n_boot: int = 2000
    seed: int = 0
    method: str = "spearman"
    absolute: bool = False

    @property
    def text(self) -> str:
        rel = ">" if self.sign > 0 else "<"
        rho = "|ρ|" if self.absolute else "ρ"
        return f"{self.method} {rho} {rel} {self.fmt.format(self.limit)} (bootstrap over runs)"

    def judge(self, measurement):
        if measurement is None or len(measurement) == 0:
            return Judgement(NOT_MEASURED)
        iv = bootstrap_correlation(measurement, n_boot=self.n_boot, level=self.level, seed=self.seed,
                                   method=self.method, absolute=self.absolute)
        verdict, why = _firm(*_side(iv, self.limit, self.sign), iv.n)
        rho = "|ρ|" if self.absolute else "ρ"
        ours = f"{rho} = {self.fmt.format(iv.estimate)} over {len(measurement)} points of {iv.n} runs"
        return Judgement(verdict, ours, iv.n, iv.text(self.fmt), why)


@dataclass(frozen=True)
class SeedBootstrap(Rule):
    """For a statistic that only exists across seeds (a spread, a coefficient of variation): the
    measurement is a frame with a ``seed`` column; ``statistic(frame) -> float`` is computed on it and on
    bootstrap resamples of its seeds (every row of a drawn seed comes along). Held when the percentile
    interval lies on the claimed side of ``limit`` (``sign`` +1: above, -1: below); n = the number of
    seeds."""

    statistic: Any = None
    name: str = "statistic"
    sign: float = -1.0
    limit: float = 0.0
    n_boot: int = 2000
    seed: int = 0

    @property
    def text(self) -> str:
        rel = "≥" if self.sign > 0 else "≤"
        return f"{self.name} {rel} {self.fmt.format(self.limit)}{self._u()} (bootstrap over seeds)"

    def judge(self, measurement):
        if measurement is None or len(measurement) == 0:
            return Judgement(NOT_MEASURED)
        frame = measurement
        seeds = np.asarray(sorted(frame["seed"].unique()))
        n = len(seeds)
        est = float(self.statistic(frame))
        if n < 2:
            iv = Interval(est, -math.inf, math.inf, n, "bootstrap")
        else:
            rng = np.random.default_rng(self.seed)
            parts = {s: frame[frame["seed"] == s] for s in seeds}
            draws = []
            for _ in range(self.n_boot):
                pick = rng.choice(seeds, size=n, replace=True)
                # relabel drawn seeds so that a seed drawn twice counts as two replicates
                sample = pd.concat([parts[s].assign(seed=i) for i, s in enumerate(pick)], ignore_index=True)
                draws.append(float(self.statistic(sample)))
            draws = np.asarray(draws)
            draws = draws[np.isfinite(draws)]
            lo, hi = np.quantile(draws, [(1 - self.level) / 2, (1 + self.level) / 2])
            iv = Interval(est, float(lo), float(hi), n, "bootstrap")
        verdict, why = _firm(*_side(iv, self.limit, self.sign), iv.n)
        return Judgement(verdict, self._mean_text(iv), iv.n, iv.text(self.fmt, self.unit), why)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: the statement, where it is made, how we measure it, and the rule."""

    statement: str
    source: str
    measure: str
    rule: Rule
    paper: str = "—"  # the paper's own number, with its setting, when it gives one


# --------------------------------------------------------------------------------------------------
# the ledger

def budget_key(profile: str, budget: float = 1.0) -> str:
    """The key of a profile run at a training budget: ``cpu`` at budget 1, ``cpu-budget2`` at 2."""
    return profile if float(budget) == 1.0 else f"{profile}-budget{float(budget):g}"


def claims_dir(results_dir: str | Path, profile: str, budget: float = 1.0) -> Path:
    """Where :func:`ledger` saves the claims tables of runs of ``profile`` at ``budget``: one folder per
    profile and budget (``claims/cpu/``, ``claims/cpu-budget2/``)."""
    return Path(results_dir) / "claims" / budget_key(profile, budget)


def judge(claim: Claim, measurement, profile: str) -> Judgement:
    """The judgement of one claim: ``None`` is "not measured"; the smoke profile judges nothing."""
    if measurement is None:
        return Judgement(NOT_MEASURED)
    j = claim.rule(measurement)
    if profile == "smoke" and j.verdict != NOT_MEASURED:
        return Judgement(NOT_JUDGED, j.ours, j.n, j.interval, "smoke: fractions of an epoch")
    return j


def ledger(chapter: str, rows: Sequence[tuple[Claim, Any]], profile: str,
           results_dir: str | Path | None = "results", budget: float = 1.0) -> pd.DataFrame:
    """Evaluate ``(claim, measurement)`` pairs into the chapter's claims table and save it.

    A measurement of ``None`` means "not measured in this profile". The table is written (atomically) to
    ``<results_dir>/claims/<key>/<chapter>.csv`` (see :func:`claims_dir`) unless ``results_dir`` is
    None, so a `smoke` run never overwrites the verdicts of a `cpu` or `paper` run, nor a budget-2 run
    those of budget 1.
    """
    records = []
    for claim, measurement in rows:
        j = judge(claim, measurement, profile)
        records.append({"chapter": chapter, "claim": claim.statement, "source": claim.source,
                        "measure": claim.measure, "rule": claim.rule.text, "paper": claim.paper,
                        "ours": j.ours, "n": j.n, "interval": j.interval, "verdict": j.verdict,
                        "why": j.why, "profile": profile, "budget": float(budget)})
    table = pd.DataFrame(records, columns=COLUMNS)
    if results_dir is not None:
        atomic_write_frame(table, claims_dir(results_dir, profile, budget) / f"{chapter}.csv")
    return table


def gather(results_dir: str | Path = "results", profile: str = "cpu", budget: float = 1.0, *,
           text: bool = False, unreadable: list[str] | None = None) -> pd.DataFrame:
    """Every chapter's claims table of ``profile`` at ``budget``, concatenated, with the ledger's columns
    first (missing ones empty, extra ones kept; the ledger's columns if there is no table).

    ``text`` reads every cell as text (the verdicts page shows them as written). With a list as
    ``unreadable``, a table that cannot be read, or has no claim or verdict column, is named there and
    skipped; without one, it raises."""
    frames = []
    for path in sorted(claims_dir(results_dir, profile, budget).glob("*.csv")):
        try:
            frame = pd.read_csv(path, keep_default_na=False, **({"dtype": str} if text else {}))
            if "claim" not in frame.columns or "verdict" not in frame.columns:
                raise ValueError("no claim or verdict column")
        except Exception as exc:
            if unreadable is None:
                raise ValueError(f"claims table {path} cannot be read: {exc}") from exc
            unreadable.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        if "chapter" not in frame.columns:
            frame["chapter"] = path.stem
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    if text:
        table = table.fillna("")
    extra = [c for c in table.columns if c not in COLUMNS]
    return table.reindex(columns=COLUMNS + extra, fill_value="")


def budgets(results_dir: str | Path = "results", profile: str = "cpu") -> list[float]:
    """The budgets for which claims tables of ``profile`` exist (1 first)."""
    root = Path(results_dir) / "claims"
    found = []
    for d in root.glob(f"{profile}*"):
        if not d.is_dir():
            continue
        if d.name == profile:
            found.append(1.0)
        elif d.name.startswith(f"{profile}-budget"):
            try:
                found.append(float(d.name.removeprefix(f"{profile}-budget")))
            except ValueError:
                continue
    return sorted(found, key=lambda b: (b != 1.0, b))


def stability(results_dir: str | Path = "results", profile: str = "cpu", other: float = 2.0) -> pd.DataFrame:
    """Per claim, its verdict at budget 1 and at ``other``, and whether they agree (``stable``).
    Only chapters with a table at both budgets are compared."""
    a = gather(results_dir, profile, 1.0)
    b = gather(results_dir, profile, other)
    if a.empty or b.empty:
        return pd.DataFrame(columns=["chapter", "claim", "verdict", f"verdict at budget {other:g}",
                                     "stable"])
    key = ["chapter", "claim"]
    a = a.drop_duplicates(key)
    b = b.drop_duplicates(key)
    m = a[key + ["verdict", "ours"]].merge(
        b[key + ["verdict", "ours"]].rename(columns={"verdict": f"verdict at budget {other:g}",
                                                     "ours": f"ours at budget {other:g}"}),
        on=key, how="inner")
    m["stable"] = m["verdict"] == m[f"verdict at budget {other:g}"]
    return m


def budget_comparison(table: pd.DataFrame, results_dir: str | Path, profile: str,
                      budget: float = 1.0) -> pd.DataFrame | None:
    """The chapter's claims (``table``) beside their verdicts at the other budget (2 when this run is at
    1, else 1), when that run's claims table exists: columns claim, verdict, ``other``, ``stable``."""
    if table.empty:
        return None
    other = 2.0 if float(budget) == 1.0 else 1.0
    path = claims_dir(results_dir, profile, other) / f"{table['chapter'].iloc[0]}.csv"
    if not path.exists():
        return None
    o = pd.read_csv(path, keep_default_na=False).drop_duplicates("claim").set_index("claim")["verdict"]
    out = table[["claim", "verdict"]].copy()
    out["other"] = out["claim"].map(o)
    out["stable"] = out["other"].isna() | (out["other"] == out["verdict"])
    out.attrs["other_budget"] = other
    return out


def show(table: pd.DataFrame, cfg=None, columns: Sequence[str] = ("claim", "source", "paper", "ours",
                                                                   "interval", "verdict", "why"),
         results_dir: str | Path | None = None):
    """A styled view of a claims table for notebooks (verdicts coloured). Given the chapter's ``cfg``,
    and when a claims table of the same profile at the other budget exists, a column shows the verdict
    at that budget, marked ⚠ where it differs: the claim is sensitive to training length."""
    colours = {HELD: "#d8f0d8", NOT_HELD: "#f6d5d5", INCONCLUSIVE: "#f5ecc8", NOT_MEASURED: "#e8e8e8",
               NOT_JUDGED: "#e8e8e8"}
    view = table[[c for c in columns if c in table.columns]].copy()
    caption = None
    if cfg is not None:
        root = results_dir if results_dir is not None else getattr(cfg, "results_dir", "results")
        cmp = budget_comparison(table, root, cfg.profile, cfg.budget)
        if cmp is not None:
            col = f"at budget {cmp.attrs['other_budget']:g}"
            view[col] = [("—" if pd.isna(o) else (o if ok else f"⚠ {o}"))
                         for o, ok in zip(cmp["other"], cmp["stable"])]
            n = int((~cmp["stable"]).sum())
            caption = (f"⚠ marks {n} claim(s) whose verdict changes with the training budget "
                       f"({cfg.budget:g} here, {cmp.attrs['other_budget']:g} in the other run): they are "
                       "sensitive to training length." if n else
                       f"Every verdict is the same at budget {cmp.attrs['other_budget']:g}.")
    styler = (view.style.hide(axis="index")
              .map(lambda v: f"background-color: {colours.get(v, '')}", subset=["verdict"])
              .set_properties(**{"text-align": "left"}))
    if caption:
        styler = styler.set_caption(caption)
    return styler
