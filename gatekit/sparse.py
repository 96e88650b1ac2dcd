"""gatekit.sparse: an inference form of a gated model that skips the work its gates turn off."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._sliced import sliced
from .blocks import GateSite
from .errors import GatekitError
from .gate import Gate, apply_channel_gate, apply_layer_gate
from .gated_model import attach_info, gate_key, info_of

STRATEGIES = ("union", "per-sample")


def sparse(model: nn.Module, *, strategy: str = "union") -> fx.GraphModule:
    """Return an eval-only model sharing ``model``'s weights that runs only what the gates keep.

    A block whose layer gate is 0 does not run for that sample. A running block computes its first
    conv, the channel-wise ops after it and its consumer conv on the active filters only (weights
    sliced), and the rest of its branch as usual. Within a batch, each block runs only on the samples
    that execute it; samples with different channel sets are handled by ``strategy``:

    - ``"union"``: one pass over the union of the active channels, each sample's own channels
      masked inside it (exact; costs the union's MACs);
    - ``"per-sample"``: one pass per sample with its own channels (exact MACs, more passes).

    Outputs equal the gated model's in eval mode up to float rounding.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: an unknown strategy, or a branch whose intermediate values are used outside it.

    >>> fast = gatekit.sparse(gated)  # doctest: +SKIP
    >>> fast(image)  # same as gated.eval()(image), skipping closed blocks and filters  # doctest: +SKIP
    """
    if strategy not in STRATEGIES:
        raise GatekitError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}.")
    info = info_of(model)
    graph = fx.Graph()
    outputs = graph.graph_copy(model.graph, {})
    graph.output(outputs)
    nodes = {node.name: node for node in graph.nodes}
    sparse_blocks = nn.ModuleDict()
    for site in info.sites:
        key = gate_key(site.name)
        gate = model.gatekit_gates[key]
        sparse_blocks[key] = SparseBlock(gate, _branch_graph(model, graph, nodes, site, gate), strategy)
        _route_through(graph, nodes, site, key)
    root = nn.Module()  # the gated model's modules and tensors, shared, plus the sparse blocks
    root._modules.update(model._modules)
    root._parameters.update(model._parameters)
    root._buffers.update(model._buffers)
    root.gatekit_sparse_blocks = sparse_blocks
    result = fx.GraphModule(root, graph, f"Sparse{type(model).__name__.removeprefix('Gated')}")
    result.graph.eliminate_dead_code()
    result.delete_all_unused_submodules()
    result.recompile()
    attach_info(result, info)
    return result.eval()


class SparseBlock(nn.Module):
    """Gate a block's input, then run its branch on the executing samples and active channels only.

    Returns the branch output at full batch size, zeros for skipped samples (a zero scalar when the
    whole batch skips the block), ready to be added to the shortcut.
    """

    def __init__(self, gate: Gate, branch: fx.GraphModule, strategy: str) -> None:
        super().__init__()
        self.gate, self.branch, self.strategy = gate, branch, strategy

    def train(self, mode: bool = True) -> SparseBlock:
        if mode:
            raise GatekitError("a sparse model is for inference; finetune the gated model instead.")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        channel_gates, layer_gates = self.gate(x)
        rows = None if layer_gates is None else layer_gates.nonzero().flatten()
        if rows is not None and rows.numel() == 0:
            return x.new_zeros(())
        if rows is not None and rows.numel() == x.shape[0]:
            rows = None
        inputs = x if rows is None else x.index_select(0, rows)
        if channel_gates is None:
            output = self.branch(inputs)
        else:
            channel_gates = channel_gates if rows is None else channel_gates.index_select(0, rows)
            output = self._run_channels(inputs, channel_gates)
        if rows is None:
            return output
        return output.new_zeros((x.shape[0],) + output.shape[1:]).index_copy_(0, rows, output)

    def _run_channels(self, inputs: Tensor, channel_gates: Tensor) -> Tensor:
        if self.strategy == "per-sample" and inputs.shape[0] > 1:
            return torch.cat([self._run_channels(inputs[i : i + 1], channel_gates[i : i + 1]) for i in range(inputs.shape[0])])
        active = channel_gates.amax(0).nonzero().flatten()
        if active.numel() == 0:
            # Convolutions take no empty weights: run one channel and mask it to zero.
            active = active.new_zeros(1)
        mask = channel_gates.index_select(1, active)
        return self.branch(inputs, active, None if bool(mask.all()) else mask)


def _mask_channels(x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply per-sample channel decisions within the active set; None means all kept."""
    return x if mask is None else apply_channel_gate(x, mask)


def _branch_graph(model: fx.GraphModule, graph: fx.Graph, nodes: dict[str, fx.Node], site: GateSite, gate: Gate) -> fx.GraphModule:
    """Copy a block's branch into its own GraphModule taking (x[, active, mask]), layers sliced."""
    block_input, add = nodes[site.block_input_node], nodes[site.add_node]
    branch_output = add.args[_branch_index(add, nodes[site.branch_output_node])]
    members = _between(block_input, branch_output)
    gate_nodes = {n for n in members if _is_gate_node(n)}
    branch = [n for n in graph.nodes if n in members and n not in gate_nodes]
    _check_closed(site, branch, add)

    new_graph, modules = fx.Graph(), {}
    env = {block_input: new_graph.placeholder("x")}
    gated = gate.channel_head is not None
    active = new_graph.placeholder("active") if gated else None
    mask = new_graph.placeholder("mask") if gated else None
    roles = _channel_roles(model, nodes, site) if gated else {}
    for node in branch:
        if node.op == "call_function" and node.target is apply_layer_gate:
            env[node] = env[node.args[0]]
        elif node.op == "call_function" and node.target is apply_channel_gate:
            masked = new_graph.call_function(_mask_channels, (env[node.args[0]], mask))
            env[node] = masked
            if site.consumer is None:  # no consumer reads the reduced width: widen it back here
                modules[f"widen_{len(modules)}"] = sliced(None, "widen", site.channels)
                env[node] = new_graph.call_module(f"widen_{len(modules) - 1}", (masked, active))
        elif node in roles:
            name = f"sliced_{len(modules)}"
            modules[name] = sliced(model.get_submodule(node.target), roles[node], site.channels)
            env[node] = new_graph.call_module(name, (env[node.args[0]], active))
        else:
            env[node] = new_graph.node_copy(node, lambda n: env[n])
            if node.op == "call_module":
                modules[node.target] = model.get_submodule(node.target)
    new_graph.output(env[branch_output])
    return fx.GraphModule(modules, new_graph, "Branch")


def _channel_roles(model: fx.GraphModule, nodes: dict[str, fx.Node], site: GateSite) -> dict[fx.Node, str]:
    """Which call_module nodes run on the reduced channels, and how: first conv, chain, consumer."""
    chain_end = nodes[site.channel_gate_node]
    node = next(n for n in _upstream(chain_end) if n.op == "call_module" and n.target == site.first_conv)
    roles = {node: "first"}
    while node is not chain_end:
        (node,) = [user for user in node.users if not _is_gate_node(user)]
        if node.op == "call_module" and _has_state(model.get_submodule(node.target)):
            roles[node] = "chain"
    if site.consumer is not None:
        (masked,) = [u for u in chain_end.users if u.target is apply_channel_gate]
        (consumer,) = masked.users
        roles[consumer] = "consumer"
    return roles


def _route_through(graph: fx.Graph, nodes: dict[str, fx.Node], site: GateSite, key: str) -> None:
    """Replace the gated branch feeding the block's add by the SparseBlock's output."""
    add = nodes[site.add_node]
    with graph.inserting_before(add):
        block = graph.call_module(f"gatekit_sparse_blocks.{key}", (nodes[site.block_input_node],))
    args = list(add.args)
    index = _branch_index(add, nodes[site.branch_output_node])
    args[index] = block
    # A zero scalar cannot be added to in place: every residual add becomes an out-of-place one.
    with graph.inserting_before(add):
        replacement = graph.call_function(torch.add if add.kwargs else operator.add, tuple(args), dict(add.kwargs))
    add.replace_all_uses_with(replacement)
    graph.erase_node(add)
    nodes[site.add_node] = replacement


def _branch_index(add: fx.Node, branch_output: fx.Node) -> int:
    """Which argument of the residual add is the (layer-gated) branch."""
    first = add.args[0]
    is_branch = first is branch_output or (first.op == "call_function" and first.target is apply_layer_gate)
    return 0 if is_branch else 1


def _is_gate_node(node: fx.Node) -> bool:
    if node.op == "call_module" and node.target.startswith("gatekit_gates."):
        return True
    return node.op == "call_function" and node.target is operator.getitem and _is_gate_node(node.args[0])


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _upstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and all its ancestors."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _between(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """Nodes on paths from ``start`` (excluded) to ``end`` (included)."""
    upstream = _upstream(end)
    found, frontier = set(), [start]
    while frontier:
        for user in frontier.pop().users:
            if user in upstream and user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _check_closed(site: GateSite, branch: list[fx.Node], add: fx.Node) -> None:
    inside = set(branch)
    for node in branch:
        for user in node.users:
            if user not in inside and user is not add:
                raise GatekitError(
                    f"block '{site.name}': the branch value '{node.name}' is also used outside the "
                    f"branch (by '{user.name}'), so the branch cannot be skipped; use the gated "
                    f"model as it is, or exclude this block at conversion."
                )
