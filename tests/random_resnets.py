"""Residual networks built from a plain description, for the fuzz tests (tests/test_fuzz.py).

A :class:`NetSpec` says everything about the network: stem, stages of blocks, how each block writes
its branch, shortcut and add, and which containers hold the blocks. Hypothesis draws specs; a
failing one prints as a readable spec that rebuilds the same network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("basic", "bottleneck", "inverted", "single")
SHORTCUTS = ("identity", "projection", "subsample")
ADDS = ("plus", "shortcut_first", "torch.add", "iadd", "method", "method_", "torch.add_alpha")
SCALES = ("none", "constant", "layer_scale")
# "shared" calls every block that keeps its input's shape twice: one module, two residual adds.
CONTAINERS = ("sequential", "modulelist", "moduledict", "custom", "inline", "shared")


@dataclass(frozen=True)
class BlockSpec:
    width: int
    stride: int = 1
    branch: str = "basic"
    shortcut: str = "identity"  # identity is only possible at stride 1 and unchanged width
    add: str = "plus"
    scale: str = "none"
    preact: bool = False
    groups: int = 1  # of the bottleneck's middle conv (ResNeXt), a divisor of its width
    sequential_branch: bool = False  # branch as one nn.Sequential rather than attributes
    nested: bool = False  # a residual block inside the branch, after its first conv
    squeeze_excite: bool = False  # a squeeze-excitation on the first conv's channels (MobileNetV3)
    dropout: bool = False  # after the first conv's activation

    def keeps_shape(self, cin: int) -> bool:
        return self.stride == 1 and self.width == cin


@dataclass(frozen=True)
class NetSpec:
    in_channels: int
    stem: int
    stages: tuple[tuple[BlockSpec, ...], ...]
    containers: tuple[str, ...]  # one per stage
    outer: str = "sequential"  # how the stages themselves are held
    size: int = 8  # input height and width
    classes: int = 3
    seed: int = 0  # weights, BN statistics and gate decisions


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def _branch_layers(spec: BlockSpec, cin: int) -> list[nn.Module]:
    """The branch's layers in order; pre-activation blocks start with BN-ReLU and end on a conv."""
    width, stride = spec.width, spec.stride
    if spec.branch == "basic":
        convs = [_conv(cin, width, 3, stride), _conv(width, width, 3)]
    elif spec.branch == "bottleneck":
        middle = width * 2
        convs = [_conv(cin, middle, 1), _conv(middle, middle, 3, stride, spec.groups), _conv(middle, width, 1)]
    elif spec.branch == "inverted":
        expanded = cin * 3
        convs = [_conv(cin, expanded, 1), _conv(expanded, expanded, 3, stride, expanded), _conv(expanded, width, 1)]
    else:
        convs = [_conv(cin, width, 3, stride)]
    layers: list[nn.Module] = []
    for index, conv in enumerate(convs):
        last = index == len(convs) - 1
        if spec.preact:
            layers += [_norm(conv.in_channels), nn.ReLU(), conv]
        else:
            layers += [conv, _norm(conv.out_channels)] + ([] if last else [nn.ReLU()])
        if index == 0:
            layers += [nn.Dropout(0.2)] if spec.dropout else []
            layers += [SqueezeExcite(conv.out_channels)] if spec.squeeze_excite else []
            layers += [Block(BlockSpec(width=conv.out_channels), conv.out_channels)] if spec.nested else []
    return layers


class SqueezeExcite(nn.Module):
    """``x * sigmoid(expand(relu(reduce(pool(x)))))``, with biases, as in MobileNetV3 and EfficientNet."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(1, channels // 2), 1)
        self.expand = nn.Conv2d(max(1, channels // 2), channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class Branch(nn.Module):
    """The branch as attributes called one after another (what most hand-written blocks do)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.names = []
        for index, layer in enumerate(layers):
            name = f"{type(layer).__name__.lower()}{index}"
            setattr(self, name, layer)
            self.names.append(name)

    def forward(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def _shortcut(spec: BlockSpec, cin: int) -> nn.Module | None:
    if spec.shortcut == "identity":
        return None
    if spec.shortcut == "projection":
        return nn.Sequential(_conv(cin, spec.width, 1, spec.stride), _norm(spec.width))
    return Subsample(spec.stride, spec.width - cin)


class Subsample(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, pad the new channels with zeros."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x):
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


def residual_add(style: str, branch, shortcut):
    if style == "plus":
        return branch + shortcut
    if style == "shortcut_first":
        return shortcut + branch
    if style == "torch.add":
        return torch.add(branch, shortcut)
    if style == "iadd":
        branch += shortcut
        return branch
    if style == "method":
        return branch.add(shortcut)
    if style == "method_":
        return branch.add_(shortcut)
    return torch.add(shortcut, branch, alpha=0.5)


class Block(nn.Module):
    """A residual block as the spec says; without ``add_here`` the container adds (``inline``)."""

    def __init__(self, spec: BlockSpec, cin: int) -> None:
        super().__init__()
        self.spec, self.cin = spec, cin
        layers = _branch_layers(spec, cin)
        self.branch = nn.Sequential(*layers) if spec.sequential_branch else Branch(layers)
        self.shortcut = _shortcut(spec, cin)
        if spec.scale == "layer_scale":
            self.gamma = nn.Parameter(torch.rand(spec.width) + 0.5)

    def scaled_branch(self, x):
        out = self.branch(x)
        if self.spec.scale == "constant":
            return 0.5 * out
        if self.spec.scale == "layer_scale":
            return out * self.gamma.view(1, -1, 1, 1)
        return out

    def shortcut_of(self, x):
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x):
        out = residual_add(self.spec.add, self.scaled_branch(x), self.shortcut_of(x))
        return out if self.spec.preact else F.relu(out)


class Stage(nn.Module):
    """Blocks in one of several containers; ``inline`` writes every add in this forward."""

    def __init__(self, blocks: list[Block], container: str) -> None:
        super().__init__()
        self.container = container
        if container == "sequential":
            self.blocks = nn.Sequential(*blocks)
        elif container in ("modulelist", "inline", "shared"):
            self.blocks = nn.ModuleList(blocks)
        elif container == "moduledict":
            self.blocks = nn.ModuleDict({f"unit{i}": b for i, b in enumerate(blocks)})
        else:  # custom: the first block by name, the rest in a nested Sequential
            self.first = blocks[0]
            self.rest = nn.Sequential(*blocks[1:])

    def forward(self, x):
        if self.container == "sequential":
            return self.blocks(x)
        if self.container == "custom":
            return self.rest(self.first(x))
        blocks = self.blocks.values() if self.container == "moduledict" else self.blocks
        for block in blocks:
            if self.container == "inline":
                out = residual_add(block.spec.add, block.scaled_branch(x), block.shortcut_of(x))
                x = out if block.spec.preact else F.relu(out)
            elif self.container == "shared" and block.spec.keeps_shape(block.cin):
                x = block(block(x))
            else:
                x = block(x)
        return x


class RandomResNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(spec.in_channels, spec.stem, 3), _norm(spec.stem), nn.ReLU())
        stages, cin = [], spec.stem
        for blocks, container in zip(spec.stages, spec.containers):
            built = []
            for block in blocks:
                built.append(Block(block, cin))
                cin = block.width
            stages.append(Stage(built, container))
        self.stages = nn.Sequential(*stages) if spec.outer == "sequential" else nn.ModuleList(stages)
        self.head = nn.Linear(cin, spec.classes)

    def forward(self, x):
        x = self.stem(x)
        if isinstance(self.stages, nn.Sequential):
            x = self.stages(x)
        else:
            for stage in self.stages:
                x = stage(x)
        return self.head(x.mean((2, 3)))


def expected_shortcuts(spec: NetSpec) -> list[str]:
    """The shortcut kind of every residual add of ``spec``'s network, in graph order."""
    kinds = {"identity": "identity", "projection": "projection", "subsample": "parameter-free"}
    found, cin = [], spec.stem
    for blocks, container in zip(spec.stages, spec.containers):
        for block in blocks:
            calls = 2 if container == "shared" and block.keeps_shape(cin) else 1
            # A nested block's add comes first: it is inside the outer branch.
            found += ((["identity"] if block.nested else []) + [kinds[block.shortcut]]) * calls
            cin = block.width
    return found


def build(spec: NetSpec) -> RandomResNet:
    """The network of ``spec`` in eval mode, with random BN statistics so that no branch is trivial."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = RandomResNet(spec)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.weight.data = torch.rand(size, generator=generator) * 0.5 + 0.5
            module.bias.data = torch.randn(size, generator=generator) * 0.2
            module.running_mean = torch.randn(size, generator=generator) * 0.2
            module.running_var = torch.rand(size, generator=generator) + 1.0
    return model.eval()
