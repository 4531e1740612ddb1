"""Known-answer tests of the claims ledger's statistics (pruning_lib.claims)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pruning_lib import claims
from pruning_lib.claims import (HELD, INCONCLUSIVE, NOT_HELD, NOT_JUDGED, NOT_MEASURED, AtLeast, AtMost, Claim,
                                Correlated, Evidence, Exceeds, Fraction, SeedBootstrap, Within, gather, ledger)


# --- the t interval -----------------------------------------------------------------------------------

def test_t_interval_matches_scipy_and_a_table():
    x = [0.91, 0.93, 0.90, 0.95, 0.92]
    iv = claims.t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert iv.n == 5 and iv.low == pytest.approx(lo) and iv.high == pytest.approx(hi)
    # by hand with the tabled t(0.975, 4) = 2.776
    half = 2.776 * np.std(x, ddof=1) / math.sqrt(5)
    assert iv.high - np.mean(x) == pytest.approx(half, rel=1e-3)


def test_t_band_is_wider_than_the_old_normal_band_for_small_n():
    # mean 1, s.d. 1, n = 3: 2 s.e. = 1.155 would exclude 0, the t interval (4.30 s.e.) does not
    v = [0.0, 1.0, 2.0]
    assert AtLeast(limit=-0.2)(v).verdict == INCONCLUSIVE
    assert AtLeast(limit=-2.0)(v).verdict == HELD


def test_one_and_two_replicates_are_inconclusive():
    for v in ([0.001], [0.001, 0.0011]):
        j = AtMost(limit=0.5)(v)
        assert j.verdict == INCONCLUSIVE and j.why == "n < 3" and j.n == len(v)
    j = Exceeds()(([5.0, 6.0], [1.0, 1.5]))
    assert j.verdict == INCONCLUSIVE and j.why == "n < 3"
    assert AtMost(limit=0.5)([0.001, 0.0011, 0.0012]).verdict == HELD


def test_ties_are_inconclusive():
    # a paired difference of exactly zero, with no spread: neither held nor did not hold
    j = Exceeds(a_name="dense", b_name="ticket")(([100.0, 200.0, 300.0], [100.0, 200.0, 300.0]))
    assert j.verdict == INCONCLUSIVE and j.why == "tie"
    assert AtMost(limit=1.0)([1.0, 1.0, 1.0]).verdict == INCONCLUSIVE
    assert AtLeast(limit=1.0)([1.0, 1.0, 1.0]).verdict == INCONCLUSIVE


def test_at_most_at_least_use_the_interval():
    r = AtMost(limit=0.02)
    assert r([0.010, 0.011, 0.012]).verdict == HELD
    assert r([0.030, 0.031, 0.032]).verdict == NOT_HELD
    assert r([0.005, 0.035, 0.02]).verdict == INCONCLUSIVE
    assert r([]).verdict == NOT_MEASURED
    assert AtLeast(limit=0.9)([0.95, 0.96, 0.955]).verdict == HELD
    assert AtLeast(limit=0.9)([0.5, 0.51, 0.505]).verdict == NOT_HELD


def test_exceeds_paired_by_seed_and_welch():
    r = Exceeds(a_name="snip", b_name="magnitude", unit="pp")
    a = pd.Series([90.0, 91.0, 92.0], index=[0, 1, 2])
    b = pd.Series([80.0, 81.5, 82.0], index=[0, 1, 2])
    j = r((a, b))
    assert j.verdict == HELD and j.n == 3 and "pp" in j.ours and j.interval.startswith("[")
    assert r((b, a)).verdict == NOT_HELD
    assert r(([0.9, 0.8, 0.85], [0.85, 0.86, 0.84])).verdict == INCONCLUSIVE
    # pairs follow the seed labels, not the order
    shuffled = b.loc[[2, 0, 1]]
    assert r((a, shuffled)).ours == j.ours
    w = Exceeds(paired=False)(([5.0, 5.1, 4.9, 5.0], [1.0, 1.2, 0.9]))
    assert w.verdict == HELD and w.n == 3


def test_pooled_values_collapse_to_one_value_per_seed():
    # 3 seeds x 4 settings (say λ values): 12 rows, but n = 3 replicates
    rows = pd.DataFrame({"seed": np.repeat([0, 1, 2], 4), "lam": np.tile([1, 2, 3, 4], 3),
                         "gain": [1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0]})
    per = claims.seed_means(rows, "gain")
    assert per.index.tolist() == [0, 1, 2] and per.tolist() == [2.5, 1.0, 2.0]
    j = AtLeast(limit=0.0)(pd.Series(rows["gain"].to_numpy(), index=rows["seed"]))
    assert j.n == 3
    iv = claims.t_interval([2.5, 1.0, 2.0])
    assert j.interval == iv.text("{:.3g}")
    # 12 pooled values treated as independent would have given a far narrower interval
    assert claims.t_interval(rows["gain"].to_numpy()).high - claims.t_interval(rows["gain"].to_numpy()).low < \
        iv.high - iv.low


def test_within_uses_the_spread():
    assert Within(target=0.0, tol=0.5)([0.1, -0.1, 0.0]).verdict == HELD
    assert Within(target=0.0, tol=0.5)([2.0, 2.1, 1.9]).verdict == NOT_HELD
    assert Within(target=0.0, tol=0.5)([0.0, 1.0, -0.9]).verdict == INCONCLUSIVE
    assert Within(target=0.5, tol=0.05)([0.52]).verdict == INCONCLUSIVE  # n = 1


def test_fraction_with_an_inconclusive_part():
    f = Fraction(share=1.0, what="criteria")
    assert f([HELD, HELD, INCONCLUSIVE]).verdict == INCONCLUSIVE
    assert f([HELD, NOT_HELD, INCONCLUSIVE]).verdict == NOT_HELD
    assert f([HELD, HELD]).verdict == HELD
    g = Fraction(share=0.75, what="criteria")
    assert g([HELD, HELD, HELD, NOT_HELD]).verdict == HELD
    assert g([HELD, NOT_HELD]).verdict == NOT_HELD
    assert g([HELD, HELD, NOT_HELD, INCONCLUSIVE]).verdict == INCONCLUSIVE
    assert f([NOT_MEASURED]).verdict == NOT_MEASURED


def test_settled_and_not_settled_runs():
    step = np.arange(0, 100, 5)
    flat = pd.DataFrame({"step": step, "acc": 0.9 + 0.001 * np.sin(step)})
    rising = pd.DataFrame({"step": step, "acc": 0.5 + 0.004 * step})
    assert claims.settled(flat, "acc", 0.005, "step")
    assert not claims.settled(rising, "acc", 0.005, "step")
    value = [0.001, 0.0012, 0.0011]
    assert AtMost(limit=0.5)(Evidence(value, [True, True, True])).verdict == HELD
    j = AtMost(limit=0.5)(Evidence(value, [True, False, True], "accuracy still rising"))
    assert j.verdict == INCONCLUSIVE and j.why.startswith("not settled")


def test_bootstrap_correlation_coverage():
    """Percentile bootstrap over runs covers the true Spearman ρ about 95 % of the time (seeded)."""
    r = 0.6
    true_rho = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(0)
    cover, draws = 0, 120
    cov = [[1, r], [r, 1]]
    for _ in range(draws):
        runs = []
        for k in range(10):
            xy = rng.multivariate_normal([0, 0], cov, size=12)
            runs.append(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "run": k}))
        iv = claims.bootstrap_correlation(pd.concat(runs), n_boot=200, seed=int(rng.integers(1 << 30)))
        cover += iv.low <= true_rho <= iv.high
    assert 0.85 <= cover / draws <= 0.995


def test_correlated_rule_uses_the_interval():
    rng = np.random.default_rng(1)
    strong = pd.concat([pd.DataFrame({"x": x, "y": -x + 0.1 * rng.normal(size=20), "run": k})
                        for k, x in enumerate(rng.normal(size=(6, 20)))])
    assert Correlated(sign=-1.0, limit=-0.7)(strong).verdict == HELD
    assert Correlated(sign=-1.0, limit=0.5, absolute=True)(strong).verdict == NOT_HELD
    two = strong[strong.run < 2]
    assert Correlated(sign=-1.0, limit=-0.7)(two).why == "n < 3"


def test_seed_bootstrap_statistic():
    frame = pd.DataFrame({"seed": range(6), "v": [10.0, 10.2, 9.9, 10.1, 10.0, 9.8]})
    rule = SeedBootstrap(statistic=lambda f: f["v"].std(ddof=1) / f["v"].mean(), sign=-1.0, limit=0.15,
                         n_boot=300)
    assert rule(frame).verdict == HELD and rule(frame).n == 6
    assert rule(frame.iloc[:2]).verdict == INCONCLUSIVE


# --- the ledger ---------------------------------------------------------------------------------------

def test_ledger_saves_and_gather_collects(tmp_path):
    c = Claim("x is small", "Paper 2020, Table 1", "test error", AtMost(limit=0.1), paper="0.05")
    t = ledger("demo", [(c, [0.01, 0.02, 0.015]), (c, None)], profile="cpu", results_dir=tmp_path)
    assert t["verdict"].tolist() == [HELD, NOT_MEASURED]
    assert list(t.columns) == claims.COLUMNS and t["n"].tolist() == [3, 0]
    ledger("other", [(c, [0.5, 0.6, 0.55])], profile="cpu", results_dir=tmp_path)
    ledger("demo", [(c, [0.5, 0.6, 0.55])], profile="cpu", results_dir=tmp_path, budget=2)
    g = gather(tmp_path, profile="cpu")
    assert sorted(g["chapter"].unique()) == ["demo", "other"] and len(g) == 3
    assert gather(tmp_path, profile="cpu", budget=2)["verdict"].tolist() == [NOT_HELD]
    assert gather(tmp_path, profile="paper").empty
    assert claims.budgets(tmp_path, "cpu") == [1.0, 2.0]
    s = claims.stability(tmp_path, "cpu", 2.0)
    assert s["stable"].tolist() == [False]


def test_smoke_profile_judges_nothing(tmp_path):
    c = Claim("x is small", "Paper 2020", "test error", AtMost(limit=0.1))
    t = ledger("demo", [(c, [0.01, 0.02, 0.015]), (c, None)], profile="smoke", results_dir=tmp_path)
    assert t["verdict"].tolist() == [NOT_JUDGED, NOT_MEASURED]
    assert t["why"].iloc[0].startswith("smoke")


def test_budget_keys_and_comparison(tmp_path):
    assert claims.budget_key("cpu", 1) == "cpu" and claims.budget_key("cpu", 2) == "cpu-budget2"
    c = Claim("y holds", "P", "m", AtLeast(limit=0.0))
    t1 = ledger("ch", [(c, [1.0, 1.1, 0.9])], profile="cpu", results_dir=tmp_path)
    ledger("ch", [(c, [-1.0, -1.1, -0.9])], profile="cpu", results_dir=tmp_path, budget=2)
    cmp = claims.budget_comparison(t1, tmp_path, "cpu", 1.0)
    assert cmp["other"].tolist() == [NOT_HELD] and not cmp["stable"].iloc[0]


def test_exceeds_takes_per_seed_differences():
    d = pd.Series([1.0, 1.2, 0.9], index=[0, 1, 2])
    j = Exceeds(a_name="a", b_name="b")(d)
    assert j.verdict == HELD and j.n == 3
    assert j.ours == Exceeds(a_name="a", b_name="b")((d + 5.0, pd.Series(5.0, index=d.index))).ours


def test_average_ranks_are_scipys_to_the_bit():
    """claims.average_ranks (the bootstrap's ranking) against scipy.stats.rankdata: the same values on data
    with and without ties, so every Spearman ρ and bootstrap interval of the book is unchanged."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    cases = [rng.normal(size=50), rng.integers(0, 4, size=60).astype(float), np.round(rng.normal(size=40), 1),
             np.array([2.0, 2.0, 2.0]), np.array([1.0]), np.array([3.0, -1.0, 3.0, -1.0, 0.0]),
             np.array([-0.0, 0.0, 1e-300, -np.inf, np.inf])]
    for a in cases:
        ours = claims.average_ranks(a)
        assert ours.dtype == np.float64 and np.array_equal(ours, rankdata(a)), a
    x, y = rng.normal(size=120), np.round(rng.normal(size=120), 1)
    assert claims._spearman(x, y) == float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])
