"""Where a block's channel gate goes: the layer whose filters it turns off, the channel-wise ops
those channels run through, and the layer that reads them next (the consumer).

Found from the graph's structure, like the blocks themselves: a layer is chosen by where it sits and
what its module computes (conv or linear, depthwise or not), never by class or module names. A
squeeze-excitation on the gated channels is recognised by its shape: a spatial pool, two layers, a
per-channel product. See docs/design.md, "Where the gates act".
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# Ops that act on each channel on its own: a channel zeroed before them stays irrelevant after them.
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.elu, torch.sigmoid, F.sigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}

# The subset that acts on each element alone, whatever the layout: the only ops allowed between two
# linear layers, whose channels are the last dimension (batch norm, pooling and depthwise convs index
# dimension 1).
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = _CHANNELWISE_FUNCTIONS - {F.max_pool2d, F.avg_pool2d}
# Elementwise ops with f(0) = 0. Past a squeeze-excitation the mask is already applied, and a masked
# channel must still be zero when the consumer reads it (sparse execution does not compute it at all).
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Dropout, nn.Identity,
)
_ZERO_PRESERVING_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.elu, torch.tanh, F.dropout,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous"}
# A squeeze-excitation's squeeze: one value per channel from all spatial positions.
_SPATIAL_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_SPATIAL_POOL_FUNCTIONS = {torch.mean, torch.amax, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                           F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_SPATIAL_POOL_METHODS = {"mean", "amax"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


def register_channelwise_module(module_type: type[nn.Module]) -> type[nn.Module]:
    """Declare that ``module_type`` treats each channel on its own (a drop-path, a norm, ...).

    Channel gates are placed after such modules, so that skipped channels skip them too.
    """
    global _CHANNELWISE_MODULES
    _CHANNELWISE_MODULES = _CHANNELWISE_MODULES + (module_type,)
    return module_type


def is_conv(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(
        graph_module.get_submodule(node.target), nn.modules.conv._ConvNd
    )


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups == module.in_channels == module.out_channels
    )


def _is_channelwise(graph_module: fx.GraphModule, node: fx.Node, channel_dim: int = 1) -> bool:
    if channel_dim != 1:  # channels last: only ops that do not index dimension 1
        return _is_in(graph_module, node, _ELEMENTWISE_MODULES, _ELEMENTWISE_FUNCTIONS, _CHANNELWISE_METHODS)
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return isinstance(module, _CHANNELWISE_MODULES) or _is_depthwise(module)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS
    return False


def _is_in(graph_module: fx.GraphModule, node: fx.Node, modules: tuple, functions: set, methods: set) -> bool:
    """Whether ``node`` calls a module of one of the types ``modules``, or one of ``functions`` or ``methods``."""
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_layer(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """A conv or a linear layer: what a channel gate can turn filters of."""
    return node.op == "call_module" and isinstance(
        graph_module.get_submodule(node.target), (nn.modules.conv._ConvNd, nn.Linear)
    )


def _mixes_channels(module: nn.Module) -> bool:
    """A linear layer, or a conv whose every output reads several input channels (not depthwise)."""
    return isinstance(module, nn.Linear) or module.in_channels // module.groups > 1


def layer_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


@dataclass
class ChannelPath:
    """How the gated channels run through a branch: ``layer`` makes them, the mask follows
    ``mask_after``, ``ops`` are the channel-wise ops between ``layer`` and ``consumer``, the layer
    that reads them together (None: none that sparse execution can slice; the width is restored right
    after the mask). ``roles`` says how sparse execution slices each layer on the way."""

    layer: fx.Node
    ops: list[fx.Node]
    mask_after: fx.Node
    consumer: fx.Node | None
    roles: dict[fx.Node, str]
    channel_dim: int


def gated_path(
    graph_module: fx.GraphModule, block_input: fx.Node, branch_output: fx.Node, branch: list[fx.Node], first_conv: fx.Node
) -> ChannelPath:
    """Choose the layer whose filters the channel gate turns off (docs/design.md, "Where the gates act").

    Among the convs and linear layers every path through the branch passes, the first that mixes
    channels and whose channels a later layer reads: a bottleneck's conv1, an inverted residual's
    expansion, the first pointwise layer of a ConvNeXt block (not its depthwise conv, whose channels
    a LayerNorm mixes next). Failing that, the first such layer even if depthwise (an inverted
    residual without expansion); failing that, the branch's first conv, masked with no consumer.
    """
    members = set(branch)
    layers = [
        n for n in branch
        if _is_layer(graph_module, n) and _on_every_path(n, block_input, branch_output, members)
    ]
    paths = [path for path in (_channel_path(graph_module, n, members) for n in layers) if path.consumer is not None]
    mixing = [path for path in paths if _mixes_channels(graph_module.get_submodule(path.layer.target))]
    return (mixing or paths or [_channel_path(graph_module, first_conv, members)])[0]


def _on_every_path(node: fx.Node, start: fx.Node, end: fx.Node, branch: set[fx.Node]) -> bool:
    """Whether every path from ``start`` to ``end`` inside ``branch`` passes ``node`` (a squeeze-
    excitation's layers do not: its product also reads the tensor it squeezed)."""
    if node is end:
        return True
    seen, frontier = {start}, [start]
    while frontier:
        for user in frontier.pop().users:
            if user is end:
                return False
            if user in branch and user is not node and user not in seen:
                seen.add(user)
                frontier.append(user)
    return True


def _channel_path(graph_module: fx.GraphModule, layer: fx.Node, branch: set[fx.Node]) -> ChannelPath:
    """Follow ``layer``'s channels through channel-wise ops (and a squeeze-excitation) to their consumer."""
    channel_dim = -1 if isinstance(graph_module.get_submodule(layer.target), nn.Linear) else 1
    ops, end = [], layer
    while len(end.users) == 1:
        (user,) = end.users
        if user not in branch or not _is_channelwise(graph_module, user, channel_dim):
            break
        ops.append(user)
        end = user
    consumer, excitation, after = None, None, []
    if len(end.users) == 1:
        (user,) = end.users
        consumer = user if user in branch and _reads_channels(graph_module, user, channel_dim) else None
    elif channel_dim == 1 and (excitation := _squeeze_excitation(graph_module, end, branch)) is not None:
        after, consumer = _zero_preserving_run(graph_module, excitation.nodes[-1], branch)
        if consumer is None:  # no sliceable consumer behind the SE: stop before it, as at any other fork
            excitation, after = None, []
    roles = {layer: "first"}
    roles.update((n, "chain") for n in ops if n.op == "call_module" and _has_state(graph_module.get_submodule(n.target)))
    if excitation is not None:
        roles.update({excitation.reduce: "consumer", excitation.expand: "first"})
        ops = ops + excitation.nodes + after
    if consumer is not None:
        roles[consumer] = "consumer"
    return ChannelPath(layer, ops, end, consumer, roles, channel_dim)


def _reads_channels(graph_module: fx.GraphModule, node: fx.Node, channel_dim: int) -> bool:
    """A layer that reads the channels along ``channel_dim`` together: a conv for dimension 1, a
    linear layer for the last dimension."""
    if channel_dim == 1:
        return is_conv(graph_module, node)
    return node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.Linear)


@dataclass
class _Excitation:
    """A squeeze-excitation ``x * gate(expand(act(reduce(pool(x)))))``: ``nodes`` from the pool to
    the product, and its two layers."""

    nodes: list[fx.Node]
    reduce: fx.Node
    expand: fx.Node


def _squeeze_excitation(graph_module: fx.GraphModule, node: fx.Node, branch: set[fx.Node]) -> _Excitation | None:
    """The squeeze-excitation that reads ``node``, or None.

    Recognised by structure: ``node`` has two users, a spatial pool and a product ``node * scale``,
    where ``scale`` has one value per channel of ``node`` and is computed from that pool alone,
    through one conv that reads every channel, ops on the hidden width, one conv that writes every
    channel, and per-channel activations. The product scales each channel on its own, so it is
    channel-wise; but the pool reads all channels, so the mask goes before the SE (docs/design.md).
    """
    users = list(node.users)
    products = [u for u in users if _is_in(graph_module, u, (), _MUL_FUNCTIONS, _MUL_METHODS)]
    if len(users) != 2 or len(products) != 1 or not all(u in branch for u in users):
        return None
    (product,), (pool,) = products, [u for u in users if u not in products]
    if len(product.args) != 2 or product.kwargs or node not in product.args:
        return None
    scale = product.args[1] if product.args[0] is node else product.args[0]
    path = [pool]
    while path[-1] is not scale:
        if len(path[-1].users) != 1 or len(path) > 32:
            return None
        path.append(next(iter(path[-1].users)))
    for previous, current in zip([node] + path, path):
        data = [a for a in current.all_input_nodes if a.op != "get_attr"]
        if data != [previous]:
            return None
    shape = tuple(node.meta["tensor_meta"].shape)
    per_channel = shape[:2] + (1,) * (len(shape) - 2)
    pooled = _is_in(graph_module, pool, _SPATIAL_POOL_MODULES, _SPATIAL_POOL_FUNCTIONS, _SPATIAL_POOL_METHODS)
    if not pooled or any(tuple(n.meta["tensor_meta"].shape) != per_channel for n in (pool, scale)):
        return None
    layers = [n for n in path if _is_layer(graph_module, n)]
    dense_convs = [n for n in layers if is_conv(graph_module, n) and graph_module.get_submodule(n.target).groups == 1]
    if len(layers) != 2 or dense_convs != layers:
        return None
    reduce, expand = layers
    # Between the pool and the first conv, and after the second, the tensor has the gated channels:
    # only stateless per-channel ops there, which sparse execution runs on the active ones as they are.
    on_channels = path[1 : path.index(reduce)] + path[path.index(expand) + 1 :]
    for n in on_channels:
        stateful = n.op == "call_module" and _has_state(graph_module.get_submodule(n.target))
        if stateful or not _is_channelwise(graph_module, n):
            return None
    return _Excitation(path + [product], reduce, expand)


def _zero_preserving_run(
    graph_module: fx.GraphModule, start: fx.Node, branch: set[fx.Node]
) -> tuple[list[fx.Node], fx.Node | None]:
    """Ops mapping zero to zero after ``start``, and the conv they lead to (or None)."""
    ops, end = [], start
    while len(end.users) == 1:
        (user,) = end.users
        if user not in branch:
            break
        if not _is_in(graph_module, user, _ZERO_PRESERVING_MODULES, _ZERO_PRESERVING_FUNCTIONS, _ZERO_PRESERVING_METHODS):
            return ops, user if is_conv(graph_module, user) else None
        ops.append(user)
        end = user
    return ops, None
