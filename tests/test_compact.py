"""compact(): physically removing channels equals gating them, and parameter counts are as computed by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_lib.gates import compact
from pruning_lib.gates import GateSlot, get_gates, scale_channels, set_block_gates, set_gates, slot_of
from pruning_lib.models import MODELS, build_model

ALL = sorted(MODELS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ScaleGate(nn.Module):
    """Test gate: multiplies channels by a fixed vector (the deterministic gate of a pruning method)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x):
        return scale_channels(x, self.z)


def build_small(name: str, in_channels: int = 1, image_size: int = 28, **kw) -> nn.Module:
    """resnet50 only runs on 3x32x32 inputs here, to stay fast."""
    if name == "resnet50":
        in_channels, image_size = 3, 32
    return build_model(name, in_channels=in_channels, image_size=image_size, **kw)


def input_for(name: str, in_channels: int = 1, image_size: int = 28, n: int = 2) -> torch.Tensor:
    if name == "resnet50":
        in_channels, image_size = 3, 32
    return torch.randn(n, in_channels, image_size, image_size)


def check_consistent(model: nn.Module) -> None:
    """Every Conv/Linear/BN attribute agrees with its tensors, and groups' producers match their consumers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.bias.shape == m.running_mean.shape == m.running_var.shape
            assert m.weight.shape == (m.num_features,)
    for g in model.channel_groups():
        producer = model.get_submodule(g.producer)
        n = producer.weight.shape[0]
        if g.norm:
            assert model.get_submodule(g.norm).num_features == n
        assert model.get_submodule(g.slot).channels == n
        for c in g.consumers:
            consumer = model.get_submodule(c)
            assert consumer.weight.shape[1] == (n * g.spatial if isinstance(consumer, nn.Linear) else n)


def warm_up_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give every BN non-trivial statistics and affine parameters, so folding into them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.3 * torch.randn_like(x))
    model.eval()


def random_pruning(model: nn.Module, p_keep: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keep, scale = {}, {}
    for group in model.channel_groups():
        n = slot_of(model, group).channels
        mask = torch.rand(n, generator=g) < p_keep
        mask[torch.randint(n, (1,), generator=g)] = True  # all-False is tested separately
        keep[group.name] = mask
        scale[group.name] = 0.5 + torch.rand(n, generator=g)
    return keep, scale


def gate_with(model: nn.Module, keep, scale) -> None:
    dtype = next(model.parameters()).dtype
    set_gates(model, {k: ScaleGate((scale[k] * keep[k]).to(dtype)) for k in keep})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ALL)
def test_compact_equals_gated_model(name, dtype):
    torch.manual_seed(0)
    model = build_small(name, width=0.25).to(dtype)
    x = input_for(name, n=4).to(dtype)
    warm_up_bn(model, x)
    keep, scale = random_pruning(model)
    gate_with(model, keep, scale)
    n_before = count_parameters(model)

    small = compact(model, keep, scale)

    with torch.no_grad():
        expected = model(x)
        got = small(x)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert expected.abs().max() > 1e-3  # not a vacuous comparison of zeros
    # The original is untouched (still gated, same size); the result has empty slots and consistent modules.
    assert count_parameters(model) == n_before and len(get_gates(model)) == len(keep)
    assert not get_gates(small)
    assert all(m.gate is None for m in small.modules() if isinstance(m, GateSlot))
    check_consistent(small)
    for group in small.channel_groups():
        assert slot_of(small, group).channels == int(keep[group.name].sum())
    assert count_parameters(small) < n_before
    # forward_features/classifier contract still holds after compaction.
    with torch.no_grad():
        torch.testing.assert_close(small.classifier(small.forward_features(x)), got)


def test_lenet300_100_parameter_count_formula():
    model = build_model("lenet300_100")
    keep, _ = random_pruning(model, p_keep=0.3, seed=1)
    k1, k2 = int(keep["fc1"].sum()), int(keep["fc2"].sum())
    small = compact(model, keep)
    assert count_parameters(small) == (784 * k1 + k1) + (k1 * k2 + k2) + (k2 * 10 + 10)
    assert small.head[0].weight.shape == (k1, 784) and small.classifier.weight.shape == (10, k2)


def test_lenet5_caffe_parameter_count_formula():
    model = build_model("lenet5_caffe")
    keep, _ = random_pruning(model, p_keep=0.4, seed=2)
    c1, c2, f = (int(keep[k].sum()) for k in ("conv1", "conv2", "fc1"))
    small = compact(model, keep)
    # conv1 5x5 (1 -> c1), conv2 5x5 (c1 -> c2), fc1 (c2 * 4 * 4 -> f), classifier (f -> 10), all with biases.
    assert count_parameters(small) == (25 * c1 + c1) + (c1 * 25 * c2 + c2) + (c2 * 16 * f + f) + (f * 10 + 10)
    assert small.head[0].in_features == 16 * c2


def test_lenet5_flatten_blocks_are_sliced_per_channel():
    """Channel c of conv2 owns fc1 input features 16c .. 16c+15: check the surviving weights directly."""
    model = build_model("lenet5_caffe")
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[3, 17, 42]] = True
    small = compact(model, {"conv2": mask})
    w = model.head[0].weight
    expected = torch.cat([w[:, 16 * c : 16 * c + 16] for c in (3, 17, 42)], dim=1)
    torch.testing.assert_close(small.head[0].weight, expected, rtol=0, atol=0)


def test_keep_everything_without_scale_is_identity():
    torch.manual_seed(0)
    model = build_model("small_vgg")
    x = torch.randn(4, 1, 28, 28)
    warm_up_bn(model, x)
    keep = {g.name: torch.ones(slot_of(model, g).channels, dtype=torch.bool) for g in model.channel_groups()}
    small = compact(model, keep)
    assert count_parameters(small) == count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lenet300_100", "small_vgg", "resnet20"])
def test_all_false_group_keeps_one_zero_channel(name):
    torch.manual_seed(0)
    model = build_small(name, in_channels=3, image_size=32, width=0.5).double()
    x = input_for(name, in_channels=3, image_size=32, n=4).double()
    warm_up_bn(model, x)
    keep, scale = random_pruning(model)
    dead = model.channel_groups()[1].name
    keep[dead] = torch.zeros_like(keep[dead])
    gate_with(model, keep, scale)
    with pytest.warns(UserWarning, match="keeps no channel"):
        small = compact(model, keep, scale)
    assert slot_of(small, dead).channels == 1
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-9, rtol=1e-9)


def test_float_masks_scale_only_groups_and_validation():
    torch.manual_seed(0)
    model = build_model("lenet5_caffe").double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    z = torch.rand(500, dtype=torch.float64)
    # A group in `scale` but not in `keep` is only rescaled; float 0/1 masks are accepted.
    keep = {"conv1": (torch.arange(20) % 2).double()}
    set_gates(model, {"fc1": ScaleGate(z), "conv1": ScaleGate(keep["conv1"])})
    small = compact(model, keep, {"fc1": z})
    assert small.head[0].out_features == 500 and small.features[0].out_channels == 10
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    with pytest.raises(KeyError, match="conv1"):
        compact(model, {"conv7": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        compact(model, {"conv1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="negative"):
        compact(model, {}, {"conv1": -torch.ones(20)})


def test_compacted_model_trains_and_compacts_again():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=3, width=0.5)
    keep, _ = random_pruning(model)
    small = compact(model, keep)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    nn.functional.cross_entropy(small(x), y).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in small.parameters())
    keep2, _ = random_pruning(small, seed=5)
    smaller = compact(small, keep2)
    check_consistent(smaller)
    assert count_parameters(smaller) < count_parameters(small)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_block_scale_is_folded(name):
    torch.manual_seed(0)
    model = build_small(name, in_channels=3, image_size=32, width=0.25).double()
    x = input_for(name, in_channels=3, image_size=32, n=4).double()
    warm_up_bn(model, x)
    keep, scale = random_pruning(model)
    gate_with(model, keep, scale)
    blocks = model.residual_blocks()
    block_scale = {blocks[0]: 0.0, blocks[-1]: torch.tensor([0.7], dtype=torch.float64)}
    set_block_gates(
        model, {b: ScaleGate(torch.as_tensor(v, dtype=torch.float64).reshape(1)) for b, v in block_scale.items()}
    )
    small = compact(model, keep, scale, block_scale=block_scale)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-9, rtol=1e-9)
    # The residual path (stem, block outputs, shortcuts) keeps its width and parameters.
    assert small.conv1.out_channels == model.conv1.out_channels
    for path in blocks:
        new_b, old_b = small.get_submodule(path), model.get_submodule(path)
        last = "conv3" if hasattr(old_b, "conv3") else "conv2"
        assert getattr(new_b, last).out_channels == getattr(old_b, last).out_channels
        if old_b.downsample is not None:
            assert count_parameters(new_b.downsample) == count_parameters(old_b.downsample)
