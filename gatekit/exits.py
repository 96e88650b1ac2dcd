"""gatekit.add_exits: exit heads after residual blocks, so that a sample the model is already sure of
leaves early (Shallow-Deep Networks, Kaya et al. 2019; the paper's future work).

Exits sit where one residual block hands its output to the next: at the input of every block but the
first, named after the block they follow. They are found from the traced graph, as gate sites are,
so a plain, gated, compacted or statically pruned network takes them alike.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._internal import internal_errors
from ._module_lookups import hoist_module_lookups
from ._shapes import propagate_shapes
from ._tracing import trace_model
from ._exit_info import HEADS, POLICY, ExitInfo, ExitSite, attach_exit_info, exits_of, has_exits
from .errors import ExitsError
from .exit_head import ExitHead
from .exit_macs import backbone_macs, measure_exit_costs
from .exit_policy import RULES, ExitPolicy
from ._model_identity import describe
from .gated_model import SOURCE_ATTRIBUTE, GatekitInfo, gate_key

PLACEMENTS = ("blocks", "stages")


def add_exits(
    model: nn.Module,
    *,
    at: str | Sequence[str] = "blocks",
    pool: int = 4,
    hidden: int = 0,
    rule: str = "probability",
    example_input: Tensor | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    inplace: bool = False,
) -> fx.GraphModule:
    """Return a copy of ``model`` with an exit head after residual blocks.

    Freshly added, no exit fires (every threshold is infinite): in eval mode the model computes what
    it did. Fit the heads with :func:`gatekit.fit_exits` (backbone frozen) or a joint finetune with
    :func:`gatekit.exit_loss`, then set the thresholds with :func:`gatekit.calibrate_exits`.

    Args:
        model: a residual network returning logits [B, classes]: plain, gated by :func:`gatekit.convert`
            (exits then go before its gated blocks), compacted, or statically pruned.
        at: ``"blocks"`` (after every block but the last), ``"stages"`` (after the last block of
            every stage but the last), or a list of block names from :func:`exit_sites`.
        pool: each head average-pools to ``pool`` x ``pool`` before its linear layer.
        hidden: width of a hidden layer in each head (0: one linear layer, the measured default).
        rule: confidence of a head: ``"probability"`` (top softmax probability), ``"margin"`` or
            ``"entropy"``.
        example_input: an input the model accepts (default as in :func:`gatekit.convert`).
        leaf_modules: module types to keep whole when tracing, as for :func:`gatekit.convert`.
        autowrap_functions: functions to keep whole when tracing, as for :func:`gatekit.convert`.
        inplace: share the model's parameters instead of copying them.

    Returns:
        A ``torch.fx.GraphModule``; ``result.gatekit_exits`` (:class:`ExitInfo`) describes the exits.
        In eval mode it returns each sample's logits from the exit it took (recorded in
        ``result.gatekit_exit_policy.taken``); in training mode the final logits.

    Raises:
        ExitsError: the model already has exits; it has fewer than two residual blocks; it does not
            return one logits tensor; ``at``, ``rule``, ``pool`` or ``hidden`` is invalid.

    >>> from gatekit.adapters import get_model
    >>> exits = add_exits(get_model("cifar/resnet20"), at="stages")
    >>> [site.name for site in exits.gatekit_exits.sites]
    ['layer1.2', 'layer2.2']
    """
    _check_options(model, at, pool, hidden, rule)
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    description = None if isinstance(getattr(model, "gatekit", None), GatekitInfo) else describe(model)
    graph_module, sites = _graph_and_sites(model, example_input, leaf_modules, autowrap_functions, inplace)
    chosen = _choose(sites, at, model)
    output = _output_node(graph_module, model)
    classes = output.meta["tensor_meta"].shape[-1]
    reference = next(iter(graph_module.parameters()))
    graph_module.add_module(HEADS, nn.ModuleDict({
        gate_key(site.name): ExitHead(site.channels, classes, pool=pool, hidden=hidden).to(reference.device, reference.dtype)
        for site in chosen
    }))
    graph_module.add_module(POLICY, ExitPolicy(len(chosen), rule=rule).to(reference.device))
    with internal_errors("inserting exit heads", output.name):
        _insert_exits(graph_module, chosen, output)
        graph_module.graph.lint()
        graph_module.recompile()
        hoist_module_lookups(graph_module)
    example = torch.zeros(_input_shape(graph_module), device=reference.device, dtype=reference.dtype)
    info = ExitInfo(
        sites=tuple(chosen),
        options=dict(at=[site.name for site in chosen], pool=pool, hidden=hidden, rule=rule),
        input_shape=tuple(example.shape),
        description=description,
    )
    attach_exit_info(graph_module, info)
    info.dense_macs = backbone_macs(graph_module, example)
    info.costs = measure_exit_costs(graph_module, example)
    getattr(graph_module, POLICY).forget()  # shape propagation ran it; no forward of the user's yet
    if source is not None:
        graph_module.meta.setdefault("_user_preserved_attributes", {})[SOURCE_ATTRIBUTE] = source
        setattr(graph_module, SOURCE_ATTRIBUTE, source)
    getattr(graph_module, HEADS).train(model.training)
    getattr(graph_module, POLICY).train(model.training)
    graph_module.training = model.training
    return graph_module


def exit_sites(
    model: nn.Module,
    *,
    example_input: Tensor | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
) -> list[ExitSite]:
    """List where :func:`add_exits` can put exits, without changing ``model``.

    >>> from gatekit.adapters import get_model
    >>> [site.name for site in exit_sites(get_model("cifar/resnet8"))]
    ['layer1.0', 'layer2.0']
    """
    _check_model(model)
    return _graph_and_sites(model, example_input, leaf_modules, autowrap_functions, inplace=False)[1]


def _check_options(model: Any, at: Any, pool: Any, hidden: Any, rule: Any) -> None:
    _check_model(model)
    if has_exits(model):
        raise ExitsError(
            f"{type(model).__name__} already has exit heads ({', '.join(exits_of(model).options['at'])}). "
            f"Add exits once, to the model without them; to move them, add them to that model again."
        )
    if isinstance(at, str) and at not in PLACEMENTS:
        raise ExitsError(f"at={at!r}: give 'blocks', 'stages' or a list of block names (gatekit.exit_sites).")
    if not isinstance(at, str) and (not all(isinstance(name, str) for name in at) or not len(at)):
        raise ExitsError(f"at={at!r}: give a non-empty list of block names (gatekit.exit_sites lists them).")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ExitsError(f"pool={pool!r}: give the pooled side length, a positive integer (4 pools to 4 x 4).")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ExitsError(f"hidden={hidden!r}: give the hidden width, a non-negative integer (0: no hidden layer).")
    if rule not in RULES:
        raise ExitsError(f"rule={rule!r} is not a confidence rule; use one of {', '.join(RULES)}.")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ExitsError(f"gatekit adds exits to torch.nn.Module instances, got {type(model).__name__}.")


def _graph_and_sites(
    model: nn.Module, example_input: Tensor | None, leaf_modules: Sequence[type[nn.Module]],
    autowrap_functions: Sequence[Callable[..., Any]], inplace: bool,
) -> tuple[fx.GraphModule, list[ExitSite]]:
    """The graph to edit (the gated model itself, or the traced plain model) and its exit sites."""
    info = getattr(model, "gatekit", None)
    if isinstance(info, GatekitInfo):
        graph_module = model if inplace else copy.deepcopy(model)
        example = example_input if example_input is not None else _zeros_like_model(model, info.input_shape)
        propagate_shapes(graph_module, model, example)
        blocks = list(info.sites)
    else:
        from .convert import _discover  # imported here: convert imports gatekit's public modules

        model = model if inplace else copy.deepcopy(model)
        graph_module = trace_model(model, leaf_modules, autowrap_functions, class_name=f"Exits{type(model).__name__}")
        propagate_shapes(graph_module, model, example_input)
        blocks = _discover(graph_module)[0]
        propagate_shapes(graph_module, model, _last_example(graph_module))  # canonicalize may add nodes
    nodes = {node.name: node for node in graph_module.graph.nodes}
    sites = []
    for previous, block in zip(blocks, blocks[1:]):
        node = nodes[block.block_input_node]
        shape = node.meta["tensor_meta"].shape
        sites.append(ExitSite(
            name=previous.name, node=node.name, next_block=block.name, channels=shape[1],
            stage_end=block.shortcut != "identity",
        ))
    return graph_module, sites


def _choose(sites: list[ExitSite], at: str | Sequence[str], model: nn.Module) -> list[ExitSite]:
    if not sites:
        raise ExitsError(
            f"{type(model).__name__} has no place for an exit: exits go between residual blocks, and "
            f"gatekit found fewer than two{' gated' if hasattr(model, 'gatekit') else ''} blocks."
        )
    if at == "blocks":
        return sites
    if at == "stages":
        chosen = [site for site in sites if site.stage_end]
        if not chosen:
            raise ExitsError(f"{type(model).__name__} has a single stage: use at='blocks' or name blocks.")
        return chosen
    by_name = {site.name: site for site in sites}
    unknown = [name for name in at if name not in by_name]
    if unknown:
        raise ExitsError(f"no exit site after block(s) {unknown}; the sites are: {', '.join(by_name)}.")
    if len(set(at)) != len(at):
        raise ExitsError(f"at={list(at)} names a block twice: give each exit once.")
    return [site for site in sites if site.name in set(at)]


def _output_node(graph_module: fx.GraphModule, model: nn.Module) -> fx.Node:
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    value = output.args[0]
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 2:
        raise ExitsError(
            f"{type(model).__name__} does not return one logits tensor [batch, classes]: exit heads "
            f"replace the model's output, so they need it to be the classifier's logits."
        )
    return value


def _insert_exits(graph_module: fx.GraphModule, sites: list[ExitSite], final: fx.Node) -> None:
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    heads = []
    for site in sites:
        with graph.inserting_after(nodes[site.node]):
            heads.append(graph.call_module(f"{HEADS}.{gate_key(site.name)}", (nodes[site.node],)))
    with graph.inserting_after(final):
        decided = graph.call_module(POLICY, (final, *heads))
    final.replace_all_uses_with(decided, delete_user_cb=lambda user: user is not decided)


def _zeros_like_model(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    reference = next(iter(model.parameters()))
    return torch.zeros(shape, device=reference.device, dtype=reference.dtype)


def _last_example(graph_module: fx.GraphModule) -> Tensor:
    placeholder = next(node for node in graph_module.graph.nodes if node.op == "placeholder")
    meta = placeholder.meta["tensor_meta"]
    return torch.zeros(meta.shape, dtype=meta.dtype, device=next(iter(graph_module.parameters())).device)


def _input_shape(graph_module: fx.GraphModule) -> tuple[int, ...]:
    placeholder = next(node for node in graph_module.graph.nodes if node.op == "placeholder")
    return (1, *placeholder.meta["tensor_meta"].shape[1:])
