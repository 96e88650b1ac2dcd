"""torchvision's ResNet family (He et al. 2016; Zagoruyko and Komodakis 2016; Xie et al. 2017), by name.

``get_model("torchvision/resnet50", weights="IMAGENET1K_V2")`` builds the model through
``torchvision.models.get_model``. Pretrained weights are read from ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``) and downloaded there when missing; offline, copy the file named
by the weights' URL into that folder first.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.ops.misc import FrozenBatchNorm2d

from gatekit._tracing import register_tracing_hints
from gatekit.blocks import register_channelwise_module
from gatekit.errors import GatekitError

from ._registry import register_model

MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
)

# ResNets built with norm_layer=FrozenBatchNorm2d (as detection backbones are) scale and shift each
# channel on its own; traced through, its `x * scale + bias` would end the chain the channel gate follows.
register_channelwise_module(FrozenBatchNorm2d)
register_tracing_hints(lambda: ((FrozenBatchNorm2d,), ()))


def resolve_weights(name: str, weights: WeightsEnum | str | None) -> WeightsEnum | None:
    """The weights enum member ``weights`` stands for; raises GatekitError naming the valid ones.

    >>> resolve_weights("resnet18", "DEFAULT")
    ResNet18_Weights.IMAGENET1K_V1
    """
    if weights is None:
        return None
    weights_enum = torchvision.models.get_model_weights(name)
    if isinstance(weights, weights_enum):
        return weights
    if isinstance(weights, str):
        member = weights.removeprefix(f"{weights_enum.__name__}.")
        if member in weights_enum.__members__:
            return weights_enum[member]
    raise GatekitError(
        f"weights={weights!r} are not weights of torchvision's {name}; use None or one of "
        f"{', '.join(weights_enum.__members__)} (names or {weights_enum.__name__} members)."
    )


def build(name: str, *, weights: WeightsEnum | str | None = None, **kwargs: Any) -> nn.Module:
    """Build torchvision's ``name``, loading ``weights`` if given; ``kwargs`` go to torchvision.

    Raises:
        GatekitError: unknown weights, or their file is neither cached nor downloadable.
    """
    resolved = resolve_weights(name, weights)
    try:
        return torchvision.models.get_model(name, weights=resolved, **kwargs)
    except OSError as error:  # urllib's URLError included: no network and no cached file
        if resolved is None:
            raise
        checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise GatekitError(
            f"could not load {resolved!r} for {name}: {type(error).__name__}: {error}\nHint: offline, copy "
            f"{os.path.basename(resolved.url)} into {checkpoints} (set TORCH_HOME to move that folder)."
        ) from error


def register(name: str) -> None:
    """Register ``name`` of this library under the adapter's prefix, built by :func:`build`."""
    @register_model(f"torchvision/{name}", input_size=(3, 224, 224), description=f"torchvision {name}")
    def builder(*, weights: WeightsEnum | str | None = None, **kwargs: Any) -> nn.Module:
        return build(name, weights=weights, **kwargs)


for _name in MODELS:
    register(_name)
