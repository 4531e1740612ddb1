"""Model zoo: shapes, parameter counts of the papers, channel-group metadata, gate slots."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning_lib.gates import (
    ChannelGroup,
    GateSlot,
    clear_gates,
    get_gates,
    get_group,
    scale_channels,
    set_block_gates,
    set_gates,
    slot_of,
)
from pruning_lib.models import MODELS, PrunableModel, build_model

ALL = sorted(MODELS)
SMALL_NETS = [n for n in ALL if n != "resnet50"]


class ScaleGate(nn.Module):
    """Test gate: multiplies channels by a fixed vector."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x):
        return scale_channels(x, self.z)


def build_small(name: str, in_channels: int = 1, image_size: int = 28, **kw) -> nn.Module:
    """resnet50 is only run on a small 3x32x32 input and with narrow bottlenecks to stay fast."""
    if name == "resnet50":
        return build_model(name, in_channels=3, image_size=32, width=kw.pop("width", 0.25), **kw)
    return build_model(name, in_channels=in_channels, image_size=image_size, **kw)


def input_for(name: str, in_channels: int = 1, image_size: int = 28, n: int = 2) -> torch.Tensor:
    if name == "resnet50":
        in_channels, image_size = 3, 32
    return torch.randn(n, in_channels, image_size, image_size)


def check_groups_consistent(model: nn.Module) -> None:
    """All paths resolve; the producer's/norm's/slot's channel counts match the consumers' inputs."""
    modules = dict(model.named_modules())
    groups = model.channel_groups()
    assert len({g.name for g in groups}) == len(groups), "group names must be unique"
    for g in groups:
        assert isinstance(g, ChannelGroup)
        producer = modules[g.producer]
        assert isinstance(producer, (nn.Conv2d, nn.Linear)), g
        assert producer is not model.classifier, "the classifier's outputs are never a group"
        n = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        if g.norm is not None:
            assert isinstance(modules[g.norm], nn.BatchNorm2d) and modules[g.norm].num_features == n
        assert isinstance(modules[g.slot], GateSlot) and modules[g.slot].channels == n
        assert g.consumers
        for c in g.consumers:
            consumer = modules[c]
            if isinstance(consumer, nn.Conv2d):
                assert consumer.in_channels == n and consumer.weight.shape[1] == n
            elif isinstance(consumer, nn.Linear):
                assert consumer.in_features == n * g.spatial and consumer.weight.shape[1] == n * g.spatial
            else:
                assert isinstance(consumer, nn.BatchNorm2d) and consumer.num_features == n
    for m in model.modules():  # every module's attributes agree with its tensors
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)


@pytest.mark.parametrize("name", ALL)
def test_mnist_shape_and_features(name):
    torch.manual_seed(0)
    model = build_small(name).eval()
    assert isinstance(model, PrunableModel)
    x = input_for(name)
    with torch.no_grad():
        y = model(x)
        f = model.forward_features(x)
    assert y.shape == (2, 10)
    assert f.dim() == 2 and f.shape == (2, model.classifier.in_features)
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model.classifier(f), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALL_NETS)
def test_cifar_shape(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, image_size=32, num_classes=100).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 100)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_papers():
    assert n_params(build_model("lenet300_100")) == 266_610  # Han et al. 2015: 267K
    assert n_params(build_model("lenet5_caffe")) == 431_080  # Han et al. 2015: 431K
    cifar = dict(in_channels=3, image_size=32)
    # Frankle & Carbin 2019, Table 1: Conv-2 4.3M, Conv-4 2.4M weights.
    assert abs(n_params(build_model("conv2", **cifar)) - 4.3e6) < 0.02e6
    assert abs(n_params(build_model("conv4", **cifar)) - 2.4e6) < 0.05e6
    assert abs(n_params(build_model("resnet20", **cifar)) - 0.27e6) < 0.01e6
    assert abs(n_params(build_model("resnet56", **cifar)) - 0.86e6) < 0.01e6
    assert abs(n_params(build_model("vgg16_bn", **cifar)) - 14.7e6) < 0.1e6


def test_resnet50_matches_torchvision():
    import torchvision

    torch.manual_seed(0)
    ours = build_model("resnet50", in_channels=3, num_classes=1000).eval()
    ref = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
    assert n_params(ours) == 25_557_032
    ours.load_state_dict(ref.state_dict())  # same keys: torchvision checkpoints load
    assert ours.classifier is ours.fc
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_width_multiplier():
    m = build_model("lenet300_100", width=2)
    assert (m.head[0].out_features, m.head[3].out_features) == (600, 200)
    m = build_model("lenet300_100", hidden=(50, 40, 30), width=0.5)
    assert [g.name for g in m.channel_groups()] == ["fc1", "fc2", "fc3"]
    assert [m.get_submodule(g.producer).out_features for g in m.channel_groups()] == [25, 20, 15]
    m = build_model("lenet5_caffe", width=0.5)
    assert [m.get_submodule(g.producer).weight.shape[0] for g in m.channel_groups()] == [10, 25, 250]
    m = build_model("resnet20", in_channels=3, width=0.5)
    assert m.conv1.out_channels == 8 and m.classifier.in_features == 32
    m = build_model("vgg16_bn", width=0.01)  # rounding never goes below 1 channel
    assert min(m.get_submodule(g.producer).out_channels for g in m.channel_groups()) == 1


def test_unknown_model_lists_names():
    with pytest.raises(KeyError) as err:
        build_model("lenet9000")
    assert "lenet300_100" in str(err.value) and "resnet56" in str(err.value)
    with pytest.raises(ValueError):
        build_model("lenet9000")


@pytest.mark.parametrize("name", ALL)
def test_channel_groups_resolve_and_match(name):
    model = build_small(name, width=0.5) if name != "resnet50" else build_small(name)
    check_groups_consistent(model)
    # Residual outputs are never groups; blocks all have a branch slot.
    for path in model.residual_blocks():
        assert isinstance(model.get_submodule(path).branch_slot, GateSlot)


def test_group_layouts():
    m = build_model("lenet5_caffe")
    assert [(g.name, g.spatial) for g in m.channel_groups()] == [("conv1", 1), ("conv2", 16), ("fc1", 1)]
    assert m.channel_groups()[2].consumers == ("classifier",)
    assert [g.name for g in build_model("conv6").channel_groups()] == [f"conv{i}" for i in range(1, 7)] + [
        "fc1",
        "fc2",
    ]
    r = build_model("resnet20", in_channels=3)
    assert len(r.channel_groups()) == 9 and len(r.residual_blocks()) == 9
    g = get_group(r, "layer2.0.conv1")
    assert (g.norm, g.slot, g.consumers) == ("layer2.0.bn1", "layer2.0.slot1", ("layer2.0.conv2",))
    r50 = build_model("resnet50", in_channels=3, width=0.25)
    assert len(r50.channel_groups()) == 32 and len(r50.residual_blocks()) == 16
    assert get_group(r50, "layer3.1.conv2").consumers == ("layer3.1.conv3",)
    assert all(g.norm for g in build_model("small_vgg").channel_groups())
    with pytest.raises(KeyError):
        get_group(m, "nope")


@pytest.mark.parametrize("name", ALL)
def test_empty_slots_are_identity(name):
    torch.manual_seed(0)
    model = build_small(name).eval()
    x = input_for(name)
    # Empty slots hold nothing in the state_dict.
    assert not any(".gate." in k for k in model.state_dict())
    with torch.no_grad():
        y0 = model(x)
        # Replacing every slot by nn.Identity (i.e. a net without slots) gives the same function.
        bare = copy.deepcopy(model)
        for path, mod in list(bare.named_modules()):
            if isinstance(mod, GateSlot):
                parent, _, attr = path.rpartition(".")
                setattr(bare.get_submodule(parent) if parent else bare, attr, nn.Identity())
        assert not any(isinstance(m, GateSlot) for m in bare.modules())
        torch.testing.assert_close(bare(x), y0, rtol=0, atol=0)
        # Gates of ones leave it unchanged too; clearing restores the empty state.
        set_gates(model, {g.name: ScaleGate(torch.ones(slot_of(model, g).channels)) for g in model.channel_groups()})
        torch.testing.assert_close(model(x), y0)
        clear_gates(model)
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_gates_live_in_state_dict_and_survive_deepcopy():
    torch.manual_seed(0)
    model = build_model("lenet5_caffe").eval()
    z = torch.rand(20)
    set_gates(model, {"conv1": ScaleGate(z)})
    assert "features.1.gate.z" in model.state_dict()
    assert set(get_gates(model)) == {"conv1"}
    clone = copy.deepcopy(model)
    assert isinstance(slot_of(clone, "conv1").gate, ScaleGate)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
        # The gate is really applied.
        clear_gates(clone)
        assert not torch.allclose(clone(x), model(x))
    with pytest.raises(KeyError):
        set_gates(model, {"conv9": ScaleGate(z)})


def test_block_gates():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=3, width=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    block = model.layer1[0]
    with torch.no_grad():
        y0 = model(x)
        set_block_gates(model, {"layer1.0": ScaleGate(torch.zeros(1))})
        # A zero block gate leaves only the shortcut: block(x) == relu(x) == x after the stem's ReLU.
        h = model.relu(model.bn1(model.conv1(x)))
        torch.testing.assert_close(block(h), h)
        assert not torch.allclose(model(x), y0)
        clear_gates(model)
        torch.testing.assert_close(model(x), y0)


def test_scale_channels_shapes():
    x = torch.randn(4, 3, 5, 5)
    z = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(scale_channels(x, z), x * z[None, :, None, None])
    zn = torch.rand(4, 3)
    torch.testing.assert_close(scale_channels(x, zn), x * zn[:, :, None, None])
    x2 = torch.randn(4, 3)
    torch.testing.assert_close(scale_channels(x2, z), x2 * z)
    torch.testing.assert_close(scale_channels(x2, zn), x2 * zn)
    torch.testing.assert_close(scale_channels(x, torch.tensor([2.0])), 2 * x)
    torch.testing.assert_close(scale_channels(x, torch.tensor(2.0)), 2 * x)
    with pytest.raises(ValueError):
        scale_channels(x, torch.ones(4))
    # Gradients flow to both arguments.
    z = z.clone().requires_grad_(True)
    scale_channels(x, z).sum().backward()
    torch.testing.assert_close(z.grad, x.sum(dim=(0, 2, 3)))


def test_the_chapters_import_without_torchvision():
    """torchvision (and the torch._dynamo it imports) costs ~1.6 s per process: every notebook kernel and pool
    process imports the chapters, and only ResNet-50 needs it (pruning_lib.resnet50, imported on first use:
    built through the registry in the paper-profile tests). Nor do they import pyplot, seaborn or
    scipy.stats (1.3 s more): a process that only trains units never draws (pruning_lib.plotting)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from pruning_lib.chapters import (bernoulli_gates, comparison, dense_baselines, dep_l0, lnpt,\n"
            "    lottery_tickets, polarization)\n"
            "from pruning_lib import book, claims, report, units\n"
            "for name in ('torchvision', 'matplotlib.pyplot', 'seaborn', 'scipy.stats'):\n"
            "    assert name not in sys.modules, name + ' imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
