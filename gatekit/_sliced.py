"""Modules that run a layer on a subset of channels, sharing the weights of the layer they wrap.

Each takes ``(x, channels)``: ``channels`` is a :class:`ChannelSet`, and ``x`` holds only its
channels. A set holding every channel (``index`` None) runs the layer as it is: nothing sliced,
looked up or allocated. The sliced weights of the last few sets are cached (see :class:`WeightCache`).

On the batch-1 path, layers and tensors are read from ``_modules``, ``_parameters`` and ``_buffers``:
``nn.Module.__getattr__`` costs about 0.6 µs a lookup, and a sliced layer made several.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ChannelSet:
    """The gated channels a pass runs on: ``index`` (ascending int64 tensor, None for all of them),
    ``count`` of them, and ``key``, the bytes of the decision row it came from (a free cache key)."""

    index: Tensor | None
    count: int
    key: bytes


def _conv(conv: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    return _CONVOLUTIONS[weight.dim()](x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the weight's number of dimensions


def _output_spatial(conv: nn.modules.conv._ConvNd, x: Tensor) -> torch.Size:
    """Spatial size of ``conv``'s output on ``x``, at no cost: the same conv on zero samples (any
    padding mode or string, no arithmetic to keep in step with torch)."""
    probe = x.new_zeros((0, 1) + x.shape[2:])
    return _conv(conv, probe, conv.weight[:1, :1], None, 1).shape[2:]


def _no_channel_output(conv: nn.modules.conv._ConvNd, x: Tensor, channels: int, bias: Tensor | None) -> Tensor:
    """What ``conv`` outputs when no gated channel is active. torch has no conv with an empty weight,
    and running one channel only to mask it would cost MACs that dynamic_macs does not count."""
    output = x.new_zeros((x.shape[0], channels) + _output_spatial(conv, x))
    if bias is not None:
        output += bias.view((1, -1) + (1,) * (output.dim() - 2))
    return output


def can_slice(conv: nn.modules.conv._ConvNd) -> bool:
    """Zero padding only: other padding modes would need their own functional call."""
    return conv.padding_mode == "zeros"


Derived = tuple[Tensor | None, ...]


def stamp_of(tensors: Sequence[Tensor | None]) -> list[tuple[int, int]]:
    """Storage and version of each tensor: changes when one is edited in place or replaced."""
    try:
        return [(t.data_ptr(), t._version) for t in tensors if t is not None]
    except RuntimeError:  # an inference tensor, which keeps no version
        return [(t.data_ptr(), _version(t)) for t in tensors if t is not None]


class WeightCache:
    """Tensors derived from a layer's weights (slices), for the last ``size`` keys.

    Slicing gathers the weights on every call; a channel set that comes back (a saturated gate, a
    batch whose union covers every channel) reuses its slice. Entries go least recently used first,
    and all at once when a source tensor changes: in-place edits bump its version, assigning
    ``.data`` or moving the model changes its storage. Entries are computed without autograd: a
    sparse model is for inference. ``size=0`` computes on every call and keeps nothing.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, Derived] = OrderedDict()
        self.stamp: list[tuple[int, int]] = []

    def get(self, sources: tuple[Tensor | None, ...], key: bytes, compute: Callable[[], Derived]) -> Derived:
        """The entry for ``key``, made by ``compute`` unless kept since ``sources`` last changed."""
        if self.size == 0:
            with torch.no_grad():
                return compute()
        stamp = stamp_of(sources)
        if stamp != self.stamp:
            self.entries.clear()
            self.stamp = stamp
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        with torch.no_grad():
            found = self.entries[key] = compute()
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return found


def _version(tensor: Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) keep no version; they can be edited in
    # place only inside inference mode, which the cache then cannot see.
    return 0 if tensor.is_inference() else tensor._version


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """Channels-last (2d or 3d) if ``tensor`` is laid out so, else the default format."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    if channels_last is not None and tensor.is_contiguous(memory_format=channels_last) and not tensor.is_contiguous():
        return channels_last
    return torch.contiguous_format


def _laid_out_like(weight: Tensor, sliced: Tensor) -> Tensor:
    """``sliced`` in ``weight``'s memory format: index_select returns the default (channels-first)
    layout, and a channels-last model would then convert layouts around every sliced conv."""
    return sliced.contiguous(memory_format=memory_format_of(weight))


class OutputSlicedConv(nn.Module):
    """A conv computing only the output channels of the set (the first conv, or a depthwise conv)."""

    def __init__(self, conv: nn.modules.conv._ConvNd, *, cache_size: int = 0) -> None:
        super().__init__()
        self.conv = conv
        self.depthwise = conv.groups > 1
        self.cache = WeightCache(cache_size)

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        conv = self._modules["conv"]
        parameters = conv._parameters
        if channels.index is None:
            return conv._conv_forward(x, parameters["weight"], parameters["bias"])
        if channels.count == 0:
            return _no_channel_output(conv, x, 0, None)
        sources = (parameters["weight"], parameters["bias"])
        weight, bias = self.cache.get(sources, channels.key, lambda: self._slice(channels.index))
        return _conv(conv, x, weight, bias, channels.count if self.depthwise else 1)

    def _slice(self, active: Tensor) -> tuple[Tensor, Tensor | None]:
        weight = _laid_out_like(self.conv.weight, self.conv.weight.index_select(0, active))
        return weight, self.conv.bias.index_select(0, active) if self.conv.bias is not None else None


class SelectedDepthwiseConv(OutputSlicedConv):
    """A depthwise conv that makes the gated channels itself (the first layer of a block without an
    expansion): it reads the full input, so it picks the active input channels first."""

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        return super().forward(x if channels.index is None else x.index_select(1, channels.index), channels)


class OutputSlicedLinear(nn.Module):
    """A linear layer computing only the output features of the set (channels last, as in ConvNeXt)."""

    def __init__(self, linear: nn.Linear, *, cache_size: int = 0) -> None:
        super().__init__()
        self.linear = linear
        self.cache = WeightCache(cache_size)

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        linear = self.linear
        if channels.index is None:
            return F.linear(x, linear.weight, linear.bias)
        weight, bias = self.cache.get((linear.weight, linear.bias), channels.key, lambda: self._slice(channels.index))
        return F.linear(x, weight, bias)

    def _slice(self, active: Tensor) -> tuple[Tensor, Tensor | None]:
        bias = self.linear.bias.index_select(0, active) if self.linear.bias is not None else None
        return self.linear.weight.index_select(0, active), bias


class InputSlicedLinear(nn.Module):
    """A linear layer reading only the input features of the set."""

    def __init__(self, linear: nn.Linear, *, cache_size: int = 0) -> None:
        super().__init__()
        self.linear = linear
        self.cache = WeightCache(cache_size)

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        weights = self.linear.weight
        if channels.index is None:
            return F.linear(x, weights, self.linear.bias)
        (weight,) = self.cache.get((weights,), channels.key, lambda: (weights.index_select(1, channels.index),))
        return F.linear(x, weight, self.linear.bias)


class InputSlicedConv(nn.Module):
    """A conv reading only the input channels of the set (the consumer of the gated channels)."""

    def __init__(self, conv: nn.modules.conv._ConvNd, *, cache_size: int = 0) -> None:
        super().__init__()
        self.conv = conv
        self.cache = WeightCache(cache_size)

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        conv = self._modules["conv"]
        parameters = conv._parameters
        if channels.index is None:
            return conv._conv_forward(x, parameters["weight"], parameters["bias"])
        if channels.count == 0:  # every input channel is zero
            return _no_channel_output(conv, x, conv.out_channels, parameters["bias"])
        (weight,) = self.cache.get((parameters["weight"],), channels.key, lambda: self._slice(channels.index))
        return conv._conv_forward(x, weight, parameters["bias"])

    def _slice(self, active: Tensor) -> tuple[Tensor]:
        return (_laid_out_like(self.conv.weight, self.conv.weight.index_select(1, active)),)


class GroupedInputSlicedConv(nn.Module):
    """A grouped conv reading only the input channels of the set: one conv per group that has any.

    MAC-exact (each group costs its active channels), but one call per group: slow for many groups.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        conv, active = self.conv, channels.index
        if active is None:
            return conv._conv_forward(x, conv.weight, conv.bias)
        if channels.count == 0:  # every input channel is zero
            return _no_channel_output(conv, x, conv.out_channels, conv.bias)
        inputs_per_group = conv.in_channels // conv.groups
        outputs_per_group = conv.out_channels // conv.groups
        group_of = active // inputs_per_group
        pieces: list[Tensor | None] = []
        for group in range(conv.groups):
            positions = (group_of == group).nonzero().flatten()
            if positions.numel() == 0:
                pieces.append(None)
                continue
            rows = slice(group * outputs_per_group, (group + 1) * outputs_per_group)
            weight = conv.weight[rows].index_select(1, active.index_select(0, positions) - group * inputs_per_group)
            bias = conv.bias[rows] if conv.bias is not None else None
            pieces.append(_conv(conv, x.index_select(1, positions), weight, bias, 1))
        template = next(piece for piece in pieces if piece is not None)
        return torch.cat([piece if piece is not None else self._idle(template, group) for group, piece in enumerate(pieces)], 1)

    def _idle(self, template: Tensor, group: int) -> Tensor:
        """Output of a group none of whose inputs is active: its bias, or zeros."""
        outputs_per_group = self.conv.out_channels // self.conv.groups
        idle = template.new_zeros(template.shape)
        if self.conv.bias is not None:
            bias = self.conv.bias[group * outputs_per_group : (group + 1) * outputs_per_group]
            idle += bias.view((1, -1) + (1,) * (template.dim() - 2))
        return idle


class GroupedOutputSlicedConv(nn.Module):
    """A grouped conv computing only the output channels of the set: one conv per group that has
    any, each on its group's input channels (MAC-exact, one call per group)."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        conv, active = self.conv, channels.index
        if active is None:
            return conv._conv_forward(x, conv.weight, conv.bias)
        if channels.count == 0:
            return _no_channel_output(conv, x, 0, None)
        inputs_per_group = conv.in_channels // conv.groups
        group_of = active // (conv.out_channels // conv.groups)
        pieces = []
        for group in group_of.unique().tolist():  # ascending, as ``active`` is: the order is kept
            outputs = active[group_of == group]
            bias = conv.bias.index_select(0, outputs) if conv.bias is not None else None
            inputs = x[:, group * inputs_per_group : (group + 1) * inputs_per_group]
            pieces.append(_conv(conv, inputs, conv.weight.index_select(0, outputs), bias, 1))
        return torch.cat(pieces, 1)


class SlicedBatchNorm(nn.Module):
    """Eval-mode batch norm on the channels of the set; the sliced statistics are cached like weights."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, *, cache_size: int = 0) -> None:
        super().__init__()
        self.norm = norm
        self.cache = WeightCache(cache_size)

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        norm = self._modules["norm"]
        buffers, parameters = norm._buffers, norm._parameters
        sources = (buffers["running_mean"], buffers["running_var"], parameters["weight"], parameters["bias"])
        if channels.index is not None:
            if channels.count == 0:  # batch norm refuses zero channels, and there is nothing to normalise
                return x
            sources = self.cache.get(sources, channels.key, lambda: _selected(sources, channels.index))
        return F.batch_norm(x, *sources, False, 0.0, norm.eps)


def _selected(tensors: tuple[Tensor | None, ...], active: Tensor) -> Derived:
    return tuple(t.index_select(0, active) if t is not None else None for t in tensors)


class Widened(nn.Module):
    """A module that cannot be sliced, run at full width: exact, but it saves nothing on that module.

    ``widen_input`` puts the active channels back among zero channels first (the module reads
    the gated channels); ``select_output`` keeps only the active channels of its output (the module
    produces them). A missing module only widens: the branch goes on at full width.
    """

    def __init__(self, module: nn.Module | None, channels: int, *, widen_input: bool, select_output: bool) -> None:
        super().__init__()
        self.module = module
        self.channels = channels
        self.widen_input, self.select_output = widen_input, select_output

    def forward(self, x: Tensor, channels: ChannelSet) -> Tensor:
        active = channels.index
        if self.widen_input and active is not None:
            x = x.new_zeros((x.shape[0], self.channels) + x.shape[2:]).index_copy_(1, active, x)
        if self.module is not None:
            x = self.module(x)
        return x.index_select(1, active) if self.select_output and active is not None else x


def sliced(module: nn.Module | None, role: str, channels: int, *, cache_size: int = 0) -> nn.Module:
    """The wrapper running ``module`` on active channels only, for its role: "first", "chain",
    "consumer", or "widen" (no consumer: return to full width); ``cache_size``: see :class:`WeightCache`."""
    is_conv = isinstance(module, nn.modules.conv._ConvNd) and can_slice(module)
    if role == "first" and is_conv and module.groups == 1:
        return OutputSlicedConv(module, cache_size=cache_size)
    if role == "first" and is_conv and module.groups == module.in_channels == module.out_channels:
        return SelectedDepthwiseConv(module, cache_size=cache_size)
    if role == "first" and is_conv:  # grouped, not depthwise
        return GroupedOutputSlicedConv(module)
    if isinstance(module, nn.Linear) and role in ("first", "consumer"):
        wrapper = OutputSlicedLinear if role == "first" else InputSlicedLinear
        return wrapper(module, cache_size=cache_size)
    if role == "chain" and is_conv and module.groups == module.in_channels == module.out_channels:
        return OutputSlicedConv(module, cache_size=cache_size)
    if role == "chain" and is_plain_norm(module):
        return SlicedBatchNorm(module, cache_size=cache_size)
    if role == "consumer" and is_conv:
        if module.groups == 1:
            return InputSlicedConv(module, cache_size=cache_size)
        return GroupedInputSlicedConv(module)
    return Widened(module, channels, widen_input=role != "first", select_output=role in ("first", "chain"))


def is_plain_norm(module: nn.Module | None) -> bool:
    return type(module) in _PLAIN_BATCH_NORMS and module.track_running_stats


# Exactly these types: subclasses (timm's BatchNormAct2d) add work after the normalisation.
# SyncBatchNorm (a model finetuned with DDP) normalises with its running statistics in eval, as these do.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
