"""Residual networks built from a plain description, for the fuzz tests (tests/test_fuzz.py).

A :class:`NetSpec` says everything about the network: stem, stages of blocks, how each block writes
its branch, shortcut and add, and which containers hold the blocks. Hypothesis draws specs; a
failing one prints as a readable spec that rebuilds the same network.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("basic", "bottleneck", "inverted", "single")
# "partial" adds the input to the branch's first channels only: cat([out[:, :cin] + x, out[:, cin:]]).
SHORTCUTS = ("identity", "projection", "subsample", "partial")
ADDS = ("plus", "shortcut_first", "torch.add", "iadd", "method", "method_", "torch.add_alpha")
SCALES = ("none", "constant", "layer_scale")
# "shared" calls every block that keeps its input's shape twice: one module, two residual adds.
# "fusion" ends the stage HRNet-like: two parallel paths, each added to the other, outputs concatenated.
CONTAINERS = ("sequential", "modulelist", "moduledict", "custom", "inline", "shared", "fusion")
# How a block meets torch.split/chunk: "inside" its branch starts with cat(chunk(x)); "piece" runs the
# residual block on the second of two pieces of its input and concatenates the first back.
SPLITS = ("none", "inside", "piece")


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
    split: str = "none"  # one of SPLITS; "piece" needs stride 1, an identity shortcut and cin >= 2
    leak: bool = False  # the branch output is also read outside the add: the block cannot be gated

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
    if spec.shortcut in ("identity", "partial"):
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
    """A residual block as the spec says; in an ``inline`` stage the stage's forward adds."""

    def __init__(self, spec: BlockSpec, cin: int) -> None:
        super().__init__()
        self.spec, self.cin = spec, cin
        if spec.split == "piece":  # the residual block proper sees the second piece only
            self.kept = cin // 2
            cin = cin - self.kept
            spec = replace(spec, width=cin, split="none")
        self.inner_spec = spec
        layers = _branch_layers(spec, cin)
        self.branch = nn.Sequential(*layers) if spec.sequential_branch else Branch(layers)
        self.shortcut = _shortcut(spec, cin)
        if spec.scale == "layer_scale":
            self.gamma = nn.Parameter(torch.rand(spec.width) + 0.5)

    def scaled_branch(self, x):
        out = self.branch(torch.cat(torch.chunk(x, 2, 1), 1) if self.spec.split == "inside" else x)
        if self.spec.scale == "constant":
            return 0.5 * out
        if self.spec.scale == "layer_scale":
            return out * self.gamma.view(1, -1, 1, 1)
        return out

    def shortcut_of(self, x):
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x):
        return block_output(self, x)


def block_output(block: Block, x):
    """The block's output; an ``inline`` stage calls this from its own forward, so the add is there."""
    spec = block.spec
    if spec.split == "piece":
        kept, piece = torch.split(x, [block.kept, block.cin - block.kept], 1)
        return torch.cat([kept, _residual(block, block.inner_spec, piece)], 1)
    return _residual(block, spec, x)


def _residual(block: Block, spec: BlockSpec, x):
    branch = block.scaled_branch(x)
    if spec.shortcut == "partial":  # the input goes to the branch's first channels only
        cin = block.cin
        out = torch.cat([residual_add(spec.add, branch[:, :cin], x), branch[:, cin:]], 1)
    else:
        out = residual_add(spec.add, branch, block.shortcut_of(x))
    out = out if spec.preact else F.relu(out)
    # Reading the branch once more after the add: closing a gate could not skip it.
    return out + branch.mean((2, 3), keepdim=True) if spec.leak else out


class Stage(nn.Module):
    """Blocks in one of several containers; ``inline`` writes every add in this forward."""

    def __init__(self, blocks: list[Block], container: str, width: int) -> None:
        super().__init__()
        self.container = container
        if container == "fusion":
            self.fusion = Fusion(width)
        if container in ("sequential", "fusion"):
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
        if self.container == "fusion":
            return self.fusion(self.blocks(x))
        if self.container == "custom":
            return self.rest(self.first(x))
        blocks = self.blocks.values() if self.container == "moduledict" else self.blocks
        for block in blocks:
            if self.container == "inline":
                x = block_output(block, x)
            elif self.container == "shared" and block.spec.keeps_shape(block.cin):
                x = block(block(x))
            else:
                x = block(x)
        return x


class Fusion(nn.Module):
    """Two parallel paths exchanging values, as HRNet's fusion layers do, then a torch.cat of both.

    ``low = x + across(high)`` cannot be gated (``high`` also feeds ``mixed``); ``mixed = high +
    deep(x)`` is a block with a projection shortcut (``high``) that can.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.high = nn.Sequential(_conv(channels, channels, 3), _norm(channels), nn.ReLU())
        self.across = _conv(channels, channels, 1)
        self.deep = nn.Sequential(_conv(channels, channels, 3), nn.ReLU(), _conv(channels, channels, 1))
        self.merge = _conv(2 * channels, channels, 1)

    def forward(self, x):
        high = self.high(x)
        low = x + self.across(high)
        mixed = high + self.deep(x)
        return self.merge(torch.cat([low, mixed], 1))


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
            stages.append(Stage(built, container, cin))
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
    """The shortcut kind of every gated residual add of ``spec``'s network, in graph order."""
    kinds = {"identity": "identity", "projection": "projection", "subsample": "parameter-free", "partial": "parameter-free"}
    found, cin = [], spec.stem
    for blocks, container in zip(spec.stages, spec.containers):
        for block in blocks:
            calls = 2 if container == "shared" and block.keeps_shape(cin) else 1
            # A nested block's add comes first: it is inside the outer branch. A leaking one is skipped.
            found += ((["identity"] if block.nested else []) + ([] if block.leak else [kinds[block.shortcut]])) * calls
            cin = block.width
        found += ["projection"] if container == "fusion" else []
    return found


def expected_skipped(spec: NetSpec) -> int:
    """How many residual adds of ``spec``'s network cannot be gated: leaking blocks, fusion adds."""
    count, cin = 0, spec.stem
    for blocks, container in zip(spec.stages, spec.containers):
        for block in blocks:
            count += block.leak * (2 if container == "shared" and block.keeps_shape(cin) else 1)
            cin = block.width
        count += container == "fusion"
    return count


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
