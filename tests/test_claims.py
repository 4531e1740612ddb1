
from pruning_lib.claims import (HELD, INCONCLUSIVE, NOT_HELD, NOT_MEASURED, AtLeast, AtMost, Claim, Exceeds,
                                Fraction, Within, gather, ledger)


def test_at_most_uses_spread():
    r = AtMost(limit=0.02)
    assert r([0.010, 0.011, 0.012])[0] == HELD
    assert r([0.030, 0.031, 0.032])[0] == NOT_HELD
    assert r([0.005, 0.035, 0.02])[0] == INCONCLUSIVE
    assert r([])[0] == NOT_MEASURED


def test_at_least_and_within():
    assert AtLeast(limit=0.9)([0.95, 0.96])[0] == HELD
    assert AtLeast(limit=0.9)([0.5, 0.51])[0] == NOT_HELD
    assert Within(target=0.5, tol=0.05)(0.52)[0] == HELD
    assert Within(target=0.5, tol=0.05)(0.6)[0] == NOT_HELD


def test_exceeds_paired():
    r = Exceeds(a_name="snip", b_name="magnitude")
    assert r(([0.9, 0.91, 0.92], [0.8, 0.81, 0.82]))[0] == HELD
    assert r(([0.8, 0.81, 0.82], [0.9, 0.91, 0.92]))[0] == NOT_HELD
    assert r(([0.9, 0.8, 0.85], [0.85, 0.86, 0.84]))[0] == INCONCLUSIVE


def test_fraction():
    assert Fraction(share=0.75, what="criteria")([True, True, True, False])[0] == HELD
    assert Fraction(share=0.75, what="criteria")([True, False])[0] == NOT_HELD


def test_ledger_saves_and_gather_collects(tmp_path):
    c = Claim("x is small", "Paper 2020, Table 1", "test error", AtMost(limit=0.1), paper="0.05")
    t = ledger("demo", [(c, [0.01, 0.02]), (c, None)], profile="smoke", results_dir=tmp_path)
    assert t["verdict"].tolist() == [HELD, NOT_MEASURED]
    ledger("other", [(c, 0.5)], profile="smoke", results_dir=tmp_path)
    ledger("demo", [(c, 0.5)], profile="cpu", results_dir=tmp_path)  # another profile: kept apart
    g = gather(tmp_path, profile="smoke")
    assert sorted(g["chapter"].unique()) == ["demo", "other"] and len(g) == 3
    assert gather(tmp_path, profile="cpu")["verdict"].tolist() == [NOT_HELD]
    assert gather(tmp_path, profile="paper").empty
