"""gatekit.convert: insert channel and layer gates into every residual block of a model."""
from __future__ import annotations

import copy
import fnmatch
import math
import operator
from numbers import Real
from typing import Any, Callable, Literal, Sequence, overload

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._tracing import trace_model
from ._shapes import propagate_shapes
from ._canonical import canonicalize
from ._internal import internal_errors
from ._module_lookups import hoist_module_lookups
from .blocks import GateSite, discover
from .errors import AlreadyConvertedError, GatekitError, NoResidualBlockError
from .gate import Gate, apply_channel_gate, apply_layer_gate
from ._model_identity import describe
from ._source import SOURCE_ATTRIBUTE
from .gated_model import GATE_MODES, GatekitInfo, attach_info, gate_key
from .macs import node_macs
from .skipped_sites import SkippedSite, report_skipped


def convert(
    model: nn.Module,
    *,
    gates: str = "channel+layer",
    example_input: Tensor | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    regularizer: Callable[[nn.Module], Tensor] | Sequence[Callable[[nn.Module], Tensor]] | None = None,
    temperature: float = 1.0,
    init_bias: float = 3.0,
    hidden: int = 16,
    channel_keep: float | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    inplace: bool = False,
    strict: bool = False,
) -> fx.GraphModule:
    """Return a copy of ``model`` with a gate in every residual block.

    Args:
        model: a residual network; its blocks are found from the traced graph (see docs/design.md).
        gates: ``"channel+layer"`` (the paper's DLCG), ``"channel"`` or ``"layer"`` (ConvNet-AIG).
        example_input: an input the model accepts, used to measure channel counts and MACs; by default
            one of the registered input size for a model from ``gatekit.adapters.get_model``, else a
            1 x C x 224 x 224 tensor, C being the first conv's input channels.
        include: fnmatch patterns of block names to gate (default: all), see :func:`gate_sites`.
        exclude: fnmatch patterns of block names to leave ungated.
        regularizer: a loss such as ``gatekit.SparsityLoss(layer=0.05, channel=0.1)``, or a list of
            them, that :func:`gatekit.gate_loss` computes from the last forward.
        temperature: Gumbel-sigmoid temperature used in training mode.
        init_bias: initial logit of every gate; positive keeps a fresh model's function.
        hidden: width of the gate's shared linear layer (16 in the paper).
        channel_keep: instead of deciding each filter on its own, keep exactly
            ``k = max(1, ceil(channel_keep * channels))`` filters of every gated block per input, those
            with the largest channel logits (FBS-style top-k, docs/losses.md); the channel cost is then
            fixed by construction and only the layer gates vary it. In (0, 1]; needs channel gates.
        leaf_modules: module types torch.fx must not trace into.
        autowrap_functions: free functions torch.fx must record as calls instead of tracing.
        inplace: reuse the model's parameters instead of copying them first.
        strict: refuse the model if any residual block cannot be gated, instead of leaving those
            blocks as they are with one :class:`gatekit.errors.SkippedBlocksWarning` naming each.

    Returns:
        A ``torch.fx.GraphModule``, each module in its train/eval mode; ``result.gatekit`` describes the
        gates, and in eval mode it computes what ``model`` computes until the gates are trained.

    Raises:
        AlreadyConvertedError: ``model`` already has gatekit gates.
        TraceError: torch.fx cannot trace the model (the message names the module).
        NoResidualBlockError: no residual block can be gated, or the patterns matched none.
        UngatableBlockError: ``strict`` and a block cannot be gated (the message says why).
        GatekitError: an unknown ``gates`` mode, or ``channel_keep`` outside (0, 1] or without
            channel gates.

    >>> import torchvision
    >>> gated = convert(torchvision.models.resnet18(), example_input=torch.randn(1, 3, 64, 64))
    >>> len(gated.gatekit.sites)
    8
    """
    if gates not in GATE_MODES:
        raise GatekitError(f"gates={gates!r} is not a gating mode; use one of {', '.join(GATE_MODES)}.")
    _check_channel_keep(channel_keep, gates)
    _check_model(model)
    # The analysis reads the user's modules and changes none; the copy waits until there is something
    # to convert (a refused 1B-parameter model costs no copy of its weights).
    graph_module = trace_model(model, leaf_modules, autowrap_functions, class_name=f"Gated{type(model).__name__}")
    example_input = propagate_shapes(graph_module, model, example_input, fake=True)
    found, skipped = _discover(graph_module)
    sites, skipped = _select(found, skipped, include, exclude, model)
    report_skipped(type(model).__name__, len(sites), skipped, strict=strict)
    if not inplace:
        graph_module = copy.deepcopy(graph_module)
    dense_macs = sum(node_macs(graph_module).values())

    channel_head, layer_head = "channel" in gates, "layer" in gates
    graph_module.gatekit_gates = nn.ModuleDict()
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for site in sites:
        gate = Gate(
            site.in_channels, site.channels, channel_head=channel_head, layer_head=layer_head,
            hidden=hidden, temperature=temperature, init_bias=init_bias,
            keep=None if channel_keep is None else _kept_filters(channel_keep, site.channels),
        )
        graph_module.gatekit_gates[gate_key(site.name)] = gate.to(example_input.device, example_input.dtype)
        with internal_errors("inserting a gate", site.add_node, block=site.name):
            _insert_gate(graph_module.graph, nodes, site, channel_head, layer_head)
    with internal_errors("checking the gated graph", "its nodes"):
        graph_module.graph.lint()
        hoist_module_lookups(graph_module)
    attach_info(graph_module, GatekitInfo(
        mode=gates,
        sites=tuple(sites),
        skipped=tuple(skipped),
        dense_macs=dense_macs,
        input_shape=tuple(example_input.shape),
        regularizer=regularizer,
        options=dict(
            gates=gates, include=include, exclude=tuple(exclude), temperature=temperature,
            init_bias=init_bias, hidden=hidden,
            # Only when set: a checkpoint of a model without it still loads in a gatekit without it.
            **({} if channel_keep is None else dict(channel_keep=float(channel_keep))),
        ),
        source=getattr(model, SOURCE_ATTRIBUTE, None),
        description=describe(model),
    ))
    # Every module keeps its own train/eval flag (a finetune may hold its batch norms in eval mode);
    # the new gates follow the model's.
    graph_module.training = model.training
    graph_module.gatekit_gates.train(model.training)
    return graph_module


@overload
def gate_sites(
    model: nn.Module, *, example_input: Tensor | None = ..., leaf_modules: Sequence[type[nn.Module]] = ...,
    autowrap_functions: Sequence[Callable[..., Any]] = ..., skipped: Literal[False] = ...,
) -> list[GateSite]: ...
@overload
def gate_sites(
    model: nn.Module, *, example_input: Tensor | None = ..., leaf_modules: Sequence[type[nn.Module]] = ...,
    autowrap_functions: Sequence[Callable[..., Any]] = ..., skipped: Literal[True],
) -> tuple[list[GateSite], list[SkippedSite]]: ...


def gate_sites(
    model: nn.Module,
    *,
    example_input: Tensor | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    skipped: bool = False,
) -> list[GateSite] | tuple[list[GateSite], list[SkippedSite]]:
    """List where :func:`convert` would put gates, without changing ``model``.

    Each :class:`GateSite` gives the block's dotted ``name`` (what ``include``/``exclude`` match),
    the gated ``channels`` of its ``first_conv``, the ``consumer`` conv and the ``shortcut``.

    Args:
        model: a residual network, as for :func:`convert`.
        example_input: an input the model accepts, as for :func:`convert`.
        leaf_modules: module types torch.fx must not trace into.
        autowrap_functions: free functions torch.fx must record as calls instead of tracing.
        skipped: also return the residual adds that cannot be gated, each a
            :class:`gatekit.SkippedSite` with its ``reason``.

    Returns:
        The sites, or with ``skipped=True`` a pair (sites, skipped sites), each in graph order.

    Raises:
        TraceError: torch.fx cannot trace the model.

    >>> import torchvision
    >>> [site.name for site in gate_sites(torchvision.models.resnet18())][:2]
    ['layer1.0', 'layer1.1']
    """
    _check_model(model)
    graph_module = trace_model(model, leaf_modules, autowrap_functions, class_name=type(model).__name__)
    propagate_shapes(graph_module, model, example_input, fake=True)
    found, not_gated = _discover(graph_module)
    return (found, not_gated) if skipped else found


def _discover(graph_module: fx.GraphModule) -> tuple[list[GateSite], list[SkippedSite]]:
    """Rewrite unusual residual forms into plain ones (gatekit/_canonical.py), then find the blocks."""
    with internal_errors("rewriting partial residuals and splits", "the traced graph"):
        canonicalize(graph_module)
    return discover(graph_module)


def _kept_filters(channel_keep: float, channels: int) -> int:
    """Filters a top-k channel gate keeps per input: ``max(1, ceil(channel_keep * channels))``, the
    product rounded to 9 decimals first so that float error does not keep one more (0.3 * 10 is
    3.0000000000000004 in floating point, and keeps 3)."""
    return max(1, math.ceil(round(channel_keep * channels, 9)))


def _check_channel_keep(channel_keep: object, gates: str) -> None:
    if channel_keep is None:
        return
    if isinstance(channel_keep, bool) or not (
        isinstance(channel_keep, Real) and math.isfinite(channel_keep) and 0 < channel_keep <= 1
    ):
        raise GatekitError(
            f"channel_keep={channel_keep!r}: give the fraction of each block's filters to keep per input, "
            f"a number in (0, 1] (0.5 keeps half), or None to decide each filter on its own."
        )
    if "channel" not in gates:
        raise GatekitError(
            f"channel_keep={channel_keep!r} sets how many filters the channel gates keep, and gates={gates!r} "
            f"has no channel gates: convert with gates='channel+layer' or 'channel', or drop channel_keep."
        )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise GatekitError(f"gatekit converts torch.nn.Module instances, got {type(model).__name__}.")
    if isinstance(getattr(model, "gatekit", None), GatekitInfo) or any(isinstance(m, Gate) for m in model.modules()):
        raise AlreadyConvertedError(
            f"{type(model).__name__} is already gated by gatekit. Convert the original model, or "
            f"use the gated one as it is (its options are in `model.gatekit.options`)."
        )


def _select(
    sites: list[GateSite], skipped: list[SkippedSite], include: Sequence[str] | None, exclude: Sequence[str],
    model: nn.Module,
) -> tuple[list[GateSite], list[SkippedSite]]:
    """The sites and skipped sites the patterns select (a pattern may name a skipped site)."""
    if not sites and not skipped:
        raise NoResidualBlockError(
            f"found no residual block in {type(model).__name__}: no elementwise add joins a branch "
            f"holding a convolution to a shortcut from the same input. gatekit gates residual "
            f"networks (ResNet, MobileNetV2, ...); a plain feed-forward CNN such as VGG has no "
            f"block to gate."
        )
    names = [site.name for site in sites] + [site.name for site in skipped]
    for pattern in list(include or ()) + list(exclude):
        if not fnmatch.filter(names, pattern):
            raise NoResidualBlockError(
                f"the block pattern {pattern!r} matches none of the residual blocks: {', '.join(names)}."
            )

    def chosen(name: str) -> bool:
        included = include is None or any(fnmatch.fnmatchcase(name, p) for p in include)
        return included and not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    selected = [site for site in sites if chosen(site.name)]
    if sites and not selected:
        raise NoResidualBlockError("include/exclude left no block to gate; gate at least one.")
    keys = [gate_key(site.name) for site in selected]
    if len(set(keys)) != len(keys):
        raise GatekitError(f"two blocks map to the same gate name: {keys}; rename one of the modules.")
    return selected, [site for site in skipped if chosen(site.name)]


def _insert_gate(graph: fx.Graph, nodes: dict[str, fx.Node], site: GateSite, channel_head: bool, layer_head: bool) -> None:
    """Call the block's gate on its input, then apply its decisions where the site says."""
    block_input, add = nodes[site.block_input_node], nodes[site.add_node]
    branch_index = 0 if add.args[0] is nodes[site.branch_output_node] else 1
    anchor = block_input
    if anchor.op == "placeholder":  # keep every placeholder ahead of the first computation
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        gate_node = graph.call_module(f"gatekit_gates.{gate_key(site.name)}", (block_input,))
    with graph.inserting_after(gate_node):
        layer_gates = graph.call_function(operator.getitem, (gate_node, 1))
        channel_gates = graph.call_function(operator.getitem, (gate_node, 0))
    if channel_head:
        gated_channels = nodes[site.channel_gate_node]
        with graph.inserting_after(gated_channels):
            channel_dim = () if site.channel_dim == 1 else (site.channel_dim,)  # dimension 1: the short call
            masked = graph.call_function(apply_channel_gate, (gated_channels, channel_gates) + channel_dim)
        gated_channels.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    else:
        graph.erase_node(channel_gates)
    if layer_head:
        with graph.inserting_before(add):
            masked = graph.call_function(apply_layer_gate, (add.args[branch_index], layer_gates))
        add.update_arg(branch_index, masked)
    else:
        graph.erase_node(layer_gates)
