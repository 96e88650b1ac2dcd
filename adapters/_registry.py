"""Registry of model families: build a model by name, and know the input it expects."""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from dataclasses import dataclass
from importlib import import_module, metadata
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gatekit.errors import GatekitError
from gatekit._source import SOURCE_ATTRIBUTE

ENTRY_POINT_GROUP = "gatekit.adapters"
_BUILTIN_ADAPTERS = ("cifar_resnet", "torchvision_resnet", "timm_resnet", "torchvision_models", "timm_models")


@dataclass(frozen=True)
class ModelEntry:
    """A model gatekit can build by name, with the input shape (C, H, W) it is tested at."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, ...]
    description: str = ""


_models: dict[str, ModelEntry] = {}
_loaded = False


def register_model(
    name: str, *, input_size: tuple[int, ...], description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name`` (``family/model``); warns on a duplicate.

    >>> @register_model("mine/tiny", input_size=(3, 32, 32))  # doctest: +SKIP
    ... def tiny(**kwargs): return TinyResNet(**kwargs)
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _models:
            warnings.warn(f"gatekit model {name!r} registered twice; the later builder wins.", stacklevel=2)
        _models[name] = ModelEntry(name, builder, tuple(input_size), description)
        return builder

    return decorator


def load_adapters() -> None:
    """Import the built-in adapters and every package registered under the ``gatekit.adapters`` entry-point group."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_ADAPTERS:
        import_module(f"{__package__}.{module}")
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:
            raise GatekitError(
                f"the gatekit adapter {entry_point.name!r} ({entry_point.value}) failed to load: "
                f"{type(error).__name__}: {error}. Fix or uninstall the package that provides it."
            ) from error


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching an fnmatch ``pattern``.

    >>> list_models("cifar/resnet2*")
    ['cifar/resnet20']
    """
    load_adapters()
    return sorted(fnmatch.filter(_models, pattern))


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; raises GatekitError with close matches if unknown."""
    load_adapters()
    if name not in _models:
        close = difflib.get_close_matches(name, _models, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise GatekitError(f"unknown model {name!r}.{hint} `gatekit.adapters.list_models()` lists them all.")
    return _models[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; keyword arguments go to its builder (``num_classes``, ``weights``, ...).

    >>> get_model("cifar/resnet20", num_classes=10).fc.out_features
    10
    """
    model = model_entry(name).builder(**kwargs)
    # Remembered so that gatekit.save can rebuild the model by name instead of pickling code.
    setattr(model, SOURCE_ATTRIBUTE, (name, dict(kwargs)))
    return model


def example_input(name: str, batch_size: int = 1) -> Tensor:
    """A random input of the shape the model is registered with."""
    return torch.randn(batch_size, *model_entry(name).input_size)
