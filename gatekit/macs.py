"""Static multiply-accumulate counts of conv and linear layers, read off a shape-propagated fx graph.

Convention (the paper's, section 4): a conv costs output elements x input channels per group x kernel
area; a linear layer costs output elements x input features. Biases, normalisation, activations,
pooling and adds are not counted. Counts are per sample: the batch dimension is divided out, so they
equal ``torch.utils.flop_counter.FlopCounterMode`` / 2 on a batch of one.
"""
from __future__ import annotations

import math

import torch.fx as fx
from torch import nn


def layer_macs(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """MACs of one sample through ``module`` (conv or linear) producing ``output_shape`` (batch first)."""
    output_elements = math.prod(output_shape[1:])
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel_area = math.prod(module.kernel_size)
        return output_elements * (module.in_channels // module.groups) * kernel_area
    if isinstance(module, nn.Linear):
        return output_elements * module.in_features
    return 0


def node_macs(graph_module: fx.GraphModule) -> dict[fx.Node, int]:
    """Per-sample MACs of every conv and linear call_module node of a shape-propagated graph."""
    macs = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or "tensor_meta" not in node.meta:
            continue
        module = graph_module.get_submodule(node.target)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            macs[node] = layer_macs(module, tuple(node.meta["tensor_meta"].shape))
    return macs
