"""gatekit.sparse: an inference form of a gated model that skips the work its gates turn off."""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ._fused_gate import FusedGate
from ._graph import ancestors, checks_on, hanging_from
from ._metadata import batch_free_sizes, input_metadata
from ._internal import internal_errors
from ._sliced import ChannelSet, memory_format_of, sliced
from .blocks import GateSite
from .errors import GatekitError
from .gate import Gate, apply_channel_gate, apply_layer_gate
from ._exit_info import exits_of, has_exits
from .gated_model import GatekitInfo, attach_info, gate_key, info_of

STRATEGIES = ("union", "per-sample")


def sparse(model: nn.Module, *, strategy: str = "union", cache_size: int = 8) -> fx.GraphModule:
    """Return an eval-only model sharing ``model``'s weights that runs only what the gates keep.

    A block whose layer gate is 0 does not run for that sample. A running block computes its first
    conv, the channel-wise ops after it and its consumer conv on the active filters only (weights
    sliced), and the rest of its branch as usual. Within a batch, each block runs only on the samples
    that execute it; samples with different channel sets are handled by ``strategy``:

    - ``"union"``: one pass over the union of the active channels, each sample's own channels
      masked inside it (exact; costs the union's MACs);
    - ``"per-sample"``: each sample runs its own channels (exact MACs); samples that keep the same
      set share one pass.

    Outputs equal the gated model's in eval mode up to float rounding. The sparse blocks compute
    the gates' decisions themselves: a sparse forward leaves ``gate.layer_gates`` and the other
    records of the last forward untouched, so run the gated model for :func:`gatekit.dynamic_macs`.
    Measured speed: docs/sparse.md.

    A model with exits (:func:`gatekit.add_exits`, gated or not) becomes an
    :class:`gatekit.exit_runner.EarlyExitModel`: a sample that leaves at an exit stops there, and
    the rest of the batch carries on without it.

    Args:
        model: a gated model from :func:`gatekit.convert`, or a model with exits.
        strategy: ``"union"`` or ``"per-sample"``, above.
        cache_size: how many channel sets each sliced conv keeps the sliced weights of (least
            recently used out; 0 slices on every call). An entry costs at most the conv's weights
            in memory; all are dropped when a weight is changed in place or replaced.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: an unknown strategy, a negative cache size, or a branch whose intermediate
            values are used outside it. When run: a layer it shares with ``model`` is in training
            mode (the sparse model never changes their modes; call ``model.eval()``).

    >>> fast = gatekit.sparse(gated)  # doctest: +SKIP
    >>> fast(image)  # same as gated.eval()(image), skipping closed blocks and filters  # doctest: +SKIP
    """
    if strategy not in STRATEGIES:
        raise GatekitError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if cache_size < 0:
        raise GatekitError(f"cache_size={cache_size}: use 0 (no cache) or a positive number of channel sets.")
    if has_exits(model):  # a gated model's blocks made sparse first, then the graph cut at its exits
        from .exit_runner import split_at_exits

        gated = isinstance(getattr(model, "gatekit", None), GatekitInfo)
        return split_at_exits(_sparse_blocks(model, strategy, cache_size) if gated else model, exits_of(model))
    return _sparse_blocks(model, strategy, cache_size)


def _sparse_blocks(model: nn.Module, strategy: str, cache_size: int) -> fx.GraphModule:
    info = info_of(model)
    graph = fx.Graph()
    outputs = graph.graph_copy(model.graph, {})
    graph.output(outputs)
    nodes = {node.name: node for node in graph.nodes}
    sparse_blocks = nn.ModuleDict()
    sizes = batch_free_sizes(graph)
    for site in info.sites:
        with internal_errors("building the sparse block", site.add_node, block=site.name):
            key = gate_key(site.name)
            gate = model.gatekit_gates[key]
            branch, outside = _branch_graph(model, graph, nodes, site, gate, cache_size, sparse_blocks, sizes)
            sparse_blocks[key] = SparseBlock(gate, branch, strategy)
            _route_through(graph, nodes, site, key, outside)
    root = nn.Module()  # the gated model's modules and tensors, shared, plus the sparse blocks
    root._modules.update(model._modules)
    root._parameters.update(model._parameters)
    root._buffers.update(model._buffers)
    root.gatekit_sparse_blocks = sparse_blocks
    result = SparseModel(root, graph, f"Sparse{type(model).__name__.removeprefix('Gated')}")
    result.graph.eliminate_dead_code()
    result.delete_all_unused_submodules()
    _bind_called_modules(result)
    attach_info(result, info)
    # The shared modules keep the mode the user gave them (sparse must not flip a model in training
    # to eval); the sparse model's own modules are for inference, and it refuses to run while a
    # shared one is in training mode (batch norms would normalise with batch statistics).
    shared = {module: name for name, module in model.named_modules()}
    for module in result.modules():
        if module not in shared:
            module.training = False
    mode_dependent = [(name, m) for m, name in shared.items() if name and not isinstance(m, Gate)]
    result.register_forward_pre_hook(functools.partial(_refuse_training, mode_dependent))
    return result


class SparseModel(fx.GraphModule):
    """What :func:`sparse` returns: a GraphModule whose ``train``/``eval`` never change the modes of
    the modules it shares with the gated model (``train()`` raises; ``eval()`` changes nothing)."""

    def train(self, mode: bool = True) -> SparseModel:
        if mode:
            raise GatekitError("a sparse model is for inference; finetune the gated model instead.")
        return self

    def __reduce__(self) -> tuple:
        # fx would pickle the generated code and trace it again on loading, through the sparse
        # blocks' host-side decisions, which a trace cannot follow.
        raise GatekitError(
            "a sparse model cannot be pickled (torch.save included): save the gated model with "
            "`gatekit.save(gated, path)`, and after `gatekit.load(path)` call `gatekit.sparse` again."
        )


def _refuse_training(modules: list[tuple[str, nn.Module]], model: nn.Module, inputs: tuple) -> None:
    if not any(module.training for _, module in modules):  # every call: the cheap check first
        return
    training = [name for name, module in modules if module.training]
    if training:
        raise GatekitError(
            f"the gated model this sparse model shares its layers with is in training mode "
            f"({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): its batch norms would "
            f"use batch statistics. Call `gated.eval()` before running the sparse model."
        )


class SparseBlock(nn.Module):
    """Gate a block's input, then run its branch on the executing samples and active channels only.

    Given the shortcut, returns the block's sum: the shortcut, plus the branch output on the samples
    that execute the block. Without it, returns the branch output at full batch size, zeros for
    skipped samples (a zero scalar when the whole batch skips the block).

    Per call it pays one gate computation, which hands the decisions to the host as bytes (one call
    into the C gate kernel where it applies, :class:`FusedGate`); channel sets come from a table
    keyed by those bytes, and a set that keeps every channel runs the branch's layers as they are
    (docs/sparse.md, "Where the time goes").
    """

    def __init__(self, gate: Gate, branch: fx.GraphModule, strategy: str) -> None:
        super().__init__()
        self.gate, self.branch, self.strategy = gate, branch, strategy
        self.fused = FusedGate(gate)
        self.channels, self.layer_gated = self.fused.channels, self.fused.layered
        self._sets: dict[bytes, ChannelSet] = {}

    def train(self, mode: bool = True) -> SparseBlock:
        if mode:
            raise GatekitError("a sparse model is for inference; finetune the gated model instead.")
        return self  # its gate and layers are the gated model's: their modes are the user's

    def forward(self, x: Tensor, shortcut: Tensor | None = None, *sizes: object) -> Tensor:
        # ``sizes``: what the branch reads from outside it, sizes without the batch dimension (a
        # stage's height and width, gatekit/_metadata.py); the same for any samples it runs on.
        if x.shape[0] == 0:
            return self._skipped(shortcut, x)
        # The only host round trip of the block: shapes depend on the decisions.
        bits = self.fused.decision_bytes(x)
        if x.shape[0] == 1:  # the common deployment case, in as few operations as possible
            if self.layer_gated and not bits[-1]:
                return self._skipped(shortcut, x)
            branch = self._modules["branch"]  # nn.Module.__getattr__ costs about 0.6 µs
            if self.channels:
                output = branch.forward(x, self._set_of(bits[: self.channels], x), None, *sizes)
            else:
                output = branch.forward(x, *sizes)
            return output if shortcut is None else output + shortcut
        decisions = np.frombuffer(bits, dtype=bool).reshape(x.shape[0], -1)
        return self._run_batch(x, shortcut, decisions, sizes)

    def _run_batch(self, x: Tensor, shortcut: Tensor | None, decisions: np.ndarray, sizes: tuple) -> Tensor:
        rows = None
        if self.layer_gated and not decisions[:, -1].all():
            executing = np.flatnonzero(decisions[:, -1])
            if executing.size == 0:
                return self._skipped(shortcut, x)
            decisions, rows = decisions[executing], torch.from_numpy(executing).to(x.device)
        inputs = x if rows is None else x[rows]  # indexing keeps a channels-last layout; index_select does not
        if self.channels:
            output = self._run_channels(inputs, decisions[:, : self.channels], sizes)
        else:
            output = self.branch(inputs, *sizes)
        if rows is None:
            return output if shortcut is None else output + shortcut
        if shortcut is None:
            return _new_batch(output, x.shape[0], zeros=True).index_copy_(0, rows, output)
        return shortcut.index_add(0, rows, output)

    @staticmethod
    def _skipped(shortcut: Tensor | None, x: Tensor) -> Tensor:
        # A copy: the caller may edit the block's output in place (a ReLU(inplace=True) after the add).
        return x.new_zeros(()) if shortcut is None else shortcut.clone()

    def _set_of(self, key: bytes, like: Tensor) -> ChannelSet:
        """The channel set of a decision row, given as its bytes (one byte per channel, 1 = on)."""
        found = self._sets.get(key)
        if found is None or (found.index is not None and found.index.device != like.device):
            if len(self._sets) >= _MAX_SETS:
                self._sets.clear()
            row = np.frombuffer(key, dtype=bool)
            index = None if row.all() else torch.from_numpy(np.flatnonzero(row)).to(like.device)
            found = self._sets[key] = ChannelSet(index, int(row.sum()), key)
        return found

    def _run_channels(self, inputs: Tensor, channel_decisions: np.ndarray, sizes: tuple) -> Tensor:
        if self.strategy == "union" or inputs.shape[0] == 1:
            return self._run_union(inputs, channel_decisions, sizes)
        # Per sample, but the samples that keep the same channels share one pass.
        channel_sets, set_of_sample = np.unique(channel_decisions, axis=0, return_inverse=True)
        if channel_sets.shape[0] == 1:
            return self.branch(inputs, self._set_of(channel_sets[0].tobytes(), inputs), None, *sizes)
        output = None
        for index in range(channel_sets.shape[0]):
            samples = torch.from_numpy(np.flatnonzero(set_of_sample.reshape(-1) == index)).to(inputs.device)
            piece = self.branch(inputs[samples], self._set_of(channel_sets[index].tobytes(), inputs), None, *sizes)
            if output is None:
                output = _new_batch(piece, inputs.shape[0])
            output.index_copy_(0, samples, piece)
        return output

    def _run_union(self, inputs: Tensor, channel_decisions: np.ndarray, sizes: tuple) -> Tensor:
        """One pass over the channels any sample keeps, each sample's own channels masked inside it."""
        union = channel_decisions.any(0)
        chosen = self._set_of(union.tobytes(), inputs)
        kept = channel_decisions[:, union]
        # No channel active: the sliced layers give zero-channel tensors, and the consumer its bias.
        if chosen.count == 0 or kept.all():  # samples sharing one set: every active channel is kept
            return self.branch(inputs, chosen, None, *sizes)
        mask = torch.from_numpy(np.ascontiguousarray(kept)).to(device=inputs.device, dtype=inputs.dtype)
        return self.branch(inputs, chosen, mask, *sizes)


# Distinct channel sets a block remembers before it starts its table again: a set is a few hundred
# bytes at most, and learned gates repeat a small number of them.
_MAX_SETS = 256


def _new_batch(like: Tensor, batch: int, *, zeros: bool = False) -> Tensor:
    """A batch of ``batch`` samples shaped like those of ``like``, in its dtype, device and layout."""
    shape = (batch,) + like.shape[1:]
    empty = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format_of(like))
    return empty.zero_() if zeros else empty


def _mask_channels(x: Tensor, mask: Tensor | None, channel_dim: int = 1) -> Tensor:
    """Apply per-sample channel decisions within the active set; None means all kept."""
    return x if mask is None else apply_channel_gate(x, mask, channel_dim)


def _branch_graph(
    model: fx.GraphModule, graph: fx.Graph, nodes: dict[str, fx.Node], site: GateSite, gate: Gate, cache_size: int,
    sparse_blocks: nn.ModuleDict, sizes: set[fx.Node],
) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Copy a block's branch into its own GraphModule taking (x[, channels, mask], *outside), layers
    sliced; ``outside`` are the nodes of ``sizes`` (batch-free sizes) it reads from outside itself.

    A block nested in this one's branch was made sparse first (its add comes first): the copy calls
    its SparseBlock, from ``sparse_blocks``.
    """
    block_input, add = _block_input(nodes, site), nodes[site.add_node]
    branch_output = add.args[_branch_index(add, nodes[site.branch_output_node])]
    members = _between(block_input, branch_output)
    gate_nodes = {n for n in members if _is_gate_node(n)}
    branch = [n for n in graph.nodes if n in members and n not in gate_nodes]
    # Users the output no longer needs do not count: the gate of a nested block made sparse before.
    needed = ancestors([next(iter(reversed(graph.nodes)))])
    _check_closed(site, branch, add, needed, block_input, sizes)
    # An assert on branch values runs with the branch, and not when it is skipped (docs/design.md).
    checks, hanging = checks_on(members, needed), hanging_from(members, needed)
    reads = {parent for node in branch + list(checks) for parent in node.all_input_nodes}
    inside = members | hanging | {block_input}
    outside = [n for n in graph.nodes if n in reads and n in sizes and n not in inside]

    new_graph, modules = fx.Graph(), {}
    env = {block_input: new_graph.placeholder("x")}
    gated = gate.channel_head is not None
    active = new_graph.placeholder("channels") if gated else None
    mask = new_graph.placeholder("mask") if gated else None
    env.update((node, new_graph.placeholder(f"size_{index}")) for index, node in enumerate(outside))
    roles = _channel_roles(nodes, site) if gated else {}

    def copied(node: fx.Node) -> fx.Node:
        # A tensor the branch reads that does not depend on its input (a layer-scale parameter and
        # the views of it) is not on the path from the block input: bring it into the branch too.
        if node not in env:
            env[node] = new_graph.node_copy(node, copied)
            if node.op == "get_attr":
                modules[node.target] = _attribute(model, node.target)
        return env[node]

    for node in branch:
        if node.op == "call_function" and node.target is apply_layer_gate:
            env[node] = env[node.args[0]]
        elif node.op == "call_function" and node.target is apply_channel_gate:
            masked = new_graph.call_function(_mask_channels, (env[node.args[0]], mask, *node.args[2:]))
            env[node] = masked
            if site.consumer is None:  # no consumer reads the reduced width: widen it back here
                modules[f"widen_{len(modules)}"] = sliced(None, "widen", site.channels)
                env[node] = new_graph.call_module(f"widen_{len(modules) - 1}", (masked, active))
        elif node in roles:
            name = f"sliced_{len(modules)}"
            modules[name] = sliced(model.get_submodule(node.target), roles[node], site.channels, cache_size=cache_size)
            env[node] = new_graph.call_module(name, (env[node.args[0]], active))
        else:
            env[node] = new_graph.node_copy(node, copied)
            if node.op == "call_module":
                nested = node.target.removeprefix("gatekit_sparse_blocks.")
                modules[node.target] = sparse_blocks[nested] if nested != node.target else model.get_submodule(node.target)
    for node in [n for n in graph.nodes if n in checks]:
        env[node] = new_graph.node_copy(node, copied)
    for node in reversed([n for n in graph.nodes if n in hanging]):
        graph.erase_node(node)
    new_graph.output(env[branch_output])
    branch = fx.GraphModule(modules, new_graph, "Branch")
    _bind_called_modules(branch)
    return branch, outside


def _bind_called_modules(graph_module: fx.GraphModule) -> None:
    """Make every module call of ``graph_module``'s code one lookup in its instance dict.

    The generated code reaches ``layer1.0.relu`` as ``getattr(self.layer1, "0").relu``: one
    ``nn.Module.__getattr__`` per name, about 0.6 µs each, and inside a network at batch 1 several times
    that (docs/sparse.md). Each called module is bound once to a flat attribute, which the instance
    dict answers first; it stays registered where it was, so state_dict, ``.to()`` and
    named_modules are unchanged. Bound at build time: a module replaced later is not seen.
    """
    bound: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target not in bound:
            name = "_gatekit_bound_" + node.target.replace(".", "_")
            while name in graph_module.__dict__:  # "a.b_c" and "a_b.c" flatten alike
                name += "_"
            graph_module.__dict__[name] = graph_module.get_submodule(node.target)
            bound[node.target] = name
        node.target = bound[node.target]
    graph_module.recompile()


def _channel_roles(nodes: dict[str, fx.Node], site: GateSite) -> dict[fx.Node, str]:
    """Which call_module nodes run on the reduced channels, and how: first conv, chain, consumer
    (a squeeze-excitation on the gated channels adds a consumer and a first); see GateSite."""
    return {nodes[name]: role for name, role in site.sliced_layers}


def _route_through(graph: fx.Graph, nodes: dict[str, fx.Node], site: GateSite, key: str, outside: list[fx.Node]) -> None:
    """Replace the block's residual add by its SparseBlock, which adds the shortcut itself."""
    add = nodes[site.add_node]
    index = _branch_index(add, nodes[site.branch_output_node])
    args = list(add.args)
    with graph.inserting_before(add):
        if add.kwargs:  # torch.add(..., alpha=...): the block returns the branch, the add stays
            call = (_block_input(nodes, site), None, *outside) if outside else (_block_input(nodes, site),)
            args[index] = graph.call_module(f"gatekit_sparse_blocks.{key}", call)
            # A zero scalar cannot be added to in place: the add becomes an out-of-place one.
            replacement = graph.call_function(torch.add, tuple(args), dict(add.kwargs))
        else:
            shortcut = args[1 - index]
            replacement = graph.call_module(f"gatekit_sparse_blocks.{key}", (_block_input(nodes, site), shortcut, *outside))
    add.replace_all_uses_with(replacement)
    graph.erase_node(add)
    nodes[site.add_node] = replacement


def _block_input(nodes: dict[str, fx.Node], site: GateSite) -> fx.Node:
    """The node a block reads: its traced input, or that input masked by the channel gate of a
    block whose branch holds this one (the mask replaced every use of the traced input)."""
    block_input = nodes[site.block_input_node]
    masked = [user for user in block_input.users if user.op == "call_function" and user.target is apply_channel_gate]
    return masked[0] if masked else block_input


def _branch_index(add: fx.Node, branch_output: fx.Node) -> int:
    """Which argument of the residual add is the (gated) branch."""
    first = add.args[0]
    # The branch reaches the add through the gates applied at its end: the layer gate, and also the
    # channel gate when the branch ends on its gated channels (a conv-BN branch in "channel" mode).
    while first is not branch_output and first.op == "call_function" and first.target in (apply_layer_gate, apply_channel_gate):
        first = first.args[0]
    return 0 if first is branch_output else 1


def _is_gate_node(node: fx.Node) -> bool:
    if node.op == "call_module" and node.target.startswith("gatekit_gates."):
        return True
    return node.op == "call_function" and node.target is operator.getitem and _is_gate_node(node.args[0])


def _attribute(model: nn.Module, target: str) -> object:
    """What a get_attr node of ``model`` reads (a parameter, buffer or constant), by dotted path."""
    value: object = model
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _between(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """Nodes on paths from ``start`` (excluded) to ``end`` (included)."""
    upstream = ancestors([end])
    found, frontier = set(), [start]
    while frontier:
        for user in frontier.pop().users:
            if user in upstream and user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _check_closed(
    site: GateSite, branch: list[fx.Node], add: fx.Node, needed: set[fx.Node], block_input: fx.Node, sizes: set[fx.Node]
) -> None:
    inside, free = set(branch), input_metadata(branch, block_input, sizes)  # sizes: read by others too
    for node in branch:
        for user in node.users:
            if user not in inside and user is not add and user in needed and node not in free:
                raise GatekitError(
                    f"block '{site.name}': the branch value '{node.name}' is also used outside the "
                    f"branch (by '{user.name}'), so the branch cannot be skipped; use the gated "
                    f"model as it is, or exclude this block at conversion."
                )
