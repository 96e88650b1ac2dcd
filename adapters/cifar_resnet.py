"""ResNets for CIFAR-10 (3 x 32 x 32) and MNIST-like data (1 x 28 x 28), after He et al. 2016, section 4.2.

Depth 6n + 2: a 3x3 stem conv with 16 filters, three stages of n basic blocks with 16, 32 and 64
filters (stride 2 where the stage starts), global average pooling and a linear classifier.

``widths`` sets each block's inner width (the filters of its first conv) for statically pruned
variants: a ResNet20 whose block-internal channels were pruned is ``cifar/resnet20`` with
``widths=[...]``, so it saves, loads and profiles like any registered model.

Shortcuts where the shape changes: option "A" (the default, as in the paper's CIFAR experiments)
subsamples and zero-pads the channels, adding no parameters; option "B" uses a 1x1 projection conv
with batch norm.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gatekit.errors import GatekitError

from ._registry import register_model

DEPTHS = (8, 14, 20, 32, 44, 56, 110)


class ZeroPadShortcut(nn.Module):
    """Option A: keep every second pixel, then pad the new channels with zeros."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str, width: int | None = None) -> None:
        super().__init__()
        width = width or planes
        self.conv1 = nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. 2016 for small images."""

    def __init__(
        self, depth: int = 20, *, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A",
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise GatekitError(f"CIFAR ResNet depth {depth} is not 6n + 2 of the paper; use one of {DEPTHS}.")
        if shortcut not in ("A", "B"):
            raise GatekitError(f"shortcut={shortcut!r}: use 'A' (zero padding) or 'B' (projection).")
        blocks_per_stage = (depth - 2) // 6
        if widths is not None and (
            len(widths) != 3 * blocks_per_stage or not all(isinstance(w, int) and w > 0 for w in widths)
        ):
            raise GatekitError(
                f"widths={widths!r}: give one positive int per block ({3 * blocks_per_stage} for depth {depth}), "
                f"the number of filters of its first conv."
            )
        block_widths = iter(widths or [None] * (3 * blocks_per_stage))
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1, shortcut, next(block_widths)))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int) -> None:
    @register_model(f"cifar/resnet{depth}", input_size=(3, 32, 32), description=f"ResNet{depth} for CIFAR-10")
    def cifar(**kwargs) -> CifarResNet:
        return CifarResNet(depth, **kwargs)

    @register_model(f"mnist/resnet{depth}", input_size=(1, 28, 28), description=f"ResNet{depth} for 1 x 28 x 28 images")
    def mnist(**kwargs) -> CifarResNet:
        return CifarResNet(depth, in_chans=kwargs.pop("in_chans", 1), **kwargs)


for _depth in DEPTHS:
    _register(_depth)
