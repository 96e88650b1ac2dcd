"""Saving and loading gated models: weights plus what is needed to rebuild them, and no code."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import GatekitError
from .gated_model import info_of

FORMAT = "gatekit-checkpoint"
FORMAT_VERSION = 1
# Builder arguments that fetch weights: the checkpoint already holds the trained weights.
_WEIGHT_ARGUMENTS = ("weights", "pretrained")


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a gated model to ``path``: its state_dict, how to build and convert it, gatekit's version.

    The model must come from a registered builder (``gatekit.adapters.get_model``) so that
    :func:`load` can rebuild it without running code stored in the file.

    Raises:
        NotConvertedError: the model has no gates.
        GatekitError: the model was not built through ``gatekit.adapters.get_model``.

    >>> save(gatekit.convert(get_model("cifar/resnet20")), "resnet20-gated.pt")  # doctest: +SKIP
    """
    from . import __version__

    info = info_of(model)
    if info.source is None:
        raise GatekitError(
            "gatekit.save needs to know how to rebuild the model: build it with "
            "`gatekit.adapters.get_model(name, ...)` (register your own builder with "
            "`gatekit.adapters.register_model`), or save `model.state_dict()` yourself."
        )
    name, kwargs = info.source
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gatekit_version": __version__,
            "model": name,
            "model_kwargs": {k: v for k, v in kwargs.items() if k not in _WEIGHT_ARGUMENTS},
            "convert_options": dict(info.options),
            "input_shape": list(info.input_shape),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a gated model saved by :func:`save`, in eval mode.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
    malicious file cannot run code.

    Raises:
        GatekitError: missing, truncated or corrupt file; not a gatekit checkpoint; a format this
            gatekit does not read; weights that do not fit the rebuilt model.
    """
    from .adapters import get_model
    from .convert import convert

    checkpoint = _read(path, map_location)
    model = get_model(checkpoint["model"], **checkpoint["model_kwargs"])
    example_input = torch.zeros(checkpoint["input_shape"])
    gated = convert(model, example_input=example_input, **checkpoint["convert_options"])
    try:
        gated.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise GatekitError(f"the weights in {path} do not fit {checkpoint['model']}: {error}") from error
    return gated.to(map_location).eval()


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
    return checkpoint
