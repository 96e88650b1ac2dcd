"""timm's ResNet family, by name, with the tracing hints timm keeps for torch.fx.

``get_model("timm/resnet50d")`` builds ``timm.create_model("resnet50d", pretrained=False)``.
``pretrained=True`` downloads the weights from the Hugging Face Hub, or reads them from its cache
(``$HF_HOME``); offline, pass a local file with
``pretrained=True, pretrained_cfg_overlay=dict(file="resnet50d.safetensors")``.
"""
from __future__ import annotations

from typing import Any

import timm
import timm.layers
from torch import nn

from gatekit._tracing import register_tracing_hints
from gatekit.blocks import register_channelwise_module

from ._registry import register_model

MODELS = ("resnet18", "resnet26", "resnet26d", "resnet34", "resnet50", "resnet50d", "seresnext26d_32x4d")

# Each treats every channel on its own: DropPath scales whole samples, DropBlock2d masks spatial
# blocks with a mask that does not depend on the input, BlurPool2d is a depthwise blur,
# FrozenBatchNormAct2d a per-channel affine map and activation (BatchNormAct2d is a BatchNorm2d).
_CHANNELWISE = (timm.layers.DropPath, timm.layers.DropBlock2d, timm.layers.BlurPool2d, timm.layers.FrozenBatchNormAct2d)
for _module_type in _CHANNELWISE:
    register_channelwise_module(_module_type)


def _tracing_hints() -> tuple[list[type[nn.Module]], list[Any]]:
    # Asked at every trace, as timm registers leaf modules while its model files are imported.
    # The drop modules stay whole because traced through, their `if self.training` would be frozen
    # into the graph in whichever mode the model was converted; kept whole, they still count as
    # channel-wise, which only whole (call_module) nodes can.
    leaves = timm.layers.get_notrace_modules() + list(_CHANNELWISE)
    return leaves, timm.layers.get_notrace_functions()


register_tracing_hints(_tracing_hints)


def build(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``timm.create_model(name, pretrained=pretrained, **kwargs)``."""
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def register(name: str) -> None:
    """Register ``name`` of this library under the adapter's prefix, built by :func:`build`."""
    @register_model(f"timm/{name}", input_size=(3, 224, 224), description=f"timm {name}")
    def builder(*, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build(name, pretrained=pretrained, **kwargs)


for _name in MODELS:
    register(_name)
