"""What :func:`gatekit.add_exits` records on a model, and how the rest of gatekit finds its exits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .errors import ExitsError
from .exit_head import ExitHead
from .exit_policy import ExitPolicy
from .gated_model import gate_key, unwrapped

HEADS = "gatekit_exit_heads"
POLICY = "gatekit_exit_policy"


@dataclass(frozen=True)
class ExitSite:
    """Where an exit can go: the output of block ``name``, which is the fx node ``node`` (the input
    of the next block, ``next_block``). ``channels`` is its channel count; ``stage_end`` is true when
    the next block changes the shape (a projection or pooled shortcut starts a new stage)."""

    name: str
    node: str
    next_block: str
    channels: int
    stage_end: bool


@dataclass
class ExitInfo:
    """Stored as ``model.gatekit_exits`` by :func:`add_exits`.

    Attributes:
        sites: the exits, in graph order; ``exits[i]`` is ``model.gatekit_exit_heads[key]``.
        options: the :func:`add_exits` options, enough to add the same exits again.
        dense_macs: per-sample MACs of the network without its heads (and without gates).
        input_shape: the example input's shape the costs were measured at.
        costs: the :class:`gatekit.exit_macs.ExitCosts` at ``input_shape``.
        description: what :func:`gatekit.save` needs to identify a plain model's builder, read
            before the exits were added (None for a gated model: its ``gatekit`` info has it).
    """

    sites: tuple[ExitSite, ...]
    options: dict[str, Any] = field(default_factory=dict)
    dense_macs: int = 0
    input_shape: tuple[int, ...] = ()
    costs: Any = None
    description: Any = None


def exits_of(model: nn.Module) -> ExitInfo:
    """``model.gatekit_exits``, or ExitsError naming the fix."""
    info = getattr(unwrapped(model), "gatekit_exits", None)
    if not isinstance(info, ExitInfo):
        raise ExitsError(
            f"{type(model).__name__} has no exit heads. Add them first: `model = gatekit.add_exits(model)`."
        )
    return info


def has_exits(model: nn.Module) -> bool:
    return isinstance(getattr(unwrapped(model), "gatekit_exits", None), ExitInfo)


def exit_heads(model: nn.Module) -> dict[str, ExitHead]:
    """Map each exit's block name to its head, in graph order."""
    info = exits_of(model)
    heads = getattr(unwrapped(model), HEADS)
    return {site.name: heads[gate_key(site.name)] for site in info.sites}


def exit_policy(model: nn.Module) -> ExitPolicy:
    exits_of(model)
    return getattr(unwrapped(model), POLICY)


def attach_exit_info(graph_module: fx.GraphModule, info: ExitInfo) -> None:
    """Set ``graph_module.gatekit_exits``, and have torch.fx keep it through ``copy.deepcopy``."""
    graph_module.gatekit_exits = info
    graph_module.meta.setdefault("_user_preserved_attributes", {})["gatekit_exits"] = info
