"""Which builder made a model, so that a checkpoint can name it instead of holding its code.

A model built by ``gatekit.adapters.get_model`` says so itself. One built by timm names its
architecture in ``pretrained_cfg``; one built by a torchvision builder is found among the builders of
its class's module, as the one whose state_dict has exactly the model's keys and shapes. Any other
model needs its builder named (``gatekit.save(..., builder=...)``). A model with its builder's keys
but other shapes is a pruned one: its changed layers are recorded (``gatekit._layer_shapes``).

What the model is is read when it is converted (:func:`describe`, cheap: shapes and sizes), and
matched against builders only when it is saved (:func:`identify`): each candidate is built on the
meta device, which allocates nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ._layer_shapes import changed_layers, size_attributes
from .adapters import get_model, model_entry
from .errors import GatekitError

# Builder arguments that fetch weights: the checkpoint already holds the trained weights.
WEIGHT_ARGUMENTS = ("weights", "pretrained")
# Names of models that timm and torchvision build, and the only arguments read from a checkpoint for
# them: others (timm's checkpoint_path, say) could make the builder read a file.
LIBRARY_ARGUMENTS = {"timm:": ("num_classes", "in_chans"), "torchvision:": ("num_classes",)}


@dataclass(frozen=True)
class ModelDescription:
    """What a model is, as plain data: its class, timm's architecture name, and the shape of every
    state_dict entry and the sizes of every layer (``gatekit._layer_shapes.size_attributes``)."""

    class_path: str
    architecture: str | None
    num_classes: int | None
    tensors: dict[str, tuple[int, ...]] = field(repr=False)
    layers: dict[str, dict[str, Any]] = field(repr=False)


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a model: a builder's name (``family/model`` for ``gatekit.adapters``,
    ``timm:<architecture>``, ``torchvision:<builder>``), its arguments, and the layers whose sizes
    differ from what it builds."""

    name: str
    kwargs: dict[str, Any]
    layer_shapes: dict[str, Any]


def describe(model: nn.Module) -> ModelDescription:
    """Read what :func:`identify` needs from ``model``."""
    config = getattr(model, "pretrained_cfg", None)
    num_classes = getattr(model, "num_classes", None)
    return ModelDescription(
        class_path=f"{type(model).__module__}.{type(model).__qualname__}",
        architecture=config.get("architecture") if isinstance(config, dict) else None,
        num_classes=num_classes if isinstance(num_classes, int) else None,
        tensors={key: tuple(value.shape) for key, value in model.state_dict().items()},
        layers={name: sizes for name, module in model.named_modules() if (sizes := size_attributes(module))},
    )


def build(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build the model a :class:`Recipe` names, without pretrained weights.

    Raises:
        GatekitError: an unknown name, or an argument a timm or torchvision name does not take here.
        TypeError: an argument the builder does not take.
    """
    library = next((prefix for prefix in LIBRARY_ARGUMENTS if name.startswith(prefix)), None)
    if library is None:
        return get_model(name, **kwargs)
    unknown = set(kwargs) - set(LIBRARY_ARGUMENTS[library])
    if unknown:
        raise GatekitError(
            f"{name} takes only {', '.join(LIBRARY_ARGUMENTS[library])} from a checkpoint, not "
            f"{', '.join(sorted(unknown))}: the file was not written by gatekit.save, or was edited."
        )
    builder_name = name[len(library):]
    if library == "timm:":
        import timm

        if not timm.is_model(builder_name):
            raise GatekitError(f"timm has no model {builder_name!r}: load it with the timm version that saved it.")
        return timm.create_model(builder_name, pretrained=False, **kwargs)
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(builder_name)
    except ValueError as error:
        raise GatekitError(f"torchvision has no builder {builder_name!r}: load it with the torchvision version that saved it.") from error
    return builder(weights=None, **kwargs)


def identify(description: ModelDescription | None, source: tuple[str, Mapping[str, Any]] | None) -> Recipe:
    """The :class:`Recipe` that rebuilds the described model: from ``source`` (the builder
    ``get_model`` recorded, or the one the user named) where given, else found from timm's
    architecture name or among torchvision's builders.

    Raises:
        GatekitError: no builder is found, or ``source`` does not build the model's layers.
    """
    if source is not None:
        name, kwargs = source[0], {k: v for k, v in source[1].items() if k not in WEIGHT_ARGUMENTS}
        if description is None:  # a model converted by a gatekit that did not describe it
            return Recipe(name, kwargs, {})
        recipe = _matched(description, name, kwargs)
        if recipe is None:
            raise GatekitError(_mismatch(description, name, kwargs))
        return recipe
    candidates = [] if description is None else _candidates(description)
    recipes = []
    for name, kwargs in candidates:
        recipe = _matched(description, name, kwargs)
        if recipe is not None and not recipe.layer_shapes:
            return recipe
        recipes += [] if recipe is None else [recipe]
    if recipes:  # pruned: the builder that needs the fewest changed layers
        return min(recipes, key=lambda recipe: len(recipe.layer_shapes))
    what = "the model" if description is None else description.class_path
    tried = f" (tried {', '.join(name for name, _ in candidates)})" if candidates else ""
    raise GatekitError(
        f"gatekit.save needs to know how to rebuild the model: {what} was not built by "
        f"`gatekit.adapters.get_model`, nor is it as a timm or torchvision builder makes it{tried}. Name its "
        f"builder: `gatekit.save(model, path, builder=('family/name', {{...}}))` with one registered by "
        f"`gatekit.adapters.register_model`, or save `model.state_dict()` yourself."
    )


def named_builder(builder: Any) -> tuple[str, dict[str, Any]]:
    """``gatekit.save``'s ``builder`` argument as ``(name, kwargs)``.

    Raises:
        GatekitError: it is neither a name nor ``(name, kwargs)``, or the arguments are not plain data.
    """
    name, kwargs = None, None
    if isinstance(builder, str):
        name, kwargs = builder, {}
    elif isinstance(builder, tuple) and len(builder) == 2:
        name, kwargs = builder
    if not isinstance(name, str) or not isinstance(kwargs, Mapping):
        raise GatekitError(
            f"builder={builder!r}: give a registered model's name, or (name, kwargs), e.g. "
            f"builder=('cifar/resnet20', {{'num_classes': 10}})."
        )
    if not _plain(dict(kwargs)):
        raise GatekitError(
            f"builder={builder!r}: a checkpoint holds plain data only (numbers, strings, lists, tuples, "
            f"dicts), so the builder's arguments must be such data."
        )
    return name, dict(kwargs)


def default_input_shape(name: str, model: nn.Module) -> tuple[int, ...]:
    """The input a dense model is recorded with: its registered size, timm's configured one, or
    224 pixels a side with its first conv's channels."""
    if not any(name.startswith(prefix) for prefix in LIBRARY_ARGUMENTS):
        return (1, *model_entry(name).input_size)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    config = getattr(model, "pretrained_cfg", None)
    size = config.get("input_size") if isinstance(config, dict) else None
    spatial = tuple(size[1:]) if size else (224,) * (len(first_conv.kernel_size) if first_conv else 2)
    return (1, first_conv.in_channels if first_conv else 3, *spatial)


def _plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back: plain Python data."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _candidates(description: ModelDescription) -> list[tuple[str, dict[str, Any]]]:
    """Builders that may have made the model: timm's named architecture, or the torchvision builders
    of the model's class's module, those that declare that class first."""
    module, _, class_name = description.class_path.rpartition(".")
    if description.architecture and module.startswith("timm."):
        in_channels = next((sizes["in_channels"] for sizes in description.layers.values() if "in_channels" in sizes), None)
        kwargs = {"num_classes": description.num_classes, "in_chans": in_channels}
        return [(f"timm:{description.architecture}", {k: v for k, v in kwargs.items() if v is not None})]
    if not module.startswith("torchvision.models."):
        return []
    import torchvision

    builders = {name: torchvision.models.get_model_builder(name) for name in torchvision.models.list_models()}
    names = [name for name, builder in builders.items() if builder.__module__ == module]
    # Builders of the model's class first, the one whose weights have nearest its parameter count
    # first among them: an exact match is then usually the first model built.
    size = _parameters_with_1000_classes(description)
    names.sort(key=lambda name: (_returned_class(builders[name]) != class_name, abs(_published_parameters(name) - size)))
    num_classes = _classifier_width(description)
    return [(f"torchvision:{name}", {} if num_classes is None else {"num_classes": num_classes}) for name in names]


def _published_parameters(name: str) -> float:
    """The parameter count torchvision publishes for a builder's weights (1000 ImageNet classes)."""
    import torchvision

    weights = list(torchvision.models.get_model_weights(name))
    return weights[0].meta.get("num_params", math.inf) if weights else math.inf


def _parameters_with_1000_classes(description: ModelDescription) -> int:
    """About the model's parameter count (buffers included) had its classifier 1000 outputs."""
    shapes = [shape for key, shape in description.tensors.items() if key.endswith("weight") and len(shape) >= 2]
    total = sum(math.prod(shape) for shape in description.tensors.values())
    if not shapes:
        return total
    per_class = math.prod(shapes[-1][1:]) + 1  # a weight row and a bias
    return total + (1000 - shapes[-1][0]) * per_class


def _returned_class(builder: Any) -> str | None:
    """The name of the class a builder declares it returns (torchvision's do)."""
    returned = getattr(builder, "__annotations__", {}).get("return")
    return returned if isinstance(returned, str) else getattr(returned, "__name__", None)


def _classifier_width(description: ModelDescription) -> int | None:
    """The output width of the model's last layer with a weight: its classifier, in torchvision's models."""
    weights = [shape for key, shape in description.tensors.items() if key.endswith("weight") and len(shape) >= 2]
    return weights[-1][0] if weights else None


def _matched(description: ModelDescription, name: str, kwargs: dict[str, Any]) -> Recipe | None:
    """The recipe for ``name(**kwargs)`` where it builds the model's state_dict keys, else None."""
    built = _built(name, kwargs)
    if isinstance(built, str) or set(built.tensors) != set(description.tensors):
        return None
    return Recipe(name, kwargs, changed_layers(description.tensors, description.layers, built.tensors, built.layers))


_BUILT: dict[str, ModelDescription | str] = {}  # saving each epoch builds each candidate once


def _built(name: str, kwargs: dict[str, Any]) -> ModelDescription | str:
    """What ``name(**kwargs)`` builds, or why it does not build (arguments of another model)."""
    key = f"{name}{sorted(kwargs.items())!r}"
    if key not in _BUILT:
        try:
            with torch.device("meta"):  # shapes without memory or initialisation
                _BUILT[key] = describe(build(name, kwargs))
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            # Some builders compute with their tensors at construction, which meta tensors cannot do.
            try:
                _BUILT[key] = describe(build(name, kwargs))
            except (TypeError, ValueError) as error:
                _BUILT[key] = f"{type(error).__name__}: {error}"
    return _BUILT[key]


def _mismatch(description: ModelDescription, name: str, kwargs: dict[str, Any]) -> str:
    built = _built(name, kwargs)
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    if isinstance(built, str):
        return f"gatekit.save cannot call the model's builder {call} ({built}): check its name and arguments."
    missing, extra = set(built.tensors) - set(description.tensors), set(description.tensors) - set(built.tensors)
    detail = "; ".join(part for part in (
        f"it lacks {', '.join(sorted(missing)[:3])}" if missing else "",
        f"it has {', '.join(sorted(extra)[:3])} in addition" if extra else "",
    ) if part)
    return (
        f"{description.class_path} is not what {call} builds: {detail}. Pass the builder that builds it, "
        f"`gatekit.save(model, path, builder=(name, kwargs))`, or save `model.state_dict()` yourself."
    )
