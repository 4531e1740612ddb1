import torch
from torch import nn

from pruning_lib.masks import Mask, apply_mask
from pruning_lib.metrics import layer_table, summary


def test_flops_and_params_of_a_known_network():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    t = layer_table(m, (1, 28, 28)).set_index("layer")
    assert t.loc["0", "flops"] == 2 * 4 * 9 * 26 * 26  # 2 FLOPs per multiply-add
    assert t.loc["3", "flops"] == 2 * 4 * 26 * 26 * 10
    assert t.loc["0", "params"] == 4 * 9 + 4
    s = summary(m, (1, 28, 28))
    assert s["effective_params"] == s["params"] and s["speedup"] == 1.0


def test_effective_counts_follow_the_mask():
    m = nn.Sequential(nn.Flatten(), nn.Linear(100, 10, bias=False), nn.BatchNorm1d(10))
    keep = torch.zeros(10, 100, dtype=torch.bool)
    keep[:, :25] = True
    apply_mask(m, Mask({"1.weight": keep}))
    s = summary(m, (1, 10, 10))
    assert s["params"] == 1000 + 20 and s["effective_params"] == 250 + 20
    assert s["speedup"] == 4.0
