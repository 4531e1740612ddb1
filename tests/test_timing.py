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


def test_each_network_is_timed_in_every_memory_format_it_can_run_in_and_keeps_its_faster_one(monkeypatch):
    from torch import nn

    from pruning_lib import timing

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(128, 2))
    before = [p.detach().clone() for p in conv.parameters()]
    seen = []  # (model, memory format of the input) of every timed call

    def fake_best_of(fns, repeats, inner=1, warmup=1, **kw):
        for fn in fns:
            fn()
        # "faster": the first conv copy in channels-last, the second contiguous
        return [2.0, 1.0, 3.0, 1.0, 2.0][:len(fns)]

    real_forward = nn.Sequential.forward

    def spy(self, x):
        seen.append((self, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        return real_forward(self, x)

    monkeypatch.setattr(timing, "best_of", fake_best_of)
    monkeypatch.setattr(nn.Sequential, "forward", spy)
    x = torch.randn(2, 2, 8, 8)
    # conv: contiguous (variant 0), channels-last (1); mlp on a 4-d input: it has no 2-d convolution, so
    # contiguous only (2); then a second conv copy: contiguous (3), channels-last (4)
    times, layouts = timing.best_layout_forward_seconds([conv, mlp, conv], x, repeats=1)
    assert len(seen) == 5 and [nhwc for _, nhwc in seen] == [False, True, False, False, True]
    assert all(m is not conv and m is not mlp for m, _ in seen)  # copies are timed, not the models
    assert layouts == ["channels_last", "contiguous", "contiguous"] and times == [1.0, 3.0, 1.0]
    assert all(torch.equal(p, q) and p.is_contiguous() for p, q in zip(conv.parameters(), before))
    # a 2-d input is never channels-last
    assert timing._layouts_for(conv, torch.randn(2, 64)) == ["contiguous"]
    assert timing._layouts_for(conv, x) == ["contiguous", "channels_last"]
    # one format asked for: a convolutional network gets it, another runs contiguous (its format is moot)
    assert timing._layouts_for(conv, x, ("channels_last",)) == ["channels_last"]
    assert timing._layouts_for(mlp, x, ("channels_last",)) == ["contiguous"]
