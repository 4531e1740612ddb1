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


def test_layer_flops_agree_with_torchs_flop_counter_on_every_model():
    """metrics counts FLOPs with forward hooks (FlopCounterMode imports torch._dynamo, ~2 s a process): the
    same numbers as torch's counter, layer by layer, on every registered model, a masked one, grouped
    convolutions and an empty layer."""
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    from pruning_lib.metrics import layer_flops
    from pruning_lib.models import MODELS, build_model
    from pruning_lib.masks import PRUNABLE_TYPES

    def reference(model, shape):
        model.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, *shape))
        prefix = type(model).__name__ + "."
        got = {k[len(prefix):]: int(sum(v.values())) for k, v in counter.get_flop_counts().items()
               if k.startswith(prefix)}
        return {n: got.get(n, 0) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}

    assert len(MODELS) >= 8
    for name in MODELS:
        big = name in ("resnet50", "vgg16_bn")
        shape = (3, 64, 64) if big else (1, 28, 28)
        model = build_model(name, num_classes=10, in_channels=shape[0], image_size=shape[1:],
                            width=0.25 if big else 0.5)
        ours = layer_flops(model, shape)
        assert ours == reference(model, shape), name
        assert sum(ours.values()) > 0 and not any(m._forward_hooks for m in model.modules())
    masked = build_model("lenet5_caffe", num_classes=10, in_channels=1, image_size=(28, 28))
    apply_mask(masked, Mask({"features.0.weight": torch.rand(masked.features[0].weight.shape) < 0.5}))
    assert layer_flops(masked, (1, 28, 28)) == reference(masked, (1, 28, 28))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.Flatten(),
                            nn.Linear(8 * 4 * 4, 0), nn.Linear(0, 5))
    assert layer_flops(net, (3, 8, 8)) == reference(net, (3, 8, 8))  # groups, and an empty layer
