"""Static multiply-accumulate counts of conv and linear layers, read off a shape-propagated fx graph.

Convention (the paper's, section 4): a conv costs output elements x input channels per group x kernel
area; a linear layer costs output elements x input features. Biases, normalisation, activations,
pooling and adds are not counted. Counts are per sample: the batch dimension is divided out, so they
equal ``torch.utils.flop_counter.FlopCounterMode`` / 2 on a batch of one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._shapes import propagate_shapes
from ._tracing import trace_model

if TYPE_CHECKING:
    from .blocks import GateSite


def layer_macs(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """MACs of one sample through ``module`` (conv or linear) producing ``output_shape`` (batch first)."""
    output_elements = math.prod(output_shape[1:])
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel_area = math.prod(module.kernel_size)
        return output_elements * (module.in_channels // module.groups) * kernel_area
    if isinstance(module, nn.Linear):
        return output_elements * module.in_features
    return 0


# Layers traced through into a call of their functional form (timm's Linear subclass does this),
# whose weight is then a get_attr node.
_FUNCTIONAL_LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d}


def node_macs(graph_module: fx.GraphModule) -> dict[fx.Node, int]:
    """Per-sample MACs of every conv and linear node of a shape-propagated graph: modules, and
    functional calls whose weight the graph holds."""
    macs = {}
    for node in graph_module.graph.nodes:
        if "tensor_meta" not in node.meta:
            continue
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                macs[node] = layer_macs(module, tuple(node.meta["tensor_meta"].shape))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and "tensor_meta" in weight.meta:
                # A weight is [out, in] or [out, in / groups, *kernel]: each output element reads
                # the product of all but its first dimension.
                inputs_per_output = math.prod(weight.meta["tensor_meta"].shape[1:])
                macs[node] = math.prod(node.meta["tensor_meta"].shape[1:]) * inputs_per_output
    return macs


@dataclass(frozen=True)
class BlockCosts:
    """Per-sample costs of a gated model at one input size: everything dynamic MACs need.

    ``branch_macs[i]`` and ``channel_macs[i]`` belong to ``model.gatekit.sites[i]``.
    """

    dense_macs: int
    branch_macs: tuple[int, ...]
    channel_macs: tuple[int, ...]

    @classmethod
    def from_sites(cls, dense_macs: int, sites: Sequence[GateSite]) -> BlockCosts:
        return cls(dense_macs, tuple(s.branch_macs for s in sites), tuple(s.channel_macs for s in sites))


def static_macs(model: nn.Module, example_input: Tensor) -> int:
    """Per-sample conv + linear MACs of ``model`` on inputs shaped like ``example_input``.

    For a gated model this is the dense cost of the network it gates, without the gates.

    >>> import torchvision
    >>> static_macs(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    1814073344
    """
    graph_module = model if isinstance(model, fx.GraphModule) else trace_model(model)
    propagate_shapes(graph_module, model, example_input)
    return sum(node_macs(graph_module).values())


def measure_costs(model: fx.GraphModule, sites: Sequence[GateSite], example_input: Tensor) -> BlockCosts:
    """Measure a gated model's :class:`BlockCosts` again on inputs shaped like ``example_input``."""
    propagate_shapes(model, model, example_input)
    macs = {node.name: count for node, count in node_macs(model).items()}
    return BlockCosts(
        dense_macs=sum(macs.values()),
        branch_macs=tuple(sum(macs[n] for n in site.branch_layers) for site in sites),
        channel_macs=tuple(sum(macs[n] for n in site.scaled_layers) for site in sites),
    )

