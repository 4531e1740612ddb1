"""torchvision's ResNet-50 with gate slots (He et al. 2016), the ImageNet model of the paper profiles.

Apart from :mod:`pruning_lib.models` because it subclasses torchvision's classes, and importing torchvision
costs about 1.6 s per process; ``models.build_model("resnet50")`` imports this module on first use.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck as _TVBottleneck

from .gates import ChannelGroup, GateSlot
from .models import PrunableModel, scale_width

__all__ = ["GatedBottleneck", "ResNet50"]


class GatedBottleneck(_TVBottleneck):
    """torchvision's Bottleneck with gate slots (same parameters and state_dict keys).

    ``conv1 -> bn1 -> slot1 -> relu -> conv2 -> bn2 -> slot2 -> relu -> conv3 -> bn3 -> branch_slot``, plus the
    shortcut.  ``conv1`` and ``conv2`` outputs are prunable; ``conv3`` feeds the residual sum and is not.
    """

    branch_norm = "bn3"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot1 = GateSlot(self.bn1.num_features)
        self.slot2 = GateSlot(self.bn2.num_features)
        self.branch_slot = GateSlot(self.bn3.num_features)
        self.relu = nn.ReLU()  # not in-place (torchvision's is): gates/hooks may keep the slot outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.slot1(self.bn1(self.conv1(x))))
        out = self.relu(self.slot2(self.bn2(self.conv2(out))))
        out = self.branch_slot(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def inner_groups(self, prefix: str) -> list[ChannelGroup]:
        p = f"{prefix}."
        return [
            ChannelGroup(f"{p}conv1", f"{p}conv1", f"{p}bn1", f"{p}slot1", (f"{p}conv2",)),
            ChannelGroup(f"{p}conv2", f"{p}conv2", f"{p}bn2", f"{p}slot2", (f"{p}conv3",)),
        ]


class ResNet50(PrunableModel, torchvision.models.ResNet):
    """torchvision ResNet-50 (He et al. 2016) with gate slots; parameter names match torchvision's, so
    torchvision checkpoints load directly.  The final Linear keeps torchvision's name ``fc``;
    ``self.classifier`` is an alias of it.

    ``in_channels != 3`` replaces the stem conv.  ``width`` scales the bottleneck inner widths (torchvision's
    ``width_per_group = 64 * width``), i.e. exactly the prunable channels; block outputs (256..2048) are kept.
    """

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        torchvision.models.ResNet.__init__(
            self, GatedBottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=scale_width(64, width)
        )
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def residual_blocks(self) -> list[str]:
        return [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in range(len(getattr(self, f"layer{i}")))]

    def channel_groups(self) -> list[ChannelGroup]:
        return [g for path in self.residual_blocks() for g in self.get_submodule(path).inner_groups(path)]
