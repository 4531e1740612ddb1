"""Model zoo of the pruning papers, by name, with gate slots and channel-group metadata.

Every model is a :class:`PrunableModel`:

* ``forward(x) == self.classifier(self.forward_features(x))`` where ``classifier`` is the final ``nn.Linear``
  and ``forward_features`` returns the penultimate features ``[N, D]`` (used e.g. for the "learning gap"
  between a teacher and a student).
* ``channel_groups()`` lists the structurally prunable groups of channels (:class:`~pruning_lib.gates.ChannelGroup`);
  each has an empty :class:`~pruning_lib.gates.GateSlot` after its norm and before its activation.
* ``residual_blocks()`` lists the residual blocks (ResNets only) whose branch has a ``branch_slot``.

Input convention: images ``[N, in_channels, H, W]``; ``image_size`` (int or ``(H, W)``) is only needed by
models whose flatten size depends on it (MLPs, LeNet-5, Conv-N).  ``width`` multiplies every hidden width
(rounded, at least 1) so chapters can train several initial sizes; input channels and classes are never scaled.

Weights use PyTorch's default initialisation, except the ResNets (Kaiming-normal fan-out convs, BN = (1, 0)
as in He et al. 2016 / torchvision).  Chapters that follow a paper's initialisation re-initialise themselves.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .gates import ChannelGroup, GateSlot
from .masks import PRUNABLE_TYPES

__all__ = [
    "MODELS",
    "UnknownModelError",
    "register_model",
    "build_model",
    "PrunableModel",
    "SequentialNet",
    "BasicBlock",
    "CifarResNet",
    "scale_width",
    "glorot_init",
    "weights",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError, ValueError):
    """Raised by :func:`build_model` for a name that is not registered (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(*, num_classes, in_channels, image_size, width, **kwargs)``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return decorator


def glorot_init(model: nn.Module) -> nn.Module:
    """Glorot-normal weights and zero biases for linear and conv layers (Frankle & Carbin 2019)."""
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters (no buffers: a mask is kept separately), as a snapshot or a rewind
    point keeps them."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int | tuple[int, int] = 28,
    width: float = 1.0,
    **kwargs,
) -> nn.Module:
    """Build the registered model ``name`` (defaults: MNIST shape 1x28x28, 10 classes, width 1)."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return MODELS[name](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width, **kwargs
    )


def scale_width(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1."""
    return max(1, int(round(channels * width)))


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class PrunableModel(nn.Module):
    """Base class: ``forward = classifier(forward_features(x))`` plus the pruning metadata interface."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def channel_groups(self) -> list[ChannelGroup]:  # pragma: no cover - abstract
        raise NotImplementedError

    def residual_blocks(self) -> list[str]:
        """Paths of residual blocks with a ``branch_slot`` (none for plain feed-forward nets)."""
        return []


# --------------------------------------------------------------------------------------------------------
# Plain feed-forward nets: MLPs, LeNet-5, Conv-2/4/6, VGG
# --------------------------------------------------------------------------------------------------------


class SequentialNet(PrunableModel):
    """``features`` (convs) -> pool -> flatten -> ``head`` (hidden Linear layers) -> ``classifier``.

    Each conv is ``Conv2d -> [BatchNorm2d] -> GateSlot -> ReLU`` inside ``self.features``; ``"M"`` in ``convs``
    is a 2x2 max-pool.  Each hidden Linear is ``Linear -> GateSlot -> ReLU`` inside ``self.head``.  Every hidden
    conv/linear layer is a channel group, named ``conv1, conv2, ...`` and ``fc1, fc2, ...`` in order.

    Args:
        in_channels, image_size: input shape (``image_size`` fixes the flatten size unless ``global_pool``).
        convs: conv widths and ``"M"`` (max-pool) markers, e.g. ``[64, 64, "M"]``.
        fcs: hidden Linear widths after the flatten.
        num_classes: outputs of the final ``classifier`` Linear.
        kernel_size, padding: of every conv.
        batch_norm: BatchNorm2d after each conv (convs then have no bias, as it would be redundant).
        global_pool: adaptive average pool to 1x1 before the flatten (so any image size works).
        ceil_mode: of the max-pools; with it a 1x1 map pools to 1x1 (VGG-16 on 28x28 images).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int | tuple[int, int],
        convs: Sequence[int | str],
        fcs: Sequence[int],
        num_classes: int,
        kernel_size: int = 3,
        padding: int = 1,
        batch_norm: bool = False,
        global_pool: bool = False,
        ceil_mode: bool = False,
    ):
        super().__init__()
        h, w = _hw(image_size)
        c = in_channels
        # (name, producer, norm, slot) of every hidden layer in order, to derive the groups below.
        layers: list[tuple[str, str, str | None, str]] = []
        features: list[nn.Module] = []
        n_conv = 0
        for v in convs:
            if v == "M":
                features.append(nn.MaxPool2d(2, ceil_mode=ceil_mode))
                h, w = (-(-h // 2), -(-w // 2)) if ceil_mode else (h // 2, w // 2)
            else:
                n_conv += 1
                producer = f"features.{len(features)}"
                features.append(nn.Conv2d(c, int(v), kernel_size, padding=padding, bias=not batch_norm))
                norm = None
                if batch_norm:
                    norm = f"features.{len(features)}"
                    features.append(nn.BatchNorm2d(int(v)))
                slot = f"features.{len(features)}"
                features.append(GateSlot(int(v)))
                features.append(nn.ReLU())  # not in-place: hooks/gates may keep references to slot outputs
                layers.append((f"conv{n_conv}", producer, norm, slot))
                c = int(v)
                h, w = h + 2 * padding - kernel_size + 1, w + 2 * padding - kernel_size + 1
            if h < 1 or w < 1:
                raise ValueError(f"image_size {image_size} is too small for this architecture")
        self.features = nn.Sequential(*features)
        if global_pool:
            self.pool = nn.AdaptiveAvgPool2d(1)
            h = w = 1
        else:
            self.pool = nn.Identity()
        # Input features per channel of the first Linear after the flatten (1 for an MLP: "channels" = pixels).
        self._flat_spatial = h * w if n_conv else 1
        d = c * h * w
        head: list[nn.Module] = []
        for i, units in enumerate(fcs, start=1):
            producer = f"head.{len(head)}"
            head.append(nn.Linear(d, int(units)))
            slot = f"head.{len(head)}"
            head.append(GateSlot(int(units)))
            head.append(nn.ReLU())
            layers.append((f"fc{i}", producer, None, slot))
            d = int(units)
        self.head = nn.Sequential(*head)
        self.classifier = nn.Linear(d, num_classes)

        # Each hidden layer feeds the next producer (or the classifier); only the first Linear after the
        # last conv sees several features per channel.
        producers = [p for _, p, _, _ in layers] + ["classifier"]
        groups = []
        for i, (name, producer, norm, slot) in enumerate(layers):
            consumer = producers[i + 1]
            spatial = self._flat_spatial if name.startswith("conv") and not consumer.startswith("features") else 1
            groups.append(ChannelGroup(name, producer, norm, slot, (consumer,), spatial))
        self._groups = tuple(groups)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.head(torch.flatten(x, 1))

    def channel_groups(self) -> list[ChannelGroup]:
        return list(self._groups)


@register_model("lenet300_100")
def lenet300_100(
    *, num_classes=10, in_channels=1, image_size=28, width=1.0, hidden: Sequence[int] = (300, 100)
) -> SequentialNet:
    """LeNet-300-100 (LeCun et al. 1998; Han et al. 2015): MLP ``in_channels*H*W -> 300 -> 100 -> classes``.

    ``hidden`` overrides the hidden widths (any number of layers); ``width`` multiplies them.
    """
    h, w = _hw(image_size)
    return SequentialNet(
        in_channels=in_channels * h * w,  # flattened: the MLP's "channels" are pixels
        image_size=1,
        convs=[],
        fcs=[scale_width(u, width) for u in hidden],
        num_classes=num_classes,
    )


@register_model("lenet5_caffe")
def lenet5_caffe(*, num_classes=10, in_channels=1, image_size=28, width=1.0) -> SequentialNet:
    """Caffe's LeNet-5 variant (Han et al. 2015; Louizos et al. 2018): conv5x5 20 -> pool -> conv5x5 50 ->
    pool -> fc 500 -> classes, ReLU after every hidden layer, no BN.  431,080 parameters on 1x28x28."""
    return SequentialNet(
        in_channels=in_channels,
        image_size=image_size,
        convs=[scale_width(20, width), "M", scale_width(50, width), "M"],
        fcs=[scale_width(500, width)],
        num_classes=num_classes,
        kernel_size=5,
        padding=0,
    )


_CONV_N = {
    "conv2": [64, 64, "M"],
    "conv4": [64, 64, "M", 128, 128, "M"],
    "conv6": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
}


def _make_conv_n(name: str) -> Callable[..., SequentialNet]:
    def builder(*, num_classes=10, in_channels=1, image_size=28, width=1.0) -> SequentialNet:
        return SequentialNet(
            in_channels=in_channels,
            image_size=image_size,
            convs=[v if v == "M" else scale_width(v, width) for v in _CONV_N[name]],
            fcs=[scale_width(256, width), scale_width(256, width)],
            num_classes=num_classes,
        )

    builder.__name__ = name
    builder.__doc__ = (
        f"{name.capitalize()} of Frankle & Carbin (2019, lottery ticket): 3x3 convs {_CONV_N[name]} "
        "(padding 1, ReLU, no BN), then fc 256 -> 256 -> classes."
    )
    return builder


for _name in _CONV_N:
    register_model(_name)(_make_conv_n(_name))


@register_model("small_vgg")
def small_vgg(*, num_classes=10, in_channels=1, image_size=28, width=1.0) -> SequentialNet:
    """Small VGG-style net with BN for quick MNIST experiments (~1 min on 2 CPU cores for 4k images):
    3x3 convs 16-16-pool-32-32-pool-64-pool, global average pool, Linear(64, classes)."""
    cfg = [16, 16, "M", 32, 32, "M", 64, "M"]
    return SequentialNet(
        in_channels=in_channels,
        image_size=image_size,
        convs=[v if v == "M" else scale_width(v, width) for v in cfg],
        fcs=[],
        num_classes=num_classes,
        batch_norm=True,
        global_pool=True,
    )


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes=10, in_channels=3, image_size=32, width=1.0) -> SequentialNet:
    """CIFAR VGG-16 with BN (as in Liu et al. 2017 "network slimming" / Li et al. 2017, without the
    extra fc layers): 13 3x3 convs, 5 max-pools, adaptive avg-pool to 1x1, a single Linear(512, classes).

    Max-pools use ``ceil_mode`` so that 28x28 inputs (28-14-7-4-2-1) work; on 32x32 this changes nothing.
    """
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    return SequentialNet(
        in_channels=in_channels,
        image_size=image_size,
        convs=[v if v == "M" else scale_width(v, width) for v in cfg],
        fcs=[],
        num_classes=num_classes,
        batch_norm=True,
        global_pool=True,
        ceil_mode=True,
    )


# --------------------------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------------------------


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: ``relu(branch_slot(bn2(conv2(relu(slot1(bn1(conv1(x))))))) + shortcut(x))``.

    The shortcut (``downsample``) is a 1x1 conv + BN when the shape changes (He et al.'s option B), else the
    identity (``downsample is None``).  ``conv1``'s output channels are prunable (slot ``slot1``); the block
    output feeds a residual sum and is not.
    """

    expansion = 1
    branch_norm = "bn2"  # last norm of the residual branch: where a block gate value can be folded

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid_planes: int | None = None):
        super().__init__()
        mid = planes if mid_planes is None else mid_planes
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.slot1 = GateSlot(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.branch_slot = GateSlot(planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.slot1(self.bn1(self.conv1(x))))
        out = self.branch_slot(self.bn2(self.conv2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def inner_groups(self, prefix: str) -> list[ChannelGroup]:
        p = f"{prefix}."
        return [ChannelGroup(f"{p}conv1", f"{p}conv1", f"{p}bn1", f"{p}slot1", (f"{p}conv2",))]


class CifarResNet(PrunableModel):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): conv3x3 16 -> 3 stages of ``n`` BasicBlocks with 16/32/64
    channels (stride 2 at stages 2, 3) -> global avg-pool -> ``classifier``; depth ``6n + 2``."""

    def __init__(self, depth: int, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [scale_width(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for i, planes in enumerate(widths, start=1):
            blocks = []
            for j in range(n):
                stride = 2 if i > 1 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)
        _kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def residual_blocks(self) -> list[str]:
        return [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(len(getattr(self, f"layer{i}")))]

    def channel_groups(self) -> list[ChannelGroup]:
        return [g for path in self.residual_blocks() for g in self.get_submodule(path).inner_groups(path)]


@register_model("resnet20")
def resnet20(*, num_classes=10, in_channels=1, image_size=28, width=1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016), ~0.27M parameters at width 1."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("resnet56")
def resnet56(*, num_classes=10, in_channels=1, image_size=28, width=1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016), ~0.86M parameters at width 1."""
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("resnet50")
def resnet50(*, num_classes=10, in_channels=3, image_size=224, width=1.0) -> nn.Module:
    """torchvision ResNet-50 (``weights=None``) adapted to ``in_channels``; see
    :class:`pruning_lib.resnet50.ResNet50`."""
    from .resnet50 import ResNet50

    return ResNet50(num_classes=num_classes, in_channels=in_channels, width=width)


def __getattr__(name: str):
    # ResNet-50 subclasses torchvision's, and importing torchvision costs ~1.6 s (it imports torch._dynamo):
    # it lives in pruning_lib.resnet50, imported on first use, so the chapters that never build it (every
    # notebook kernel, every pool process) start without it
    if name in ("GatedBottleneck", "ResNet50"):
        from . import resnet50 as _r

        return getattr(_r, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
