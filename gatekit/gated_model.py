"""What convert() records on a gated model, and how the rest of gatekit finds its gates."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import Tensor, nn

from ._model_identity import ModelDescription
from ._sites import GateSite
from ._source import SOURCE_ATTRIBUTE  # noqa: F401  (modules that read it from here still may)
from .skipped_sites import SkippedSite
from .errors import NotConvertedError
from .gate import Gate

GATE_MODES = ("channel", "layer", "channel+layer")


@dataclass
class GatekitInfo:
    """Stored as ``model.gatekit`` by :func:`gatekit.convert`.

    Attributes:
        mode: ``"channel"``, ``"layer"`` or ``"channel+layer"``.
        sites: the gated blocks, in graph order.
        skipped: the residual adds left ungated because they cannot be gated, with the reasons.
        dense_macs: per-sample conv + linear MACs of the original model at ``input_shape``.
        input_shape: shape of the example input the costs were measured on.
        regularizer: the loss :func:`gatekit.gate_loss` adds, or None.
        options: the conversion options, enough to convert the same model again.
        source: ``(name, kwargs)`` of the ``gatekit.adapters.get_model`` call that built the model,
            or None.
        description: the model before conversion, as :func:`gatekit.save` compares it with
            builders to name the one that rebuilds it (classes, state_dict shapes, layer sizes).
        compaction: the fold plans :func:`gatekit.compact` applied, in order (plain data, saved
            with the model so that :func:`gatekit.load` rebuilds the same architecture).
    """

    mode: str
    sites: tuple[GateSite, ...]
    dense_macs: int
    input_shape: tuple[int, ...]
    regularizer: Callable[[nn.Module], Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source: tuple[str, dict[str, Any]] | None = None
    compaction: tuple[list[dict[str, Any]], ...] = ()
    skipped: tuple[SkippedSite, ...] = ()
    description: ModelDescription | None = field(default=None, repr=False)


def attach_info(graph_module: fx.GraphModule, info: GatekitInfo) -> None:
    """Set ``graph_module.gatekit``, and have torch.fx keep it through ``copy.deepcopy``."""
    graph_module.gatekit = info
    graph_module.meta.setdefault("_user_preserved_attributes", {})["gatekit"] = info


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, DataParallel or torch.compile wrappers, so that
    ``gatekit.gate_loss(ddp_model)`` works as ``gatekit.gate_loss(ddp_model.module)`` does."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def info_of(model: nn.Module) -> GatekitInfo:
    """Return ``model.gatekit``, or raise NotConvertedError naming the fix."""
    info = getattr(unwrapped(model), "gatekit", None)
    if not isinstance(info, GatekitInfo):
        raise NotConvertedError(
            f"{type(model).__name__} has no gatekit gates. Convert it first: "
            f"`model = gatekit.convert(model)`."
        )
    return info


def gates_of(model: nn.Module) -> dict[str, Gate]:
    """Map each gated block's dotted name to its :class:`Gate`, in graph order.

    Raises:
        NotConvertedError: the model was not made by :func:`gatekit.convert`.
    """
    info = info_of(model)
    modules = unwrapped(model).gatekit_gates
    return {site.name: modules[gate_key(site.name)] for site in info.sites}


def gate_key(block_name: str) -> str:
    """Key of a block's gate in ``model.gatekit_gates`` (module names cannot contain dots)."""
    return block_name.replace(".", "_")
