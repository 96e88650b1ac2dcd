"""Saving and loading models: weights plus what is needed to rebuild them, and no code.

Gated models are the main case; dense models save too, so that baselines are profiled the same way
(``convert_options`` is then ``None``). Which builder rebuilds a model, and how a pruned one differs
from what it builds, is found by ``gatekit._model_identity``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import torch
from torch import nn

from ._devices import usable_device
from ._layer_shapes import apply_layer_shapes
from ._exit_info import exits_of, has_exits
from .exits import add_exits
from ._model_identity import build, default_input_shape, describe, identify, named_builder
from ._source import SOURCE_ATTRIBUTE
from ._version import __version__
from .compact import apply_saved_plans
from .convert import convert
from .errors import GatekitError
from .gated_model import unwrapped

FORMAT = "gatekit-checkpoint"
FORMAT_VERSION = 1


def save(
    model: nn.Module, path: str | os.PathLike, *, builder: str | tuple[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write a model to ``path``: its state_dict, how to build (and convert) it, gatekit's version.

    :func:`load` rebuilds the model from a builder, without running code stored in the file. The
    builder is found for models built by ``gatekit.adapters.get_model``, by ``timm.create_model``
    (from ``pretrained_cfg["architecture"]``, ``num_classes`` and the input channels) and by
    torchvision's builders (the one of the model's class whose state_dict has the model's keys and
    shapes, ``num_classes`` read from the classifier), converted or not. A model pruned since it was
    built (Torch-Pruning, say) keeps its builder's keys with other shapes: the changed layers'
    sizes are saved with it. Any other model needs ``builder``.

    Args:
        model: the model, gated or dense (DistributedDataParallel and the like are unwrapped).
        path: the file to write.
        builder: the name of a model registered with ``gatekit.adapters.register_model`` that builds
            this one, or ``(name, kwargs)`` with the arguments to build it with.

    Raises:
        GatekitError: no builder is found for the model, or ``builder`` does not build its layers.

    >>> save(gatekit.convert(torchvision.models.resnet18(num_classes=10)), "gated.pt")  # doctest: +SKIP
    >>> save(gatekit.convert(MyNet(width=8)), "mine.pt", builder=("mine/net", {"width": 8}))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise GatekitError(f"gatekit.save writes a torch.nn.Module, got {type(model).__name__}.")
    model = unwrapped(model)  # DistributedDataParallel and the like: save the model inside
    info = getattr(model, "gatekit", None)
    if builder is not None:
        source = named_builder(builder)
    else:
        source = info.source if info is not None else getattr(model, SOURCE_ATTRIBUTE, None)
    exits = exits_of(model) if has_exits(model) else None
    if info is not None:
        description = info.description
    else:  # a plain model with exits is described as it was before they were added
        description = exits.description if exits is not None else describe(model)
    recipe = identify(description, source)
    state_dict = model.state_dict()
    input_shape = info.input_shape if info is not None else default_input_shape(recipe.name, model)
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gatekit_version": __version__,
            "model": recipe.name,
            "model_kwargs": recipe.kwargs,
            # Only for a pruned model: sizes of the layers that differ from what its builder makes.
            **({"layer_shapes": recipe.layer_shapes} if recipe.layer_shapes else {}),
            "convert_options": dict(info.options) if info is not None else None,
            "input_shape": list(input_shape),
            # gatekit.compact's fold plans, applied again after conversion: plain data, no code.
            "compaction": [list(plan) for plan in info.compaction] if info is not None else [],
            # gatekit.add_exits's options, applied last; thresholds are buffers of the state_dict.
            **({"exits": dict(exits.options)} if exits is not None else {}),
            "state_dict": state_dict,
            "checksum": _checksum(state_dict),
        },
        path,
    )


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save` (gated, or dense if it was saved dense), in eval mode.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
    malicious file cannot run code.

    Raises:
        GatekitError: missing, truncated or corrupt file (weights are checked against a checksum
            written with them); not a gatekit checkpoint; a format, model or option this gatekit
            does not know; weights that do not fit the rebuilt model; ``map_location`` a device
            this machine lacks.
    """
    if isinstance(map_location, (str, torch.device)):  # a missing GPU would read as a corrupt file
        usable_device(map_location, "map_location")
    checkpoint = _read(path, map_location)
    example_input = torch.zeros(checkpoint["input_shape"])
    options = checkpoint["convert_options"]
    try:
        model = build(checkpoint["model"], checkpoint["model_kwargs"])
        if "layer_shapes" in checkpoint:
            _reshaped(path, model, checkpoint["layer_shapes"])
        gated = model if options is None else convert(model, example_input=example_input, **options)
    except TypeError as error:  # an argument this gatekit or this model does not take
        raise GatekitError(
            f"{path} was written by gatekit {checkpoint.get('gatekit_version')} with arguments this "
            f"gatekit cannot rebuild {checkpoint['model']} from: {error}. Load it with that version."
        ) from error
    if checkpoint.get("compaction"):
        gated = _compacted(path, gated, checkpoint["compaction"])
    if "exits" in checkpoint:
        gated = _with_exits(path, gated, checkpoint["exits"], example_input)
    try:
        gated.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise GatekitError(f"the weights in {path} do not fit {checkpoint['model']}: {error}") from error
    return gated.to(map_location).eval()


def _reshaped(path: str | os.PathLike, model: nn.Module, layer_shapes: Any) -> None:
    """Give the freshly built model the saved sizes of the layers pruning changed."""
    try:
        if not isinstance(layer_shapes, dict):
            raise ValueError(f"it is a {type(layer_shapes).__name__}, not a dict")
        apply_layer_shapes(model, layer_shapes)
    except ValueError as error:
        raise GatekitError(
            f"{path} has a malformed 'layer_shapes' field ({error}): it was not written by gatekit.save, "
            f"or was edited. Save the model again."
        ) from error


def _with_exits(path: str | os.PathLike, model: nn.Module, options: Any, example_input: torch.Tensor) -> nn.Module:
    if not isinstance(options, dict) or not isinstance(options.get("at"), list):
        raise GatekitError(
            f"{path} has a malformed 'exits' field: it was not written by gatekit.save, or was edited. "
            f"Save the model again."
        )
    try:
        return add_exits(model, example_input=example_input, inplace=True, **options)
    except TypeError as error:
        raise GatekitError(
            f"{path} has exit options this gatekit does not take ({error}): load it with the gatekit that wrote it."
        ) from error


def _compacted(path: str | os.PathLike, gated: nn.Module, plans: Any) -> nn.Module:
    """The converted model with the saved fold plans of gatekit.compact applied again."""
    try:
        return apply_saved_plans(gated, list(plans))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise GatekitError(
            f"{path} has a malformed 'compaction' field ({type(error).__name__}: {error}): it was not "
            f"written by gatekit.save, or was edited. Save the compacted model again."
        ) from error


def _read(path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise GatekitError(f"no checkpoint at {path}: check the path.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise GatekitError(
            f"{path} is not a readable gatekit checkpoint (truncated, corrupt, or holding code that "
            f"gatekit refuses to run): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise GatekitError(
            f"{path} is not a gatekit checkpoint; a plain state_dict loads with "
            f"`gated.load_state_dict(torch.load(path, weights_only=True))`."
        )
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise GatekitError(
            f"{path} has checkpoint format {checkpoint.get('format_version')} (gatekit "
            f"{checkpoint.get('gatekit_version')}); this gatekit reads format {FORMAT_VERSION}. "
            f"Load it with the gatekit version that wrote it."
        )
    _check_fields(path, checkpoint)
    if "checksum" in checkpoint and checkpoint["checksum"] != _checksum(checkpoint["state_dict"]):
        raise GatekitError(
            f"{path} is corrupt: its weights do not match the checksum written with them (the file "
            f"was damaged or edited after gatekit.save). Save the model again, or use another copy."
        )
    return checkpoint


# Each field load() reads, and the types it must have.
_FIELDS = {
    "model": str, "model_kwargs": dict, "convert_options": (dict, type(None)), "input_shape": list,
    "state_dict": dict,
}


def _check_fields(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    for name, kind in _FIELDS.items():
        if name not in checkpoint or not isinstance(checkpoint[name], kind):
            problem = "lacks" if name not in checkpoint else "has a malformed"
            raise GatekitError(
                f"{path} {problem} '{name}' field: it was not written by gatekit.save, or was edited. "
                f"Save the model again with gatekit.save."
            )
    if not all(isinstance(size, int) and size > 0 for size in checkpoint["input_shape"]):
        raise GatekitError(f"{path} has a malformed 'input_shape' field: {checkpoint['input_shape']!r}.")


def _checksum(state_dict: dict[str, Any]) -> str:
    """SHA-256 of every entry's name, dtype, shape and bytes. torch.load does not check the zip's
    CRCs: a damaged byte in a tensor would otherwise load as a silently different weight."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()
