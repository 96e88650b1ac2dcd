"""Finding residual blocks in an fx graph, from its structure alone.

A residual block is an elementwise add of two tensors that both descend from one node, the block
input: one side, the *branch*, holds the most convolutions; the other, the *shortcut*, is the input
itself (identity) or a cheaper path (projection conv, pooling, padding). No class names or module
paths are consulted, so models nobody listed are found the same way. See docs/design.md.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from .channel_path import gated_path, is_conv, layer_width
from .channel_path import register_channelwise_module  # noqa: F401  (adapters import it from here)
from ._sites import GateSite, _Ancestry, _Candidate
from .macs import node_macs
from ._graph import checks_on
from .skipped_sites import INTERNAL, SHARED_LAYER, GraphFacts, SkippedSite, one_gate_per_layer, why_not_gated

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _is_residual_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    return is_add and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _is_tensor(node: fx.Node) -> bool:
    """Whether shape propagation saw one tensor at ``node`` (not a tuple, a size or a number)."""
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _split_block(graph_module: fx.GraphModule, ancestry: _Ancestry, add: fx.Node) -> _Candidate | None:
    """The block input, branch output, branch and shortcut nodes of a residual add, or None when
    the add is no residual block (unrelated operands, two equal paths)."""
    left, right = add.args[0], add.args[1]
    for block_input, branch_output in ((left, right), (right, left)):
        if block_input in ancestry(branch_output):
            branch = ancestry.between(block_input, branch_output)
            if not any(is_conv(graph_module, n) for n in branch):
                return None  # x + f(x) without a convolution: an activation, not a residual block
            return _Candidate(add, block_input, branch_output, branch, set())
    common = (ancestry(left) | {left}) & (ancestry(right) | {right})
    if not common:
        return None
    # The gate reads the block input, so it must be one tensor: the latest common ancestor that is.
    tensors = [n for n in common if _is_tensor(n)]
    latest = max(common, key=ancestry.order.__getitem__)
    block_input = max(tensors, key=ancestry.order.__getitem__) if tensors else None
    start = block_input if block_input is not None else latest
    left_nodes, right_nodes = ancestry.between(start, left), ancestry.between(start, right)
    left_convs = sum(is_conv(graph_module, n) for n in left_nodes)
    right_convs = sum(is_conv(graph_module, n) for n in right_nodes)
    if left_convs == right_convs:
        return None  # two equal paths: a multi-branch merge, not a residual block
    if left_convs > right_convs:
        return _Candidate(add, block_input, left, left_nodes, right_nodes)
    return _Candidate(add, block_input, right, right_nodes, left_nodes)


def find_gate_sites(graph_module: fx.GraphModule) -> list[GateSite]:
    """List the residual blocks of a traced, shape-propagated model that can be gated, in graph order.

    Args:
        graph_module: output of :func:`gatekit._tracing.trace` after ``ShapeProp`` ran on it.

    Returns:
        One :class:`GateSite` per residual add whose branch holds a convolution and can be gated;
        :func:`discover` also says why the others cannot.
    """
    return discover(graph_module)[0]


def discover(graph_module: fx.GraphModule) -> tuple[list[GateSite], list[SkippedSite]]:
    """The residual blocks of a traced, shape-propagated model: those that can be gated, and those
    that cannot (a branch value used outside the branch, a fusion of parallel paths, ...), each in
    graph order. A failure analysing one block is a skipped site, its reason naming the failure.
    """
    ancestry = _Ancestry(graph_module.graph)
    macs = node_macs(graph_module)
    facts = GraphFacts.of(graph_module.graph)
    outcomes: list[tuple[fx.Node, dict | SkippedSite]] = []
    for add in graph_module.graph.nodes:
        if not _is_residual_add(add):
            continue
        candidate = _split_block(graph_module, ancestry, add)
        if candidate is None:
            continue
        try:
            problem = why_not_gated(graph_module, ancestry, candidate, facts)
            if problem is not None:
                node, kind, reason = problem
                outcomes.append((add, SkippedSite("", add.name, node.name, kind, reason)))
            else:
                outcomes.append((add, _site_fields(graph_module, ancestry, macs, candidate, facts.needed)))
        except Exception as error:  # noqa: BLE001  (reported as a skipped site, never lost)
            reason = (
                f"gatekit failed analysing it ({type(error).__name__}: {error}); this is a gatekit bug, "
                f"please report it with the model"
            )
            outcomes.append((add, SkippedSite("", add.name, add.name, INTERNAL, reason)))
    names = _block_names([add for add, _ in outcomes])
    sites = [GateSite(name=name, **o) for name, (_, o) in zip(names, outcomes) if isinstance(o, dict)]
    losers, by_name = one_gate_per_layer(sites), {site.name: site for site in sites}
    found: list[GateSite | SkippedSite] = []
    for name, (add, outcome) in zip(names, outcomes):
        if isinstance(outcome, SkippedSite):
            found.append(replace(outcome, name=name))
        elif name in losers:
            node, reason = losers[name]
            found.append(SkippedSite(name, add.name, node, SHARED_LAYER, reason))
        else:
            found.append(by_name[name])
    return [s for s in found if isinstance(s, GateSite)], [s for s in found if isinstance(s, SkippedSite)]


def _site_fields(
    graph_module: fx.GraphModule, ancestry: _Ancestry, macs: dict[fx.Node, int], candidate: _Candidate, needed: set[fx.Node]
) -> dict:
    """Every :class:`GateSite` field but the name, for a candidate that can be gated."""
    block_input, branch_output, branch = candidate.block_input, candidate.branch_output, candidate.branch
    convs = sorted((n for n in branch if is_conv(graph_module, n)), key=ancestry.order.__getitem__)
    ordered = sorted(branch, key=ancestry.order.__getitem__)
    # The checks on branch values are skipped with it (sparse execution moves them into the branch).
    skipped_with = sorted(branch | checks_on(branch, needed), key=ancestry.order.__getitem__)
    path = gated_path(graph_module, block_input, branch_output, ordered, convs[0])
    consumer = path.consumer
    # The layers whose cost follows the number of channels on. Another module on the way (a leaf
    # module registered as channel-wise) runs at full width in sparse execution: its MACs do not scale.
    scaled = [n for n in path.roles if isinstance(graph_module.get_submodule(n.target), (nn.modules.conv._ConvNd, nn.Linear))]
    return dict(
        in_channels=int(block_input.meta["tensor_meta"].shape[1]),
        channels=layer_width(graph_module.get_submodule(path.layer.target)),
        first_conv=path.layer.target,
        channelwise_ops=tuple(_describe(n) for n in path.ops),
        consumer=consumer.target if consumer is not None else None,
        shortcut=_shortcut_kind(graph_module, candidate.shortcut),
        block_input_node=block_input.name,
        channel_gate_node=path.mask_after.name,
        branch_output_node=branch_output.name,
        add_node=candidate.add.name,
        branch_macs=sum(macs.get(n, 0) for n in skipped_with),
        channel_macs=sum(macs.get(n, 0) for n in scaled),
        branch_layers=tuple(n.name for n in skipped_with if n in macs),
        scaled_layers=tuple(n.name for n in scaled if n in macs),
        sliced_layers=tuple((n.name, role) for n, role in path.roles.items()),
        channel_dim=path.channel_dim,
    )


def _shortcut_kind(graph_module: fx.GraphModule, shortcut: set[fx.Node]) -> str:
    """'identity', 'projection' (holds a conv) or 'parameter-free' (pooling, padding, slicing)."""
    if any(is_conv(graph_module, n) for n in shortcut):
        return "projection"
    if all(n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), nn.Identity) for n in shortcut):
        return "identity"
    return "parameter-free"


def _describe(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _block_names(adds: list[fx.Node]) -> list[str]:
    """Name each block by the module whose forward holds its add; disambiguate shared modules by node."""
    paths = [_module_path(add) for add in adds]
    names = []
    for add, path in zip(adds, paths):
        if path and paths.count(path) == 1:
            names.append(path)
        else:
            names.append(f"{path}.{add.name}" if path else add.name)
    return names
