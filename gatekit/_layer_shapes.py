"""Layers whose sizes differ from what their builder makes: how a pruned model is saved and rebuilt.

Structured pruning (Torch-Pruning's ``DependencyGraph``, for one) leaves a model of its builder's
class with narrower layers. Torch-Pruning's own ``tp.state_dict`` / ``tp.load_state_dict`` save each
module's whole ``__dict__`` (submodules, hooks, functions) and write it back with
``__dict__.update``: a full pickle, which ``torch.load(weights_only=True)`` refuses, and which may set
anything on a module. Here only sizes are saved, as plain data: each changed layer's size
attributes (a fixed list of names, integers) and the shapes of its tensors. Rebuilding sets those
attributes on the builder's fresh model and gives those tensors those shapes; ``load_state_dict``
then fills them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The attributes that size a layer, as torch's conv, linear and normalisation layers name them.
SIZE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_channels",
    "num_groups", "normalized_shape",
)


def size_attributes(module: nn.Module) -> dict[str, int | tuple[int, ...]]:
    """The size attributes ``module`` has, among :data:`SIZE_ATTRIBUTES`."""
    found = {}
    for name in SIZE_ATTRIBUTES:
        value = getattr(module, name, None)
        if _is_size(value):
            found[name] = value
    return found


def changed_layers(
    tensors: dict[str, tuple[int, ...]], layers: dict[str, dict[str, Any]],
    built_tensors: dict[str, tuple[int, ...]], built_layers: dict[str, dict[str, Any]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per module whose tensor shapes or size attributes differ from the built model's: its size
    attributes and the shapes of its changed tensors, as lists (what ``torch.save`` keeps plainly).

    ``tensors`` maps state_dict keys to shapes and ``layers`` module names to size attributes, for
    the model and (``built_*``) for a fresh one from its builder, with the same state_dict keys.
    """
    changed: dict[str, dict[str, dict[str, Any]]] = {}
    for key, shape in tensors.items():
        if tuple(built_tensors[key]) != tuple(shape):
            module, _, tensor = key.rpartition(".")
            changed.setdefault(module, {"attributes": {}, "tensors": {}})["tensors"][tensor] = list(shape)
    for module, attributes in layers.items():
        if module in changed or attributes != built_layers.get(module, {}):
            entry = changed.setdefault(module, {"attributes": {}, "tensors": {}})
            entry["attributes"] = {name: list(v) if isinstance(v, tuple) else v for name, v in attributes.items()}
    return changed


def apply_layer_shapes(model: nn.Module, layer_shapes: dict[str, Any]) -> None:
    """Resize the layers of a fresh ``model`` as :func:`changed_layers` recorded, in place; the
    resized tensors are left uninitialised for ``load_state_dict`` to fill.

    Raises:
        ValueError: an entry names no module or tensor of ``model``, an attribute that is not a
            size attribute, or a size that is not a whole number.
    """
    for name, entry in layer_shapes.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ValueError(f"entry {name!r} is not a module name with its sizes")
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{type(model).__name__} has no module {name!r}") from error
        for attribute, value in entry.get("attributes", {}).items():
            value = tuple(value) if isinstance(value, list) else value
            if attribute not in SIZE_ATTRIBUTES or not _is_size(value):
                raise ValueError(f"{name}.{attribute} = {value!r} is not a layer size")
            setattr(module, attribute, value)
        for tensor, shape in entry.get("tensors", {}).items():
            _resize(module, name, tensor, shape)


def _resize(module: nn.Module, name: str, tensor: str, shape: Any) -> None:
    if not (isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape)):
        raise ValueError(f"{name}.{tensor} has shape {shape!r}, not a list of sizes")
    if module._parameters.get(tensor) is not None:
        old = module._parameters[tensor]
        module._parameters[tensor] = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)
    elif isinstance(module._buffers.get(tensor), torch.Tensor):
        module._buffers[tensor] = module._buffers[tensor].new_empty(shape)
    else:
        raise ValueError(f"{name or 'the model'} has no parameter or buffer {tensor!r}")


def _is_size(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_is_size(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
