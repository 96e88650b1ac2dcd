"""Static multiply-accumulate counts of a shape-propagated fx graph: every conv, linear layer and matmul.

Convention (the paper's, section 4, extended to every product of tensors): a conv costs output
elements x input channels per group x kernel area; a linear layer, a matmul (``@``, ``mm``, ``bmm``,
``baddbmm``, ``addmm``) output elements x the contracted size; scaled-dot-product attention its two
products, ``batch x heads x L x S x (E + Ev)``; an einsum and whatever a leaf module computes
(timm's BlurPool2d, a user's ``leaf_modules``) are measured as they run during shape propagation
(gatekit/_op_macs.py). Biases, normalisation, activations, pooling, softmax and adds are not counted.
Counts are per sample: what a node computes for the example batch, divided by its size, except that a
node reading no input (a product of parameters) runs once per forward and counts whole. They equal
``torch.utils.flop_counter.FlopCounterMode`` / 2 on a batch of one (docs/macs.md says where not).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._shapes import MEASURED_MACS, propagate_shapes
from ._tracing import trace_model

if TYPE_CHECKING:
    from ._sites import GateSite


def layer_macs(module: nn.Module, output_shape: tuple[int, ...], input_shape: tuple[int, ...] | None = None) -> int:
    """MACs of one sample through ``module`` (conv or linear) producing ``output_shape`` (batch
    first); a transposed conv needs its ``input_shape`` too."""
    return _layer_total(module, output_shape, input_shape) // output_shape[0] if output_shape else 0


def _layer_total(module: nn.Module, output_shape: tuple[int, ...], input_shape: tuple[int, ...] | None) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel_area = math.prod(module.kernel_size)
        if module.transposed:  # each input element is spread over a kernel of every output channel
            return math.prod(input_shape) * (module.out_channels // module.groups) * kernel_area
        return math.prod(output_shape) * (module.in_channels // module.groups) * kernel_area
    if isinstance(module, nn.Linear):
        return math.prod(output_shape) * module.in_features
    return 0


# Layers traced through into a call of their functional form (timm's Linear subclass does this),
# whose weight is then a get_attr node.
_FUNCTIONAL_LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
# Products of two tensors: (first factor's position, second's); output elements x the contracted
# size (the first factor's last dimension) each.
_PRODUCT_FUNCTIONS = {
    torch.matmul: (0, 1), operator.matmul: (0, 1), torch.mm: (0, 1), torch.bmm: (0, 1),
    torch.baddbmm: (1, 2), torch.addmm: (1, 2),
}
_PRODUCT_METHODS = {"matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1), "baddbmm": (1, 2), "addmm": (1, 2), "__matmul__": (0, 1)}


def node_macs(graph_module: fx.GraphModule) -> dict[fx.Node, int]:
    """Per-sample MACs of every node of a shape-propagated graph that has some: conv and linear
    modules, functional convs and linear layers, matmuls, attention, einsums and leaf modules."""
    batch = _example_batch(graph_module.graph)
    reads_input: set[fx.Node] = set()
    macs = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" or any(parent in reads_input for parent in node.all_input_nodes):
            reads_input.add(node)
        total = _node_total(graph_module, node)
        if total:
            macs[node] = total // batch if node in reads_input else total
    return macs


def _node_total(graph_module: fx.GraphModule, node: fx.Node) -> int:
    """MACs of ``node`` for the whole example batch, or 0."""
    if MEASURED_MACS in node.meta:
        return node.meta[MEASURED_MACS]
    if "tensor_meta" not in node.meta:
        return 0
    output = _shape(node)
    if output is None:
        return 0
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return _layer_total(module, output, _shape(node.args[0]) if node.args else None)
    if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
        weight = _shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        # A weight is [out, in] or [out, in / groups, *kernel]: each output element reads the
        # product of all but its first dimension.
        return math.prod(output) * math.prod(weight[1:]) if weight else 0
    factors = _PRODUCT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if node.op == "call_method":
        factors = _PRODUCT_METHODS.get(node.target)
    if factors is not None:
        first = _shape(node.args[factors[0]]) if len(node.args) > factors[1] else None
        return math.prod(output) * first[-1] if first else 0
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return _attention_total(node)
    return 0


def _attention_total(node: fx.Node) -> int:
    """Scaled-dot-product attention: ``q @ k.T`` and ``weights @ v``, batch x heads x L x S x (E + Ev)."""
    names = ("query", "key", "value")
    query, key, value = (
        _shape(node.args[i] if len(node.args) > i else node.kwargs.get(name)) for i, name in enumerate(names)
    )
    if not (query and key and value):
        return 0
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _shape(node: object) -> tuple[int, ...] | None:
    """The shape shape propagation saw at ``node``, if it is a tensor node."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _example_batch(graph: fx.Graph) -> int:
    """The batch size of the input the graph was last propagated with."""
    for node in graph.nodes:
        shape = _shape(node) if node.op == "placeholder" else None
        if shape:
            return shape[0]
    return 1


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
    """Per-sample MACs of ``model`` on inputs shaped like ``example_input`` (the module docstring
    says what counts).

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

