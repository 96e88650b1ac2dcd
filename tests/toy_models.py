"""Small residual networks written the different ways people write residual adds."""
import torch
import torch.nn.functional as F
from torch import nn


class AddStyleBlock(nn.Module):
    """A basic block whose residual add is written as `style`."""

    def __init__(self, channels: int, style: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.style = style

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.style == "plus":
            out = out + x
        elif self.style == "shortcut_first":
            out = x + out
        elif self.style == "torch.add":
            out = torch.add(out, x)
        elif self.style == "iadd":
            out += x
        elif self.style == "method":
            out = out.add(x)
        return F.relu(out)


class ToyResNet(nn.Module):
    def __init__(self, style: str = "plus", blocks: int = 2, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(AddStyleBlock(channels, style) for _ in range(blocks)))
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class InlineResidual(nn.Module):
    """Residual adds in the root forward itself: no block module to name them by."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        return x.mean((1, 2, 3))


class PlainCNN(nn.Module):
    """VGG-style: convolutions and no residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class DataDependentBlock(nn.Module):
    """Control flow on tensor values, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.conv(x)
        return x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = DataDependentBlock()

    def forward(self, x):
        return self.body(self.stem(x))
