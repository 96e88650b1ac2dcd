"""Per-sample MACs of a model with exits: a sample pays for the network up to the exit it took,
and for every exit head it ran on the way.

The exits cut the graph into segments: segment ``k`` holds the layers that need exit ``k - 1``'s
block output but not exit ``k``'s (segment 0: everything before the first exit; the last: everything
after the last exit, the final classifier included). A sample leaving at exit ``e`` pays segments
``0..e`` and heads ``0..e``; one that reaches the end pays every segment and every head. In a gated
model each gated block counts what its gate decided, in the segment of its residual add.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._shapes import propagate_shapes
from .dynamic_macs import block_macs
from ._exit_info import HEADS, POLICY, exit_heads, exit_policy, exits_of
from .errors import ExitsError
from .gated_model import GatekitInfo, unwrapped
from .macs import BlockCosts, measure_costs, node_macs

# Modules whose MACs are counted on their own (gates, heads) or not at all (the decision).
_OWN_COST_PREFIXES = (f"{HEADS}.", "gatekit_gates.", POLICY)


@dataclass(frozen=True)
class ExitCosts:
    """Per-sample costs of a model with exits at one input size.

    ``segment_macs[k]``: the MACs of segment ``k`` outside every gated branch (``len(exits) + 1``
    segments). ``head_macs[k]``: exit head ``k``. ``block_segments[i]``: the segment of gated block
    ``model.gatekit.sites[i]``. ``blocks``: the gated blocks' :class:`gatekit.macs.BlockCosts`, or
    None for a model without gates.
    """

    segment_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    block_segments: tuple[int, ...] = ()
    blocks: BlockCosts | None = None



def measure_exit_costs(model: nn.Module, example_input: Tensor | None = None) -> ExitCosts:
    """Measure :class:`ExitCosts` on inputs shaped like ``example_input`` (default: the shape the
    exits were added at). This runs the model once: gate and exit records are those of that run."""
    graph_module = unwrapped(model)
    info = exits_of(graph_module)
    if example_input is None:
        reference = next(iter(graph_module.parameters()))
        example_input = torch.zeros(info.input_shape, device=reference.device, dtype=reference.dtype)
    gated = getattr(graph_module, "gatekit", None)
    sites = gated.sites if isinstance(gated, GatekitInfo) else ()
    blocks = measure_costs(graph_module, sites, example_input) if sites else None
    if not sites:
        propagate_shapes(graph_module, graph_module, example_input)
    nodes = {node.name: node for node in graph_module.graph.nodes}
    segment_of = _segments(graph_module.graph, [nodes[site.node] for site in info.sites])
    in_branch = {name for site in sites for name in site.branch_layers}
    segment_macs = [0] * (len(info.sites) + 1)
    for node, macs in node_macs(graph_module).items():
        if node.name not in in_branch and not _own_cost(node):
            segment_macs[segment_of[node]] += macs
    return ExitCosts(
        segment_macs=tuple(segment_macs),
        head_macs=tuple(head.macs for head in exit_heads(graph_module).values()),
        block_segments=tuple(segment_of[nodes[site.add_node]] for site in sites),
        blocks=blocks,
    )


def backbone_macs(model: fx.GraphModule, example_input: Tensor) -> int:
    """Per-sample MACs of the network without its exit heads and gates, every gate open."""
    propagate_shapes(model, model, example_input)
    return sum(macs for node, macs in node_macs(model).items() if not _own_cost(node))


def exit_costs_per_sample(model: nn.Module, costs: ExitCosts | None = None) -> Tensor:
    """What each sample of the last forward would have cost leaving at each exit, [B, exits + 1]
    (the last column: reaching the final head). Gated blocks count the decisions of that forward.
    ``costs``: at the input size of that forward; by default those measured when the exits were
    added. Measuring here would run the model again and replace the records being counted."""
    costs = costs or exits_of(model).costs
    policy = exit_policy(model)
    if policy.final_logits is None:
        raise exit_forward_error("counting exit MACs")
    batch = policy.final_logits.shape[0]
    segment = torch.tensor(costs.segment_macs, dtype=torch.long).expand(batch, -1).clone()
    if costs.blocks is not None:
        for index, macs in zip(costs.block_segments, block_macs(unwrapped(model), costs.blocks)[1]):
            segment[:, index] += macs.detach().to(segment.device).long()
    heads = torch.tensor(costs.head_macs + (0,), dtype=torch.long)
    return (segment + heads).cumsum(1)


def exit_macs(model: nn.Module, costs: ExitCosts | None = None) -> Tensor:
    """Exact per-sample MACs [B] of the last eval-mode forward: up to the exit each sample took,
    heads run on the way included.

    Raises:
        ExitsError: the model has no exits, or has not run in eval mode since they were added.
    """
    policy = exit_policy(model)
    if policy.taken is None:
        raise exit_forward_error("counting exit MACs", eval_mode=True)
    every = exit_costs_per_sample(model, costs)
    return every.gather(1, policy.taken.cpu().long()[:, None]).squeeze(1)


def exit_forward_error(step: str, *, eval_mode: bool = False) -> ExitsError:
    mode = " in eval mode (`model.eval()`)" if eval_mode else ""
    return ExitsError(f"{step} needs the exits' decisions: run the model on a batch{mode} first.")


def _own_cost(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(_OWN_COST_PREFIXES)


def _segments(graph: fx.Graph, exit_nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Each node's segment: how many exit nodes it descends from (they form a chain)."""
    count = {node: 0 for node in graph.nodes}
    for start in exit_nodes:
        seen, stack = set(), list(start.users)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            count[node] += 1
            stack.extend(node.users)
    return count
