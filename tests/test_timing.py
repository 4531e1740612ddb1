"""pruning_lib.timing: the one timing helper (what it calls and returns; no speed is asserted)."""
import math

import pytest
import torch

from pruning_lib.timing import best_forward_seconds, best_of, torch_threads


def test_best_of_calls_each_function_warmup_plus_repeats_times_inner():
    calls = [0, 0]
    fns = [lambda: calls.__setitem__(0, calls[0] + 1), lambda: calls.__setitem__(1, calls[1] + 1)]
    out = best_of(fns, repeats=4, inner=3, warmup=2)
    assert calls == [2 + 4 * 3, 2 + 4 * 3]
    assert len(out) == 2 and all(math.isfinite(t) and t >= 0 for t in out)


def test_best_of_rejects_empty_rounds():
    with pytest.raises(ValueError, match="at least 1"):
        best_of([lambda: None], repeats=0)


def test_best_forward_seconds_times_in_eval_mode_without_autograd():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    m = Probe().train()
    best_forward_seconds([m], torch.zeros(1), repeats=2)
    assert seen and all(s == (False, False) for s in seen)


def test_best_of_alternates_the_order_and_syncs_around_each_timed_round():
    log = []
    fns = [lambda: log.append("a"), lambda: log.append("b")]
    best_of(fns, repeats=3, warmup=1, alternate=True, sync=lambda: log.append("|"))
    assert "".join(log) == "ab" + "|a||b|" + "|b||a|" + "|a||b|"  # warm-up, then a b, b a, a b
    log.clear()
    best_of(fns, repeats=2, warmup=0)
    assert log == ["a", "b", "a", "b"]


def test_torch_threads_sets_the_count_for_the_block_and_restores_it():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 2):
        raise RuntimeError("a unit that fails")
    assert torch.get_num_threads() == before
