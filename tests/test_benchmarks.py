"""benchmarks/steps.py in a tiny run: every step kind is timed and its operators counted (the numbers of so
short a run mean nothing; no test asserts a speed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their helpers as top-level modules
    import _timing
    import steps

    return steps, _timing


def test_the_operator_count_is_the_operators_one_step_dispatches(bench):
    _, timing = bench
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    plain = timing.ops_per_step((lin, torch.optim.SGD(lin.parameters(), lr=0.1)), x, y)
    # one more module in the forward dispatches more operators in the forward and the backward
    two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    deeper = timing.ops_per_step((two, torch.optim.SGD(two.parameters(), lr=0.1)), x, y)
    assert 0 < plain < deeper
    assert timing.ops_per_step((lin, torch.optim.SGD(lin.parameters(), lr=0.1)), x, y) == plain


def test_steps_prints_every_kind_with_its_ratio_and_operator_count(bench, monkeypatch, capsys):
    steps, _ = bench
    monkeypatch.setattr(sys, "argv", ["steps.py", "--models", "lenet300_100", "--steps", "1", "--repeats", "1",
                                      "--threads", "1"])
    steps.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lenet300_100, batch 60, 1 threads")
    kinds = [k for k in steps.KINDS if k != "dense_nchw"]  # an MLP has one layout
    assert [line.split()[0] for line in lines[1:]] == kinds
    assert all("ratio to dense" in line and "ops/step" in line for line in lines[1:])
    assert lines[1].endswith("(1.00)")
