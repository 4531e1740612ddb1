"""Where a pruning method's accuracy-cost curve lies against a reference curve, from per-seed curves.

ShrinkBench (Blalock et al. 2020) compares methods by their accuracy-compression curves; its ``pareto.py``
sorts a curve into dominant / better / mixed / worse / dominated against another. This is our own version,
with the statistics of the claims ledger (:mod:`pruning_lib.claims`):

* both curves are measured per seed. At each *level* of the method (a compression target, or a penalty
  weight for methods placed by what they achieved), each seed's point ``(cost, accuracy)`` is compared with
  the reference curve *of the same seed*, linearly interpolated in log cost at that seed's achieved cost
  (:func:`interpolate_log`); points outside the reference's range are left out, not extrapolated;
* the per-seed differences of a level give a Student-t interval (:func:`pruning_lib.claims.t_interval`);
  the level is *above* when the interval lies above 0, *below* when it lies below, else *tied*
  (fewer than three seeds, or a run behind the level that had not settled: always tied, as in the
  ledger, whose :class:`~pruning_lib.claims.Exceeds` judgements of the same differences these match);
* the curve's class (:func:`classify`): **dominant** (every level above), **better** (some above, none
  below), **mixed** (some above, some below), **worse** (some below, none above), **dominated** (every level
  below); **tied** when no level is separated, and **not compared** when no level falls inside the
  reference's range.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .claims import MIN_REPLICATES, LEVEL, t_interval

CLASSES = ("dominant", "better", "mixed", "tied", "worse", "dominated", "not compared")


def interpolate_log(cost, accuracy, at: float) -> float:
    """``accuracy`` of a curve given at ``cost`` (any order), linear in log cost, at cost ``at``; NaN
    outside the curve's range (no extrapolation). Repeated costs are averaged."""
    frame = pd.DataFrame({"c": np.asarray(cost, float), "a": np.asarray(accuracy, float)}).dropna()
    frame = frame[frame.c > 0].groupby("c", as_index=False)["a"].mean().sort_values("c")
    if frame.empty or not at > 0:
        return float("nan")
    x, y = np.log(frame.c.to_numpy()), frame.a.to_numpy()
    lx = float(np.log(at))
    if lx < x[0] - 1e-12 or lx > x[-1] + 1e-12:
        return float("nan")
    return float(np.interp(lx, x, y))


def differences(points: pd.DataFrame, reference: pd.DataFrame, cost: str = "flops",
                value: str = "accuracy") -> pd.DataFrame:
    """Per point of ``points`` (columns ``level``, ``seed``, ``cost``, ``value``, and any others kept), the
    difference ``value - reference(seed) at cost``; ``reference`` has ``seed``, ``cost``, ``value``
    (one curve per seed). Rows whose cost is outside their seed's reference range get NaN."""
    curves = {s: g for s, g in reference.groupby("seed")}
    # (the reference's ``settled`` column, if any, is read by verdicts())
    out = points.copy()
    ref = []
    for _, row in points.iterrows():
        g = curves.get(row["seed"])
        ref.append(float("nan") if g is None else interpolate_log(g[cost], g[value], row[cost]))
    out["reference"] = ref
    out["difference"] = out[value] - out["reference"]
    return out


def level_outcomes(diffs: pd.DataFrame, level: str = "level", level_ci: float = LEVEL,
                   reference_settled: bool = True) -> pd.DataFrame:
    """Per level: n seeds compared, mean difference, t interval and outcome (+1 above, -1 below, 0 tied).
    With a boolean ``settled`` column, a level whose compared runs (or the reference's, see
    ``reference_settled``) did not all settle is tied."""
    rows = []
    for lv, g in diffs.groupby(level, sort=True):
        g = g[g["difference"].notna()]
        d = g.set_index("seed")["difference"]
        iv = t_interval(d, level_ci)
        settled = reference_settled and (bool(g["settled"].all()) if "settled" in g else True)
        if iv.n == 0:
            outcome = np.nan
        elif iv.n < MIN_REPLICATES or not settled:
            outcome = 0
        else:
            outcome = 1 if iv.low > 0 else -1 if iv.high < 0 else 0
        rows.append({level: lv, "n": iv.n, "mean": iv.estimate, "low": iv.low, "high": iv.high,
                     "outcome": outcome})
    return pd.DataFrame(rows, columns=[level, "n", "mean", "low", "high", "outcome"])


def classify(outcomes) -> str:
    """The class of a curve from its levels' outcomes (+1 above, 0 tied, -1 below; NaN = not compared)."""
    o = [int(x) for x in outcomes if x is not None and not (isinstance(x, float) and np.isnan(x))]
    if not o:
        return "not compared"
    up, down = sum(x > 0 for x in o), sum(x < 0 for x in o)
    if up == len(o):
        return "dominant"
    if down == len(o):
        return "dominated"
    if up and down:
        return "mixed"
    if up:
        return "better"
    if down:
        return "worse"
    return "tied"


def verdicts(points: pd.DataFrame, reference: pd.DataFrame, by: str = "method", cost: str = "flops",
             value: str = "accuracy") -> pd.DataFrame:
    """One row per ``by`` group of ``points``: its class against ``reference`` and the levels counted."""
    rows = []
    ref_settled = bool(reference["settled"].all()) if "settled" in reference else True
    for name, g in points.groupby(by, sort=False):
        out = level_outcomes(differences(g, reference, cost, value), reference_settled=ref_settled)
        o = out["outcome"]
        rows.append({by: name, "class": classify(o), "levels": int(o.notna().sum()),
                     "above": int((o == 1).sum()), "tied": int((o == 0).sum()), "below": int((o == -1).sum()),
                     "mean_difference": float(out["mean"].mean()) if o.notna().any() else float("nan")})
    return pd.DataFrame(rows)
