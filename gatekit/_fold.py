"""Graph surgery behind gatekit.compact: apply a fold plan to a gated model, in place.

A plan is plain data (it goes into checkpoints): one entry per gated block, saying whether the block
is removed, which of its gated filters are kept, and which of its two gates stay. Applying the same
plan to a freshly converted model gives the same architecture, so ``gatekit.load`` can rebuild a
compacted model before loading its weights.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ._graph import ancestors
from ._sliced import can_slice, is_plain_norm
from .blocks import GateSite
from .errors import GatekitError
from .gate import apply_channel_gate, apply_layer_gate
from .gated_model import attach_info, gate_key, info_of
from .macs import measure_costs

Plan = list[dict[str, Any]]


def apply_plan(model: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Fold ``plan`` into ``model`` (edited in place and returned): blocks removed, filters sliced
    away, gates dropped; the sites and MAC costs recorded on the model are measured again."""
    info = info_of(model)
    nodes = {node.name: node for node in model.graph.nodes}
    sites = {site.name: site for site in info.sites}
    unknown = [entry["block"] for entry in plan if entry["block"] not in sites]
    if unknown:
        raise GatekitError(
            f"the fold plan names blocks this model does not have: {unknown[:3]}; it was made for another model."
        )
    kept_sites = []
    for entry in plan:
        site = sites[entry["block"]]
        if entry["removed"]:
            _remove_branch(nodes, site)
            continue
        if entry["kept"] is not None:
            _slice_filters(model, nodes, site, entry["kept"])
            site = dataclasses.replace(site, channels=len(entry["kept"]))
        if _drop_gates(model, nodes, site, channel=not entry["channel_gate"], layer=not entry["layer_gate"]):
            kept_sites.append(site)
    model.graph.eliminate_dead_code()
    model.graph.lint()
    model.delete_all_unused_submodules()
    model.recompile()
    live = {node.name for node in model.graph.nodes}
    folded = {entry["block"] for entry in plan}
    # A block nested in a removed branch is gone with it, whatever its own entry says.
    remaining = [s for s in info.sites if s.name not in folded] + kept_sites
    order = {site.name: index for index, site in enumerate(info.sites)}
    remaining = sorted((s for s in remaining if s.add_node in live), key=lambda s: order[s.name])
    dtype, device = _placement(model)
    costs = measure_costs(model, remaining, torch.zeros(info.input_shape, dtype=dtype, device=device))
    remaining = [
        dataclasses.replace(site, branch_macs=branch, channel_macs=channel)
        for site, branch, channel in zip(remaining, costs.branch_macs, costs.channel_macs)
    ]
    attach_info(model, dataclasses.replace(
        info, sites=tuple(remaining), dense_macs=costs.dense_macs, compaction=info.compaction + (copy.deepcopy(plan),),
    ))
    return model


def _placement(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(iter(model.parameters()), None)
    return (parameter.dtype, parameter.device) if parameter is not None else (torch.float32, torch.device("cpu"))


def _remove_branch(nodes: dict[str, fx.Node], site: GateSite) -> None:
    """The block becomes its shortcut: the add's users read the shortcut, and the branch is dead."""
    add = nodes[site.add_node]
    branch_side = 0 if site.branch_output_node in {n.name for n in ancestors([add.args[0]])} else 1
    add.replace_all_uses_with(add.args[1 - branch_side])
    add.graph.erase_node(add)


def can_slice_filters(model: nn.Module, site: GateSite) -> bool:
    """Whether every layer the gated filters pass can be sliced physically (plain convs, linear
    layers, depthwise convs, plain batch norms) and the filters reach a consumer."""
    if site.consumer is None or not site.sliced_layers:
        return False
    graph_nodes = {node.name: node for node in model.graph.nodes}
    for name, role in site.sliced_layers:
        node = graph_nodes.get(name)
        if node is None or node.op != "call_module" or _slicer(model.get_submodule(node.target), role) is None:
            return False
    return True


def _slice_filters(model: fx.GraphModule, nodes: dict[str, fx.Node], site: GateSite, kept: list[int]) -> None:
    index = torch.tensor(kept, dtype=torch.long, device=_placement(model)[1])
    for name, role in site.sliced_layers:
        target = nodes[name].target
        module = model.get_submodule(target)
        slicer = _slicer(module, role)
        if slicer is None:
            raise GatekitError(f"block '{site.name}': layer '{target}' ({type(module).__name__}) cannot be sliced.")
        _set_submodule(model, target, slicer(module, index))
    gate = model.gatekit_gates[gate_key(site.name)]
    if gate.channel_head is not None:
        gate.channel_head = _linear_rows(gate.channel_head, index)
    gate.channels = len(kept)


def _drop_gates(model: fx.GraphModule, nodes: dict[str, fx.Node], site: GateSite, *, channel: bool, layer: bool) -> bool:
    """Drop the block's channel and/or layer gate; return whether any gate is left on it."""
    key = gate_key(site.name)
    gate = model.gatekit_gates[key]
    call = next(n for n in nodes.values() if n.op == "call_module" and n.target == f"gatekit_gates.{key}")
    for getter in list(call.users):
        if getter.op == "call_function" and getter.target is operator.getitem:
            dropped = (getter.args[1] == 0 and channel) or (getter.args[1] == 1 and layer)
            for user in list(getter.users) if dropped else ():
                if user.op == "call_function" and user.target in (apply_channel_gate, apply_layer_gate):
                    user.replace_all_uses_with(user.args[0])
                    user.graph.erase_node(user)
    if channel:
        gate.channel_head = None
    if layer:
        gate.layer_head = None
    # A gate with no head left is no longer called: delete_all_unused_submodules removes it.
    return gate.channel_head is not None or gate.layer_head is not None


def _set_submodule(model: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _slicer(module: nn.Module, role: str) -> Callable[[Any, torch.Tensor], nn.Module] | None:
    """How to slice ``module`` for its role, or None when gatekit cannot do it physically."""
    if isinstance(module, nn.modules.conv._ConvNd) and can_slice(module):
        depthwise = module.groups == module.in_channels == module.out_channels
        if role == "first" and module.groups == 1:
            return _conv_outputs
        if role == "consumer" and module.groups == 1:
            return _conv_inputs
        if role == "chain" and depthwise:
            return _conv_depthwise
        return None
    if isinstance(module, nn.Linear) and role in ("first", "consumer"):
        return _linear_rows if role == "first" else _linear_columns
    if role == "chain" and is_plain_norm(module):
        return _norm_channels
    return None


def _with(module: nn.Module, **changes: Any) -> nn.Module:
    """A copy of ``module`` with some attributes and parameters replaced (its hooks and mode kept)."""
    copied = copy.copy(module)
    copied._parameters, copied._buffers = dict(module._parameters), dict(module._buffers)
    for name, value in changes.items():
        if isinstance(value, torch.Tensor) and name in module._parameters:
            trainable = module._parameters[name].requires_grad
            copied._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=trainable)
        elif isinstance(value, torch.Tensor) and name in module._buffers:
            copied._buffers[name] = value.detach().clone()
        else:
            object.__setattr__(copied, name, value)
    return copied


def _conv_outputs(conv: nn.modules.conv._ConvNd, index: torch.Tensor) -> nn.Module:
    return _with(conv, out_channels=len(index), weight=conv.weight.index_select(0, index), **_bias_rows(conv, index))


def _conv_inputs(conv: nn.modules.conv._ConvNd, index: torch.Tensor) -> nn.Module:
    return _with(conv, in_channels=len(index), weight=conv.weight.index_select(1, index))


def _conv_depthwise(conv: nn.modules.conv._ConvNd, index: torch.Tensor) -> nn.Module:
    return _with(
        conv, in_channels=len(index), out_channels=len(index), groups=len(index),
        weight=conv.weight.index_select(0, index), **_bias_rows(conv, index),
    )


def _linear_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Module:
    return _with(linear, out_features=len(index), weight=linear.weight.index_select(0, index), **_bias_rows(linear, index))


def _bias_rows(layer: nn.Module, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's bias restricted to ``index``, as a keyword for :func:`_with` (none without a bias)."""
    return {} if layer.bias is None else {"bias": layer.bias.index_select(0, index)}


def _linear_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Module:
    return _with(linear, in_features=len(index), weight=linear.weight.index_select(1, index))


def _norm_channels(norm: nn.modules.batchnorm._BatchNorm, index: torch.Tensor) -> nn.Module:
    changes: dict[str, Any] = {"num_features": len(index)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(norm, name)
        if tensor is not None:
            changes[name] = tensor.index_select(0, index)
    return _with(norm, **changes)
